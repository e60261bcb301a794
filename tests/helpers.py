"""Small helpers shared by the tests that drive real processes in namespaces."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 20.0, every: float = 0.05,
             diag: Callable[[], str] = lambda: "") -> Any:
    """Polls for a state; the timeout only bounds a hang, it is not what is tested."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    extra = diag()
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{extra}" if extra else ""))


def nsrun(ns: str, *cmd: str, check: bool = False, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, check=check,
                          timeout=timeout, **kw)


def agent_state(state_dir: Path) -> dict | None:
    """The agent's state file under a segguard state dir (one netns-* folder per namespace)."""
    for d in state_dir.glob("netns-*"):
        try:
            return json.loads((d / "agent.json").read_text())
        except (OSError, ValueError):
            return None
    return None


def json_lines(path: Path) -> list[dict]:
    """The structured log lines of a file; other lines are skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
