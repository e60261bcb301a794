"""A real libvirt VM plugged into the lab bridge while the real agent runs.

libvirtd and virtlogd run in the lab's hypervisor namespace (tests/libvirt_vm/daemon.py);
the VM is TCG qemu booting Debian's kernel with a busybox initramfs whose init probes
the network and prints verdicts on the serial console.  The profile names the VM's MAC
and no port, so the agent must find the tap itself (libvirt, or libvirt's tap MAC
convention) and enforce it before the guest's first frame: the probes start the moment
the guest's link is up, with no grace period.

Every verdict is judged twice: by the guest (its log) and at the far end (probe-engine
sink workers for the UDP markers, nft counters in each sink namespace for anything from
the VM's address, TCP listeners that would have accepted).  Every "blocked" sink is
proven observable by a control from the lab's unprofiled guest afterwards.

The host kernel runs this (marker netns); only the guest is emulated.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from segguard.host.libvirt import ports_from_domain_xml
from segguard.lab import netns as nl
from segguard.lab.topology import Lab
from segguard.verify.lab import LAB_CONFIG
from segguard.verify.probes import Probe, ProbeSession, new_marker
from tests import helpers
from tests.helpers import wait_for
from tests.libvirt_vm import render_domain
from tests.libvirt_vm.daemon import LibvirtError, PrivateLibvirt, ensure_installed
from tests.libvirt_vm.initramfs import build as build_initramfs
from tests.libvirt_vm.initramfs import guest_kernel
from tests.netns.conftest import unique_prefix

pytestmark = pytest.mark.netns
PY = sys.executable
REPO = Path(__file__).resolve().parents[2]

VM_MAC, VM_IP = "52:54:00:aa:00:03", "10.30.0.17"
GUEST = "sgr-vm-1"
PROFILE = f"""name: sgr-vm
description: a legacy guest started by libvirt while the agent runs
bridge: br0
vlan: 30
guests:
  - name: {GUEST}
    mac: "{VM_MAC}"
    ipv4: [{VM_IP}]
    ipv6: []
block: {{internet: true, domain: true}}
egress:
  - {{to: historian_db, proto: tcp, ports: [1433]}}
  - {{to: historian_db, proto: udp, ports: [5140]}}
