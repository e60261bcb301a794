"""When the agent works: a bounded-frequency runner for reconciles (a burst of events
costs one apply), and periodic tasks (drift check, verify). Pure: the clock is passed
in, so the timing rules are unit-tested without sleeping."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class BoundedRunner:
    """Runs `fn(reasons)` when requested, at most once per `min_interval` seconds.

    The first request after a quiet period runs at once (a new tap is bound without
    waiting); requests arriving while a run is due or within `min_interval` of the last
    run are merged into the next run, so a thousand link events cost one reconcile.
    `max_interval` forces a run even without requests (None: never). An `urgent`
    request (a tap to bind: cheap, and its guest's frames are dropped until it is)
    runs at the next pass instead of waiting out `min_interval`."""

    fn: Callable[[frozenset[str]], object]
    min_interval: float
    max_interval: float | None = None
    last_run: float | None = None
    pending: set[str] = field(default_factory=set)
    runs: int = 0
    urgent: bool = False
    last_reasons: frozenset[str] = frozenset()

    def request(self, reason: str, urgent: bool = False) -> None:
        self.pending.add(reason)
        self.urgent = self.urgent or urgent

    def deadline(self) -> float | None:
        forced = None if self.max_interval is None else ((self.last_run or 0.0) + self.max_interval)
        if not self.pending:
            return forced
        soon = 0.0 if self.last_run is None or self.urgent else self.last_run + self.min_interval
        return soon if forced is None else min(soon, forced)

    def maybe_run(self, now: float) -> bool:
        d = self.deadline()
        if d is None or now < d:
            return False
        reasons = frozenset(self.pending or {"periodic"})
        self.pending.clear()
        self.urgent = False
        self.last_run = now
        self.last_reasons = reasons
        self.runs += 1
        self.fn(reasons)
        return True


@dataclass
class Periodic:
    """A task every `every` seconds (None or <= 0: disabled), first run `every` after start."""

    fn: Callable[[], object]
    every: float | None
    next_at: float | None = None

    def start(self, now: float) -> None:
        self.next_at = now + self.every if self.every and self.every > 0 else None

    def deadline(self) -> float | None:
        return self.next_at

    def maybe_run(self, now: float) -> bool:
        if self.next_at is None or now < self.next_at:
            return False
        # Skipped periods are not made up: a stalled host needs one check, not ten.
        while self.next_at <= now:
            self.next_at += self.every  # type: ignore[operator]
        self.fn()
        return True


@dataclass
class Scheduler:
    tasks: list = field(default_factory=list)

    def add(self, task):
        self.tasks.append(task)
        return task

    def timeout(self, now: float, cap: float = 60.0) -> float:
        """Seconds until the earliest deadline (0 if one is due), at most `cap`."""
        deadlines = [d for d in (t.deadline() for t in self.tasks) if d is not None]
        if not deadlines:
            return cap
        return max(0.0, min(cap, min(deadlines) - now))

    def run_due(self, now: float) -> int:
        return sum(1 for t in self.tasks if t.maybe_run(now))


@dataclass
class Deferred:
    """Runs `fn()` `delay` seconds after the first request since its last run: work that
    must happen soon, but not on the path of the event that asked for it (the applied
    plan's file after a tap bind). Requests meanwhile are merged. With `settle`, each
    request moves the run to `delay` after itself -- a burst costs one run, when it
    is over -- but never later than `settle` after the first request."""

    fn: Callable[[], object]
    delay: float
    settle: float | None = None
    due: float | None = None
    first: float | None = None

    def request(self, now: float) -> None:
        if self.due is None:
            self.first, self.due = now, now + self.delay
        elif self.settle is not None:
            self.due = min(now + self.delay, self.first + self.settle)

    def deadline(self) -> float | None:
        return self.due

    def maybe_run(self, now: float) -> bool:
        if self.due is None or now < self.due:
            return False
        self.due = self.first = None
        self.fn()
        return True


@dataclass
class WhenQuiet:
    """Runs `fn()` once `quiet` seconds have passed since the last `touch`; a touch
    starts the quiet period over. For work that holds the kernel's nftables lock long
    enough to delay a tap's bind (deleting unbound ports' leftovers): it waits for a
    lull in the events. `touch(now, at_once=True)` runs it at the next pass regardless
    (a backlog that must not grow)."""

    fn: Callable[[], object]
    quiet: float
    due: float | None = None

    def touch(self, now: float, at_once: bool = False) -> None:
        self.due = now if at_once else now + self.quiet

    def deadline(self) -> float | None:
        return self.due

    def maybe_run(self, now: float) -> bool:
        if self.due is None or now < self.due:
            return False
        self.due = None
        self.fn()
        return True
