"""A bind's netdev port chains over nfnetlink (segguard/apply/nfnl_chains.py) against a
real kernel: a chain written here is held byte for byte as the same chain written by
libnftables, the read-back model matches what the kernel reports for either, a
changed rule or hook is seen, a refused batch commits none of its elements, and
deleting a chain or the table is read back as gone."""
from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from segguard.apply import nfnl, nfnl_chains
from segguard.apply.incremental import ElementDelta, LiveElements, read_back_touched, send_delta
from segguard.apply.nftables import Nft, canonical_key, replace_batch
from segguard.errors import ApplyError
from segguard.plan import Plan
from tests.netns.conftest import scratch_netns

pytestmark = pytest.mark.netns
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = ["lab-example", "audit-mode"]  # enforcing (counter, drop) and audit (counter, log, accept) chains
PORTS = ("vnet7", "vnet8")            # the golden configs' guest ports


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns("nfch") as name:
        for i, port in enumerate(PORTS):
            subprocess.run(["ip", "link", "add", port, "type", "veth", "peer", "name", f"peer{i}"], check=True)
        yield name


def golden(case: str) -> tuple[Plan, list[dict], dict[str, list[dict]]]:
    """The case's plan without its netdev objects, those objects, and them by chain."""
    data = json.loads((GOLDEN / case / "plan.json").read_text())
    bridge = [o for o in data["nft"] if next(iter(o.values())).get("family") != "netdev"]
    netdev = [o for o in data["nft"] if next(iter(o.values())).get("family") == "netdev"]
    chains: dict[str, list[dict]] = {}
    for o in netdev:
        (kind, body), = o.items()
        if kind in ("chain", "rule"):
            chains.setdefault(body["name"] if kind == "chain" else body["chain"], []).append(o)
    return Plan(table=data["table"], stateful=data["stateful"], bindings=(), nft=tuple(bridge)), netdev, chains


def kernel_copy(sock: nfnl.NfnlSocket, table: str, chain: str) -> tuple[list, list]:
    """The kernel's attributes of a chain and of its rules, handles left out (they
    number objects in the order they were made)."""
    key = nfnl._attr(1, table.encode() + b"\0") + nfnl._attr(3, chain.encode() + b"\0")
    got = sock.request(nfnl_chains.NFT_MSG_GETCHAIN, nfnl_chains.NFPROTO_NETDEV, key, "get chain")
    assert got, f"{chain} missing"
    rules = sock.request(nfnl_chains.NFT_MSG_GETRULE, nfnl_chains.NFPROTO_NETDEV,
                         nfnl._attr(1, table.encode() + b"\0") + nfnl._attr(2, chain.encode() + b"\0"), "dump", dump=True)
    drop_chain, drop_rule = {2}, {3, 6}  # handle; rule handle and position
    return ([a for a in nfnl_chains._attrs_of(got[0][4:]) if a[0] not in drop_chain],
            [[a for a in nfnl_chains._attrs_of(r[4:]) if a[0] not in drop_rule] for r in rules])


def write_here(sock: nfnl.NfnlSocket, objs: list[dict]) -> None:
    batch = sock.batch()
    nfnl_chains.add_objects(batch, objs)
    sock.send(batch)


@pytest.mark.parametrize("case", CASES)
def test_a_port_chain_written_here_is_held_as_libnftables_writes_it(ns, case):
    check_same_as_libnftables(case)


