"""Element transactions over nfnetlink (segguard/apply/nfnl.py) against a real kernel:
the bytes we send for every port-keyed element are the bytes the kernel holds for
the same element written by libnftables, a refused batch commits nothing, and the
key-by-key read-back sees an element changed behind our back."""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from segguard.apply import nfnl
from segguard.apply.incremental import ELEMENT_OBJECTS, ElementDelta, LiveElements, read_back_touched, send_delta
from segguard.apply.nftables import Nft, NftablesApplier, replace_batch
from segguard.errors import ApplyError
from segguard.plan import Plan
from tests.netns.conftest import scratch_netns

pytestmark = pytest.mark.netns
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
# stateless plans: the host kernel has no conntrack in bridge chains (the stateful
# plan's port-keyed sets are a subset of these)
CASES = ["lab-example", "audit-mode", "unbound-guest"]


# Ranges and prefixes of both families: the interval (pipapo) halves of the policy
# sets, which the lab's single-host rules leave empty.
WIDE = """\
name: wide
bridge: br0
vlan: 30
guests:
  - name: wide-1
    mac: "52:54:00:aa:00:77"
    port: vnet77
    ipv4: [10.30.0.77]
    ipv6: ["fd00:30::77"]
block: {internet: true, domain: true}
egress:
  - {to: [10.40.0.0/16, "fd00:40::/48"], proto: tcp, ports: [1000-1100, 8443]}
  - {to: [10.41.0.5, 10.41.0.9], proto: udp, ports: [5000-5010]}
  - {to: 10.42.0.0/24, proto: icmp}
ingress:
  - {from: ["10.43.0.0/20", "fd00:43::/64"], proto: tcp, ports: [22, 3389-3390]}
default: deny
mode: enforce
"""


def bridge_plan(case: str, tmp: Path | None = None) -> Plan:
    """The golden case's plan (with the `wide` profile added when `tmp` is given),
    without the netdev table: its chains need the ports to exist, and nothing here
    is about them."""
    if tmp is None:
        data = json.loads((GOLDEN / case / "plan.json").read_text())
        nft = data["nft"]
        table, stateful = data["table"], data["stateful"]
    else:
        from segguard.compile import compile_plan
        from segguard.config.validate import load_config
        from segguard.host import HostFacts

        shutil.copytree(GOLDEN / case / "config", tmp / "config")
        (tmp / "config" / "profiles" / "wide.yaml").write_text(WIDE)
        facts = HostFacts.from_dict(json.loads((GOLDEN / case / "facts.json").read_text()))
        plan = compile_plan(load_config(tmp / "config"), facts)
        nft, table, stateful = list(plan.nft), plan.table, plan.stateful
    nft = [o for o in nft if next(iter(o.values())).get("family") != "netdev"]
    return Plan(table=table, stateful=stateful, bindings=(), nft=tuple(nft))


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns("nfnl") as name:
        yield name


def applied(case: str, tmp: Path | None = None) -> tuple[Plan, NftablesApplier, LiveElements]:
    plan = bridge_plan(case, tmp)
    applier = NftablesApplier(Nft())
    applier.nft.run(replace_batch(plan), f"golden {case}")
    return plan, applier, LiveElements.of(plan.nft)


def elements(live: LiveElements) -> list[tuple[str, object]]:
    return [(name, e) for name in ELEMENT_OBJECTS if name in live.elems for e in live.elems[name].values()]


@pytest.mark.parametrize("case", CASES)
def test_every_port_keyed_element_is_encoded_as_the_kernel_holds_it(ns, case, tmp_path):
    check_encodings(case, tmp_path)


def check_encodings(case: str, tmp_path: Path) -> None:
    plan, _applier, live = applied(case, tmp_path)
    sock = nfnl.NfnlSocket()
    try:
        checked = {}
        for name, e in elements(live):
            got = sock.get(plan.table, name, live.spec[name], e)
            assert got is not None, f"{name}: {e} not found by its key"
            assert nfnl.held(nfnl.element_of_reply(got), nfnl.expected_attrs(live.spec[name], e)), (name, e)
            checked[name] = checked.get(name, 0) + 1
        # the same answers when asked all at once, in datagrams of a few requests
        # (the read-back's road), a key that is not there among them
        wanted = [(name, live.spec[name], e) for name, e in elements(live)]
        wanted.insert(3, ("out_open4", live.spec["out_open4"], {"concat": ["nosuchport", "192.0.2.1", "tcp", 1]}))
        one_by_one = [sock.get(plan.table, *w) for w in wanted]
        assert one_by_one[3] is None and all(g is not None for i, g in enumerate(one_by_one) if i != 3)
        old, nfnl._PER_SEND = nfnl._PER_SEND, 7
        try:
            assert sock.get_many(plan.table, wanted) == one_by_one
        finally:
            nfnl._PER_SEND = old
    finally:
        sock.close()
    # every kind of object the agent writes was exercised: maps with jump and goto,
    # hash and interval (pipapo) sets, MAC and ethertype keys
    assert {"out_dispatch", "nd_dispatch", "bound_ports", "port_types", "port_src6", "out_open4", "out_open6",
            "in_open4", "in_open6", "out_echo4", "legacy_macs", "frag4_x"} <= set(checked), sorted(checked)
    assert {"port_src4", "port_src6"} <= set(checked)  # (ifname, ether_addr, address) keys


