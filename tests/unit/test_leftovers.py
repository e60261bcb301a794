"""An unbind's interval-set deletes, deferred (apply/incremental.py `settle_leftovers`),
pure: what the kernel would hold after each step is the LiveElements view, compared
with fresh compiles. A leftover must never sit behind a dispatch element: a port bound
again gets exactly its new guest's elements in the bind's own transaction."""
from __future__ import annotations

import dataclasses
import shutil

import pytest

from segguard.apply.incremental import (LiveElements, catch_up_delta, collect_delta, in_force_elements, rebind_delta,
                                        record_collected, record_leftovers, settle_leftovers, without_leftovers)
from segguard.apply.nftables import Fingerprint
from segguard.compile import compile_plan
from segguard.compile.bind import tap_mac
from segguard.compile.nft import compile_nft
from segguard.compile.policy import INTERVAL_SETS
from segguard.config.validate import load_config
from segguard.host import PortFact
from tests.unit.test_agent_reconcile import facts
from tests.unit.test_compile import LAB

PORT = "vnet19"


def _profile(name: str, mac: str, ip: str, ports: str) -> str:
    return f"""name: {name}
bridge: br0
vlan: 30
guests:
  - name: {name}-1
    mac: "{mac}"
    ipv4: [{ip}]
block: {{internet: true, domain: true}}
egress:
  - {{to: historian_db, proto: udp, ports: [514]}}
  - {{to: historian_db, proto: tcp, ports: ["{ports}"]}}
default: deny
mode: enforce
"""


NEW, OTHER = ("newvm", "52:54:00:aa:00:09", "10.30.0.19", "5000-5099"), ("othervm", "52:54:00:aa:00:0a", "10.30.0.21", "6000-6099")


@pytest.fixture
def config(tmp_path):
    d = tmp_path / "cfg"
    shutil.copytree(LAB, d)
    for name, mac, ip, ports in (NEW, OTHER):
        (d / "profiles" / f"{name}.yaml").write_text(_profile(name, mac, ip, ports))
    return load_config(d)


def _on_port(who):
    return facts(PortFact(PORT, tap_mac(who[1])))


def _sub(config, guest):
    return dataclasses.replace(config, profiles=tuple(lp for lp in config.profiles if any(g.name == guest for g in lp.profile.guests)))


def _step(config, live, table_plan, f_before, f_after, guest):
    """The agent's bind road for one guest: slices before/after, the delta, settled,
    committed (live.apply + record_leftovers, as Reconciler._send does)."""
    p_b, p_a = compile_plan(config, f_before), compile_plan(config, f_after)
    sub = _sub(config, guest)
    d = rebind_delta(compile_nft(sub, f_before, [p_b.binding(guest)], p_b.stateful, p_b.table),
                     compile_nft(sub, f_after, [p_a.binding(guest)], p_a.stateful, p_a.table), live)
    sent, deferred, settled, kept = settle_leftovers(d, live)
    live.apply(sent)
    record_leftovers(live, deferred, settled)
    return d, sent, deferred, kept, p_a


def _view(live, plan):
    return Fingerprint.of(live.objects(plan.nft, plan.table))


def _port_elems(plan, name):
    body = next(o["set"] for o in plan.nft if "set" in o and o["set"]["name"] == name)
    return [e for e in body.get("elem", []) if e["concat"][0] == PORT]


def _newvm_bound_and_unbound(config):
    """The empty plan, and the kernel's view after newvm was bound to PORT and unbound:
    its range left behind."""
    none = facts()
    p0 = compile_plan(config, none)
    live = LiveElements.of(p0.nft)
    _step(config, live, p0, none, _on_port(NEW), "newvm-1")
    _step(config, live, p0, _on_port(NEW), none, "newvm-1")
    return p0, live


def _no_leftover_behind_a_dispatch(live):
    for port in live.leftover:
        assert f'"{port}"' not in live.elems["out_dispatch"] and f'"{port}"' not in live.elems["in_dispatch"], port


