"""The nftables half of the plan: one bridge-family table, dispatch by port through
verdict maps so per-packet cost does not grow with the number of guests.

Frame paths through our table (bridge hooks):
  from a legacy port  prerouting (before the FDB learns the source) and input (frames to
                      the host, and link-local frames that skip prerouting) -> out_<guest>
  to a legacy port    forward (bridged) and output (from the host)       -> pin_<profile>
Anything on a port no profile names only meets the MAC-binding check, which drops a
legacy guest's MAC on every port but its own.
"""
from __future__ import annotations

import re
from typing import Any

import netaddr

from segguard.compile import fragments as f
from segguard.config.schema import AD_PORTS
from segguard.config.validate import Config, LoadedProfile, ResolvedRule
from segguard.host import HostFacts
from segguard.plan import Binding

PRIO = -190  # just after bridge conntrack (-200), so `ct state` is valid in every chain
LINK_LOCAL_MAC, LINK_LOCAL_MASK = "01:80:c2:00:00:00", "ff:ff:ff:ff:ff:f0"
ND_TYPES = ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]
MLD_TYPES = ["mld-listener-report", "mld2-listener-report", "mld-listener-done"]
ICMP_ERRORS4 = ["destination-unreachable", "time-exceeded"]
ICMP_ERRORS6 = ["destination-unreachable", "packet-too-big", "time-exceeded"]
TUNNEL_UDP_PORTS = (500, 1194, 1701, 3544, 4500, 4789, 6081, 8472, 51820)
IP6_LINKLOCAL = [{"prefix": {"addr": "fe80::", "len": 10}}, "::"]


def ident(name: str) -> str:
    """Profile/guest names may hold '-', which `nft -f` of a saved listing rejects in
    bare identifiers; validation guarantees the mapping is collision-free."""
    return name.replace("-", "_")


class _Table:
    """Collects the objects of one table in creation order."""

    def __init__(self, name: str):
        self.name = name
        self.objects: list[dict[str, Any]] = []
        self._consts: set[str] = set()

    def add(self, obj: dict[str, Any]) -> None:
        self.objects.append(obj)

    def set(self, name: str, type_: str | list[str], elems: list[Any], interval: bool = False) -> str:
        self.add(f.set_(self.name, name, type_, elems, interval))
        return f.ref(name)

    def addr_sets(self, name: str, nets, interval: bool = True) -> tuple[str, str]:
        v4 = [f.addr_elem(n) for n in f.merged(nets, 4)]
        v6 = [f.addr_elem(n) for n in f.merged(nets, 6)]
        return (self.set(f"{name}4", "ipv4_addr", v4, interval), self.set(f"{name}6", "ipv6_addr", v6, interval))

    def const(self, name: str, type_: str, elems: list[Any], interval: bool = False) -> str:
        """A named set shared by every rule that needs the same values. Rules never
        carry anonymous sets: libnftables 1.0 allocates those in time quadratic in
        their number, which made a 100-guest apply take 18 s instead of 0.3 s."""
        if name not in self._consts:
            self._consts.add(name)
            self.set(name, type_, elems, interval)
        return f.ref(name)

    def one_or_set(self, name: str, type_: str, values: list[Any], interval: bool = False) -> Any:
        """A scalar (or a lone range) for one value, else a named set of them."""
        if len(values) == 1:
            return values[0]
        return self.const(name, type_, values, interval)

    def chain(self, name: str, hook: str | None = None) -> str:
        self.add(f.chain(self.name, name, hook, PRIO))
        return name

    def rule(self, chain: str, exprs: list[dict[str, Any]], comment: str | None = None) -> None:
        self.add(f.rule(self.name, chain, exprs, comment))


class _Verdicts:
    """Drop, or in audit mode log-and-accept: the frame is logged once, where it would
    have been dropped, and nothing later in the chain sees it twice."""

    def __init__(self, profile: str, audit: bool):
        self.profile, self.audit = profile, audit

    def drop(self, reason: str) -> list[dict[str, Any]]:
        if self.audit:
            return [f.COUNTER, f.log(f"segguard audit {self.profile} {reason}: "), f.ACCEPT]
        return [f.COUNTER, f.DROP]


