"""compile/policy.py: a profile's allow rules as elements of port-keyed sets.

nftables' concatenated-range sets refuse overlapping elements, so `boxes` must cut
overlapping (address span, port range) rules into disjoint pieces that cover exactly
the same points; these tests check that by enumerating every point of small spaces."""
from __future__ import annotations

import itertools
import random

import netaddr
import pytest

from segguard.compile.policy import EXACT_SUFFIX, PortPolicy, boxes, port_elements as _port_elements, port_set_types
from segguard.config.validate import load_config
from segguard.plan import Binding
from tests.unit.test_compile import SITE

ADDRS, PORTS = range(0, 41), range(0, 21)


def port_elements(ported, templates) -> dict:
    """port_elements with each policy set's two halves (single values in `<name>_x`,
    prefixes and ranges in `<name>`) read as one set, single values first."""
    out: dict = {}
    for name, items in sorted(_port_elements(ported, templates).items(), key=lambda kv: not kv[0].endswith(EXACT_SUFFIX)):
        out.setdefault(name.removesuffix(EXACT_SUFFIX), []).extend(items)
    return out


def covered_by_rules(rules, a: int, p: int) -> bool:
    return any(any(lo <= a <= hi for lo, hi in spans) and any(plo <= p <= phi for plo, phi in ports)
               for spans, ports in rules)


def pieces_at(pieces, a: int, p: int) -> list:
    return [b for b in pieces if b[0] <= a <= b[1] and b[2] <= p <= b[3]]


def assert_exact_and_disjoint(rules, pieces) -> None:
    for lo, hi, plo, phi in pieces:
        assert lo <= hi and plo <= phi, pieces
    for a, p in itertools.product(ADDRS, PORTS):
        got = pieces_at(pieces, a, p)
        assert len(got) <= 1, ("overlapping pieces", a, p, got)
        assert bool(got) == covered_by_rules(rules, a, p), (a, p, rules, pieces)


def pairwise_disjoint(pieces) -> bool:
    return not any(a[0] <= b[1] and b[0] <= a[1] and a[2] <= b[3] and b[2] <= a[3]
                   for a, b in itertools.combinations(pieces, 2))


def span(rng: random.Random, top: int) -> tuple[int, int]:
    lo = rng.randint(0, top)
    return lo, min(top, lo + rng.choice([0, 0, 1, 3, 7, 15, 40]))


def random_rules(rng: random.Random):
    return [([span(rng, 40) for _ in range(rng.randint(0, 3))], [span(rng, 20) for _ in range(rng.randint(1, 3))])
            for _ in range(rng.randint(0, 6))]


# ------------------------------------------------------------------------- boxes
def test_boxes_cover_exactly_the_rules_and_never_overlap():
    rng = random.Random(20261201)
    for _ in range(300):
        rules = random_rules(rng)
        pieces = boxes(rules)
        assert pairwise_disjoint(pieces), (rules, pieces)
        assert_exact_and_disjoint(rules, pieces)


def test_boxes_of_nothing():
    assert boxes([]) == []


def test_host_inside_a_network_with_other_ports():
    # a /24-like span 0..255 on port 80, and host 10 in it on port 22
    rules = [([(0, 255)], [(80, 80)]), ([(10, 10)], [(22, 22)])]
    pieces = boxes(rules)
    assert sorted(pieces) == [(0, 9, 80, 80), (10, 10, 22, 22), (10, 10, 80, 80), (11, 255, 80, 80)]
    assert pairwise_disjoint(pieces)


def test_identical_rules_are_merged():
    rule = ([(5, 9)], [(1, 3)])
    assert boxes([rule, rule, rule]) == [(5, 9, 1, 3)]


def test_adjacent_spans_with_the_same_ports_join():
    assert boxes([([(0, 4)], [(7, 7)]), ([(5, 9)], [(7, 7)])]) == [(0, 9, 7, 7)]
    # ... and adjacent or overlapping port ranges of one address piece merge
    assert boxes([([(0, 9)], [(1, 3), (4, 6)]), ([(0, 9)], [(5, 8)])]) == [(0, 9, 1, 8)]


