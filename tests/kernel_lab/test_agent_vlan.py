"""The agent's VLAN layer on a real VLAN-aware bridge (the host kernel lacks bridge VLAN
filtering, so this runs in the kernel lab: python -m tests.kernel_lab.runner).

Namespaces ``sgz<hex>-*`` (removed even on failure); bridge br0 in ``hv`` with
vlan_filtering on, app0 an access port on VLAN 30. The legacy guest has no `port`:
its tap (host side MAC fe:...) is plugged while the agent runs, as libvirt plugs it.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from segguard.lab import netns as nl
from tests import helpers

pytestmark = pytest.mark.kernel_lab
REPO = Path(__file__).resolve().parents[2]
# Python under TCG is ~100x slower than on the host: every wait is generous; the
# timeouts only bound a hang, they are not what is tested.
SLOW = 600.0

MAC, TAP_MAC, TAP = "52:54:00:aa:00:09", "fe:54:00:aa:00:09", "vnet9"
SITE = """\
internal: [10.0.0.0/8]
hypervisor: [10.30.0.1]
groups: {db: [10.30.0.20]}
bridges:
  br0: {}
"""
PROFILE = f"""\
name: newvm
bridge: br0
vlan: 30
guests:
  - {{name: newvm-1, mac: "{MAC}", ipv4: [10.30.0.19]}}
egress:
  - {{to: db, proto: tcp, ports: [1433]}}
