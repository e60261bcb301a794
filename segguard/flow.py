"""The one road every driver (CLI, lab, agent) takes: load -> facts -> compile ->
apply -> read back. Kept free of output formatting; the CLI renders the results."""
from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from segguard.compile import compile_plan
from segguard.config.validate import Config, load_config
from segguard.host import HostFacts
from segguard.plan import TABLE, Plan, compact_json

DEFAULT_STATE_DIR = "/run/segguard"  # SEGGUARD_STATE overrides it, read at each use


_held = threading.local()


@contextmanager
def writer_lock(state_dir: Path | None = None) -> Iterator[None]:
    """One lock for every writer (apply, lab, agent): transactions never interleave.
    Per network namespace, since each namespace has its own nftables.

    Re-entrant within a thread: the agent holds it around a live verify, whose own
    applies take it again; flock on a second descriptor would wait for ourselves."""
    d = state_dir or _ns_state_dir()
    held = getattr(_held, "dirs", None)
    if held is None:
        held = _held.dirs = {}
    key = str(d)
    if held.get(key):
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        held[key] = 1
        try:
            yield
        finally:
            held[key] = 0
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ns_state_dir() -> Path:
    try:
        ns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        ns = 0
    # the environment at the time of use, not of import: a test's (or a caller's)
    # SEGGUARD_STATE set after segguard.flow was imported still counts
    return Path(os.environ.get("SEGGUARD_STATE", DEFAULT_STATE_DIR)) / f"netns-{ns}"


def live_facts(config: Config) -> HostFacts:
    from segguard.host.netlink import read_host_facts

    return read_host_facts([lp.profile.bridge for lp in config.profiles])


def build_plan(config_dir: str | None, facts: HostFacts | None = None) -> tuple[Config, HostFacts, Plan]:
    config = load_config(config_dir)
    facts = facts if facts is not None else live_facts(config)
    return config, facts, compile_plan(config, facts)


@dataclass(frozen=True)
class ApplyResult:
    changed: bool
    plan: Plan
    seconds: float
    warnings: tuple[str, ...] = ()     # the VLAN layer's: missing here, hardening the kernel lacks
    vlan_reports: tuple = ()           # apply.bridge.BridgeReport per bridge changed or checked


def apply_plan(plan: Plan, dry_run: bool = False) -> ApplyResult:
    from segguard.apply.bridge import BridgeApplier, check_vlan_plan
    from segguard.apply.nftables import NftablesApplier

    start = time.monotonic()
    # refusals and a required-but-missing VLAN layer stop apply before either layer moves
    check_vlan_plan(plan)
    warnings = [f"VLAN layer missing: {plan.vlan_layer}; only the nftables layer is enforced"] if plan.vlan_layer else []
    warnings += [bv.reason for bv in plan.vlans if not bv.managed]
    warnings += [w for bv in plan.vlans for w in bv.warnings]
    applier = NftablesApplier()
    if dry_run:
        changed = not applier.diff(plan).empty or any(bv.changed for bv in plan.vlans)
        return ApplyResult(changed, plan, time.monotonic() - start, tuple(warnings))
    with writer_lock():
        changed = applier.apply(plan)
        reports = BridgeApplier().apply(plan.vlans) if plan.vlans else []
        record_applied(plan)
    for r in reports:
        warnings += [f"{r.bridge}: kernel lacks {x}" for x in r.lacking]
    changed = changed or any(r.changed for r in reports)
    return ApplyResult(changed, plan, time.monotonic() - start, tuple(warnings), tuple(reports))


def record_applied(plan: Plan) -> None:
    """Keep the last applied plan, so `status` can say what was meant, not only what is."""
    d = _ns_state_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "applied.json.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(compact_json(plan))  # the indented form took 0.6 s at 1,000 guests
    tmp.replace(d / "applied.json")


def last_applied() -> dict | None:
    p = _ns_state_dir() / "applied.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def remove(table: str = TABLE) -> bool:
    from segguard.apply.nftables import NftablesApplier

    with writer_lock():
        return NftablesApplier().remove(table)


def state_dir() -> Path:
    """The per-namespace state directory (lock, applied plan, agent state)."""
    return _ns_state_dir()


def write_state(name: str, data: dict) -> None:
    """Atomically replace `<state dir>/<name>.json` (readers never see half a file)."""
    d = _ns_state_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{name}.json.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(d / f"{name}.json")


def read_state(name: str) -> dict | None:
    try:
        return json.loads((_ns_state_dir() / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
