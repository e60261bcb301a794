"""Prove the kernel lab provides what the later kernel_lab tests rely on.

Each test works in its own fresh network namespace (``sgk`` prefix), removed even
when the test fails. Run with ``python -m tests.kernel_lab.runner``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.kernel_lab

RTEXT_FILTER_BRVLAN = 2
TABLE = "sgk_lab"


@pytest.fixture
def ns():
    from pyroute2 import netns

    name = f"sgk{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


@pytest.fixture
def ipr(ns):
    from pyroute2 import NetNS

    with NetNS(ns) as ipr:
        yield ipr


def _link_index(ipr, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    assert found, f"{name} not found"
    return found[0]


def _bridge_vlan_filtering(ipr, index: int) -> int | None:
    link = ipr.get_links(index)[0]
    data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    return data.get_attr("IFLA_BR_VLAN_FILTERING")


def _port_vlans(ipr, index: int) -> dict[int, int]:
    """vid -> flags of a bridge port, as the kernel reports them over netlink."""
    vlans: dict[int, int] = {}
    for msg in ipr.link("dump", family=socket.AF_BRIDGE, ext_mask=RTEXT_FILTER_BRVLAN):
        if msg["index"] != index:
            continue
        spec = msg.get_attr("IFLA_AF_SPEC")
        for info in (spec.get_attrs("IFLA_BRIDGE_VLAN_INFO") if spec else []):
            vlans[info["vid"]] = info["flags"]
    return vlans


def test_bridge_vlan_filtering_and_port_vlan(ipr):
    ipr.link("add", ifname="sgkbr0", kind="bridge")
    br = _link_index(ipr, "sgkbr0")
    assert _bridge_vlan_filtering(ipr, br) == 0

    ipr.link("set", index=br, kind="bridge", br_vlan_filtering=1)
    assert _bridge_vlan_filtering(ipr, br) == 1

    ipr.link("add", ifname="sgkv0", kind="veth", peer="sgkv1")
    port = _link_index(ipr, "sgkv0")
    ipr.link("set", index=port, master=br)
    ipr.link("set", index=port, state="up")
    ipr.link("set", index=br, state="up")

    ipr.vlan_filter("add", index=port, vlan_info={"vid": 42})
    vlans = _port_vlans(ipr, port)
    assert 42 in vlans, f"vid 42 not on port: {vlans}"
    # the default PVID 1 is still there: deleting it must make it go away
    assert 1 in vlans, vlans
    ipr.vlan_filter("del", index=port, vlan_info={"vid": 1})
    vlans = _port_vlans(ipr, port)
    assert 1 not in vlans and 42 in vlans, vlans


def test_8021q_vlan_subinterface(ipr):
    ipr.link("add", ifname="sgkq0", kind="veth", peer="sgkq1")
    parent = _link_index(ipr, "sgkq0")
    ipr.link("add", ifname="sgkq0.42", kind="vlan", link=parent, vlan_id=42)
    link = ipr.get_links(_link_index(ipr, "sgkq0.42"))[0]
    info = link.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "vlan"
    assert info.get_attr("IFLA_INFO_DATA").get_attr("IFLA_VLAN_ID") == 42


NFT_SNIPPET = r"""
import json, sys
import nftables
nft = nftables.Nftables()
nft.set_json_output(True)
T = sys.argv[1]
rc, out, err = nft.json_cmd({"nftables": [
    {"add": {"table": {"family": "bridge", "name": T}}},
    {"add": {"chain": {"family": "bridge", "table": T, "name": "fwd", "type": "filter",
                       "hook": "forward", "prio": 0, "policy": "drop"}}},
    {"add": {"rule": {"family": "bridge", "table": T, "chain": "fwd", "expr": [
        {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                   "right": ["established", "related"]}},
        {"accept": None}]}}},
]})
if rc != 0:
    print(json.dumps({"stage": "add", "rc": rc, "err": err}))
    sys.exit(0)
rc, out, err = nft.json_cmd({"nftables": [{"list": {"table": {"family": "bridge", "name": T}}}]})
print(json.dumps({"stage": "list", "rc": rc, "err": err, "out": out}))
"""


def _nft_in(ns: str, *args: str) -> dict:
    res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", NFT_SNIPPET, *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_nftables_bridge_ct_state_in_namespace(ns):
    res = _nft_in(ns, TABLE)
    assert res["stage"] == "list" and res["rc"] == 0, res
    items = res["out"]["nftables"]
    chains = [i["chain"] for i in items if "chain" in i]
    assert any(c["name"] == "fwd" and c["family"] == "bridge" and c.get("hook") == "forward"
               and c.get("policy") == "drop" for c in chains), chains
    rules = [i["rule"] for i in items if "rule" in i]
    assert len(rules) == 1, rules
    expr = rules[0]["expr"]
    match = expr[0]["match"]
    assert match["left"] == {"ct": {"key": "state"}}, expr
    assert sorted(match["right"]) == ["established", "related"], expr
    assert {"accept": None} in expr, expr

    # the table lives only in the namespace, not in the lab's root namespace
    import nftables

    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, err = nft.json_cmd({"nftables": [{"list": {"ruleset": None}}]})
    assert rc == 0, err
    root_tables = [i["table"]["name"] for i in out["nftables"] if "table" in i]
    assert TABLE not in root_tables, root_tables