def compile_nft(config: Config, facts: HostFacts, bindings: list[Binding], stateful: bool, table: str) -> list[dict[str, Any]]:
    t = _Table(table)
    site = config.site
    t.add(f.table(table))

    # -- address and port sets shared by every profile ------------------------------
    guarded = {lp.profile.bridge for lp in config.profiles}
    discovered = [netaddr.IPNetwork(a) for b in facts.bridges if b.name in guarded for a in b.addresses]
    sets = {
        "internal": t.addr_sets("internal", site.internal),
        "dc": t.addr_sets("dc", [netaddr.IPNetwork(a) for a in site.domain_controllers]),
        "mgmt": t.addr_sets("mgmt", site.management.networks),
        # the host's own bridge addresses count as hypervisor even when site.yaml
        # forgets them (libvirt NAT: the guest's gateway is the host)
        "hyp": t.addr_sets("hyp", [netaddr.IPNetwork(a) for a in site.hypervisor] + discovered),
    }
    ad_ports = t.set("ad_ports", "inet_service",
                     [lo if lo == hi else {"range": [lo, hi]} for lo, hi in AD_PORTS], interval=True)

    by_mode = {m: sorted({b.mac for b in bindings if b.mode == m}) for m in ("enforce", "audit")}
    legacy = t.set("legacy_macs", "ether_addr", by_mode["enforce"])
    audited = t.set("audit_macs", "ether_addr", by_mode["audit"])
    bound = t.set("bound_ports", ["ether_addr", "ifname"],
                  [{"concat": [b.mac, b.port]} for b in sorted(bindings, key=lambda b: (b.mac, b.port or "")) if b.port])

    profiles = {lp.name: lp for lp in config.profiles}
    out_elems = [(b.port, f.goto(f"out_{ident(b.guest)}")) for b in sorted(bindings, key=lambda b: b.port or "") if b.port]
    in_elems = [(b.port, f.goto(f"pin_{ident(b.profile)}")) for b in sorted(bindings, key=lambda b: b.port or "") if b.port]
    t.add(f.vmap(table, "out_dispatch", "ifname", out_elems))
    t.add(f.vmap(table, "in_dispatch", "ifname", in_elems))

    # -- per-profile policy chains ---------------------------------------------------
    for name in sorted(profiles):
        _profile_chains(t, profiles[name], sets, ad_ports, stateful)
    # -- per-guest identity chains (anti-spoofing), ending in the profile's chain -----
    for b in sorted(bindings, key=lambda b: b.guest):
        _guest_out_chain(t, b, _Verdicts(b.profile, b.mode == "audit"))

    # -- base chains -------------------------------------------------------------------
    src_port = f.concat(f.payload("ether", "saddr"), f.meta("iifname"))
    for hook in ("prerouting", "input"):
        c = t.chain(hook, hook)
        t.rule(c, [f.match(f.payload("ether", "saddr"), legacy), f.match(src_port, bound, "!="), f.COUNTER, f.DROP],
               "legacy MAC on a port it is not bound to")
        t.rule(c, [f.match(f.payload("ether", "saddr"), audited), f.match(src_port, bound, "!="), f.COUNTER,
                   f.log("segguard audit legacy MAC on foreign port: ")], "audit: legacy MAC on a port it is not bound to")
        t.rule(c, [f.vmap_lookup(f.meta("iifname"), "out_dispatch")])
    for hook in ("forward", "output"):
        c = t.chain(hook, hook)
        t.rule(c, [f.vmap_lookup(f.meta("oifname"), "in_dispatch")])
    return _order(t.objects + _port_ingress(table, facts, bindings))


INGRESS_PRIO = -500


