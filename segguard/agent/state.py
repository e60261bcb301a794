"""What the agent writes for `segguard status` (and reads back): one JSON file in the
per-namespace state directory, replaced atomically after every change."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

from segguard.plan import Binding, Plan, compact_json

STATE_NAME = "agent"


def _replace(name: str, text: str | Iterable[str]) -> None:
    from segguard.flow import state_dir

    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{name}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        if isinstance(text, str):
            fh.write(text)
        else:
            fh.writelines(text)
    tmp.replace(d / name)


def write_applied(plan: Plan) -> None:
    """flow.record_applied's file (the hook and `status` read it), written compact: the
    indented form goes through json's pure-Python encoder, seconds for a 1,000-guest
    plan, and the agent writes it after every change."""
    _replace("applied.json", compact_json(plan))


def write_agent_state(data: dict[str, Any]) -> None:
    """flow.write_state(STATE_NAME, data), compact for the same reason."""
    _replace(f"{STATE_NAME}.json", json.dumps(data, sort_keys=True, default=str, separators=(",", ":")) + "\n")


def plan_from_dict(data: dict[str, Any]) -> Plan:
    return Plan(table=data.get("table", "segguard"), stateful=bool(data.get("stateful", False)),
                bindings=tuple(Binding(**{**b, "ipv4": tuple(b.get("ipv4", ())), "ipv6": tuple(b.get("ipv6", ())),
                                           "chains": tuple(b.get("chains", ()))})
                               for b in data.get("bindings", [])),
                nft=tuple(data.get("nft", [])), warnings=tuple(data.get("warnings", [])))


def snapshot(rec, verify: dict[str, dict[str, Any]], started: float, pid: int, ready: bool) -> dict[str, Any]:
    """The agent's view: per guest bound port, desired vs realized, last drift, last verify."""
    from segguard.agent.reconcile import guest_problems

    guests = {}
    # every guest is in sync when the last read-back matched; only otherwise is the
    # plan compared guest by guest (each comparison walks the whole table)
    plan = None if rec.in_sync() else rec.desired
    realized = None if plan is None else rec.realized
    vlan_of = {lp.name: lp.profile.vlan for lp in rec.config.profiles} if rec.config else {}
    for b in rec.bindings:
        problems = guest_problems(plan, realized, b.guest) if plan is not None else []
        guests[b.guest] = {
            "profile": b.profile, "bridge": b.bridge, "mac": b.mac, "port": b.port, "source": b.source, "mode": b.mode,
            "desired": "bound to " + b.port if b.port else "unbound: MAC dropped on every port",
            "realized": "== desired" if not problems else "DIFFERS: " + "; ".join(problems[:3]),
            "in_sync": not problems,
            "last_drift": rec.guest_drift.get(b.guest),
            "last_verify": verify.get(b.guest),
            "vlan": rec.vlan.guest(b, vlan_of.get(b.profile)),
        }
    return {
        "pid": pid, "started": started, "ready": ready,
        "config_dir": str(rec.config.directory) if rec.config else str(rec.config_dir),
        "config_valid": rec.config_error is None,
        "config_error": rec.config_error, "config_error_at": rec.config_error_at,
        "vlan_layer": rec.vlan.layer or "-", "vlan_bridges": rec.vlan.state,
        "last_apply": rec.last_apply, "last_drift": rec.last_drift, "drift_counts": rec.drift_counts,
        "guests": guests,
        # unbound ports whose interval-set elements are not deleted yet (inert: no
        # dispatch element reaches them; the agent deletes them when quiet)
        "leftover_ports": rec.leftover_ports,
    }
