"""The full replace over nfnetlink (segguard/apply/nfnl_table.py) against a real
kernel. A plan written by it is what libnftables writes for the same plan: every set,
chain, rule and element in both tables, byte for byte as the kernel reports them.
NftablesApplier takes that road, and libnftables' own listing agrees. The dump
read-back sees what was changed behind its back, and apply repairs it. A batch the
kernel refuses leaves the previous policy whole. A rule shape this host's libnftables
encodes otherwise than nfnl_table.py sends the apply down the libnftables road."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from segguard.apply import nfnl, nfnl_chains, nfnl_table
from segguard.apply.nftables import Nft, NftablesApplier, rebuild_batch, replace_batch
from segguard.errors import ApplyError
from segguard.plan import Plan
from tests.netns.conftest import scratch_netns
from tests.netns.test_nfnl import GOLDEN, WIDE

pytestmark = pytest.mark.netns
# the host kernel has no conntrack in bridge chains: the stateful case runs in the kernel lab
CASES = ["lab-example", "audit-mode", "unbound-guest", "no-profiles"]
NETDEV, BRIDGE = nfnl_chains.NFPROTO_NETDEV, nfnl.NFPROTO_BRIDGE


def full_plan(case: str, tmp: Path, wide: bool = True) -> Plan:
    """The golden case's whole plan, netdev port chains included; with the `wide`
    profile (ranges and prefixes of both families: interval elements) when asked."""
    from segguard.compile import compile_plan
    from segguard.config.validate import load_config
    from segguard.host import HostFacts

    shutil.copytree(GOLDEN / case / "config", tmp / "config")
    if wide:
        (tmp / "config" / "profiles" / "wide.yaml").write_text(WIDE)
    data = json.loads((GOLDEN / case / "facts.json").read_text())
    if wide:  # its tap, so that its policy is bound (port-keyed elements, a port chain)
        data["bridges"][0]["ports"].append({"name": "vnet77", "mac": "fe:54:00:aa:00:77"})
    return compile_plan(load_config(tmp / "config"), HostFacts.from_dict(data))


def ports_of(plan: Plan) -> list[str]:
    return sorted({o["chain"]["dev"] for o in plan.nft if "chain" in o and "dev" in o["chain"]})


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns("nftb") as name:
        yield name


def make_ports(plan: Plan) -> None:
    for i, port in enumerate(ports_of(plan)):
        subprocess.run(["ip", "link", "add", port, "type", "veth", "peer", "name", f"sgtp{i}"], check=True)


def snapshot(sock: nfnl.NfnlSocket, table: str) -> dict:
    """Everything the kernel holds of our two tables, as it reports it: handles (they
    number objects in the order they were made), a set's backend (newer kernels name
    it) and rule positions left out."""
    tkey = nfnl._attr(1, table.encode() + b"\0")
    out: dict = {}

    def attrs(body: bytes, drop: set[int]) -> list:
        return [(t, p) for t, p in nfnl_chains._attrs_of(body[4:]) if t not in drop]
    for fam in (BRIDGE, NETDEV):
        got = sock.request(nfnl_table.NFT_MSG_GETTABLE, fam, tkey, "table")
        out[fam, "table"] = None if got is None else attrs(got[0], {3, 4})  # handle, use count
        if got is None:
            continue
        out[fam, "sets"] = sorted(attrs(b, {16, 19, 20}) for b in sock.request(10, fam, tkey, "sets", dump=True) or [])
        out[fam, "chains"] = sorted(attrs(b, {2, 6}) for b in sock.request(4, fam, tkey, "chains", dump=True) or [])
        out[fam, "rules"] = [attrs(b, {3, 6}) for b in sock.request(7, fam, tkey, "rules", dump=True) or []]
        if fam == BRIDGE:
            for b in sock.request(10, fam, tkey, "sets", dump=True) or []:
                name = nfnl.parse_attrs(b, 4)[2][0].rstrip(b"\0").decode()
                out[fam, "elements", name] = Counter(nfnl_table.element_payloads(sock, table, name))
    return out


def check_same_as_libnftables(plan: Plan) -> None:
    """The plan written by libnftables, then by nfnl_table: the kernel holds the same."""
    sock = nfnl.NfnlSocket()
    nft = Nft()
    try:
        nft.run(replace_batch(plan), "the plan through libnftables")
        theirs = snapshot(sock, plan.table)
        batch, expected = nfnl_table.replace(plan)
        assert nfnl_table.problems(sock, expected) == [], "the read-back model must match libnftables' table"
        sock.send(batch)
        ours = snapshot(sock, plan.table)
        assert nfnl_table.problems(sock, expected) == []
    finally:
        sock.close()
    assert [k for k in theirs if theirs[k] != ours.get(k)] == [] and set(theirs) == set(ours)
    assert sum(len(v) for k, v in ours.items() if k[1] == "rules") == sum(1 for o in plan.nft if "rule" in o)
    # (an interval set holds a range as a start and an end element)
    assert sum(sum(c.values()) for k, c in ours.items() if k[1] == "elements") >= \
        sum(len(next(iter(o.values())).get("elem", [])) for o in plan.nft if "set" in o or "map" in o) > 0


@pytest.mark.parametrize("case", CASES)
def test_the_kernel_holds_what_libnftables_writes(ns, case, tmp_path):
    plan = full_plan(case, tmp_path, wide=case != "no-profiles")
    make_ports(plan)
    check_same_as_libnftables(plan)


def test_a_fleet_is_written_as_libnftables_writes_it(ns, tmp_path):
    from benchmarks import common as c
    from segguard.compile import compile_plan
    from segguard.config.validate import load_config

    c.write_fleet(tmp_path, 12)
    plan = compile_plan(load_config(tmp_path), c.facts(12))
    make_ports(plan)
    check_same_as_libnftables(plan)


def check_apply_road(plan: Plan, in_child: bool = False) -> None:
    applier = NftablesApplier()
    applier.in_child = in_child
    try:
        assert applier.apply(plan) is True
        assert applier.road == "nfnetlink", applier.unencodable
        assert applier.same(plan, applier.realized(plan.table)), "libnftables' listing must agree"
        assert applier.apply(plan) is False, "a second apply of the same plan sends nothing"
        assert applier.child_failure == ""
        assert applier.commits == 1, "one batch accepted (by the child, when forked), counted here"
    finally:
        applier.close()


@pytest.mark.parametrize("in_child", [False, True], ids=["in-process", "forked"])
def test_apply_takes_the_nfnetlink_road_and_libnftables_agrees(ns, tmp_path, in_child):
    plan = full_plan("lab-example", tmp_path)
    make_ports(plan)
    check_apply_road(plan, in_child)


def test_a_forked_apply_builds_the_batch_in_the_child_only(ns, tmp_path, monkeypatch):
    """The agent's road (in_child): the replace's batch and read-back are built by the
    forked child, never by the agent, whose heap they would otherwise leave at its
    peak. Counted here in the parent: the child's calls die with the child."""
    plan = full_plan("lab-example", tmp_path)
    make_ports(plan)
    built = []
    real = nfnl_table.replace
    monkeypatch.setattr(nfnl_table, "replace", lambda *a, **kw: built.append(a) or real(*a, **kw))
    applier = NftablesApplier()
    applier.in_child = True
    try:
        assert applier.apply(plan) is True and applier.road == "nfnetlink"
        assert built == [], "the agent's process encoded the batch itself"
        applier.in_child = False
        assert applier.apply(plan) is False, "the kernel holds the plan the child sent"
        assert len(built) == 1, "control: in process the batch is built here"
    finally:
        applier.close()


