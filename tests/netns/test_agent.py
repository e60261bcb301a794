"""The real agent process in the lab hypervisor namespace: events, drift, restarts,
the writer lock and the libvirt hook, judged by nft read-back and by frames counted at
the sinks."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from segguard.lab import netns as nl
from segguard.verify.lab import LAB_CONFIG
from segguard.verify.probes import Probe, ProbeSession, _Worker, build_frame, new_marker
from tests.helpers import agent_state, json_lines, nsrun, wait_for

pytestmark = pytest.mark.netns
PY = sys.executable
REPO = Path(__file__).resolve().parents[2]

NEW_MAC, NEW_TAP_MAC, NEW_IP, NEW_PORT = "52:54:00:aa:00:09", "fe:54:00:aa:00:09", "10.30.0.19", "vnet19"
NEW_PROFILE = f"""name: newvm
description: a legacy guest whose tap does not exist when the agent starts
bridge: br0
vlan: 30
guests:
  - name: newvm-1
    mac: "{NEW_MAC}"
    ipv4: [{NEW_IP}]
    ipv6: []
block: {{internet: true, domain: true}}
egress:
  - {{to: historian_db, proto: udp, ports: [514]}}
default: deny
mode: enforce
"""


def live_table(ns: str) -> list[dict] | None:
    p = nsrun(ns, "nft", "-j", "list", "table", "bridge", "segguard")
    if p.returncode != 0:
        return None
    return [o for o in json.loads(p.stdout)["nftables"] if "metainfo" not in o]


def port_chain_rules(ns: str, port: str) -> list[dict] | None:
    """The rules of a port's netdev ingress chain; None when there is no such chain."""
    p = nsrun(ns, "nft", "-j", "list", "chain", "netdev", "segguard", "in_" + port)
    if p.returncode != 0:
        return None
    return [o["rule"] for o in json.loads(p.stdout)["nftables"] if "rule" in o]


def elems(table: list[dict] | None, name: str) -> list:
    for o in table or ():
        body = o.get("map") or o.get("set")
        if body and body["name"] == name:
            return body.get("elem", [])
    return []


def guarded(table: list[dict] | None) -> list[str]:
    """The MACs the guard drops on every port they are not bound to (goto foreign_mac)."""
    return [mac for mac, verdict in elems(table, "legacy_macs") if verdict == {"goto": {"target": "foreign_mac"}}]


class AgentProc:
    def __init__(self, ns: str, config: Path, state: Path, log: Path, metrics_port: int,
                 args: tuple[str, ...] = ("--verify-every", "0", "--drift-every", "5")):
        self.ns, self.config, self.state, self.logpath, self.port = ns, config, state, log, metrics_port
        self.args = args
        self.env = dict(os.environ, SEGGUARD_STATE=str(state), PYTHONPATH=str(REPO))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AgentProc":
        self.log_fh = open(self.logpath, "a")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, PY, "-m", "segguard.cli", "agent", "-c", str(self.config),
                                      "--metrics", f"127.0.0.1:{self.port}", *self.args],
                                     stderr=self.log_fh, stdout=subprocess.DEVNULL, env=self.env)
        wait_for(lambda: (self.state_json() or {}).get("pid") == self._agent_pid() and self.state_json().get("ready"), "agent ready")
        return self

    def _agent_pid(self):
        # `ip netns exec` execs the python, so the pid is the agent's own
        return self.proc.pid if self.proc else None

    def state_json(self) -> dict | None:
        return agent_state(self.state)

    def logs(self) -> list[dict]:
        return json_lines(self.logpath)

    def metrics(self) -> str:
        code = f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{self.port}/metrics').read().decode())"
        return nsrun(self.ns, PY, "-c", code, check=True).stdout

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return nsrun(self.ns, PY, "-m", "segguard.cli", *args, env=self.env)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def cfg(tmp_path) -> Path:
    d = tmp_path / "cfg"
    shutil.copytree(LAB_CONFIG, d)
    (d / "profiles" / "newvm.yaml").write_text(NEW_PROFILE)
    return d


_port = [19300]


@pytest.fixture
def agent(lab, cfg, tmp_path):
    _port[0] += 1
    a = AgentProc(lab.topology.hv_ns, cfg, tmp_path / "state", tmp_path / "agent.log", _port[0])
    try:
        yield a.start()
    finally:
        a.stop()


def _plug(lab, ns_name: str, mac: str = NEW_MAC, tap_mac: str = NEW_TAP_MAC, port: str = NEW_PORT, enslave: bool = True):
    """A veth the way libvirt plugs a tap: host side carries the guest MAC with fe first."""
    nl.create_netns(ns_name)
    nl.write_sysctls(ns_name, {"net.ipv6.conf.default.disable_ipv6": 1})
    with nl.ipr(lab.topology.hv_ns) as ip:
        idx = nl.create_veth(ip, port, tap_mac, "eth0", mac, ns_name)
        # up but on no bridge yet: the guest's NIC has carrier and frames already flow
        # into the host side, where nothing forwards them
        nl.set_up(ip, idx)
    with nl.ipr(ns_name) as ip:
        nl.set_up(ip, nl.link_index(ip, "eth0"))
    nl.disable_tx_checksum_offload(ns_name, ["eth0"])
    nl.disable_tx_checksum_offload(lab.topology.hv_ns, [port])
    if enslave:
        _enslave(lab, port)