"""


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    res = subprocess.run(full, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"{full}: {res.stderr}")
    return res


def wait_for(pred, what: str, timeout: float = SLOW, every: float = 1.0, diag=lambda: ""):
    return helpers.wait_for(pred, what, timeout, every, diag)


def _expand(vlans: list[dict]):
    for v in vlans:
        for vid in range(v["vlan"], v.get("vlanEnd", v["vlan"]) + 1):
            yield vid, tuple(sorted(v.get("flags", [])))


class Lab:
    def __init__(self, tmp: Path):
        self.prefix = f"sgz{secrets.token_hex(2)}-"
        self.hv, self.tmp = self.prefix + "hv", tmp
        self.cfg = tmp / "cfg"
        (self.cfg / "profiles").mkdir(parents=True)
        (self.cfg / "site.yaml").write_text(SITE)
        (self.cfg / "profiles" / "newvm.yaml").write_text(PROFILE)
        self.state, self.logpath = tmp / "state", tmp / "agent.log"
        self.proc: subprocess.Popen | None = None

    def build(self) -> None:
        nl.create_netns(self.hv)
        nl.write_sysctls(self.hv, {"net.ipv6.conf.default.disable_ipv6": 1, "net.ipv6.conf.all.disable_ipv6": 1})
        with nl.ipr(self.hv) as ip:
            br = nl.create_bridge(ip, "br0", "02:5e:00:00:00:01")
            ip.link("set", index=br, kind="bridge", br_vlan_filtering=1)
            nl.set_up(ip, br)
        self.plug("app", "app0", None, "52:54:00:bb:00:20")
        sh("bridge", "vlan", "add", "vid", "30", "pvid", "untagged", "dev", "app0", ns=self.hv)
        sh("bridge", "vlan", "del", "vid", "1", "dev", "app0", ns=self.hv)

    def plug(self, role: str, port: str, host_mac: str | None, guest_mac: str) -> None:
        ns = self.prefix + role
        nl.create_netns(ns)
        nl.write_sysctls(ns, {"net.ipv6.conf.default.disable_ipv6": 1, "net.ipv6.conf.all.disable_ipv6": 1})
        with nl.ipr(self.hv) as ip:
            idx = nl.create_veth(ip, port, host_mac, "eth0", guest_mac, ns)
            nl.enslave(ip, idx, nl.link_index(ip, "br0"))
            nl.set_up(ip, idx)
        with nl.ipr(ns) as ip:
            nl.set_up(ip, nl.link_index(ip, "eth0"))

    def destroy(self) -> None:
        self.stop()
        for ns in nl.list_netns(self.prefix):
            nl.delete_netns(ns)

    # ---- the agent ----------------------------------------------------------------------
    def start(self) -> None:
        env = dict(os.environ, SEGGUARD_STATE=str(self.state), PYTHONPATH=str(REPO))
        self.log_fh = open(self.logpath, "a")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.hv, sys.executable, "-m", "segguard.cli", "agent",
                                      "-c", str(self.cfg), "--verify-every", "0", "--drift-every", "5"],
                                     stderr=self.log_fh, stdout=subprocess.DEVNULL, env=env)
        wait_for(lambda: self.alive() and (self.agent_state() or {}).get("ready"), "the agent's first apply", diag=self.tail)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}\n{self.tail()}")
        return True

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def agent_state(self) -> dict | None:
        return helpers.agent_state(self.state)

    def logs(self) -> list[dict]:
        return helpers.json_lines(self.logpath)

    def tail(self) -> str:
        return "--- agent log\n" + "\n".join(self.logpath.read_text().splitlines()[-30:]) if self.logpath.exists() else ""

    # ---- inspection with iproute2 -----------------------------------------------------------
    def table(self, port: str) -> dict[int, tuple[str, ...]]:
        data = json.loads(sh("bridge", "-j", "vlan", "show", "dev", port, ns=self.hv).stdout or "[]")
        return {vid: flags for e in data if e["ifname"] == port for vid, flags in _expand(e["vlans"])}

    def filtering(self) -> int:
        link = json.loads(sh("ip", "-j", "-d", "link", "show", "dev", "br0", ns=self.hv).stdout)[0]
        return link["linkinfo"]["info_data"]["vlan_filtering"]

    def bound(self) -> bool:
        out = sh("nft", "-j", "list", "map", "bridge", "segguard", "out_dispatch", ns=self.hv, check=False).stdout
        maps = [o["map"] for o in json.loads(out or '{"nftables": []}')["nftables"] if "map" in o]
        return any(e[0] == TAP for m in maps for e in m.get("elem", []))


EXACTLY_30 = {30: ("Egress Untagged", "PVID")}


@pytest.fixture
def zlab(tmp_path):
    lab = Lab(tmp_path)
    try:
        lab.build()
        yield lab
    finally:
        lab.destroy()


def test_agent_puts_a_plugged_tap_on_exactly_its_vlan_and_repairs_vlan_drift(zlab):
    app_before = zlab.table("app0")
    zlab.start()
    st = zlab.agent_state()
    assert st["vlan_layer"] == "available", st["vlan_layer"]
    assert st["guests"]["newvm-1"]["port"] is None

    # a tap plugged the way libvirt plugs it: on the bridge with the default VLAN 1
    zlab.plug("new", TAP, TAP_MAC, MAC)
    wait_for(lambda: zlab.table(TAP) == EXACTLY_30 and zlab.bound(), "the tap bound and on exactly VLAN 30",
             diag=lambda: f"{TAP}: {zlab.table(TAP)}\n{zlab.tail()}")
    # incremental: the VLAN write touched that port only; the other port is as found
    bind = [l for l in zlab.logs() if l["event"] == "vlan-applied" and TAP in l["ports"]]
    assert bind and bind[0]["ports"] == [TAP], bind
    assert zlab.table("app0") == app_before
    g = wait_for(lambda: ((zlab.agent_state() or {}).get("guests") or {}).get("newvm-1", {}).get("vlan", {}).get("in_sync")
                 and zlab.agent_state()["guests"]["newvm-1"], "status to show the VLAN realized", diag=zlab.tail)
    assert (g["port"], g["vlan"]["vlan"], g["vlan"]["desired"], g["vlan"]["realized"]) == (
        TAP, 30, "pvid 30, untagged 30", "pvid 30, untagged 30"), g

    # a VLAN added to the legacy port by hand: removed again, the drift named and counted
    sh("bridge", "vlan", "add", "vid", "40", "dev", TAP, ns=zlab.hv)
    # (not read back here: the agent may already have removed it; its drift event
    # below, naming VLAN 40 on this port, is the proof that the add took)
    wait_for(lambda: zlab.table(TAP) == EXACTLY_30, "VLAN 40 to be removed from the legacy port",
             diag=lambda: f"{TAP}: {zlab.table(TAP)}\n{zlab.tail()}")
    drift = [l for l in zlab.logs() if l["event"] == "drift" and l["kind"] == "port-vlan-added"]
    assert drift and f"VLAN 40 added to port {TAP} (legacy: newvm-1)" in drift[0]["detail"], drift
    assert drift[0]["level"] == "warning" and drift[0]["guests"] == ["newvm-1"]
    st = wait_for(lambda: (zlab.agent_state() or {}).get("drift_counts", {}).get("port-vlan-added") and zlab.agent_state(),
                  "the drift counted in the state")
    assert st["guests"]["newvm-1"]["last_drift"]["kind"] == "port-vlan-added"

    # vlan_filtering turned off by hand: back on, named, and the port tables as they were
    sh("ip", "link", "set", "dev", "br0", "type", "bridge", "vlan_filtering", "0", ns=zlab.hv)
    wait_for(lambda: zlab.filtering() == 1, "vlan_filtering to be turned back on", diag=zlab.tail)
    assert any(l["event"] == "drift" and l["kind"] == "vlan-filtering-off" for l in zlab.logs())
    assert zlab.table(TAP) == EXACTLY_30 and zlab.table("app0") == app_before
