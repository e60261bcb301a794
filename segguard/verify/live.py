"""The live-host vantage: prove a guest's policy without touching the guest.

Three temporary probe ports join the guest's bridge, each alone in a namespace:
  A  enrolled in the guest's profile with the guest's addresses (a stand-in guest),
  B  unenrolled: the unrestricted source, and the "peer" for flows towards the guest,
  C  unenrolled: the sink for everything the stand-in sends.
Frames are addressed at L2 to C (or A) and both have static FDB entries, so a frame
the wall lets through goes to our own probe port and nowhere else: a failed probe
reaches no real host. The live table is switched to a plan with A enrolled for the
run and back to the configured plan afterwards, whatever happens.

On a VLAN-aware bridge the VLAN layer is proven as well. A carries whatever the plan's
VLAN layer compiles for a legacy port (it should be exactly the guest's VLAN); B and C
sit on that VLAN untagged and carry, tagged like an uplink, every VLAN a probe names; a
fourth port D is "a host on another VLAN" (one the bridge already uses, else a scratch
VID that vanishes with the port) and on the management VLANs. Static FDB entries are
per VLAN there, so each sink is pinned on each of its VLANs, and D's MAC is pinned to C
on the VLANs D is not on: no probe frame is flooded to a real port. Only probe ports'
VLAN tables are touched; the real ports are compared with the plan and left as found.
"""
from __future__ import annotations

import contextlib
import secrets
from dataclasses import replace

import netaddr

from segguard.config.validate import Config
from segguard.errors import HostError, SegguardError
from segguard.lab import netns as nl
from segguard.plan import Binding, Plan
from segguard.verify.expectations import Expectation, Intent, expectations_for
from segguard.verify.probes import Probe, ProbePortInfo, probe_port
from segguard.verify.run import run_expectations
from segguard.verify.vlan_expectations import vlan_expectations

DEFAULT_VID = 1


def _mac(token: str, role: int) -> str:
    # locally administered unicast (02:...), never a vendor MAC of a real guest
    return f"02:5e:67:{token[:2]}:{token[2:4]}:{role:02x}"


def spare_addresses(config: Config, family: int) -> list[str]:
    """Internal addresses no guard rail, group or guest uses: what the default and
    anti-spoofing probes are aimed at, and the other-VLAN host's (they only ever reach
    our own probe ports)."""
    site = config.site
    used = netaddr.IPSet([*site.domain_controllers, *site.hypervisor, *site.management.networks,
                          *(n for nets in site.groups.values() for n in nets),
                          *(a for _, g in config.guests() for a in (*g.ipv4, *g.ipv6))])
    out: list[str] = []
    for net in site.internal:
        if net.version != family:
            continue
        for candidate in (net.network + 250, net.network + 0x1234, net.network + 251, net.network + 0x1235):
            if candidate in net and candidate not in used and str(candidate) not in out:
                out.append(str(candidate))
    return out


def spare_address(config: Config, family: int) -> str | None:
    return next(iter(spare_addresses(config, family)), None)


def _row(rid: str, category: str, description: str, expected: str, observed: str, ok: bool, why: str = "") -> dict:
    return {"id": rid, "guest": "-", "category": category, "description": description, "expected": expected,
            "observed": observed, "control": None, "pass": ok, "why": "" if ok else why}