default: deny
mode: enforce
"""
APP, DC, JUMP, HV, MGMT, INET = "10.30.0.20", "10.30.0.10", "10.30.0.30", "10.30.0.1", "10.30.250.10", "203.0.113.10"
ROUTER_MAC = "52:54:00:cc:00:fe"
# (name, kind, destination, port, sink role, allowed?)  Every blocked TCP port has a
# listener, so "failed" can only mean the wall; ICMP is answered by every kernel.
PROBES = (
    ("tcp-app-1433", "tcp", APP, 1433, "app", True),        # egress rule
    ("udp-app-5140", "udp", APP, 5140, "app", True),        # egress rule
    ("tcp-app-22", "tcp", APP, 22, "app", False),           # default deny: port not named
    ("ping-app", "ping", APP, 0, "app", False),             # default deny: proto not named
    ("tcp-dc-445", "tcp", DC, 445, "dc", False),            # guard rail: domain
    ("udp-dc-389", "udp", DC, 389, "dc", False),            # guard rail: domain
    ("ping-dc", "ping", DC, 0, "dc", False),                # guard rail: domain
    ("udp-jump-5140", "udp", JUMP, 5140, "jump", False),    # default deny: peer not named
    ("udp-hv-5140", "udp", HV, 5140, "hypervisor", False),  # guard rail: hypervisor
    ("ping-hv", "ping", HV, 0, "hypervisor", False),        # guard rail: hypervisor
    ("udp-mgmt-5140", "udp", MGMT, 5140, "mgmt", False),    # guard rail: management
    ("udp-inet-53", "udp", INET, 53, "inet", False),        # guard rail: internet
    ("ping-inet", "ping", INET, 0, "inet", False),          # guard rail: internet
)
LISTEN = {("app", 1433), ("app", 22), ("dc", 445)}
# Where anything sourced from the VM is counted; the router counts what it would
# have forwarded to mgmt/inet.
COUNT_AT = ("app", "dc", "jump", "hypervisor", "router", "mgmt", "inet")


@pytest.fixture
def lab_prefix() -> str:
    return unique_prefix("sgr")


def nsrun(ns: str, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return helpers.nsrun(ns, *cmd, check=check, timeout=60, **kw)


# --------------------------------------------------------------------------- far-end observers


class Listener:
    """A TCP server in a lab namespace that records who connected and what they sent."""

    def __init__(self, ns: str, addr: str, port: int) -> None:
        with nl.enter_netns(ns):  # the socket belongs to the namespace it was made in
            self.sock = socket.create_server((addr, port), reuse_port=False)
        self.sock.settimeout(0.2)
        self.accepted: list[tuple[str, bytes]] = []
        self._stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\n" not in data and (chunk := conn.recv(4096)):
                        data += chunk
                self.accepted.append((peer[0], data))

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=2)
        self.sock.close()


def install_counters(ns: str, ports: dict[str, tuple[int, ...]]) -> None:
    """Counters for IPv4 from the VM at the earliest IP hook of a sink namespace.  A
    table of the test's own, in namespaces the test owns (in the hypervisor namespace it
    is an inet table, which the bridge-family segguard table never sees)."""
    rules = []
    for proto, plist in ports.items():
        for p in plist:
            rules.append(f"ip saddr {VM_IP} {proto} dport {p} counter comment \"{proto}-{p}\"")
    rules.append(f"ip saddr {VM_IP} icmp type echo-request counter comment \"icmp\"")
    rules.append(f"ip saddr {VM_IP} counter comment \"all\"")
    script = "table inet sgr_count {\n chain pre {\n  type filter hook prerouting priority -400; policy accept;\n"
    script += "".join(f"  {r}\n" for r in rules) + " }\n}\n"
    nsrun(ns, "nft", "-f", "-", input=script)


def read_counters(ns: str) -> dict[str, int]:
    out = json.loads(nsrun(ns, "nft", "-j", "list", "table", "inet", "sgr_count").stdout)["nftables"]
    counts = {}
    for o in out:
        r = o.get("rule")
        if r and r.get("comment"):
            counts[r["comment"]] = next(e["counter"]["packets"] for e in r["expr"] if "counter" in e)
    return counts


def live_elements(ns: str, name: str) -> list:
    p = nsrun(ns, "nft", "-j", "list", "table", "bridge", "segguard", check=False)
    if p.returncode != 0:
        return []
    for o in json.loads(p.stdout)["nftables"]:
        body = o.get("map") or o.get("set")
        if body and body.get("name") == name:
            return body.get("elem", [])
    return []


def flat(elem) -> str:
    return json.dumps(elem)


# --------------------------------------------------------------------------- the agent


class Agent:
    def __init__(self, lv: PrivateLibvirt, config: Path, state: Path, log: Path) -> None:
        self.env = dict(os.environ, SEGGUARD_STATE=str(state), PYTHONPATH=str(REPO))
        self.state, self.logpath = state, log
        self.fh = open(log, "a")
        cmd = lv.enter_cmd([PY, "-m", "segguard.cli", "agent", "-c", str(config),
                            "--verify-every", "0", "--drift-every", "5"])
        self.proc = subprocess.Popen(cmd, stderr=self.fh, stdout=subprocess.DEVNULL, env=self.env)

    def state_json(self) -> dict | None:
        for d in self.state.glob("netns-*"):
            with contextlib.suppress(OSError, ValueError):
                return json.loads((d / "agent.json").read_text())
        return None

    def ready(self) -> bool:
        s = self.state_json() or {}
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log_tail()}")
        return bool(s.get("ready")) and s.get("pid") == self.proc.pid

    def guest(self) -> dict:
        return ((self.state_json() or {}).get("guests") or {}).get(GUEST) or {}

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.logpath.read_text()[-n:]
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.fh.close()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def vm_boot() -> tuple[Path, Path]:
    try:
        ensure_installed()
    except LibvirtError as exc:
        pytest.fail(f"libvirt stack unavailable and not installable: {exc}")
    kernel, root = guest_kernel()
    return kernel, build_initramfs(root)


@pytest.fixture
def libvirtd(lab: Lab, tmp_path: Path) -> Iterator[PrivateLibvirt]:
    lv = PrivateLibvirt(lab.hv_ns, tmp_path / "libvirt")
    lv.start()
    try:
        yield lv
    finally:
        lv.stop()


def cmdline(markers: dict[str, str]) -> str:
    words = ["console=ttyS0", "panic=-1", "loglevel=3", f"sgr.ip={VM_IP}/24", "sgr.gw=10.30.0.254"]
    neigh = [f"{ip}@{mac}" for ip, mac in ((APP, "52:54:00:cc:00:20"), (DC, "52:54:00:cc:00:10"),
                                           (JUMP, "52:54:00:cc:00:30"), (HV, "52:54:00:00:00:01"),
                                           ("10.30.0.254", ROUTER_MAC))]
    words.append("sgr.n=" + ",".join(neigh))
    for i, (name, kind, ip, port, _sink, _ok) in enumerate(PROBES):
        words.append(f"sgr.p{i}={name}:{kind}:{ip}:{port}:{markers[name]}")
    return " ".join(words)


def guest_results(console: str) -> dict[str, str]:
    out = {}
    for line in console.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "SGR-PROBE":
            out[parts[1]] = parts[2]
    return out


# --------------------------------------------------------------------------- the test


def test_libvirt_vm_started_under_the_agent_is_bound_and_enforced_from_its_first_frame(
        lab: Lab, libvirtd: PrivateLibvirt, vm_boot: tuple[Path, Path], tmp_path: Path) -> None:
    import libvirt

    kernel, initrd = vm_boot
    topo = lab.topology
    ns = {role: topo.host(role).ns for role in ("app", "dc", "jump", "hypervisor", "router", "mgmt", "inet", "guest")}

    cfg = tmp_path / "cfg"
    (cfg / "profiles").mkdir(parents=True)
    shutil.copy(LAB_CONFIG / "site.yaml", cfg / "site.yaml")
    (cfg / "profiles" / "sgr-vm.yaml").write_text(PROFILE)

    # The allowed peer must answer without ARPing for the VM: a verdict may not hinge on
    # an ARP exchange the wall itself could be blocking.
    nsrun(ns["app"], "ip", "neigh", "replace", VM_IP, "lladdr", VM_MAC, "dev", "eth0", "nud", "permanent")
    for role in COUNT_AT:
        tcp = tuple(p for r, p in LISTEN if r == role) or (1433,)
        udp = tuple(sorted({p for _n, k, _ip, p, s, _ok in PROBES if k == "udp" and s == role})) or (5140,)
        install_counters(ns[role], {"tcp": tcp, "udp": udp})
    listeners = {(role, port): Listener(ns[role], topo.host(role).ip4, port) for role, port in LISTEN}

    markers = {name: new_marker().decode() for name, *_ in PROBES}
    sink_roles = ("app", "dc", "jump", "hypervisor", "mgmt", "inet")
    sinks = {role: lab.sink(role) for role in sink_roles}
    session = ProbeSession({"guest": lab.sink("guest")}, sinks, settle=0.5)
    agent: Agent | None = None
    conn = None
    console = tmp_path / "console.log"
    try:
        session.start()
        agent = Agent(libvirtd, cfg, tmp_path / "state", tmp_path / "agent.log")
        wait_for(agent.ready, "the agent's first apply", 60)
        before = agent.guest()
        assert before.get("port") is None and before.get("source") == "unbound", before

        xml = render_domain(name=f"{lab.prefix}vm", kernel=kernel, initrd=initrd, cmdline=cmdline(markers),
                            mac=VM_MAC, bridge=lab.bridge, console_log=console)
        conn = libvirt.open(libvirtd.uri)
        dom = conn.defineXML(xml)
        dom.create()
        ports = dict(ports_from_domain_xml(dom.XMLDesc(0)))
        tap = ports.get(VM_MAC)
        assert tap, f"libvirt reports no tap for {VM_MAC}: {dom.XMLDesc(0)}"
        # what the agent reads: libvirtd's own status file of the running domain, seen
        # from the daemons' mount namespace as the agent sees it (no libvirt binding)
        probe = subprocess.run(libvirtd.enter_cmd([sys.executable, "-c",
                               "import sys, json; from segguard.host.libvirt import libvirt_ports; "
                               "print(json.dumps([libvirt_ports(), 'libvirt' in sys.modules]))"]),
                               capture_output=True, text=True, timeout=60, cwd=str(REPO))
        assert probe.returncode == 0, probe.stderr
        seen, loaded = json.loads(probe.stdout)
        assert [VM_MAC, tap] in seen and not loaded, (seen, loaded)

        text = wait_for(lambda: (t := console.read_text(errors="replace") if console.exists() else "")
                        and "SGR-DONE" in t and t, "the guest's probes (serial log)", 300, every=0.5)
        diag = f"\n--- console\n{text[-3000:]}\n--- agent\n{agent.log_tail()}"

        # The binding, as the agent reports it and as the kernel holds it.
        g = agent.guest()
        print(f"agent binding: {g}")
        assert g.get("port") == tap, f"agent bound {g} but libvirt's tap is {tap}{diag}"
        assert g.get("source") in ("libvirt", "tap-mac"), g
        assert g.get("in_sync") is True, g
        dispatch = [flat(e) for e in live_elements(ns["hypervisor"], "out_dispatch")]
        assert any(f'"{tap}"' in e for e in dispatch), f"{tap} not in the live out_dispatch map: {dispatch}{diag}"

        # The guest's view.
        got = guest_results(text)
        assert "SGR-NET-UP" in text and "-FAILED" not in text, diag
        want = {name: ({"tcp": "connected", "ping": "replied", "udp": "sent"}[kind] if ok
                       else {"tcp": "failed", "ping": "failed", "udp": "sent"}[kind])
                for name, kind, _ip, _p, _s, ok in PROBES}
        assert got == want, f"guest verdicts {got} != profile {want}{diag}"

        # The far end: markers at the sink workers ...
        seen: dict[str, set[str]] = {}
        for role, ep in sinks.items():
            rep = session._worker(ep).call({"op": "collect", "reset": True})
            seen[role] = set(rep["markers"])
        for name, kind, _ip, _p, sink, ok in PROBES:
            if kind == "ping":
                continue
            assert (markers[name] in seen[sink]) == ok, \
                f"{name}: marker {'missing' if ok else 'ARRIVED'} at {sink}{diag}"
        # ... TCP listeners ...
        assert [d for _, d in listeners[("app", 1433)].accepted] == [markers["tcp-app-1433"].encode() + b"\n"], \
            listeners[("app", 1433)].accepted
        assert listeners[("app", 22)].accepted == [] and listeners[("dc", 445)].accepted == []
        # ... and counters of anything from the VM's address, per sink namespace.
        counts = {role: read_counters(ns[role]) for role in COUNT_AT}
        assert counts["app"]["tcp-1433"] > 0 and counts["app"]["udp-5140"] > 0, counts
        assert counts["app"]["tcp-22"] == 0 and counts["app"]["icmp"] == 0, counts
        for role in COUNT_AT:
            if role != "app":
                assert counts[role]["all"] == 0, f"frames from the VM reached {role}: {counts[role]}{diag}"

        # Controls: each blocked sink sees the same kind of frame from the unprofiled
        # guest, and the blocked listeners accept a connection from it.
        ctl = []
        for name, kind, ip, port, sink, ok in PROBES:
            if ok or kind != "udp":
                continue
            dst_mac = (ROUTER_MAC if sink in ("mgmt", "inet") else session.mac_of(sink))
            ctl.append((f"control/{name}", "guest",
                        Probe(kind="udp", src_mac=topo.host("guest").mac, dst_mac=dst_mac,
                              src_ip=topo.host("guest").ip4, dst_ip=ip, dport=port), [sink]))
        results = session.run(ctl)
        assert all(all(v.values()) for v in results.values()), f"a sink could not see a control: {results}"
        for role, port in (("app", 22), ("dc", 445)):
            with nl.enter_netns(ns["guest"]):
                s = socket.create_connection((topo.host(role).ip4, port), timeout=5)
            s.close()
    finally:
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                d = conn.lookupByName(f"{lab.prefix}vm")
                if d.isActive():
                    d.destroy()
                d.undefine()
            conn.close()
        if agent is not None:
            agent.stop()
        session.close()
        for lst in listeners.values():
            lst.close()
