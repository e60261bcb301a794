"""Read HostFacts from the running kernel (the current network namespace)."""
from __future__ import annotations

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
    """Create a scratch bridge with vlan_filtering=1 and delete it: the only reliable
    test, since a bridge built without CONFIG_BRIDGE_VLAN_FILTERING looks the same."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    name = "sgprobevf0"
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=name, kind="bridge", br_vlan_filtering=1)
        except NetlinkError:
            return False
        try:
            idx = ipr.link_lookup(ifname=name)
            link = ipr.get_links(idx[0])[0]
            info = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
            return bool(info.get_attr("IFLA_BR_VLAN_FILTERING"))
        finally:
            ipr.link("del", ifname=name)


def _vlan_facts(ipr, br, links) -> tuple[bool | None, tuple]:
    """vlan_filtering and every port's VLAN table; nothing where the kernel has no
    bridge VLAN filtering (it then reports no vlan_filtering attribute at all)."""
    from segguard.host.vlans import bridge_filtering, read_port_vlans

    filtering = bridge_filtering(br)
    if filtering is None:
        return None, ()
    names = {i: l.get_attr("IFLA_IFNAME") for i, l in links.items() if i == br["index"] or l.get_attr("IFLA_MASTER") == br["index"]}
    return filtering, read_port_vlans(ipr, br["index"], names)


def read_host_facts(bridges: list[str]) -> HostFacts:
    """Facts for the named bridges (missing bridges are simply absent)."""
    from pyroute2 import IPRoute

    found: list[BridgeFact] = []
    try:
        with IPRoute() as ipr:
            links = {l["index"]: l for l in ipr.get_links()}
            for name in sorted(set(bridges)):
                br = next((l for l in links.values() if l.get_attr("IFLA_IFNAME") == name), None)
                if br is None:
                    continue
                ports = tuple(sorted(
                    (PortFact(l.get_attr("IFLA_IFNAME"), (l.get_attr("IFLA_ADDRESS") or "").lower())
                     for l in links.values() if l.get_attr("IFLA_MASTER") == br["index"]),
                    key=lambda p: p.name,
                ))
                addrs = tuple(sorted(
                    a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=br["index"])
                ))
                found.append(BridgeFact(name, addrs, ports, *_vlan_facts(ipr, br, links)))
    except OSError as exc:
        raise HostError(f"cannot read links over netlink: {exc}") from exc
    from segguard.host.libvirt import libvirt_ports

    return HostFacts(
        bridges=tuple(found),
        libvirt_ports=libvirt_ports(),
        bridge_conntrack=_bridge_conntrack_available(),
        vlan_filtering=_try_vlan_filtering(),
    )