class _LiveBinder:
    def __init__(self, b: Binding, ports: dict[str, ProbePortInfo], bridge_mac: str, neighbours: dict[int, str],
                 other_vlan_ip: str | None = None):
        self.b, self.a, self.bp, self.c, self.d = b, ports["a"], ports["b"], ports["c"], ports.get("d")
        self.bridge_mac = bridge_mac
        self.neighbours = neighbours
        self.other_vlan_ip = other_vlan_ip

    def _guest_ip(self, fam: int) -> str | None:
        ips = self.b.ipv4 if fam == 4 else self.b.ipv6
        return ips[0] if ips else None

    def bind(self, it: Intent) -> tuple[str, Probe, str]:
        if it.sender == "guest":
            sender, mac, src_ip = "A", self.a.mac, self._guest_ip(it.family)
        elif it.sender in ("unrestricted", "uplink"):
            # B trunks every VLAN a probe names, tagged, so it also is the "uplink" that
            # reaches the other-VLAN host on its own VLAN (the VLAN probes' controls)
            sender, mac, src_ip = "B", self.bp.mac, self.neighbours.get(it.family)
        else:  # a peer: B speaks with the peer's address
            sender, mac, src_ip = "B", self.bp.mac, it.sender.removeprefix("addr:")
        if it.sink == "guest":
            sink, dst_mac, dst_ip = "A", self.a.mac, self._guest_ip(it.family)
        elif it.sink == "hypervisor":
            sink, dst_mac, dst_ip = "bridge", self.bridge_mac, it.dst_ip
        elif self.d is not None and it.sink == f"addr:{self.other_vlan_ip}":
            sink, dst_mac, dst_ip = "D", self.d.mac, self.other_vlan_ip
        else:
            sink, dst_mac, dst_ip = "C", self.c.mac, it.sink.removeprefix("addr:")
        src_ip = it.src_ip or src_ip or ("fd00::99" if it.family == 6 else "10.255.255.99")
        dst_ip = it.dst_ip or dst_ip
        # Even broadcast intents (rogue DHCP/RA, ARP) are addressed to our own sink:
        # the rules judge addresses and protocols, not the destination MAC, and a frame
        # that got through must reach no real host.
        probe = Probe(
            kind=it.kind, family=it.family, src_mac=it.src_mac or mac, dst_mac=dst_mac, src_ip=src_ip, dst_ip=dst_ip,
            sport=it.sport, dport=it.dport, flags=it.flags, icmp_type=it.icmp_type, vlan_tags=it.vlan_tags,
            llc_snap=it.llc_snap, ethertype=it.ethertype, ip_proto=it.ip_proto, frag_offset=it.frag_offset, more_fragments=it.more_fragments,
            ipv6_ext=tuple({"fragment": "frag"}.get(e, e) for e in it.ipv6_ext),
            arp_psrc=it.arp_psrc, arp_hwsrc=(it.src_mac or mac) if it.kind == "arp" else None,
            arp_pdst=dst_ip if it.kind == "arp" else None,
        )
        return sender, probe, sink


def _bridge_mac(bridge: str) -> str:
    with nl.ipr(None) as ip:
        idx = ip.link_lookup(ifname=bridge)
        if not idx:
            raise HostError(f"bridge {bridge} does not exist here")
        return ip.get_links(idx[0])[0].get_attr("IFLA_ADDRESS")


def _nft_only(plan: Plan) -> Plan:
    """The probe run switches only the nftables table: the VLAN layer of real ports is
    apply's business (verify compares it, and touches probe ports only)."""
    return replace(plan, vlans=())


def verify_live(config_dir: str | None, guests: list[str] | None = None, config: Config | None = None) -> list[dict]:
    """`config`: an already loaded config (the agent's last good one, which it keeps
    enforcing while the files on disk are invalid) instead of loading `config_dir`."""
    from segguard.flow import build_plan, live_facts

    from segguard.apply.nftables import NftablesApplier

    if config is None:
        config, facts, plan = build_plan(config_dir)
    else:
        from segguard.compile import compile_plan

        facts = live_facts(config)
        plan = compile_plan(config, facts)
    # The run switches the table to a plan with the stand-in and back to the configured
    # plan, which would silently repair drift: report drift first, as a failure.
    drift = NftablesApplier().diff(plan)
    drift_rows = [] if drift.empty else [{
        "id": "live/table-matches-plan", "guest": "-", "category": "vantage",
        "description": "the live table equals the compiled plan before probing (it is re-applied afterwards)",
        "expected": "arrives", "observed": "; ".join(drift.describe(limit=3)), "control": None, "pass": False,
        "why": "drift: the kernel did not hold the configured policy"}]
    targets = [b for b in plan.bindings if not guests or b.guest in guests]
    if not targets:
        raise SegguardError("no legacy guest to verify" + (f" named {', '.join(guests)}" if guests else ""))
    results: list[dict] = drift_rows + _vlan_layer_rows(plan, sorted({b.bridge for b in targets}))
    for b in targets:
        results += _verify_guest(config, facts, plan, b)
    return results