def test_an_unbind_leaves_only_interval_elements_and_a_collection_removes_them(config):
    none = facts()
    p0 = compile_plan(config, none)
    live = LiveElements.of(p0.nft)
    _step(config, live, p0, none, _on_port(NEW), "newvm-1")
    p1 = compile_plan(config, _on_port(NEW))
    assert _view(live, p0) == Fingerprint.of(list(p1.nft))
    range_elem = _port_elems(p1, "out_open4")
    assert range_elem == [{"concat": [PORT, "10.30.0.20", "tcp", {"range": [5000, 5099]}]}]

    d, sent, deferred, kept, _ = _step(config, live, p0, _on_port(NEW), none, "newvm-1")
    # the delta deletes the range element; what is sent leaves it, and only it
    assert ("out_open4", tuple(range_elem)) in d.delete
    assert dict(sent.delete)["out_open4"] == ()
    assert deferred == {PORT: {"out_open4": range_elem}} and kept == []
    assert all(not elems for name, elems in sent.delete if name in INTERVAL_SETS)
    # every other object is exactly the unbound plan's: dispatch, identity, hash sets
    want = LiveElements.of(p0.nft)
    for name, elems in live.elems.items():
        extra = {k for k in elems if k not in want.elems[name]}
        assert extra == (set(range_elem) if name == "out_open4" else set()), name
        assert set(want.elems[name]) <= set(elems), name
    assert live.leftover == {PORT: {"out_open4": range_elem}}
    _no_leftover_behind_a_dispatch(live)

    gc = collect_delta(live, [PORT])
    live.apply(gc)
    del live.leftover[PORT]
    assert _view(live, p0) == Fingerprint.of(list(p0.nft))


def test_the_same_guest_bound_again_keeps_its_leftovers_and_holds_exactly_its_plan(config):
    none = facts()
    p0, live = _newvm_bound_and_unbound(config)
    d, sent, deferred, kept, p1 = _step(config, live, p0, none, _on_port(NEW), "newvm-1")
    assert kept == [("out_open4", _port_elems(p1, "out_open4")[0])]
    assert dict(sent.add)["out_open4"] == ()  # not re-added: it is there
    assert deferred == {} and live.leftover == {}
    assert _view(live, p0) == Fingerprint.of(list(p1.nft))


def test_another_guest_on_the_port_name_gets_only_its_own_elements_in_the_binds_transaction(config):
    """The fail-open case the settle exists for: without it, othervm's port would keep
    newvm's tcp 5000-5099 allow."""
    none = facts()
    p0, live = _newvm_bound_and_unbound(config)
    old = _port_elems(compile_plan(config, _on_port(NEW)), "out_open4")
    d, sent, deferred, kept, p2 = _step(config, live, p0, none, _on_port(OTHER), "othervm-1")
    assert p2.binding("othervm-1").port == PORT
    assert tuple(old) == dict(sent.delete)["out_open4"]  # deleted with the bind, not later
    assert kept == [] and deferred == {} and live.leftover == {}
    assert _view(live, p0) == Fingerprint.of(list(p2.nft))
    assert _port_elems(p2, "out_open4") == [{"concat": [PORT, "10.30.0.20", "tcp", {"range": [6000, 6099]}]}]


def test_a_bound_ports_interval_deletes_are_never_deferred(config, tmp_path):
    """A profile edit that narrows a bound guest's range: the old element is an allow
    the guest must lose now."""
    f = _on_port(NEW)
    p1 = compile_plan(config, f)
    live = LiveElements.of(p1.nft)
    edited_dir = config.directory
    (edited_dir / "profiles" / "newvm.yaml").write_text(_profile(*NEW[:3], "5000-5049"))
    edited = load_config(edited_dir)
    p2 = compile_plan(edited, f)
    b = [p1.binding("newvm-1")]
    d = rebind_delta(compile_nft(_sub(config, "newvm-1"), f, b, p1.stateful, p1.table),
                     compile_nft(_sub(edited, "newvm-1"), f, b, p1.stateful, p1.table), live)
    sent, deferred, settled, kept = settle_leftovers(d, live)
    assert deferred == {} and sent == d
    live.apply(sent)
    assert _view(live, p1) == Fingerprint.of(list(p2.nft))


def test_status_strips_only_leftovers_no_dispatch_reaches(config):
    """`segguard status` leaves out what the agent says it left, judged on the listing
    itself: an element of a port that still has a dispatch element stays drift."""
    from segguard.apply.incremental import strip_inert_leftovers

    p1 = compile_plan(config, _on_port(NEW))
    live = LiveElements.of(compile_plan(config, facts()).nft)
    _step(config, live, None, facts(), _on_port(NEW), "newvm-1")
    _step(config, live, None, _on_port(NEW), facts(), "newvm-1")
    p0 = compile_plan(config, facts())
    listing = live.objects(p0.nft, p0.table)
    stripped, n = strip_inert_leftovers(listing, [PORT])
    assert n == 1 and Fingerprint.of(stripped) == Fingerprint.of(list(p0.nft))
    # the same element behind a dispatch element (the agent's list is stale, or lies)
    bound = list(p1.nft)
    assert strip_inert_leftovers(bound, [PORT]) == (bound, 0)
    assert strip_inert_leftovers(listing, ["vnet99"]) == (listing, 0)


