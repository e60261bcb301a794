"""On a kernel without bridge VLAN filtering (this host's), apply still enforces the
nftables layer and warns; status says the VLAN layer is missing; `vlan_layer_required`
turns that into an error with nothing applied. The VLAN layer itself is proven in the
kernel lab (tests/kernel_lab/test_vlan_layer.py)."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest

from segguard.lab import netns as nl

def _kernel_has_vlan_filtering() -> bool:
    from tests.conftest import _bridge_vlan_filtering_works  # asks in a throwaway namespace

    return _bridge_vlan_filtering_works()


# This file is about kernels WITHOUT the feature (the CI host's 6.18); on a kernel that
# has it (the Vagrant VM, the kernel lab) the layer itself is tested instead, by
# tests/kernel_lab/test_vlan_layer.py.
pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(_kernel_has_vlan_filtering(), reason="kernel has bridge VLAN filtering: the layer itself "
                                 "is tested there by tests/kernel_lab/test_vlan_layer.py; this file runs on kernels without it")]

SITE = "management: {networks: [10.30.250.0/24], vlans: [250]}\nbridges:\n  br0: {uplink: eno1}\n"
PROFILE = """\
name: xp
bridge: br0
vlan: 30
guests:
  - {name: xp-hmi, mac: "52:54:00:aa:00:01", port: vnet7, ipv4: [10.30.0.15]}
"""


@pytest.fixture
def hv(tmp_path):
    ns = f"sgv{secrets.token_hex(2)}-hv"
    try:
        nl.create_netns(ns)
        with nl.ipr(ns) as ip:
            br = nl.create_bridge(ip, "br0", "02:5e:00:00:00:01")
            for port, peer in (("vnet7", "vnet7p"), ("eno1", "eno1p")):
                idx = nl.create_veth(ip, port, None, peer, None, None)
                nl.enslave(ip, idx, br)
        yield ns
    finally:
        nl.delete_netns(ns)


def cfg(tmp_path, required: bool):
    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "site.yaml").write_text(SITE + ("vlan_layer_required: true\n" if required else ""))
    (tmp_path / "profiles" / "xp.yaml").write_text(PROFILE)
    return tmp_path


def run(ns, *args):
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "segguard.cli", *args],
                          capture_output=True, text=True, timeout=120)


def tables(ns):
    out = json.loads(subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "tables"], capture_output=True,
                                    text=True, check=True).stdout)["nftables"]
    return [o["table"]["name"] for o in out if "table" in o]


def test_missing_vlan_layer_warns_and_still_enforces_nft(hv, tmp_path):
    c = cfg(tmp_path, required=False)
    r = run(hv, "apply", "-c", str(c))
    assert r.returncode == 0, r.stderr
    assert "warning: VLAN layer missing: this kernel lacks bridge VLAN filtering" in r.stdout
    assert "only the nftables layer is enforced" in r.stdout
    assert "segguard" in tables(hv)
    st = run(hv, "status", "-c", str(c), "--json")
    data = json.loads(st.stdout)
    assert st.returncode == 0 and data["vlan_layer"] == "missing: kernel lacks bridge VLAN filtering" and data["in_sync"]
    audit = json.loads(run(hv, "audit", "vlans", "-c", str(c), "--json").stdout)
    (b,) = audit["bridges"]
    assert audit["kernel_vlan_filtering"] is False
    assert {r["port"] for r in b["management_reach"]} == {"vnet7", "br0"}  # unfiltered: everyone reaches 250
    assert any("no bridge VLAN filtering" in n for n in b["notes"])


def test_required_vlan_layer_is_an_error_and_nothing_is_applied(hv, tmp_path):
    c = cfg(tmp_path, required=True)
    r = run(hv, "apply", "-c", str(c))
    assert r.returncode == 8, (r.stdout, r.stderr)
    assert "vlan_layer_required" in r.stderr and "lacks bridge VLAN filtering" in r.stderr
    assert "segguard" not in tables(hv)
