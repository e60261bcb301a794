"""One error hierarchy for segguard.

Every failure a user can cause or meet is one of these; the CLI (segguard/cli.py) is
the only place that turns them into messages and exit codes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class SegguardError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in one place of one file: rendered as `file:line: field: message`."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ConfigError(SegguardError):
    """The configuration is invalid; nothing was applied. Carries every problem found."""

    exit_code = 2

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line or 0, p.field))
        super().__init__("\n".join(str(p) for p in self.problems))


class HostError(SegguardError):
    """Host facts could not be read (bridge missing, netlink failure, ...)."""

    exit_code = 3


class ApplyError(SegguardError):
    """The kernel refused a transaction, or read-back showed a different ruleset.

    `batch` is the exact JSON that was sent, so the failure can be reproduced with
    `nft -j -f`; the previous policy is still in force (the batch is atomic).
    """

    exit_code = 4

    def __init__(self, message: str, batch: Any = None, kernel_error: str = "", details: list[str] | None = None):
        if batch is not None:
            # plain JSON, as `nft -j -f` takes it: a plan's elements are Concat (plan.py)
            from segguard.plan import jsonable

            batch = json.loads(json.dumps(batch, default=jsonable))
        self.batch = batch
        self.kernel_error = kernel_error
        self.details = details or []
        super().__init__(message)


class VerifyFailed(SegguardError):
    """At least one isolation expectation did not hold (or could not be observed)."""

    exit_code = 5


class LabError(SegguardError):
    exit_code = 6


class VlanChangeRefused(SegguardError):
    """The VLAN plan would take VLANs away from ports that are not legacy guests (or is
    contradictory); nothing was applied. `refusals` are compile.vlan.Refusal objects."""

    exit_code = 7

    def __init__(self, refusals: list[Any]):
        self.refusals = list(refusals)
        super().__init__("refusing to change bridge VLANs; nothing was applied:\n"
                         + "\n".join(f"  {r.bridge}: {r.message}" for r in self.refusals))


class VlanLayerMissing(SegguardError):
    """site.yaml `vlan_layer_required` is set and the VLAN layer cannot be applied here;
    nothing was applied (the nftables layer neither)."""

    exit_code = 8
