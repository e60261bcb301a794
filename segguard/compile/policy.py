"""A profile's allow rules as set elements keyed by port.

The table's rules are the same for every guest (compile/nft.py `_class_chains`); what
differs per guest is which (port, peer, protocol, service) tuples its port may use.
Each profile is turned once into a `PortPolicy` (its elements without the port), and
every bound port of the profile gets those elements with its name in front.

Sets with ranges and concatenations (nftables' pipapo) refuse overlapping elements,
and a profile's rules overlap freely (two rules to the same host, a /24 and a host in
it). `boxes` cuts the union of a protocol's rules into disjoint (address range, port
range) pieces: a frame matches one piece exactly when it matches one of the rules.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterable

import netaddr

from segguard.config.validate import LoadedProfile, ResolvedRule
from segguard.plan import Concat

# set name -> (type, interval). "out" sets hold what the guest opens (looked up with
# its port as iifname and the peer as ip daddr), "in" sets what its peers open to it
# (oifname, ip saddr). Without conntrack the replies are the same tuples seen from the
# other side: a reply from the guest is (iifname, daddr, l4proto, sport) in `in_open`,
# so the reply rules look up the other direction's sets instead of sets of their own.
_KINDS = {
    "open": ("{addr}", "inet_proto", "inet_service"),  # tcp/udp flows this side opens
    "echo": ("{addr}",),                                # echo requests this side sends
    "rerr": ("{addr}",),                                # stateless: icmp errors about flows the other side opened
}
_STATELESS_ONLY = ("rerr",)


EXACT_SUFFIX = "_x"


def port_set_types(stateful: bool) -> dict[str, tuple[list[str], bool]]:
    """Every port-keyed set of the table with its type, in a fixed order. Each policy
    set comes twice: `<name>` (interval: prefixes, ranges) and `<name>_x` (hash: single
    addresses and ports, most of a real profile), so most lookups are one hash probe."""
    out: dict[str, tuple[list[str], bool]] = {
        "port_types": (["ifname", "ether_type"], False),
        # (port, MAC, own address): the sources the guest may use, its MAC with them,
        # so one lookup can prove its identity ahead of its fast path (compile/nft.py)
        "port_src4": (["ifname", "ether_addr", "ipv4_addr"], False),
        "port_src6": (["ifname", "ether_addr", "ipv6_addr"], False),
    }
    policy: dict[str, list[str]] = {
        # fragments carry no ports (or too few bytes of them), so no port rule can
        # judge them: to/from peers of the profile's UDP rules, either direction
        "frag4": ["ifname", "ipv4_addr"],
        "frag6": ["ifname", "ipv6_addr"],
    }
    for d in ("out", "in"):
        for kind, parts in _KINDS.items():
            if stateful and kind in _STATELESS_ONLY:
                continue
            for fam in (4, 6):
                policy[f"{d}_{kind}{fam}"] = ["ifname", *(p.format(addr=f"ipv{fam}_addr") for p in parts)]
    for name, type_ in policy.items():
        out[name + EXACT_SUFFIX] = (type_, False)
        out[name] = (type_, True)
    return out


INTERVAL_SETS = frozenset(n for n, (_, interval) in port_set_types(stateful=False).items() if interval)


def _family(name: str) -> int:
    return int(name.removesuffix(EXACT_SUFFIX)[-1])


# Profiles name the same peers (a file server, a subnet): one object per distinct value
# serves every element that holds it, as fragments.COUNTER does every rule (plan objects
# are never changed in place). Bounded: an agent lives through many edits.
@functools.lru_cache(maxsize=1 << 16)
def _addr(lo: int, hi: int, fam: int) -> Any:
    """An address range as nft lists it back: an address, a prefix, or a range."""
    first, last = netaddr.IPAddress(lo, fam), netaddr.IPAddress(hi, fam)
    if lo == hi:
        return str(first)
    cidrs = netaddr.iprange_to_cidrs(first, last)
    if len(cidrs) == 1:
        return {"prefix": {"addr": str(cidrs[0].network), "len": cidrs[0].prefixlen}}
    return {"range": [str(first), str(last)]}


@functools.lru_cache(maxsize=1 << 12)
def _svc(lo: int, hi: int) -> Any:
    return lo if lo == hi else {"range": [lo, hi]}


def _merge(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _spans(nets: Iterable[netaddr.IPNetwork]) -> list[tuple[int, int]]:
    return [(n.first, n.last) for n in nets]


def boxes(rules: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]]) -> list[tuple[int, int, int, int]]:
    """Disjoint (addr lo, addr hi, port lo, port hi) pieces covering exactly the union
    of the rules' address spans x port ranges. Addresses are cut at every span edge;
    each piece of address space gets the merged ports of the rules covering it, and
    neighbouring pieces with the same ports join again."""
    edges = sorted({e for spans, _ in rules for lo, hi in spans for e in (lo, hi + 1)})
    pieces: list[tuple[int, int, tuple[tuple[int, int], ...]]] = []
    for a, b in zip(edges, edges[1:]):
        ports = _merge(p for spans, rng in rules if any(lo <= a <= hi for lo, hi in spans) for p in rng)
        if not ports:
            continue
        if pieces and pieces[-1][1] == a - 1 and pieces[-1][2] == ports:
            pieces[-1] = (pieces[-1][0], b - 1, ports)
        else:
            pieces.append((a, b - 1, ports))
    return [(lo, hi, plo, phi) for lo, hi, ports in pieces for plo, phi in ports]


def _union(rules: list[ResolvedRule], fam: int) -> list[tuple[int, int]]:
    return _merge(s for r in rules for s in _spans(n for n in r.peers if n.version == fam))


@dataclass(frozen=True)
class PortPolicy:
    """One profile's elements, per set, without the port in front."""

    elems: dict[str, tuple[tuple[Any, ...], ...]]

    @classmethod
    def of(cls, lp: LoadedProfile, stateful: bool) -> "PortPolicy":
        elems: dict[str, list[tuple[Any, ...]]] = {}

        def put(name: str, parts: tuple[Any, ...]) -> None:
            exact = not any(isinstance(p, dict) for p in parts)
            elems.setdefault(name + EXACT_SUFFIX if exact else name, []).append(parts)

        for fam in (4, 6):
            for lo, hi in _union([r for r in (*lp.egress, *lp.ingress) if r.proto == "udp"], fam):
                put(f"frag{fam}", (_addr(lo, hi, fam),))
        for d, opened, other in (("out", lp.egress, lp.ingress), ("in", lp.ingress, lp.egress)):
            for fam in (4, 6):
                for proto in ("tcp", "udp"):
                    mine = [r for r in opened if r.proto == proto]
                    for lo, hi, plo, phi in boxes([(_spans(n for n in r.peers if n.version == fam), list(r.ports)) for r in mine]):
                        put(f"{d}_open{fam}", (_addr(lo, hi, fam), proto, _svc(plo, phi)))
                for lo, hi in _union([r for r in opened if r.proto == "icmp"], fam):
                    put(f"{d}_echo{fam}", (_addr(lo, hi, fam),))
                if not stateful:
                    # ICMP errors about the flows the other side opened, from any of their peers
                    for lo, hi in _union(list(other), fam):
                        put(f"{d}_rerr{fam}", (_addr(lo, hi, fam),))
        return cls({k: tuple(v) for k, v in elems.items()})


def port_elements(ported, templates: dict[str, PortPolicy]) -> dict[str, list[Any]]:
    """Per set, the elements of every bound port (`ported`: bindings with a port,
    sorted by port), identity first."""
    out: dict[str, list[Any]] = {}
    for b in ported:
        types = (["arp", "ip"] if b.ipv4 else []) + (["ip6"] if b.ipv6 else [])
        out.setdefault("port_types", []).extend(Concat((b.port, t)) for t in types)
        for fam, addrs in ((4, b.ipv4), (6, b.ipv6)):
            out.setdefault(f"port_src{fam}", []).extend(Concat((b.port, b.mac, a)) for a in sorted(addrs, key=netaddr.IPAddress))
        for name, tuples in templates[b.profile].elems.items():
            if not (b.ipv4 if _family(name) == 4 else b.ipv6):
                continue  # the port drops that family before any lookup
            out.setdefault(name, []).extend(Concat((b.port, *parts)) for parts in tuples)
    return out
