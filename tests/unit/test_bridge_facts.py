"""A bridge's facts kept up to date from the link monitor's changes (the agent's bind
road) are the facts a reading of the whole link table gives, indexes included."""
from __future__ import annotations

import random

import pytest

from segguard.agent.events import LinkMonitor
from segguard.agent.reconcile import TopologyReader
from segguard.host import HostFacts, rtnl
from segguard.host.netlink import bridge_facts
from segguard.host.rtnl import Link

BRIDGES = ["br0", "br1", "br9"]  # br9 never exists


class Kernel:
    """A link table changed the way LinkMonitor.read changes its own, one event each."""

    def __init__(self, monkeypatch, log_kept: int):
        mon = LinkMonitor.__new__(LinkMonitor)  # no socket: the events are made here
        mon.links, mon.addr_version, mon.overflowed = {}, {}, False
        mon.epoch, mon._log, mon._log_start = 0, [], 0
        mon.LOG_KEPT = log_kept
        self.mon, self.next_index, self.addrs = mon, 1, {}
        monkeypatch.setattr(rtnl, "links", lambda: dict(mon.links))
        monkeypatch.setattr(rtnl, "addresses", lambda index: self.addrs.get(index, ()))
        mon.snapshot()

    def set(self, link: Link | None, index: int) -> None:
        prev = self.mon.links.get(index)
        if link is None:
            self.mon.links.pop(index, None)
        else:
            self.mon.links[index] = link
        self.mon._changed(prev, link)

    def new_index(self) -> int:
        self.next_index += 1
        return self.next_index

    def address(self, index: int, addrs: tuple[str, ...]) -> None:
        self.addrs[index] = addrs
        self.mon.addr_version[index] = self.mon.addr_version.get(index, 0) + 1


def _step(k: Kernel, rnd: random.Random, names: list[str]) -> str:
    links = k.mon.links
    bridges = {l.name: i for i, l in links.items() if l.name.startswith("br")}
    ports = [i for i, l in links.items() if not l.name.startswith("br")]
    mac = lambda: "fe:54:00:00:%02x:%02x" % (rnd.randrange(4), rnd.randrange(256))  # noqa: E731 - shared MACs too
    op = rnd.choices(["add", "delete", "move", "rename", "mac", "bridge", "address", "snapshot"],
                     [30, 20, 15, 8, 8, 3, 4, 2])[0]
    if op == "add" or not ports and op in ("delete", "move", "rename", "mac"):
        free = [n for n in names if n not in {l.name for l in links.values()}]
        if free:
            master = rnd.choice([*bridges.values(), None])
            i = k.new_index()
            k.set(Link(i, rnd.choice(free), master, mac()), i)
        return "add"
    if op == "delete":
        i = rnd.choice(ports)
        k.set(None, i)
    elif op == "move":
        i = rnd.choice(ports)
        k.set(Link(i, links[i].name, rnd.choice([*bridges.values(), None]), links[i].mac), i)
    elif op == "rename":
        i = rnd.choice(ports)
        free = [n for n in names if n not in {l.name for l in links.values()}]
        if free:
            k.set(Link(i, rnd.choice(free), links[i].master, links[i].mac), i)
    elif op == "mac":
        i = rnd.choice(ports)
        k.set(Link(i, links[i].name, links[i].master, mac()), i)
    elif op == "bridge":  # br1 goes (its ports stay, masterless, as the kernel leaves them) or comes back
        if "br1" in bridges:
            gone = bridges["br1"]
            for i in [i for i, l in links.items() if l.master == gone]:
                k.set(Link(i, links[i].name, None, links[i].mac), i)
            k.set(None, gone)
        else:
            i = k.new_index()
            k.set(Link(i, "br1", None, "02:00:00:00:00:02"), i)
    elif op == "address":
        if bridges:
            k.address(rnd.choice(list(bridges.values())), (f"10.0.{rnd.randrange(3)}.1/24",))
    elif op == "snapshot":
        k.mon.snapshot()
    return op


def _indexes(b) -> tuple:
    return b.port_names, b.port_keys, b.ports_by_mac, b.by_name


@pytest.mark.parametrize("seed,log_kept", [(1, 256), (2, 256), (3, 3), (4, 1)])
def test_facts_kept_up_to_date_by_changes_equal_a_whole_reading(monkeypatch, seed, log_kept):
    k = Kernel(monkeypatch, log_kept)
    for name in ("br0", "br1"):
        i = k.new_index()
        k.set(Link(i, name, None, "02:00:00:00:00:01"), i)
    reader = TopologyReader(caps=HostFacts(vlan_filtering=False), with_libvirt=False)
    reader.monitor = k.mon
    whole_reads = []
    real = bridge_facts

    def counted(names, links, addresses, vlans):
        whole_reads.append(list(names))
        return real(names, links, addresses, vlans)

    monkeypatch.setattr("segguard.host.netlink.bridge_facts", counted)
    rnd = random.Random(seed)
    names = [f"vnet{i}" for i in range(40)]
    readings = 0
    for _ in range(600):
        for _ in range(rnd.randrange(1, 4)):  # a few events per reading, as a burst brings them
            _step(k, rnd, names)
        got = reader.facts(BRIDGES)
        want = real(BRIDGES, k.mon.links, rtnl.addresses, vlans=False)
        readings += 1
        assert got.bridges == tuple(want), (got.bridges, want)
        for g, w in zip(got.bridges, want):
            assert _indexes(g) == _indexes(w)
        assert got.port_names == HostFacts(bridges=tuple(want)).port_names
    if log_kept >= 256:
        # the changes, not whole readings, kept them: only a bridge (re)appearing or a
        # snapshot made a bridge be read whole
        assert len(whole_reads) < readings / 4, (len(whole_reads), readings)


def test_a_reading_with_nothing_changed_is_the_same_fact():
    """No change: the very same BridgeFact (its indexes already built), which is what
    lets the bind road compare two readings by identity."""
    from segguard.host import BridgeFact, PortFact
    from segguard.host.netlink import bridge_fact_updated

    old = BridgeFact("br0", ("10.0.0.1/24",), (PortFact("vnet0", "fe:54:00:00:00:01"),))
    assert bridge_fact_updated(old, 1, [], ("10.0.0.1/24",)) is old
    # a change on another bridge is none of its own
    other = [(None, Link(7, "vnet7", 2, "fe:54:00:00:00:07"))]
    assert bridge_fact_updated(old, 1, other, ("10.0.0.1/24",)) is old
    moved = bridge_fact_updated(old, 1, other, ("10.0.0.2/24",))
    assert moved.addresses == ("10.0.0.2/24",) and moved.ports == old.ports and moved.by_name == old.by_name
    # the bridge link itself renamed or gone: read it whole
    assert bridge_fact_updated(old, 1, [(Link(1, "br0", None, "02:00:00:00:00:01"), None)], ()) is None