def test_a_forked_apply_whose_child_fails_is_done_in_process(ns, tmp_path, monkeypatch):
    """A child that cannot answer (fork refused, killed, unpicklable answer) must not
    leave the guests unguarded: the work is done in the agent's process instead, and
    the reason is kept for the agent's log."""
    import segguard.child

    plan = full_plan("lab-example", tmp_path)
    make_ports(plan)
    monkeypatch.setattr(segguard.child, "result_of_child", lambda fn: (False, "the child sent nothing (wait status 9)"))
    applier = NftablesApplier()
    applier.in_child = True
    try:
        assert applier.apply(plan) is True and applier.road == "nfnetlink"
        assert "wait status 9" in applier.child_failure
        applier.in_child = False
        assert applier.apply(plan) is False
    finally:
        applier.close()


def _tamper(nft: Nft, plan: Plan, what: str) -> None:
    t = plan.table
    port_set = next(o["set"] for o in plan.nft if "set" in o and o["set"]["name"] == "in_open4" and o["set"].get("elem"))
    cmd = {
        "element": {"delete": {"element": {"family": "bridge", "table": t, "name": "in_open4", "elem": [port_set["elem"][0]]}}},
        "rule": {"insert": {"rule": {"family": "bridge", "table": t, "chain": "forward", "expr": [{"accept": None}]}}},
        "chain": {"add": {"chain": {"family": "bridge", "table": t, "name": "left_behind"}}},
        "netdev": {"delete": {"chain": {"family": "netdev", "table": t, "name": ports_of_chain(plan)}}},
    }[what]
    nft.run({"nftables": [cmd]}, f"tamper: {what}")


