"""Probe worker: one long-lived process per (namespace, interface).

Started as ``ip netns exec NS python -m segguard.verify.worker --iface eth0``.
It both injects frames (sender role) and records which probe markers arrive
(sink role) on that one interface, speaking JSON lines on stdin/stdout:

    <- {"event": "ready", "ifindex": 2, "mac": "...", "pid": 123}   (once, after the self-test)
    -> {"op": "send", "frames": ["<hex>", ...]}    <- {"ok": true, "sent": N}
    -> {"op": "collect", "reset": true}           <- {"ok": true, "frames": N, "markers": {...}}
    -> {"op": "stats"}                            <- {"ok": true, "frames": N, "reader_alive": true}
    -> {"op": "quit"}                             <- {"ok": true}

Deliberately stdlib-only (no scapy): a worker starts in tens of milliseconds,
and a raw AF_PACKET socket with recvmsg is far cheaper per frame than scapy's
sniff().  The socket is never put into promiscuous mode, so a sink on br0 only
sees what the bridge really passes up to the host; veth ends deliver every frame
regardless of destination MAC, which is exactly "arrived at the guest's NIC".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
_AUXDATA = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata

MARKER_RE = re.compile(rb"SGPROBE[0-9a-f]{12}")
CANARY_PREFIX = b"SGCANRY"
# Self-test frames must go nowhere.  From a guest-side NIC, an IEEE 802.1
# link-local group address: the bridge hands such frames to the receiving port
# itself (nobody reads it) and never forwards them (group_fwd_mask 0).  From a
# bridge device, that group would be flooded to every port, so there we send to
# the bridge's own MAC: br_dev_xmit finds the local FDB entry and drops it.
CANARY_LINK_LOCAL = bytes.fromhex("0180c200000e")
CANARY_ETHERTYPE = 0x88B5  # IEEE local experimental

@dataclass
class Sighting:
    count: int = 0
    pkttypes: set[int] = field(default_factory=set)
    # outer tags the kernel moved out of the frame into metadata, as (tpid, tci)
    vlans: set[tuple[int, int]] = field(default_factory=set)
    length: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "pkttypes": sorted(self.pkttypes),
            "vlans": sorted(self.vlans),
            "len": self.length,
        }


class Capture:
    """Inbound-frame recorder on one interface.

    Every frame is taken off the socket and recorded under ``lock``, by the reader
    thread or by ``collect`` itself, which first drains whatever the socket still
    holds: a collect reports every frame that reached the socket before it was
    asked, however far the reader thread lags behind (on a loaded host, with a
    hundred guests' probes at one sink, it can; a frame left in the socket would
    have read as "not arrived", i.e. blocked).
    """

    def __init__(self, iface: str, *, start: bool = True) -> None:
        self.iface = iface
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((iface, ETH_P_ALL))
        self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        try:
            # Force past rmem_max: a batch of a few thousand probes arrives in a
            # burst, and a dropped frame here would read as "blocked".
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self._cmsg_space = socket.CMSG_SPACE(_AUXDATA.size)
        self.lock = threading.Lock()
        self.frames = 0
        self.markers: dict[str, Sighting] = {}
        self.canaries_out: set[bytes] = set()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._loop, name="capture", daemon=True)
        if start:
            self.thread.start()

    def _loop(self) -> None:
        try:
            while True:
                select.select([self.sock], [], [])
                with self.lock:
                    self._drain()
        except Exception as exc:  # noqa: BLE001 - reported to the orchestrator, never silent
            self.error = f"{type(exc).__name__}: {exc}"

    def _drain(self) -> int:
        """Record every frame the socket holds now. Caller holds ``lock``."""
        n = 0
        while True:
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(65536, self._cmsg_space, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return n
            n += 1
            self._record(data, ancdata, addr[2])

    def _record(self, data: bytes, ancdata: list, pkttype: int) -> None:
        if pkttype == PACKET_OUTGOING:
            # Our own transmissions: only the self-test canary matters.
            if CANARY_PREFIX in data:
                self.canaries_out.add(data[data.index(CANARY_PREFIX):][:19])
            return
        vlan: tuple[int, int] | None = None
        for level, ctype, cdata in ancdata:
            if level == SOL_PACKET and ctype == PACKET_AUXDATA and len(cdata) >= _AUXDATA.size:
                status, _l, _s, _m, _n, tci, tpid = _AUXDATA.unpack_from(cdata)
                if status & TP_STATUS_VLAN_VALID:
                    vlan = (tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100, tci)
        self.frames += 1
        for raw in MARKER_RE.findall(data):
            s = self.markers.setdefault(raw.decode(), Sighting())
            s.count += 1
            s.pkttypes.add(pkttype)
            s.length = s.length or len(data)
            if vlan is not None:
                s.vlans.add(vlan)

    def collect(self, reset: bool) -> dict[str, Any]:
        with self.lock:
            self._drain()
            out = {
                "frames": self.frames,
                "markers": {m: s.as_json() for m, s in self.markers.items()},
            }
            if reset:
                self.frames = 0
                self.markers = {}
        return out

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None


def iface_mac(iface: str) -> bytes:
    with open(f"/sys/class/net/{iface}/address") as fh:
        return bytes.fromhex(fh.read().strip().replace(":", ""))


def self_test(cap: Capture, tx: socket.socket, mac: bytes, timeout: float = 2.0) -> bool:
    """Prove the capture thread is reading this interface before saying ready.

    A packet socket sees its interface's own transmissions (PACKET_OUTGOING),
    so a canary we send must come back through the reader thread.
    """
    tag = CANARY_PREFIX + os.urandom(6).hex().encode()
    dst = mac if os.path.isdir(f"/sys/class/net/{cap.iface}/bridge") else CANARY_LINK_LOCAL
    frame = dst + mac + struct.pack("!H", CANARY_ETHERTYPE) + tag
    frame += b"\0" * max(0, 60 - len(frame))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tx.send(frame)
        for _ in range(20):
            with cap.lock:
                if tag in cap.canaries_out:
                    return True
            time.sleep(0.005)
    return False


def send_frames(tx: socket.socket, frames: list[bytes], pace_every: int = 64) -> int:
    """Send frames, yielding briefly every *pace_every* so receive backlogs drain.

    veth hands frames to the peer through the per-CPU backlog
    (net.core.netdev_max_backlog, 1000 by default); a tight loop of thousands
    of frames can overflow it, and a drop would look like a blocked probe.
    """
    sent = 0
    for i, frame in enumerate(frames):
        while True:
            try:
                tx.send(frame)
                break
            except BlockingIOError:
                time.sleep(0.001)
            except OSError as exc:
                if exc.errno == 105:  # ENOBUFS: qdisc/socket buffers full, retry
                    time.sleep(0.001)
                    continue
                raise
        sent += 1
        if pace_every and (i + 1) % pace_every == 0:
            time.sleep(0.0005)
    return sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="segguard.verify.worker")
    ap.add_argument("--iface", required=True)
    ap.add_argument("--no-self-test", action="store_true")
    args = ap.parse_args(argv)

    out = sys.stdout

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        out.flush()

    try:
        cap = Capture(args.iface)
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # proto 0: send-only, never receives
        tx.bind((args.iface, 0))
        mac = iface_mac(args.iface)
        ifindex = socket.if_nametoindex(args.iface)
    except OSError as exc:
        reply({"event": "error", "error": f"cannot open {args.iface}: {exc}"})
        return 2
    if not args.no_self_test and not self_test(cap, tx, mac):
        reply({"event": "error", "error": f"capture self-test on {args.iface} failed: {cap.error}"})
        return 3
    reply({"event": "ready", "ifindex": ifindex, "mac": mac.hex(":"), "pid": os.getpid()})

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "send":
                n = send_frames(tx, [bytes.fromhex(h) for h in req.get("frames", [])])
                reply({"ok": True, "sent": n})
            elif op == "collect":
                if not cap.alive:
                    reply({"ok": False, "error": f"capture thread died: {cap.error}"})
                    continue
                reply({"ok": True, **cap.collect(bool(req.get("reset", True)))})
            elif op == "stats":
                with cap.lock:
                    frames = cap.frames
                reply({"ok": True, "frames": frames, "reader_alive": cap.alive, "error": cap.error})
            elif op == "quit":
                reply({"ok": True})
                break
            else:
                reply({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as exc:  # noqa: BLE001 - keep serving; the orchestrator decides
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
