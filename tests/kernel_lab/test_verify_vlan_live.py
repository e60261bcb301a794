"""`segguard verify --live` proves the VLAN layer on a VLAN-aware bridge (the host kernel
lacks bridge VLAN filtering, so this runs in the kernel lab: python -m tests.kernel_lab.runner).

Topology (namespaces ``sgw<hex>-*``, removed even on failure), bridge br0 in ``hv``,
vlan_filtering on, the hypervisor's own address on VLAN 30 (br0 self, tagged):

    vnet7  legacy guest xp-hmi (VLAN 30 by profile), arrives trunking every VLAN
    app0   a host on VLAN 30      v40p  a host on VLAN 40      mgmt0  a host on VLAN 250
    eno1   the uplink, trunking every VLAN

verify runs as an operator would, the CLI in the bridge's namespace; its probe ports
(and the other-VLAN host D it puts on VLAN 40, the VLAN v40p uses) come and go.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from segguard.lab import netns as nl

pytestmark = pytest.mark.kernel_lab
# under qemu without KVM workers start and frames travel many times slower
ENV = {**os.environ, "SEGGUARD_PROBE_SETTLE": "2.5", "SEGGUARD_PROBE_START_TIMEOUT": "180"}


@dataclass(frozen=True)
class H:
    role: str
    port: str
    mac: str
    vlans: str  # "trunk" | "access <vid>"


HOSTS = (
    H("xp", "vnet7", "52:54:00:aa:00:01", "trunk"),
    H("app", "app0", "52:54:00:bb:00:20", "access 30"),
    H("v40", "v40p", "52:54:00:bb:00:40", "access 40"),
    H("mgmt", "mgmt0", "52:54:00:bb:02:50", "access 250"),
    H("uplink", "eno1", "52:54:00:cc:00:01", "trunk"),
)
SITE = """\
internal: [10.0.0.0/8]
management: {networks: [10.30.250.0/24], vlans: [250]}
hypervisor: [10.30.0.1]
groups: {db: [10.30.0.20]}
bridges:
  br0: {uplink: eno1, keep_vlans: [60], allow_vlan_removal: true}
"""
PROFILE = """\
name: xp-line3
bridge: br0
vlan: 30
guests:
  - {name: xp-hmi, mac: "52:54:00:aa:00:01", port: vnet7, ipv4: [10.30.0.15]}
egress:
  - {to: db, proto: tcp, ports: [1433]}
