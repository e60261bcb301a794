"""Event sources of the agent, each a file descriptor for one select loop:

  LinkMonitor   rtnetlink link/address events: taps appearing, going, or
                moving to another bridge (a change of IFLA_MASTER), bridge addresses
  NftMonitor    nfnetlink NFNLGRP_NFTABLES: any ruleset change in this namespace, so
                a table deleted by hand is noticed at once, not at the next drift tick
  ConfigWatcher inotify on the config directory (and profiles/)

Sources mostly say *that* something may have changed, and the reconciler observes the
state afresh, so a merged notification cannot leave a wrong policy. The exception is
the link table: LinkMonitor keeps every link from the events themselves (a dump per
tap bind cost seconds with 1,000 taps) and reads all of them again when the kernel
reports lost events; the agent then reconciles everything.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from segguard.host import rtnl


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
    """Tracks every link (ifindex -> name, master, MAC) from the events, so a change of
    master reads as `moved`, and so the reconciler takes a bridge's ports from here
    instead of dumping every link per tap (1,000 taps: ~0.2 s a dump even unparsed by
    pyroute2, whose own took 2.2 s). The table is read afresh at start and after the
    kernel dropped events (queue overflow); `addr_version` counts address events per
    link, so a bridge's addresses are read again only after one."""

    def __init__(self) -> None:
        # A plain non-blocking socket, parsed by host/rtnl.py: pyroute2's own socket
        # reads datagrams into a user-space queue and hands out one per get(), so after
        # a burst (a tap deleted: link down, unenslaved, deleted) the rest sat in that
        # queue with nothing left for select() to wake on, until the next event. And
        # its parser, the agent's only use of pyroute2 on a host without VLAN
        # filtering, held ~10 MB of the agent's resident memory.
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        # subscribe before the snapshot: a link created in between shows up as an event
        self.sock.bind((0, rtnl.RTMGRP_LINK | rtnl.RTMGRP_IPV4_IFADDR | rtnl.RTMGRP_IPV6_IFADDR))
        self.links: dict[int, rtnl.Link] = {}
        self.addr_version: dict[int, int] = {}
        self.overflowed = False
        # every change to the table since the last snapshot, (before, after) of one link
        # (None: absent), so a reader keeps its own view of a bridge's ports up to date
        # by the changes alone (changes_since): a bind beside 900 running taps walked
        # all of them to find the one that came
        self.epoch = 0
        self._log: list[tuple[rtnl.Link | None, rtnl.Link | None]] = []
        self._log_start = 0  # the count of changes before _log[0]
        self.snapshot()

    def snapshot(self) -> None:
        """Every link afresh (start, lost events); every address to be read again."""
        self.links = rtnl.links()
        self.addr_version = {i: self.addr_version.get(i, 0) + 1 for i in set(self.addr_version) | set(self.links)}
        self.epoch += 1
        self._log_start += len(self._log)
        self._log = []

    # the agent reads its bridges after every burst of events, a few changes behind at
    # most; a reader further behind reads its bridges whole (the log costs memory)
    LOG_KEPT = 256

    @property
    def changes(self) -> int:
        """How many changes the table has seen (a position for changes_since)."""
        return self._log_start + len(self._log)

    def changes_since(self, epoch: int, position: int) -> list[tuple[rtnl.Link | None, rtnl.Link | None]] | None:
        """The changes after `position` of `epoch`, in order; None when the table was read
        afresh since, or the log no longer reaches back that far."""
        if epoch != self.epoch or position < self._log_start or position > self.changes:
            return None
        return self._log[position - self._log_start:]

    def _changed(self, before: rtnl.Link | None, after: rtnl.Link | None) -> None:
        if before == after:
            return
        self._log.append((before, after))
        if len(self._log) > 2 * self.LOG_KEPT:
            drop = len(self._log) - self.LOG_KEPT
            self._log_start += drop
            del self._log[:drop]

    def fileno(self) -> int:
        return self.sock.fileno()

    def _messages(self):
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # events were lost: the caller re-reads the whole state
                    self.overflowed = True
                    continue
                raise
            yield from rtnl.messages(data)

    def read(self) -> list[LinkEvent | AddrEvent | BridgePortEvent]:
        out: list[LinkEvent | AddrEvent | BridgePortEvent] = []
        lost = self.overflowed
        for mtype, body in self._messages():
            if mtype in (rtnl.RTM_NEWADDR, rtnl.RTM_DELADDR) and len(body) >= rtnl._IFADDR.size:
                index = rtnl._IFADDR.unpack_from(body)[4]
                self.addr_version[index] = self.addr_version.get(index, 0) + 1
                out.append(AddrEvent(index))
                continue
            if mtype not in (rtnl.RTM_NEWLINK, rtnl.RTM_DELLINK) or len(body) < rtnl._IFINFO.size:
                continue
            link = rtnl.parse_link(body)
            if body[0] == socket.AF_BRIDGE:
                # link changes repeat what AF_UNSPEC says; VLAN table changes
                # (`bridge vlan add`) come only this way
                out.append(BridgePortEvent(link.index, link.master))
                continue
            idx, master, mac = link.index, link.master, link.mac
            prev = self.links.get(idx)
            name = link.name or (prev.name if prev else "?")
            if mtype == rtnl.RTM_DELLINK:
                self.links.pop(idx, None)
                self._changed(prev, None)
                out.append(LinkEvent("del", name, idx, None, prev.master if prev else None, mac))
                continue
            self.links[idx] = rtnl.Link(idx, name, master, mac or (prev.mac if prev else ""))
            self._changed(prev, self.links[idx])
            if prev is not None and prev.master is not None and prev.master != master:
                out.append(LinkEvent("moved", name, idx, master, prev.master, mac))
            else:
                out.append(LinkEvent("new", name, idx, master, prev.master if prev else None, mac))
        if self.overflowed and not lost:
            # the kernel dropped some of them: the table is read again, and the agent
            # (which sees `overflowed`) reconciles everything
            self.snapshot()
        return out

    def name_of(self, index: int | None) -> str | None:
        link = None if index is None else self.links.get(index)
        return link.name if link else None

    def close(self) -> None:
        self.sock.close()


NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP, NETLINK_DROP_MEMBERSHIP = 1, 2


NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID = 2
_NLMSG = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")


def newgen_pids(data: bytes) -> list[int | None]:
    """The committing process of each NFT_MSG_NEWGEN in one datagram (None: no pid
    attribute). Object notifications are skipped: every commit ends with one NEWGEN,
    which names who committed it."""
    out: list[int | None] = []
    off = 0
    while off + _NLMSG.size <= len(data):
        length, mtype, _flags, _seq, _port = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size:
            break
        if mtype == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            pid = None
            a = off + _NLMSG.size + 4  # struct nfgenmsg
            while a + _NLA.size <= off + length:
                alen, atype = _NLA.unpack_from(data, a)
                if alen < _NLA.size:
                    break
                if atype & 0x3FFF == NFTA_GEN_PROC_PID and alen >= 8:
                    pid = struct.unpack_from(">I", data, a + 4)[0]
                a += (alen + 3) & ~3
            out.append(pid)
        off += (length + 3) & ~3
    return out


class _Quiet:
    commits = 0  # what the body committed while out of the group


class NftMonitor:
    """nftables commits in this namespace made by anyone but this process.

    Our own transactions notify the group too; reacting to them cost a whole-table
    read-back after every apply (most applies listed `nft-change` among their reasons).
    The kernel ends every commit with NFT_MSG_NEWGEN naming the committing task, so
    only generations committed by another pid count. A pid the kernel reports from
    another pid namespace simply reads as foreign: one drift check too many, never
    one too few. Lost notifications (ENOBUFS) count as foreign too."""

    def __init__(self, own_pids: set[int] | None = None) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER)
        # Our own full replace notifies every object it creates (~90,000 for 1,000
        # guests) before its NEWGEN: with the default buffer they overflow it, and an
        # overflow has to count as a foreign change (a whole-table check for nothing).
        for opt, size in ((33, 256 << 20), (socket.SO_RCVBUF, 256 << 20)):  # SO_RCVBUFFORCE (root), else capped
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, size)
                break
            except OSError:
                continue
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        self.overflows = 0
        self.own = own_pids if own_pids is not None else {os.getpid()}
        self.own_generations = 0
        self.missed = 0  # foreign commits made while we were out of the group (quiet)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> int:
        """Drain; returns how many foreign commits there were (ENOBUFS counts as one:
        some were lost, and the check that follows looks at everything anyway)."""
        n = 0
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return n
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    n += 1
                    continue
                raise
            for pid in newgen_pids(data):
                if pid is not None and pid in self.own:
                    self.own_generations += 1
                else:
                    n += 1

    @contextlib.contextmanager
    def quiet(self, nfnl_sock):
        """Out of the group for the commit of one of our own large transactions. The
        kernel writes a notification of every object to each listener: with us
        listening, a 1,000-guest replace (~60,000 objects) took the kernel 0.3-0.8 s
        instead of 0.17 s, and we then read them all. A foreign commit meanwhile must
        still be seen: every commit advances the generation by one, so a step of more
        than the commits the body declares (`.commits += 1` once the kernel accepted
        one) counts as missed, as does a generation that cannot be read."""
        window = _Quiet()
        try:
            before = nfnl_sock.generation()
            self.sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError:  # then listen through it, as without quiet
            yield window
            return
        try:
            yield window
        finally:
            _test_hold()
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            try:
                step = (nfnl_sock.generation() - before) % (1 << 32)
            except OSError:
                step = None
            if step is None or step > window.commits:
                self.missed += 1

    def take_missed(self) -> int:
        n, self.missed = self.missed, 0
        return n

    def close(self) -> None:
        self.sock.close()


