"""The VLAN layer in the agent: per bridge, what was applied vs what the kernel holds,
repaired through the same BridgeApplier (read-back and rollback) that `apply` uses.

Drift is judged against what this agent last made the kernel hold (`applied`), as for
nftables: a legacy port or the uplink whose table differs, vlan_filtering turned off,
a hardening knob we set that is off again. Ports that are not legacy guests' nor the
uplink are never judged: segguard leaves them as found.

A tap bound by an event changes that port's table only (and the uplink's, when the
bridge gains or loses a VLAN): the plan handed to the applier is cut down to the
ports that differ, so nothing else on the bridge is written or re-read per port.
Hardening knobs are read back per port, which costs a link dump each, so they are
checked on the full checks (start, periodic drift check, config change) only.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

from segguard.compile.vlan import LEGACY, UPLINK, BridgeVlanPlan, compile_vlans
from segguard.errors import SegguardError
from segguard.host import HostFacts
from segguard.host.vlans import PortVlans, fmt_vids

# Reconcile reasons that also read every legacy port's hardening knobs back.
FULL_CHECK = frozenset({"start", "drift-check", "config", "manual", "periodic", "after-verify"})


def classify_vlan_drift(applied: dict[str, BridgeVlanPlan], facts: HostFacts) -> list[tuple[str, str, list[str]]]:
    """(kind, detail, guests) for each way the live bridges differ from what was applied."""
    out: list[tuple[str, str, list[str]]] = []
    for name, bv in sorted(applied.items()):
        bf = facts.bridge(name)
        if bf is None or not bv.managed:
            continue  # a bridge gone has no VLANs to repair; the nft layer still holds
        on_bridge = sorted({g for p in bv.ports for g in p.guests})
        if bf.vlan_filtering is False:
            out.append(("vlan-filtering-off", f"bridge {name}: vlan_filtering turned off", on_bridge))
        present = {p.name for p in bf.ports}
        for p in bv.ports:
            if p.role not in (LEGACY, UPLINK) or p.port not in present:
                continue  # a tap unplugged or moved away: its link event says so
            live, want = bf.port_vlans(p.port) or PortVlans(p.port), p.after
            who = f"port {p.port} ({p.role}{': ' + ', '.join(p.guests) if p.guests else ''})"
            guests = list(p.guests) or on_bridge
            added = sorted(set(live.vids) - set(want.vids))
            removed = sorted(set(want.vids) - set(live.vids))
            if added:
                out.append(("port-vlan-added", f"VLAN {fmt_vids(added)} added to {who}", guests))
            if removed:
                out.append(("port-vlan-removed", f"VLAN {fmt_vids(removed)} removed from {who}", guests))
            if not added and not removed and (live.pvid, live.untagged) != (want.pvid, want.untagged):
                out.append(("port-vlan-changed", f"{who}: live {live.describe()}, desired {want.describe()}", guests))
    return out


def classify_knob_drift(applied: dict[str, str], live: dict[str, str], guests_of: dict[str, list[str]]) -> list[tuple[str, str, list[str]]]:
    """A knob we turned on that reads back otherwise (`port.knob` -> state)."""
    out = []
    for key, was in sorted(applied.items()):
        now = live.get(key)
        if was == "on" and now is not None and now != "on":
            out.append(("port-knob-changed", f"{key} turned {now}", guests_of.get(key.split(".", 1)[0], [])))
    return out


def restore_view(config: Any, facts: HostFacts, bindings: Any, applied: dict[str, BridgeVlanPlan]) -> tuple[BridgeVlanPlan, ...]:
    """The VLAN plans that make the kernel hold the policy again.

    vlan_filtering turned off by hand makes the compiler see "every VLAN passes every
    port" and refuse to re-cut the other ports. But the agent had it on, the ports'
    tables are still in the kernel and decide again the moment it is back on, so
    turning it back on restores the state that was in force: compile as if it were on
    (refusals then speak only of real losses) and tell the applier it is off."""
    restore = {n for n, bv in applied.items() if bv.managed and (bf := facts.bridge(n)) is not None and bf.vlan_filtering is False}
    if not restore:
        return compile_vlans(config, facts, bindings)
    patched = replace(facts, bridges=tuple(replace(b, vlan_filtering=True) if b.name in restore else b for b in facts.bridges))
    return tuple(replace(bv, filtering_before=False) if bv.bridge in restore else bv
                 for bv in compile_vlans(config, patched, bindings))


def _port_of(knob: str) -> str:
    """`vnet7.bpdu_guard` -> `vnet7` (interface names may hold dots, knob names do not)."""
    return knob.rsplit(".", 1)[0]


def cut_to(bv: BridgeVlanPlan, ports: set[str]) -> BridgeVlanPlan:
    return replace(bv, ports=tuple(p for p in bv.ports if p.port in ports))


class VlanLayer:
    def __init__(self, log, metrics=None, applier=None):
        from segguard.apply.bridge import BridgeApplier

        self.log, self.metrics = log, metrics
        self.applier = applier or BridgeApplier()
        self.applied: dict[str, BridgeVlanPlan] = {}
        self.knobs: dict[str, dict[str, str]] = {}     # bridge -> `port.knob` -> state read back after our apply
        self.state: dict[str, dict[str, Any]] = {}     # bridge -> what status shows
        self.layer = ""
        self._said: set[str] = set()

    def reconcile(self, plan: Any, facts: HostFacts, full: bool, reasons: frozenset[str],
                  record_drift: Callable[[str, str, list[str] | None], None]) -> list[str]:
        """Drift-check and repair every managed bridge of `plan` (whose vlans come from
        restore_view). Returns what changed. A refused or failed bridge is logged and
        shown; it never stops the nftables layer, which was applied before this."""
        if plan.vlan_layer:
            self.layer = f"missing: {plan.vlan_layer}; only the nftables layer is enforced"
            self._say_once("vlan-layer-missing", self.layer, "warning")
            return []
        self.layer = "available"
        for kind, detail, guests in classify_vlan_drift(self.applied, facts):
            record_drift(kind, detail, guests)
        changes: list[str] = []
        seen = set()
        for bv in plan.vlans:
            seen.add(bv.bridge)
            if not bv.managed:
                self.state[bv.bridge] = {"managed": False, "reason": bv.reason}
                self.applied.pop(bv.bridge, None)
                self._say_once(f"unmanaged:{bv.bridge}", bv.reason, "warning")
                continue
            if bv.blocking:
                msgs = [r.message for r in bv.blocking]
                self.state[bv.bridge] = {"managed": True, "result": "refused", "refusals": msgs}
                self._say_once("refused:" + "|".join(msgs), "; ".join(msgs), "error", bridge=bv.bridge)
                continue
            try:
                changes += self._bridge(bv, facts, full, reasons, record_drift)
            except SegguardError as exc:
                details = list(getattr(exc, "details", []) or [])
                self.state[bv.bridge] = {"managed": True, "result": "error", "error": str(exc), "details": details}
                self.log.error("vlan-apply-failed", bridge=bv.bridge, error=str(exc), details=details,
                               kept="the nftables layer stays in force")
                if self.metrics:
                    self.metrics.applies.labels("vlan", "error").inc()
        for gone in set(self.applied) - seen:
            self.applied.pop(gone, None)
        return changes

    def _bridge(self, bv: BridgeVlanPlan, facts: HostFacts, full: bool, reasons: frozenset[str], record_drift) -> list[str]:
        before = self.applied.get(bv.bridge)
        was_legacy = {p.port for p in before.ports if p.role == LEGACY} if before else set()
        guests_of = {p.port: list(p.guests) for p in bv.ports if p.role == LEGACY}
        legacy = set(guests_of)
        first = bv.bridge not in self.knobs
        todo = {p.port for p in bv.ports if p.changed}
        if first or full:
            # first look (agent start): knobs already on are left alone, so a restart
            # that finds everything in place writes nothing
            check = legacy if first else legacy & was_legacy
            live = self.applier.hardening(cut_to(bv, check))
            if first:
                self.knobs[bv.bridge] = live
                off = {k for k, v in live.items() if v.startswith("off")}
            else:
                drifted = classify_knob_drift(self.knobs[bv.bridge], live, guests_of)
                for kind, detail, guests in drifted:
                    record_drift(kind, detail, guests)
                off = {d.split(" ", 1)[0] for _, d, _ in drifted}
            todo |= {_port_of(k) for k in off}
            todo |= legacy - was_legacy - check
        else:
            todo |= legacy - was_legacy
        changes: list[str] = []
        if todo or not bv.filtering_before:
            start = time.monotonic()
            cut = cut_to(bv, todo)
            reports = self.applier.apply([cut])
            seconds = time.monotonic() - start
            knobs = {k: v for k, v in self.knobs.get(bv.bridge, {}).items() if _port_of(k) in legacy | {bv.bridge}}
            for r in reports:
                knobs.update(r.hardening)
                for x in r.lacking:
                    self._say_once(f"lacking:{bv.bridge}:{x.split(':', 1)[0]}", f"{bv.bridge}: kernel lacks {x}", "warning")
            self.knobs[bv.bridge] = knobs
            changed = {p.port for p in cut.ports if p.changed}
            changes = [f"{bv.bridge}: vlan_filtering on"] if not bv.filtering_before else []
            changes += [f"{bv.bridge} port {p.port}: {p.before.describe()} -> {p.after.describe()}" for p in cut.ports if p.changed]
            changes += [f"{bv.bridge} port {p}: hardening set" for p in sorted(todo - changed)]
            self.log.info("vlan-applied", bridge=bv.bridge, ports=sorted(todo), seconds=round(seconds, 4),
                          reasons=sorted(reasons), changes=changes)
            if self.metrics:
                self.metrics.applies.labels("vlan", "ok").inc()
                self.metrics.apply_seconds.labels("vlan").observe(seconds)
        else:
            self.knobs[bv.bridge] = {k: v for k, v in self.knobs[bv.bridge].items() if _port_of(k) in legacy | {bv.bridge}}
        self.applied[bv.bridge] = bv
        if changes:
            filtering, tables = self.applier.live(bv)
        else:  # nothing written: the facts this reconcile read are the live state
            bf = facts.bridge(bv.bridge)
            filtering, tables = bf.vlan_filtering, {t.port: t for t in bf.vlans}
        self.state[bv.bridge] = {"managed": True, "result": "in sync", "vlan_filtering": filtering,
                                 "ports": {n: t.describe() for n, t in tables.items() if n in legacy or n == bv.uplink},
                                 "hardening": dict(self.knobs.get(bv.bridge, {}))}
        return changes

    def guest(self, b: Any, vlan: int | None) -> dict[str, Any]:
        """Desired vs realized VLAN of one guest's port, for status."""
        if self.layer.startswith("missing"):
            return {"vlan": vlan, "layer": self.layer}
        bv = self.applied.get(b.bridge)
        st = self.state.get(b.bridge, {})
        if bv is None:
            return {"vlan": vlan, "layer": st.get("reason") or st.get("result") or "not applied", "in_sync": False}
        p = bv.port(b.port) if b.port else None
        if p is None:
            return {"vlan": vlan, "layer": "in force", "desired": "no port bound", "realized": "-", "in_sync": True}
        live = (st.get("ports") or {}).get(b.port, "?")
        return {"vlan": vlan, "layer": "in force", "desired": p.after.describe(), "realized": live,
                "in_sync": live == p.after.describe()}

    def _say_once(self, key: str, message: str, level: str, **fields: Any) -> None:
        """Refusals and missing features hold until something changes: log them once,
        not at every reconcile (status keeps showing them)."""
        if key in self._said:
            return
        self._said.add(key)
        getattr(self.log, level)("vlan-layer", message=message, **fields)