def check_same_as_libnftables(case: str) -> None:
    plan, netdev, chains = golden(case)
    nft = Nft()
    sock = nfnl.NfnlSocket()
    try:
        nft.run({"nftables": [{"add": o} for o in netdev]}, "port chains by libnftables")
        theirs = {c: kernel_copy(sock, plan.table, c) for c in chains}
        # the read-back's model of a chain is what the kernel reports for libnftables' own
        assert all(nfnl_chains.chain_problems(sock, plan.table, c, objs) == [] for c, objs in chains.items())
        nft.run({"nftables": [{"delete": {"table": {"family": "netdev", "name": plan.table}}}]}, "clean")
        write_here(sock, netdev)
        ours = {c: kernel_copy(sock, plan.table, c) for c in chains}
        assert all(nfnl_chains.chain_problems(sock, plan.table, c, objs) == [] for c, objs in chains.items())
    finally:
        sock.close()
    assert set(theirs) == {"in_vnet7", "in_vnet8"} and ours == theirs
    # and libnftables reads ours back as the plan's objects (the product's comparison)
    listed = nft.list_table(plan.table, "netdev")
    assert sorted(canonical_key(o) for o in listed) == sorted(canonical_key(o) for o in netdev)


def test_read_back_sees_a_port_chain_changed_behind_our_back(ns):
    check_read_back_of_chains()


def check_read_back_of_chains() -> None:
    plan, netdev, chains = golden("lab-example")
    nft = Nft()
    sock = nfnl.NfnlSocket()
    try:
        write_here(sock, netdev)
        objs = chains["in_vnet7"]
        assert nfnl_chains.chain_problems(sock, plan.table, "in_vnet7", objs) == []
        # the plan for another guest's MAC: same shape, other bytes
        other = json.loads(json.dumps(objs).replace("52:54:00:aa:00:01", "52:54:00:aa:00:99"))
        assert nfnl_chains.chain_problems(sock, plan.table, "in_vnet7", other)
        # someone puts an accept in front of our drops
        nft.run({"nftables": [{"insert": {"rule": {"family": "netdev", "table": plan.table, "chain": "in_vnet7",
                                                   "expr": [{"accept": None}]}}}]}, "tamper")
        problems = nfnl_chains.chain_problems(sock, plan.table, "in_vnet7", objs)
        assert problems == ["netdev chain in_vnet7: 3 rules held, 2 planned, or a rule differs"], problems
        # the kernel's chain hooks another device than the plan says
        elsewhere = json.loads(json.dumps(chains["in_vnet8"]).replace('"vnet8"', '"vnet7"'))
        assert "netdev chain in_vnet8: device is ['vnet8'], not vnet7" in \
            nfnl_chains.chain_problems(sock, plan.table, "in_vnet8", elsewhere)
        assert nfnl_chains.chain_problems(sock, plan.table, "in_vnet8", None) == ["netdev chain in_vnet8: still present"]
    finally:
        sock.close()


def test_a_bind_over_nfnetlink_is_one_batch_and_reads_back(ns):
    """The agent's bind: elements and the port chain together, read back, then the
    unbind deletes chain and table; a refused batch leaves the elements out too."""
    check_bind_batch()


