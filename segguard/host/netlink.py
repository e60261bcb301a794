"""Read HostFacts from the running kernel (the current network namespace)."""
from __future__ import annotations

import operator
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


_NAME = operator.attrgetter("name")


def bridge_fact_updated(old: BridgeFact, bridge_index: int, changes, addresses: tuple[str, ...]) -> BridgeFact | None:
    """`old`, the bridge whose link is `bridge_index`, after `changes` -- (before, after)
    of one link each (None: absent), in the order they happened (events.LinkMonitor) --
    with `addresses` as they are now; its indexes carried over and adjusted, so a bind
    beside 900 ports costs the ports that changed, not the bridge's. The same fact as
    bridge_facts builds from the links (tests/unit/test_bridge_facts.py holds them to
    each other). None when a change is to the bridge link itself (gone, renamed, or
    another link under its index): read it whole. Without VLAN facts only (those are
    read afresh with every reading)."""
    if old.vlan_filtering is not None or old.vlans:
        return None
    by_name: dict[str, PortFact] | None = None
    touched: set[str] = set()
    for before, after in changes:
        if (before is not None and before.index == bridge_index) or (after is not None and after.index == bridge_index):
            if before is None or after is None or before.name != after.name or before.master is not None:
                return None
            continue  # its own MAC or state: not a fact of its ports
        was = before is not None and before.master == bridge_index
        now = after is not None and after.master == bridge_index
        if not (was or now):
            continue
        if by_name is None:
            by_name = dict(old.by_name)
        if was:
            by_name.pop(before.name, None)
            touched.add(before.name)
        if now:
            by_name[after.name] = PortFact(after.name, after.mac)
            touched.add(after.name)
    if by_name is None:
        if addresses == old.addresses:
            return old
        fact = BridgeFact(old.name, addresses, old.ports)
        fact.__dict__.update({k: old.__dict__[k] for k in ("port_names", "port_keys", "ports_by_mac", "by_name")
                              if k in old.__dict__})
        return fact
    prior = old.by_name
    gone = {prior[n] for n in touched if n in prior and by_name.get(n) != prior[n]}
    came = {by_name[n] for n in touched if n in by_name and prior.get(n) != by_name[n]}
    fact = BridgeFact(old.name, addresses, tuple(sorted(by_name.values(), key=_NAME)))
    by_mac = dict(old.ports_by_mac)
    for p in gone:
        left = tuple(n for n in by_mac[p.mac] if n != p.name)
        if left:
            by_mac[p.mac] = left
        else:
            del by_mac[p.mac]
    for p in came:
        by_mac[p.mac] = tuple(sorted((*by_mac.get(p.mac, ()), p.name)))
    fact.__dict__.update(
        by_name=by_name, ports_by_mac=by_mac,
        port_names=(old.port_names - {p.name for p in gone}) | {p.name for p in came},
        port_keys=(old.port_keys - {(p.name, p.mac) for p in gone}) | {(p.name, p.mac) for p in came})
    return fact


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
