"""The rtnetlink reader's VLAN tables (segguard/host/netlink.py port_vlans over
host/rtnl.py) on a VLAN-aware bridge, which the host kernel cannot build: the same
tables pyroute2 reports (the reader segguard had before, kept here as the oracle), for a trunk of
every VLAN (compressed ranges), an access port, a tagged port, a port with an empty
table and the bridge itself; and the facts the agent builds from them."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.netns.conftest import scratch_netns

pytestmark = pytest.mark.kernel_lab

PORTS = {  # port -> `bridge vlan` commands after the bridge's default (pvid 1 untagged)
    "trunk0": ["del vid 1", "add vid 2-4094"],
    "acc30": ["del vid 1", "add vid 30 pvid untagged"],
    "tag3040": ["add vid 30", "add vid 40", "add vid 100-110"],
    "none0": ["del vid 1"],
    "plain0": [],
}


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True)


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns("vlan", stem="sgr") as name:
        sh("ip", "link", "add", "br0", "type", "bridge", "vlan_filtering", "1")
        sh("bridge", "vlan", "add", "dev", "br0", "vid", "250", "self")
        for i, (port, cmds) in enumerate(PORTS.items()):
            sh("ip", "link", "add", port, "type", "veth", "peer", "name", f"peer{i}")
            sh("ip", "link", "set", port, "master", "br0")
            for c in cmds:
                sh("bridge", "vlan", *c.split()[:1], "dev", port, *c.split()[1:])
        yield name


def pyroute2_port_vlans(ipr, bridge_index: int, names: dict[int, str]) -> tuple:
    """The VLAN tables as pyroute2 parses an AF_BRIDGE dump (compressed ranges)."""
    import socket

    from segguard.host import rtnl
    from segguard.host.vlans import PortVlans, port_vlans_from_infos

    out = {}
    for msg in ipr.link("dump", family=socket.AF_BRIDGE, ext_mask=rtnl.RTEXT_FILTER_BRVLAN_COMPRESSED):
        idx = msg["index"]
        if idx not in names or (idx != bridge_index and msg.get_attr("IFLA_MASTER") not in (bridge_index, None)):
            continue
        spec = msg.get_attr("IFLA_AF_SPEC")
        out[idx] = port_vlans_from_infos(names[idx], [(i["flags"], i["vid"]) for i in (spec.get_attrs("IFLA_BRIDGE_VLAN_INFO") if spec else [])])
    for idx, name in names.items():
        out.setdefault(idx, PortVlans(name))
    return tuple(sorted(out.values(), key=lambda p: p.port))


def test_vlan_tables_are_pyroute2s(ns):
    from pyroute2 import IPRoute

    from segguard.host import rtnl
    from segguard.host.netlink import bridge_facts, port_vlans

    links = rtnl.links()
    br = next(l for l in links.values() if l.name == "br0")
    assert br.vlan_filtering is True
    names = {br.index: "br0", **{l.index: l.name for l in links.values() if l.master == br.index}}
    with IPRoute() as ipr:
        theirs = pyroute2_port_vlans(ipr, br.index, names)
    ours = port_vlans(br.index, names)
    assert ours == theirs
    by_port = {p.port: p for p in ours}
    assert by_port["acc30"].pvid == 30 and by_port["acc30"].untagged == (30,)
    assert len(by_port["trunk0"].vids) == 4093 and by_port["none0"].vids == ()
    assert 250 in by_port["br0"].vids and set(range(100, 111)) <= set(by_port["tag3040"].vids)
    fact, = bridge_facts(["br0"], links, rtnl.addresses, vlans=True)
    assert fact.ports and {p.name for p in fact.ports} == set(PORTS)
    assert fact.vlan_filtering is True and fact.vlans == ours


def test_the_vlan_filtering_probe_says_yes_here_and_leaves_nothing():
    """The agent's capability probe over rtnl (host/rtnl.py vlan_filtering_works): the
    host kernel has no VLAN filtering, so its 'yes' is seen only here."""
    from segguard.host import rtnl
    from segguard.host.netlink import _try_vlan_filtering

    with scratch_netns("vprobe", stem="sgr"):
        before = {l.name for l in rtnl.links().values()}
        assert rtnl.vlan_filtering_works() is True
        assert _try_vlan_filtering() is True
        sh("ip", "link", "add", "sgprobevf0", "type", "bridge")  # left by a probe that died
        assert rtnl.vlan_filtering_works() is True
        assert {l.name for l in rtnl.links().values()} == before
