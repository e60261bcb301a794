"""The VLAN layer on a real VLAN-aware bridge (the host kernel lacks bridge VLAN
filtering, so this runs in the kernel lab: python -m tests.kernel_lab.runner).

Topology (namespaces ``sgv<hex>-*``, removed even on failure), bridge br0 in ``hv``:

    vnet7  legacy guest xp (VLAN 30 by profile), arrives trunking every VLAN
    app0   a host on VLAN 30 (access port)        v40p   a host on VLAN 40
    mgmt0  a host on management VLAN 250          vnet9  another guest: tagged 30,40
    eno1   the uplink, trunking every VLAN; its far end sends tagged frames

The common case of an existing VLAN-aware bridge: segguard must change vnet7 and prune
eno1 (only once site.yaml allows it), and leave the rest exactly as found.
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
from segguard.verify.probes import Probe, ProbeSession

pytestmark = pytest.mark.kernel_lab
os.environ.setdefault("SEGGUARD_PROBE_SETTLE", "2.5")
os.environ.setdefault("SEGGUARD_PROBE_START_TIMEOUT", "180")
SETTLE, START = float(os.environ["SEGGUARD_PROBE_SETTLE"]), float(os.environ["SEGGUARD_PROBE_START_TIMEOUT"])
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class H:
    role: str
    port: str
    mac: str
    ip: str | None
    vlans: str          # `bridge vlan` setup of its port: "" = leave the default (pvid 1)


HOSTS = (
    H("xp", "vnet7", "52:54:00:aa:00:01", "10.30.0.15", "trunk"),
    H("app", "app0", "52:54:00:bb:00:20", "10.30.0.20", "access 30"),
    H("v40", "v40p", "52:54:00:bb:00:40", "10.30.0.40", "access 40"),
    H("mgmt", "mgmt0", "52:54:00:bb:02:50", "10.30.250.5", "access 250"),
    H("other", "vnet9", "52:54:00:bb:00:99", "10.30.0.50", "tagged 30 40"),
    H("uplink", "eno1", "52:54:00:cc:00:01", None, "trunk"),
)
SITE = """\
internal: [10.0.0.0/8]
management: {{networks: [10.30.250.0/24], vlans: [250]}}
hypervisor: [10.30.0.1]
groups: {{db: [10.30.0.20]}}
bridges:
  br0: {{uplink: eno1, keep_vlans: [60], allow_vlan_removal: {allow}}}
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


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    res = subprocess.run(full, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"{full}: {res.stderr}")
    return res


