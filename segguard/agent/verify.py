"""Scheduled real-packet verification in the agent (`--verify-every`).

Each guest is proven the way `segguard verify --live` proves it: probe ports on its
bridge, a stand-in enrolled in its profile, frames judged at L2 where they arrive
(verify/live.py). That run switches the table to a plan with the stand-in and back,
so it runs under the writer lock, and the agent's own reconcile that follows (in
the same lock) puts the agent's plan back without calling the switch drift.

A round verifies one guest per scheduler pass: events that arrive meanwhile (a tap
to bind) wait for one guest's run, not for every guest's. Until then the new tap's
guest is unbound, and its MAC is dropped on every port, so waiting never fails open.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

MAX_IDS = 50


def summarize(results: list[dict[str, Any]], at: float, seconds: float) -> dict[str, Any]:
    """One guest's run as the agent keeps it: counts and what failed."""
    failed = [r for r in results if not r.get("pass")]
    return {
        "at": at, "seconds": round(seconds, 3), "method": "live", "ok": bool(results) and not failed,
        "passed": len(results) - len(failed), "failed": len(failed),
        "failing": [r["id"] for r in failed][:MAX_IDS],
        # what `segguard status` prints after FAIL:
        "problems": [f"{r['id']}: {r.get('why') or r.get('observed')}" for r in failed][:10],
    }


def errored(exc: BaseException, at: float, seconds: float) -> dict[str, Any]:
    """A run that could not probe proves nothing: a failure, with the reason."""
    return {"at": at, "seconds": round(seconds, 3), "method": "live", "ok": False, "passed": 0, "failed": 0,
            "failing": [], "error": str(exc), "problems": [f"verify could not run: {exc}"]}


@dataclass
class VerifyRounds:
    """Every `every` seconds (None or <= 0: never) a round over `guests()`, one guest per
    `maybe_run`. A round still going when the next is due is not doubled: the next
    starts once it is done. Pure: the clock is passed in."""

    fn: Callable[[str], object]
    guests: Callable[[], list[str]]
    every: float | None
    next_at: float | None = None
    queue: list[str] = field(default_factory=list)
    rounds: int = 0

    def start(self, now: float) -> None:
        self.next_at = now + self.every if self.every and self.every > 0 else None

    def deadline(self) -> float | None:
        if self.queue:
            return 0.0
        return self.next_at

    def maybe_run(self, now: float) -> bool:
        if not self.queue:
            if self.next_at is None or now < self.next_at:
                return False
            while self.next_at <= now:
                self.next_at += self.every  # type: ignore[operator]
            self.queue = list(self.guests())
            self.rounds += 1
            if not self.queue:
                return False
        self.fn(self.queue.pop(0))
        return True
