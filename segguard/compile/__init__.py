"""Compile (site, profiles, host facts) into a Plan. Pure: no kernel, no clock, no I/O."""
from __future__ import annotations

from segguard.compile.bind import bind_guests
from segguard.compile.nft import compile_nft
from segguard.compile.vlan import compile_vlans, vlan_layer_missing
from segguard.config.validate import Config
from segguard.gcpause import gc_paused
from segguard.host import HostFacts
from segguard.plan import TABLE, Binding, Plan


def compile_plan(config: Config, facts: HostFacts, table: str = TABLE, extra_bindings: tuple[Binding, ...] = ()) -> Plan:
    """`extra_bindings`: ports enrolled in a profile without being a configured guest
    (the live verifier's probe port), compiled exactly like a guest of that profile."""
    with gc_paused():
        bindings, warnings = bind_guests(config, facts)
        bindings = sorted([*bindings, *extra_bindings], key=lambda b: b.guest)
        stateful = facts.bridge_conntrack
        nft = compile_nft(config, facts, bindings, stateful, table)
        vlans = compile_vlans(config, facts, bindings)
    return Plan(table=table, stateful=stateful, bindings=tuple(bindings), nft=tuple(nft), warnings=tuple(warnings), vlans=vlans,
                vlan_layer=vlan_layer_missing(config, facts), vlan_required=config.site.vlan_layer_required)