def _vlan_layer_rows(plan: Plan, bridges: list[str]) -> list[dict]:
    """Say where there is no VLAN layer to probe (a pass unless site.yaml requires the
    layer, but never silent), and compare each managed bridge's real ports with the plan:
    the VLAN probes run through a stand-in, so this is what speaks for the guest's port."""
    from segguard.apply.bridge import BridgeApplier

    why = "site.yaml vlan_layer_required is set"
    expected = "present" if plan.vlan_required else "present, or reported missing"
    if plan.vlan_layer:
        return [_row("live/vlan-layer", "vlan", f"VLAN layer MISSING: {plan.vlan_layer}; no VLAN probes ran, "
                     "only the nftables layer's tag probes", expected, "missing", not plan.vlan_required, why)]
    rows = []
    for bv in (bv for bv in plan.vlans if bv.bridge in bridges):
        if not bv.managed:
            rows.append(_row(f"live/vlan-layer/{bv.bridge}", "vlan", f"VLAN layer MISSING on {bv.bridge}: {bv.reason}; "
                             "no VLAN probes ran, only the nftables layer's tag probes", expected, "missing",
                             not plan.vlan_required, why))
            continue
        drift = BridgeApplier().drift(bv)
        rows.append(_row(f"live/vlans-match-plan/{bv.bridge}", "vlan",
                         f"every port of {bv.bridge} carries the VLANs the plan gives it (verify leaves them as found)",
                         "in sync", "; ".join(drift[:3]) + (f" (+{len(drift) - 3} more)" if len(drift) > 3 else "") or "in sync",
                         not drift, "drift: the bridge does not hold the planned VLAN layer; `segguard apply` restores it"))
    return rows


def _vlan_aware(plan: Plan, bridge: str):
    """The plan's VLAN layer for `bridge` when it is managed and filtering is on live
    (otherwise _vlan_layer_rows has said why there is nothing to probe)."""
    from segguard.apply.bridge import BridgeApplier

    bv = next((bv for bv in plan.vlans if bv.bridge == bridge and bv.managed), None)
    return bv if bv is not None and BridgeApplier().live(bv)[0] else None


def _other_vlan(tables: dict, avoid: set[int]) -> int:
    """A VLAN a real port of the bridge already carries, so D is a host where real ones
    are (VLAN 1, the kernel's default, last); else a scratch VID nothing uses, which
    vanishes with the port."""
    used = {v for t in tables.values() for v in t.vids}
    in_use = sorted(used - avoid, key=lambda v: (v == DEFAULT_VID, v))
    return in_use[0] if in_use else next(v for v in range(4094, 1, -1) if v not in used | avoid)


def _verify_guest(config: Config, facts, plan: Plan, b: Binding) -> list[dict]:
    from segguard.compile import compile_plan
    from segguard.flow import apply_plan, live_facts, record_applied

    bridge_mac = _bridge_mac(b.bridge)
    tok = secrets.token_hex(2)
    bv = _vlan_aware(plan, b.bridge)
    spare = {fam: spare_addresses(config, fam) for fam in (4, 6)}
    neighbours = {fam: addrs[0] for fam, addrs in spare.items() if addrs}
    # D, the other-VLAN host, has an address of its own so its probes bind to it alone
    other_ip = spare[4][1] if bv is not None and b.ipv4 and len(spare[4]) > 1 else None
    rows: list[dict] = []
    if bv is not None and b.ipv4 and other_ip is None:
        rows.append(_row(f"live/vlan-probes/{b.guest}", "vlan", "the VLAN probes need a second spare internal IPv4 "
                         "address for the other-VLAN probe host", "present", "none", False,
                         "no VLAN probe ran: widen site.yaml internal"))
    roles = "abcd" if other_ip else "abc"
    with contextlib.ExitStack() as stack:
        ports = {role: stack.enter_context(probe_port(b.bridge, None, f"sgp{role}{tok}", _mac(tok, i + 1), f"sgprobe-{tok}-{role}"))
                 for i, role in enumerate(roles)}
        stand_in = replace(b, guest=f"probe-{b.guest}", mac=ports["a"].mac, port=ports["a"].port, source="probe", mode="enforce")
        if bv is not None:
            # read again: the VLAN layer compiles the stand-in's port only once it exists
            facts = live_facts(config)
        probe_plan = compile_plan(config, facts, plan.table, extra_bindings=(stand_in,))
        exps = expectations_for(config, probe_plan, neighbours, guests=[stand_in.guest])
        if bv is not None:
            if other_ip and any(e.probe.sink == f"addr:{other_ip}" for e in exps):
                raise SegguardError(f"verify --live: spare address {other_ip} is also a policy probe's target")
            vlan_exps, placement = _place_on_vlans(config, probe_plan, b, ports, exps, other_ip)
            exps += vlan_exps
            rows += placement
        else:
            with nl.ipr(None) as ip:
                for role in ("a", "c"):
                    nl.add_static_fdb(ip, nl.link_index(ip, ports[role].port), ports[role].mac)
        apply_plan(_nft_only(probe_plan))
        try:
            binder = _LiveBinder(stand_in, ports, bridge_mac, neighbours, other_ip)
            endpoints = {role.upper(): p.endpoint for role, p in ports.items()} | {"bridge": (None, b.bridge)}
            results = run_expectations(exps, lambda _g: binder, endpoints.__getitem__)
        finally:
            apply_plan(_nft_only(plan))
            record_applied(plan)
    for r in results:
        r["guest"] = b.guest
        r["id"] = r["id"].replace(stand_in.guest, b.guest, 1)
    return rows + results


