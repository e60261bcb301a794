"""The rtnetlink reader (segguard/host/rtnl.py) and the agent's event-fed link table
against a real kernel: the links, MACs, masters and bridge addresses they report are
pyroute2's for the same namespace, and the facts the agent builds from its
LinkMonitor follow taps created, moved, re-addressed and deleted exactly as a fresh
dump does."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from segguard.host import HostFacts, rtnl
from tests.netns.conftest import scratch_netns

pytestmark = pytest.mark.netns


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns("rtnl") as name:
        for br in ("br0", "br1"):
            ip("link", "add", br, "type", "bridge")
            ip("link", "set", br, "up")
        ip("addr", "add", "10.9.0.1/24", "dev", "br0")
        ip("addr", "add", "fd00:9::1/64", "dev", "br0")
        for i in range(6):
            ip("link", "add", f"vnet{i}", "type", "veth", "peer", "name", f"vpeer{i}")
            ip("link", "set", f"vnet{i}", "master", "br0" if i < 4 else "br1")
        yield name


def pyroute2_view() -> tuple[dict, dict]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = {l["index"]: (l.get_attr("IFLA_IFNAME"), l.get_attr("IFLA_MASTER") or None,
                              (l.get_attr("IFLA_ADDRESS") or "").lower()) for l in ipr.get_links()}
        addrs = {i: tuple(sorted(a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=i))) for i in links}
    return links, addrs


def test_links_and_addresses_are_pyroute2s(ns):
    links = rtnl.links()
    want_links, want_addrs = pyroute2_view()
    assert {i: (l.name, l.master, l.mac) for i, l in links.items()} == want_links
    assert {i: rtnl.addresses(i) for i in links} == want_addrs
    br0 = next(l for l in links.values() if l.name == "br0")
    assert (br0.kind, rtnl.link(br0.index)) == ("bridge", br0)
    assert "10.9.0.1" in rtnl.addresses(br0.index) and "fd00:9::1" in rtnl.addresses(br0.index)
    assert rtnl.link(999999) is None


def test_the_monitor_fed_facts_follow_every_change_as_a_dump_does(ns):
    from segguard.agent.events import LinkMonitor
    from segguard.agent.reconcile import TopologyReader

    caps = HostFacts()  # the host kernel: no VLAN filtering
    fed = TopologyReader(caps=caps, with_libvirt=False)
    dumped = TopologyReader(caps=caps, with_libvirt=False)
    mon = LinkMonitor()
    fed.monitor = mon
    try:
        def same() -> None:
            mon.read()  # the agent reads its events before it reconciles
            assert fed.facts(["br0", "br1"]) == dumped.facts(["br0", "br1"])

        same()
        ip("link", "add", "vnet9", "address", "fe:54:00:00:00:09", "type", "veth", "peer", "name", "vpeer9")
        ip("link", "set", "vnet9", "master", "br0")
        same()
        ip("link", "set", "vnet9", "address", "fe:54:00:00:00:10")  # a MAC changed in place
        same()
        ip("link", "set", "vnet9", "master", "br1")                  # moved to another bridge
        same()
        ip("addr", "add", "10.9.1.1/24", "dev", "br0")               # the bridge re-addressed
        same()
        assert "10.9.1.1" in fed.facts(["br0"]).bridges[0].addresses
        ip("link", "del", "vnet9")
        ip("link", "set", "vnet0", "nomaster")
        same()
        assert "vnet9" not in fed.facts(["br1"]).port_names and "vnet0" not in fed.facts(["br0"]).port_names
        # lost events: the table is read again
        ip("link", "add", "vnet8", "type", "veth", "peer", "name", "vpeer8")
        ip("link", "set", "vnet8", "master", "br0")
        mon.overflowed = False
        mon.links.clear()
        mon.snapshot()
        assert fed.facts(["br0"]) == dumped.facts(["br0"])
    finally:
        mon.close()


def test_the_vlan_filtering_probe_answers_as_pyroute2_does_and_leaves_nothing(ns):
    from tests.conftest import _bridge_vlan_filtering_works

    def links() -> set[str]:
        return {l.name for l in rtnl.links().values()}

    before = links()
    assert rtnl.vlan_filtering_works() is _bridge_vlan_filtering_works()
    assert links() == before
    # a scratch bridge left by a probe that died half-way is replaced, then removed
    ip("link", "add", "sgprobevf0", "type", "bridge")
    assert rtnl.vlan_filtering_works() is _bridge_vlan_filtering_works()
    assert links() == before


def test_the_agent_s_event_and_fact_readers_do_not_load_pyroute2(ns):
    """pyroute2 is for programming VLAN filters; loaded for reading links it held ~10 MB
    of the agent's resident memory (issue 5's 80 MB at 1,000 guests)."""
    import sys

    code = """
import sys
from segguard.agent.events import LinkMonitor
from segguard.agent.reconcile import TopologyReader
mon = LinkMonitor()
reader = TopologyReader(with_libvirt=False)
reader.monitor = mon
reader.caps()
reader.facts(["br0", "br1"])
mon.read()
print(sorted(m for m in sys.modules if m.split(".")[0] == "pyroute2"))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
