"""The nftables half of the plan: one bridge-family table whose rules are the same for
one guest or 5,000. What each guest may do is elements of fleet-wide sets keyed by its
port (compile/policy.py), so per-packet cost, the transaction for a change and the
rule count do not grow with the fleet.

Frame paths through our table (bridge hooks):
  from a legacy port  prerouting (before the FDB learns the source) and input (frames to
                      the host, and link-local frames that skip prerouting)
                      -> out_dispatch[port] -> gout_<kind>: (stateless) its identity in
                      one lookup and the fast path, else identity rule by rule, policy
  to a legacy port    forward (bridged) and output (from the host): the fast path (one
                      lookup), else -> in_dispatch[port] -> gin_<kind>
`<kind>` is the profile's block flags and default (`class_chains`); an audit profile
has its own pair, since its log prefix names it. Anything from a port no profile names
only meets the MAC guard (`legacy_macs`), which drops a legacy guest's MAC on every
port but its own (a bound port's chain drops any MAC not bound to it).
A frame to a guest on the fast path meets three lookups (the sending port's dispatch
and MAC guard, then the fast path's), a guest's TCP reply to a neighbour nine; what a
frame costs is the lookups and rules it meets (benchmarks/README.md, perf).

Each pair of chains jumps to shared `common_*` chains for the rules that depend on
neither the guest nor its rules (guard rails, rogue services, fragments, tunnels);
each allow is one lookup of (port, peer, protocol, service) in a set. Per guest there
remain only its ND-target chain (IPv6 guests; libnftables 1.0 cannot key a set on the
ND target) and its port's netdev ingress chain. `reachable` says which chains and sets
a guest's policy uses.
"""
from __future__ import annotations

import re
from typing import Any

import netaddr

