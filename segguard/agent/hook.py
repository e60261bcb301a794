"""The libvirt qemu hook's decision: may this domain start?

libvirt runs /etc/libvirt/hooks/qemu as `qemu <domain> <operation> <sub-op> <extra>`
with the domain XML on stdin, and aborts the start if the hook exits non-zero on
`prepare begin` / `start begin`. A domain with an interface whose MAC is a legacy
guest's may start only if the live table holds exactly the plan's policy for that
guest, and, for a guest without an explicit `port`, only while an agent runs to bind
its tap; anything else starts as if segguard were not there.

A hook must not call back into libvirt (libvirtd waits for it): facts are read from
netlink only, and the tap does not exist yet anyway, so the guest's planned binding
is the one it has before its tap appears.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

GUARDED_OPS = {("prepare", "begin"), ("start", "begin")}


@dataclass(frozen=True)
class HookDecision:
    allow: bool
    message: str
    guests: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default=())


def domain_macs(xml: str) -> list[str]:
    root = ET.fromstring(xml)
    return sorted({m.get("address").lower() for m in root.findall("./devices/interface/mac") if m.get("address")})


def decide(operation: str, sub_op: str, domain_xml: str, config_dir: str | Path | None) -> HookDecision:
    if (operation, sub_op) not in GUARDED_OPS:
        return HookDecision(True, f"{operation} {sub_op}: not guarded")
    try:
        macs = domain_macs(domain_xml)
    except ET.ParseError as exc:
        # Unparseable XML cannot be shown not to be a legacy guest: fail closed.
        return HookDecision(False, f"segguard: cannot parse the domain XML ({exc}); refusing to start it")
    from segguard.agent.reconcile import TopologyReader, guest_problems
    from segguard.apply.nftables import NftablesApplier
    from segguard.compile import compile_plan
    from segguard.config.validate import load_config
    from segguard.errors import ConfigError, SegguardError
    from segguard.flow import last_applied
    from segguard.host import HostFacts

    try:
        config = load_config(config_dir)
        legacy = {g.mac: g.name for _, g in config.guests()}
    except ConfigError as exc:
        # The agent keeps the last good policy when the config breaks; judge by it.
        config = None
        prev = last_applied() or {}
        legacy = {b["mac"]: b["guest"] for b in prev.get("bindings", [])}
        if not legacy:
            return HookDecision(not macs, "segguard: the config is invalid and no applied policy is recorded; "
                                "refusing to start a domain that may be a legacy guest: " + str(exc).splitlines()[0])
    ours = sorted({legacy[m] for m in macs if m in legacy})
    if not ours:
        return HookDecision(True, "not a legacy guest")
    try:
        realized = NftablesApplier().realized("segguard")
        if config is not None:
            stateful = bool((last_applied() or {}).get("stateful", False))
            topo = TopologyReader(caps=HostFacts(bridge_conntrack=stateful), with_libvirt=False)
            try:
                plan = compile_plan(config, topo.facts([lp.profile.bridge for lp in config.profiles]))
            finally:
                topo.close()
        else:
            from segguard.agent.state import plan_from_dict

            plan = plan_from_dict(last_applied() or {})
    except SegguardError as exc:
        return HookDecision(False, f"segguard: cannot confirm the policy of {', '.join(ours)} is loaded: {exc}", tuple(ours))
    problems = []
    for g in ours:
        problems += [f"{g}: {p}" for p in guest_problems(plan, realized, g)]
    if problems:
        return HookDecision(False, "segguard: refusing to start legacy guest " + ", ".join(ours) +
                            ": its policy is not loaded (start the agent or run `segguard apply`): " +
                            "; ".join(problems[:5]), tuple(ours), tuple(problems))
    # A guest without an explicit `port` is dispatched only once the agent binds its tap;
    # until then a frame from that tap with a forged source MAC meets no rule of its own
    # (the MAC guard knows only the guest's MAC). Without an agent that never ends.
    portless = [g for g in ours if (b := plan.binding(g)) is not None and b.port is None]
    if portless and not agent_running():
        return HookDecision(False, "segguard: refusing to start legacy guest " + ", ".join(portless) +
                            ": it names no `port`, so only the agent can bind its tap, and no agent is running "
                            "(start `segguard agent`, or give the guest an explicit `port`)", tuple(ours),
                            ("no running agent to bind the tap",))
    return HookDecision(True, "segguard: policy loaded for " + ", ".join(ours), tuple(ours))


def agent_running() -> bool:
    """An agent that said it is ready, in this namespace, whose process still exists."""
    import os

    from segguard.flow import read_state

    st = read_state("agent") or {}
    pid = st.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not st.get("ready"):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"segguard" in cmdline  # not another process that got the pid since