@pytest.mark.parametrize("case", CASES)
def test_deleting_and_re_adding_every_element_over_nfnetlink_leaves_the_table_exact(ns, case, tmp_path):
    check_round_trip(case, tmp_path)


def check_round_trip(case: str, tmp_path: Path) -> None:
    plan, applier, live = applied(case, tmp_path)
    deletes = [(n, [e[0] if live.kind[n] == "map" else e for e in live.elems[n].values()]) for n in ELEMENT_OBJECTS if live.elems.get(n)]
    adds = [(n, list(live.elems[n].values())) for n in ELEMENT_OBJECTS if live.elems.get(n)]
    sock = nfnl.NfnlSocket()
    try:
        sock.send_elements(plan.table, live.spec, deletes, [])
        emptied = applier.realized(plan.table)
        assert all(not next(iter(o.values())).get("elem") for o in emptied
                   if next(iter(o.values())).get("name") in ELEMENT_OBJECTS)
        sock.send_elements(plan.table, live.spec, [], adds)
    finally:
        sock.close()
    assert applier.same(plan, applier.realized(plan.table))


def test_a_refused_batch_commits_nothing(ns, tmp_path):
    plan, applier, live = applied("lab-example", tmp_path)
    before = applier.realized(plan.table)
    name = "out_open4"
    first = next(iter(live.elems[name].values()))
    missing = {"concat": ["nosuchport", "192.0.2.1", "tcp", 1]}
    sock = nfnl.NfnlSocket()
    try:
        # a real delete first, then one the kernel refuses (no such element)
        with pytest.raises(nfnl.NetlinkError) as err:
            sock.send_elements(plan.table, live.spec, [(name, [first]), ("out_open4_x", [missing])], [])
        assert "No such file or directory" in str(err.value)
        delta = ElementDelta({"out_open4_x": "set"}, (("out_open4_x", (missing,)),), ())
        with pytest.raises(ApplyError) as aerr:
            send_delta(sock, plan.table, live, delta)
        # the equivalent libnftables batch is attached, to reproduce with nft -j -f
        assert aerr.value.batch["nftables"][1] == {"delete": {"element": {"family": "bridge", "table": plan.table,
                                                                          "name": "out_open4_x", "elem": [missing]}}}
    finally:
        sock.close()
    assert applier.same(dataclasses.replace(plan, nft=tuple(before)), applier.realized(plan.table))


def test_unencodable_elements_are_refused_before_anything_is_sent(ns, tmp_path):
    plan, applier, live = applied("lab-example", tmp_path)
    with pytest.raises(nfnl.Unencodable):
        nfnl.element_batch(plan.table, live.spec, [("out_open4", [next(iter(live.elems["out_open4"].values()))])],
                           [("port_src4", [{"concat": ["vnet9", "52:54:00:aa:00:09", "2001:db8::1"]}])])
    with pytest.raises(nfnl.Unencodable):
        nfnl.element_batch(plan.table, live.spec, [], [("internal", ["10.0.0.0/8"])])  # not port-keyed
    assert applier.same(plan, applier.realized(plan.table))


def test_read_back_sees_an_element_changed_behind_our_back(ns):
    check_read_back("lab-example")


def check_read_back(case: str) -> None:
    plan, applier, live = applied(case)
    name = "out_open4_x"
    old = next(iter(live.elems[name].values()))
    port = old["concat"][0]
    new = {"concat": [port, "198.51.100.7", "tcp", 4444]}
    delta = ElementDelta({name: "set"}, ((name, (old,)),), ((name, (new,)),))
    sock = nfnl.NfnlSocket()
    try:
        send_delta(sock, plan.table, live, delta)
        live.apply(delta)
        assert read_back_touched(sock, plan.table, live, delta) == []
        # someone deletes what we added and puts back what we deleted
        applier.nft.run({"nftables": [{"delete": {"element": {"family": "bridge", "table": plan.table, "name": name, "elem": [new]}}},
                                      {"add": {"element": {"family": "bridge", "table": plan.table, "name": name, "elem": [old]}}}]},
                        "tamper")
        problems = read_back_touched(sock, plan.table, live, delta)
    finally:
        sock.close()
    assert len(problems) == 2, problems
    assert "is not held as written" in problems[0] and "is still there" in problems[1]


def test_a_map_element_with_another_verdict_is_not_held(ns):
    plan, applier, live = applied("lab-example")
    port, verdict = next(iter(live.elems["out_dispatch"].values()))
    sock = nfnl.NfnlSocket()
    try:
        spec = live.spec["out_dispatch"]
        assert nfnl.held(nfnl.element_of_reply(sock.get(plan.table, "out_dispatch", spec, [port, verdict])),
                         nfnl.expected_attrs(spec, [port, verdict]))
        other = {"goto": {"target": "gin_inet_dom_deny"}} if verdict != {"goto": {"target": "gin_inet_dom_deny"}} else {"drop": None}
        assert not nfnl.held(nfnl.element_of_reply(sock.get(plan.table, "out_dispatch", spec, [port, other])),
                             nfnl.expected_attrs(spec, [port, other]))
    finally:
        sock.close()
