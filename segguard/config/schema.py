"""The configuration contract: site.yaml and profiles/*.yaml as frozen pydantic models.

Only shape and per-field rules live here; rules that relate fields to each other or to
other files (duplicates, guard-rail intersections, unknown groups) are in validate.py.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

import netaddr
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

AD_PORTS: tuple[tuple[int, int], ...] = (
    (88, 88), (135, 135), (137, 139), (389, 389), (445, 445), (464, 464), (636, 636),
    (3268, 3269), (9389, 9389),
)
DEFAULT_INTERNAL = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8")


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} {value!r}")
    return value


def _ifname(value: object) -> str:
    s = _str(value, "interface name")
    if len(s) > 15:
        raise ValueError(f"interface name {s!r} is {len(s)} characters; Linux allows at most 15")
    if not IFNAME_RE.match(s):
        raise ValueError(f"interface name {s!r} may only contain letters, digits, '_', '.', '-' and must start with a letter or digit")
    return s


def _name(value: object) -> str:
    s = _str(value, "name")
    if len(s) > 48 or not NAME_RE.match(s):
        raise ValueError(f"{s!r}: names are 1-48 characters of a-z, 0-9, '_', '-', starting with a letter or digit")
    return s


def _mac(value: object) -> str:
    s = _str(value, "MAC address").strip().lower().replace("-", ":")
    if not MAC_RE.match(s):
        raise ValueError(f"{value!r} is not a MAC address like 52:54:00:aa:00:01")
    if int(s[:2], 16) & 1:
        raise ValueError(f"{s} is a multicast/broadcast MAC; a guest NIC has a unicast MAC")
    if s == "00:00:00:00:00:00":
        raise ValueError("00:00:00:00:00:00 is not a usable MAC")
    return s


def _cidr(value: object) -> netaddr.IPNetwork:
    s = _str(value, "address or CIDR")
    try:
        net = netaddr.IPNetwork(s)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise ValueError(f"{s!r} is not an IP address or CIDR") from None
    if net.ip != net.network:
        raise ValueError(f"{s!r} has host bits set; did you mean {net.cidr}?")
    return net


def _host(version: int | None):
    def check(value: object) -> netaddr.IPAddress:
        s = _str(value, "IP address")
        try:
            if "/" in s:
                raise ValueError
            addr = netaddr.IPAddress(s)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise ValueError(f"{s!r} is not a single IP address") from None
        if version and addr.version != version:
            raise ValueError(f"{s} is not an IPv{version} address")
        if addr.is_multicast() or addr.is_loopback() or (addr.version == 4 and int(addr) in (0, 0xFFFFFFFF)):
            raise ValueError(f"{s} cannot be a host address")
        return addr
    return check


def _vlan(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"VLAN must be an integer 1-4094, got {value!r}")
    if not 1 <= value <= 4094:
        raise ValueError(f"VLAN {value} is out of range 1-4094")
    return value


def _port_range(value: object) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a port")
    if isinstance(value, int):
        lo = hi = value
    elif isinstance(value, str) and re.fullmatch(r"\d+-\d+", value.strip()):
        lo, hi = (int(x) for x in value.strip().split("-"))
    elif isinstance(value, str) and value.strip().isdigit():
        lo = hi = int(value)
    else:
        raise ValueError(f"{value!r} is not a port (1-65535) or range like '137-139'")
    for p in (lo, hi):
        if not 1 <= p <= 65535:
            raise ValueError(f"port {p} is out of range 1-65535")
    if lo > hi:
        raise ValueError(f"port range {lo}-{hi} is reversed")
    return (lo, hi)


IfName = Annotated[str, BeforeValidator(_ifname)]
Name = Annotated[str, BeforeValidator(_name)]
Mac = Annotated[str, BeforeValidator(_mac)]
Cidr = Annotated[netaddr.IPNetwork, BeforeValidator(_cidr)]
HostAddr = Annotated[netaddr.IPAddress, BeforeValidator(_host(None))]
IPv4Host = Annotated[netaddr.IPAddress, BeforeValidator(_host(4))]
IPv6Host = Annotated[netaddr.IPAddress, BeforeValidator(_host(6))]
VlanId = Annotated[int, BeforeValidator(_vlan)]
PortRange = Annotated[tuple[int, int], BeforeValidator(_port_range)]


def _peer_list(value: object) -> list[str]:
    """`to`/`from` is one group name or address, or a list of them."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("must name at least one group or address")
    return [_str(i, "group name or address") for i in items]


PeerList = Annotated[list[str], BeforeValidator(_peer_list)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, populate_by_name=True)


class Management(Strict):
    networks: list[Cidr] = []
    vlans: list[VlanId] = []


class BridgeSite(Strict):
    """Per-bridge facts for the VLAN layer."""

    uplink: IfName | None = None
    keep_vlans: list[VlanId] = []
    # turning vlan_filtering on, or pruning the uplink, can take VLANs away from ports
    # that are not legacy guests; apply refuses that unless this says it may
    allow_vlan_removal: bool = False


class Site(Strict):
    internal: list[Cidr] = Field(default_factory=lambda: [netaddr.IPNetwork(c) for c in DEFAULT_INTERNAL])
    domain_controllers: list[HostAddr] = []
    management: Management = Management()
    hypervisor: list[HostAddr] = []
    groups: dict[Name, list[Cidr]] = {}
    bridges: dict[IfName, BridgeSite] = {}
    # a host whose kernel (or bridge) cannot carry the VLAN layer: apply fails instead
    # of enforcing the nftables layer alone with a warning
    vlan_layer_required: bool = False

    @field_validator("groups", mode="before")
    @classmethod
    def _group_values_are_lists(cls, value: object) -> object:
        if isinstance(value, dict):
            return {k: (v if isinstance(v, list) else [v]) for k, v in value.items()}
        return value


class Guest(Strict):
    name: Name
    mac: Mac
    port: IfName | None = None
    ipv4: list[IPv4Host] = []
    ipv6: list[IPv6Host] = []


class Block(Strict):
    internet: bool = True
    domain: bool = True


Proto = Literal["tcp", "udp", "icmp"]


class _Rule(Strict):
    proto: Proto
    ports: list[PortRange] = []

    @field_validator("ports")
    @classmethod
    def _ports_match_proto(cls, ports: list[tuple[int, int]], info) -> list[tuple[int, int]]:
        proto = info.data.get("proto")
        if proto == "icmp" and ports:
            raise ValueError("icmp rules take no ports")
        return ports

    def model_post_init(self, _ctx: object) -> None:
        if self.proto in ("tcp", "udp") and not self.ports:
            raise ValueError(f"{self.proto} rules must list ports (name the service; 'all ports' is what default: allow is for)")


class EgressRule(_Rule):
    to: PeerList


class IngressRule(_Rule):
    # only the YAML spelling `from` is accepted: `from_` is an unknown key, not a
    # second spelling (validate.py reads the raw `from` value back by that name)
    model_config = ConfigDict(populate_by_name=False)

    from_: PeerList = Field(alias="from")


class Profile(Strict):
    name: Name
    description: str = ""
    bridge: IfName
    vlan: VlanId
    guests: list[Guest] = Field(min_length=1)
    block: Block = Block()
    egress: list[EgressRule] = []
    ingress: list[IngressRule] = []
    default: Literal["deny", "allow"] = "deny"
    mode: Literal["enforce", "audit"] = "enforce"
