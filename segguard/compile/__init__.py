"""Compile (site, profiles, host facts) into a Plan. Pure: no kernel, no clock, no I/O."""
from __future__ import annotations

from segguard.compile.bind import bind_guests
from segguard.compile.nft import compile_nft
from segguard.config.validate import Config
from segguard.host import HostFacts
from segguard.plan import TABLE, Plan


def compile_plan(config: Config, facts: HostFacts, table: str = TABLE) -> Plan:
    bindings, warnings = bind_guests(config, facts)
    stateful = facts.bridge_conntrack
    nft = compile_nft(config, facts, bindings, stateful, table)
    return Plan(table=table, stateful=stateful, bindings=tuple(bindings), nft=tuple(nft), warnings=tuple(warnings))