from segguard.compile import fragments as f
from segguard.config.schema import AD_PORTS
from segguard.config.validate import Config
from segguard.host import HostFacts
from segguard.compile.policy import EXACT_SUFFIX, INTERVAL_SETS, PortPolicy, port_elements, port_set_types
from segguard.plan import Binding, Concat

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

    # every legacy MAC -> what a frame carrying it meets on a port not bound to it (the
    # base chains below): dropped, or logged in audit mode; one lookup for any frame
    t.chain(FOREIGN_MAC)
    t.rule(FOREIGN_MAC, [f.COUNTER, f.DROP], "legacy MAC on a port it is not bound to")
    t.chain(FOREIGN_MAC_AUDIT)
    t.rule(FOREIGN_MAC_AUDIT, [f.COUNTER, f.log("segguard audit legacy MAC on foreign port: ")],
           "audit: legacy MAC on a port it is not bound to")
    verdicts = {"enforce": f.goto(FOREIGN_MAC), "audit": f.jump(FOREIGN_MAC_AUDIT)}
    modes = {b.mac: b.mode for b in bindings}  # validation refuses a MAC given to two guests
    t.add(f.vmap(table, "legacy_macs", "ether_addr", [(mac, verdicts[modes[mac]]) for mac in sorted(modes)]))
    ported = sorted((b for b in bindings if b.port), key=lambda b: b.port)
    t.set("bound_ports", ["ether_addr", "ifname"],
                  [Concat((b.mac, b.port)) for b in sorted(ported, key=lambda b: (b.mac, b.port))])

    # -- what each bound port may do: elements keyed by the port, in sets every guest
    # shares, so the rules below are the same for 1 guest or 5,000 and binding a tap or
    # editing a profile changes elements, not rules (compile/policy.py) --------------
    profiles = {lp.name: lp for lp in config.profiles}
    templates = {name: PortPolicy.of(lp, stateful) for name, lp in profiles.items()}
    elems = port_elements(ported, templates)
    for name, (type_, interval) in port_set_types(stateful).items():
        t.set(name, type_, elems.get(name, []), interval)
    dispatched = [(b.port, class_chains(profiles[b.profile].profile)) for b in ported]
    gotos = {c: f.goto(c) for _, pair in dispatched for c in pair}  # one verdict object per chain, for all its ports
    t.add(f.vmap(table, "out_dispatch", "ifname", [(p, gotos[out]) for p, (out, _) in dispatched]))
    t.add(f.vmap(table, "in_dispatch", "ifname", [(p, gotos[in_]) for p, (_, in_) in dispatched]))
    t.add(f.vmap(table, "nd_dispatch", "ifname", [(b.port, f.jump(f"nd_{ident(b.guest)}")) for b in ported if b.ipv6]))

    # -- one pair of chains per kind of profile (block, default; audit: per profile) --
    shared = _Shared(t, sets, ad_ports, stateful)
    made: set[str] = set()
    for name in sorted(profiles):
        prof = profiles[name].profile
        out_c, in_c = class_chains(prof)
        if out_c not in made:
            made.update((out_c, in_c))
            _class_chains(t, prof, out_c, in_c, shared, stateful)
    # -- IPv6 neighbour advertisements: the ND target of each guest, in its own chain --
    for b in sorted(bindings, key=lambda b: b.guest):
        if b.ipv6:
            _nd_chain(t, b, _Verdicts(b.profile, b.mode == "audit"))

    # -- base chains -------------------------------------------------------------------
    # A bound port's chain judges its frames first: its identity rules drop any MAC not
    # bound to the port (an audit chain drops enforced guests' MACs too, _identity), so
    # only frames from other ports meet the MAC guard: one lookup for a guest's frame
    # and two for a neighbour's, where the guard before the dispatch cost three for both.
    for hook in ("prerouting", "input"):
        c = t.chain(hook, hook)
        t.rule(c, [f.vmap_lookup(f.meta("iifname"), "out_dispatch")], "a bound port: its profile's chain")
        t.rule(c, [f.vmap_lookup(_ETHER_SADDR, "legacy_macs")], "a legacy MAC on a port it is not bound to")
    # Toward a bound port, the fast path comes before the dispatch: it is the same for
    # every kind of profile (what a peer may open, and its replies), and a frame to a
    # guest then costs one lookup instead of the dispatch's and the class chain's.
    # Frames to other ports pay its misses (hash lookups keyed by their port).
    for hook in ("forward", "output"):
        c = t.chain(hook, hook)
        _fast_path(t, {4: c, 6: c}, "in", _keyer("in"), None, None, stateful)
        t.rule(c, [f.vmap_lookup(f.meta("oifname"), "in_dispatch")], "a bound port: its profile's chain")
    return _order(t.objects + _port_ingress(table, facts, bindings))


def class_chains(prof) -> tuple[str, str]:
    """The (from the guest, to the guest) chains a profile's ports dispatch to. Every
    enforcing profile with the same block flags and default shares them; an audit
    profile has its own (its log prefix names it)."""
    if prof.mode == "audit":
        return f"a_{ident(prof.name)}_out", f"a_{ident(prof.name)}_in"
    tag = _Shared._tag(prof.block)
    return f"gout_{tag}_{prof.default}", f"gin_{tag}_{prof.default}"


FOREIGN_MAC, FOREIGN_MAC_AUDIT = "foreign_mac", "foreign_mac_audit"
INGRESS_PRIO = -500
# the expressions every port chain holds, one copy for all of them (never changed in place)
_ETHER_SADDR = f.payload("ether", "saddr")
_LINK_LOCAL_DST = f.match(f.bitand(f.payload("ether", "daddr"), LINK_LOCAL_MASK), LINK_LOCAL_MAC)
_ENFORCE = (f.COUNTER, f.DROP)


