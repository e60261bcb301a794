"""Golden plans: config + host facts in, the expected plan out, reviewed as files.

Compares only; regenerating is an explicit, reviewed step:
    python -m tests.golden.regen [case ...]     (see tests/golden/README.md)
"""
from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest

from tests.golden.regen import GOLDEN, cases, compile_case, diff

REPO = GOLDEN.parents[1]
EXPECTED_CASES = {"lab-example", "stateful", "audit-mode", "unbound-guest", "no-profiles"}


def test_all_cases_present():
    assert EXPECTED_CASES <= {c.name for c in cases()}


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_golden_plan(case: Path):
    expected_file = case / "plan.json"
    assert expected_file.is_file(), f"{case.name}: no plan.json; run python -m tests.golden.regen {case.name} and review it"
    expected = expected_file.read_text()
    actual = compile_case(case)
    if actual != expected:
        pytest.fail(f"compiled plan differs from {expected_file.relative_to(REPO)}; if the change is intended run "
                    f"`python -m tests.golden.regen {case.name}` and review the diff:\n"
                    + diff(expected, actual, case.name), pytrace=False)


def test_lab_example_is_a_copy_of_the_shipped_example():
    """profiles/lab is what users copy; its golden must follow it (copy it over, regen)."""
    ours, shipped = GOLDEN / "lab-example" / "config", REPO / "profiles" / "lab"
    names = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert names(ours) == names(shipped)
    mismatch = filecmp.cmpfiles(shipped, ours, names(shipped), shallow=False)[1]
    assert not mismatch, f"tests/golden/lab-example/config differs from profiles/lab in {mismatch}"


def test_facts_files_are_canonical():
    """facts.json is what HostFacts.to_json writes, so a facts dump from a host drops in."""
    from segguard.host import HostFacts

    for case in cases():
        text = (case / "facts.json").read_text()
        assert HostFacts.from_dict(json.loads(text)).to_json() == text, case.name


def test_golden_cases_say_what_they_show():
    plans = {c.name: json.loads((c / "plan.json").read_text()) for c in cases() if (c / "plan.json").exists()}
    assert plans["stateful"]["stateful"] is True and plans["lab-example"]["stateful"] is False
    assert {b["source"] for b in plans["lab-example"]["bindings"]} == {"profile", "tap-mac"}
    assert [b["source"] for b in plans["unbound-guest"]["bindings"]] == ["unbound"]
    assert "audit" in {b["mode"] for b in plans["audit-mode"]["bindings"]}
    assert plans["no-profiles"]["bindings"] == [] and not any("rule" in o and o["rule"]["chain"].startswith(("pout_", "pin_", "out_"))
                                                            for o in plans["no-profiles"]["nft"])
