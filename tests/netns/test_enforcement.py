"""Real rules in a real kernel, judged by real packets (host kernel, root)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from segguard.apply.nftables import Nft, NftablesApplier
from segguard.errors import ApplyError
from segguard.lab import netns as nl
from segguard.plan import Plan
from segguard.verify.lab import LAB_CONFIG, apply_in_lab, verify_lab
from segguard.verify.probes import Probe, ProbeSession

pytestmark = pytest.mark.netns
SEGGUARD = [sys.executable, "-m", "segguard.cli"]


def in_hv(lab, fn):
    with nl.enter_netns(lab.topology.hv_ns):
        return fn()


def segguard_in(ns: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *SEGGUARD, *args], capture_output=True, text=True, timeout=120)


def test_example_config_verifies_and_the_verifier_sees_a_missing_wall(lab, lab_prefix):
    config, plan, result = apply_in_lab(lab.topology, None)
    assert result.changed
    results = verify_lab(None, lab_prefix, lab_extras=True)
    failed = [r for r in results if not r["pass"]]
    assert not failed, failed
    cats = {r["category"] for r in results}
    assert {"guard-rail", "allow", "default", "anti-spoof", "vantage"} <= cats
    # every blocked verdict had a control, and every control arrived
    assert all(r["control"] == "arrived" for r in results if r["expected"] == "blocked")
    assert any(r["id"] == "lab/ordinary-guest-internet/v4" and r["pass"] for r in results)

    # Take the wall down: the same verifier must now report the guard rails broken.
    assert in_hv(lab, lambda: NftablesApplier().remove(plan.table))
    broken = {r["id"]: r for r in verify_lab(None, lab_prefix)}
    for key in ("xp-line3-hmi/guard-rail/internet/tcp4", "xp-line3-hmi/guard-rail/hypervisor/tcp4",
                "scada-line4-srv/guard-rail/domain-controller/udp6", "xp-line3-hmi/anti-spoof/vlan-mgmt/v4",
                "xp-line3-hmi/anti-spoof/llc-snap/v4", "scada-line4-srv/anti-spoof/spoofed-ip/v6"):
        assert broken[key]["observed"] == "arrived" and not broken[key]["pass"], broken[key]


def test_reapply_changes_nothing_and_other_tables_are_untouched(lab):
    foreign = {"nftables": [
        {"add": {"table": {"family": "bridge", "name": "sgt_foreign"}}},
        {"add": {"chain": {"family": "bridge", "table": "sgt_foreign", "name": "fwd", "type": "filter",
                           "hook": "forward", "prio": 0, "policy": "accept"}}},
        {"add": {"rule": {"family": "bridge", "table": "sgt_foreign", "chain": "fwd",
                          "expr": [{"counter": None}, {"accept": None}]}}},
        {"add": {"table": {"family": "inet", "name": "sgt_libvirt_like"}}},
    ]}

    def setup_and_list():
        nft = Nft()
        nft.run(foreign, "foreign tables")
        return nft.raw({"nftables": [{"list": {"table": {"family": "inet", "name": "sgt_libvirt_like"}}}]})[0]

    assert in_hv(lab, setup_and_list) == 0
    _, plan, first = apply_in_lab(lab.topology, None)
    _, _, second = apply_in_lab(lab.topology, None)
    assert first.changed and not second.changed

    def foreign_still_there():
        nft = Nft()
        return nft.list_table("sgt_foreign"), nft.raw({"nftables": [{"list": {"table": {"family": "inet", "name": "sgt_libvirt_like"}}}]})[0]

    table, rc = in_hv(lab, foreign_still_there)
    assert rc == 0 and table is not None
    assert [o for o in table if "rule" in o], "the foreign rule survived"


def test_bad_config_is_rejected_with_file_line_and_old_policy_stays(lab, tmp_path):
    _, good_plan, _ = apply_in_lab(lab.topology, None)
    bad = tmp_path / "cfg"
    shutil.copytree(LAB_CONFIG, bad)
    prof = bad / "profiles" / "xp-line3.yaml"
    prof.write_text(prof.read_text().replace("{to: historian_db,", "{to: no_such_group,"))
    proc = segguard_in(lab.topology.hv_ns, "apply", "-c", str(bad))
    assert proc.returncode == 2, proc.stderr
    line = next(i for i, l in enumerate(prof.read_text().splitlines(), 1) if "no_such_group" in l)
    assert f"xp-line3.yaml:{line}: egress[0].to: unknown group 'no_such_group'" in proc.stderr
    assert in_hv(lab, lambda: NftablesApplier().diff(good_plan).empty)


def test_kernel_refusal_leaves_the_previous_policy_whole(lab):
    _, good_plan, _ = apply_in_lab(lab.topology, None)
    broken_rule = {"rule": {"family": "bridge", "table": good_plan.table, "chain": "prerouting",
                            "expr": [{"jump": {"target": "no_such_chain"}}]}}
    bad = Plan(good_plan.table, good_plan.stateful, good_plan.bindings, (*good_plan.nft, broken_rule))

    def try_bad():
        with pytest.raises(ApplyError) as info:
            NftablesApplier().apply(bad)
        return info.value, NftablesApplier().diff(good_plan).empty

    err, unchanged = in_hv(lab, try_bad)
    assert err.batch is not None and "no_such_chain" in json.dumps(err.batch)
    assert unchanged, "a refused transaction must leave the old table exactly as it was"


def _fdb_port_of(ns: str, mac: str) -> str | None:
    out = subprocess.run(["ip", "netns", "exec", ns, "bridge", "-j", "fdb", "show", "br", "br0"],
                         capture_output=True, text=True, check=True).stdout
    for e in json.loads(out or "[]"):
        if e.get("mac") == mac:
            return e.get("ifname")
    return None


def test_spoofed_source_mac_is_never_learned_into_the_fdb(lab):
    apply_in_lab(lab.topology, None)
    topo = lab.topology
    xp, guest, app = topo.host("xp"), topo.host("guest"), topo.host("app")
    forged = "52:54:00:77:77:77"
    # the lab keeps learning off so probes cannot re-point its FDB; a real tap learns
    for port in (xp.port, guest.port):
        subprocess.run(["ip", "netns", "exec", topo.hv_ns, "ip", "link", "set", "dev", port, "type", "bridge_slave",
                        "learning", "on"], check=True)
    eps = {"xp": topo.sink("xp"), "guest": topo.sink("guest"), "app": topo.sink("app")}
    with ProbeSession(eps, eps, settle=0.3) as s:
        frame = dict(kind="udp", dst_mac=app.mac, src_ip=xp.ip4, dst_ip=app.ip4, dport=9)
        res = s.run([("xp", "xp", Probe(src_mac=forged, **frame), ["app"]),
                     ("ctl", "guest", Probe(src_mac="52:54:00:77:77:78", **{**frame, "src_ip": guest.ip4}), ["app"])])
    assert res == {"xp": {"app": False}, "ctl": {"app": True}}
    # the unrestricted port learned its (forged) source; the legacy port learned nothing
    assert _fdb_port_of(topo.hv_ns, "52:54:00:77:77:78") == guest.port
    assert _fdb_port_of(topo.hv_ns, forged) is None



def test_a_legacy_mac_on_any_port_but_its_own_is_dropped_before_the_fdb_learns_it(lab):
    """The MAC guard on a port no profile names (the `guest` host's), and a bound port's
    own chain for another guest's MAC: a neighbour cannot pull xp's traffic to itself by
    sending as xp, nor scada's guest as xp, and nothing is learned on the way."""
    apply_in_lab(lab.topology, None)
    topo = lab.topology
    xp, scada, guest, app = topo.host("xp"), topo.host("scada"), topo.host("guest"), topo.host("app")
    for port in (scada.port, guest.port):
        subprocess.run(["ip", "netns", "exec", topo.hv_ns, "ip", "link", "set", "dev", port, "type", "bridge_slave",
                        "learning", "on"], check=True)
    eps = {"scada": topo.sink("scada"), "guest": topo.sink("guest"), "app": topo.sink("app")}
    with ProbeSession(eps, eps, settle=0.3) as s:
        res = s.run([
            ("neighbour-as-xp", "guest", Probe(kind="udp", src_mac=xp.mac, dst_mac=app.mac, src_ip=guest.ip4, dst_ip=app.ip4, dport=9), ["app"]),
            ("scada-as-xp", "scada", Probe(kind="udp", src_mac=xp.mac, dst_mac=app.mac, src_ip=scada.ip4, dst_ip=app.ip4, dport=9), ["app"]),
            ("control", "guest", Probe(kind="udp", src_mac=guest.mac, dst_mac=app.mac, src_ip=guest.ip4, dst_ip=app.ip4, dport=9), ["app"]),
        ])
    assert res == {"neighbour-as-xp": {"app": False}, "scada-as-xp": {"app": False}, "control": {"app": True}}
    assert _fdb_port_of(topo.hv_ns, xp.mac) in (None, xp.port)
    assert _fdb_port_of(topo.hv_ns, guest.mac) == guest.port  # the control was learned: learning is on


def test_frames_to_a_guest_carry_only_the_ethertypes_it_uses(lab):
    """Toward a guest the ethertype whitelist holds too, also where the profile's
    default is allow (scada-line4): no VLAN tag, no LLC/SNAP; and nothing of a family
    the guest has no address for (an IPv6 neighbour solicitation to the IPv4-only xp)."""
    apply_in_lab(lab.topology, None)
    topo = lab.topology
    xp, scada, guest = topo.host("xp"), topo.host("scada"), topo.host("guest")
    eps = {"guest": topo.sink("guest"), "xp": topo.sink("xp"), "scada": topo.sink("scada")}
    to_scada = dict(kind="udp", src_mac=guest.mac, dst_mac=scada.mac, src_ip=guest.ip4, dst_ip=scada.ip4, dport=9)
    with ProbeSession(eps, eps, settle=0.3) as s:
        res = s.run([
            ("plain", "guest", Probe(**to_scada), ["scada"]),
            ("tagged", "guest", Probe(**to_scada, vlan_tags=((0x8100, 30),)), ["scada"]),
            ("prio-tag", "guest", Probe(**to_scada, vlan_tags=((0x8100, 0),)), ["scada"]),
            ("snap", "guest", Probe(**to_scada, llc_snap=True), ["scada"]),
            ("ns-to-v4-only", "guest", Probe(kind="icmp", family=6, src_mac=guest.mac, dst_mac=xp.mac, src_ip=guest.ip6,
                                             dst_ip="fe80::5054:ff:feaa:1", icmp_type=135, ttl=255), ["xp"]),
            ("ns-control", "guest", Probe(kind="icmp", family=6, src_mac=guest.mac, dst_mac=scada.mac, src_ip=guest.ip6,
                                          dst_ip=scada.ip6, icmp_type=135, ttl=255), ["scada"]),
        ])
    assert res == {"plain": {"scada": True}, "tagged": {"scada": False}, "prio-tag": {"scada": False},
                   "snap": {"scada": False}, "ns-to-v4-only": {"xp": False}, "ns-control": {"scada": True}}

def test_cli_status_and_plan_against_the_live_kernel(lab):
    hv = lab.topology.hv_ns
    cfg = str(LAB_CONFIG)
    assert segguard_in(hv, "plan", "-c", cfg).returncode == 10  # nothing applied yet
    applied = segguard_in(hv, "apply", "-c", cfg)
    assert applied.returncode == 0, applied.stderr
    assert "applied: table bridge segguard, 2 legacy guests, stateless reply rules" in applied.stdout
    again = segguard_in(hv, "apply", "-c", cfg)
    assert again.stdout.startswith("unchanged"), again.stdout
    plan = segguard_in(hv, "plan", "-c", cfg)
    assert plan.returncode == 0 and "no changes" in plan.stdout
    st = json.loads(segguard_in(hv, "status", "-c", cfg, "--json").stdout)
    assert st["in_sync"] and st["table_present"]
    assert st["reply_mode_live"] == "stateless" and st["conntrack_bridge_available"] is False
    assert {g["guest"]: (g["port"], g["source"]) for g in st["guests"]} == {
        "xp-line3-hmi": ("vnet7", "profile"), "scada-line4-srv": ("vnet8", "tap-mac")}
    # drift: a rule deleted by hand shows up in status and plan
    subprocess.run(["ip", "netns", "exec", hv, "nft", "flush", "chain", "bridge", "segguard", "gout_inet_dom_deny"], check=True)
    st2 = segguard_in(hv, "status", "-c", cfg)
    assert st2.returncode == 1 and "DRIFT" in st2.stdout
    assert segguard_in(hv, "plan", "-c", cfg).returncode == 10


def test_live_vantage_verifies_through_probe_ports_and_sees_a_broken_wall(lab):
    """`verify --live` on the lab's hypervisor as if it were a production host: probe
    ports stand in for the guest, the guests themselves are not involved."""
    apply_in_lab(lab.topology, None)
    hv = lab.topology.hv_ns
    proc = segguard_in(hv, "verify", "--live", "-c", str(LAB_CONFIG), "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    report = json.loads(proc.stdout)
    assert report["failed"] == 0 and report["passed"] > 100
    assert all(r["control"] == "arrived" for r in report["results"] if r["expected"] == "blocked")
    # this host's kernel has no bridge VLAN filtering: verify says so in a row of its own
    vlan_rows = [r for r in report["results"] if r["id"].startswith("live/vlan-layer")]
    assert vlan_rows and vlan_rows[0]["observed"] == "missing", vlan_rows
    assert not [l for l in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
                if l.startswith("sgprobe-")], "probe namespaces are removed"

    # A compiler that forgot the guard rails: the live verifier must say so (for the
    # default-allow guest; under default deny the default would still hold the line). (A process
    # of its own in the namespace: workers read /sys, which `ip netns exec` remounts.)
    snippet = (
        "import json, segguard.compile.nft as n\n"
        "n._guard_rails = lambda *a, **k: None\n"
        "from segguard.verify.live import verify_live\n"
        f"print(json.dumps(verify_live({str(LAB_CONFIG)!r}, guests=['scada-line4-srv'])))\n")
    out = subprocess.run(["ip", "netns", "exec", hv, sys.executable, "-c", snippet],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    broken = {r["id"]: r for r in json.loads(out.stdout)}
    for key in ("scada-line4-srv/guard-rail/internet/tcp4", "scada-line4-srv/guard-rail/hypervisor/tcp6",
                "scada-line4-srv/guard-rail/management/icmp4", "scada-line4-srv/guard-rail/domain-controller/icmp4"):
        assert broken[key]["observed"] == "arrived" and not broken[key]["pass"], broken[key]


@pytest.mark.parametrize("dst,ethertype", [("01:80:c2:00:00:0e", 0x88CC),   # LLDP: never forwarded, goes to the host
                                           ("01:80:c2:00:00:03", 0x888E),   # 802.1X EAPOL
                                           ("01:80:c2:00:00:00", None)])    # STP BPDU (802.3 LLC)
def test_link_local_frames_cannot_poison_the_fdb(lab, dst, ethertype):
    """Frames to 01:80:c2:00:00:0x take the bridge's link-local path, not prerouting;
    the input chain must still drop a forged source before the bridge learns it."""
    apply_in_lab(lab.topology, None)
    topo = lab.topology
    xp, guest = topo.host("xp"), topo.host("guest")
    for port in (xp.port, guest.port):
        subprocess.run(["ip", "netns", "exec", topo.hv_ns, "ip", "link", "set", "dev", port, "type", "bridge_slave",
                        "learning", "on"], check=True)
    forged, control = "52:54:00:55:55:01", "52:54:00:55:55:02"
    kind = dict(kind="raw", dst_mac=dst, ethertype=ethertype) if ethertype else dict(kind="raw", dst_mac=dst, llc_snap=True, ethertype=0x88B5)
    eps = {"xp": topo.sink("xp"), "guest": topo.sink("guest")}
    with ProbeSession(eps, eps, settle=0.3) as s:
        s.run([("x", "xp", Probe(src_mac=forged, **kind), []), ("g", "guest", Probe(src_mac=control, **kind), [])])
    assert _fdb_port_of(topo.hv_ns, control) == guest.port, "control: an unprotected port learns from this frame"
    assert _fdb_port_of(topo.hv_ns, forged) is None


def test_cli_lab_up_verify_down_and_dry_run(lab_prefix):
    prefix = lab_prefix
    try:
        up = subprocess.run([*SEGGUARD, "lab", "up", "--prefix", prefix], capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        hv = f"{prefix}hv"
        v = subprocess.run([*SEGGUARD, "verify", "--lab-prefix", prefix, "--json"], capture_output=True, text=True, timeout=120)
        assert v.returncode == 0, v.stdout[-2000:] + v.stderr
        assert json.loads(v.stdout)["failed"] == 0
        # dry-run against a kernel that holds the plan: nothing to do, nothing sent
        dry = segguard_in(hv, "apply", "--dry-run", "-c", str(LAB_CONFIG), "--json")
        assert json.loads(dry.stdout)["result"] == "unchanged"
        assert segguard_in(hv, "remove", "--yes").returncode == 0
        dry = segguard_in(hv, "apply", "--dry-run", "-c", str(LAB_CONFIG), "--json")
        assert json.loads(dry.stdout)["result"] == "would change"
        assert subprocess.run(["ip", "netns", "exec", hv, "nft", "list", "table", "bridge", "segguard"],
                              capture_output=True).returncode != 0, "dry-run applied nothing"
        # with the wall down, verify fails with its documented exit code
        v = subprocess.run([*SEGGUARD, "verify", "--lab-prefix", prefix], capture_output=True, text=True, timeout=120)
        assert v.returncode == 5 and "expectations did not hold" in v.stderr
    finally:
        down = subprocess.run([*SEGGUARD, "lab", "down", "--prefix", prefix], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0
    assert not [l for l in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
                if l.startswith(prefix)]
