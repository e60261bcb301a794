"""Run expectations from one vantage point and judge them.

A vantage binds each intent to (sender endpoint, frame, sink endpoint); this module
sends them in two stages (flows first, then the replies that need them), and turns
what arrived into verdicts. It knows nothing about labs or live hosts."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol

from segguard.verify.expectations import Expectation, Intent
from segguard.verify.probes import Endpoint, Probe, ProbeSession


class Binder(Protocol):
    def bind(self, intent: Intent) -> tuple[str, Probe, str]:
        """-> (sender name, frame, sink name)"""


@dataclass(frozen=True)
class Extra:
    """A vantage's own check that is not derived from the plan (the lab shows the
    ordinary guest still reaching the internet)."""

    id: str
    description: str
    binder: Binder
    intent: Intent


def _word(arrived: bool | None) -> str | None:
    return None if arrived is None else ("arrived" if arrived else "not arrived")


def run_expectations(exps: list[Expectation], binder_for: Callable[[str], Binder],
                     endpoint: Callable[[str], Endpoint], extras: list[Extra] = ()) -> list[dict]:
    stage1: list[tuple[str, str, Probe, str]] = []
    stage2: list[tuple[str, str, Probe, str]] = []
    for e in exps:
        b = binder_for(e.guest)
        if e.after:
            stage1.append((e.id + "#setup", *b.bind(e.after)))
        (stage2 if e.after else stage1).append((e.id, *b.bind(e.probe)))
        if e.control:
            stage1.append((e.id + "#control", *b.bind(e.control)))
    for x in extras:
        stage1.append((x.id, *x.binder.bind(x.intent)))

    names = {n for _, s, _, k in stage1 + stage2 for n in (s, k)}
    endpoints = {n: endpoint(n) for n in names}
    # Under emulation (the kernel lab boots qemu without KVM) workers start and frames
    # travel many times slower; these knobs let such a vantage wait longer.
    settle = float(os.environ.get("SEGGUARD_PROBE_SETTLE", "0.6"))
    start_timeout = float(os.environ.get("SEGGUARD_PROBE_START_TIMEOUT", "30"))
    observed: dict[str, bool] = {}
    with ProbeSession(endpoints, endpoints, settle=settle, start_timeout=start_timeout) as session:
        for stage in (stage1, stage2):
            if stage:
                res = session.run([(pid, s, p, [k]) for pid, s, p, k in stage])
                observed.update({pid: res[pid][k] for pid, _s, _p, k in stage})

    results = []
    for e in exps:
        got = observed[e.id]
        ctrl = observed.get(e.id + "#control") if e.control else None
        if e.expect == "arrives":
            ok, why = got, "" if got else "the allowed flow did not arrive"
        else:
            ok = (not got) and ctrl is not False
            why = "" if ok else ("the blocked frame ARRIVED" if got else
                                 "its control did not arrive either: sink or path broken, verdict unproven")
        results.append({"id": e.id, "guest": e.guest, "category": e.category, "description": e.description,
                        "expected": e.expect, "observed": _word(got), "control": _word(ctrl),
                        "pass": bool(ok), "why": why})
    for x in extras:
        got = observed[x.id]
        results.append({"id": x.id, "guest": "-", "category": "vantage", "description": x.description,
                        "expected": "arrives", "observed": _word(got), "control": None, "pass": got,
                        "why": "" if got else "did not arrive"})
    return results
