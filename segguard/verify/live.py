"""The live-host vantage: prove a guest's policy without touching the guest.

Three temporary probe ports join the guest's bridge, each alone in a namespace:
  A  enrolled in the guest's profile with the guest's addresses (a stand-in guest),
  B  unenrolled: the unrestricted source, and the "peer" for flows towards the guest,
  C  unenrolled: the sink for everything the stand-in sends.
Frames are addressed at L2 to C (or A) and both have static FDB entries, so a frame
the wall lets through goes to our own probe port and nowhere else: a failed probe
reaches no real host. The live table is switched to a plan with A enrolled for the
run and back to the configured plan afterwards, whatever happens.
"""
from __future__ import annotations

import contextlib
import secrets
from dataclasses import replace

import netaddr

from segguard.config.validate import Config
from segguard.errors import HostError, SegguardError
from segguard.lab import netns as nl
from segguard.plan import Binding
from segguard.verify.expectations import Intent, expectations_for
from segguard.verify.probes import Probe, ProbePortInfo, probe_port
from segguard.verify.run import run_expectations


def _mac(token: str, role: int) -> str:
    # locally administered unicast (02:...), never a vendor MAC of a real guest
    return f"02:5e:67:{token[:2]}:{token[2:4]}:{role:02x}"


def spare_address(config: Config, family: int) -> str | None:
    """An internal address no guard rail, group or guest uses: what the default and
    anti-spoofing probes are aimed at (they only ever reach probe port C)."""
    site = config.site
    used = netaddr.IPSet([*site.domain_controllers, *site.hypervisor, *site.management.networks,
                          *(n for nets in site.groups.values() for n in nets),
                          *(a for _, g in config.guests() for a in (*g.ipv4, *g.ipv6))])
    for net in site.internal:
        if net.version != family:
            continue
        for candidate in (net.network + 250, net.network + 0x1234):
            if candidate in net and candidate not in used:
                return str(candidate)
    return None


class _LiveBinder:
    def __init__(self, b: Binding, a: ProbePortInfo, bport: ProbePortInfo, c: ProbePortInfo,
                 bridge_mac: str, neighbours: dict[int, str]):
        self.b, self.a, self.bp, self.c = b, a, bport, c
        self.bridge_mac = bridge_mac
        self.neighbours = neighbours

    def _guest_ip(self, fam: int) -> str | None:
        ips = self.b.ipv4 if fam == 4 else self.b.ipv6
        return ips[0] if ips else None

    def bind(self, it: Intent) -> tuple[str, Probe, str]:
        if it.sender == "guest":
            sender, mac, src_ip = "A", self.a.mac, self._guest_ip(it.family)
        elif it.sender == "unrestricted":
            sender, mac, src_ip = "B", self.bp.mac, self.neighbours.get(it.family)
        else:  # a peer: B speaks with the peer's address
            sender, mac, src_ip = "B", self.bp.mac, it.sender.removeprefix("addr:")
        if it.sink == "guest":
            sink, dst_mac, dst_ip = "A", self.a.mac, self._guest_ip(it.family)
        elif it.sink == "hypervisor":
            sink, dst_mac, dst_ip = "bridge", self.bridge_mac, it.dst_ip
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


def verify_live(config_dir: str | None, guests: list[str] | None = None) -> list[dict]:
    from segguard.flow import build_plan

    from segguard.apply.nftables import NftablesApplier

    config, facts, plan = build_plan(config_dir)
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
    results: list[dict] = drift_rows
    for b in targets:
        results += _verify_guest(config, facts, plan, b)
    return results


def _verify_guest(config, facts, plan, b: Binding) -> list[dict]:
    from segguard.compile import compile_plan
    from segguard.flow import apply_plan

    bridge_mac = _bridge_mac(b.bridge)
    tok = secrets.token_hex(2)
    with contextlib.ExitStack() as stack:
        ports = {}
        for i, role in enumerate("abc"):
            ports[role] = stack.enter_context(probe_port(b.bridge, None, f"sgp{role}{tok}", _mac(tok, i + 1), f"sgprobe-{tok}-{role}"))
        with nl.ipr(None) as ip:
            for role in ("a", "c"):
                nl.add_static_fdb(ip, nl.link_index(ip, ports[role].port), ports[role].mac)
        stand_in = replace(b, guest=f"probe-{b.guest}", mac=ports["a"].mac, port=ports["a"].port, source="probe", mode="enforce")
        probe_plan = compile_plan(config, facts, plan.table, extra_bindings=(stand_in,))
        neighbours = {fam: a for fam in (4, 6) if (a := spare_address(config, fam))}
        apply_plan(probe_plan)
        try:
            exps = expectations_for(config, probe_plan, neighbours, guests=[stand_in.guest])
            binder = _LiveBinder(stand_in, ports["a"], ports["b"], ports["c"], bridge_mac, neighbours)
            endpoints = {"A": ports["a"].endpoint, "B": ports["b"].endpoint, "C": ports["c"].endpoint, "bridge": (None, b.bridge)}
            results = run_expectations(exps, lambda _g: binder, endpoints.__getitem__)
        finally:
            apply_plan(plan)
    for r in results:
        r["guest"] = b.guest
        r["id"] = r["id"].replace(stand_in.guest, b.guest, 1)
    return results
