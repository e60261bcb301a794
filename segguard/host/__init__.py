"""Host facts: what the compiler needs to know about this machine, as plain data.

`HostFacts` is read from the kernel (netlink.py) on a live host, built by hand in tests,
and stored as JSON beside each golden case, so compiling never touches the kernel.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class PortFact:
    name: str
    mac: str


@dataclass(frozen=True)
class BridgeFact:
    name: str
    addresses: tuple[str, ...] = ()
    ports: tuple[PortFact, ...] = ()


@dataclass(frozen=True)
class HostFacts:
    bridges: tuple[BridgeFact, ...] = ()
    # guest MAC -> tap name, from libvirt's domain XML (<interface><target dev=...>)
    libvirt_ports: tuple[tuple[str, str], ...] = ()
    # nf_conntrack_bridge present: `ct state` works in bridge chains
    bridge_conntrack: bool = False
    vlan_filtering: bool = False

    def bridge(self, name: str) -> BridgeFact | None:
        return next((b for b in self.bridges if b.name == name), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "HostFacts":
        return cls(
            bridges=tuple(
                BridgeFact(b["name"], tuple(b.get("addresses", ())), tuple(PortFact(p["name"], p["mac"].lower()) for p in b.get("ports", ())))
                for b in data.get("bridges", ())
            ),
            libvirt_ports=tuple((m.lower(), t) for m, t in data.get("libvirt_ports", ())),
            bridge_conntrack=bool(data.get("bridge_conntrack", False)),
            vlan_filtering=bool(data.get("vlan_filtering", False)),
        )
