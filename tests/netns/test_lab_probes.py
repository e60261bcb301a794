"""The lab topology and the probe engine, against the real host kernel.

Each positive test pairs its "arrives" with a "does not arrive" somewhere
(another sink, a filtered path), so a sink that captures nothing -- or
everything -- fails the test instead of passing it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nftables
import pytest

from segguard.lab import netns as nl
from segguard.lab import topology
from segguard.lab.topology import Lab
from segguard.verify.probes import (
    BROADCAST,
    Probe,
    ProbeError,
    ProbeSession,
    build_frame,
    new_marker,
    probe_port,
)

from .conftest import unique_prefix

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
PACKET_HOST, PACKET_BROADCAST = 0, 1
START_NETNS = os.readlink("/proc/thread-self/ns/net")  # at import, before any lab code ran


def probe(lab: Lab, src: str, dst: str, kind: str = "tcp", family: int = 4, **kw: Any) -> Probe:
    """A probe from host *src* to host *dst*, L2-addressed the way a real host would.

    Off-bridge targets (mgmt, inet) are reached through the router's MAC.
    """
    s, d = lab.host(src), lab.host(dst)
    next_hop = lab.host("router") if d.segment != "br0" else d
    defaults: dict[str, Any] = {"dport": {"tcp": 443, "udp": 53}.get(kind, 0)}
    defaults.update(kw)
    return Probe(
        kind=kind,  # type: ignore[arg-type]
        family=family,
        src_mac=s.mac,
        dst_mac=next_hop.mac,
        src_ip=s.ip(family),
        dst_ip=d.ip(family),
        **defaults,
    )


# ------------------------------------------------------------------ lab itself


def test_lab_shape(lab: Lab) -> None:
    assert lab.build_seconds < 3.0, f"lab build took {lab.build_seconds:.2f}s"
    assert set(nl.list_netns(lab.prefix)) == {h.ns for h in lab.hosts}
    for h in lab.hosts:
        assert len(h.iface) <= 15 and (h.port is None or len(h.port) <= 15)
    with nl.ipr(lab.hv_ns) as ip:
        names = {link.get_attr("IFLA_IFNAME") for link in ip.get_links()}
        assert {"br0", "vnet7", "vnet8", "vnet9", "dc0", "app0", "jump0", "rtr0"} <= names
        vnet8 = ip.get_links(nl.link_index(ip, "vnet8"))[0]
        assert vnet8.get_attr("IFLA_ADDRESS") == "fe:54:00:aa:00:02"
    with nl.ipr(lab.host("xp").ns) as ip:
        eth0 = ip.get_links(nl.link_index(ip, "eth0"))[0]
        assert eth0.get_attr("IFLA_ADDRESS") == "52:54:00:aa:00:01"
        assert not ip.get_addr(family=10, index=eth0["index"]), "xp must have no IPv6"
    with nl.ipr(lab.host("scada").ns) as ip:
        addrs = ip.get_addr(family=10, index=nl.link_index(ip, "eth0"))
        globals_ = [a for a in addrs if a.get_attr("IFA_ADDRESS") == "fd00:30::16"]
        assert globals_ and not globals_[0]["flags"] & 0x40, "IPv6 address is tentative (DAD)"
    # enter_netns() always returned this thread to where it started
    assert os.readlink("/proc/thread-self/ns/net") == START_NETNS


def test_build_is_idempotent_and_destroy_leaves_nothing() -> None:
    prefix = unique_prefix("sgd")
    try:
        first = topology.build(prefix)
        # A second build with the same prefix clears the leftovers first.
        second = topology.build(prefix)
        assert set(nl.list_netns(prefix)) == {h.ns for h in second.hosts}
        del first
    finally:
        topology.destroy(prefix)
    assert nl.list_netns(prefix) == []


def test_sigterm_removes_namespaces() -> None:
    """A crashed / killed orchestrator must not leave its lab behind."""
    prefix = unique_prefix("sgk")
    code = (
        "import sys, time\n"
        "from segguard.lab import topology\n"
        f"topology.build({prefix!r})\n"
        "print('built', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "built"
        assert len(nl.list_netns(prefix)) == 10
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert proc.returncode != 0  # the signal still terminates the process
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftovers = nl.list_netns(prefix)
        topology.destroy(prefix)
    assert leftovers == []


# ------------------------------------------------------------------ reachability


TARGETS = ("app", "dc", "jump", "hypervisor", "inet", "mgmt")


def test_ordinary_guest_reaches_everything_v4_v6(lab: Lab, session: ProbeSession) -> None:
    batch = []
    for target in TARGETS:
        for family in (4, 6):
            for kind in ("tcp", "udp", "icmp"):
                # Ask the intended sink and an unrelated one: unicast to a known
                # MAC must not leak (no flooding, sinks are not promiscuous).
                other = "scada" if target != "scada" else "dc"
                batch.append((f"{target}-{kind}{family}", "guest", probe(lab, "guest", target, kind, family),
                              [target, other]))
    report = session.run_detailed(batch)
    missing = [pid for pid, r in report.results.items() if not all(v for s, v in r.items() if s != "scada")]
    leaked = [pid for pid, r in report.results.items() if r.get("scada")]
    assert not missing, f"did not arrive: {missing}"
    assert not leaked, f"leaked to scada: {leaked}"
    # Every one arrived addressed to the sink's own MAC (PACKET_HOST): bridged
    # ones as sent, routed ones with the router's rewritten L2 header.
    for pid, seen in report.seen_at.items():
        target = pid.split("-")[0]
        assert seen[target].pkttypes == (PACKET_HOST,), (pid, seen)


def test_l2_oddities_survive_the_bridge(lab: Lab, session: ProbeSession) -> None:
    g, app = lab.host("guest"), lab.host("app")
    udp = probe(lab, "guest", "app", "udp", 4, dport=9)
    batch = [
        ("dot1q", "guest", Probe(**{**udp.__dict__, "vlan_tags": ((0x8100, 30),)}), ["app"]),
        ("prio-tag", "guest", Probe(**{**udp.__dict__, "vlan_tags": ((0x8100, 0),)}), ["app"]),
        ("qinq", "guest", Probe(**{**udp.__dict__, "vlan_tags": ((0x88A8, 100), (0x8100, 30))}), ["app"]),
        ("llc-snap", "guest", Probe(**{**udp.__dict__, "llc_snap": True}), ["app"]),
        ("llc-snap-tagged", "guest", Probe(**{**udp.__dict__, "llc_snap": True, "vlan_tags": ((0x8100, 5),)}),
         ["app"]),
        ("arp", "guest", Probe("arp", src_mac=g.mac, dst_mac=BROADCAST, src_ip=g.ip4, dst_ip=app.ip4),
         ["app", "dc", "hypervisor", "inet"]),
        ("raw", "guest", Probe("raw", src_mac=g.mac, dst_mac=app.mac, ethertype=0x88B5), ["app"]),
        ("frag4", "guest", Probe(**{**udp.__dict__, "frag_offset": 100, "more_fragments": True}), ["app"]),
        ("ext6", "guest", probe(lab, "guest", "app", "tcp", 6, ipv6_ext=("hbh", "dest", "frag"),
                                more_fragments=True), ["app"]),
        ("routing6", "guest", probe(lab, "guest", "app", "udp", 6, ipv6_ext=("routing",)), ["app"]),
    ]
    report = session.run_detailed(batch)
    assert all(report.results[p]["app"] for p, *_ in batch), report.results
    # Broadcast ARP floods the segment, but the router does not route it to inet.
    assert report.results["arp"] == {"app": True, "dc": True, "hypervisor": True, "inet": False}
    assert report.seen_at["arp"]["app"].pkttypes == (PACKET_BROADCAST,)
    # The ARP marker only exists in the Ethernet trailer: it arrived, so veth
    # and the bridge carried the padding through.
    arp_frame = report.frames["arp"]
    assert arp_frame.index(report.markers["arp"].encode()) >= 42
    assert report.seen_at["arp"]["app"].length == len(arp_frame)
    # The kernel moves the outer tag to metadata on receive; the sink reports it.
    assert report.seen_at["dot1q"]["app"].vlans == ((0x8100, 30),)
    assert report.seen_at["qinq"]["app"].vlans == ((0x88A8, 100),)
    assert report.seen_at["qinq"]["app"].length == len(report.frames["qinq"]) - 4


def test_nft_bridge_drop_is_seen_as_not_arriving(lab: Lab, session: ProbeSession) -> None:
    """Negative control: the engine must notice a frame a bridge rule dropped."""
    app, jump = lab.host("app"), lab.host("jump")
    ruleset = {"nftables": [
        {"add": {"table": {"family": "bridge", "name": "sgltest"}}},
        {"add": {"chain": {"family": "bridge", "table": "sgltest", "name": "forward",
                           "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}},
        {"add": {"rule": {"family": "bridge", "table": "sgltest", "chain": "forward", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": app.ip4}},
            {"drop": None},
        ]}}},
    ]}
    batch = [
        ("to-app", "guest", probe(lab, "guest", "app", "tcp", 4), ["app"]),
        ("to-jump", "guest", probe(lab, "guest", "jump", "tcp", 4), ["jump"]),
        ("to-app6", "guest", probe(lab, "guest", "app", "tcp", 6), ["app"]),
    ]
    before = session.run(batch)
    assert before == {"to-app": {"app": True}, "to-jump": {"jump": True}, "to-app6": {"app": True}}
    with nl.enter_netns(lab.hv_ns):
        # libnftables opens its netlink socket in the namespace it runs in.
        nft = nftables.Nftables()
        rc, _out, err = nft.json_cmd(ruleset)
    assert rc == 0, err
    after = session.run(batch)
    assert after == {"to-app": {"app": False}, "to-jump": {"jump": True}, "to-app6": {"app": True}}
    assert jump.ip4 and session.last_report and session.last_report.sink_frames["app"] >= 1
    with nl.enter_netns(lab.hv_ns):
        rc, _out, err = nftables.Nftables().cmd("delete table bridge sgltest")
    assert rc == 0, err
    assert session.run(batch)["to-app"] == {"app": True}


# ------------------------------------------------------------------ engine robustness


def test_large_batch_no_drops(lab: Lab, session: ProbeSession) -> None:
    """A few hundred probes from several senders at once: none may go missing."""
    batch = []
    for i in range(400):
        src = ("guest", "xp", "dc", "jump")[i % 4]
        dst = ("app", "hypervisor", "inet", "mgmt")[i % 4]
        batch.append((f"p{i}", src, probe(lab, src, dst, ("tcp", "udp", "icmp")[i % 3], 4, sport=20000 + i),
                      [dst]))
    results = session.run(batch)
    missing = [pid for pid, r in results.items() if not all(r.values())]
    assert not missing, f"{len(missing)} of {len(batch)} missing: {missing[:10]}"


def test_sink_that_cannot_listen_is_an_error(lab: Lab) -> None:
    with pytest.raises(ProbeError):
        with ProbeSession({}, {"ghost": (lab.host("app").ns, "nosuch0")}, start_timeout=5):
            pass
    with pytest.raises(ProbeError):
        with ProbeSession({}, {"ghost": (lab.prefix + "nope", "eth0")}):
            pass


def test_probe_port_on_existing_bridge(lab: Lab) -> None:
    ns = lab.prefix + "pp"
    mac = "52:54:00:fa:00:01"
    app = lab.host("app")
    with probe_port("br0", lab.hv_ns, "sgpp0", mac, ns) as port:
        assert nl.netns_exists(ns)
        senders = {"pp": port.endpoint}
        sinks = {"app": lab.sink("app"), "pp": port.endpoint}
        with ProbeSession(senders, sinks, settle=0.4) as s:
            p = Probe("udp", 4, mac, app.mac, "10.30.0.99", app.ip4, dport=9)
            assert s.run([("pp", "pp", p, ["app", "pp"])]) == {"pp": {"app": True, "pp": False}}
    assert not nl.netns_exists(ns)
    with nl.ipr(lab.hv_ns) as ip:
        assert not ip.link_lookup(ifname="sgpp0")


def test_build_frame_shapes() -> None:
    """Frame bytes are what the spec says (no netns needed, but cheap to keep here)."""
    m = new_marker()
    f = build_frame(Probe("udp", 4, "52:54:00:00:00:02", "52:54:00:00:00:03", "10.0.0.1", "10.0.0.2",
                          dport=9, vlan_tags=((0x88A8, 100), (0x8100, 30)), llc_snap=True), m)
    assert f[12:14] == b"\x88\xa8" and f[14:16] == (100).to_bytes(2, "big")
    assert f[16:18] == b"\x81\x00" and f[18:20] == (30).to_bytes(2, "big")
    length = int.from_bytes(f[20:22], "big")
    assert f[22:30] == b"\xaa\xaa\x03\x00\x00\x00\x08\x00" and length == len(f) - 22
    assert m in f
    arp = build_frame(Probe("arp", src_mac="52:54:00:00:00:02", src_ip="10.0.0.1", dst_ip="10.0.0.2"), m)
    assert arp[12:14] == b"\x08\x06" and arp[42:42 + len(m)] == m
    frag = build_frame(Probe("tcp", 4, src_ip="10.0.0.1", dst_ip="10.0.0.2", frag_offset=3,
                             more_fragments=True), m)
    assert int.from_bytes(frag[20:22], "big") == 0x2000 | 3
    with pytest.raises(ValueError):
        Probe("tcp", 6, src_ip="10.0.0.1", dst_ip="10.0.0.2")
