"""Observe -> diff -> apply.

  desired   the plan compiled from the last good config and the host as it is now
  applied   the plan this agent last made the kernel hold
  realized  the table as the kernel lists it now

realized != applied is drift (someone changed the kernel); desired != applied is a
change of the world (a tap appeared, the config changed). Either way the kernel is
made to hold `desired`: by element updates when only port bindings differ, else by the
one-transaction replace. Every write happens under flow.writer_lock, the lock every
writer takes. Nothing here ever deletes the table or flushes anything.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from segguard.agent.vlans import FULL_CHECK, restore_view
from segguard.apply.incremental import ELEMENT_OBJECTS, apply_delta, element_delta
from segguard.apply.nftables import NftablesApplier, diff_objects, normalize, rule_order
from segguard.compile import compile_plan
from segguard.compile.nft import ident
from segguard.config.validate import Config, load_config
from segguard.errors import ConfigError, SegguardError
from segguard.host import BridgeFact, HostFacts, PortFact
from segguard.plan import Binding, Plan

MEMBERSHIP = ("legacy_macs", "audit_macs", *ELEMENT_OBJECTS)
SHARED_SETS = ("internal4", "internal6", "dc4", "dc6", "mgmt4", "mgmt6", "hyp4", "hyp6", "ad_ports")
BASE_CHAINS = ("prerouting", "input", "forward", "output")


# ---------------------------------------------------------------- host facts, cheaply

class TopologyReader:
    """Host facts for the agent and the hook. Kernel capabilities are probed once (the
    VLAN probe creates a scratch bridge: doing that per link event would feed itself);
    bridges and ports are read per call over one netlink socket."""

    def __init__(self, caps: HostFacts | None = None, with_libvirt: bool = True):
        self._caps = caps
        self.with_libvirt = with_libvirt
        self._ipr = None

    def caps(self) -> HostFacts:
        if self._caps is None:
            from segguard.host.netlink import _bridge_conntrack_available, _try_vlan_filtering

            self._caps = HostFacts(bridge_conntrack=_bridge_conntrack_available(), vlan_filtering=_try_vlan_filtering())
        return self._caps

    def facts(self, bridges: list[str]) -> HostFacts:
        from pyroute2 import IPRoute

        from segguard.host.netlink import _vlan_facts

        caps = self.caps()
        if self._ipr is None:
            self._ipr = IPRoute()
        try:
            links = {l["index"]: l for l in self._ipr.get_links()}
            found = []
            for name in sorted(set(bridges)):
                br = next((l for l in links.values() if l.get_attr("IFLA_IFNAME") == name), None)
                if br is None:
                    continue
                ports = tuple(sorted((PortFact(l.get_attr("IFLA_IFNAME"), (l.get_attr("IFLA_ADDRESS") or "").lower())
                                      for l in links.values() if l.get_attr("IFLA_MASTER") == br["index"]),
                                     key=lambda p: p.name))
                addrs = tuple(sorted(a.get_attr("IFA_ADDRESS") for a in self._ipr.get_addr(index=br["index"])))
                # the VLAN layer's facts (one AF_BRIDGE dump) only where the kernel has one
                vf = _vlan_facts(self._ipr, br, links) if caps.vlan_filtering else (None, ())
                found.append(BridgeFact(name, addrs, ports, *vf))
        except OSError as exc:
            self.close()
            from segguard.errors import HostError

            raise HostError(f"cannot read links over netlink: {exc}") from exc
        lv: tuple[tuple[str, str], ...] = ()
        if self.with_libvirt:
            from segguard.host.libvirt import libvirt_ports

            lv = libvirt_ports()
        return HostFacts(bridges=tuple(found), libvirt_ports=lv, bridge_conntrack=caps.bridge_conntrack,
                         vlan_filtering=caps.vlan_filtering)

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


# ---------------------------------------------------------------- drift, by kind

def classify_drift(applied: list[dict[str, Any]], realized: list[dict[str, Any]] | None) -> list[tuple[str, str]]:
    """(kind, detail) for each way the kernel differs from what was applied."""
    if realized is None:
        return [("table-deleted", "table bridge segguard is gone")]
    out: list[tuple[str, str]] = []
    d = diff_objects(applied, realized)
    seen: set[tuple[str, str]] = set()
    for side, objs in (("missing", d.missing), ("unexpected", d.unexpected)):
        for o in objs:
            kind, body = next(iter(o.items()))
            if kind == "rule":
                item = ("rule-changed", f"chain {body['chain']}")
            elif kind in ("set", "map"):
                item = ("elements-changed" if _same_but_elems(o, applied, realized) else "set-changed", f"{kind} {body['name']}")
            elif kind == "chain":
                item = ("chain-changed", f"chain {body['name']}")
            else:
                item = (f"{kind}-changed", json.dumps(body, sort_keys=True)[:120])
            if item not in seen:
                seen.add(item)
                out.append(item)
    if not out and rule_order(applied) != rule_order(realized):
        out.append(("rule-order-changed", "rules reordered"))
    return out


def _same_but_elems(obj: dict[str, Any], a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    kind, body = next(iter(obj.items()))

    def bare(objs):
        for o in objs:
            k, bd = next(iter(o.items()))
            if k == kind and bd.get("name") == body.get("name"):
                return normalize([{k: {x: y for x, y in bd.items() if x != "elem"}}])
        return None

    x, y = bare(a), bare(b)
    return x is not None and x == y


# ---------------------------------------------------------------- one guest's slice

def _membership_filter(name: str, elems: list[Any], b: Binding) -> list[Any]:
    if name in ("legacy_macs", "audit_macs"):
        return [e for e in elems if e == b.mac]
    if name == "bound_ports":
        return [e for e in elems if isinstance(e, dict) and (e["concat"][0] == b.mac or (b.port and e["concat"][1] == b.port))]
    return [e for e in elems if b.port and e[0] == b.port]


def guest_view(objects: list[dict[str, Any]], b: Binding) -> list[dict[str, Any]]:
    """What of the table concerns guest `b`: its own chains, its profile's chains and
    peer sets, the shared sets and base chains, and exactly its elements of the
    membership sets (its MAC, its port)."""
    chains = {f"out_{ident(b.guest)}", f"nd_{ident(b.guest)}", f"pout_{ident(b.profile)}", f"pin_{ident(b.profile)}", *BASE_CHAINS}
    peer_prefix = f"p_{ident(b.profile)}_"
    import re

    port_chain = "in_" + re.sub(r"[^A-Za-z0-9_]", "_", b.port) if b.port else None
    out = []
    for obj in objects:
        kind, body = next(iter(obj.items()))
        if body.get("family") == "netdev":
            # the per-port ingress chain of its own port (compile/nft.py _port_ingress)
            # (not the netdev table itself: it exists iff some port has a chain)
            if kind != "table" and port_chain and body.get("chain" if kind == "rule" else "name") == port_chain:
                out.append(obj)
            continue
        if kind == "table":
            out.append(obj)
        elif kind in ("chain", "rule"):
            if body.get("chain" if kind == "rule" else "name") in chains:
                out.append(obj)
        elif kind in ("set", "map"):
            name = body.get("name", "")
            if name in MEMBERSHIP:
                body = copy.deepcopy(body)
                elems = _membership_filter(name, body.pop("elem", []), b)
                if elems:
                    body["elem"] = elems
                out.append({kind: body})
            elif name in SHARED_SETS or name.startswith(peer_prefix):
                out.append(obj)
    return out


def guest_problems(plan: Plan, realized: list[dict[str, Any]] | None, guest: str) -> list[str]:
    """[] when the kernel holds exactly the plan's policy for this guest."""
    b = plan.binding(guest)
    if b is None:
        return [f"guest {guest} is not in the plan"]
    if realized is None:
        return [f"table bridge {plan.table} is not loaded"]
    want, have = guest_view(list(plan.nft), b), guest_view(realized, b)
    d = diff_objects(want, have)
    problems = d.describe(limit=10)
    if not problems and rule_order(want) != rule_order(have):
        problems = ["rule order differs from the plan"]
    return problems