def _enslave(lab, port: str) -> None:
    with nl.ipr(lab.topology.hv_ns) as ip:
        idx = nl.link_index(ip, port)
        nl.enslave(ip, idx, nl.link_index(ip, "br0"), learning=False)
        nl.set_up(ip, idx)


def test_libvirt_style_tap_is_bound_and_a_burst_from_its_first_frame_never_reaches_a_blocked_sink(lab, agent):
    hv, new_ns = lab.topology.hv_ns, lab.prefix + "new"
    dc, app = lab.host("dc"), lab.host("app")
    # Zero window by construction: before the tap exists the guest is unbound and its
    # MAC is in the legacy_macs guard, which every port but a bound one drops.
    before = live_table(hv)
    assert NEW_MAC in guarded(before)
    assert not any(e[0] == NEW_PORT for e in elems(before, "out_dispatch"))

    _plug(lab, new_ns, enslave=False)
    marker = new_marker()
    hostile = build_frame(Probe(kind="udp", src_mac=NEW_MAC, dst_mac=dc.mac, src_ip=NEW_IP, dst_ip=dc.ip4, dport=389), marker)
    sink = _Worker("dc", dc.ns, "eth0", PY)
    sender = _Worker("new", new_ns, "eth0", PY)
    try:
        for w in (sink, sender):
            assert w.recv(15).get("event") == "ready"
        sink.call({"op": "collect", "reset": True})
        stop = threading.Event()
        sent = [0]

        def blast():
            while not stop.is_set():
                sent[0] += sender.call({"op": "send", "frames": [hostile.hex()] * 50})["sent"]

        t = threading.Thread(target=blast)
        t.start()
        wait_for(lambda: sent[0] >= 200, "the burst to be under way")
        _enslave(lab, NEW_PORT)  # the port exists on the bridge: frames are already coming
        wait_for(lambda: any(e[0] == NEW_PORT for e in elems(live_table(hv), "out_dispatch")), "the agent to bind the tap")
        n_bound = sent[0]
        wait_for(lambda: sent[0] >= n_bound + 500, "more of the burst after binding")
        stop.set()
        t.join()
        got = sink.call({"op": "collect", "reset": True})
    finally:
        sink.stop()
        sender.stop()
    assert marker.decode() not in got["markers"], f"{got['markers'].get(marker.decode())} hostile frames reached the DC"
    assert sent[0] > 700

    # nft read-back: bound by the tap MAC convention, elements of that port only
    table = live_table(hv)
    assert [NEW_PORT, {"goto": {"target": "gout_inet_dom_deny"}}] in elems(table, "out_dispatch")
    assert [NEW_PORT, {"goto": {"target": "gin_inet_dom_deny"}}] in elems(table, "in_dispatch")
    # and its policy: elements keyed by its port in the fleet-wide sets
    assert any(e["concat"][0] == NEW_PORT for e in elems(table, "port_src4"))
    assert any(e["concat"][0] == NEW_PORT for e in elems(table, "out_open4") + elems(table, "out_open4_x"))
    assert {"concat": [NEW_MAC, NEW_PORT]} in elems(table, "bound_ports")
    applied = [l for l in agent.logs() if l["event"] == "applied" and "link-new" in l.get("reasons", [])]
    assert applied and applied[-1]["kind"] == "incremental", applied
    # one nfnetlink batch: the port's elements and its netdev ingress chain
    assert applied[-1].get("txn") == "nfnetlink", applied[-1]
    assert [r["expr"][0]["match"]["right"] for r in port_chain_rules(hv, NEW_PORT)] == [NEW_MAC, "01:80:c2:00:00:00"]
    st = json.loads(agent.cli("status", "-c", str(agent.config), "--json").stdout)
    g = st["agent"]["guests"]["newvm-1"]
    assert (g["port"], g["source"], g["in_sync"]) == (NEW_PORT, "tap-mac", True)

    # probes: the bound guest's policy, with a control that the sink hears
    eps = {"new": (new_ns, "eth0"), "guest": lab.sink("guest"), "dc": lab.sink("dc"), "app": lab.sink("app")}
    with ProbeSession(eps, eps, settle=0.4) as s:
        res = s.run([
            ("blocked", "new", Probe(kind="udp", src_mac=NEW_MAC, dst_mac=dc.mac, src_ip=NEW_IP, dst_ip=dc.ip4, dport=514), ["dc"]),
            ("control", "guest", Probe(kind="udp", src_mac=lab.host("guest").mac, dst_mac=dc.mac, src_ip=lab.host("guest").ip4,
                                       dst_ip=dc.ip4, dport=514), ["dc"]),
            ("allowed", "new", Probe(kind="udp", src_mac=NEW_MAC, dst_mac=app.mac, src_ip=NEW_IP, dst_ip=app.ip4, dport=514), ["app"]),
            ("spoofed", "new", Probe(kind="udp", src_mac=NEW_MAC, dst_mac=app.mac, src_ip="10.30.0.77", dst_ip=app.ip4, dport=514), ["app"]),
        ])
    assert res == {"blocked": {"dc": False}, "control": {"dc": True}, "allowed": {"app": True}, "spoofed": {"app": False}}

    # unplug: unbound again, the MAC dropped everywhere
    nl.delete_link(hv, NEW_PORT)
    wait_for(lambda: not any(e[0] == NEW_PORT for e in elems(live_table(hv), "out_dispatch")), "the agent to unbind")
    assert NEW_MAC in guarded(live_table(hv))
    # the unbind (on the port leaving the bridge or on its deletion, whichever the
    # agent sees first; the table changes at the commit, the log follows the read-back)
    def unbinds():
        return [l for l in agent.logs() if l["event"] == "applied" and f"delete netdev chain in_{NEW_PORT}" in l.get("changes", ())]
    wait_for(unbinds, "the agent to log the unbind")
    assert (unbinds()[-1]["kind"], unbinds()[-1].get("txn")) == ("incremental", "nfnetlink"), unbinds()
    assert port_chain_rules(hv, NEW_PORT) is None