def _port_ingress(table: str, facts: HostFacts, bindings: list[Binding]) -> list[dict[str, Any]]:
    """Some frames never meet a bridge hook: the bridge hands LLDP (and BPDUs with STP
    on) straight to the host and learns their source MAC on the way, so a guest could
    re-point a neighbour's FDB entry at itself. A netdev ingress chain on the legacy
    port sees every frame first. Only ports that exist now get one (a chain needs its
    device); the bridge table already drops such a guest's MAC until it is bound."""
    present = {p.name for br in facts.bridges for p in br.ports}
    ports = [b for b in sorted(bindings, key=lambda b: b.port or "") if b.port in present]
    if not ports:
        return []
    objs = [f.table(table, f.NETDEV)]
    for b in ports:
        name = "in_" + re.sub(r"[^A-Za-z0-9_]", "_", b.port)
        objs.append(f.ingress_chain(table, name, b.port, INGRESS_PRIO))
        audit = b.mode == "audit"
        verdict = ([f.COUNTER, f.log(f"segguard audit {b.profile} port-ingress: "), f.ACCEPT] if audit else [f.COUNTER, f.DROP])
        objs.append(f.rule(table, name, [f.match(f.payload("ether", "saddr"), b.mac, "!="), *verdict],
                           "source MAC is not the guest's (before the bridge learns it)", family=f.NETDEV))
        objs.append(f.rule(table, name, [f.match(f.bitand(f.payload("ether", "daddr"), LINK_LOCAL_MASK), LINK_LOCAL_MAC), *verdict],
                           "no link-local (01:80:c2:00:00:0x) frames from a legacy guest", family=f.NETDEV))
    return objs


def _order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table, sets and maps, chains, then rules: every reference exists before use
    (a goto to a chain needs the chain, a vmap element needs its target chain)."""
    rank = {"table": 0, "set": 1, "chain": 2, "map": 3, "rule": 4}
    return sorted(objects, key=lambda o: rank[next(iter(o))])  # stable: rule order kept


def _guest_out_chain(t: _Table, b: Binding, v: _Verdicts) -> None:
    c = t.chain(f"out_{ident(b.guest)}")
    eth_type = f.payload("ether", "type")
    allowed_types = (["ip", "arp"] if b.ipv4 else []) + (["ip6"] if b.ipv6 else [])
    t.rule(c, [f.match(f.payload("ether", "saddr"), b.mac, "!="), *v.drop("spoofed-mac")], "source MAC is not the guest's")
    # Whitelisting the outer ethertype drops 802.1Q/802.1ad tags (VLAN 0 included),
    # 802.3 LLC/SNAP frames (their type field is a length) and every other protocol.
    # meta protocol is checked too: it is what the stack would act on.
    if allowed_types:
        types = t.one_or_set("ethertypes_" + "_".join(allowed_types), "ether_type", allowed_types)
        t.rule(c, [f.match(eth_type, types, "!="), *v.drop("ethertype")], "only IPv4/ARP/IPv6 as configured; no tags, no LLC")
        t.rule(c, [f.match(f.meta("protocol"), types, "!="), *v.drop("protocol")])
    else:
        t.rule(c, v.drop("no-addresses"), "guest has no addresses: it may send nothing")
        return
    if b.ipv4:
        own4 = t.one_or_set(f"g_{ident(b.guest)}_4", "ipv4_addr", list(b.ipv4))
        # (a match on an arp/ip/ip6 field implies its ethertype: libnftables adds that
        # dependency itself and lists the rule without it, so we never write it)
        t.rule(c, [f.match(f.payload("arp", "saddr ip"), own4, "!="), *v.drop("arp-spoof")], "ARP only for its own IPv4")
        t.rule(c, [f.match(f.payload("arp", "saddr ether"), b.mac, "!="), *v.drop("arp-spoof")])
        t.rule(c, [f.match(f.payload("arp", "operation"), t.const("arp_ops", "arp_op", ["request", "reply"]), "!="), *v.drop("arp-op")])
        t.rule(c, [f.match(eth_type, "arp"), f.ACCEPT])
        t.rule(c, [f.match(f.payload("ip", "saddr"), own4, "!="), *v.drop("ip-spoof")], "IPv4 source is not the guest's")
    if b.ipv6:
        own6 = list(b.ipv6)
        src6 = t.const(f"g_{ident(b.guest)}_src6", "ipv6_addr", own6 + IP6_LINKLOCAL, interval=True)
        t.rule(c, [f.match(f.payload("ip6", "saddr"), src6, "!="), *v.drop("ip6-spoof")], "IPv6 source is not the guest's")
        # A neighbour advertisement for an address that is not its own is the IPv6 form
        # of ARP spoofing. libnftables has no typed field for the ND target, so it is
        # compared as four 32-bit words of the ICMPv6 body, in a chain of its own.
        nd = t.chain(f"nd_{ident(b.guest)}")
        for addr in own6 + ["fe80::"]:
            words = netaddr.IPAddress(addr).value
            parts = [(words >> (96 - 32 * i)) & 0xFFFFFFFF for i in range(4)]
            if addr == "fe80::":  # any link-local target: fe80::/10
                t.rule(nd, [f.match(f.bitand(f.raw_payload("th", 64, 16), 0xFFC0), 0xFE80), {"return": None}])
            else:
                t.rule(nd, [*(f.match(f.raw_payload("th", 64 + 32 * i, 32), p) for i, p in enumerate(parts)), {"return": None}])
        t.rule(nd, v.drop("nd-spoof"), "neighbour advertisement for an address that is not the guest's")
        t.rule(c, [f.match(f.payload("icmpv6", "type"), "nd-neighbor-advert"), f.jump(nd)])
    t.rule(c, [f.goto(f"pout_{ident(b.profile)}")])


def _peer_sets(t: _Table, lp: LoadedProfile, rule: ResolvedRule) -> tuple[str | None, str | None]:
    base = f"p_{ident(lp.name)}_{rule.direction[0]}{rule.index}_"
    s4 = t.set(base + "4", "ipv4_addr", [f.addr_elem(n) for n in f.merged(rule.peers, 4)], True) if f.merged(rule.peers, 4) else None
    s6 = t.set(base + "6", "ipv6_addr", [f.addr_elem(n) for n in f.merged(rule.peers, 6)], True) if f.merged(rule.peers, 6) else None
    return s4, s6


def _service(t: _Table, lp: LoadedProfile, rule: ResolvedRule) -> Any:
    """The rule's ports as a match value: one port, one range, or a named set."""
    if rule.proto == "icmp":
        return None
    values = [lo if lo == hi else {"range": [lo, hi]} for lo, hi in rule.ports]
    return t.one_or_set(f"p_{ident(lp.name)}_{rule.direction[0]}{rule.index}_ports", "inet_service", values, interval=True)