class VlanLab:
    def __init__(self, tmp: Path):
        self.prefix = f"sgv{secrets.token_hex(2)}-"
        self.hv = self.prefix + "hv"
        self.cfg = tmp / "cfg"
        (self.cfg / "profiles").mkdir(parents=True)
        (self.cfg / "profiles" / "xp.yaml").write_text(PROFILE)
        self.allow(False)

    def ns(self, role: str) -> str:
        return self.prefix + role

    def host(self, role: str) -> H:
        return next(h for h in HOSTS if h.role == role)

    def allow(self, yes: bool) -> None:
        (self.cfg / "site.yaml").write_text(SITE.format(allow="true" if yes else "false"))

    def build(self) -> None:
        nl.create_netns(self.hv)
        nl.write_sysctls(self.hv, {"net.ipv6.conf.default.disable_ipv6": 1, "net.ipv6.conf.all.disable_ipv6": 1})
        nl.write_sysctls(self.hv, {"net.bridge.bridge-nf-call-iptables": 0, "net.bridge.bridge-nf-call-ip6tables": 0,
                                   "net.bridge.bridge-nf-call-arptables": 0}, missing_ok=True)
        with nl.ipr(self.hv) as ip:
            br = nl.create_bridge(ip, "br0", "02:5e:00:00:00:01")
            ip.link("set", index=br, kind="bridge", br_vlan_filtering=1)
            nl.set_up(ip, br)
        for h in HOSTS:
            ns = self.ns(h.role)
            nl.create_netns(ns)
            nl.write_sysctls(ns, {"net.ipv6.conf.default.disable_ipv6": 1, "net.ipv6.conf.all.disable_ipv6": 1})
            with nl.ipr(self.hv) as ip:
                port = nl.create_veth(ip, h.port, None, "eth0", h.mac, ns)
                nl.enslave(ip, port, nl.link_index(ip, "br0"))
                nl.set_up(ip, port)
            with nl.ipr(ns) as ip:
                nl.set_up(ip, nl.link_index(ip, "eth0"))
            kind, *vids = h.vlans.split()
            if kind == "trunk":
                sh("bridge", "vlan", "add", "vid", "2-4094", "dev", h.port, ns=self.hv)
            elif kind == "access":
                sh("bridge", "vlan", "add", "vid", vids[0], "pvid", "untagged", "dev", h.port, ns=self.hv)
                sh("bridge", "vlan", "del", "vid", "1", "dev", h.port, ns=self.hv)
            else:
                for v in vids:
                    sh("bridge", "vlan", "add", "vid", v, "dev", h.port, ns=self.hv)

    def destroy(self) -> None:
        for ns in nl.list_netns(self.prefix):
            nl.delete_netns(ns)

    # ---- the product, run in the hypervisor namespace ------------------------------
    def plan(self):
        from segguard.flow import build_plan

        with nl.enter_netns(self.hv):
            return build_plan(str(self.cfg))[2]

    def apply(self):
        from segguard.flow import apply_plan

        with nl.enter_netns(self.hv):
            return apply_plan(self.plan())

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return sh(sys.executable, "-m", "segguard.cli", *args, "-c", str(self.cfg), ns=self.hv, check=False)

    # ---- inspection with iproute2 (tests may; the product may not) ------------------
    def tables(self) -> dict[str, dict[int, tuple[str, ...]]]:
        data = json.loads(sh("bridge", "-j", "vlan", "show", ns=self.hv).stdout)
        return {e["ifname"]: {v["vlan"]: tuple(sorted(v.get("flags", []))) for v in _expand(e["vlans"])} for e in data}

    def link(self, name: str) -> dict:
        return json.loads(sh("ip", "-j", "-d", "link", "show", "dev", name, ns=self.hv).stdout)[0]

    def nft_tables(self) -> list[dict]:
        out = json.loads(sh("nft", "-j", "list", "tables", ns=self.hv).stdout)["nftables"]
        return [o["table"] for o in out if "table" in o]

    def set_filtering(self, on: bool) -> None:
        sh("ip", "link", "set", "dev", "br0", "type", "bridge", "vlan_filtering", "1" if on else "0", ns=self.hv)

    # ---- probes ----------------------------------------------------------------------
    def endpoints(self) -> dict[str, tuple[str, str]]:
        return {h.role: (self.ns(h.role), "eth0") for h in HOSTS}

    def probe(self, src: str, dst: str, tags=(), src_ip: str | None = None) -> Probe:
        s, d = self.host(src), self.host(dst)
        return Probe("udp", 4, s.mac, d.mac, src_ip or s.ip or "10.30.0.99", d.ip, dport=9999, vlan_tags=tags)


def _expand(vlans: list[dict]):
    for v in vlans:
        for vid in range(v["vlan"], v.get("vlanEnd", v["vlan"]) + 1):
            yield {"vlan": vid, "flags": v.get("flags", [])}


Q = 0x8100


@pytest.fixture
def vlab(tmp_path):
    lab = VlanLab(tmp_path)
    try:
        lab.build()
        yield lab
    finally:
        lab.destroy()