OTHER_MAC, OTHER_TAP_MAC, OTHER_IP = "52:54:00:aa:00:0a", "fe:54:00:aa:00:0a", "10.30.0.21"


def _ranged(name: str, mac: str, ip: str, ports: str) -> str:
    """A one-guest profile with a port range: its element goes to an interval set."""
    return (NEW_PROFILE.replace("name: newvm\n", f"name: {name}\n").replace("newvm-1", f"{name}-1")
            .replace(NEW_MAC, mac).replace(NEW_IP, ip)
            .replace("  - {to: historian_db, proto: udp, ports: [514]}\n",
                     f"  - {{to: historian_db, proto: udp, ports: [514]}}\n  - {{to: historian_db, proto: tcp, ports: [\"{ports}\"]}}\n"))


def test_an_unbind_leaves_inert_leftovers_a_bind_of_the_port_settles_them_and_a_lull_collects_them(lab, cfg, tmp_path):
    """Beside a running fleet an unbind's deletes from the interval sets cost the kernel
    ~0.5 s, so the agent leaves them (apply/incremental.py `settle_leftovers`). Frames
    decide: the same guest back on the port has its range allowed; another guest on the
    same port name does not inherit it (it is deleted in that bind's transaction); and
    once the agent is quiet the table is exactly a fresh compile again."""
    hv, app = lab.topology.hv_ns, lab.host("app")
    (cfg / "profiles" / "newvm.yaml").write_text(_ranged("newvm", NEW_MAC, NEW_IP, "5000-5099"))
    (cfg / "profiles" / "othervm.yaml").write_text(_ranged("othervm", OTHER_MAC, OTHER_IP, "6000-6099"))
    new_range = {"concat": [NEW_PORT, app.ip4, "tcp", {"range": [5000, 5099]}]}
    other_range = {"concat": [NEW_PORT, app.ip4, "tcp", {"range": [6000, 6099]}]}
    _port[0] += 1
    agent = AgentProc(hv, cfg, tmp_path / "state", tmp_path / "agent.log", _port[0],
                      args=("--verify-every", "0", "--drift-every", "5", "--leftover-quiet", "10"))
    agent.env["SEGGUARD_TEST_COLLECT_DELAY"] = "3"  # the child encodes for 3 s more: binds land meanwhile
    agent.start()
    try:
        def bound():
            return any(e[0] == NEW_PORT for e in elems(live_table(hv), "out_dispatch"))

        def unplug():
            nl.delete_link(hv, NEW_PORT)
            wait_for(lambda: not bound(), "the agent to unbind")
            wait_for(lambda: (agent.state_json() or {}).get("leftover_ports") == [NEW_PORT], "the leftover in the agent state")

        def probe(ns: str, mac: str, ip: str) -> dict:
            eps = {"g": (ns, "eth0"), "app": lab.sink("app")}
            with ProbeSession(eps, eps, settle=0.4) as s:
                return s.run([(str(port), "g", Probe(kind="tcp", src_mac=mac, dst_mac=app.mac, src_ip=ip, dst_ip=app.ip4, dport=port), ["app"])
                              for port in (5000, 6000)])

        _plug(lab, lab.prefix + "new")
        wait_for(bound, "the agent to bind the tap")
        assert new_range in elems(live_table(hv), "out_open4")
        unplug()
        table = live_table(hv)
        # the range stays, unreachable: no dispatch element for the port, no identity
        assert new_range in elems(table, "out_open4")
        assert not any(e["concat"][0] == NEW_PORT for name in ("port_types", "port_src4", "out_open4_x", "bound_ports")
                       for e in elems(table, name))
        assert any("leave 1 interval-set elements of vnet19" in c for l in agent.logs() if l["event"] == "applied"
                   for c in l.get("changes", ()))

        # the same guest back on its port: the range is kept, not re-added, and allowed
        _plug(lab, lab.prefix + "new2")
        wait_for(bound, "the agent to bind the tap again")
        wait_for(lambda: (agent.state_json() or {}).get("leftover_ports") == [], "no leftover once bound")
        assert probe(lab.prefix + "new2", NEW_MAC, NEW_IP) == {"5000": {"app": True}, "6000": {"app": False}}
        unplug()

        # another guest's tap under the same name: newvm's range goes in its bind's transaction
        _plug(lab, lab.prefix + "oth", mac=OTHER_MAC, tap_mac=OTHER_TAP_MAC)
        wait_for(bound, "the agent to bind the other guest's tap")
        binds = [l for l in agent.logs() if l["event"] == "applied" and "link-new" in l.get("reasons", ())]
        assert f"delete out_open4 {json.dumps(new_range, sort_keys=True)}" in binds[-1]["changes"], binds[-1]
        table = live_table(hv)
        assert new_range not in elems(table, "out_open4") and other_range in elems(table, "out_open4")
        assert probe(lab.prefix + "oth", OTHER_MAC, OTHER_IP) == {"5000": {"app": False}, "6000": {"app": True}}
        assert not any(l["event"] == "leftover-collected" for l in agent.logs()), "collected before the test's binds: too slow a machine for 10 s"

        # unbound again; once the agent is quiet the leftover is deleted and read back
        unplug()

        def collected(n):
            return wait_for(lambda: (c := [l for l in agent.logs() if l["event"] == "leftover-collected"])[n:] and c[n],
                            "the collection", timeout=40)
        done = collected(0)
        assert (done["ports"], done["elements"], done["txn"]) == ([NEW_PORT], 1, "nfnetlink"), done
        assert other_range not in elems(live_table(hv), "out_open4")
        wait_for(lambda: agent.state_json().get("leftover_ports") == [], "no leftover in the agent state")
        plan = nsrun(hv, PY, "-m", "segguard.cli", "plan", "-c", str(cfg))
        assert plan.returncode == 0, plan.stdout + plan.stderr  # the kernel holds a fresh compile

        # a busy guest stays bound (320 ranges: interval-set elements beside the leftovers
        # that follow); two ports' leftovers are collected by one rebuild of the sets
        # that hold them, which keeps the busy guest's elements and every rule
        many = ", ".join(f'"{p}-{p + 1}"' for p in range(7000, 7000 + 3 * 320, 3))
        (cfg / "profiles" / "manyvm.yaml").write_text(
            _ranged("manyvm", "52:54:00:aa:00:0b", "10.30.0.22", "1-2").replace('["1-2"]', f"[{many}]"))
        wait_for(lambda: "52:54:00:aa:00:0b" in guarded(live_table(hv)), "the new profile in force")

        def busy():
            return sum(e["concat"][0] == "vnet22" for e in elems(live_table(hv), "out_open4"))
        _plug(lab, lab.prefix + "many", mac="52:54:00:aa:00:0b", tap_mac="fe:54:00:aa:00:0b", port="vnet22")
        wait_for(lambda: busy() == 320, "the busy guest's bind")
        for ns, mac, tap, port in (("new3", NEW_MAC, NEW_TAP_MAC, "vnet20"), ("oth2", OTHER_MAC, OTHER_TAP_MAC, "vnet21")):
            _plug(lab, lab.prefix + ns, mac=mac, tap_mac=tap, port=port)
            wait_for(lambda: any(e[0] == port for e in elems(live_table(hv), "out_dispatch")), f"the agent to bind {port}")
            nl.delete_link(hv, port)
        wait_for(lambda: (agent.state_json() or {}).get("leftover_ports") == ["vnet20", "vnet21"], "two ports' leftovers")
        # status says so, and judges the kernel in sync with what the agent holds
        st = wait_for(lambda: (r := agent.cli("status", "-c", str(cfg))).returncode == 0 and "2 unbound port(s) (vnet20, vnet21)" in r.stdout and r,
                      "status to report the leftovers", diag=lambda: agent.cli("status", "-c", str(cfg)).stdout)
        assert "not deleted yet: no dispatch element reaches them" in st.stdout and "realized == desired" in st.stdout
        js = json.loads(agent.cli("status", "-c", str(cfg), "--json").stdout)
        assert (js["in_sync"], js["leftover_elements"], js["drift"]) == (True, 2, []), js
        done = collected(1)
        assert (done["ports"], done["elements"], done["txn"]) == (["vnet20", "vnet21"], 2, "rebuild"), done
        plan = nsrun(hv, PY, "-m", "segguard.cli", "plan", "-c", str(cfg))
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert not any(e["concat"][0] in ("vnet20", "vnet21") for e in elems(live_table(hv), "out_open4"))
        assert busy() == 320
        assert done["encoded_in_child_seconds"] >= 3, done

        # newvm back on vnet20 while the child encodes the collection of its leftover:
        # the encoded sets lack its range (kept by the bind, not re-added), so the
        # commit must add it back, and the kernel then holds exactly a fresh compile
        new_range20 = {"concat": ["vnet20", app.ip4, "tcp", {"range": [5000, 5099]}]}
        _plug(lab, lab.prefix + "new4", port="vnet20")
        wait_for(lambda: any(e[0] == "vnet20" for e in elems(live_table(hv), "out_dispatch")), "the agent to bind vnet20")
        nl.delete_link(hv, "vnet20")
        wait_for(lambda: (agent.state_json() or {}).get("leftover_ports") == ["vnet20"], "vnet20's leftover")
        wait_for(lambda: any(l["event"] == "leftover-collect-started" and l["ports"] == ["vnet20"] for l in agent.logs()),
                 "the collection to start", timeout=40)
        _plug(lab, lab.prefix + "new5", port="vnet20")
        wait_for(lambda: any(e[0] == "vnet20" for e in elems(live_table(hv), "out_dispatch")), "the bind during the encoding")
        assert sum(l["event"] == "leftover-collected" for l in agent.logs()) == 2, "collected before the bind: 3 s was not enough"
        done = collected(2)
        assert done["ports"] == ["vnet20"] and f"add out_open4 {json.dumps(new_range20, sort_keys=True)}" in done["caught_up"], done
        assert new_range20 in elems(live_table(hv), "out_open4") and busy() == 320
        plan = nsrun(hv, PY, "-m", "segguard.cli", "plan", "-c", str(cfg))
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert probe(lab.prefix + "new5", NEW_MAC, NEW_IP) == {"5000": {"app": True}, "6000": {"app": False}}

        # a restart finds the busy guest's 320 leftovers in the kernel: its first road
        # replaces the table instead of deleting them one by one
        nl.delete_link(hv, "vnet22")
        wait_for(lambda: (agent.state_json() or {}).get("leftover_ports") == ["vnet22"], "its leftovers")
        agent.stop()
        assert busy() == 320
        _port[0] += 1
        agent = AgentProc(hv, cfg, tmp_path / "state", tmp_path / "agent2.log", _port[0]).start()
        first = next(l for l in agent.logs() if l["event"] == "applied")
        assert (first["kind"], first["reasons"]) == ("full", ["start"]), first
        plan = nsrun(hv, PY, "-m", "segguard.cli", "plan", "-c", str(cfg))
        assert plan.returncode == 0, plan.stdout + plan.stderr
    finally:
        agent.stop()