def _l4(rule: ResolvedRule, svc: dict, port_field: str) -> list[dict[str, Any]]:
    """L4 match for a rule: the service port on `port_field` (dport on the way there,
    sport on the way back)."""
    if rule.proto == "icmp":
        return []
    return [f.match(f.payload(rule.proto, port_field), svc[rule])]


def _icmp_type(family: int, name4: str, name6: str) -> list[dict[str, Any]]:
    return [f.match(f.payload("icmp" if family == 4 else "icmpv6", "type"), name4 if family == 4 else name6)]


def _profile_chains(t: _Table, lp: LoadedProfile, sets, ad_ports: str, stateful: bool) -> None:
    prof = lp.profile
    v = _Verdicts(prof.name, prof.mode == "audit")
    pid = ident(prof.name)
    out_c, in_c = t.chain(f"pout_{pid}"), t.chain(f"pin_{pid}")
    peers = {r: _peer_sets(t, lp, r) for r in (*lp.egress, *lp.ingress)}
    svc = {r: _service(t, lp, r) for r in (*lp.egress, *lp.ingress)}

    # ------------------------------------------------------------------ guest -> out
    # Rogue infrastructure services a hostile guest could offer to its neighbours.
    t.rule(out_c, [f.match(f.payload("udp", "sport"), t.const("dhcp_server_ports", "inet_service", [67, 547])), *v.drop("rogue-dhcp")], "no DHCP/DHCPv6 server replies")
    t.rule(out_c, [f.match(f.payload("icmpv6", "type"), t.const("rogue_nd_types", "icmpv6_type", ["nd-router-advert", "nd-redirect"])), *v.drop("rogue-ra")], "no router advertisements or redirects")
    t.rule(out_c, [f.match(f.payload("icmp", "type"), "redirect"), *v.drop("rogue-redirect")])
    # Link-layer neighbour discovery is accepted before the address guard rails (it is
    # addressed to multicast, and hop limit 255 means it cannot have been routed).
    t.rule(out_c, [f.match(f.payload("icmpv6", "type"), t.const("nd_types", "icmpv6_type", ND_TYPES)), f.match(f.payload("ip6", "hoplimit"), 255), f.ACCEPT], "IPv6 neighbour discovery")
    t.rule(out_c, [f.match(f.payload("icmpv6", "type"), t.const("mld_types", "icmpv6_type", MLD_TYPES)), f.match(f.payload("ip6", "hoplimit"), 1), f.ACCEPT], "MLD")
    t.rule(out_c, [f.match(f.payload("ip6", "saddr"), t.const("ip6_linklocal", "ipv6_addr", IP6_LINKLOCAL, interval=True)), *v.drop("ip6-linklocal")], "link-local source only for ND/MLD")
    _guard_rails(t, out_c, prof, sets, "daddr", v)
    t.rule(out_c, [f.exthdr_exists("rt"), *v.drop("ip6-routing-header")], "no IPv6 routing headers")
    if stateful:
        t.rule(out_c, [f.ct_state("invalid"), *v.drop("ct-invalid")])
        t.rule(out_c, [f.ct_state("established", "related"), f.ACCEPT], "replies to flows let in (conntrack)")
    _fragments(t, out_c, lp, peers, "daddr", v)
    _opened_flows(t, out_c, lp.egress, peers, svc, "daddr", stateful)
    if prof.block.domain:
        # after the egress rules (which may name an AD port to a host explicitly), before
        # the stateless replies: a forged "reply" from a service port must not reach
        # an AD port of the rule's peer either
        t.rule(out_c, [f.match(f.meta("l4proto"), t.const("tcp_udp", "inet_proto", ["tcp", "udp"])), f.match(f.payload("th", "dport"), ad_ports), *v.drop("ad-port")], "AD protocol ports (block.domain)")
    # Tunnels: an IP protocol other than TCP/UDP/ICMP, or a well-known tunnel port, would
    # carry anything past every rule to whoever decapsulates it (default: allow, or a
    # peer that forwards). Named egress rules above may still allow a tunnel port.
    t.rule(out_c, [f.match(f.meta("l4proto"), t.const("l4_allowed", "inet_proto", ["tcp", "udp", "icmp", "ipv6-icmp"]), "!="), *v.drop("ip-protocol")],
           "only TCP, UDP and ICMP (no GRE, IPIP, 6in4, ESP, SCTP...)")
    t.rule(out_c, [f.match(f.payload("udp", "dport"), t.const("tunnel_udp_ports", "inet_service", list(TUNNEL_UDP_PORTS))), *v.drop("tunnel-port")],
           "well-known UDP tunnel ports (VXLAN, Geneve, WireGuard, OpenVPN, L2TP, IPsec NAT-T, Teredo)")
    if not stateful:
        _stateless_replies(t, out_c, lp.ingress, peers, svc, "daddr")
    t.rule(out_c, v.drop("default-deny") if prof.default == "deny" else [f.ACCEPT], f"default: {prof.default}")

    # ------------------------------------------------------------------- in -> guest
    t.rule(in_c, [f.match(f.payload("ether", "type"), "arp"), f.ACCEPT], "ARP to the guest")
    t.rule(in_c, [f.match(f.payload("icmpv6", "type"), t.const("nd_ns_na", "icmpv6_type", ["nd-neighbor-solicit", "nd-neighbor-advert"])), f.match(f.payload("ip6", "hoplimit"), 255), f.ACCEPT], "IPv6 neighbour discovery")
    _guard_rails(t, in_c, prof, sets, "saddr", v)
    if stateful:
        t.rule(in_c, [f.ct_state("invalid"), *v.drop("ct-invalid")])
        t.rule(in_c, [f.ct_state("established", "related"), f.ACCEPT], "replies to flows the guest opened (conntrack)")
    _fragments(t, in_c, lp, peers, "saddr", v)
    _opened_flows(t, in_c, lp.ingress, peers, svc, "saddr", stateful)
    if not stateful:
        _stateless_replies(t, in_c, lp.egress, peers, svc, "saddr")
    t.rule(in_c, v.drop("default-deny") if prof.default == "deny" else [f.ACCEPT], f"default: {prof.default}")


