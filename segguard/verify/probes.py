"""Probe engine: craft exact frames, inject them, and see where they arrive at L2.

A verdict is always "did this exact frame reach the sink interface", never "did
something answer": every frame carries a unique marker (``SGPROBE`` + 12 hex
digits) and sinks report the markers they saw.  The marker sits in the L4
payload when there is one (br_netfilter and the IP stack may trim Ethernet
padding of IP frames), otherwise (ARP, bare ethertypes) in the Ethernet
trailer, which veth and the bridge carry untouched.

Workers (segguard.verify.worker) are separate long-lived processes, one per
(namespace, interface), so a batch of hundreds of probes costs one start-up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import selectors
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from segguard.lab import netns as nl

Kind = Literal["tcp", "udp", "icmp", "arp", "raw"]
Endpoint = tuple[str | None, str]  # (namespace or None for the current one, interface)
BatchItem = tuple[str, str, "Probe", Sequence[str]]  # (probe_id, sender, probe, sinks)

MARKER_PREFIX = b"SGPROBE"
MARKER_LEN = len(MARKER_PREFIX) + 12
ETH_MIN = 60  # minimum frame without FCS; short frames are zero-padded like a NIC would
TPID_8021Q = 0x8100
TPID_8021AD = 0x88A8
ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806
ETH_P_LOCAL_EXP = 0x88B5
IPV6_EXT_HEADERS = ("hbh", "dest", "routing", "frag")
BROADCAST = "ff:ff:ff:ff:ff:ff"
PROBE_SEQ = 0x53470000


class ProbeError(RuntimeError):
    """A worker failed or a sink could not be trusted; results would be meaningless."""


def new_marker() -> bytes:
    return MARKER_PREFIX + secrets.token_hex(6).encode()


def fresh_marker(used: set[bytes]) -> bytes:
    """A marker not in *used* (and added to it). 48 random bits make a repeat
    unlikely, not impossible; a repeat within a session would credit one probe's
    arrival to another, or drop it, so it is ruled out by construction."""
    while True:
        m = new_marker()
        if m not in used:
            used.add(m)
            return m


@dataclass(frozen=True)
class Probe:
    """One frame to inject, described at the level a firewall rule sees it.

    ``vlan_tags`` are (tpid, vid) outermost first, e.g. ((0x88a8, 100), (0x8100, 30))
    or a priority tag ((0x8100, 0),).  ``ethertype`` overrides the type of the
    L3 payload (the innermost type field, or the SNAP code with ``llc_snap``);
    for kind "raw" it is the payload's ethertype (default 0x88b5), or set
    ``ip_proto`` to send an IP packet with that protocol and no L4 header.
    IPv4 fragments: ``frag_offset`` (8-byte units, as on the wire) and
    ``more_fragments``.  IPv6: ``ipv6_ext`` lists extension headers in order
    from {"hbh", "dest", "routing", "frag"}; fragment fields imply "frag".
    ARP fields default from the MAC/IP fields (``src_ip`` -> psrc etc.).
    """

    kind: Kind = "tcp"
    family: int = 4
    src_mac: str = "02:00:00:00:00:01"
    dst_mac: str = BROADCAST
    src_ip: str | None = None
    dst_ip: str | None = None
    sport: int = 40000
    dport: int = 0
    flags: str = "S"
    ack: int | None = None  # default: PROBE_SEQ + 1 when flags carry A, else 0
    icmp_type: int | None = None  # default: echo request (8, or 128 for IPv6)
    icmp_code: int = 0
    ttl: int = 64
    vlan_tags: tuple[tuple[int, int], ...] = ()
    llc_snap: bool = False
    ethertype: int | None = None
    ip_proto: int | None = None
    frag_offset: int = 0
    more_fragments: bool = False
    frag_id: int = 0x5347
    ipv6_ext: tuple[str, ...] = ()
    arp_op: int = 1
    arp_psrc: str | None = None
    arp_hwsrc: str | None = None
    arp_pdst: str | None = None
    arp_hwdst: str = "00:00:00:00:00:00"
    payload: bytes = b""  # extra bytes after the marker
    label: str = ""  # free text for reports; not on the wire

    def __post_init__(self) -> None:
        if self.kind not in ("tcp", "udp", "icmp", "arp", "raw"):
            raise ValueError(f"unknown probe kind {self.kind!r}")
        if self.family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {self.family!r}")
        needs_ip = self.kind in ("tcp", "udp", "icmp") or (self.kind == "raw" and self.ip_proto is not None)
        if needs_ip:
            for name in ("src_ip", "dst_ip"):
                value = getattr(self, name)
                if value is None:
                    raise ValueError(f"{self.kind} probe needs {name}")
                if ipaddress.ip_address(value).version != self.family:
                    raise ValueError(f"{name} {value} is not IPv{self.family}")
        if self.kind == "arp" and (self.arp_pdst or self.dst_ip) is None:
            raise ValueError("arp probe needs arp_pdst or dst_ip")
        for tpid, vid in self.vlan_tags:
            if not (0 <= tpid <= 0xFFFF and 0 <= vid <= 0xFFF):
                raise ValueError(f"bad vlan tag ({tpid:#x}, {vid})")
        for ext in self.ipv6_ext:
            if ext not in IPV6_EXT_HEADERS:
                raise ValueError(f"unknown IPv6 extension header {ext!r}; use {IPV6_EXT_HEADERS}")
        if self.ipv6_ext and self.family != 6:
            raise ValueError("ipv6_ext needs family 6")

    def describe(self) -> str:
        """Short human-readable summary for reports."""
        parts = [f"{self.kind}/v{self.family}"] if self.kind != "arp" else ["arp"]
        if self.vlan_tags:
            parts.append("tags=" + ",".join(f"{t:#06x}:{v}" for t, v in self.vlan_tags))
        if self.llc_snap:
            parts.append("llc/snap")
        if self.kind == "arp":
            parts.append(f"op={self.arp_op} {self.arp_psrc or self.src_ip}->{self.arp_pdst or self.dst_ip}")
        elif self.src_ip:
            port = f":{self.dport}" if self.kind in ("tcp", "udp") else ""
            parts.append(f"{self.src_ip}->{self.dst_ip}{port}")
        if self.frag_offset or self.more_fragments:
            parts.append(f"frag(off={self.frag_offset},mf={int(self.more_fragments)})")
        if self.ipv6_ext:
            parts.append("ext=" + "+".join(self.ipv6_ext))
        return " ".join(parts)


def _mac(value: str) -> bytes:
    raw = bytes.fromhex(value.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC {value!r}")
    return raw


def _l3(probe: Probe, marker: bytes) -> tuple[bytes, int, bool]:
    """(L3 bytes, their ethertype, marker-inside?) built with scapy."""
    # scapy costs ~1 s to import; only the orchestrator pays, never the workers.
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import (
        ICMPv6EchoReply,
        ICMPv6EchoRequest,
        ICMPv6Unknown,
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
    )
    from scapy.layers.l2 import ARP
    from scapy.packet import Packet, Raw

    data = marker + probe.payload
    if probe.kind == "arp":
        arp = ARP(
            op=probe.arp_op,
            hwsrc=probe.arp_hwsrc or probe.src_mac,
            psrc=probe.arp_psrc or probe.src_ip or "0.0.0.0",
            hwdst=probe.arp_hwdst,
            pdst=probe.arp_pdst or probe.dst_ip,
        )
        return bytes(arp), ETH_P_ARP, False
    if probe.kind == "raw" and probe.ip_proto is None:
        return data, ETH_P_LOCAL_EXP, True

    l4: Packet
    if probe.kind == "tcp":
        # Every probe SYN starts at PROBE_SEQ, so an ACKing reply (SYN-ACK, ACK) acks
        # PROBE_SEQ + 1 by default: conntrack's window tracking accepts it as the
        # answer to the probe flow, which the stateful path needs.
        ack = probe.ack if probe.ack is not None else ((PROBE_SEQ + 1) if "A" in probe.flags else 0)
        l4 = TCP(sport=probe.sport, dport=probe.dport, flags=probe.flags, seq=PROBE_SEQ, ack=ack) / Raw(data)
    elif probe.kind == "udp":
        l4 = UDP(sport=probe.sport, dport=probe.dport) / Raw(data)
    elif probe.kind == "icmp":
        if probe.family == 4:
            itype = 8 if probe.icmp_type is None else probe.icmp_type
            l4 = ICMP(type=itype, code=probe.icmp_code, id=0x5347, seq=1) / Raw(data)
        elif probe.icmp_type in (None, 128):
            l4 = ICMPv6EchoRequest(id=0x5347, seq=1, data=data)
        elif probe.icmp_type == 129:
            l4 = ICMPv6EchoReply(id=0x5347, seq=1, data=data)
        else:
            l4 = ICMPv6Unknown(type=probe.icmp_type, code=probe.icmp_code, msgbody=data)
    else:  # raw with ip_proto
        l4 = Raw(data)

    fragmented = bool(probe.frag_offset or probe.more_fragments)
    pkt: Packet
    if probe.family == 4:
        ip = IP(src=probe.src_ip, dst=probe.dst_ip, ttl=probe.ttl, id=probe.frag_id)
        if probe.ip_proto is not None:
            ip.proto = probe.ip_proto
        if fragmented:
            ip.frag = probe.frag_offset
            ip.flags = "MF" if probe.more_fragments else 0
        pkt = ip / l4
        return bytes(pkt), ETH_P_IP, True

    exts = list(probe.ipv6_ext)
    if fragmented and "frag" not in exts:
        exts.append("frag")
    ip6 = IPv6(src=probe.src_ip, dst=probe.dst_ip, hlim=probe.ttl)
    pkt = ip6
    for ext in exts:
        if ext == "hbh":
            pkt = pkt / IPv6ExtHdrHopByHop()
        elif ext == "dest":
            pkt = pkt / IPv6ExtHdrDestOpt()
        elif ext == "routing":
            # Type 0 is deprecated/dropped by hosts, which makes it a good
            # "should a wall drop this" probe; segleft=0 keeps dst as final.
            pkt = pkt / IPv6ExtHdrRouting(type=0, segleft=0, addresses=[])
        else:
            pkt = pkt / IPv6ExtHdrFragment(
                offset=probe.frag_offset, m=int(probe.more_fragments), id=probe.frag_id
            )
    pkt = pkt / l4
    if probe.ip_proto is not None:
        # the last header's next-header field names the (missing) L4 protocol
        last = pkt.getlayer(len(exts)) if exts else pkt
        assert last is not None
        last.nh = probe.ip_proto
    return bytes(pkt), ETH_P_IPV6, True


def build_frame(probe: Probe, marker: bytes | None = None) -> bytes:
    """The exact Ethernet frame (no FCS) for *probe*, carrying *marker*.

    L2 is assembled by hand rather than with scapy so odd combinations (802.3
    length after a tag stack, an overridden inner ethertype) come out exactly
    as specified instead of being "fixed" by scapy's layer binding.
    """
    marker = marker or new_marker()
    if not (marker.startswith(MARKER_PREFIX) and len(marker) == MARKER_LEN):
        raise ValueError(f"marker must be {MARKER_PREFIX!r} + 12 hex digits")
    l3, l3_type, marker_inside = _l3(probe, marker)
    if probe.ethertype is not None:
        l3_type = probe.ethertype
    if probe.kind == "raw" and probe.ip_proto is None and probe.ethertype is None:
        l3_type = ETH_P_LOCAL_EXP

    header = _mac(probe.dst_mac) + _mac(probe.src_mac)
    for tpid, vid in probe.vlan_tags:
        header += tpid.to_bytes(2, "big") + vid.to_bytes(2, "big")  # PCP/DEI 0
    if probe.llc_snap:
        # 802.3 length + LLC (DSAP=SSAP=0xAA, UI) + SNAP (OUI 0, protocol id)
        body = b"\xaa\xaa\x03\x00\x00\x00" + l3_type.to_bytes(2, "big") + l3
        header += len(body).to_bytes(2, "big")
    else:
        body = l3
        header += l3_type.to_bytes(2, "big")
    frame = header + body
    if not marker_inside:
        frame += marker  # Ethernet trailer: beyond what the ARP/802.3 headers cover
    if len(frame) < ETH_MIN:
        frame += b"\0" * (ETH_MIN - len(frame))
    return frame


# --------------------------------------------------------------------------- workers


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[2])


class _Worker:
    """One worker process plus a line-oriented, timeout-aware reader."""

    def __init__(self, label: str, ns: str | None, iface: str, python: str) -> None:
        self.label = label
        self.ns = ns
        self.iface = iface
        cmd = [python, "-m", "segguard.verify.worker", "--iface", iface]
        if ns:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        env = dict(os.environ)
        # Works whether or not segguard is pip-installed in that interpreter.
        env["PYTHONPATH"] = _repo_root() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            # Own process group: Ctrl-C in the terminal reaches the orchestrator,
            # which then shuts workers down in order instead of racing them.
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._buf = b""
        self.info: dict[str, Any] = {}

    def send(self, obj: Mapping[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ProbeError(f"worker {self.label} died: {self._stderr()}") from None

    def recv(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self._fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProbeError(f"worker {self.label} ({self.ns}/{self.iface}) timed out")
                if not sel.select(left):
                    continue
                chunk = os.read(self._fd, 1 << 20)
                if not chunk:
                    raise ProbeError(f"worker {self.label} exited: {self._stderr()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, obj: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        self.send(obj)
        return self.checked(self.recv(timeout))

    def checked(self, reply: dict[str, Any]) -> dict[str, Any]:
        if not reply.get("ok"):
            raise ProbeError(f"worker {self.label}: {reply.get('error')}")
        return reply

    def _stderr(self) -> str:
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=1)
            assert self.proc.stderr is not None
            return self.proc.stderr.read().decode(errors="replace").strip()[-2000:]
        return "(no stderr)"

    def stop(self, timeout: float = 2.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.send({"op": "quit"})
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                if stream:
                    stream.close()


@dataclass(frozen=True)
class Sighting:
    """How a marker showed up at one sink."""

    count: int
    pkttypes: tuple[int, ...]  # PACKET_HOST=0, BROADCAST=1, MULTICAST=2, OTHERHOST=3
    vlans: tuple[tuple[int, int], ...]  # outer tags the kernel moved to metadata (tpid, tci)
    length: int


@dataclass
class BatchReport:
    """Everything one run() observed; ``results`` is what run() returns."""

    results: dict[str, dict[str, bool]]
    markers: dict[str, str]  # probe_id -> marker
    seen_at: dict[str, dict[str, Sighting]]  # probe_id -> every sink that saw it, asked or not
    sink_frames: dict[str, int]  # inbound frames per sink during the batch (noise included)
    frames: dict[str, bytes] = field(default_factory=dict)  # probe_id -> frame sent


class ProbeSession:
    """Long-lived sender/sink workers; run batches of probes against them.

    ``senders`` and ``sinks`` map names to (namespace, interface); the same
    endpoint may be both, and gets a single worker.  Sinks are proven to be
    capturing before start() returns (each worker's self-test), and every
    collect checks the capture thread is still alive.
    """

    def __init__(
        self,
        senders: Mapping[str, Endpoint],
        sinks: Mapping[str, Endpoint],
        *,
        settle: float = 0.6,
        python: str | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        self.senders = dict(senders)
        self.sinks = dict(sinks)
        self.settle = settle
        self.python = python or sys.executable
        self.start_timeout = start_timeout
        self._workers: dict[Endpoint, _Worker] = {}
        self._markers_used: set[bytes] = set()
        self.last_report: BatchReport | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> ProbeSession:
        endpoints: dict[Endpoint, str] = {}
        for name, ep in [*self.senders.items(), *self.sinks.items()]:
            endpoints.setdefault((ep[0], ep[1]), name)
        try:
            # Spawn all first, then wait: start-up cost is paid in parallel.
            for ep, name in endpoints.items():
                if ep[0] is not None and not nl.netns_exists(ep[0]):
                    raise ProbeError(f"{name}: no network namespace {ep[0]}")
                self._workers[ep] = _Worker(name, ep[0], ep[1], self.python)
            deadline = time.monotonic() + self.start_timeout
            for w in self._workers.values():
                hello = w.recv(max(0.1, deadline - time.monotonic()))
                if hello.get("event") != "ready":
                    raise ProbeError(f"worker {w.label} on {w.ns}/{w.iface}: {hello.get('error', hello)}")
                w.info = hello
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        workers, self._workers = list(self._workers.values()), {}
        for w in workers:
            with contextlib.suppress(Exception):
                w.send({"op": "quit"})
        for w in workers:
            w.stop()

    def __enter__(self) -> ProbeSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _worker(self, ep: Endpoint) -> _Worker:
        try:
            return self._workers[(ep[0], ep[1])]
        except KeyError:
            raise ProbeError("session not started") from None

    def mac_of(self, name: str) -> str:
        """The MAC of a sender's or sink's interface, as its worker read it."""
        ep = self.senders.get(name) or self.sinks.get(name)
        if ep is None:
            raise KeyError(name)
        return str(self._worker(ep).info["mac"])

    # ---------------------------------------------------------------- running
    def run(self, batch: Iterable[BatchItem]) -> dict[str, dict[str, bool]]:
        """Send every probe, wait ``settle`` seconds, and report arrival per asked sink."""
        return self.run_detailed(batch).results

    def run_detailed(self, batch: Iterable[BatchItem]) -> BatchReport:
        items = list(batch)
        ids = [pid for pid, *_ in items]
        if len(set(ids)) != len(ids):
            raise ValueError("probe ids in a batch must be unique")
        markers: dict[str, str] = {}
        frames: dict[str, bytes] = {}
        per_sender: dict[str, list[str]] = {}
        for pid, sender, probe, sinks in items:
            if sender not in self.senders:
                raise KeyError(f"probe {pid}: unknown sender {sender!r}")
            for s in sinks:
                if s not in self.sinks:
                    raise KeyError(f"probe {pid}: unknown sink {s!r}")
            marker = fresh_marker(self._markers_used)
            markers[pid] = marker.decode()
            frames[pid] = build_frame(probe, marker)
            per_sender.setdefault(sender, []).append(frames[pid].hex())

        sink_workers = {name: self._worker(ep) for name, ep in self.sinks.items()}
        # Clear noise counted since the last batch so sink_frames is per batch.
        unique_sinks = {id(w): w for w in sink_workers.values()}
        self._collect_all(unique_sinks)

        # Senders work in parallel; replies are awaited afterwards.
        sending = [(self._worker(self.senders[name]), hexes) for name, hexes in per_sender.items()]
        for w, hexes in sending:
            w.send({"op": "send", "frames": hexes})
        for w, hexes in sending:
            reply = w.checked(w.recv(30.0 + len(hexes) * 0.01))
            if reply.get("sent") != len(hexes):
                raise ProbeError(f"sender {w.label} sent {reply.get('sent')} of {len(hexes)} frames")
        time.sleep(self.settle)

        collected = self._collect_all(unique_sinks)

        by_marker = {m: pid for pid, m in markers.items()}
        seen_at: dict[str, dict[str, Sighting]] = {pid: {} for pid in ids}
        sink_frames: dict[str, int] = {}
        for name, w in sink_workers.items():
            got = collected[id(w)]
            sink_frames[name] = int(got["frames"])
            for seen_marker, info in got["markers"].items():
                owner = by_marker.get(seen_marker)
                if owner is None:
                    continue  # a late frame from an earlier batch
                seen_at[owner][name] = Sighting(
                    count=int(info["count"]),
                    pkttypes=tuple(info["pkttypes"]),
                    vlans=tuple((int(t), int(c)) for t, c in info["vlans"]),
                    length=int(info["len"]),
                )
        results = {pid: {s: s in seen_at[pid] for s in sinks} for pid, _snd, _p, sinks in items}
        report = BatchReport(results, markers, seen_at, sink_frames, frames)
        self.last_report = report
        return report

    @staticmethod
    def _collect_all(workers: Mapping[int, _Worker], timeout: float = 10.0) -> dict[int, dict[str, Any]]:
        """collect+reset on every sink at once: all requests first, then the replies,
        so a hundred sinks cost one round trip, not a hundred in a row."""
        for w in workers.values():
            w.send({"op": "collect", "reset": True})
        deadline = time.monotonic() + timeout
        return {key: w.checked(w.recv(max(0.1, deadline - time.monotonic()))) for key, w in workers.items()}


# --------------------------------------------------------------------------- probe ports


@dataclass(frozen=True)
class ProbePortInfo:
    ns: str  # namespace holding the probe end (iface "eth0")
    iface: str
    port: str  # bridge-side veth name
    mac: str
    bridge: str
    bridge_ns: str | None

    @property
    def endpoint(self) -> Endpoint:
        return (self.ns, self.iface)


@contextlib.contextmanager
def probe_port(bridge: str, bridge_ns: str | None, name: str, mac: str, ns_name: str) -> Iterator[ProbePortInfo]:
    """A temporary veth port on an existing bridge, its far end alone in *ns_name*.

    For probing live hosts: frames injected there enter the bridge exactly like
    a guest's.  The port has learning off so spoofed source MACs cannot steal
    a real guest's FDB entry on a production bridge.  The far end has IPv6
    disabled and no addresses: it only injects and captures raw frames.
    Everything is removed on exit, also on error.
    """
    nl.check_ifname(name)
    if nl.netns_exists(ns_name):
        raise ProbeError(f"netns {ns_name} already exists; refusing to reuse it")
    created_ns = False
    try:
        nl.create_netns(ns_name)
        created_ns = True
        nl.write_sysctls(ns_name, {"net.ipv6.conf.default.disable_ipv6": 1})
        with nl.ipr(bridge_ns) as ip:
            br = nl.link_index(ip, bridge)
            port = nl.create_veth(ip, name, None, "eth0", mac, ns_name)
            nl.enslave(ip, port, br, learning=False)
            nl.set_up(ip, port)
        with nl.ipr(ns_name) as ip:
            nl.set_up(ip, nl.link_index(ip, "eth0"))
        yield ProbePortInfo(ns_name, "eth0", name, mac, bridge, bridge_ns)
    finally:
        nl.delete_link(bridge_ns, name)
        if created_ns:
            nl.delete_netns(ns_name)