def _port_ingress(table: str, facts: HostFacts, bindings: list[Binding]) -> list[dict[str, Any]]:
    """Some frames never meet a bridge hook: the bridge hands LLDP (and BPDUs with STP
    on) straight to the host and learns their source MAC on the way, so a guest could
    re-point a neighbour's FDB entry at itself. A netdev ingress chain on the legacy
    port sees every frame first. Only ports that exist now get one (a chain needs its
    device); the bridge table already drops such a guest's MAC until it is bound."""
    present = facts.port_names
    ports = [b for b in sorted(bindings, key=lambda b: b.port or "") if b.port in present]
    if not ports:
        return []
    objs = [f.table(table, f.NETDEV)]
    for b in ports:
        name = "in_" + re.sub(r"[^A-Za-z0-9_]", "_", b.port)
        objs.append(f.ingress_chain(table, name, b.port, INGRESS_PRIO))
        audit = b.mode == "audit"
        verdict = ([f.COUNTER, f.log(f"segguard audit {b.profile} port-ingress: "), f.ACCEPT] if audit else _ENFORCE)
        objs.append(f.rule(table, name, [f.match(_ETHER_SADDR, b.mac, "!="), *verdict],
                           "source MAC is not the guest's (before the bridge learns it)", family=f.NETDEV))
        objs.append(f.rule(table, name, [_LINK_LOCAL_DST, *verdict],
                           "no link-local (01:80:c2:00:00:0x) frames from a legacy guest", family=f.NETDEV))
    return objs