def _tag_vids(exps: list[Expectation]) -> set[int]:
    return {vid for e in exps for it in (e.probe, e.control, e.after) if it for _tpid, vid in it.vlan_tags if vid}


def _place_on_vlans(config: Config, probe_plan: Plan, b: Binding, ports: dict[str, ProbePortInfo],
                    exps: list[Expectation], other_ip: str | None) -> tuple[list[Expectation], list[dict]]:
    """Put the probe ports on their VLANs and pin their MACs on each; -> the VLAN
    expectations and the row that shows the stand-in got the guest's VLAN from the plan."""
    from segguard.apply.bridge import BridgeApplier
    from segguard.compile.vlan import LEGACY, OTHER, BridgeVlanPlan, PortChange
    from segguard.flow import writer_lock
    from segguard.host.vlans import PortVlans

    own = next(lp.profile.vlan for lp in config.profiles if lp.name == b.profile)
    mgmt = tuple(sorted(set(config.site.management.vlans) - {own}))
    bvp = next(bv for bv in probe_plan.vlans if bv.bridge == b.bridge)
    applier = BridgeApplier()
    _filtering, tables = applier.live(bvp)
    probe_names = {p.port for p in ports.values()}
    other = _other_vlan({n: t for n, t in tables.items() if n not in probe_names and n != b.bridge}, {own, *mgmt})
    vlan_exps = (vlan_expectations(config, probe_plan, {vid: other_ip for vid in (other, *mgmt)}, guests=[f"probe-{b.guest}"])
                 if other_ip else [])

    a = ports["a"].port
    planned = bvp.port(a)
    trunk = tuple(sorted({own} | _tag_vids(exps + vlan_exps)))
    wanted = {
        # whatever the plan compiles for a legacy port: the probes judge the plan
        a: planned.after if planned is not None and planned.role == LEGACY else tables[a],
        ports["b"].port: PortVlans(ports["b"].port, trunk, own, (own,)),
        ports["c"].port: PortVlans(ports["c"].port, trunk, own, (own,)),
    }
    if "d" in ports:
        wanted[ports["d"].port] = PortVlans(ports["d"].port, tuple(sorted({other, *mgmt})), other, (other,))
    restricted = BridgeVlanPlan(b.bridge, True, True, ports=tuple(
        PortChange(n, LEGACY if n == a else OTHER, (), tables.get(n) or PortVlans(n), w) for n, w in wanted.items()))
    with writer_lock():
        applier.apply([restricted])  # reads back; restores the probe ports if the kernel refuses
    _filtering, live = applier.live(bvp)

    with nl.ipr(None) as ip:
        idx = {role: nl.link_index(ip, p.port) for role, p in ports.items()}
        for role in (r for r in ("a", "c", "d") if r in ports):
            for vid in live[ports[role].port].vids:
                _pin(ip, idx[role], ports[role].mac, vid)
        if "d" in ports:
            for vid in set(live[ports["c"].port].vids) - set(live[ports["d"].port].vids):
                _pin(ip, idx["c"], ports["d"].mac, vid)

    want_a, got = PortVlans(a, (own,), own, (own,)), live[a]
    other_host = f"; other-VLAN host D on VLAN {other}" + (f" and management VLAN {', '.join(map(str, mgmt))}" if mgmt else "")
    row = _row(f"live/stand-in-vlan/{b.guest}", "vlan",
               f"the stand-in's port carries exactly the guest's VLAN {own}, as the plan's VLAN layer compiles a "
               f"legacy port" + (other_host if "d" in ports else ""),
               want_a.describe(), got.describe(), (got.vids, got.pvid, got.untagged) == (want_a.vids, want_a.pvid, want_a.untagged),
               "the plan's VLAN layer does not give a legacy port exactly its VLAN" if planned is not None
               else "the plan's VLAN layer did not compile the stand-in's port")
    return vlan_exps, [row]


def _pin(ip, port: int, mac: str, vid: int) -> None:
    """A static, sticky FDB entry for `mac` on VLAN `vid` (entries are per VLAN on a
    VLAN-aware bridge): frames to it go to `port` only, never flooded."""
    ip.fdb("add", ifindex=port, lladdr=mac, state=nl.NUD_NOARP, flags=nl.NTF_MASTER | nl.NTF_STICKY, vlan=vid)
