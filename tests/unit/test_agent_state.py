"""The agent's applied-plan file is written in pieces (its whole text had been the
agent's memory peak at start); the pieces must join to exactly what json.dumps writes,
which `status`, the libvirt hook and flow.read_applied parse."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from segguard import plan as plan_module
from segguard.agent.state import plan_from_dict, write_applied
from segguard.plan import compact_json as applied_json

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _whole(plan) -> str:
    return json.dumps(plan.to_dict(), separators=(",", ":")) + "\n"


@pytest.mark.parametrize("case", sorted(p.parent.name for p in GOLDEN.glob("*/plan.json")))
def test_the_pieces_join_to_json_dumps_for_every_golden_plan(case):
    plan = plan_from_dict(json.loads((GOLDEN / case / "plan.json").read_text()))
    assert plan.nft
    assert "".join(applied_json(plan)) == _whole(plan)


class _Big:
    """A plan's dict with more objects than one piece holds and a key after nft."""

    def __init__(self, n: int):
        self.d = {"table": "segguard", "stateful": False, "bindings": [{"guest": "g", "ipv4": ["10.0.0.1"]}],
                  "warnings": ["w\u00e9"], "nft": [{"rule": {"chain": "c", "expr": [{"accept": None}], "n": i}} for i in range(n)],
                  "vlans": [{"port": "vnet0", "pvid": 30}]}

    def to_dict(self):
        return self.d


@pytest.mark.parametrize("n", [0, 1, plan_module._CHUNK - 1, plan_module._CHUNK, plan_module._CHUNK + 1, 3 * plan_module._CHUNK + 7])
def test_the_pieces_join_to_json_dumps_across_piece_boundaries(n):
    big = _Big(n)
    text = "".join(applied_json(big))
    assert text == _whole(big)
    assert json.loads(text) == big.d


def test_write_applied_writes_the_joined_text(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGGUARD_STATE", str(tmp_path))
    plan = plan_from_dict(json.loads((GOLDEN / "lab-example" / "plan.json").read_text()))
    write_applied(plan)
    [written] = tmp_path.rglob("applied.json")
    assert written.read_text() == _whole(plan)
    assert not list(tmp_path.rglob("*.tmp.*"))
