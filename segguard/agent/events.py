"""Event sources of the agent, each a file descriptor for one select loop:

  LinkMonitor   rtnetlink link/address events (pyroute2): taps appearing, going, or
                moving to another bridge (a change of IFLA_MASTER), bridge addresses
  NftMonitor    nfnetlink NFNLGRP_NFTABLES: any ruleset change in this namespace, so
                a table deleted by hand is noticed at once, not at the next drift tick
  ConfigWatcher inotify on the config directory (and profiles/)

Sources only say *that* something may have changed; the reconciler observes the
whole state afresh, so a lost or merged notification cannot leave a wrong policy.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LinkEvent:
    kind: str            # new | del | moved
    ifname: str
    index: int
    master: int | None
    prev_master: int | None
    mac: str


@dataclass(frozen=True)
class AddrEvent:
    index: int


@dataclass(frozen=True)
class BridgePortEvent:
    """An AF_BRIDGE notification: a port's VLAN table or bridge port flags changed."""

    index: int
    master: int | None


class LinkMonitor:
    """Tracks ifindex -> (name, master) so a change of master reads as `moved`."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

        self.ipr = IPRoute()
        # subscribe before the snapshot: a link created in between shows up as an event
        self.ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        self.links: dict[int, tuple[str, int | None]] = {}
        with IPRoute() as snap:
            for l in snap.get_links():
                self.links[l["index"]] = (l.get_attr("IFLA_IFNAME"), l.get_attr("IFLA_MASTER"))

    def fileno(self) -> int:
        return self.ipr.fileno()

    def read(self) -> list[LinkEvent | AddrEvent | BridgePortEvent]:
        out: list[LinkEvent | AddrEvent | BridgePortEvent] = []
        for msg in self.ipr.get():
            ev = msg.get("event")
            if ev in ("RTM_NEWADDR", "RTM_DELADDR"):
                out.append(AddrEvent(msg["index"]))
                continue
            if ev not in ("RTM_NEWLINK", "RTM_DELLINK"):
                continue
            if msg.get("family", 0) == socket.AF_BRIDGE:
                # link changes repeat what AF_UNSPEC says; VLAN table changes
                # (`bridge vlan add`) come only this way
                out.append(BridgePortEvent(msg["index"], msg.get_attr("IFLA_MASTER")))
                continue
            idx = msg["index"]
            name = msg.get_attr("IFLA_IFNAME") or self.links.get(idx, ("?", None))[0]
            master = msg.get_attr("IFLA_MASTER")
            mac = (msg.get_attr("IFLA_ADDRESS") or "").lower()
            prev = self.links.get(idx)
            if ev == "RTM_DELLINK":
                self.links.pop(idx, None)
                out.append(LinkEvent("del", name, idx, None, prev[1] if prev else None, mac))
                continue
            self.links[idx] = (name, master)
            if prev is not None and prev[1] is not None and prev[1] != master:
                out.append(LinkEvent("moved", name, idx, master, prev[1], mac))
            else:
                out.append(LinkEvent("new", name, idx, master, prev[1] if prev else None, mac))
        return out

    def name_of(self, index: int | None) -> str | None:
        return None if index is None else self.links.get(index, (None, None))[0]

    def close(self) -> None:
        self.ipr.close()


NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1


class NftMonitor:
    """Every nftables change in this namespace (ours included: the check that follows
    our own apply finds nothing to do, so there is no loop)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> int:
        """Drain; returns how many datagrams there were (ENOBUFS counts as one: we lost
        some, and the check that follows looks at everything anyway)."""
        n = 0
        while True:
            try:
                self.sock.recv(1 << 16)
                n += 1
            except BlockingIOError:
                return n
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    n += 1
                    continue
                raise

    def close(self) -> None:
        self.sock.close()


_IN_MASK = 0x2 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800  # MODIFY CLOSE_WRITE MOVED_* CREATE DELETE*
_EVENT = struct.Struct("iIII")


class ConfigWatcher:
    """inotify on the config directory and its profiles/ (re-armed when profiles/ is
    created or replaced). Editors write-and-rename, so renames count as changes."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._libc = libc
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self.watches: dict[int, Path] = {}
        self._arm()

    def _arm(self) -> None:
        for d in (self.directory, self.directory / "profiles"):
            if d.is_dir() and d not in self.watches.values():
                wd = self._libc.inotify_add_watch(self.fd, str(d).encode(), _IN_MASK)
                if wd >= 0:
                    self.watches[wd] = d

    def fileno(self) -> int:
        return self.fd

    def read(self) -> int:
        n = 0
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            off = 0
            while off + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, off)
                off += _EVENT.size + length
                if mask & 0x8000:  # IN_IGNORED: the watched directory went away
                    self.watches.pop(wd, None)
                n += 1
        self._arm()
        return n

    def close(self) -> None:
        os.close(self.fd)