def test_table_deleted_by_hand_is_repaired_logged_and_counted(lab, agent):
    hv = lab.topology.hv_ns
    good = live_table(hv)
    nsrun(hv, "nft", "delete", "table", "bridge", "segguard", check=True)
    wait_for(lambda: live_table(hv) is not None, "the table to be repaired")
    from segguard.apply.nftables import diff_objects
    assert diff_objects(good, live_table(hv)).empty
    drift = [l for l in agent.logs() if l["event"] == "drift"]
    assert drift and drift[0]["kind"] == "table-deleted" and drift[0]["level"] == "warning", drift
    # the repair is the full replace, which the agent has a forked child commit
    repair = [l for l in agent.logs() if l["event"] == "applied" and l["kind"] == "full" and l["ts"] >= drift[0]["ts"]]
    assert repair and "in_process_because" not in repair[0], repair
    wait_for(lambda: 'segguard_drift_events_total{kind="table-deleted"} 1.0' in agent.metrics(), "the drift counter")
    # the state file is written once the repair is read back, a moment after the counter
    st = wait_for(lambda: (s := agent.state_json() or {}).get("last_drift") and s, "the drift in the agent state")
    assert st["last_drift"]["kind"] == "table-deleted"
    assert st["children_rss_peak_bytes"] > 0
    assert st["guests"]["xp-line3-hmi"]["last_drift"]["kind"] == "table-deleted"

    # a changed element (a port's verdict re-pointed by hand) is drift too
    nsrun(hv, "nft", "delete", "element", "bridge", "segguard", "out_dispatch", "{ vnet7 }", check=True)
    wait_for(lambda: ["vnet7", {"goto": {"target": "gout_inet_dom_deny"}}] in elems(live_table(hv), "out_dispatch"), "repair")
    assert any(l["event"] == "drift" and l["kind"] == "elements-changed" for l in agent.logs())


