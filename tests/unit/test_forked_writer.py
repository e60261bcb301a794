"""The agent's forked file writers (segguard/agent/forked.py): the child writes the
image of the moment it was forked, one child at a time, and a failure reaches the
parent as an exit status."""
from __future__ import annotations

import os
import select
import time

from segguard.agent.forked import ForkedWriter


def test_the_child_writes_the_state_of_the_fork_not_later_changes(tmp_path):
    out = tmp_path / "state"
    state = {"guests": 1}
    r, w = os.pipe()
    writer = ForkedWriter()

    def write():
        select.select([r], [], [], 10)  # until the parent has changed its copy
        out.write_text(f"{os.getpid()} {state['guests']}")

    assert writer.start(write)
    state["guests"] = 2
    # one at a time: an older image must never land after a newer one
    assert not writer.start(lambda: out.write_text("other"))
    os.write(w, b"x")
    assert writer.wait() == 0
    pid, guests = out.read_text().split()
    assert int(pid) != os.getpid() and guests == "1"  # a child, writing the image of the fork
    assert writer.wait() is None and writer.reap() is None


def test_a_failing_child_is_reported_by_reap(tmp_path):
    writer = ForkedWriter()

    def fail():
        raise OSError("disk full")

    assert writer.start(fail)
    deadline = time.monotonic() + 10
    while (status := writer.reap()) is None:
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 1
    assert writer.start(lambda: None)  # free again once reaped
    assert writer.wait() == 0