# ---- a collection encoded from an older view, caught up in its own commit ------------
#
# The agent has a child encode the rebuild that deletes the leftovers while taps keep
# being bound (Reconciler.begin_collect / finish_collect). What the kernel holds after
# the commit is the rebuild's sets (the view when the child forked) changed by
# catch_up_delta; it must be what the agent then records, and that a fresh compile.

B = "vnet21"


def _ports(*who_port):
    return facts(*(PortFact(port, tap_mac(who[1])) for who, port in who_port))


def _interval_leftover_sets(live):
    return {name for by_set in live.leftover.values() for name, elems in by_set.items() if elems}


def _commit_collection(live, before, ports):
    """The kernel's side, strictly: a delete of an element the rebuilt set lacks, or an
    add of one it holds, would make the kernel refuse the batch."""
    delta = catch_up_delta(live, before, ports)
    kernel = {name: dict(elems) for name, elems in before.items()}
    for name, gone in delta.delete:
        for e in gone:
            del kernel[name][e]
    for name, new in delta.add:
        for e in new:
            assert e not in kernel[name], (name, e)
            kernel[name][e] = e
    record_collected(live, set(before), ports)
    for name, held in kernel.items():
        assert set(held) == set(live.elems[name]), name
    return delta


def _range(port, lo, hi):
    return {"concat": [port, "10.30.0.20", "tcp", {"range": [lo, hi]}]}


def test_a_collection_caught_up_with_a_bind_of_its_port_name_to_another_guest(config):
    none = facts()
    p0, live = _newvm_bound_and_unbound(config)
    ports, names = list(live.leftover), _interval_leftover_sets(live)
    before = in_force_elements(live, names)
    assert ports == [PORT] and _range(PORT, 5000, 5099) not in before["out_open4"].values()
    # while the child encodes: othervm on the same port name (its bind settles newvm's range)
    *_, p2 = _step(config, live, p0, none, _on_port(OTHER), "othervm-1")
    delta = _commit_collection(live, before, ports)
    assert dict(delta.add)["out_open4"] == (_range(PORT, 6000, 6099),) and not any(e for _, e in delta.delete)
    assert live.leftover == {} and _view(live, p0) == Fingerprint.of(list(p2.nft))


def test_a_collection_caught_up_with_a_bound_ports_delete_and_a_later_unbind(config):
    """vnet21 goes from othervm to newvm while the child encodes (newvm's bind deletes
    othervm's range, left by its unbind): that range is in the encoded sets and must be
    deleted again (an allow behind newvm's dispatch), and newvm's range added. Then a
    port unbound after a collection was encoded is not collected: its range stays a
    leftover of its own."""
    none = facts()
    p0, live = _newvm_bound_and_unbound(config)
    _step(config, live, p0, none, _ports((OTHER, B)), "othervm-1")
    ports, names = list(live.leftover), _interval_leftover_sets(live)
    before = in_force_elements(live, names)
    assert _range(B, 6000, 6099) in before["out_open4"].values()
    _step(config, live, p0, _ports((OTHER, B)), none, "othervm-1")
    assert set(live.leftover) == {PORT, B}
    *_, p3 = _step(config, live, p0, none, _ports((NEW, B)), "newvm-1")
    assert set(live.leftover) == {PORT}  # vnet21's settled by newvm's bind
    delta = _commit_collection(live, before, ports)
    assert dict(delta.delete)["out_open4"] == (_range(B, 6000, 6099),)
    assert dict(delta.add)["out_open4"] == (_range(B, 5000, 5099),)
    assert live.leftover == {} and _view(live, p0) == Fingerprint.of(list(p3.nft))

    # an unbind after the encoding: not among the collected, its elements stay, inert
    _step(config, live, p0, none, _ports((OTHER, PORT)), "othervm-1")
    _step(config, live, p0, _ports((OTHER, PORT)), none, "othervm-1")
    ports, names = list(live.leftover), _interval_leftover_sets(live)
    assert ports == [PORT]
    before = in_force_elements(live, names)
    _step(config, live, p0, _ports((NEW, B)), none, "newvm-1")  # unbound after the fork
    delta = _commit_collection(live, before, ports)
    assert not any(e for _, e in delta.add) and not any(e for _, e in delta.delete)
    assert set(live.leftover) == {B} and _range(B, 5000, 5099) in live.elems["out_open4"].values()
    assert Fingerprint.of(without_leftovers(live).objects(p0.nft, p0.table)) == Fingerprint.of(list(p0.nft))
