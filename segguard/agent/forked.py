"""Files the agent writes from a forked child, off the event loop."""
from __future__ import annotations

import os
from typing import Callable


class ForkedWriter:
    """One forked child at a time that writes a file from the agent's state as it was
    at the fork (copy-on-write: a consistent image, with nothing to lock), so a
    seconds-long serialization never sits on an event's path. One at a time, so an
    older image never lands after a newer one."""

    def __init__(self) -> None:
        self.pid: int | None = None

    def start(self, fn: Callable[[], object]) -> bool:
        """Fork a child that runs `fn` and exits; False (nothing started) while the
        last child has not been reaped (the caller reaps first, to log its status)."""
        if self.pid is not None:
            return False
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                fn()
            except BaseException:  # noqa: BLE001 - the parent logs the exit status
                code = 1
            os._exit(code)
        self.pid = pid
        return True

    def reap(self) -> int | None:
        """The exit status of a child that has finished since the last call, or None."""
        return self._collect(os.WNOHANG)

    def wait(self) -> int | None:
        """Wait for a running child; its exit status, or None when none ran."""
        return self._collect(0)

    def _collect(self, flags: int) -> int | None:
        if self.pid is None:
            return None
        try:
            done, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped elsewhere: nothing to report
            done, status = self.pid, 0
        if not done:
            return None
        self.pid = None
        return status
