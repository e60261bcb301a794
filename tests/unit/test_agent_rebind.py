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



def test_a_binds_read_back_skips_only_what_fails_closed():
    """What a bind leaves to the next whole-table check must be only objects whose
    missing element drops more: the dispatch maps and the MAC sets are always read back."""
    from segguard.apply.incremental import ELEMENT_OBJECTS, FAILS_CLOSED
    from segguard.compile.nft import compile_nft  # noqa: F401  (the rules below are compile/nft.py's)

    config = load_config(LAB)
    plan = compile_plan(config, facts(PortFact("vnet8", "fe:54:00:aa:00:02")))
    assert {"out_dispatch", "in_dispatch", "nd_dispatch", "legacy_macs"} <= set(ELEMENT_OBJECTS) - FAILS_CLOSED
    for o in plan.nft:
        rule = o.get("rule")
        if not rule:
            continue
        for e in rule["expr"]:
            m = e.get("match")
            if m and isinstance(m.get("right"), str) and m["right"][1:] in FAILS_CLOSED:
                # a lookup in such a set either drops on a miss (!=; audit: logs; or
                # the MAC guard's verdict, which drops or logs) or accepts on a hit
                # (==; or enters a fast-path chain, whose rules only accept, and whose
                # miss takes the full walk)
                verdict = rule["expr"][-1]
                audit = any("log" in x for x in rule["expr"])
                guard = verdict == {"vmap": {"key": {"payload": {"protocol": "ether", "field": "saddr"}}, "data": "@legacy_macs"}}
                fast = verdict.get("jump", {}).get("target", "")
                if fast:
                    assert fast.endswith(("_fast4", "_fast6")), rule
                    assert all(r["rule"]["expr"][-1] == {"accept": None} for r in plan.nft
                               if r.get("rule", {}).get("chain") == fast), fast
                assert (m["op"] == "!=" and ("drop" in verdict or audit or guard)) or (
                    m["op"] == "==" and ("accept" in verdict or fast)), rule


def test_a_sets_canonical_key_is_its_sorted_encoding_whatever_its_keys():
    """The fast encoding of a set (each element encoded once) must equal the general
    one, including for a listing with keys that sort before "elem"."""
    import json

    from segguard.apply.nftables import _dumps, canonical_key

    for extra in ({}, {"comment": "x", "auto-merge": True}, {"flags": ["interval"], "handle": 7}):
        o = {"set": {"family": "bridge", "table": "t", "name": "s", "type": ["ifname", "ipv4_addr"],
                     "elem": [{"concat": ["b", "1.2.3.4"]}, {"concat": ["a", {"prefix": {"addr": "10.0.0.0", "len": 8}}]}], **extra}}
        body = {k: v for k, v in o["set"].items() if k != "handle"}
        body["elem"] = sorted(body["elem"], key=_dumps)
        assert canonical_key(o) == _dumps({"set": body})
        json.loads(canonical_key(o))