def _test_hold() -> None:
    """A test's way to commit while the agent is out of the group (tests/netns/
    test_agent.py): with SEGGUARD_TEST_QUIET_HOLD=<dir> and <dir>/arm present, the
    window stays open until the test removes <dir>/held; once, at most 30 s."""
    hold = os.environ.get("SEGGUARD_TEST_QUIET_HOLD")
    if not hold:
        return
    arm, held = Path(hold) / "arm", Path(hold) / "held"
    try:
        arm.rename(held)
    except OSError:
        return
    for _ in range(300):
        if not held.exists():
            return
        time.sleep(0.1)


_IN_MASK = 0x2 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800  # MODIFY CLOSE_WRITE MOVED_* CREATE DELETE*
_EVENT = struct.Struct("iIII")


class ConfigWatcher:
    """inotify on the config directory and its profiles/ (re-armed when profiles/ is
    created or replaced). Editors write-and-rename, so renames count as changes.

    It also keeps the names of the profile files that changed since the last `take()`,
    so a reload reads only those: None when it cannot say (site.yaml or the profiles
    directory itself changed, the kernel's queue overflowed), which means read all."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._libc = libc
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self.watches: dict[int, Path] = {}
        self.changed: set[str] | None = set()
        self._arm()

    def _arm(self) -> None:
        for d in (self.directory, self.directory / "profiles"):
            if d.is_dir() and d not in self.watches.values():
                wd = self._libc.inotify_add_watch(self.fd, str(d).encode(), _IN_MASK)
                if wd >= 0:
                    self.watches[wd] = d
                    if d.name == "profiles":
                        self.changed = None  # whatever it holds now was not seen arriving

    def fileno(self) -> int:
        return self.fd

    def take(self) -> set[str] | None:
        """The profile files changed since the last take (None: everything may have)."""
        out, self.changed = self.changed, set()
        return out

    def put_back(self, names: set[str] | None) -> None:
        """Names a reload could not use (it failed): they count again next time."""
        if names is None or self.changed is None:
            self.changed = None
        else:
            self.changed |= names

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
                name = data[off + _EVENT.size:off + _EVENT.size + length].rstrip(b"\0").decode(errors="replace")
                off += _EVENT.size + length
                if mask & 0x4000:  # IN_Q_OVERFLOW: events were lost
                    self.changed = None
                    n += 1
                elif mask & 0x8000:  # IN_IGNORED: the watched directory went away
                    self.watches.pop(wd, None)
                    self.changed = None
                    n += 1
                elif self._relevant(self.watches.get(wd), name):
                    where = self.watches.get(wd)
                    if self.changed is not None:
                        if where is not None and where != self.directory and name:
                            self.changed.add(name)
                        else:
                            self.changed = None  # site.yaml, profiles/ itself, or unknown
                    n += 1
        self._arm()
        return n

    def _relevant(self, where: Path | None, name: str) -> bool:
        """Only what load_config reads: an editor's swap file or a temporary file
        renamed into place a moment later would otherwise cost a reload that finds
        nothing, and hold the real one back by the runner's minimum interval."""
        if where is None or not name:
            return True
        if where == self.directory:
            return name in ("site.yaml", "profiles")
        return name.endswith((".yaml", ".yml"))

    def close(self) -> None:
        os.close(self.fd)