def test_a_change_made_while_the_agent_is_out_of_the_monitor_group_is_still_repaired(lab, cfg, tmp_path):
    """The agent leaves the nftables notification group while it commits a full
    replace (its ~60,000 echoes cost the kernel and it). A foreign commit in that
    window is never notified: the generation step says it happened, and the loop
    reconciles as for any foreign change. Here the window is held open
    (SEGGUARD_TEST_QUIET_HOLD) after the replace an edit to audit mode takes, and
    its read-back, and a port's dispatch element is deleted by hand meanwhile; the
    drift check is an hour away, so only the step can bring the element back."""
    hv = lab.topology.hv_ns
    hold = tmp_path / "hold"
    hold.mkdir()
    _port[0] += 1
    agent = AgentProc(hv, cfg, tmp_path / "state", tmp_path / "agent.log", _port[0],
                      args=("--verify-every", "0", "--drift-every", "3600"))
    agent.env["SEGGUARD_TEST_QUIET_HOLD"] = str(hold)
    try:
        agent.start()
        (hold / "arm").touch()
        prof = cfg / "profiles" / "xp-line3.yaml"
        # audit mode: chains of its own (their log prefix names it), so the full road
        prof.write_text(prof.read_text().replace("mode: enforce", "mode: audit  "))
        wait_for(lambda: (hold / "held").exists(), "the edit's replace, the agent out of the group")
        n = len(agent.logs())
        port, verdict = dispatched = elems(live_table(hv), "out_dispatch")[0]
        nsrun(hv, "nft", "delete", "element", "bridge", "segguard", "out_dispatch", f"{{ {port} }}", check=True)
        assert dispatched not in elems(live_table(hv), "out_dispatch")
        (hold / "held").unlink()
        wait_for(lambda: dispatched in elems(live_table(hv), "out_dispatch"), f"the deleted element of {port} put back")
        drift = [l for l in agent.logs()[n:] if l["event"] == "drift"]
        assert drift and drift[0]["kind"] == "elements-changed", drift
        assert any(l["event"] == "applied" and "nft-change" in l.get("reasons", []) for l in agent.logs()[n:])
        assert agent.cli("plan", "-c", str(cfg)).returncode == 0
    finally:
        agent.stop()


