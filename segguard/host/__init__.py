"""Host facts: what the compiler needs to know about this machine, as plain data.

`HostFacts` is read from the kernel (netlink.py) on a live host, built by hand in tests,
and stored as JSON beside each golden case, so compiling never touches the kernel.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property

from segguard.host.vlans import PortVlans


@dataclass(frozen=True)
class PortFact:
    name: str
    mac: str


@dataclass(frozen=True)
class BridgeFact:
    name: str
    addresses: tuple[str, ...] = ()
    ports: tuple[PortFact, ...] = ()
    # the VLAN layer's facts; None/() when not read (facts files from before it, or a
    # kernel without bridge VLAN filtering), and then left out of the JSON
    vlan_filtering: bool | None = None
    vlans: tuple[PortVlans, ...] = ()

    def port_vlans(self, name: str) -> PortVlans | None:
        return next((v for v in self.vlans if v.port == name), None)

    # Indexes, built once per fact (facts are immutable): binding one guest or
    # compiling one profile's slice must not walk a 5,000-port bridge.
    @cached_property
    def port_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.ports)

    @cached_property
    def port_keys(self) -> frozenset[tuple[str, str]]:
        """(name, MAC) of every port: two readings compare as sets of these."""
        return frozenset((p.name, p.mac) for p in self.ports)

    @cached_property
    def ports_by_mac(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for p in self.ports:
            out.setdefault(p.mac, []).append(p.name)
        return {m: tuple(n) for m, n in out.items()}

    @cached_property
    def by_name(self) -> dict[str, PortFact]:
        return {p.name: p for p in self.ports}


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

    @cached_property
    def port_names(self) -> frozenset[str]:
        """Every port of every bridge."""
        return frozenset().union(*(b.port_names for b in self.bridges))

    def to_json(self) -> str:
        data = asdict(self)
        for b, fact in zip(data["bridges"], self.bridges):
            if fact.vlan_filtering is None:
                del b["vlan_filtering"]
            if fact.vlans:
                b["vlans"] = [v.to_dict() for v in fact.vlans]
            else:
                del b["vlans"]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "HostFacts":
        return cls(
            bridges=tuple(
                BridgeFact(b["name"], tuple(b.get("addresses", ())), tuple(PortFact(p["name"], p["mac"].lower()) for p in b.get("ports", ())),
                           vlan_filtering=b.get("vlan_filtering"),
                           vlans=tuple(PortVlans.from_dict(v) for v in b.get("vlans", ())))
                for b in data.get("bridges", ())
            ),
            libvirt_ports=tuple((m.lower(), t) for m, t in data.get("libvirt_ports", ())),
            bridge_conntrack=bool(data.get("bridge_conntrack", False)),
            vlan_filtering=bool(data.get("vlan_filtering", False)),
        )