def _order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table, sets and maps, chains, then rules: every reference exists before use
    (a goto to a chain needs the chain, a vmap element needs its target chain)."""
    rank = {"table": 0, "set": 1, "chain": 2, "map": 3, "rule": 4}
    return sorted(objects, key=lambda o: rank[next(iter(o))])  # stable: rule order kept


def _identity(t: _Table, c: str, v: _Verdicts) -> None:
    """The guest is who its port says: its MAC, its ethertypes, its addresses (sets
    keyed by port; a port with no element for a family drops that family)."""
    port = f.meta("iifname")
    eth_type = f.payload("ether", "type")
    not_bound = f.match(f.concat(_ETHER_SADDR, port), "@bound_ports", "!=")
    if v.audit:
        # the MAC guard for this port (the base chains dispatch a bound port before it):
        # an enforced guest's MAC is dropped here as on every port but its own
        t.rule(c, [not_bound, f.vmap_lookup(_ETHER_SADDR, "legacy_macs")], "a legacy MAC not bound to this port")
    t.rule(c, [not_bound, *v.drop("spoofed-mac")], "source MAC is not the guest's")
    # Whitelisting the outer ethertype drops 802.1Q/802.1ad tags (VLAN 0 included),
    # 802.3 LLC/SNAP frames (their type field is a length) and every other protocol;
    # a guest with no addresses has no element and may send nothing.
    # meta protocol is checked too: it is what the stack would act on.
    t.rule(c, [f.match(f.concat(port, eth_type), "@port_types", "!="), *v.drop("ethertype")],
           "only IPv4/ARP/IPv6 as configured; no tags, no LLC")
    t.rule(c, [f.match(f.concat(port, f.meta("protocol")), "@port_types", "!="), *v.drop("protocol")])
    # (a match on an arp/ip/ip6 field implies its family: libnftables adds that
    # dependency itself, in the bridge family as `meta protocol`, and lists the rule
    # without it, so we never write it; the MAC in the keys is the one found bound above)
    t.rule(c, [f.match(f.concat(port, _ETHER_SADDR, f.payload("arp", "saddr ip")), "@port_src4", "!="), *v.drop("arp-spoof")],
           "ARP only for its own IPv4")
    t.rule(c, [f.match(f.concat(f.payload("arp", "saddr ether"), port), "@bound_ports", "!="), *v.drop("arp-spoof")])
    t.rule(c, [f.match(f.payload("arp", "operation"), t.const("arp_ops", "arp_op", ["request", "reply"]), "!="), *v.drop("arp-op")])
    t.rule(c, [f.match(eth_type, "arp"), f.ACCEPT])
    t.rule(c, [f.match(f.concat(port, _ETHER_SADDR, f.payload("ip", "saddr")), "@port_src4", "!="), *v.drop("ip-spoof")],
           "IPv4 source is not the guest's")
    linklocal = t.const("ip6_linklocal", "ipv6_addr", IP6_LINKLOCAL, interval=True)
    t.rule(c, [f.match(f.concat(port, _ETHER_SADDR, f.payload("ip6", "saddr")), "@port_src6", "!="),
               f.match(f.payload("ip6", "saddr"), linklocal, "!="), *v.drop("ip6-spoof")], "IPv6 source is not the guest's")
    # every IPv6 port has an nd_dispatch element (the same loop writes both)
    t.rule(c, [f.match(f.payload("icmpv6", "type"), "nd-neighbor-advert"), f.vmap_lookup(port, "nd_dispatch")],
           "neighbour advertisements: only for the guest's own addresses")


# Every ND chain loads the same words of the ICMPv6 body and ends in the same rule: one
# copy of those expressions serves all of them, as fragments.COUNTER does every rule
# (plan objects are never changed in place). At 1,000 guests they were ~2.7 MB.
_RETURN = {"return": None}
_ND_WORDS = tuple(f.raw_payload("th", 64 + 32 * i, 32) for i in range(4))
_ND_LINKLOCAL = (f.match(f.bitand(f.raw_payload("th", 64, 16), 0xFFC0), 0xFE80), _RETURN)


def _nd_chain(t: _Table, b: Binding, v: _Verdicts) -> None:
    """A neighbour advertisement for an address that is not its own is the IPv6 form of
    ARP spoofing. libnftables 1.0 has no typed field for the ND target (nor a raw
    payload in a set key), so it is compared as four 32-bit words of the ICMPv6 body,
    in a chain per IPv6 guest, reached only by advertisements."""
    nd = t.chain(f"nd_{ident(b.guest)}")
    for addr in b.ipv6:
        words = netaddr.IPAddress(addr).value
        parts = [(words >> (96 - 32 * i)) & 0xFFFFFFFF for i in range(4)]
        t.rule(nd, [*(f.match(_ND_WORDS[i], p) for i, p in enumerate(parts)), _RETURN])
    t.rule(nd, list(_ND_LINKLOCAL))  # any link-local target: fe80::/10
    t.rule(nd, v.drop("nd-spoof"), "neighbour advertisement for an address that is not the guest's")


class _Shared:
    """The parts of a profile's chains that do not depend on its rules live once per
    table, in chains every profile jumps to (over a quarter of a 1,000-profile table
    was copies of them, and the transaction and read-back grow with the rule count). A chain that ends
    without a verdict returns to the rule after the jump, so the order a frame meets
    the rules in is exactly the inlined one. Audit profiles get their own copies: their
    log prefix names the profile."""

    def __init__(self, t: _Table, sets, ad_ports: str, stateful: bool):
        self.t, self.sets, self.ad_ports, self.stateful = t, sets, ad_ports, stateful
        self.made: set[str] = set()
        self.peer_sets: dict = {}  # peer list -> its sets, across profiles

    def _chain(self, base: str, v: _Verdicts, build) -> str:
        name = base if not v.audit else f"a_{ident(v.profile)}_{base}"
        if name not in self.made:
            self.made.add(name)
            build(self.t.chain(name), v)
        return name

    @staticmethod
    def _tag(block) -> str:
        return {(True, True): "inet_dom", (True, False): "inet", (False, True): "dom", (False, False): "open"}[
            (bool(block.internet), bool(block.domain))]

    def out_pre(self, prof, v: _Verdicts) -> str:
        """guest -> out, before any allow rule: rogue services, ND/MLD, guard rails."""
        def build(c: str, v: _Verdicts) -> None:
            t = self.t
            # Rogue infrastructure services a hostile guest could offer to its neighbours.
            t.rule(c, [f.match(f.payload("udp", "sport"), t.const("dhcp_server_ports", "inet_service", [67, 547])), *v.drop("rogue-dhcp")], "no DHCP/DHCPv6 server replies")
            t.rule(c, [f.match(f.payload("icmpv6", "type"), t.const("rogue_nd_types", "icmpv6_type", ["nd-router-advert", "nd-redirect"])), *v.drop("rogue-ra")], "no router advertisements or redirects")
            t.rule(c, [f.match(f.payload("icmp", "type"), "redirect"), *v.drop("rogue-redirect")])
            # Link-layer neighbour discovery is accepted before the address guard rails (it
            # is addressed to multicast, and hop limit 255 means it cannot have been routed).
            t.rule(c, [f.match(f.payload("icmpv6", "type"), t.const("nd_types", "icmpv6_type", ND_TYPES)), f.match(f.payload("ip6", "hoplimit"), 255), f.ACCEPT], "IPv6 neighbour discovery")
            t.rule(c, [f.match(f.payload("icmpv6", "type"), t.const("mld_types", "icmpv6_type", MLD_TYPES)), f.match(f.payload("ip6", "hoplimit"), 1), f.ACCEPT], "MLD")
            t.rule(c, [f.match(f.payload("ip6", "saddr"), t.const("ip6_linklocal", "ipv6_addr", IP6_LINKLOCAL, interval=True)), *v.drop("ip6-linklocal")], "link-local source only for ND/MLD")
            _guard_rails(t, c, prof.block, self.sets, "daddr", v)
            t.rule(c, [f.exthdr_exists("rt"), *v.drop("ip6-routing-header")], "no IPv6 routing headers")
            self._ct(c, v, "replies to flows let in (conntrack)")
        return self._chain(f"common_out_{self._tag(prof.block)}", v, build)

    def in_pre(self, prof, v: _Verdicts) -> str:
        """in -> guest, before any allow rule."""
        def build(c: str, v: _Verdicts) -> None:
            t = self.t
            t.rule(c, [f.match(f.payload("ether", "type"), "arp"), f.ACCEPT], "ARP to the guest")
            t.rule(c, [f.match(f.payload("icmpv6", "type"), t.const("nd_ns_na", "icmpv6_type", ["nd-neighbor-solicit", "nd-neighbor-advert"])), f.match(f.payload("ip6", "hoplimit"), 255), f.ACCEPT], "IPv6 neighbour discovery")
            _guard_rails(t, c, prof.block, self.sets, "saddr", v)
            self._ct(c, v, "replies to flows the guest opened (conntrack)")
        return self._chain(f"common_in_{self._tag(prof.block)}", v, build)

    def _ct(self, c: str, v: _Verdicts, comment: str) -> None:
        if self.stateful:
            self.t.rule(c, [f.ct_state("invalid"), *v.drop("ct-invalid")])
            self.t.rule(c, [f.ct_state("established", "related"), f.ACCEPT], comment)

    def fragments(self, v: _Verdicts) -> str:
        """The fragments no rule of the profile let through (either direction)."""
        def build(c: str, v: _Verdicts) -> None:
            self.t.rule(c, [f.match(f.bitand(f.payload("ip", "frag-off"), 0x3FFF), 0, "!="), *v.drop("fragment")], "other IPv4 fragments")
            self.t.rule(c, [f.exthdr_exists("frag"), *v.drop("fragment")], "other IPv6 fragments")
        return self._chain("common_frag", v, build)

    def out_post(self, prof, v: _Verdicts) -> str:
        """guest -> out, after the egress allows and before the stateless replies."""
        def build(c: str, v: _Verdicts) -> None:
            t = self.t
            if prof.block.domain:
                # after the egress rules (which may name an AD port to a host explicitly),
                # before the stateless replies: a forged "reply" from a service port must
                # not reach an AD port of the rule's peer either
                t.rule(c, [f.match(f.meta("l4proto"), t.const("tcp_udp", "inet_proto", ["tcp", "udp"])), f.match(f.payload("th", "dport"), self.ad_ports), *v.drop("ad-port")], "AD protocol ports (block.domain)")
            # Tunnels: an IP protocol other than TCP/UDP/ICMP, or a well-known tunnel port,
            # would carry anything past every rule to whoever decapsulates it (default:
            # allow, or a peer that forwards). Egress rules before this may still allow one.
            t.rule(c, [f.match(f.meta("l4proto"), t.const("l4_allowed", "inet_proto", ["tcp", "udp", "icmp", "ipv6-icmp"]), "!="), *v.drop("ip-protocol")],
                   "only TCP, UDP and ICMP (no GRE, IPIP, 6in4, ESP, SCTP...)")
            t.rule(c, [f.match(f.payload("udp", "dport"), t.const("tunnel_udp_ports", "inet_service", list(TUNNEL_UDP_PORTS))), *v.drop("tunnel-port")],
                   "well-known UDP tunnel ports (VXLAN, Geneve, WireGuard, OpenVPN, L2TP, IPsec NAT-T, Teredo)")
        return self._chain("common_out_post_dom" if prof.block.domain else "common_out_post", v, build)


def _class_chains(t: _Table, prof, out_c: str, in_c: str, shared: _Shared, stateful: bool) -> None:
    """The rules every port of this kind of profile meets, in the order the per-profile
    chains had them: guard rails, fragments, opened flows, AD ports and tunnels,
    stateless replies, default. Each allow is one lookup of (port, peer, protocol,
    service) in a set whose elements compile/policy.py writes per port."""
    v = _Verdicts(prof.name, prof.mode == "audit")
    last = v.drop("default-deny") if prof.default == "deny" else [f.ACCEPT]
    ip = {4: "ip", 6: "ip6"}
    icmp = {4: "icmp", 6: "icmpv6"}
    for c, d, port, field in ((out_c, "out", f.meta("iifname"), "daddr"), (in_c, "in", f.meta("oifname"), "saddr")):
        t.chain(c)
        key = _keyer(d)
        if d == "out" and not stateful:
            # The guest's own frames: one lookup proves what the identity rules' six
            # would (its port, MAC and source address; the family by meta protocol,
            # the lookup's dependency, and ether type), and its common frames are
            # accepted without walking them (what the guest sends is mostly replies
            # and flows its profile names). The rest come back and take the walk.
            fast = {fam: t.chain(f"{c}_fast{fam}") for fam in (4, 6)}
            for fam, eth in ((4, "ip"), (6, "ip6")):
                t.rule(c, [f.match(f.concat(port, _ETHER_SADDR, f.payload(ip[fam], "saddr")), f"@port_src{fam}"),
                           f.match(f.payload("ether", "type"), eth), f.jump(fast[fam])],
                       f"fast path: its own IPv{fam} source on its MAC and port")
            _identity(t, c, v)
            _fast_path(t, fast, d, key, prof, shared, stateful)
        elif d == "out":
            _identity(t, c, v)
            _fast_path(t, {4: c, 6: c}, d, key, prof, shared, stateful)
        # (toward the guest the fast path is in the base chains, before the dispatch)
        if d == "out":
            t.rule(c, [f.jump(shared.out_pre(prof, v))], "rogue services, ND/MLD, guard rails")
        else:
            # toward the guest too, whatever the default: a tag, LLC/SNAP or a family it
            # has no address for is nothing it can use, and something it may mis-parse
            # (the fast path above can only accept what its port's elements name)
            t.rule(c, [f.match(f.concat(port, f.payload("ether", "type")), "@port_types", "!="), *v.drop("ethertype")],
                   "to the guest: only the ethertypes it uses (no tags, no LLC)")
            t.rule(c, [f.jump(shared.in_pre(prof, v))], "ARP, ND, guard rails")

        def both(c: str, exprs: list[dict[str, Any]], comment: str | None = None) -> None:
            """A lookup in a port-keyed set is two rules: its single values in a hash
            set (one probe, whatever the fleet's size), its prefixes and ranges in an
            interval set (nftables' pipapo, whose lookup cost grows with its size)."""
            for suffix in (EXACT_SUFFIX, ""):
                t.rule(c, [_in_set(e, suffix) for e in exprs], comment)

        for fam in (4, 6):
            frag = (f.match(f.bitand(f.payload("ip", "frag-off"), 0x3FFF), 0, "!=") if fam == 4 else f.exthdr_exists("frag"))
            both(c, [frag, f.match(key(fam), f"@frag{fam}"), f.ACCEPT], "fragments: to/from the peers of UDP rules")
        t.rule(c, [f.jump(shared.fragments(v))])
        new = [f.ct_state("new")] if stateful else []
        for fam in (4, 6):
            both(c, [f.match(key(fam, f.meta("l4proto"), f.payload("th", "dport")), f"@{d}_open{fam}"), *new, f.ACCEPT],
                   f"flows the profile lets {'the guest open' if d == 'out' else 'its peers open'} (tcp/udp)")
            both(c, [f.match(f.payload(icmp[fam], "type"), "echo-request"), f.match(key(fam), f"@{d}_echo{fam}"), *new, f.ACCEPT],
                   "echo requests the profile allows")
        if d == "out":
            t.rule(c, [f.jump(shared.out_post(prof, v))], "AD ports, tunnels")
        if not stateful:
            # Without conntrack: replies to the flows the other side opened, only to/from
            # that rule's peers and only from its service port -- the other direction's
            # own tuples, with sport for dport; for TCP only with ACK set, so a bare SYN
            # from the service port (a new flow) is not a reply.
            other = "in" if d == "out" else "out"
            for fam in (4, 6):
                # (written as the kernel lists them back: `tcp sport` implies l4proto tcp)
                def reply(proto: str) -> dict[str, Any]:
                    return f.match(key(fam, f.meta("l4proto"), f.payload(proto, "sport")), f"@{other}_open{fam}")
                both(c, [f.match(f.bitand(f.payload("tcp", "flags"), "ack"), "ack"), reply("tcp"), f.ACCEPT], "replies: tcp (ACK set)")
                both(c, [reply("udp"), f.ACCEPT], "replies: udp")
                both(c, [f.match(f.payload(icmp[fam], "type"), "echo-reply"), f.match(key(fam), f"@{other}_echo{fam}"), f.ACCEPT],
                       "replies: echo")
                errors = ICMP_ERRORS4 if fam == 4 else ICMP_ERRORS6
                errs = t.const(f"icmp{'' if fam == 4 else 'v6'}_errors", "icmp_type" if fam == 4 else "icmpv6_type", errors)
                both(c, [f.match(f.payload(icmp[fam], "type"), errs), f.match(key(fam), f"@{d}_rerr{fam}"), f.ACCEPT],
                       "icmp errors about the flows the other side opened")
        t.rule(c, last, f"default: {prof.default}")


def _keyer(d: str):
    """The port-keyed lookup key of direction `d`: (port, peer address, ...)."""
    port = f.meta("iifname" if d == "out" else "oifname")
    field = "daddr" if d == "out" else "saddr"

    def key(fam: int, *rest: Any) -> dict[str, Any]:
        return f.concat(port, f.payload("ip" if fam == 4 else "ip6", field), *rest)
    return key


def _fast_path(t: _Table, chains: dict[int, str], d: str, key, prof, shared: _Shared, stateful: bool) -> None:
    """The bulk of a guest's traffic -- TCP/UDP to a single peer and service the profile
    names, and (stateless) TCP replies of such flows -- accepted by one hash lookup
    before the guard rails, instead of after ~20 rules. It accepts only what the full
    walk below accepts too:
    * guard rails: validation refuses a rule whose peers touch management, the
      hypervisor, a DC (block.domain) or the internet (block.internet), so no element
      of these sets is in guard-railed space;
    * fragments: only unfragmented packets (first fragments keep their own rules);
    * from the guest, what the walk drops before its allows: DHCP/DHCPv6 server source
      ports, IPv6 link-local sources, IPv6 routing headers -- excluded here; for a TCP
      reply also the AD-port guard it meets before the replies (block.domain);
    * stateful: opens only as `ct state new`, so invalid and established packets take
      the walk (its conntrack rules) unchanged.
    The interval halves of the sets stay in the walk. Equivalence is held by the lab,
    netns and kernel-lab tests, which probe each of those cases."""
    plain = {4: [f.match(f.bitand(f.payload("ip", "frag-off"), 0x3FFF), 0)], 6: [f.exthdr_missing("frag")]}
    if d == "out":
        dhcp = t.const("dhcp_server_ports", "inet_service", [67, 547])
        linklocal = t.const("ip6_linklocal", "ipv6_addr", IP6_LINKLOCAL, interval=True)
        plain[6] += [f.exthdr_missing("rt"), f.match(f.payload("ip6", "saddr"), linklocal, "!=")]
        guard_open = [f.match(f.payload("th", "sport"), dhcp, "!=")]
        # (`tcp dport`: after `tcp flags` the kernel lists a th field as tcp's)
        guard_reply = [f.match(f.payload("tcp", "dport"), shared.ad_ports, "!=")] if prof.block.domain else []
    else:
        guard_open, guard_reply = [], []
    new = [f.ct_state("new")] if stateful else []
    other = "in" if d == "out" else "out"
    for fam in (4, 6):
        t.rule(chains[fam], [*plain[fam], *guard_open, f.match(key(fam, f.meta("l4proto"), f.payload("th", "dport")), f"@{d}_open{fam}{EXACT_SUFFIX}"),
                   *new, f.ACCEPT], "fast path: a flow the profile names, single peer and service")
    if not stateful:
        for fam in (4, 6):
            t.rule(chains[fam], [*plain[fam], f.match(f.bitand(f.payload("tcp", "flags"), "ack"), "ack"), *guard_reply,
                       f.match(key(fam, f.meta("l4proto"), f.payload("tcp", "sport")), f"@{other}_open{fam}{EXACT_SUFFIX}"), f.ACCEPT],
                   "fast path: tcp replies (ACK set) of such a flow")


def _in_set(expr: dict[str, Any], suffix: str) -> dict[str, Any]:
    m = expr.get("match")
    if m and isinstance(m.get("right"), str) and m["right"].startswith("@") and m["right"][1:] in INTERVAL_SETS:
        return {"match": {**m, "right": m["right"] + suffix}}
    return expr


def _guard_rails(t: _Table, c: str, block, sets, field: str, v: _Verdicts) -> None:
    """Absolute: evaluated before any allow rule of the profile."""
    rails = [("mgmt", "management", True), ("hyp", "hypervisor", True),
             ("dc", "domain controller", block.domain)]
    for key, what, on in rails:
        if not on:
            continue
        s4, s6 = sets[key]
        t.rule(c, [f.match(f.payload("ip", field), s4), *v.drop(key)], f"guard rail: {what}")
        t.rule(c, [f.match(f.payload("ip6", field), s6), *v.drop(key)], f"guard rail: {what}")
    if block.internet:
        s4, s6 = sets["internal"]
        t.rule(c, [f.match(f.payload("ip", field), s4, "!="), *v.drop("internet")], "guard rail: internet (not in site.internal)")
        t.rule(c, [f.match(f.payload("ip6", field), s6, "!="), *v.drop("internet")], "guard rail: internet (not in site.internal)")


def reachable(objects: list[dict[str, Any]], chains: set[str]) -> tuple[set[str], set[str]]:
    """The chains reachable from `chains` by jump/goto (and verdict-map elements), and
    the named sets and maps their rules reference: what one guest's policy depends on
    now that part of it lives in shared chains and sets."""
    rules: dict[str, list[Any]] = {}
    maps: dict[str, list[Any]] = {}
    for o in objects:
        kind, body = next(iter(o.items()))
        if body.get("family", f.FAMILY) != f.FAMILY:
            continue
        if kind == "rule":
            rules.setdefault(body["chain"], []).append(body["expr"])
        elif kind == "map":
            maps[body["name"]] = body.get("elem", [])
    seen_c: set[str] = set()
    seen_s: set[str] = set()
    todo = list(chains)

    def scan(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("jump", "goto") and isinstance(v, dict):
                    todo.append(v["target"])
                else:
                    scan(v)
        elif isinstance(node, list):
            for v in node:
                scan(v)
        elif isinstance(node, str) and node.startswith("@"):
            name = node[1:]
            if name not in seen_s:
                seen_s.add(name)
                scan(maps.get(name, []))

    while todo:
        c = todo.pop()
        if c in seen_c:
            continue
        seen_c.add(c)
        scan(rules.get(c, []))
    return seen_c, seen_s
