"""The full replace over nfnetlink (segguard/apply/nfnl_table.py) on Debian's 6.1
kernel, and with the stateful plan (`ct state` rules) the host kernel cannot load:
the kernel holds what libnftables writes for the same plan, NftablesApplier takes
that road, the read-back sees tampering and apply repairs it, and a rebuild of the
interval sets leaves exactly the target plan."""
from __future__ import annotations

import pytest

from tests.netns import test_nfnl_table as t

pytestmark = pytest.mark.kernel_lab
ns = t.ns  # the same namespace fixture


@pytest.mark.parametrize("case", ["stateful", "lab-example", "audit-mode"])
def test_the_lab_kernel_holds_what_libnftables_writes(ns, case, tmp_path):
    plan = t.full_plan(case, tmp_path)
    assert plan.stateful == (case == "stateful")
    t.make_ports(plan)
    t.check_same_as_libnftables(plan)


@pytest.mark.parametrize("in_child", [False, True], ids=["in-process", "forked"])
def test_apply_takes_the_nfnetlink_road_on_the_lab_kernel(ns, tmp_path, in_child):
    plan = t.full_plan("stateful", tmp_path)
    t.make_ports(plan)
    t.check_apply_road(plan, in_child)


@pytest.mark.parametrize("what", ["element", "rule", "netdev"])
def test_tampering_is_seen_and_repaired_on_the_lab_kernel(ns, tmp_path, what):
    t.check_tampering(t.full_plan("lab-example", tmp_path), what)


@pytest.mark.parametrize("in_child", [False, True], ids=["in-process", "forked"])
def test_a_rebuild_leaves_exactly_the_target_plan_on_the_lab_kernel(ns, tmp_path, in_child):
    plan = t.full_plan("stateful", tmp_path)
    assert plan.stateful
    t.check_rebuild(plan, in_child)