def test_bad_profile_keeps_the_old_policy_and_status_shows_file_line(lab, agent, cfg):
    hv = lab.topology.hv_ns
    good = live_table(hv)
    prof = cfg / "profiles" / "xp-line3.yaml"
    text = prof.read_text()
    prof.write_text(text.replace("{to: historian_db,", "{to: no_such_group,"))
    line = next(i for i, l in enumerate(prof.read_text().splitlines(), 1) if "no_such_group" in l)
    want = f"xp-line3.yaml:{line}: egress[0].to: unknown group 'no_such_group'"
    wait_for(lambda: any(want in p for p in (agent.state_json() or {}).get("config_error") or []), "the error in the agent state")
    assert any(l["event"] == "config-invalid" and any(want in p for p in l["problems"]) for l in agent.logs())
    from segguard.apply.nftables import diff_objects
    assert diff_objects(good, live_table(hv)).empty, "the old policy must stay in force"
    st = agent.cli("status", "-c", str(cfg))
    assert st.returncode == 2 and want in st.stdout, st.stdout + st.stderr
    assert "last good policy still enforced" in st.stdout
    # and the old policy still drops what it dropped: xp -> internet
    xp, rtr, inet = lab.host("xp"), lab.host("router"), lab.host("inet")
    eps = {"xp": lab.sink("xp"), "guest": lab.sink("guest"), "inet": lab.sink("inet")}
    with ProbeSession(eps, eps, settle=0.4) as s:
        res = s.run([
            ("xp", "xp", Probe(kind="tcp", src_mac=xp.mac, dst_mac=rtr.mac, src_ip=xp.ip4, dst_ip=inet.ip4, dport=443), ["inet"]),
            ("ctl", "guest", Probe(kind="tcp", src_mac=lab.host("guest").mac, dst_mac=rtr.mac, src_ip=lab.host("guest").ip4,
                                   dst_ip=inet.ip4, dport=443), ["inet"]),
        ])
    assert res == {"xp": {"inet": False}, "ctl": {"inet": True}}
    # fixing the file is picked up without a signal (inotify)
    prof.write_text(text.replace("ports: [3389]", "ports: [3389, 5900]"))
    wait_for(lambda: (agent.state_json() or {}).get("config_valid") and "5900" in json.dumps(live_table(hv)), "the fixed config")



def test_a_profile_edit_is_one_element_delta_and_frames_follow_it(lab, agent, cfg):
    """An edit of one profile's rules: the agent compiles that profile alone and sends
    its element delta (road "profile"); the kernel then holds what a fresh compile of
    the edited config gives, and frames follow the new rules (one port opened, one
    closed). An edit that changes the kind of profile takes the full road."""
    xp, jump = lab.host("xp"), lab.host("jump")
    prof = cfg / "profiles" / "xp-line3.yaml"
    text = prof.read_text()

    def reach() -> dict[int, bool]:
        eps = {"jump": lab.sink("jump"), "xp": lab.sink("xp")}
        with ProbeSession(eps, eps, settle=0.4) as s:
            res = s.run([(str(p), "jump", Probe(kind="tcp", src_mac=jump.mac, dst_mac=xp.mac, src_ip=jump.ip4, dst_ip=xp.ip4,
                                                dport=p), ["xp"]) for p in (3389, 5901)])
        return {p: res[str(p)]["xp"] for p in (3389, 5901)}

    def applied_since(n: int) -> list[dict]:
        return [entry for entry in agent.logs()[n:] if entry["event"] == "applied"]

    assert reach() == {3389: True, 5901: False}
    n = len(agent.logs())
    prof.write_text(text.replace("ports: [3389]", "ports: [5901]"))
    wait_for(lambda: applied_since(n), "the edit applied")
    (done,) = applied_since(n)
    assert (done["road"], done["kind"], done.get("txn")) == ("profile", "incremental", "nfnetlink"), done
    assert reach() == {3389: False, 5901: True}
    plan = agent.cli("plan", "-c", str(cfg))
    assert plan.returncode == 0, plan.stdout + plan.stderr  # nothing left to change
    # the next edit's reload reads only the file inotify named
    n = len(agent.logs())
    prof.write_text(text.replace("ports: [3389]", "ports: [5901, 5902]"))
    wait_for(lambda: applied_since(n), "the next edit applied")
    loaded = [e for e in agent.logs()[n:] if e["event"] == "config-loaded"]
    assert loaded and loaded[-1].get("files") == ["xp-line3.yaml"], loaded
    assert (applied_since(n)[0]["road"], applied_since(n)[0].get("txn")) == ("profile", "nfnetlink")
    assert agent.cli("plan", "-c", str(cfg)).returncode == 0
    # another kind of profile (default allow): new class chains, so the full road
    n = len(agent.logs())
    prof.write_text(text.replace("ports: [3389]", "ports: [5901]").replace("default: deny ", "default: allow"))
    wait_for(lambda: applied_since(n), "the second edit applied")
    assert applied_since(n)[0]["road"] == "full"
    assert agent.cli("plan", "-c", str(cfg)).returncode == 0