def _opened_flows(t: _Table, c: str, rules, peers, svc, field: str, stateful: bool) -> None:
    """Flows this side opens to (or from) a rule's peers, on the rule's service ports."""
    ip = {4: "ip", 6: "ip6"}
    for r in rules:
        for family, peer in zip((4, 6), peers[r]):
            if peer is None:
                continue
            l4 = _l4(r, svc, "dport") if r.proto != "icmp" else _icmp_type(family, "echo-request", "echo-request")
            new = [f.ct_state("new")] if stateful else []
            t.rule(c, [f.match(f.payload(ip[family], field), peer), *l4, *new, f.ACCEPT], r.label)


def _stateless_replies(t: _Table, c: str, rules, peers, svc, field: str) -> None:
    """Without conntrack: replies to the flows the other side opened, only to/from that
    rule's peers and only from its service port; for TCP only with ACK set, so a bare
    SYN from the service port (a new flow) is not a reply."""
    ip = {4: "ip", 6: "ip6"}
    for r in rules:
        for family, peer in zip((4, 6), peers[r]):
            if peer is None:
                continue
            who = f.match(f.payload(ip[family], field), peer)
            if r.proto == "tcp":
                t.rule(c, [who, *_l4(r, svc, "sport"), f.match(f.bitand(f.payload("tcp", "flags"), "ack"), "ack"), f.ACCEPT], "reply: " + r.label)
            elif r.proto == "udp":
                t.rule(c, [who, *_l4(r, svc, "sport"), f.ACCEPT], "reply: " + r.label)
            else:
                t.rule(c, [who, *_icmp_type(family, "echo-reply", "echo-reply"), f.ACCEPT], "reply: " + r.label)
            errors = ICMP_ERRORS4 if family == 4 else ICMP_ERRORS6
            errs = t.const(f"icmp{'' if family == 4 else 'v6'}_errors", "icmp_type" if family == 4 else "icmpv6_type", errors)
            t.rule(c, [who, f.match(f.payload("icmp" if family == 4 else "icmpv6", "type"), errs), f.ACCEPT], "icmp errors: " + r.label)


