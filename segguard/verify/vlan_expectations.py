"""What the VLAN layer must hold (pure): from a legacy guest's port, nothing reaches a
host on another VLAN of the same bridge -- untagged, tagged for that VLAN (the
management VLAN included), priority-tagged (VLAN 0), double-tagged behind the guest's
own VLAN, or behind an 802.1ad outer tag.

These hold with the VLAN filter alone (they are what the bridge's VLAN table decides),
so a vantage can run them with the nftables table present or deleted. Each "blocked"
probe's control is the same destination reached on that VLAN from the uplink (sender
"uplink", the frame tagged with the destination's VLAN): the path and the sink work,
so "not arrived" means the filter dropped it. "uplink" is whatever trunks those VLANs
tagged at the vantage: the lab's uplink port, or the live vantage's probe port B.
"""
from __future__ import annotations

from dataclasses import replace

from segguard.config.validate import Config
from segguard.plan import Plan
from segguard.verify.expectations import Expectation, Intent

TPID_8021Q, TPID_8021AD = 0x8100, 0x88A8


def vlan_expectations(config: Config, plan: Plan, other_vlans: dict[int, str], guests: list[str] | None = None,
                      dport: int = 9999) -> list[Expectation]:
    """`other_vlans`: VLAN -> IPv4 address of a host on that VLAN of the guest's bridge
    (what the vantage knows: a lab host, or a probe port it put there). Guests on a
    bridge the VLAN layer does not manage get none (there is no filter to prove)."""
    managed = {bv.bridge for bv in plan.vlans if bv.managed}
    profiles = {lp.name: lp.profile for lp in config.profiles}
    mgmt = set(config.site.management.vlans)
    out: list[Expectation] = []
    for b in plan.bindings:
        if (guests and b.guest not in guests) or b.bridge not in managed or not b.port or not b.ipv4:
            continue
        own = profiles[b.profile].vlan
        for vid, addr in sorted(other_vlans.items()):
            if vid == own:
                continue
            what = f"{'management ' if vid in mgmt else ''}VLAN {vid}"
            base = Intent("guest", f"addr:{addr}", "udp", 4, addr, dport=dport)
            control = Intent("uplink", f"addr:{addr}", "udp", 4, addr, src_ip="10.30.0.99", dport=dport,
                             vlan_tags=((TPID_8021Q, vid),))
            cases = (
                ("untagged", (), f"an untagged frame to {addr} on {what} does not leave VLAN {own}"),
                ("tagged", ((TPID_8021Q, vid),), f"an 802.1Q frame tagged for {what} is dropped at the guest's port"),
                ("vlan0", ((TPID_8021Q, 0),), f"a priority-tagged (VLAN 0) frame to {addr} stays on VLAN {own}"),
                ("double", ((TPID_8021Q, own), (TPID_8021Q, vid)),
                 f"a double-tagged frame (outer {own}, inner {vid}) does not reach {what}"),
                ("qinq", ((TPID_8021AD, vid), (TPID_8021Q, vid)), f"an 802.1ad outer tag for {vid} does not reach {what}"),
            )
            for key, tags, desc in cases:
                out.append(Expectation(f"{b.guest}/vlan/{key}/{vid}", b.guest, "vlan", desc, "blocked",
                                       replace(base, vlan_tags=tags), control))
    return out