def test_kill_9_leaves_enforcement_and_a_restart_has_no_gap(lab, agent):
    hv = lab.topology.hv_ns
    before = live_table(hv)
    poller = subprocess.Popen(["ip", "netns", "exec", hv, PY, "-c", _POLLER], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    try:
        assert poller.stdout.readline().strip() == "polling"
        agent.kill9()
        from segguard.apply.nftables import diff_objects
        assert diff_objects(before, live_table(hv)).empty, "kill -9 must leave the table exactly as it was"
        agent.start()
        poller.stdin.write("stop\n")
        poller.stdin.flush()
        absent, handles, polls = json.loads(poller.stdout.readline())
    finally:
        poller.kill()
        poller.wait()
    assert polls > 10 and absent == 0, (absent, polls)
    assert len(handles) == 1, "a restart that finds the plan in place must send nothing (same table, no replace)"
    # still enforced: the xp guest still cannot reach the DC
    xp, dc = lab.host("xp"), lab.host("dc")
    eps = {"xp": lab.sink("xp"), "guest": lab.sink("guest"), "dc": lab.sink("dc")}
    with ProbeSession(eps, eps, settle=0.4) as s:
        res = s.run([("xp", "xp", Probe(kind="udp", src_mac=xp.mac, dst_mac=dc.mac, src_ip=xp.ip4, dst_ip=dc.ip4, dport=53), ["dc"]),
                     ("ctl", "guest", Probe(kind="udp", src_mac=lab.host("guest").mac, dst_mac=dc.mac, src_ip=lab.host("guest").ip4,
                                            dst_ip=dc.ip4, dport=53), ["dc"])])
    assert res == {"xp": {"dc": False}, "ctl": {"dc": True}}
    # SIGTERM removes nothing either
    agent.stop()
    assert diff_objects(before, live_table(hv)).empty


_POLLER = """
import json, sys, threading, nftables
n = nftables.Nftables(); n.set_json_output(True); n.set_handle_output(True)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
absent, handles, polls = 0, set(), 0
print("polling", flush=True)
while not stop.is_set():
    rc, out, err = n.cmd("list table bridge segguard")
    polls += 1
    if rc != 0:
        absent += 1
        continue
    t = [o for o in json.loads(out)["nftables"] if "table" in o]
    handles.add(t[0]["table"]["handle"])
print(json.dumps([absent, sorted(handles), polls]), flush=True)
"""


def test_every_writer_takes_one_lock_so_concurrent_applies_serialize(lab, agent, cfg):
    hv = lab.topology.hv_ns
    ino = os.stat(f"/run/netns/{hv}").st_ino
    lock = agent.state / f"netns-{ino}" / "lock"
    assert lock.exists(), "the agent took the lock in the same per-namespace state dir"
    fh = open(lock, "w")
    fcntl.flock(fh, fcntl.LOCK_EX)
    try:
        nsrun(hv, "nft", "delete", "table", "bridge", "segguard", check=True)
        cmd = ["ip", "netns", "exec", hv, PY, "-m", "segguard.cli", "apply", "-c", str(cfg), "--json"]
        applies = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent.env) for _ in range(2)]
        # while the lock is held no writer gets through: not the agent repairing the
        # deleted table, not either apply
        time.sleep(2.0)
        assert all(p.poll() is None for p in applies)
        assert live_table(hv) is None
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
    outs = [p.communicate(timeout=60) for p in applies]
    assert all(p.returncode == 0 for p in applies), outs
    results = sorted(json.loads(o)["result"] for o, _ in outs)
    # one writer created the table; whoever came after it found it in place
    assert live_table(hv) is not None
    assert results.count("applied") <= 1 and set(results) <= {"applied", "unchanged"}, results
    assert "applied" in results or any(l["event"] == "applied" and "nft-change" in l.get("reasons", []) for l in agent.logs())


DOMAIN_XML = """<domain type='qemu'><name>{name}</name><devices>
  <interface type='bridge'><mac address='{mac}'/><source bridge='br0'/><model type='virtio'/></interface>
</devices></domain>"""


