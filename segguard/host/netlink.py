"""Read HostFacts from the running kernel (the current network namespace)."""
from __future__ import annotations

from typing import Callable

from segguard.errors import HostError
from segguard.host import BridgeFact, HostFacts, PortFact


def _bridge_conntrack_available() -> bool:
    """nf_conntrack_bridge is what makes `ct state` legal in bridge chains; the kernel
    answers 'Protocol error' without it. Ask with a throwaway table in a transaction
    that deletes it again, so nothing is left behind either way."""
    from segguard.apply.nftables import Nft

    t = "segguard_probe_ct"
    batch = {"nftables": [
        {"add": {"table": {"family": "bridge", "name": t}}},
        {"add": {"chain": {"family": "bridge", "table": t, "name": "c"}}},
        {"add": {"rule": {"family": "bridge", "table": t, "chain": "c", "expr": [
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": None}]}}},
        {"delete": {"table": {"family": "bridge", "name": t}}},
    ]}
    rc, _, _ = Nft().raw(batch)
    return rc == 0


def _try_vlan_filtering() -> bool:
    """Whether bridges here filter VLANs (rtnl.vlan_filtering_works: a scratch bridge).
    Over a plain rtnetlink socket: pyroute2's IPRoute cost the agent ~10 MB of
    resident memory for this one question at its start."""
    from segguard.host import rtnl

    try:
        return rtnl.vlan_filtering_works()
    except OSError:
        return False


def bridge_facts(bridges: list[str], links: dict, addresses: Callable[[int], tuple[str, ...]], vlans: bool) -> list[BridgeFact]:
    """The named bridges (missing ones are simply absent): ports from `links` (index ->
    rtnl.Link), addresses from `addresses(index)`, and with `vlans` (the kernel can
    filter) vlan_filtering and every port's VLAN table, read for the bridge alone."""
    from segguard.host import rtnl

    found: list[BridgeFact] = []
    for name in sorted(set(bridges)):
        br = next((l for l in links.values() if l.name == name), None)
        if br is None:
            continue
        ports = tuple(sorted((PortFact(l.name, l.mac) for l in links.values() if l.master == br.index), key=lambda p: p.name))
        vf: tuple = (None, ())
        if vlans:
            # a fresh read of the bridge itself: an event-fed table does not keep its
            # IFLA_INFO_DATA, and vlan_filtering may have been switched since
            fresh = rtnl.link(br.index)
            if fresh is not None and fresh.vlan_filtering is not None:
                names = {br.index: name, **{l.index: l.name for l in links.values() if l.master == br.index}}
                vf = (fresh.vlan_filtering, port_vlans(br.index, names))
        found.append(BridgeFact(name, addresses(br.index), ports, *vf))
    return found


def port_vlans(bridge_index: int, names: dict[int, str]) -> tuple:
    """host.vlans.read_port_vlans over rtnl: the VLAN table of the bridge (under its own
    name) and of every port on it; a port with an empty table is still a port."""
    from segguard.host import rtnl
    from segguard.host.vlans import PortVlans, port_vlans_from_infos

    infos = rtnl.bridge_vlan_infos(names, bridge_index)
    out = {idx: port_vlans_from_infos(names[idx], entries) for idx, entries in infos.items()}
    for idx, name in names.items():
        out.setdefault(idx, PortVlans(name))
    return tuple(sorted(out.values(), key=lambda p: p.port))


def read_host_facts(bridges: list[str]) -> HostFacts:
    """Facts for the named bridges (missing bridges are simply absent)."""
    from segguard.host import rtnl

    try:
        found = bridge_facts(bridges, rtnl.links(), rtnl.addresses, vlans=True)
    except OSError as exc:
        raise HostError(f"cannot read links over netlink: {exc}") from exc
    from segguard.host.libvirt import libvirt_ports

    return HostFacts(
        bridges=tuple(found),
        libvirt_ports=libvirt_ports(),
        bridge_conntrack=_bridge_conntrack_available(),
        vlan_filtering=_try_vlan_filtering(),
    )