def _guard_rails(t: _Table, c: str, prof, sets, field: str, v: _Verdicts) -> None:
    """Absolute: evaluated before any allow rule of the profile."""
    rails = [("mgmt", "management", True), ("hyp", "hypervisor", True),
             ("dc", "domain controller", prof.block.domain)]
    for key, what, on in rails:
        if not on:
            continue
        s4, s6 = sets[key]
        t.rule(c, [f.match(f.payload("ip", field), s4), *v.drop(key)], f"guard rail: {what}")
        t.rule(c, [f.match(f.payload("ip6", field), s6), *v.drop(key)], f"guard rail: {what}")
    if prof.block.internet:
        s4, s6 = sets["internal"]
        t.rule(c, [f.match(f.payload("ip", field), s4, "!="), *v.drop("internet")], "guard rail: internet (not in site.internal)")
        t.rule(c, [f.match(f.payload("ip6", field), s6, "!="), *v.drop("internet")], "guard rail: internet (not in site.internal)")


def _fragments(t: _Table, c: str, lp: LoadedProfile, peers, field: str, v: _Verdicts) -> None:
    """Fragments carry no ports (or too few bytes of them) so no port rule can judge
    them: they pass only to/from peers of the profile's UDP rules, and drop otherwise."""
    ip = {4: "ip", 6: "ip6"}
    for r in (*lp.egress, *lp.ingress):
        if r.proto != "udp":
            continue
        for family, peer in zip((4, 6), peers[r]):
            if peer is None:
                continue
            frag = (f.match(f.bitand(f.payload("ip", "frag-off"), 0x3FFF), 0, "!=") if family == 4 else f.exthdr_exists("frag"))
            t.rule(c, [frag, f.match(f.payload(ip[family], field), peer), f.ACCEPT], "fragments: " + r.label)
    t.rule(c, [f.match(f.bitand(f.payload("ip", "frag-off"), 0x3FFF), 0, "!="), *v.drop("fragment")], "other IPv4 fragments")
    t.rule(c, [f.exthdr_exists("frag"), *v.drop("fragment")], "other IPv6 fragments")