def _hook(ns: str, env: dict, cfg: Path, name: str, mac: str, op: str = "prepare", sub: str = "begin") -> subprocess.CompletedProcess:
    # exactly libvirt's call: /etc/libvirt/hooks/qemu <domain> <operation> <sub-op> <extra>, XML on stdin
    return subprocess.run(["ip", "netns", "exec", ns, PY, "-m", "segguard.agent.libvirt_hook", "--config", str(cfg), name, op, sub, "-"],
                          input=DOMAIN_XML.format(name=name, mac=mac), capture_output=True, text=True, env=env, timeout=60)


def test_libvirt_hook_as_libvirt_calls_it(lab, agent, cfg, tmp_path):
    hv = lab.topology.hv_ns
    # policy loaded (the agent applied it): the legacy guest may start
    for op in (("prepare", "begin"), ("start", "begin")):
        ok = _hook(hv, agent.env, cfg, "newvm-1", NEW_MAC.upper(), *op)
        assert ok.returncode == 0, ok.stderr
    assert _hook(hv, agent.env, cfg, "ordinary", "52:54:00:bb:00:01").returncode == 0
    agent.stop()
    # policy missing: libvirt must abort the start, and says why
    nsrun(hv, "nft", "delete", "table", "bridge", "segguard", check=True)
    bad = _hook(hv, agent.env, cfg, "newvm-1", NEW_MAC)
    assert bad.returncode != 0 and "refusing to start legacy guest newvm-1" in bad.stderr, bad.stderr
    assert _hook(hv, agent.env, cfg, "newvm-1", NEW_MAC, "start", "begin").returncode != 0
    # a non-legacy domain starts as if segguard were not there; other operations are not guarded
    assert _hook(hv, agent.env, cfg, "ordinary", "52:54:00:bb:00:01").returncode == 0
    assert _hook(hv, agent.env, cfg, "newvm-1", NEW_MAC, "stopped", "end").returncode == 0
    # the policy applied by the CLI, no agent: a guest with an explicit port may start (its
    # rules are in place before its tap exists); one bound only by its tap may not, since
    # nothing would bind the tap and a forged source MAC from it would meet no rule
    assert agent.cli("apply", "-c", str(cfg)).returncode == 0
    xp = lab.host("xp")
    assert _hook(hv, agent.env, cfg, "xp-line3-hmi", xp.mac).returncode == 0
    portless = _hook(hv, agent.env, cfg, "newvm-1", NEW_MAC)
    assert portless.returncode != 0 and "no agent is running" in portless.stderr, portless.stderr
    # the policy of that guest changed by hand: not "loaded" either
    nsrun(hv, "nft", "flush", "chain", "bridge", "segguard", "gout_inet_dom_deny", check=True)
    changed = _hook(hv, agent.env, cfg, "xp-line3-hmi", xp.mac)
    assert changed.returncode != 0 and "gout_inet_dom_deny" in changed.stderr, changed.stderr
    # the installed hook script runs the same entry point
    from segguard.agent.install import write_hook
    hook = write_hook(tmp_path / "hooks" / "qemu", cfg)
    r = subprocess.run(["ip", "netns", "exec", hv, str(hook), "newvm-1", "prepare", "begin", "-"], input=DOMAIN_XML.format(name="x", mac=NEW_MAC),
                       capture_output=True, text=True, env=agent.env, timeout=60)
    assert r.returncode != 0 and "refusing" in r.stderr


def test_an_edit_and_a_tap_in_one_burst_take_the_two_small_roads(lab, cfg):
    """A profile edit and a new tap reconciled together (one coalesced run: reasons
    config + link-new) go as the edit's delta, then the bind's, not as the full road: at
    1,000 guests that burst had cost 2.1 s and ~40 MB at the agent's peak. The kernel
    then holds what a fresh compile gives."""
    from segguard.agent.reconcile import Reconciler

    class Log:
        def __init__(self):
            self.entries = []

        def info(self, event, **kw):
            self.entries.append({"event": event, **kw})

        warning = error = info

    hv, log = lab.topology.hv_ns, Log()
    with nl.enter_netns(hv):
        rec = Reconciler(cfg, log)
        assert rec.load()
        assert rec.reconcile(frozenset({"start"})).action == "full"
        prof = cfg / "profiles" / "xp-line3.yaml"
        prof.write_text(prof.read_text().replace("ports: [3389]", "ports: [5901]"))
        _plug(lab, lab.prefix + "new")
        assert rec.load(changed={"xp-line3.yaml"})
        n = len(log.entries)
        out = rec.reconcile(frozenset({"config", "link-new"}))
    applied = [e for e in log.entries[n:] if e["event"] == "applied"]
    assert [e["road"] for e in applied] == ["profile", "fast"], applied
    assert out.action == "incremental" and rec.fast_path_skipped is None
    assert any("5901" in c for c in out.changes) and any(NEW_PORT in c for c in out.changes), out.changes
    assert NEW_PORT in {e[0] for e in elems(live_table(hv), "out_dispatch")}
    plan = nsrun(hv, PY, "-m", "segguard.cli", "plan", "-c", str(cfg))
    assert plan.returncode == 0, plan.stdout + plan.stderr  # nothing left to change
