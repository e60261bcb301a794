"""Program the VLAN layer over netlink (pyroute2): port VLAN tables, vlan_filtering and
bridge/port hardening, then read everything back and compare with the plan.

Only what the plan names is touched: legacy guest ports, the uplink (pruned only when
the plan says so) and the bridge's vlan_filtering. Other ports and the bridge's own
VLAN entries are read back too, to prove they were left as found.

Netlink offers no transaction for this, so apply is: check the live tables still are
what the plan was compiled against, change, read back; any failure restores every
touched port and the filtering flag to the state read before, then raises ApplyError.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable

from segguard.compile.vlan import LEGACY, BridgeVlanPlan
from segguard.errors import ApplyError, HostError, VlanChangeRefused, VlanLayerMissing
from segguard.host.vlans import PortVlans, bridge_filtering

BR_BOOLOPT_NO_LL_LEARN = 1 << 0
# Port hardening on legacy ports: (name, pyroute2 brport keyword, value, IFLA attribute).
# bpdu_guard: a BPDU from the guest disables its port; root_block: the guest never
# becomes STP root; flood off: unknown unicast (other hosts' traffic) is not copied to it.
PORT_HARDENING = (
    ("bpdu_guard", "guard", 1, "IFLA_BRPORT_GUARD"),
    ("root_block", "protect", 1, "IFLA_BRPORT_PROTECT"),
    ("unicast_flood_off", "unicast_flood", 0, "IFLA_BRPORT_UNICAST_FLOOD"),
)
LEARNING_LIMIT_LACK = ("per-port FDB learning limit: no kernel offers one (only a bridge-wide fdb_max_learned, "
                       "which would cap every port, so it is not set); the nftables layer drops every source MAC "
                       "but the guest's before the FDB learns it")


def _extend_pyroute2() -> None:
    """pyroute2 0.9 does not know IFLA_BR_MULTI_BOOLOPT (kernel 5.0+, the attribute that
    carries no_linklocal_learn); teach its bridge attribute table the two entries that
    follow the last one it knows, so the option can be set and read over netlink."""
    from pyroute2.netlink import nla
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    bd = ifinfmsg.ifinfo.bridge_data
    names = [n for n, _ in bd.nla_map]
    if "IFLA_BR_MULTI_BOOLOPT" in names:
        return
    if names[-1] != "IFLA_BR_MCAST_MLD_VERSION":  # a pyroute2 we do not know: do not guess numbers
        return

    class br_boolopt_multi(nla):
        fields = (("optval", "I"), ("optmask", "I"))

    bd.br_boolopt_multi = br_boolopt_multi
    bd.nla_map = tuple(bd.nla_map) + (("IFLA_BR_VLAN_STATS_PER_PORT", "uint8"), ("IFLA_BR_MULTI_BOOLOPT", "br_boolopt_multi"))
    bd._nlmsg_base__compiled_nla = False  # recompile the table on next use


def check_vlan_plan(plan: Any) -> None:
    """Before anything is applied: refusals, and a VLAN layer the site requires but
    this host cannot carry."""
    blocking = [r for bv in plan.vlans for r in bv.blocking]
    if blocking:
        raise VlanChangeRefused(blocking)
    if getattr(plan, "vlan_required", False):
        missing = [f"the VLAN layer is missing: {plan.vlan_layer}"] if getattr(plan, "vlan_layer", "") else []
        missing += [bv.reason for bv in plan.vlans if not bv.managed]
        if missing:
            raise VlanLayerMissing("site.yaml vlan_layer_required is set, and " + "; ".join(missing)
                                   + "; nothing was applied")


@dataclass
class BridgeReport:
    bridge: str
    changed: bool = False
    hardening: dict[str, str] = field(default_factory=dict)   # knob -> "on" / "lacking: ..."
    lacking: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"bridge": self.bridge, "changed": self.changed, "hardening": dict(self.hardening), "lacking": list(self.lacking)}


class _Bridge:
    """Live netlink view of one bridge."""

    def __init__(self, ipr: Any, name: str):
        self.ipr, self.name = ipr, name
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise HostError(f"bridge {name} does not exist")
        self.index = found[0]

    def link(self) -> Any:
        return self.ipr.get_links(self.index)[0]

    def names(self) -> dict[int, str]:
        # over rtnl (host/rtnl.py says why): pyroute2 dumped every link at ~1.1 ms each,
        # and the VLAN layer reads this around each of a bind's port changes
        from segguard.host import rtnl

        return {i: l.name for i, l in rtnl.links().items() if i == self.index or l.master == self.index}

    def tables(self) -> dict[str, PortVlans]:
        from segguard.host.netlink import port_vlans

        return {p.port: p for p in port_vlans(self.index, self.names())}

    def filtering(self) -> bool | None:
        return bridge_filtering(self.link())

    def port_index(self, port: str) -> int:
        idx = {n: i for i, n in self.names().items()}.get(port)
        if idx is None:
            raise ApplyError(f"port {port} is no longer on bridge {self.name}")
        return idx


def _runs(vids: Iterable[int]) -> list[tuple[int, int]]:
    s = sorted(set(vids))
    out: list[tuple[int, int]] = []
    for v in s:
        if out and out[-1][1] == v - 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def _set_table(ipr: Any, index: int, have: PortVlans, want: PortVlans) -> None:
    """Make one port's table `want`: add/flag-fix first (the PVID moves before the old one
    is deleted, so untagged frames are never classified into a VLAN being removed),
    then delete what is left over."""
    for vid in want.vids:
        flags = (0x2 if want.pvid == vid else 0) | (0x4 if vid in want.untagged else 0)
        was = (0x2 if have.pvid == vid else 0) | (0x4 if vid in have.untagged else 0)
        if vid in have.vids and flags == was:
            continue
        ipr.vlan_filter("add", index=index, vlan_info={"vid": vid, "flags": flags})
    for lo, hi in _runs(set(have.vids) - set(want.vids)):
        ipr.vlan_filter("del", index=index, vlan_info={"vid": str(lo) if lo == hi else f"{lo}-{hi}"})


def _same(a: PortVlans | None, b: PortVlans) -> bool:
    a = a or PortVlans(b.port)
    return (a.vids, a.pvid, a.untagged) == (b.vids, b.pvid, b.untagged)


class BridgeApplier:
    def __init__(self, ipr: Any = None):
        self._ipr = ipr

    @contextlib.contextmanager
    def _route(self):
        if self._ipr is not None:
            yield self._ipr
            return
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            yield ipr

    # ---- read-only -------------------------------------------------------------------

    def live(self, plan: BridgeVlanPlan) -> tuple[bool | None, dict[str, PortVlans]]:
        with self._route() as ipr:
            br = _Bridge(ipr, plan.bridge)
            return br.filtering(), br.tables()

    def drift(self, plan: BridgeVlanPlan) -> list[str]:
        """Where the live bridge differs from the plan's `after` (empty: in sync)."""
        filtering, tables = self.live(plan)
        return _drift(plan, filtering, tables)

    def hardening(self, plan: BridgeVlanPlan) -> dict[str, str]:
        with self._route() as ipr:
            return _hardening_state(ipr, _Bridge(ipr, plan.bridge), plan)

    # ---- apply -----------------------------------------------------------------------

    def apply(self, plans: Iterable[BridgeVlanPlan]) -> list[BridgeReport]:
        _extend_pyroute2()
        reports = []
        for bv in plans:
            if not bv.managed:
                continue
            if bv.blocking:  # flow checks first; never apply a refused plan
                raise VlanChangeRefused(list(bv.blocking))
            with self._route() as ipr:
                reports.append(self._apply_bridge(ipr, bv))
        return reports

    def _apply_bridge(self, ipr: Any, bv: BridgeVlanPlan) -> BridgeReport:
        br = _Bridge(ipr, bv.bridge)
        report = BridgeReport(bv.bridge)
        filtering0, tables0 = br.filtering(), br.tables()
        # the plan was compiled from facts read a moment ago; if the bridge moved since,
        # its refusal checks speak about another bridge: stop rather than guess
        moved = [p.port for p in bv.ports if p.changed and not _same(tables0.get(p.port), p.before)]
        if moved or bool(filtering0) != bv.filtering_before:
            raise ApplyError(f"bridge {bv.bridge} changed since the plan was made "
                             f"({', '.join(moved) or 'vlan_filtering'}); run apply again")
        touched: list[str] = []
        try:
            for p in bv.ports:
                if p.changed:
                    touched.append(p.port)
                    _set_table(ipr, br.port_index(p.port), tables0.get(p.port) or PortVlans(p.port), p.after)
            if not filtering0:
                # after the tables: with filtering off they decide nothing yet, so the
                # ports switch to their final VLANs in one step
                ipr.link("set", index=br.index, kind="bridge", br_vlan_filtering=1)
            report.changed = bool(touched) or not filtering0
            self._harden(ipr, br, bv, report)
            problems = _drift(bv, br.filtering(), br.tables())
            if problems:
                raise ApplyError(f"read-back of bridge {bv.bridge} VLANs differs from the plan", details=problems)
        except BaseException as exc:
            rollback = self._rollback(ipr, br, tables0, filtering0, touched)
            if isinstance(exc, ApplyError):
                exc.details = list(exc.details) + rollback
                raise
            from pyroute2.netlink.exceptions import NetlinkError

            if isinstance(exc, (NetlinkError, OSError)):
                raise ApplyError(f"kernel refused a VLAN change on bridge {bv.bridge}: {exc}", details=rollback) from exc
            raise
        return report

    def _rollback(self, ipr: Any, br: _Bridge, tables0: dict[str, PortVlans], filtering0: bool | None,
                  touched: list[str]) -> list[str]:
        notes = []
        for port in touched:
            try:
                _set_table(ipr, br.port_index(port), br.tables().get(port) or PortVlans(port), tables0.get(port) or PortVlans(port))
            except Exception as exc:  # noqa: BLE001 - keep restoring the others
                notes.append(f"ROLLBACK FAILED for port {port}: {exc}; it was {(tables0.get(port) or PortVlans(port)).describe()}")
        with contextlib.suppress(Exception):
            if br.filtering() != filtering0:
                ipr.link("set", index=br.index, kind="bridge", br_vlan_filtering=int(bool(filtering0)))
        now = br.tables()
        back = all(_same(now.get(p), tables0.get(p) or PortVlans(p)) for p in touched)
        notes.append("VLAN changes rolled back: ports and vlan_filtering are as found" if back and not notes
                     else "VLAN rollback incomplete; check `segguard audit vlans`")
        return notes

    def _harden(self, ipr: Any, br: _Bridge, bv: BridgeVlanPlan, report: BridgeReport) -> None:
        """Set each knob where the kernel has it; what it lacks is reported, not fatal."""
        try:
            ipr.link("set", index=br.index, kind="bridge", br_multi_boolopt={"optval": BR_BOOLOPT_NO_LL_LEARN,
                                                                              "optmask": BR_BOOLOPT_NO_LL_LEARN})
        except Exception:  # noqa: BLE001 - older kernels refuse the attribute; read-back says so
            pass
        for p in bv.ports:
            if p.role != LEGACY:
                continue
            idx = br.port_index(p.port)
            for _name, kw, value, _attr in PORT_HARDENING:
                try:
                    ipr.brport("set", index=idx, **{kw: value})
                except Exception:  # noqa: BLE001 - read-back reports it as lacking
                    pass
        report.hardening = _hardening_state(ipr, br, bv)
        report.lacking = [f"{k}: {v[len('lacking: '):]}" for k, v in report.hardening.items() if v.startswith("lacking")]