def ports_of_chain(plan: Plan) -> str:
    return next(o["chain"]["name"] for o in plan.nft if "chain" in o and o["chain"]["family"] == "netdev")


@pytest.mark.parametrize("what", ["element", "rule", "chain", "netdev"])
def test_the_read_back_sees_tampering_and_apply_repairs_it(ns, tmp_path, what):
    check_tampering(full_plan("lab-example", tmp_path), what)


def check_tampering(plan: Plan, what: str) -> None:
    make_ports(plan)
    applier = NftablesApplier()
    sock = nfnl.NfnlSocket()
    try:
        assert applier.apply(plan) and applier.road == "nfnetlink"
        _batch, expected = nfnl_table.replace(plan)
        _tamper(applier.nft, plan, what)
        seen = nfnl_table.problems(sock, expected)
        assert seen, f"a changed {what} must be seen"
        assert applier.apply(plan) is True, "apply must see the change and replace the table"
        assert nfnl_table.problems(sock, expected) == []
    finally:
        sock.close()
        applier.close()


@pytest.mark.parametrize("in_child", [False, True], ids=["in-process", "forked"])
def test_a_refused_batch_leaves_the_previous_policy_whole(ns, tmp_path, in_child):
    plan = full_plan("lab-example", tmp_path)
    make_ports(plan)
    applier = NftablesApplier()
    applier.in_child = in_child
    assert applier.apply(plan)
    # a dispatch element that jumps to a chain no plan has: libnftables' child never
    # sees elements of the port-keyed maps, so only the kernel can refuse it
    bad = []
    for o in plan.nft:
        if "map" in o and o["map"]["name"] == "in_dispatch":
            m = dict(o["map"])
            m["elem"] = [*m.get("elem", []), ["vnet99", {"goto": {"target": "no_such_chain"}}]]
            o = {"map": m}
        bad.append(o)
    with pytest.raises(ApplyError) as info:
        applier.apply(Plan(plan.table, plan.stateful, plan.bindings, tuple(bad)))
    assert applier.road == "nfnetlink"
    assert "no_such_chain" in json.dumps(info.value.batch), "the error carries the equivalent libnftables JSON"
    assert info.value.kernel_error, "and what the kernel said"
    assert applier.apply(plan) is False, "the refused batch must have changed nothing"
    applier.close()


