"""The agent's nftables monitor (agent/events.py NftMonitor) against a real kernel.
It hears commits made by anyone else. For our own full replace it leaves the group
(`quiet`): the kernel then writes no notification per object to it. A commit by
someone else while it was away must still count, and does, through the ruleset's
generation."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from segguard.agent.events import NftMonitor
from segguard.apply import nfnl
from segguard.apply.nftables import NftablesApplier
from tests.netns.conftest import scratch_netns
from tests.netns.test_nfnl_table import full_plan, make_ports

pytestmark = pytest.mark.netns


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns("nmon") as name:
        yield name


def _foreign_commit(name: str) -> None:
    """A commit by another process (the nft binary): what the monitor is there for."""
    subprocess.run(["nft", "add", "table", "inet", name], check=True)


def _queued(mon: NftMonitor) -> bool:
    """Anything waiting on the monitor's socket (read without consuming it)."""
    import socket as s

    try:
        return bool(mon.sock.recv(1 << 16, s.MSG_PEEK | s.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def test_our_replace_in_quiet_sends_it_nothing_and_counts_nothing_missed(ns, tmp_path: Path):
    plan = full_plan("lab-example", tmp_path)
    make_ports(plan)
    mon = NftMonitor()
    try:
        loud = NftablesApplier()
        assert loud.apply(plan) and loud.road == "nfnetlink"
        # control: without quiet the monitor hears our commit (and every object of it)
        assert _queued(mon)
        assert mon.read() == 0 and mon.own_generations == 1

        quiet = NftablesApplier()
        quiet.quiet = mon.quiet
        quiet.remove(plan.table)
        mon.read()
        own = mon.own_generations
        assert quiet.apply(plan) and quiet.road == "nfnetlink"
        assert not _queued(mon), "the kernel wrote our own objects to the monitor during quiet"
        assert mon.read() == 0 and mon.own_generations == own
        assert mon.take_missed() == 0
        # and it listens again afterwards
        _foreign_commit("sgtnmon_after")
        assert mon.read() == 1
    finally:
        mon.close()


def test_a_replace_committed_by_the_forked_child_is_ours_in_quiet(ns, tmp_path: Path):
    """The agent's replace is sent by a forked child (NftablesApplier.in_child) through
    a socket of its own; the window is the agent's, and the child's one accepted batch
    is declared to it: nothing queued, nothing missed. A foreign commit meanwhile still
    counts (the same window, the next test's control)."""
    plan = full_plan("lab-example", tmp_path)
    make_ports(plan)
    mon = NftMonitor()
    applier = NftablesApplier()
    applier.in_child, applier.quiet = True, mon.quiet
    try:
        assert applier.apply(plan) and applier.road == "nfnetlink" and applier.child_failure == ""
        assert not _queued(mon), "the kernel wrote the child's objects to the agent's monitor"
        assert mon.take_missed() == 0, "the child's own commit was counted as someone else's"

        def with_foreign(sock):
            cm = mon.quiet(sock)

            class Both:
                def __enter__(self):
                    window = cm.__enter__()
                    _foreign_commit("sgtnmon_fork")
                    return window

                def __exit__(self, *exc):
                    return cm.__exit__(*exc)
            return Both()
        applier.quiet = with_foreign
        applier.remove(plan.table)
        mon.read()
        assert applier.apply(plan)
        assert mon.take_missed() == 1
    finally:
        applier.close()
        mon.close()


def test_a_foreign_commit_while_quiet_counts_as_missed(ns):
    mon = NftMonitor()
    sock = nfnl.NfnlSocket()
    try:
        with mon.quiet(sock):
            _foreign_commit("sgtnmon_a")     # not heard: out of the group
        assert mon.read() == 0
        assert mon.take_missed() == 1 and mon.take_missed() == 0

        with mon.quiet(sock):                # nothing at all committed
            pass
        assert mon.take_missed() == 0

        # a commit the body declares as its own is not missed (the replace's case);
        # the same commit undeclared is
        with mon.quiet(sock) as window:
            _foreign_commit("sgtnmon_b")
            window.commits += 1
        assert mon.take_missed() == 0
        with pytest.raises(RuntimeError):
            with mon.quiet(sock):
                _foreign_commit("sgtnmon_c")
                raise RuntimeError("refused")
        assert mon.take_missed() == 1
        with pytest.raises(RuntimeError):
            with mon.quiet(sock):
                raise RuntimeError("refused before anything was sent")
        assert mon.take_missed() == 0
    finally:
        sock.close()
        mon.close()


def test_our_commit_and_a_foreign_one_in_one_quiet_window_count_as_missed(ns, tmp_path: Path):
    plan = full_plan("no-profiles", tmp_path, wide=False)
    mon = NftMonitor()
    applier = NftablesApplier()
    try:
        def both(sock):
            cm = mon.quiet(sock)

            class Both:
                def __enter__(self):
                    window = cm.__enter__()
                    _foreign_commit("sgtnmon_d")  # lands before ours
                    return window

                def __exit__(self, *exc):
                    return cm.__exit__(*exc)
            return Both()
        applier.quiet = both
        assert applier.apply(plan)
        assert mon.take_missed() == 1
    finally:
        mon.close()