def test_existing_vlan_aware_bridge_refused_then_allowed_and_read_back(vlab):
    from segguard.errors import VlanChangeRefused

    before = vlab.tables()
    assert set(before["vnet7"]) == set(range(1, 4095))  # the legacy port arrives trunking every VLAN

    p = vlab.cli("plan")
    assert p.returncode == 10, p.stderr
    assert "CHANGE vnet7" in p.stdout and "after:  pvid 30, untagged 30" in p.stdout and "same   app0" in p.stdout
    assert "REFUSED: port eno1 (the uplink) would lose VLAN 2-29,31-39,41-59,61-249,251-4094" in p.stdout

    with pytest.raises(VlanChangeRefused) as exc:
        vlab.apply()
    assert "eno1" in str(exc.value) and "2-29" in str(exc.value)
    assert vlab.tables() == before, "a refused apply changed bridge VLANs"
    assert not any(t["name"] == "segguard" for t in vlab.nft_tables()), "a refused apply loaded nftables rules"
    r = vlab.cli("apply")
    assert r.returncode == 7 and "port eno1 (the uplink) would lose VLAN" in r.stderr, r.stderr

    vlab.allow(True)
    result = vlab.apply()
    after = vlab.tables()
    assert after["vnet7"] == {30: ("Egress Untagged", "PVID")}
    assert set(after["eno1"]) == {1, 30, 40, 60, 250}
    assert after["eno1"][1] == ("Egress Untagged", "PVID") and after["eno1"][30] == ()
    for port in ("app0", "v40p", "mgmt0", "vnet9", "br0"):
        assert after[port] == before[port], f"{port} was not left as found"
    br = vlab.link("br0")["linkinfo"]["info_data"]
    assert br["vlan_filtering"] == 1 and br.get("no_linklocal_learn") == 1, br
    slave = vlab.link("vnet7")["linkinfo"]["info_slave_data"]
    assert slave["guard"] is True and slave["root_block"] is True and slave["flood"] is False, slave
    other = vlab.link("vnet9")["linkinfo"]["info_slave_data"]
    assert other["guard"] is False and other["flood"] is True, "hardening touched a non-legacy port"
    (report,) = result.vlan_reports
    assert report.changed and report.hardening["vnet7.bpdu_guard"] == "on" and report.hardening["br0.no_linklocal_learn"] == "on"
    assert any("learning limit" in x for x in report.lacking)  # reported, not silently skipped

    again = vlab.apply()
    assert not again.vlan_reports[0].changed and vlab.tables() == after

    st = vlab.cli("status", "--json")
    assert st.returncode == 0, st.stdout + st.stderr
    data = json.loads(st.stdout)
    assert data["vlan_layer"] == "in sync"
    rows = {r["port"]: r for r in data["vlans"][0]["ports"]}
    assert rows["vnet7"] == {"port": "vnet7", "role": "legacy", "guests": ["xp-hmi"], "desired": "pvid 30, untagged 30",
                             "live": "pvid 30, untagged 30", "in_sync": True}

    sh("bridge", "vlan", "add", "vid", "40", "dev", "vnet7", ns=vlab.hv)  # someone puts VLAN 40 back
    st = vlab.cli("status")
    assert st.returncode == 1 and "DRIFT vnet7" in st.stdout and "tagged 40" in st.stdout, st.stdout


def test_vlan_filter_alone_keeps_the_guest_off_other_vlans(vlab):
    """Layer 1 of 2: with segguard's nftables tables deleted, the VLAN filter holds."""
    from segguard.flow import remove
    from segguard.verify.run import run_expectations
    from segguard.verify.vlan_expectations import vlan_expectations

    eps = vlab.endpoints()
    leak = [("tagged40", "xp", vlab.probe("xp", "v40", ((Q, 40),)), ["v40"]),
            ("tagged250", "xp", vlab.probe("xp", "mgmt", ((Q, 250),)), ["mgmt"])]
    with ProbeSession(eps, eps, settle=SETTLE, start_timeout=START) as s:
        # before segguard: the trunking legacy port does reach VLAN 40 and 250 (the test can fail)
        assert s.run(leak) == {"tagged40": {"v40": True}, "tagged250": {"mgmt": True}}
        vlab.allow(True)
        vlab.apply()
        with nl.enter_netns(vlab.hv):
            assert remove()
        assert not any(t["name"] == "segguard" for t in vlab.nft_tables())
        got = s.run([
            *leak,
            ("untagged40", "xp", vlab.probe("xp", "v40"), ["v40"]),
            ("own-vlan", "xp", vlab.probe("xp", "app"), ["app"]),                       # positive: its VLAN works
            ("ctl40", "uplink", vlab.probe("uplink", "v40", ((Q, 40),)), ["v40"]),      # positive: VLAN 40 path works
            ("ctl250", "uplink", vlab.probe("uplink", "mgmt", ((Q, 250),)), ["mgmt"]),
        ])
    assert got == {"tagged40": {"v40": False}, "tagged250": {"mgmt": False}, "untagged40": {"v40": False},
                   "own-vlan": {"app": True}, "ctl40": {"v40": True}, "ctl250": {"mgmt": True}}

    # the verify expectations (tagged, management, VLAN 0, double tag, 802.1ad) with the VLAN layer alone
    plan = vlab.plan()
    exps = vlan_expectations(_config(vlab), plan, {40: vlab.host("v40").ip, 250: vlab.host("mgmt").ip})
    assert {e.id.split("/")[2] for e in exps} == {"untagged", "tagged", "vlan0", "double", "qinq"} and len(exps) == 10
    results = _run(vlab, exps, run_expectations)
    assert all(r["pass"] for r in results), [r for r in results if not r["pass"]]