def _hardening_state(ipr: Any, br: _Bridge, bv: BridgeVlanPlan) -> dict[str, str]:
    _extend_pyroute2()
    out: dict[str, str] = {}
    data = br.link().get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    opt = data.get_attr("IFLA_BR_MULTI_BOOLOPT") if data is not None else None
    if opt is None or not opt["optmask"] & BR_BOOLOPT_NO_LL_LEARN:
        out[f"{bv.bridge}.no_linklocal_learn"] = "lacking: the kernel has no bridge boolopt no_linklocal_learn"
    else:
        out[f"{bv.bridge}.no_linklocal_learn"] = "on" if opt["optval"] & BR_BOOLOPT_NO_LL_LEARN else "off"
    for p in bv.ports:
        if p.role != LEGACY:
            continue
        info = ipr.get_links(br.port_index(p.port))[0].get_attr("IFLA_LINKINFO")
        slave = info.get_attr("IFLA_INFO_SLAVE_DATA") if info is not None else None
        for name, _kw, value, attr in PORT_HARDENING:
            got = slave.get_attr(attr) if slave is not None else None
            key = f"{p.port}.{name}"
            out[key] = (f"lacking: the kernel reports no {attr}" if got is None
                        else "on" if got == value else f"off ({attr}={got})")
        out[f"{p.port}.learning_limit"] = "lacking: " + LEARNING_LIMIT_LACK
    return out


def _drift(bv: BridgeVlanPlan, filtering: bool | None, tables: dict[str, PortVlans]) -> list[str]:
    problems = []
    if bv.managed and not filtering:
        problems.append(f"bridge {bv.bridge}: vlan_filtering is off (desired on)")
    for p in bv.ports:
        live = tables.get(p.port)
        if live is None:
            problems.append(f"port {p.port}: no longer on {bv.bridge}")
        elif not _same(live, p.after):
            problems.append(f"port {p.port} ({p.role}): live {live.describe()}, desired {p.after.describe()}")
    return problems
