"""Work done in a forked child whose result comes back pickled through a pipe: what the
child allocates (a parse's garbage, a network namespace of its own) dies with it."""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
from dataclasses import dataclass
from typing import Callable


@dataclass
class Child:
    """A forked child at work: `fd` becomes readable when it has answered (or died).
    The agent's loop waits for it beside its other events (Child.answer then reads it
    without blocking for long: the child writes its whole answer and exits)."""

    pid: int
    fd: int

    def answer(self) -> tuple[bool, object]:
        """(True, result), or (False, why) when the child raised (`why` is the
        exception's repr), died or sent something unreadable. Reaps the child."""
        try:
            with os.fdopen(self.fd, "rb") as src:
                data = src.read()
        finally:
            _, status = os.waitpid(self.pid, 0)
        if not data:
            return False, f"the child sent nothing (wait status {status})"
        try:
            ok, value = pickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - whatever a dying child left
            return False, f"the child's answer is unreadable: {exc!r}"
        return bool(ok), value

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def fork_child(fn: Callable[[], object]) -> Child:
    """Start `fn` in a forked child; its answer is read with Child.answer."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            try:
                payload = pickle.dumps((True, fn()), protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                payload = pickle.dumps((False, repr(exc)))
            with os.fdopen(w, "wb") as out:
                out.write(payload)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return Child(pid, r)


def result_of_child(fn: Callable[[], object]) -> tuple[bool, object]:
    """Run `fn` in a forked child and hand its result back: (True, result), or (False,
    why) when the child raised (`why` is the exception's repr), died or sent something
    unreadable. The caller decides what a failure means (the agent loads in process
    instead, apply/nfnl_table.learn refuses the nfnetlink road)."""
    return fork_child(fn).answer()
