"""The scaled lab (topology.plan(..., extra_legacy=K)) and its generated config, without
a kernel: names the kernel accepts, nothing shared between hosts, every extra guest
bound to its own port."""
from __future__ import annotations

import ipaddress

import pytest

from segguard.compile import compile_plan
from segguard.config.validate import load_config
from segguard.host import BridgeFact, HostFacts, PortFact
from segguard.lab import netns as nl
from segguard.lab import scaled, topology
from segguard.verify.expectations import expectations_for


def test_default_lab_is_unchanged_by_the_option():
    assert topology.plan("sgu-") == topology.plan("sgu-", extra_legacy=0)
    assert topology.plan("sgu-").extra_legacy_hosts() == ()
    assert len(topology.plan("sgu-").hosts) == 10


@pytest.mark.parametrize("k", [1, 3, 98, topology.MAX_EXTRA_LEGACY])
def test_extra_guests_share_nothing_and_fit_the_kernel(k):
    topo = topology.plan("sgbp-", extra_legacy=k)
    extras = topo.extra_legacy_hosts()
    assert [h.role for h in extras] == [topology.extra_role(i) for i in range(k)]
    assert len(topo.hosts) == 10 + k
    for field in ("ns", "mac", "port", "port_mac", "ip4", "role"):
        values = [getattr(h, field) for h in topo.hosts if getattr(h, field)]
        assert len(values) == len(set(values)), field
    v6 = [h.ip6 for h in topo.hosts if h.ip6]
    assert len(v6) == len(set(v6))
    lab_net4, lab_net6 = ipaddress.ip_network("10.30.0.0/24"), ipaddress.ip_network("fd00:30::/64")
    for h in extras:
        assert h.segment == "br0" and h.ns.startswith("sgbp-")
        nl.check_ifname(h.port)  # raises past 15 characters
        nl.check_ifname(h.iface)
        assert ipaddress.ip_address(h.ip4) in lab_net4 and h.ip4 != "10.30.0.99"  # .99: the spoofed-source address
        if h.ip6:
            assert ipaddress.ip_address(h.ip6) in lab_net6 and h.ip6 != "fd00:30::99"
    if k >= 2:
        assert extras[1].ip6 and not extras[0].ip6  # some dual-stack, most IPv4-only like the XP guest


def test_extra_legacy_is_capped():
    with pytest.raises(ValueError):
        topology.plan("sgu-", extra_legacy=topology.MAX_EXTRA_LEGACY + 1)
    with pytest.raises(ValueError):
        topology.plan("sgu-", extra_legacy=-1)


def test_generated_config_binds_every_extra_guest_to_its_own_port(tmp_path):
    k = 6
    topo = topology.plan("sgbp-", extra_legacy=k)
    config = load_config(str(scaled.write_config(tmp_path, topo)))
    assert len(config.profiles) == 2 + k
    ports = tuple(PortFact(h.port, h.port_mac) for h in topo.bridged_hosts())
    facts = HostFacts(bridges=(BridgeFact("br0", ("10.30.0.1", "fd00:30::1"), ports),))
    plan = compile_plan(config, facts)
    bound = {b.guest: (b.port, b.mac) for b in plan.bindings}
    for i, h in enumerate(topo.extra_legacy_hosts()):
        assert bound[topology.extra_domain(i)] == (h.port, h.mac)
    # same kind as xp-line3-hmi: an IPv4-only copy has exactly its expectations, renamed
    neighbours = {4: "10.30.0.50", 6: "fd00:30::50"}
    xp = {e.id.split("/", 1)[1] for e in expectations_for(config, plan, neighbours, ["xp-line3-hmi"])}
    lx0 = {e.id.split("/", 1)[1] for e in expectations_for(config, plan, neighbours, [topology.extra_domain(0)])}
    lx1 = {e.id.split("/", 1)[1] for e in expectations_for(config, plan, neighbours, [topology.extra_domain(1)])}
    assert lx0 == xp
    # the dual-stack copy adds the IPv6 checks and loses only "no IPv6 at all", either way
    assert xp - lx1 == {"anti-spoof/no-ipv6", "anti-spoof/no-ipv6-in"}
    assert any(k.endswith("6") for k in lx1 - xp) and len(lx1) > len(xp)
