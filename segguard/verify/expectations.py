"""What must hold, derived from the plan and config alone (pure): each guard rail, each
allow rule both ways, the default, and anti-spoofing, for IPv4 and IPv6.

An expectation names intents, not interfaces: "the guest sends X to address A", "the
peer at address P answers". A vantage point (the lab, or a probe port on a live host)
binds those to namespaces, MACs and sinks. Every "blocked" expectation carries a
control: the same frame from an unrestricted source to the same sink, which must
arrive, so a silent sink can never pass for a working wall.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import netaddr

from segguard.config.validate import Config, LoadedProfile
from segguard.plan import Binding, Plan

# Documentation addresses: a probe "to the internet" that escaped would reach nothing real.
INTERNET4, INTERNET6 = "203.0.113.10", "2001:db8:113::10"

Sender = str  # "guest" | "unrestricted" | "addr:<ip>"
Sink = str    # "addr:<ip>" | "hypervisor" | "guest"


@dataclass(frozen=True)
class Intent:
    sender: Sender
    sink: Sink
    kind: Literal["tcp", "udp", "icmp", "arp", "raw"]
    family: int = 4
    dst_ip: str | None = None
    src_ip: str | None = None       # None: the sender's own address
    src_mac: str | None = None      # None: the sender's own MAC
    sport: int = 40000
    ip_proto: int | None = None     # kind "raw": an IP packet of this protocol (GRE = 47)
    dport: int = 0
    flags: str = "S"
    icmp_type: int | None = None    # None: echo request
    vlan_tags: tuple[tuple[int, int], ...] = ()
    llc_snap: bool = False
    ethertype: int | None = None
    frag_offset: int = 0
    more_fragments: bool = False
    ipv6_ext: tuple[str, ...] = ()  # e.g. ("routing",), ("fragment",)
    arp_psrc: str | None = None
    dst_mac: str | None = None      # None: the sink's MAC (or its next hop's)


@dataclass(frozen=True)
class Expectation:
    id: str
    guest: str
    category: str         # guard-rail | allow | default | anti-spoof
    description: str
    expect: Literal["blocked", "arrives"]
    probe: Intent
    control: Intent | None = None
    # probes that must go first (a stateful reply needs the flow it answers)
    after: Intent | None = None


def _first_host(nets, version: int) -> str | None:
    for n in nets:
        if n.version == version:
            return str(n.ip if n.size == 1 else n.network + 1)
    return None


def _arp_to_guest(sender: Sender) -> Intent:
    return Intent(sender, "guest", "arp", 4, None, dst_mac="ff:ff:ff:ff:ff:ff")


def _unrestricted(p: Intent) -> Intent:
    """The same frame from the unrestricted vantage: its own source identity, unless the
    point of the probe is a forged identity (then it forges too, from a port no policy
    binds, proving the frame itself would be forwarded)."""
    return replace(p, sender="unrestricted")


def expectations_for(config: Config, plan: Plan, neighbours: dict[int, str], guests: list[str] | None = None,
                     management: dict[int, str] | None = None) -> list[Expectation]:
    """`neighbours`: per IP version, an internal host that no legacy policy covers
    (the vantage point knows one: the lab's ordinary guest, or a live host's probe
    peer); the default, AD-port and anti-spoof probes are aimed at it. `management`:
    a host on a management network to aim at (default: the first address of each)."""
    profiles = {lp.name: lp for lp in config.profiles}
    out: list[Expectation] = []
    for b in plan.bindings:
        if guests and b.guest not in guests:
            continue
        out.extend(_for_guest(config, profiles[b.profile], b, neighbours, management or {}, plan.stateful))
    return out


def _for_guest(config: Config, lp: LoadedProfile, b: Binding, neighbours: dict[int, str], management: dict[int, str],
               stateful: bool) -> list[Expectation]:
    site, prof = config.site, lp.profile
    ex: list[Expectation] = []
    families = ([4] if b.ipv4 else []) + ([6] if b.ipv6 else [])
    gid = b.guest

    def add(cat: str, key: str, desc: str, expect: str, probe: Intent, control: bool | Intent = True, after: Intent | None = None):
        ctrl = control if isinstance(control, Intent) else None
        if expect == "blocked" and control is True:
            # Towards the guest no source is unrestricted (the guest's own port is
            # filtered), so the control is a frame its policy lets in on the same path
            # to the same sink: ARP from the same sender.
            ctrl = _arp_to_guest(probe.sender) if probe.sink == "guest" else _unrestricted(probe)
        ex.append(Expectation(f"{gid}/{cat}/{key}", gid, cat, desc, expect, probe, ctrl, after))

    def v(fam: int) -> str:
        return f"v{fam}"

    for fam in families:
        # ---- guard rails ---------------------------------------------------------
        if prof.block.internet:
            dst = INTERNET4 if fam == 4 else INTERNET6
            for kind, port in (("tcp", 443), ("udp", 53), ("icmp", 0)):
                add("guard-rail", f"internet/{kind}{fam}", f"{kind.upper()} to the internet ({dst}) is blocked",
                    "blocked", Intent("guest", f"addr:{dst}", kind, fam, dst, dport=port))
        if prof.block.domain:
            dc = _first_host([netaddr.IPNetwork(str(a)) for a in site.domain_controllers], fam)
            if dc:
                for kind, port in (("tcp", 389), ("udp", 88), ("icmp", 0)):
                    add("guard-rail", f"domain-controller/{kind}{fam}", f"{kind.upper()} to domain controller {dc} is blocked",
                        "blocked", Intent("guest", f"addr:{dc}", kind, fam, dc, dport=port))
        mg = management.get(fam) or _first_host(site.management.networks, fam)
        if mg:
            for kind, port in (("tcp", 22), ("icmp", 0)):
                add("guard-rail", f"management/{kind}{fam}", f"{kind.upper()} to management host {mg} is blocked",
                    "blocked", Intent("guest", f"addr:{mg}", kind, fam, mg, dport=port))
        hv = _first_host([netaddr.IPNetwork(str(a)) for a in site.hypervisor], fam)
        if hv:
            for kind, port in (("tcp", 22), ("udp", 53), ("icmp", 0)):
                add("guard-rail", f"hypervisor/{kind}{fam}", f"{kind.upper()} to the hypervisor {hv} is blocked",
                    "blocked", Intent("guest", "hypervisor", kind, fam, hv, dport=port))

        # ---- allow rules, both ways ----------------------------------------------
        for r in lp.egress:
            peer = _first_host(r.peers, fam)
            if not peer:
                continue
            port = r.ports[0][0] if r.ports else 0
            out_probe = Intent("guest", f"addr:{peer}", r.proto, fam, peer, dport=port)
            add("allow", f"{r.direction}{r.index}/{r.proto}{fam}", f"{r.label}: guest -> {peer} arrives", "arrives", out_probe)
            if r.proto == "icmp":
                reply = Intent(f"addr:{peer}", "guest", "icmp", fam, None, icmp_type=0 if fam == 4 else 129)
            else:
                reply = Intent(f"addr:{peer}", "guest", r.proto, fam, None, sport=port, dport=40000, flags="SA")
            add("allow", f"{r.direction}{r.index}/{r.proto}{fam}/reply", f"{r.label}: reply {peer} -> guest arrives", "arrives", reply, after=out_probe)
            if r.proto == "tcp" and prof.default == "deny":
                # the stateless reply rule must not let the peer open flows from its service port
                add("allow", f"{r.direction}{r.index}/tcp{fam}/not-a-way-in",
                    f"{r.label}: a new flow (SYN) from {peer}:{port} to the guest is blocked", "blocked",
                    Intent(f"addr:{peer}", "guest", "tcp", fam, None, sport=port, dport=40001, flags="S"))
        for r in lp.ingress:
            peer = _first_host(r.peers, fam)
            if not peer:
                continue
            port = r.ports[0][0] if r.ports else 0
            in_probe = Intent(f"addr:{peer}", "guest", r.proto, fam, None, dport=port)
            add("allow", f"{r.direction}{r.index}/{r.proto}{fam}", f"{r.label}: {peer} -> guest arrives", "arrives", in_probe)
            if r.proto == "icmp":
                reply = Intent("guest", f"addr:{peer}", "icmp", fam, peer, icmp_type=0 if fam == 4 else 129)
            else:
                reply = Intent("guest", f"addr:{peer}", r.proto, fam, peer, sport=port, dport=40000, flags="SA")
            add("allow", f"{r.direction}{r.index}/{r.proto}{fam}/reply", f"{r.label}: reply guest -> {peer} arrives", "arrives", reply, after=in_probe)
            if r.proto == "tcp" and prof.block.domain:
                add("anti-spoof", f"{r.direction}{r.index}/tcp{fam}/reply-to-ad-port",
                    f"a forged 'reply' from service port {port} to AD port 445 of {peer} is blocked", "blocked",
                    Intent("guest", f"addr:{peer}", "tcp", fam, peer, sport=port, dport=445, flags="A"))

        # ---- the default, AD ports on a host that is not a DC, reply-rule abuse ---
        neighbour = neighbours.get(fam)
        if neighbour:
            default_expect = "blocked" if prof.default == "deny" else "arrives"
            add("default", f"unnamed-tcp{fam}", f"TCP/8080 to {neighbour}, named by no rule: default {prof.default}",
                default_expect, Intent("guest", f"addr:{neighbour}", "tcp", fam, neighbour, dport=8080))
            add("default", f"unnamed-in-tcp{fam}", f"TCP/8080 from {neighbour} to the guest, named by no rule: default {prof.default}",
                default_expect, Intent(f"addr:{neighbour}", "guest", "tcp", fam, None, dport=8080))
            if prof.block.domain and not any(_names_port(r, neighbour, 445) for r in lp.egress):
                add("guard-rail", f"ad-port/tcp{fam}", f"TCP/445 (AD protocol port) to {neighbour}, not a DC, is blocked",
                    "blocked", Intent("guest", f"addr:{neighbour}", "tcp", fam, neighbour, dport=445))
                add("guard-rail", f"ad-port/udp{fam}", f"UDP/137 (NetBIOS) to {neighbour} is blocked",
                    "blocked", Intent("guest", f"addr:{neighbour}", "udp", fam, neighbour, dport=137))
            if prof.default == "deny":
                for r in lp.ingress:
                    if r.proto == "tcp":
                        add("anti-spoof", f"reply-abuse/tcp{fam}",
                            f"a 'reply' from service port {r.ports[0][0]} to {neighbour} (not the rule's peer) is blocked",
                            "blocked", Intent("guest", f"addr:{neighbour}", "tcp", fam, neighbour, sport=r.ports[0][0], dport=40000, flags="A"))
                        break
            # ---- anti-spoofing and tag/encapsulation bypasses --------------------
            base = Intent("guest", f"addr:{neighbour}", "udp", fam, neighbour, dport=9999)
            other_ip = "10.30.0.99" if fam == 4 else "fd00:30::99"
            add("anti-spoof", f"spoofed-mac/{v(fam)}", "a frame with a forged source MAC is dropped", "blocked",
                replace(base, src_mac="52:54:00:66:66:66"))
            add("anti-spoof", f"spoofed-ip/{v(fam)}", f"a packet with a forged source address ({other_ip}) is dropped", "blocked",
                replace(base, src_ip=other_ip))
            for key, tags, what in ((f"vlan-own/{v(fam)}", ((0x8100, prof.vlan),), f"802.1Q tag VLAN {prof.vlan}"),
                                    (f"vlan0/{v(fam)}", ((0x8100, 0),), "802.1Q priority tag (VLAN 0)"),
                                    (f"vlan-double/{v(fam)}", ((0x8100, 100), (0x8100, prof.vlan)), "double 802.1Q tags"),
                                    (f"qinq/{v(fam)}", ((0x88A8, 100), (0x8100, prof.vlan)), "802.1ad outer tag")):
                add("anti-spoof", key, f"{what} from the guest is dropped", "blocked", replace(base, vlan_tags=tags))
            for mv in config.site.management.vlans[:1]:
                add("anti-spoof", f"vlan-mgmt/{v(fam)}", f"802.1Q tag for management VLAN {mv} is dropped", "blocked",
                    replace(base, vlan_tags=((0x8100, mv),)))
            add("anti-spoof", f"llc-snap/{v(fam)}", "IP wrapped in 802.3 LLC/SNAP is dropped", "blocked", replace(base, llc_snap=True))
            # ... and toward the guest, whatever its default
            inward = Intent(f"addr:{neighbour}", "guest", "udp", fam, None, dport=9999)
            add("anti-spoof", f"vlan-in/{v(fam)}", f"an 802.1Q-tagged frame (VLAN {prof.vlan}) to the guest is dropped", "blocked",
                replace(inward, vlan_tags=((0x8100, prof.vlan),)))
            add("anti-spoof", f"llc-snap-in/{v(fam)}", "IP wrapped in 802.3 LLC/SNAP to the guest is dropped", "blocked",
                replace(inward, llc_snap=True))
            if not stateful:
                # With bridge conntrack the kernel reassembles before any chain sees a
                # fragment, so a lone fragment arrives for nobody and has no control.
                add("anti-spoof", f"fragment/{v(fam)}", "a non-first fragment (no ports to judge) is dropped", "blocked",
                    replace(base, frag_offset=185 if fam == 4 else 1480))
            add("anti-spoof", f"gre/{v(fam)}", "a GRE packet (a tunnel past every rule) is dropped", "blocked",
                replace(base, kind="raw", ip_proto=47))
            add("anti-spoof", f"vxlan/{v(fam)}", "VXLAN (UDP 4789) to an internal host is dropped", "blocked",
                replace(base, dport=4789))
            if fam == 6:
                if prof.block.domain:
                    add("guard-rail", "ad-port/tcp6-behind-ext-headers",
                        f"TCP/445 to {neighbour} behind hop-by-hop and destination-options headers is blocked", "blocked",
                        Intent("guest", f"addr:{neighbour}", "tcp", 6, neighbour, dport=445, ipv6_ext=("hbh", "dest")))
                add("anti-spoof", "ipv6-routing-header", "an IPv6 routing header is dropped", "blocked",
                    replace(base, ipv6_ext=("routing",)))
                add("anti-spoof", "rogue-ra", "a router advertisement from the guest is dropped", "blocked",
                    Intent("guest", f"addr:{neighbour}", "icmp", 6, "ff02::1", icmp_type=134, dst_mac="33:33:00:00:00:01"))
            else:
                add("anti-spoof", "arp-spoof", f"ARP claiming {neighbour}'s address is dropped", "blocked",
                    Intent("guest", f"addr:{neighbour}", "arp", 4, neighbour, arp_psrc=neighbour, dst_mac="ff:ff:ff:ff:ff:ff"))
                add("anti-spoof", "rogue-dhcp", "a DHCP server reply from the guest is dropped", "blocked",
                    Intent("guest", f"addr:{neighbour}", "udp", 4, "255.255.255.255", sport=67, dport=68, dst_mac="ff:ff:ff:ff:ff:ff"))
    if not b.ipv6:
        neighbour = neighbours.get(6)
        if neighbour:
            add("anti-spoof", "no-ipv6", "a guest with no IPv6 address can send no IPv6 at all", "blocked",
                Intent("guest", f"addr:{neighbour}", "udp", 6, neighbour, src_ip="fd00:30::99", dport=9999))
            add("anti-spoof", "no-ipv6-in", "a guest with no IPv6 address is sent no IPv6 either", "blocked",
                Intent(f"addr:{neighbour}", "guest", "udp", 6, "fd00:30::99", dport=9999))
    if neighbour4 := neighbours.get(4) if b.ipv4 else None:
        add("anti-spoof", "foreign-port", "the guest's MAC sent from another port is dropped", "blocked",
            Intent("unrestricted", f"addr:{neighbour4}", "udp", 4, neighbour4, src_mac=b.mac, dport=9999),
            control=Intent("unrestricted", f"addr:{neighbour4}", "udp", 4, neighbour4, dport=9999))
    return ex


def _names_port(rule, addr: str, port: int) -> bool:
    return any(lo <= port <= hi for lo, hi in rule.ports) and any(netaddr.IPAddress(addr) in n for n in rule.peers)
