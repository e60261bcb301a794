"""A plan keeps concatenation elements as `Concat` (plan.py says why); the kernel's
listing gives them as JSON dicts. Both forms must be one element to every comparison,
and no JSON may be written from a Concat except as its JSON form."""
from __future__ import annotations

import copy
import json
import pickle

import pytest

from segguard.apply.incremental import LiveElements, element_delta
from segguard.apply.nftables import Fingerprint, canonical_key, diff_objects, replace_batch
from segguard.compile import compile_plan
from segguard.host import PortFact
from segguard.plan import Concat, jsonable
from tests.unit.test_agent_reconcile import facts

RANGED = Concat(("vnet7", {"prefix": {"addr": "10.40.0.0", "len": 16}}, "tcp", {"range": [1000, 1100]}))
EXACT = Concat(("vnet7", "10.30.0.20", "tcp", 1433))


def as_listed(obj):
    """An object as libnftables lists it: JSON, parsed."""
    return json.loads(json.dumps(obj, default=jsonable))


def test_a_concat_equals_its_json_form_and_nothing_else():
    for c in (RANGED, EXACT):
        listed = as_listed(c)
        assert listed == {"concat": list(c.parts)}
        assert c == listed and listed == c and [c] == [listed]
        assert Concat.of(listed) == c and hash(Concat.of(listed)) == hash(c)
    assert EXACT != {"concat": ["vnet7", "10.30.0.20", "tcp", 1434]}
    assert EXACT != {"concat": list(EXACT.parts), "other": 1}
    assert EXACT != list(EXACT.parts) and EXACT != EXACT.parts
    assert Concat.of("vnet7") is None and Concat.of({"prefix": {"addr": "10.0.0.0", "len": 8}}) is None


def test_json_without_jsonable_refuses_a_concat_rather_than_writing_a_list():
    with pytest.raises(TypeError):
        json.dumps({"elem": [EXACT]})
    assert json.loads(json.dumps({"elem": [EXACT]}, default=jsonable)) == {"elem": [{"concat": list(EXACT.parts)}]}


def test_pickle_and_deepcopy_keep_a_concat():
    for c in (RANGED, EXACT):
        for back in (pickle.loads(pickle.dumps(c, protocol=pickle.HIGHEST_PROTOCOL)), copy.deepcopy(c)):
            assert type(back) is Concat and back == c and back.parts == c.parts


def test_a_compiled_plan_and_its_listing_compare_as_one_table():
    from segguard.config.validate import load_config
    from tests.unit.test_compile import LAB

    plan = compile_plan(load_config(LAB), facts(PortFact("vnet8", "fe:54:00:aa:00:02")))
    held = [o for o in plan.nft if "set" in o and any(type(e) is Concat for e in o["set"].get("elem", ()))]
    assert held, "the lab plan holds concatenation elements"
    listed = as_listed(list(plan.nft))
    json.dumps(listed)  # plain JSON: no Concat left in the listing's form
    assert [canonical_key(o) for o in plan.nft] == [canonical_key(o) for o in listed]
    assert Fingerprint.of(list(plan.nft)) == Fingerprint.of(listed)
    assert diff_objects(list(plan.nft), listed).empty
    assert element_delta(list(plan.nft), listed).empty
    # the batch libnftables gets is the listing's JSON
    assert as_listed(replace_batch(plan)["nftables"][-len(listed):]) == [{"add": o} for o in listed]
    # what the agent records as held is keyed the same from either form
    a, b = LiveElements.of(plan.nft), LiveElements.of(listed)
    assert a.elems.keys() == b.elems.keys()
    for name in a.elems:
        assert set(a.elems[name]) == set(b.elems[name]), name


def test_one_listed_element_missing_is_found_in_either_form():
    from segguard.config.validate import load_config
    from tests.unit.test_compile import LAB

    plan = compile_plan(load_config(LAB), facts(PortFact("vnet8", "fe:54:00:aa:00:02")))
    listed = as_listed(list(plan.nft))
    for o in listed:
        if "set" in o and o["set"]["name"] == "out_open4_x" and o["set"].get("elem"):
            gone = o["set"]["elem"].pop()
            break
    else:
        pytest.fail("no out_open4_x element in the lab plan")
    d = element_delta(list(plan.nft), listed)
    assert dict(d.add)["out_open4_x"] == (gone,) and not any(e for _, e in d.delete)
    assert not diff_objects(list(plan.nft), listed).empty