def test_spans_with_different_ports_do_not_join():
    assert boxes([([(0, 4)], [(7, 7)]), ([(5, 9)], [(8, 8)])]) == [(0, 4, 7, 7), (5, 9, 8, 8)]
    # a gap between spans keeps them apart even with the same ports
    assert boxes([([(0, 3)], [(7, 7)]), ([(5, 9)], [(7, 7)])]) == [(0, 3, 7, 7), (5, 9, 7, 7)]


def test_boxes_work_on_real_address_values():
    net, host = netaddr.IPNetwork("10.30.0.0/24"), netaddr.IPAddress("10.30.0.20")
    rules = [([(net.first, net.last)], [(443, 443)]), ([(int(host), int(host))], [(443, 443), (1433, 1433)])]
    pieces = boxes(rules)
    assert pairwise_disjoint(pieces)
    assert sorted(pieces) == [(net.first, int(host) - 1, 443, 443), (int(host), int(host), 443, 443),
                              (int(host), int(host), 1433, 1433), (int(host) + 1, net.last, 443, 443)]


# --------------------------------------------------------- PortPolicy / port_elements
PROFILE = """\
name: p
bridge: br0
vlan: 30
guests:
  - name: g1
    mac: "52:54:00:00:00:01"
    port: vnet1
    ipv4: [10.30.1.1]
  - name: g2
    mac: "52:54:00:00:00:02"
    port: vnet2
    ipv4: [10.30.1.2]
    ipv6: ["fd00:30::1:2"]
egress:
  - {to: db, proto: tcp, ports: [1433]}
  - {to: [10.30.0.16/28], proto: tcp, ports: [8000-8080]}
  - {to: db, proto: udp, ports: [514]}
ingress:
  - {from: jump, proto: tcp, ports: [3389]}
  - {from: jump, proto: icmp}
default: deny
mode: enforce
"""


@pytest.fixture
def loaded(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "site.yaml").write_text(SITE)
    (tmp_path / "profiles" / "p.yaml").write_text(PROFILE)
    cfg = load_config(tmp_path)
    (lp,) = cfg.profiles
    return lp


def bindings() -> list[Binding]:
    return [Binding("p", "g1", "52:54:00:00:00:01", "br0", "vnet1", "profile", ("10.30.1.1",), (), "enforce"),
            Binding("p", "g2", "52:54:00:00:00:02", "br0", "vnet2", "profile", ("10.30.1.2",), ("fd00:30::1:2",), "enforce")]


def test_tcp_egress_to_a_group_opens_the_flow_and_its_stateless_reply(loaded):
    pol = PortPolicy.of(loaded, stateful=False)
    el = port_elements(bindings(), {"p": pol})
    out4 = [e["concat"] for e in el["out_open4"]]
    assert ["vnet1", "10.30.0.20", "tcp", 1433] in out4
    assert ["vnet1", "10.30.0.20", "udp", 514] in out4
    # the host db and the /28 containing it overlap: cut into disjoint pieces
    v1 = [e[1:] for e in out4 if e[0] == "vnet1"]
    assert sorted(map(str, v1)) == sorted(map(str, [
        [{"prefix": {"addr": "10.30.0.16", "len": 30}}, "tcp", {"range": [8000, 8080]}],
        ["10.30.0.20", "tcp", 1433],
        ["10.30.0.20", "tcp", {"range": [8000, 8080]}],
        [{"range": ["10.30.0.21", "10.30.0.31"]}, "tcp", {"range": [8000, 8080]}],
        ["10.30.0.20", "udp", 514],
    ]))
    # single values go to the hash half, prefixes and ranges to the interval half
    raw = _port_elements(bindings(), {"p": pol})
    assert {"concat": ["vnet1", "10.30.0.20", "tcp", 1433]} in raw["out_open4" + EXACT_SUFFIX]
    assert not any(isinstance(p, dict) for e in raw["out_open4" + EXACT_SUFFIX] for p in e["concat"])
    assert all(any(isinstance(p, dict) for p in e["concat"]) for e in raw["out_open4"])
    # the IPv6 half of the group only for the guest that has IPv6
    assert [e["concat"] for e in el["out_open6"]] == [["vnet2", "fd00:30::20", "tcp", 1433], ["vnet2", "fd00:30::20", "udp", 514]]
    # ingress: jump may open 3389 and ping; the guest's replies are those tuples, looked up backwards
    assert [e["concat"] for e in el["in_open4"]] == [["vnet1", "10.30.0.30", "tcp", 3389], ["vnet2", "10.30.0.30", "tcp", 3389]]
    assert [e["concat"] for e in el["in_echo4"]] == [["vnet1", "10.30.0.30"], ["vnet2", "10.30.0.30"]]
    assert "in_open6" not in el and "in_echo6" not in el  # jump has no IPv6 address
    # stateless: icmp errors about the other side's flows, from its peers only
    assert [e["concat"] for e in el["in_rerr4"] if e["concat"][0] == "vnet1"] == [["vnet1", {"prefix": {"addr": "10.30.0.16", "len": 28}}]]
    assert [e["concat"] for e in el["out_rerr4"] if e["concat"][0] == "vnet1"] == [["vnet1", "10.30.0.30"]]
    # fragments: to/from the UDP peers only
    assert [e["concat"] for e in el["frag4"]] == [["vnet1", "10.30.0.20"], ["vnet2", "10.30.0.20"]]


