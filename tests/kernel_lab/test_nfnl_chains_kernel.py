"""A bind's netdev port chains over nfnetlink (segguard/apply/nfnl_chains.py) on
Debian's 6.1 kernel: held byte for byte as libnftables writes them, read back, one
batch with the bind's elements, and the unbind of a tap whose device is gone (6.1
deletes a single-device netdev chain with its device; the host's 6.18 keeps it)."""
from __future__ import annotations

import pytest

from tests.netns import test_nfnl_chains as chain_tests

pytestmark = pytest.mark.kernel_lab
ns = chain_tests.ns  # the same namespace fixture, with the golden configs' ports


@pytest.mark.parametrize("case", chain_tests.CASES)
def test_port_chains_are_held_as_libnftables_writes_them_on_the_lab_kernel(ns, case):
    chain_tests.check_same_as_libnftables(case)


def test_port_chain_read_back_on_the_lab_kernel(ns):
    chain_tests.check_read_back_of_chains()


def test_bind_batch_on_the_lab_kernel(ns):
    chain_tests.check_bind_batch()


def test_unbind_after_the_device_went_on_the_lab_kernel(ns):
    # 6.1 deleted the chain with its device: the branch the host kernel never takes
    assert chain_tests.check_unbind_after_the_device_went()
