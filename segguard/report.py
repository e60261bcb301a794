"""Rendering for people (rich tables) and machines (JSON). No decisions are made here."""
from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from segguard.plan import Plan

console = Console(soft_wrap=False, width=160)
err_console = Console(stderr=True, soft_wrap=True)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def bindings_table(plan: Plan, title: str = "legacy guests") -> Table:
    t = Table(title=title)
    for col in ("guest", "profile", "bridge", "port", "found by", "mode", "ipv4", "ipv6"):
        t.add_column(col)
    for b in plan.bindings:
        t.add_row(b.guest, b.profile, b.bridge, b.port or "[red]unbound (dropped)[/red]", b.source, b.mode,
                  ",".join(b.ipv4) or "-", ",".join(b.ipv6) or "none")
    return t


def results_table(results: list[dict[str, Any]]) -> Table:
    t = Table(title="isolation verified with real packets")
    for col in ("expectation", "expected", "observed", "control", "result"):
        t.add_column(col, overflow="fold")
    for r in results:
        ok = r["pass"]
        t.add_row(f"{r['id']}\n[dim]{r['description']}[/dim]", r["expected"], r["observed"], r.get("control") or "-",
                  "[green]pass[/green]" if ok else f"[red]FAIL[/red] {r.get('why', '')}")
    return t
