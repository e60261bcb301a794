"""Rewrite the expected plans of the golden cases: `python -m tests.golden.regen [case ...]`.

Each case is a directory tests/golden/<case>/ holding
  config/      a config directory (site.yaml, profiles/*.yaml) as `load_config` reads it
  facts.json   HostFacts as JSON (HostFacts.to_json)
  plan.json    the expected Plan.to_json() -- the file this script writes

The test (tests/unit/test_golden.py) never writes; it compiles and compares. After a
deliberate compiler change, run this, then review `git diff tests/golden` rule by rule.
"""
from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

from segguard.compile import compile_plan
from segguard.config.validate import load_config
from segguard.host import HostFacts

GOLDEN = Path(__file__).resolve().parent


def cases() -> list[Path]:
    return sorted(p for p in GOLDEN.iterdir() if p.is_dir() and (p / "facts.json").is_file())


def compile_case(case: Path) -> str:
    """The plan JSON for one case, exactly as plan.json should hold it."""
    config = load_config(case / "config")
    facts = HostFacts.from_dict(json.loads((case / "facts.json").read_text()))
    return compile_plan(config, facts).to_json()


def diff(expected: str, actual: str, name: str) -> str:
    return "".join(difflib.unified_diff(
        expected.splitlines(keepends=True), actual.splitlines(keepends=True),
        fromfile=f"{name}/plan.json (expected)", tofile=f"{name} (compiled now)"))


def main(argv: list[str]) -> int:
    wanted = set(argv)
    known = {c.name: c for c in cases()}
    if unknown := wanted - set(known):
        print(f"unknown case(s): {', '.join(sorted(unknown))}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    for name, case in known.items():
        if wanted and name not in wanted:
            continue
        plan = case / "plan.json"
        new = compile_case(case)
        old = plan.read_text() if plan.exists() else ""
        if new == old:
            print(f"{name}: unchanged")
            continue
        plan.write_text(new)
        changed = sum(1 for l in diff(old, new, name).splitlines() if l[:1] in "+-" and l[:3] not in ("+++", "---"))
        print(f"{name}: {'written' if not old else 'REWRITTEN'} ({changed} lines changed) -- review with git diff")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
