"""The nfnetlink element road (segguard/apply/nfnl.py) on Debian's 6.1 kernel, the
oldest this project runs on, and with the stateful plan the host kernel cannot load:
every port-keyed element is held as we encode it, a delete + re-add of all of them
leaves the table exact, and the key-by-key read-back sees tampering."""
from __future__ import annotations

import pytest

from tests.netns import test_nfnl as nfnl_tests

pytestmark = pytest.mark.kernel_lab
ns = nfnl_tests.ns  # the same namespace fixture


def test_the_stateful_plan_is_what_runs_here():
    from segguard.host.netlink import _bridge_conntrack_available

    assert _bridge_conntrack_available(), "the lab kernel has nf_conntrack_bridge"


@pytest.mark.parametrize("case", ["stateful", "lab-example"])
def test_encodings_hold_on_the_lab_kernel(ns, case, tmp_path):
    nfnl_tests.check_encodings(case, tmp_path)


@pytest.mark.parametrize("case", ["stateful", "lab-example"])
def test_delete_and_re_add_on_the_lab_kernel(ns, case, tmp_path):
    nfnl_tests.check_round_trip(case, tmp_path)


@pytest.mark.parametrize("case", ["stateful", "lab-example"])
def test_read_back_on_the_lab_kernel(ns, case):
    nfnl_tests.check_read_back(case)