def test_verify_vlan_probes_with_both_layers(vlab):
    from segguard.verify.run import run_expectations
    from segguard.verify.vlan_expectations import vlan_expectations

    vlab.allow(True)
    vlab.apply()
    plan = vlab.plan()
    exps = vlan_expectations(_config(vlab), plan, {40: vlab.host("v40").ip, 250: vlab.host("mgmt").ip})
    results = _run(vlab, exps, run_expectations)
    failed = [r for r in results if not r["pass"]]
    assert not failed and len(results) == 10 and all(r["control"] == "arrived" for r in results), failed


def test_nft_alone_drops_tagged_frames_with_vlan_filtering_off(vlab):
    """Layer 2 of 2: with vlan_filtering off, the nftables rules still drop tags from the guest."""
    from segguard.apply.bridge import BridgeApplier

    vlab.allow(True)
    vlab.apply()
    vlab.set_filtering(False)
    eps = vlab.endpoints()
    with ProbeSession(eps, eps, settle=SETTLE, start_timeout=START) as s:
        got = s.run([
            ("tagged40", "xp", vlab.probe("xp", "v40", ((Q, 40),)), ["v40"]),
            ("tagged30", "xp", vlab.probe("xp", "app", ((Q, 30),)), ["app"]),
            ("qinq", "xp", vlab.probe("xp", "v40", ((0x88A8, 40), (Q, 40))), ["v40"]),
            ("ctl40", "uplink", vlab.probe("uplink", "v40", ((Q, 40),)), ["v40"]),
            ("ctl30", "uplink", vlab.probe("uplink", "app", ((Q, 30),)), ["app"]),
            ("ctlqinq", "uplink", vlab.probe("uplink", "v40", ((0x88A8, 40), (Q, 40))), ["v40"]),
            # VLAN 77 is on no port: it arrives only because filtering really is off
            ("filter-off", "uplink", vlab.probe("uplink", "v40", ((Q, 77),)), ["v40"]),
        ])
    assert got == {"tagged40": {"v40": False}, "tagged30": {"app": False}, "qinq": {"v40": False},
                   "ctl40": {"v40": True}, "ctl30": {"app": True}, "ctlqinq": {"v40": True}, "filter-off": {"v40": True}}
    plan = vlab.plan()
    with nl.enter_netns(vlab.hv):
        drift = BridgeApplier().drift(plan.vlans[0])
    assert any("vlan_filtering is off" in d for d in drift), drift


# ---- helpers ------------------------------------------------------------------------

def _config(vlab):
    from segguard.config.validate import load_config

    return load_config(vlab.cfg)


class _Binder:
    def __init__(self, vlab: VlanLab):
        self.vlab = vlab
        self.by_ip = {h.ip: h for h in HOSTS if h.ip}

    def bind(self, it):
        sender = self.vlab.host("xp" if it.sender == "guest" else it.sender)
        sink = self.by_ip[it.sink[5:]]
        return sender.role, Probe(it.kind, it.family, it.src_mac or sender.mac, it.dst_mac or sink.mac,
                                  it.src_ip or sender.ip or "10.30.0.99", it.dst_ip, sport=it.sport, dport=it.dport,
                                  vlan_tags=it.vlan_tags), sink.role


def _run(vlab, exps, run_expectations):
    binder = _Binder(vlab)
    return run_expectations(exps, lambda _g: binder, lambda role: (vlab.ns(role), "eth0"))