def check_bind_batch() -> None:
    plan, netdev, chains = golden("lab-example")
    nft = Nft()
    nft.run(replace_batch(plan), "bridge table")
    live = LiveElements.of(plan.nft)
    name = "out_dispatch"
    entry = next(e for e in live.elems[name].values() if e[0] == "vnet7")
    sock = nfnl.NfnlSocket()
    try:
        # unbind vnet7: its dispatch element and its chain go (vnet8's chain stays)
        nft.run({"nftables": [{"add": o} for o in netdev]}, "port chains")
        live = LiveElements.of(list(plan.nft) + netdev)
        unbind = ElementDelta({name: "map"}, ((name, ("vnet7",)),), (), port_chains_delete=("in_vnet7",))
        send_delta(sock, plan.table, live, unbind)
        live.apply(unbind)
        assert read_back_touched(sock, plan.table, live, unbind) == []
        assert nfnl_chains.chain_problems(sock, plan.table, "in_vnet7", None) == []
        # bind it again: element and chain in one batch
        bind = ElementDelta({name: "map"}, (), ((name, (entry,)),), port_chains_add=tuple([netdev[0], *chains["in_vnet7"]]))
        send_delta(sock, plan.table, live, bind)
        live.apply(bind)
        assert read_back_touched(sock, plan.table, live, bind) == []
        # the last chain goes with the table
        last = ElementDelta({}, (), (), port_chains_delete=("in_vnet7", "in_vnet8"), delete_port_table=True)
        send_delta(sock, plan.table, live, last)
        live.apply(last)
        assert read_back_touched(sock, plan.table, live, last) == []
        assert not nfnl_chains.table_present(sock, plan.table)
        # a port chain that is already there (left behind, say): the kernel refuses
        # (EXCL: rules would be appended to it), and the element sent in the same
        # batch is not committed either
        nft.run({"nftables": [{"add": o} for o in [netdev[0], *chains["in_vnet8"]]]}, "left behind")
        unbind2 = ElementDelta({name: "map"}, ((name, ("vnet7",)),), ())
        send_delta(sock, plan.table, live, unbind2)
        live.apply(unbind2)
        bad = chains["in_vnet8"]
        refused = ElementDelta({name: "map"}, (), ((name, (entry,)),), port_chains_add=tuple([netdev[0], *bad]))
        with pytest.raises(ApplyError) as err:
            send_delta(sock, plan.table, live, refused)
        # the equivalent libnftables batch is attached, to reproduce with nft -j -f
        assert {"add": bad[0]} in err.value.batch["nftables"]
        assert "File exists" in str(err.value)
        assert sock.get(plan.table, name, live.spec[name], entry) is None
        assert nfnl_chains.chain_problems(sock, plan.table, "in_vnet8", bad) == []  # not appended to
    finally:
        sock.close()


def test_the_unbind_of_a_tap_that_is_gone_commits(ns):
    check_unbind_after_the_device_went()


def check_unbind_after_the_device_went() -> bool:
    """libvirt deletes the tap, then the agent unbinds it: whether the kernel took the
    chain with the device or keeps it unhooked, the unbind commits (its dispatch
    element goes) and leaves no chain behind. Returns whether the chain had gone
    with its device."""
    plan, netdev, chains = golden("lab-example")
    nft = Nft()
    nft.run(replace_batch(plan), "bridge table")
    nft.run({"nftables": [{"add": o} for o in netdev]}, "port chains")
    live = LiveElements.of(list(plan.nft) + netdev)
    subprocess.run(["ip", "link", "del", "vnet7"], check=True)
    sock = nfnl.NfnlSocket()
    went_with_device = not nfnl_chains.chain_present(sock, plan.table, "in_vnet7")
    sock.close()
    unbind = ElementDelta({"out_dispatch": "map"}, (("out_dispatch", ("vnet7",)),), (), port_chains_delete=("in_vnet7",))
    sock = nfnl.NfnlSocket()
    try:
        send_delta(sock, plan.table, live, unbind)
        live.apply(unbind)
        assert read_back_touched(sock, plan.table, live, unbind) == []
        assert sock.get(plan.table, "out_dispatch", live.spec["out_dispatch"], ["vnet7", None]) is None
        assert not nfnl_chains.chain_present(sock, plan.table, "in_vnet7")
        assert nfnl_chains.chain_problems(sock, plan.table, "in_vnet8", chains["in_vnet8"]) == []
    finally:
        sock.close()
    return went_with_device


def test_unencodable_port_chains_are_refused_before_anything_is_sent(ns):
    plan, netdev, chains = golden("lab-example")
    sock = nfnl.NfnlSocket()
    try:
        batch = sock.batch()
        odd = json.loads(json.dumps(chains["in_vnet7"]))
        odd[1]["rule"]["expr"].insert(0, {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 1}})
        with pytest.raises(nfnl.Unencodable):
            nfnl_chains.add_objects(batch, [netdev[0], *odd])
        assert batch.seqs == []  # nothing was added to the batch
        with pytest.raises(nfnl.Unencodable):
            nfnl_chains.add_objects(batch, [{"set": {"family": "netdev", "table": plan.table, "name": "x", "type": "ifname"}}])
    finally:
        sock.close()
    assert not nfnl_chains.table_present(sock := nfnl.NfnlSocket(), plan.table)
    sock.close()