def test_stateful_policy_has_no_stateless_reply_elements(loaded):
    stateless, stateful = PortPolicy.of(loaded, stateful=False), PortPolicy.of(loaded, stateful=True)
    el = port_elements(bindings(), {"p": stateful})
    assert not [n for n in el if "rerr" in n]
    assert not [n for n in port_set_types(True) if "rerr" in n]
    assert {n for n in port_set_types(False) if "rerr" in n} == {f"{d}_rerr{f}{x}" for d in ("out", "in") for f in (4, 6) for x in ("", "_x")}
    # everything else is the same either way
    assert {k: v for k, v in stateless.elems.items() if "rerr" not in k} == stateful.elems
    assert ["vnet1", "10.30.0.20", "tcp", 1433] in [e["concat"] for e in el["out_open4"]]


def test_every_element_lands_in_a_declared_set_of_the_right_arity(loaded):
    for stateful in (False, True):
        types = port_set_types(stateful)
        el = _port_elements(bindings(), {"p": PortPolicy.of(loaded, stateful)})
        for name, items in el.items():
            assert name in types, name
            for e in items:
                assert len(e["concat"]) == len(types[name][0]), (name, e)


def test_identity_elements_follow_the_guests_addresses(loaded):
    el = port_elements(bindings(), {"p": PortPolicy.of(loaded, False)})
    assert [e["concat"] for e in el["port_types"]] == [["vnet1", "arp"], ["vnet1", "ip"], ["vnet2", "arp"], ["vnet2", "ip"], ["vnet2", "ip6"]]
    # (port, its MAC, each of its addresses)
    assert [e["concat"][::2] for e in el["port_src4"]] == [["vnet1", "10.30.1.1"], ["vnet2", "10.30.1.2"]]
    assert [e["concat"][::2] for e in el["port_src6"]] == [["vnet2", "fd00:30::1:2"]]
    assert {e["concat"][1] for e in el["port_src4"]} == {b.mac for b in bindings()}
    # a family the guest lacks gets no elements at all
    assert not [e for n, items in el.items() if n.removesuffix("_x").endswith("6") for e in items if e["concat"][0] == "vnet1"]


def test_policy_elements_of_one_port_never_overlap(loaded):
    """What nftables would refuse: two elements of one set matching the same tuple."""
    el = port_elements(bindings(), {"p": PortPolicy.of(loaded, False)})
    for name in ("out_open4", "in_rerr4", "frag4"):
        items = [e["concat"] for e in el[name]]
        for a, b in itertools.combinations(items, 2):
            assert not all(_overlap(x, y) for x, y in zip(a, b)), (name, a, b)


def _bounds(v):
    if isinstance(v, dict) and "range" in v:
        lo, hi = v["range"]
    elif isinstance(v, dict) and "prefix" in v:
        n = netaddr.IPNetwork(f"{v['prefix']['addr']}/{v['prefix']['len']}")
        return n.first, n.last
    else:
        lo = hi = v
    if isinstance(lo, str) and (netaddr.valid_ipv4(lo) or netaddr.valid_ipv6(lo)):
        return int(netaddr.IPAddress(lo)), int(netaddr.IPAddress(hi))
    return lo, hi


def _overlap(x, y) -> bool:
    (a, b), (c, d) = _bounds(x), _bounds(y)
    if isinstance(a, str) or isinstance(c, str):
        return x == y
    return a <= d and c <= b