# ---------------------------------------------------------------- the reconciler

@dataclass
class Outcome:
    action: str                       # none | incremental | full | skipped | error
    seconds: float = 0.0
    drift: list[tuple[str, str]] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    error: str | None = None
    vlan_changes: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(self, config_dir: str | Path | None, log, metrics=None, topology: TopologyReader | None = None,
                 applier: NftablesApplier | None = None, on_change: Callable[[], None] | None = None):
        self.config_dir = config_dir
        self.log = log
        self.metrics = metrics
        self.topology = topology or TopologyReader()
        self.applier = applier or NftablesApplier()
        self.config: Config | None = None
        self.config_error: list[str] | None = None
        self.config_error_at: float | None = None
        self.desired: Plan | None = None
        self.applied: Plan | None = None
        self.realized: list[dict[str, Any]] | None = None
        self.last_apply: dict[str, Any] | None = None
        self.last_drift: dict[str, Any] | None = None
        self.guest_drift: dict[str, dict[str, Any]] = {}
        self.drift_counts: dict[str, int] = {}
        self.on_change = on_change
        self.former_ports: dict[str, Binding] = {}
        from segguard.agent.vlans import VlanLayer

        self.vlan = VlanLayer(log, metrics)

    # -- config ---------------------------------------------------------------------
    def load(self) -> bool:
        """Load and validate the config. A bad one keeps the last good one in force."""
        try:
            cfg = load_config(self.config_dir)
        except ConfigError as exc:
            self.config_error = [str(p) for p in exc.problems]
            self.config_error_at = time.time()
            self.log.error("config-invalid", problems=self.config_error,
                           kept="last good config" if self.config else "nothing loaded yet; the kernel's table is left as it is")
            if self.metrics:
                self.metrics.config_valid.set(0)
            return False
        self.config, self.config_error, self.config_error_at = cfg, None, None
        if self.metrics:
            self.metrics.config_valid.set(1)
        self.log.info("config-loaded", directory=str(cfg.directory), profiles=[lp.name for lp in cfg.profiles],
                      guests=len(cfg.guests()))
        return True

    @property
    def bridges(self) -> list[str]:
        return [lp.profile.bridge for lp in self.config.profiles] if self.config else []

    def guest_by_port(self, port: str) -> Binding | None:
        """Who is (or was last) bound to `port`: a tap moved off its bridge is already
        unbound by the time its event is read, and the event still names its guest."""
        plan = self.applied or self.desired
        b = next((b for b in plan.bindings if b.port == port), None) if plan else None
        return b or self.former_ports.get(port)

    # -- drift bookkeeping ------------------------------------------------------------
    def record_drift(self, kind: str, detail: str, guests: list[str] | None = None) -> None:
        now = time.time()
        ev = {"at": now, "kind": kind, "detail": detail}
        self.last_drift = ev
        self.drift_counts[kind] = self.drift_counts.get(kind, 0) + 1
        for g in guests if guests is not None else [b.guest for b in (self.applied.bindings if self.applied else ())]:
            self.guest_drift[g] = ev
        if self.metrics:
            self.metrics.drift.labels(kind).inc()
        self.log.warning("drift", kind=kind, detail=detail, guests=guests)

    def _guests_touched(self, kind: str, detail: str) -> list[str] | None:
        if not self.applied or kind == "table-deleted":
            return None
        hit = []
        for b in self.applied.bindings:
            names = {f"out_{ident(b.guest)}", f"nd_{ident(b.guest)}", f"pout_{ident(b.profile)}", f"pin_{ident(b.profile)}"}
            if any(detail.endswith(" " + n) for n in names) or detail.startswith(f"set p_{ident(b.profile)}_"):
                hit.append(b.guest)
        return hit or None  # base chains, shared sets: every guest

    # -- the loop body -----------------------------------------------------------------
    def reconcile(self, reasons: frozenset[str] | set[str] = frozenset({"manual"})) -> Outcome:
        from segguard.flow import record_applied, writer_lock

        if self.config is None:
            return Outcome("skipped", error="no valid config loaded")
        start = time.monotonic()
        kind = "none"
        try:
            with writer_lock():
                facts = self.topology.facts(self.bridges)
                desired = compile_plan(self.config, facts)
                if desired.vlans:
                    desired = dataclasses.replace(desired, vlans=restore_view(self.config, facts, desired.bindings,
                                                                              self.vlan.applied))
                realized = self.applier.realized(desired.table)
                # after a live verify the table holds the plan the verifier put back (or its
                # stand-in plan, if it failed half-way): our own switch, not drift
                ours = "after-verify" in reasons
                drift = classify_drift(list(self.applied.nft), realized) if self.applied is not None and not ours else []
                for k, detail in drift:
                    self.record_drift(k, detail, self._guests_touched(k, detail))
                delta = element_delta(list(desired.nft), realized)
                if delta is not None and delta.empty:
                    changes: list[str] = []
                elif delta is not None:
                    kind, changes = "incremental", delta.describe()
                    apply_delta(desired, delta, self.applier.nft)
                else:
                    kind = "full"
                    changes = ["table absent: created"] if realized is None else diff_objects(list(desired.nft), realized).describe(limit=10)
                    self.applier.apply(desired)
                if kind != "none" or self.applied is None:
                    record_applied(desired)
                for b in self.applied.bindings if self.applied else ():
                    if b.port:
                        self.former_ports[b.port] = b
                self.desired = self.applied = desired
                self.realized = realized if kind == "none" else self.applier.realized(desired.table)
                # the VLAN layer after the nftables one, in the same lock: the MAC
                # rules already hold whatever the port's VLAN is meanwhile
                vlan_changes = self.vlan.reconcile(desired, facts, bool(set(reasons) & FULL_CHECK), frozenset(reasons),
                                                   self.record_drift)
                if vlan_changes and kind == "none":
                    record_applied(desired)
        except SegguardError as exc:
            seconds = time.monotonic() - start
            self.log.error("apply-failed", error=str(exc), reasons=sorted(reasons),
                           details=getattr(exc, "details", []), kept="the previous table stays in force")
            if self.metrics:
                self.metrics.applies.labels(kind if kind != "none" else "full", "error").inc()
            self.last_apply = {"at": time.time(), "kind": kind, "result": "error", "error": str(exc)}
            return Outcome("error", seconds, error=str(exc))
        seconds = time.monotonic() - start
        if kind != "none":
            self.last_apply = {"at": time.time(), "kind": kind, "result": "ok", "seconds": round(seconds, 4)}
            if self.metrics:
                self.metrics.applies.labels(kind, "ok").inc()
                self.metrics.apply_seconds.labels(kind).observe(seconds)
            self.log.info("applied", kind=kind, seconds=round(seconds, 4), reasons=sorted(reasons), changes=changes[:20])
        self._count_guests()
        return Outcome(kind, seconds, drift, changes, vlan_changes=vlan_changes)

    def _count_guests(self) -> None:
        if self.metrics and self.desired:
            bound = sum(1 for b in self.desired.bindings if b.port)
            self.metrics.guests.labels("protected").set(bound)
            self.metrics.guests.labels("unbound").set(len(self.desired.bindings) - bound)
