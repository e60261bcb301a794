"""Which port each legacy guest is on: explicit `port`, else libvirt's interface target,
else libvirt's tap MAC convention (host side = guest MAC with first octet fe).
An unbound guest is still enforced: its MAC is dropped on every port (fail closed)."""
from __future__ import annotations

from segguard.compile.nft import class_chains
from segguard.config.validate import Config
from segguard.host import HostFacts
from segguard.plan import Binding


def tap_mac(guest_mac: str) -> str:
    return "fe" + guest_mac[2:]


def bind_guests(config: Config, facts: HostFacts) -> tuple[list[Binding], list[str]]:
    libvirt = dict(facts.libvirt_ports)
    bindings: list[Binding] = []
    warnings: list[str] = []
    for lp, guest in sorted(config.guests(), key=lambda pg: pg[1].name):
        prof = lp.profile
        bridge = facts.bridge(prof.bridge)
        port, source = None, "unbound"
        if guest.port:
            port, source = guest.port, "profile"
        elif guest.mac in libvirt:
            port, source = libvirt[guest.mac], "libvirt"
        elif bridge is not None:
            match = list(bridge.ports_by_mac.get(tap_mac(guest.mac), ()))
            if len(match) == 1:
                port, source = match[0], "tap-mac"
            elif len(match) > 1:
                warnings.append(f"guest {guest.name}: ports {', '.join(match)} all carry tap MAC {tap_mac(guest.mac)}; left unbound (its MAC is dropped everywhere)")
        if bridge is None:
            warnings.append(f"guest {guest.name}: bridge {prof.bridge} does not exist on this host (rules are loaded anyway and apply once it does)")
        elif port and port not in bridge.port_names:
            warnings.append(f"guest {guest.name}: port {port} is not on bridge {prof.bridge} now (rules keyed on it take effect when it appears)")
        if port is None:
            warnings.append(f"guest {guest.name}: no port found (set guests[].port, or start it under libvirt); its MAC {guest.mac} is dropped on every port until bound")
        bindings.append(Binding(
            profile=prof.name, guest=guest.name, mac=guest.mac, bridge=prof.bridge, port=port, source=source,
            ipv4=tuple(str(a) for a in guest.ipv4), ipv6=tuple(str(a) for a in guest.ipv6), mode=prof.mode,
            chains=class_chains(prof),
        ))
    # Two guests resolved to one port (an explicit port that libvirt reports for another
    # guest's MAC, say): neither can be trusted to own it, so both stay unbound and
    # their MACs are dropped everywhere until the host facts agree again.
    from collections import Counter
    from dataclasses import replace

    shared = {port for port, n in Counter(b.port for b in bindings if b.port).items() if n > 1}
    for i, b in enumerate(bindings):
        if b.port in shared:
            others = ", ".join(o.guest for o in bindings if o.port == b.port and o is not b)
            warnings.append(f"guest {b.guest}: port {b.port} is also claimed by {others}; left unbound (its MAC is dropped everywhere)")
            bindings[i] = replace(b, port=None, source="unbound")
    return bindings, warnings