@pytest.mark.parametrize("in_child", [False, True], ids=["in-process", "forked"])
def test_what_the_road_does_not_encode_goes_through_libnftables(ns, tmp_path, in_child):
    plan = full_plan("lab-example", tmp_path)
    make_ports(plan)
    chain = ports_of_chain(plan)
    extra = {"rule": {"family": "netdev", "table": plan.table, "chain": chain,
                      "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "vnet7"}}, {"counter": None}]}}
    odd = Plan(plan.table, plan.stateful, plan.bindings, (*plan.nft, extra))
    applier = NftablesApplier()
    applier.in_child = in_child
    assert applier.apply(odd) and applier.road == "libnftables" and "iifname" in applier.unencodable
    assert applier.same(odd, applier.realized(plan.table))
    applier.close()


def test_a_rule_libnftables_encodes_otherwise_is_not_sent_as_guessed(ns, tmp_path, monkeypatch):
    """The guard on the direct encodings: one rule of each shape is learned from
    libnftables and must be byte for byte the direct one. A wrong comparison
    operator here (a mutation of nfnl_table._cmp) must not reach the kernel."""
    plan = full_plan("lab-example", tmp_path)
    make_ports(plan)
    real = nfnl_table._cmp.__wrapped__
    monkeypatch.setattr(nfnl_table, "_cmp", lambda op, value: real("!=" if op == "==" else "==", value))
    applier = NftablesApplier()
    assert applier.apply(plan)
    assert applier.road == "libnftables" and "otherwise" in applier.unencodable
    assert applier.same(plan, applier.realized(plan.table))
    applier.close()


def test_the_encoding_child_leaves_nothing_behind(ns, tmp_path):
    plan = full_plan("lab-example", tmp_path)
    make_ports(plan)
    nfnl_table._LEARNED.clear()
    nfnl_table.replace(plan)  # learns in a child's namespace, sends nothing
    assert Nft().tables() == set(), "the child's skeleton must not appear here"


def test_other_tables_neither_disturb_the_read_back_nor_are_touched(ns, tmp_path):
    """The kernel dumps every table's chains whatever the filter: another table's
    chains, sets and rules in both families are not ours to compare, nor to change."""
    plan = full_plan("lab-example", tmp_path)
    make_ports(plan)
    nft = Nft()
    foreign = []
    for fam in ("bridge", "netdev"):
        foreign += [{"add": {"table": {"family": fam, "name": "sgt_foreign"}}},
                    {"add": {"chain": {"family": fam, "table": "sgt_foreign", "name": "c"}}},
                    {"add": {"rule": {"family": fam, "table": "sgt_foreign", "chain": "c", "expr": [{"counter": None}, {"accept": None}]}}}]
    foreign.append({"add": {"set": {"family": "bridge", "table": "sgt_foreign", "name": "s", "type": "ipv4_addr", "elem": ["192.0.2.1"]}}})
    nft.run({"nftables": foreign}, "foreign tables")
    before = {f: nft.list_table("sgt_foreign", f) for f in ("bridge", "netdev")}
    check_apply_road(plan)
    assert {f: nft.list_table("sgt_foreign", f) for f in ("bridge", "netdev")} == before


@pytest.mark.parametrize("in_child", [False, True], ids=["in-process", "forked"])
def test_a_rebuild_rewrites_its_sets_and_their_chains_and_nothing_else(ns, tmp_path, in_child):
    check_rebuild(full_plan("lab-example", tmp_path), in_child)


def check_rebuild(wide: Plan, in_child: bool = False) -> None:
    """NftablesApplier.rebuild of the interval sets (how the agent collects leftovers)
    to fewer elements: afterwards the whole table is exactly the target plan; the
    partial read-back sees a changed element; a refused rebuild changes nothing."""
    from segguard.compile.policy import INTERVAL_SETS

    make_ports(wide)
    names = {o["set"]["name"] for o in wide.nft if "set" in o and o["set"]["name"] in INTERVAL_SETS}
    # every other element of each interval set goes (what a collection of leftovers does)
    target = Plan(wide.table, wide.stateful, wide.bindings, tuple(
        {"set": {**o["set"], "elem": o["set"]["elem"][::2]}} if "set" in o and o["set"]["name"] in names and o["set"].get("elem")
        else o for o in wide.nft))
    assert sum(len(o["set"].get("elem", [])) for o in target.nft if "set" in o and o["set"]["name"] in names) < \
        sum(len(o["set"].get("elem", [])) for o in wide.nft if "set" in o and o["set"]["name"] in names)
    applier = NftablesApplier()
    applier.in_child = in_child
    sock = nfnl.NfnlSocket()
    try:
        assert applier.apply(wide)
        applier.rebuild(target, names)
        # the whole table is now exactly the target: every set, chain and rule in order
        _batch, whole = nfnl_table.replace(target)
        assert nfnl_table.problems(sock, whole) == []
        assert applier.apply(target) is False

        # the partial read-back sees a changed element of a rebuilt set
        _batch, part = nfnl_table.replace(target, rebuild=names)
        assert part.partial and set(part.sets) == names and part.rules
        left = next(o["set"] for o in target.nft if "set" in o and o["set"]["name"] in names and o["set"].get("elem"))
        applier.nft.run({"nftables": [{"delete": {"element": {"family": "bridge", "table": target.table,
                                                               "name": left["name"], "elem": [left["elem"][0]]}}}]}, "tamper")
        assert nfnl_table.problems(sock, part) == [f"set {left['name']}: its elements differ"]
        applier.rebuild(target, names)
        assert nfnl_table.problems(sock, whole) == []

        # a rebuild the kernel refuses changes nothing
        bad = []
        for o in target.nft:
            if "map" in o and o["map"]["name"] == "in_dispatch":
                o = {"map": {**o["map"], "elem": [*o["map"].get("elem", []), ["vnet99", {"goto": {"target": "no_such_chain"}}]]}}
            bad.append(o)
        with pytest.raises(ApplyError) as info:
            applier.rebuild(Plan(target.table, target.stateful, target.bindings, tuple(bad)), names | {"in_dispatch"})
        assert nfnl_table.problems(sock, whole) == []
        assert "no_such_chain" in json.dumps(info.value.batch), "the error carries the equivalent libnftables JSON"

        # that JSON does what the rebuild does: replayed through libnftables on the
        # wide table, it leaves exactly the target
        assert applier.apply(wide)
        assert nfnl_table.problems(sock, whole) != []
        applier.nft.run(rebuild_batch(target, names | {"in_dispatch"}), "the rebuild as libnftables JSON")
        assert nfnl_table.problems(sock, whole) == []
        with pytest.raises(nfnl.Unencodable):
            nfnl_table.replace(target, rebuild={"no_such_set"})
    finally:
        sock.close()
        applier.close()


def test_a_rebuild_encoded_by_a_child_from_an_older_plan_and_caught_up_commits_the_newer(ns, tmp_path):
    """How the agent collects leftovers while taps keep coming (Reconciler.begin_collect):
    a forked child encodes the rebuild from the plan at its fork, binds and edits land
    meanwhile, and the commit carries the difference (nfnl_table.extend_rebuild). The
    whole table is then exactly the newer plan; the read-back expects the caught-up
    elements; a catch-up the kernel refuses changes nothing and carries its JSON."""
    from segguard.apply.incremental import LiveElements
    from segguard.child import fork_child
    from segguard.compile.policy import INTERVAL_SETS

    wide = full_plan("lab-example", tmp_path)
    make_ports(wide)
    names = {o["set"]["name"] for o in wide.nft if "set" in o and o["set"]["name"] in INTERVAL_SETS}
    name = next(o["set"]["name"] for o in wide.nft if "set" in o and o["set"]["name"] in names and len(o["set"].get("elem", ())) >= 3)
    elems = next(o["set"]["elem"] for o in wide.nft if "set" in o and o["set"]["name"] == name)

    def with_elems(plan: Plan, fn) -> Plan:
        return Plan(plan.table, plan.stateful, plan.bindings, tuple(
            {"set": {**o["set"], "elem": fn(o["set"]["name"], o["set"]["elem"])}} if "set" in o and o["set"]["name"] in names and o["set"].get("elem")
            else o for o in plan.nft))
    older = with_elems(wide, lambda n, e: e[::2])          # what the child encodes
    gone, came = elems[0], elems[1]                         # deleted and added meanwhile
    assert gone in elems[::2] and came not in elems[::2]
    newer = with_elems(older, lambda n, e: [x for x in e if x != gone] + [came] if n == name else e)
    specs = LiveElements.of(wide.nft).spec
    applier = NftablesApplier()
    sock = nfnl.NfnlSocket()
    try:
        assert applier.apply(wide)
        ok, answer = fork_child(lambda: applier.encode_rebuild(older, names)).answer()
        assert ok, answer
        batch, expected = answer
        nfnl_table.extend_rebuild(batch, expected, specs, [(name, [gone])], [(name, [came])])
        applier.commit_rebuild(newer.table, names, batch, expected, lambda: rebuild_batch(newer, names))
        _b, whole = nfnl_table.replace(newer)
        assert nfnl_table.problems(sock, whole) == []
        assert applier.apply(newer) is False
        # the read-back expected the caught-up elements: without them it differs
        _b, stale = nfnl_table.replace(older, rebuild=names)
        assert nfnl_table.problems(sock, stale) == [f"set {name}: its elements differ"]

        # a catch-up deleting what the encoded sets lack: refused, nothing changes
        batch, expected = applier.encode_rebuild(older, names)
        nfnl_table.extend_rebuild(batch, expected, specs, [(name, [elems[1]])], [])
        with pytest.raises(ApplyError) as info:
            applier.commit_rebuild(newer.table, names, batch, expected, lambda: rebuild_batch(newer, names))
        assert nfnl_table.problems(sock, whole) == []
        assert info.value.batch == rebuild_batch(newer, names) and info.value.kernel_error
    finally:
        sock.close()
        applier.close()


def test_holds_exactly_answers_from_dumps_and_diff_lists_only_when_it_says_no(ns, tmp_path, monkeypatch):
    plan = full_plan("lab-example", tmp_path)
    make_ports(plan)
    applier = NftablesApplier()
    try:
        assert not applier.holds_exactly(plan), "no table yet"
        assert applier.apply(plan)
        listed = []
        real = applier.realized
        monkeypatch.setattr(applier, "realized", lambda table: listed.append(table) or real(table))
        assert applier.holds_exactly(plan) and applier.diff(plan).empty
        assert listed == [], "an exact table is told from dumps, not from a listing"
        _tamper(applier.nft, plan, "element")
        assert not applier.holds_exactly(plan)
        d = applier.diff(plan)
        assert listed == [plan.table] and [o["set"]["name"] for o in d.missing] == ["in_open4"], d.describe()
        assert not NftablesApplier(nfnetlink=False).holds_exactly(plan), "the libnftables road lists"
    finally:
        applier.close()