"""
VLAN_CASES = ("untagged", "tagged", "vlan0", "double", "qinq")


def sh(*cmd: str, ns: str | None = None, check: bool = True, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    res = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"{full}: {res.stderr}")
    return res


@pytest.fixture
def hv(tmp_path):
    prefix = f"sgw{secrets.token_hex(2)}-"
    hv = prefix + "hv"
    cfg = tmp_path / "cfg"
    (cfg / "profiles").mkdir(parents=True)
    (cfg / "site.yaml").write_text(SITE)
    (cfg / "profiles" / "xp.yaml").write_text(PROFILE)
    try:
        nl.create_netns(hv)
        nl.write_sysctls(hv, {"net.ipv6.conf.default.disable_ipv6": 1, "net.ipv6.conf.all.disable_ipv6": 1})
        nl.write_sysctls(hv, {"net.bridge.bridge-nf-call-iptables": 0, "net.bridge.bridge-nf-call-ip6tables": 0,
                              "net.bridge.bridge-nf-call-arptables": 0}, missing_ok=True)
        with nl.ipr(hv) as ip:
            br = nl.create_bridge(ip, "br0", "02:5e:00:00:00:01")
            ip.link("set", index=br, kind="bridge", br_vlan_filtering=1)
            nl.set_up(ip, br)
        sh("bridge", "vlan", "add", "vid", "30", "dev", "br0", "self", ns=hv)
        for h in HOSTS:
            ns = prefix + h.role
            nl.create_netns(ns)
            with nl.ipr(hv) as ip:
                port = nl.create_veth(ip, h.port, None, "eth0", h.mac, ns)
                nl.enslave(ip, port, nl.link_index(ip, "br0"))
                nl.set_up(ip, port)
            with nl.ipr(ns) as ip:
                nl.set_up(ip, nl.link_index(ip, "eth0"))
            kind, *vid = h.vlans.split()
            if kind == "trunk":
                sh("bridge", "vlan", "add", "vid", "2-4094", "dev", h.port, ns=hv)
            else:
                sh("bridge", "vlan", "add", "vid", vid[0], "pvid", "untagged", "dev", h.port, ns=hv)
                sh("bridge", "vlan", "del", "vid", "1", "dev", h.port, ns=hv)
        yield hv, cfg
    finally:
        for ns in nl.list_netns(prefix):
            nl.delete_netns(ns)


def verify(hv: str, cfg: Path) -> tuple[int, dict]:
    res = sh(sys.executable, "-m", "segguard.cli", "verify", "--live", "-c", str(cfg), "--json", ns=hv, check=False,
             env=ENV, timeout=1500)
    try:
        return res.returncode, json.loads(res.stdout)
    except ValueError:
        raise AssertionError(f"verify rc {res.returncode}: {res.stdout[-2000:]} {res.stderr[-3000:]}") from None


def tables(hv: str) -> dict:
    return {e["ifname"]: e["vlans"] for e in json.loads(sh("bridge", "-j", "vlan", "show", ns=hv).stdout)}


def test_verify_live_proves_the_vlan_layer_and_reports_it_broken(hv):
    from segguard.flow import apply_plan, build_plan

    ns, cfg = hv
    with nl.enter_netns(ns):
        apply_plan(build_plan(str(cfg))[2])
    before = tables(ns)
    assert [v["vlan"] for v in before["vnet7"]] == [30], before["vnet7"]

    rc, report = verify(ns, cfg)
    rows = {r["id"]: r for r in report["results"]}
    assert rc == 0 and report["failed"] == 0, [r for r in report["results"] if not r["pass"]]
    vlan_rows = {f"xp-hmi/vlan/{case}/{vid}" for case in VLAN_CASES for vid in (40, 250)}
    assert vlan_rows <= set(rows), sorted(set(rows) - vlan_rows)[:20]
    for rid in vlan_rows:  # blocked at the destination, and the same VLAN reached from the trunk port
        assert (rows[rid]["observed"], rows[rid]["control"]) == ("not arrived", "arrived"), rows[rid]
    stand_in = rows["live/stand-in-vlan/xp-hmi"]
    assert stand_in["observed"] == "pvid 30, untagged 30" and "VLAN 40" in stand_in["description"], stand_in
    assert rows["live/vlans-match-plan/br0"]["observed"] == "in sync"
    assert not any(r.startswith("live/vlan-layer") for r in rows)
    # the nftables layer's own tag probes still run beside the VLAN probes, with controls
    for key in ("vlan-own/v4", "vlan0/v4", "vlan-double/v4", "qinq/v4", "vlan-mgmt/v4"):
        assert rows[f"xp-hmi/anti-spoof/{key}"]["control"] == "arrived", rows[f"xp-hmi/anti-spoof/{key}"]
    assert all(r["control"] == "arrived" for r in report["results"] if r["expected"] == "blocked")
    assert tables(ns) == before, "verify changed a real port's VLANs or left a probe port behind"
    assert not [n for n in nl.list_netns() if n.startswith("sgprobe-")], "probe namespaces are removed"

    # someone puts the management VLAN on the guest's port by hand
    sh("bridge", "vlan", "add", "vid", "250", "dev", "vnet7", ns=ns)
    rc, report = verify(ns, cfg)
    failed = {r["id"]: r for r in report["results"] if not r["pass"]}
    assert rc == 5 and set(failed) == {"live/vlans-match-plan/br0"}, failed
    assert "vnet7" in failed["live/vlans-match-plan/br0"]["observed"] and "250" in failed["live/vlans-match-plan/br0"]["observed"]
    # reported, not silently repaired: that is apply's job
    assert 250 in [v["vlan"] for v in tables(ns)["vnet7"]]
