"""Plug latency of the real agent: from the moment a guest's tap is created on a guarded
bridge to the moment its policy is in force, with 1, 100 and 1,000 guests configured;
and the agent's memory and idle CPU.  A benchmark, not a test: it prints figures and
writes benchmarks/results/plug.json; it asserts no timing.

Setup (namespaces `sgy-plug-*`, deleted on exit): a hypervisor namespace with br0, two
far-end hosts on it (the allowed peer historian_db 10.65.0.20 and the domain controller
10.65.0.10, each a veth port with learning off and a static FDB entry, as in the lab),
and `segguard agent` running there on a fleet of N guests whose profiles name no port,
so each plug is bound by libvirt's tap MAC convention, as a libvirt tap would be.

One plug: t0, create the veth "tap" (host side MAC = guest MAC with fe first octet; the
guest side in a namespace of its own), enslave it, bring both ends up; then, until both
are seen, inject from the guest side (a) a UDP frame its profile allows (to
historian_db:514) and (b) a frame its profile blocks (to the DC, an AD port), and poll
the live table.  Two figures per plug:
  enforced (frame)  the first allowed frame arriving at the peer.  Before binding the
                    guest's MAC is dropped on every port (fail closed), so the first
                    allowed arrival is the first moment the port carries its own policy.
  enforced (table)  the tap's element appearing in the live `out_dispatch` map (nftables
                    module, polled).
Blocked frames arriving at the DC are counted over every plug: the zero window says 0.
The tap is then deleted and its element awaited gone before the next plug.

Profile edits (per-guest shape): one more tap stays plugged for the last guest; each
edit rewrites that guest's profile file (write a temporary file, rename over: as an
editor or config management does) with one more TCP port to historian_db than the
base rules, a different one each time (the previous edit's port goes). t0 is the
rename; then frames to the new port and to the previous edit's port are sent until
the new one arrives:
  edit enforced     rename -> the first frame to the new port arriving at the peer.
  old port after    frames to the previous port that arrived after the new port did
                    (one transaction adds the new and deletes the old: must be 0).

With `--running K`, the taps of K other guests are on the bridge before the agent
starts (a running fleet: it binds them all at start), so every plug happens beside
them; without it the fleet's other guests are configured but not running.

`python -m benchmarks.bench_plug [--guests 10 100 1000 5000] [--plugs 100] [--running K]
[--shape per-guest|shared]` as root, from the repo root.  Targets (issue 4): p99 under 100 ms, flat in N; RSS under
80 MB.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common as c

PREFIX = "sgy-plug-"
HV = PREFIX + "hv"
PEERS = {  # role: (ns suffix, port, mac, ipv4)
    "srv": ("srv", "srv0", "52:54:00:65:00:20", "10.65.0.20"),
    "dc": ("dc", "dc0", "52:54:00:65:00:10", "10.65.0.10"),
}
ALLOWED_PORT, BLOCKED_PORT = 514, 445  # udp 514 to historian_db is in RULES_YAML; 445 to a DC never is
PLUG_TIMEOUT = 30.0  # one plug; a slower agent counts as a timeout, not a hang


def _ns(suffix: str) -> str:
    return PREFIX + suffix


def build(n_guest_ns: int = 0) -> None:
    from segguard.lab import netns as nl

    destroy()
    for suffix in ("hv", *(v[0] for v in PEERS.values()), "g"):
        nl.create_netns(_ns(suffix))
    for suffix in (*(v[0] for v in PEERS.values()), "g"):
        nl.write_sysctls(_ns(suffix), {"net.ipv6.conf.default.disable_ipv6": 1, "net.ipv6.conf.all.disable_ipv6": 1})
    with nl.ipr(HV) as ip:
        br = nl.create_bridge(ip, c.BRIDGE, "52:54:00:65:00:01")
        nl.write_sysctls(HV, {"net.ipv6.conf.default.disable_ipv6": 1})
        for _suffix, port, mac, _v4 in PEERS.values():
            idx = nl.create_veth(ip, port, None, "eth0", mac, _ns(_suffix))
            nl.enslave(ip, idx, br, learning=False)
            nl.add_static_fdb(ip, idx, mac)
            nl.set_up(ip, idx)
        nl.add_address(ip, br, f"{c.BRIDGE_V4}/16")
        nl.set_up(ip, br)
    nl.write_sysctls(HV, {"net.bridge.bridge-nf-call-iptables": 0, "net.bridge.bridge-nf-call-ip6tables": 0,
                          "net.bridge.bridge-nf-call-arptables": 0}, missing_ok=True)
    for suffix, _port, _mac, v4 in PEERS.values():
        with nl.ipr(_ns(suffix)) as ip:
            idx = nl.link_index(ip, "eth0")
            nl.add_address(ip, idx, f"{v4}/16")
            nl.set_up(ip, idx)


def destroy() -> None:
    from segguard.lab import netns as nl

    for name in nl.list_netns(PREFIX):
        nl.delete_netns(name)


class Sink:
    """Counts marker-carrying frames arriving at one far-end host."""

    def __init__(self, ns: str) -> None:
        from segguard.lab import netns as nl

        with nl.enter_netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind(("eth0", 0x0003))
        self.sock.settimeout(0.2)
        self.lock = threading.Lock()
        self.first: dict[bytes, float] = {}
        self.count: dict[bytes, int] = {}
        self.arrivals: dict[bytes, list[float]] = {}
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        from segguard.verify.worker import MARKER_RE

        while not self.stop:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                continue
            t = time.perf_counter()
            for m in MARKER_RE.findall(data):
                with self.lock:
                    self.first.setdefault(m, t)
                    self.count[m] = self.count.get(m, 0) + 1
                    self.arrivals.setdefault(m, []).append(t)

    def times(self, marker: bytes) -> list[float]:
        with self.lock:
            return list(self.arrivals.get(marker, ()))

    def seen(self, marker: bytes) -> float | None:
        with self.lock:
            return self.first.get(marker)

    def hits(self, marker: bytes) -> int:
        with self.lock:
            return self.count.get(marker, 0)

    def close(self) -> None:
        self.stop = True
        self.thread.join(timeout=1)
        self.sock.close()


class AgentProc:
    def __init__(self, config: Path, state: Path, log: Path) -> None:
        self.state = state
        self.fh = open(log, "w")
        env = dict(os.environ, SEGGUARD_STATE=str(state), PYTHONPATH=str(c.ROOT))
        self.proc = subprocess.Popen(["ip", "netns", "exec", HV, sys.executable, "-m", "segguard.cli", "agent",
                                      "-c", str(config)], stderr=self.fh, stdout=subprocess.DEVNULL, env=env)
        self.log = log

    def state_json(self) -> dict:
        for d in self.state.glob("netns-*"):
            with contextlib.suppress(OSError, ValueError):
                return json.loads((d / "agent.json").read_text())
        return {}

    def wait_ready(self, timeout: float = 600.0) -> float:
        t = time.perf_counter()
        while time.perf_counter() - t < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"agent exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            s = self.state_json()
            if s.get("ready") and s.get("pid") == self.proc.pid:
                return time.perf_counter() - t
            time.sleep(0.05)
        raise SystemExit(f"agent not ready after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def status(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
        return out

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        # children included (utime+stime+cutime+cstime): the agent forks its periodic
        # drift check and its plan writer, whose CPU is the agent's too
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.fh.close()


def write_config(d: Path, n: int, shape: str) -> None:
    (d / "profiles").mkdir(parents=True, exist_ok=True)
    (d / "site.yaml").write_text(c.SITE_YAML)
    if shape == "shared":
        (d / "profiles" / "shared.yaml").write_text(
            c.profile_yaml(0, shared_name="shared", guests=list(range(n)), port=False))
    else:
        for i in range(n):
            (d / "profiles" / f"{c.guest_name(i)}.yaml").write_text(c.profile_yaml(i, port=False))


def dispatch_has(sock, tap: str) -> bool:
    """Whether the live out_dispatch map has the tap's element: one nfnetlink get of
    that key. (Listing the map through libnftables fetched every set's elements first:
    ~50 ms with 900 guests bound, and the frames of a plug were sent only between two
    such polls, so the poll, not the agent, set the measured latency.)"""
    return sock.get("segguard", "out_dispatch", (["ifname"], False, True), [tap, None]) is not None


def running_taps(n: int, plugs: int, count: int) -> int:
    """Taps of `count` other guests, present before the agent starts (a running fleet:
    the agent binds them at start, and every later bind happens beside them). Guests
    from `plugs` up (the plugged ones are 0..plugs-1), never the edited last one; both
    ends of each veth stay in the hypervisor namespace. Returns how many were made."""
    first, last = min(plugs, n), n - 2
    made = max(0, min(count, last - first + 1))
    cmds = []
    for gi in range(first, first + made):
        cmds += [f"link add sgyr{gi} address {c.tap_mac(gi)} type veth peer name sgyq{gi}",
                 f"link set sgyr{gi} master {c.BRIDGE}", f"link set sgyr{gi} up", f"link set sgyq{gi} up"]
    if cmds:
        subprocess.run(["ip", "-n", HV, "-batch", "-"], input="\n".join(cmds) + "\n", text=True, check=True)
    return made


def run_case(n: int, plugs: int, shape: str, idle_seconds: float, budget: float, ready_timeout: float = 600.0,
             edits: int = 0, running: int = 0) -> dict:
    build()
    made = running_taps(n, plugs, running)
    sinks: dict[str, Sink] = {}
    agent = None
    try:
        with tempfile.TemporaryDirectory(prefix="sgy-plug-") as tmp:
            d = Path(tmp)
            write_config(d / "cfg", n, shape)
            agent = AgentProc(d / "cfg", d / "state", d / "agent.log")
            try:
                return {**_measure(agent, d, n, plugs, shape, idle_seconds, budget, ready_timeout, sinks, edits),
                        "running_taps": made}
            finally:
                # before the directory goes: the agent (and its forked plan writer) write there
                agent.stop()
    finally:
        for s in sinks.values():
            s.close()
        if agent is not None:
            agent.stop()
        destroy()


def _edits(agent: "AgentProc", d: Path, n: int, count: int, sinks: dict) -> dict:
    from segguard.lab import netns as nl
    from segguard.verify.probes import Probe, build_frame, new_marker

    gi = n - 1
    tap, peer = "sgype", "ge"
    gmac, gv4 = c.guest_mac(gi), c.guest_v4(gi)
    prof = d / "cfg" / "profiles" / f"{c.guest_name(gi)}.yaml"
    enforced: list[float] = []
    old_after = 0
    timeouts = 0
    with nl.ipr(HV) as ip, nl.ipr(_ns("g")) as gip:
        idx = nl.create_veth(ip, tap, c.tap_mac(gi), peer, gmac, _ns("g"))
        nl.enslave(ip, idx, nl.link_index(ip, c.BRIDGE))
        nl.set_up(ip, idx)
        nl.set_up(gip, nl.link_index(gip, peer))
    with nl.enter_netns(_ns("g")):
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    tx.bind((peer, 0))
    try:
        def frame(port: int, marker: bytes) -> bytes:
            return build_frame(Probe(kind="tcp", src_mac=gmac, dst_mac=PEERS["srv"][2], src_ip=gv4,
                                     dst_ip=PEERS["srv"][3], dport=port), marker)
        # the tap is bound (its base rules enforced) before the first edit
        base_m = new_marker()
        t0 = time.perf_counter()
        while sinks["srv"].seen(base_m) is None and time.perf_counter() - t0 < PLUG_TIMEOUT:
            with contextlib.suppress(OSError):
                tx.send(frame(1433, base_m))
            time.sleep(0.002)
        for j in range(1, count + 1):
            new_port, old_port = 1500 + j, 1500 + j - 1
            new_m, old_m = new_marker(), new_marker()
            new_f, old_f = frame(new_port, new_m), frame(old_port, old_m)
            tmp = prof.with_suffix(".tmp")
            tmp.write_text(c.profile_yaml(gi, port=False, variant=j))
            t0 = time.perf_counter()
            os.replace(tmp, prof)
            seen = None
            while seen is None and time.perf_counter() - t0 < PLUG_TIMEOUT:
                with contextlib.suppress(OSError):
                    tx.send(new_f)
                    if j > 1:
                        tx.send(old_f)
                seen = sinks["srv"].seen(new_m)
                time.sleep(0.0002)
            if seen is None:
                timeouts += 1
                continue
            enforced.append(seen - t0)
            # the old port's frames sent after the switch: none may arrive
            for _ in range(20):
                with contextlib.suppress(OSError):
                    tx.send(old_f)
            time.sleep(0.05)
            old_after += sum(1 for t in sinks["srv"].times(old_m) if t > seen)
            time.sleep(0.1)  # let the agent's follow-up table check start and go
    finally:
        tx.close()
        nl.delete_link(HV, tap)
    return {"edit_enforced": c.summarize(enforced), "edit_samples": enforced, "edits": count, "edit_timeouts": timeouts,
            "old_port_after_switch": old_after}


def _measure(agent: "AgentProc", d: Path, n: int, plugs: int, shape: str, idle_seconds: float, budget: float,
             ready_timeout: float, sinks: dict, edits_wanted: int = 0) -> dict:
    from segguard.lab import netns as nl
    from segguard.verify.probes import Probe, build_frame, new_marker

    ready_s = agent.wait_ready(ready_timeout)
    # idle: nothing plugged, nothing edited; whatever the agent does on its own
    time.sleep(1.0)
    cpu0, w0 = agent.cpu_seconds(), time.perf_counter()
    time.sleep(idle_seconds)
    idle_cpu = (agent.cpu_seconds() - cpu0) / (time.perf_counter() - w0)
    mem_idle = agent.status()

    sinks.update({role: Sink(_ns(v[0])) for role, v in PEERS.items()})
    enforced_frame: list[float] = []
    enforced_table: list[float] = []
    unplug: list[float] = []
    blocked_arrived = 0
    timeouts = 0
    from segguard.apply.nfnl import NfnlSocket

    with nl.enter_netns(HV):
        nft_hv = NfnlSocket()  # bound to the hypervisor namespace at creation
    with nl.ipr(HV) as ip, nl.ipr(_ns("g")) as gip:
        br = nl.link_index(ip, c.BRIDGE)
        started = time.perf_counter()
        done = 0
        for k in range(plugs):
            if time.perf_counter() - started > budget:
                print(f"  budget of {budget:.0f} s spent after {k} plugs", flush=True)
                break
            done += 1
            gi = k % n
            tap, peer = f"sgyp{k}", f"g{k}"
            gmac, gv4 = c.guest_mac(gi), c.guest_v4(gi)
            ok_m, bad_m = new_marker(), new_marker()
            ok_f = build_frame(Probe(kind="udp", src_mac=gmac, dst_mac=PEERS["srv"][2], src_ip=gv4,
                                     dst_ip=PEERS["srv"][3], dport=ALLOWED_PORT), ok_m)
            bad_f = build_frame(Probe(kind="udp", src_mac=gmac, dst_mac=PEERS["dc"][2], src_ip=gv4,
                                      dst_ip=PEERS["dc"][3], dport=BLOCKED_PORT), bad_m)
            t0 = time.perf_counter()
            idx = nl.create_veth(ip, tap, c.tap_mac(gi), peer, gmac, _ns("g"))
            nl.enslave(ip, idx, br)
            nl.set_up(ip, idx)
            nl.set_up(gip, nl.link_index(gip, peer))
            with nl.enter_netns(_ns("g")):
                tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            tx.bind((peer, 0))
            t_frame = t_table = None
            i = 0
            while (t_frame is None or t_table is None) and time.perf_counter() - t0 < PLUG_TIMEOUT:
                with contextlib.suppress(OSError):  # ENETDOWN until the veth has carrier
                    tx.send(ok_f)
                    tx.send(bad_f)
                if t_frame is None:
                    seen = sinks["srv"].seen(ok_m)
                    if seen is not None:
                        t_frame = seen - t0
                if t_table is None and i % 2 == 0 and dispatch_has(nft_hv, tap):
                    t_table = time.perf_counter() - t0
                i += 1
                time.sleep(0.0002)
            tx.close()
            if t_frame is None or t_table is None:
                timeouts += 1
            if t_frame is not None:
                enforced_frame.append(t_frame)
            if t_table is not None:
                enforced_table.append(t_table)
            time.sleep(0.02)  # blocked frames still in flight
            blocked_arrived += sinks["dc"].hits(bad_m)

            t1 = time.perf_counter()
            nl.delete_link(HV, tap)
            while dispatch_has(nft_hv, tap) and time.perf_counter() - t1 < PLUG_TIMEOUT:
                time.sleep(0.001)
            unplug.append(time.perf_counter() - t1)
    edits = _edits(agent, d, n, edits_wanted, sinks) if shape == "per-guest" and edits_wanted else {}
    mem_end = agent.status()
    # the agent's forked children (its commits, loads, writers) are measured apart:
    # their largest RSS, shared pages included, as of the agent's last state write
    children_peak = agent.state_json().get("children_rss_peak_bytes")
    log_lines = (d / "agent.log").read_text().splitlines()
    applied = [json.loads(ln) for ln in log_lines if '"applied"' in ln]
    kinds: dict[str, int] = {}
    apply_s: dict[str, list[float]] = {}
    for a in applied:
        kinds[a.get("kind", "?")] = kinds.get(a.get("kind", "?"), 0) + 1
        if isinstance(a.get("seconds"), (int, float)):
            apply_s.setdefault(a.get("kind", "?"), []).append(float(a["seconds"]))
    if os.environ.get("SGR_PLUG_KEEP_LOG"):
        shutil.copy(d / "agent.log", os.environ["SGR_PLUG_KEEP_LOG"] + f".{n}")
    return {
        "guests": n, "shape": shape, "plugs": done, "plugs_asked": plugs, "agent_ready_s": ready_s,
        "enforced_frame": c.summarize(enforced_frame), "enforced_table": c.summarize(enforced_table),
        "samples": {"enforced_frame": enforced_frame, "enforced_table": enforced_table, "unplug_table": unplug},
        "unplug_table": c.summarize(unplug), "timeouts": timeouts,
        "blocked_frames_arrived": blocked_arrived,
        "rss_idle_bytes": mem_idle.get("VmRSS"), "rss_end_bytes": mem_end.get("VmRSS"),
        "rss_peak_bytes": mem_end.get("VmHWM"), "children_rss_peak_bytes": children_peak,
        "idle_cpu_fraction": idle_cpu, "idle_seconds": idle_seconds,
        "applies_by_kind": kinds,
        # what the agent itself says each apply took (its log's "applied" events)
        "agent_apply_seconds": {k: c.summarize(v) for k, v in apply_s.items()},
        **edits,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", nargs="+", type=int, default=[10, 100, 1000, 5000])  # issue 5's N
    ap.add_argument("--plugs", type=int, default=100)
    ap.add_argument("--shape", choices=["per-guest", "shared"], default="per-guest",
                    help="per-guest: every guest its own profile (the table's worst case); shared: one profile")
    ap.add_argument("--edits", type=int, default=20, help="profile edits per case (per-guest shape; 0: none)")
    ap.add_argument("--running", type=int, default=0,
                    help="taps of that many other guests already on the bridge (a running fleet; at most N - plugs - 1)")
    ap.add_argument("--idle-seconds", type=float, default=15.0)
    ap.add_argument("--budget", type=float, default=600.0,
                    help="seconds of plugging per case; fewer plugs are reported when a slow agent spends it")
    ap.add_argument("--ready-timeout", type=float, default=600.0,
                    help="seconds the agent may take to apply the fleet and say ready (the case fails past it)")
    args = ap.parse_args(argv)
    c.require_root()
    if shutil.which("ip") is None:
        raise SystemExit("needs iproute2")
    cases = []
    for n in args.guests:
        print(f"plug: {n} guests ({args.shape}), {args.plugs} plugs, {args.running} running ...", flush=True)
        cases.append(run_case(n, args.plugs, args.shape, args.idle_seconds, args.budget, args.ready_timeout, args.edits,
                              args.running))
        # after every case, so an interrupted run keeps what it measured
        c.write_result("plug-running" if args.running else "plug", {"args": vars(args), "cases": cases, "complete": False,
                                "targets": {"p99_s": 0.1, "rss_bytes": 80 << 20}})
    rows = []
    for r in cases:
        if r.get("running_taps"):
            r = {**r, "guests": f"{r['guests']} ({r['running_taps']} running)"}
        rows.append(c.stat_row(f"{r['guests']} guests: enforced (frame)", r["enforced_frame"]))
        rows.append(c.stat_row(f"{r['guests']} guests: enforced (table)", r["enforced_table"]))
        rows.append(c.stat_row(f"{r['guests']} guests: unplug (table)", r["unplug_table"]))
        if r.get("edit_enforced", {}).get("n"):
            rows.append(c.stat_row(f"{r['guests']} guests: profile edit -> enforced (frame)", r["edit_enforced"]))
        for kind, st in sorted(r["agent_apply_seconds"].items()):
            rows.append(c.stat_row(f"{r['guests']} guests: agent's own {kind} apply", st))
    c.table("plug: link created -> enforced", c.STAT_HEADERS, rows)
    mb = 1 / (1 << 20)
    c.table("plug: agent", ["guests", "plugs", "ready", "RSS idle", "RSS peak", "children's peak", "idle CPU", "blocked arrived", "timeouts",
                            "old port after edit", "applies"],
            [[r["guests"], r["plugs"], c.fmt_s(r["agent_ready_s"]), f"{(r['rss_idle_bytes'] or 0) * mb:.1f} MB",
              f"{(r['rss_peak_bytes'] or 0) * mb:.1f} MB",
              f"{r['children_rss_peak_bytes'] * mb:.1f} MB" if r.get("children_rss_peak_bytes") else "-",
              f"{r['idle_cpu_fraction'] * 100:.2f} %",
              r["blocked_frames_arrived"], r["timeouts"] + r.get("edit_timeouts", 0), r.get("old_port_after_switch", "-"),
              " ".join(f"{k}={v}" for k, v in sorted(r["applies_by_kind"].items()))] for r in cases])
    p99s = [r["enforced_frame"].get("p99") for r in cases if r["enforced_frame"].get("n")]
    meds = [r["enforced_frame"].get("median") for r in cases if r["enforced_frame"].get("n")]
    # issue 5 states the memory target for 1,000 guests (5,000 is measured, not judged)
    at_1000 = [r for r in cases if str(r["guests"]).split()[0] == "1000"]
    rss = ("not run at 1,000" if not at_1000 else
           "met" if all((r["rss_peak_bytes"] or 0) < 80 << 20 for r in at_1000) else "NOT met")
    print(f"targets: median < 20 ms ({'met' if meds and max(meds) < 0.02 else 'NOT met'}: "
          f"{' / '.join(c.fmt_s(m) for m in meds)}); p99 < 100 ms ({'met' if p99s and max(p99s) < 0.1 else 'NOT met'}: "
          f"{' / '.join(c.fmt_s(p) for p in p99s)}); RSS peak at 1,000 guests < 80 MB ({rss})", flush=True)
    c.write_result("plug-running" if args.running else "plug", {"args": vars(args), "cases": cases, "complete": True,
                            "targets": {"p99_s": 0.1, "rss_bytes": 80 << 20}})


if __name__ == "__main__":
    main()
