"""The VLAN layer's plan (pure): per bridge a profile names, every port's VLAN table
before and after.

* a legacy guest's port carries exactly its profile's VLAN: PVID, egress untagged,
  nothing else (the default VLAN 1 included);
* the uplink (site.yaml `bridges.<br>.uplink`) carries only the VLANs the other ports
  of the bridge (and the bridge itself) use after the change, plus `keep_vlans`;
* every other port, and the bridge's own entries, stay exactly as found.

Taking a VLAN away from a port that is not a legacy guest (pruning the uplink, or
turning vlan_filtering on, which ends "every VLAN passes" on every port) can cut off
other guests, so it is a refusal unless `bridges.<br>.allow_vlan_removal` says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from segguard.config.validate import Config
from segguard.host import BridgeFact, HostFacts
from segguard.host.vlans import ALL_VLANS, PortVlans, fmt_vids
from segguard.plan import Binding

LEGACY, UPLINK, OTHER, BRIDGE = "legacy", "uplink", "other", "bridge"


@dataclass(frozen=True)
class PortChange:
    port: str
    role: str                 # legacy | uplink | other | bridge (the bridge's own entries)
    guests: tuple[str, ...]   # legacy guests on this port
    before: PortVlans
    after: PortVlans
    # VIDs the port could carry before and cannot after; with vlan_filtering off every
    # VID passes every port, so turning it on takes away all but `after`
    lost: tuple[int, ...] = ()

    @property
    def changed(self) -> bool:
        return (self.before.vids, self.before.pvid, self.before.untagged) != (self.after.vids, self.after.pvid, self.after.untagged)

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port, "role": self.role, "guests": list(self.guests), "before": self.before.to_dict(),
                "after": self.after.to_dict(), "changed": self.changed, "lost": fmt_vids(self.lost)}


@dataclass(frozen=True)
class Refusal:
    """A change apply will not make on its own authority."""

    bridge: str
    port: str
    vids: tuple[int, ...]
    message: str
    overridable: bool = True   # False: no site setting makes it acceptable

    def to_dict(self) -> dict[str, Any]:
        return {"bridge": self.bridge, "port": self.port, "vids": fmt_vids(self.vids), "message": self.message,
                "overridable": self.overridable}


@dataclass(frozen=True)
class BridgeVlanPlan:
    bridge: str
    managed: bool                     # False: the VLAN layer leaves this bridge alone (see `reason`)
    filtering_before: bool
    uplink: str | None = None
    keep_vlans: tuple[int, ...] = ()
    allow_removal: bool = False
    ports: tuple[PortChange, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    warnings: tuple[str, ...] = ()
    reason: str = ""

    @property
    def filtering_after(self) -> bool:
        return True if self.managed else self.filtering_before

    @property
    def changed(self) -> bool:
        return self.managed and (not self.filtering_before or any(p.changed for p in self.ports))

    @property
    def blocking(self) -> tuple[Refusal, ...]:
        """The refusals that stop apply under this site config."""
        return tuple(r for r in self.refusals if not (r.overridable and self.allow_removal))

    def port(self, name: str) -> PortChange | None:
        return next((p for p in self.ports if p.port == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"bridge": self.bridge, "managed": self.managed, "reason": self.reason,
                "vlan_filtering": {"before": self.filtering_before, "after": self.filtering_after},
                "uplink": self.uplink, "keep_vlans": fmt_vids(self.keep_vlans), "allow_vlan_removal": self.allow_removal,
                "ports": [p.to_dict() for p in self.ports], "refusals": [r.to_dict() for r in self.refusals],
                "warnings": list(self.warnings)}


def compile_vlans(config: Config, facts: HostFacts, bindings: list[Binding] | tuple[Binding, ...]) -> tuple[BridgeVlanPlan, ...]:
    """Nothing at all where the kernel has no bridge VLAN filtering: there is no VLAN
    layer to plan (flow and status say so)."""
    if not facts.vlan_filtering:
        return ()
    out = []
    for name in sorted({lp.profile.bridge for lp in config.profiles}):
        bf = facts.bridge(name)
        if bf is not None:
            out.append(_bridge(config, bf, [b for b in bindings if b.bridge == name]))
    return tuple(out)


def _bridge(config: Config, bf: BridgeFact, bindings: list[Binding]) -> BridgeVlanPlan:
    site_br = config.site.bridges.get(bf.name)
    profiles = {lp.name: lp.profile for lp in config.profiles}
    mgmt = set(config.site.management.vlans)
    filtering = bool(bf.vlan_filtering)
    port_names = [p.name for p in bf.ports]
    before = {n: (bf.port_vlans(n) or PortVlans(n)) for n in [*port_names, bf.name]}

    if not filtering and site_br is None:
        # Turning filtering on re-cuts every port of the bridge; that is a decision the
        # site makes by naming the bridge, not something a profile implies.
        rows = [PortChange(n, BRIDGE if n == bf.name else OTHER, (), before[n], before[n]) for n in sorted(before)]
        return BridgeVlanPlan(bf.name, False, False, ports=tuple(rows),
                              reason=f"bridge {bf.name} is not VLAN-aware and site.yaml `bridges` does not name it: "
                                     f"the VLAN layer is not applied (add `bridges: {{{bf.name}: {{}}}}` to turn vlan_filtering on)")

    uplink = site_br.uplink if site_br else None
    keep = tuple(sorted(set(site_br.keep_vlans))) if site_br else ()
    allow = bool(site_br and site_br.allow_vlan_removal)
    refusals: list[Refusal] = []
    warnings: list[str] = []

    legacy: dict[str, tuple[int, list[str]]] = {}
    for b in bindings:
        if b.port is None or b.port not in before or b.port == bf.name:
            continue
        vlan = profiles[b.profile].vlan
        if b.port in legacy and legacy[b.port][0] != vlan:
            refusals.append(Refusal(bf.name, b.port, (vlan,), f"port {b.port} carries guests of profiles on VLANs "
                                    f"{legacy[b.port][0]} and {vlan}; a legacy port has exactly one VLAN", False))
            continue
        legacy.setdefault(b.port, (vlan, []))[1].append(b.guest)

    after: dict[str, PortVlans] = dict(before)
    roles = {n: OTHER for n in port_names}
    roles[bf.name] = BRIDGE
    for port, (vlan, guests) in legacy.items():
        roles[port] = LEGACY
        if vlan in mgmt:  # validation forbids it; the compiler refuses it anyway
            refusals.append(Refusal(bf.name, port, (vlan,), f"VLAN {vlan} is a management VLAN; it never goes on a legacy port", False))
            continue
        after[port] = PortVlans(port, (vlan,), vlan, (vlan,))

    if uplink:
        if uplink in legacy:
            refusals.append(Refusal(bf.name, uplink, (), f"uplink {uplink} of {bf.name} is also the port of legacy guest(s) "
                                    f"{', '.join(legacy[uplink][1])}; fix site.yaml bridges.{bf.name}.uplink or the guest's port", False))
        elif uplink not in before:
            warnings.append(f"uplink {uplink} is not a port of {bf.name} now: nothing pruned")
        else:
            roles[uplink] = UPLINK
            used = set().union(*(after[n].vids for n in after if n != uplink))
            vids = tuple(sorted(used | set(keep)))
            up = before[uplink]
            after[uplink] = PortVlans(uplink, vids, up.pvid if up.pvid in vids else None,
                                      tuple(v for v in up.untagged if v in vids))
            native = sorted({v for v, _ in legacy.values()} & set(after[uplink].untagged))
            if native:
                warnings.append(f"uplink {uplink} sends legacy VLAN(s) {fmt_vids(native)} untagged: a double-tagged frame from a "
                                f"legacy guest would leave it carrying only its inner tag; the nftables layer drops tagged "
                                f"frames from legacy ports, but the VLAN layer alone does not stop that")

    rows: list[PortChange] = []
    for n in sorted(after):
        lost = set(before[n].vids) - set(after[n].vids) if filtering else ALL_VLANS - set(after[n].vids)
        guests = tuple(sorted(legacy[n][1])) if roles[n] == LEGACY else ()
        rows.append(PortChange(n, roles[n], guests, before[n], after[n], tuple(sorted(lost))))
        if roles[n] == LEGACY or not lost:
            continue
        what = (f"turning vlan_filtering on for {bf.name} leaves it only {fmt_vids(after[n].vids) or 'no VLAN'}" if not filtering
                else "nothing on this host uses them" if roles[n] == UPLINK else "")
        kind = {UPLINK: "the uplink", BRIDGE: "the bridge itself (the host's own traffic)"}.get(roles[n], "not a legacy guest port")
        hint = f"keep them with bridges.{bf.name}.keep_vlans, or " if roles[n] == UPLINK else ""
        refusals.append(Refusal(bf.name, n, tuple(sorted(lost)),
                                f"port {n} ({kind}) would lose VLAN {fmt_vids(lost)}" + (f": {what}" if what else "")
                                + f"; {hint}set bridges.{bf.name}.allow_vlan_removal: true in site.yaml to allow it"))

    for port, (vlan, guests) in sorted(legacy.items()):
        if not any(vlan in after[n].vids for n in after if n != port):
            warnings.append(f"VLAN {vlan} of legacy port {port} ({', '.join(guests)}) is on no other port of {bf.name}: "
                            f"those guests will reach nothing")
    return BridgeVlanPlan(bf.name, True, filtering, uplink, keep, allow, tuple(rows), tuple(refusals), tuple(warnings))


def vlan_layer_missing(config: Config, facts: HostFacts) -> str:
    """Why there is no VLAN layer on this host ("" when there is one, or nothing to do)."""
    if facts.vlan_filtering or not config.profiles:
        return ""
    return "this kernel lacks bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)"
