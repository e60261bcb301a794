"""The agent's one-binding road, pure: a slice compiled for the changed guest only gives
the same element delta and the same resulting table as the whole-plan compile; the
nftables monitor tells our own commits from foreign ones by NEWGEN's pid."""
from __future__ import annotations

import dataclasses
import struct

from segguard.agent.events import newgen_pids
from segguard.apply.incremental import LiveElements, rebind_delta
from segguard.apply.nftables import Fingerprint
from segguard.compile import compile_plan
from segguard.compile.nft import compile_nft
from segguard.config.validate import load_config
from tests.unit.test_agent_reconcile import facts
from tests.unit.test_compile import LAB
from segguard.host import PortFact


def _sub(config, guest):
    profs = []
    for lp in config.profiles:
        mine = [g for g in lp.profile.guests if g.name == guest]
        if mine:
            profs.append(dataclasses.replace(lp, profile=lp.profile.model_copy(update={"guests": mine})))
    return dataclasses.replace(config, profiles=tuple(profs))


def test_slice_delta_turns_the_whole_plan_into_the_next_one():
    config = load_config(LAB)
    f0, f1 = facts(), facts(PortFact("vnet8", "fe:54:00:aa:00:02"))
    p0, p1 = compile_plan(config, f0), compile_plan(config, f1)
    g = "scada-line4-srv"
    sub = _sub(config, g)
    before = compile_nft(sub, f0, [p0.binding(g)], p0.stateful, p0.table)
    after = compile_nft(sub, f1, [p1.binding(g)], p1.stateful, p1.table)
    live = LiveElements.of(p0.nft)
    d = rebind_delta(before, after, live)
    assert d is not None and not d.empty
    assert [c for c in d.port_chains_add if "chain" in c][0]["chain"]["name"] == "in_vnet8"
    live.apply(d)
    assert Fingerprint.of(live.objects(p0.nft, p0.table)) == Fingerprint.of(list(p1.nft))
    # and back: the port chain goes, the netdev table only if no other chain is left
    back = rebind_delta(after, before, live)
    live.apply(back)
    assert back.port_chains_delete == ("in_vnet8",)
    assert Fingerprint.of(live.objects(p0.nft, p0.table)) == Fingerprint.of(list(p0.nft))


def _newgen(pid: int | None) -> bytes:
    attrs = struct.pack("=HHI", 8, 1, 0)  # NFTA_GEN_ID
    if pid is not None:
        attrs += struct.pack("=HH", 8, 2) + struct.pack(">I", pid)
    body = struct.pack("=BBH", 0, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | 15, 0, 0, 0) + body


def test_newgen_names_the_committing_pid_and_other_messages_are_skipped():
    newrule = struct.pack("=IHHII", 20, (10 << 8) | 6, 0, 0, 0) + b"\0" * 4
    assert newgen_pids(newrule + _newgen(4242)) == [4242]
    assert newgen_pids(_newgen(None)) == [None]
    assert newgen_pids(newrule) == []


def test_point_lookup_read_back_renders_elements_as_nft_prints_them_and_refuses_the_rest():
    """The agent reads back the elements it wrote by `get element` (a text command):
    the rendering must match what nft prints (answers copied from libnftables 1.0.6),
    and anything that is not a plain name, address or number is never put in a command."""
    from segguard.apply.incremental import _returned, _text_elem

    assert _text_elem("out_open4", "set", {"concat": ["vnet8", {"prefix": {"addr": "192.0.3.0", "len": 24}}, "tcp", {"range": [1030, 1035]}]}) \
        == '"vnet8" . 192.0.3.0/24 . tcp . 1030-1035'
    assert _text_elem("out_open6", "set", {"concat": ["vnet1", {"range": ["2001:db8::1", "2001:db8::9"]}, "udp", {"range": [1, 1024]}]}) \
        == '"vnet1" . 2001:db8::1-2001:db8::9 . udp . 1-1024'
    assert _text_elem("bound_ports", "set", {"concat": ["52:54:00:00:00:01", "vnet1"]}) == '52:54:00:00:00:01 . "vnet1"'
    assert _text_elem("port_types", "set", {"concat": ["vnet1", "ip6"]}) == '"vnet1" . ip6'
    assert _text_elem("out_dispatch", "map", ["vnet1", {"goto": {"target": "gx"}}]) == '"vnet1" : goto gx'
    assert _text_elem("out_dispatch", "map", "vnet1", key_only=True) == '"vnet1"'
    # hostile or unknown shapes: no command at all (the caller lists the set instead)
    assert _text_elem("port_ip4", "set", {"concat": ['vnet"}; flush ruleset; #', "10.0.0.1"]}) is None
    assert _text_elem("port_ip4", "set", {"concat": ["vnet1 x", "10.0.0.1"]}) is None
    assert _text_elem("no_such_set", "set", "vnet1") is None
    assert _text_elem("port_ip4", "set", {"concat": ["vnet1"]}) is None  # wrong arity
    answer = ('table bridge t {\n\tset open4 {\n\t\ttype ifname . ipv4_addr . inet_proto . inet_service\n\t\tflags interval\n'
              '\t\telements = { "vnet5" . 192.0.3.0/24 . tcp . 1030-1035,\n\t\t\t     "vnet6" . 192.0.3.0/24 . tcp . 1030-1035 }\n\t}\n}\n')
    assert _returned(answer) == {'"vnet5" . 192.0.3.0/24 . tcp . 1030-1035', '"vnet6" . 192.0.3.0/24 . tcp . 1030-1035'}
    assert _returned("") == set()
