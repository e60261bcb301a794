"""Links, a bridge's addresses and its ports' VLAN tables, read straight over
rtnetlink.

Why not pyroute2 here: its dumps run every message through its asyncio marshal and
parse every attribute (0.9.7: ~1.1 ms a link). With 1,000 taps on a bridge one dump
of the links took 2.2 s, and the agent read them for every tap it bound. These read
only the attributes segguard uses; tests/netns/test_rtnl.py (and, for VLAN tables,
the kernel lab) holds them against pyroute2's reading of the same kernel.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 16, 17, 18, 20, 21, 22
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x200, 0x400
NLA_F_NESTED = 0x8000
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_AF_SPEC, IFLA_EXT_MASK = 1, 3, 10, 18, 26, 29
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_BR_VLAN_FILTERING = 7
IFLA_BRIDGE_VLAN_INFO = 2
IFA_ADDRESS = 1
RTEXT_FILTER_BRVLAN_COMPRESSED, RTEXT_FILTER_SKIP_STATS = 1 << 2, 1 << 3

_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")   # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")    # family, prefixlen, flags, scope, index
_NLA = struct.Struct("=HH")


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    master: int | None
    mac: str                      # lower case; "" when the link has none
    kind: str | None = None       # IFLA_INFO_KIND: "bridge", "veth", ...
    vlan_filtering: bool | None = None  # a bridge's, when the kernel reports it


def _attrs(data: bytes, off: int = 0) -> Iterator[tuple[int, bytes]]:
    while off + 4 <= len(data):
        alen, atype = _NLA.unpack_from(data, off)
        if alen < 4:
            return
        yield atype & 0x3FFF, data[off + 4:off + alen]
        off += (alen + 3) & ~3


def _nla(kind: int, payload: bytes) -> bytes:
    head = _NLA.pack(_NLA.size + len(payload), kind) + payload
    return head + b"\0" * (-len(head) % 4)


def messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, body after nlmsghdr) of each netlink message in one datagram."""
    off = 0
    while off + _NLMSG.size <= len(data):
        length, t, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size:
            return
        yield t, data[off + _NLMSG.size:off + length]
        off += (length + 3) & ~3


def _request(mtype: int, header: bytes, attrs: bytes = b"", dump: bool = True, flags: int = 0) -> list[bytes]:
    """One request on a fresh socket: the bodies of its answers (after nlmsghdr). A
    command (`flags` with NLM_F_ACK) returns [] at its ACK, or raises the kernel's errno."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        body = header + attrs
        s.sendall(_NLMSG.pack(_NLMSG.size + len(body), mtype, NLM_F_REQUEST | flags | (NLM_F_DUMP if dump else 0), 1, 0)
                  + body)
        out: list[bytes] = []
        while True:
            if not select.select([s], [], [], 5.0)[0]:
                raise OSError(errno.ETIMEDOUT, "rtnetlink: no answer")
            for t, msg in messages(s.recv(1 << 20)):
                if t == NLMSG_DONE:
                    return out
                if t == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", msg)[0]
                    if code:
                        raise OSError(code, f"rtnetlink: {os.strerror(code)}")
                    return out
                out.append(msg)
            if not dump and out:
                return out


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def parse_link(body: bytes) -> Link:
    _family, _type, index, _flags, _change = _IFINFO.unpack_from(body)
    name, master, mac, kind, filtering = "", None, "", None, None
    for t, p in _attrs(body, _IFINFO.size):
        if t == IFLA_IFNAME:
            name = p.rstrip(b"\0").decode(errors="replace")
        elif t == IFLA_MASTER and len(p) >= 4:
            master = struct.unpack_from("=I", p)[0] or None
        elif t == IFLA_ADDRESS:
            mac = _mac(p)
        elif t == IFLA_LINKINFO:
            for it, ip in _attrs(p):
                if it == IFLA_INFO_KIND:
                    kind = ip.rstrip(b"\0").decode(errors="replace")
                elif it == IFLA_INFO_DATA and kind == "bridge":
                    for dt, dp in _attrs(ip):
                        if dt == IFLA_BR_VLAN_FILTERING and dp:
                            filtering = bool(dp[0])
    return Link(index, name, master, mac, kind, filtering)


def _ext_mask(mask: int) -> bytes:
    return _NLA.pack(8, IFLA_EXT_MASK) + struct.pack("=I", mask)


def links() -> dict[int, Link]:
    """Every link of this network namespace, by index (without their statistics,
    most of what a link dump carries)."""
    return {l.index: l for l in map(parse_link, _request(RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0),
                                                         _ext_mask(RTEXT_FILTER_SKIP_STATS)))}


def link(index: int) -> Link | None:
    """One link by index (a get, not a dump), or None when there is none."""
    try:
        got = _request(RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0), _ext_mask(RTEXT_FILTER_SKIP_STATS),
                       dump=False)
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return parse_link(got[0]) if got else None


def vlan_filtering_works(name: str = "sgprobevf0") -> bool:
    """Whether this kernel filters VLANs on a bridge: create a scratch bridge with
    vlan_filtering=1, read the flag back, delete the bridge. The only reliable test:
    a kernel built without CONFIG_BRIDGE_VLAN_FILTERING refuses the attribute
    (EOPNOTSUPP), and one that ignored it would read back 0."""
    info = _nla(IFLA_INFO_KIND, b"bridge\0") + _nla(IFLA_INFO_DATA | NLA_F_NESTED, _nla(IFLA_BR_VLAN_FILTERING, b"\1"))
    create = _nla(IFLA_IFNAME, name.encode() + b"\0") + _nla(IFLA_LINKINFO | NLA_F_NESTED, info)
    by_name = _nla(IFLA_IFNAME, name.encode() + b"\0")
    header = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for attempt in (1, 2):
        try:
            _request(RTM_NEWLINK, header, create, dump=False, flags=NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK)
            break
        except OSError as exc:
            if exc.errno != errno.EEXIST or attempt == 2:
                return False
            # left behind by a probe that died half-way
            _request(RTM_DELLINK, header, by_name, dump=False, flags=NLM_F_ACK)
    try:
        got = _request(RTM_GETLINK, header, by_name + _ext_mask(RTEXT_FILTER_SKIP_STATS), dump=False)
        return bool(got) and parse_link(got[0]).vlan_filtering is True
    finally:
        _request(RTM_DELLINK, header, by_name, dump=False, flags=NLM_F_ACK)


def addresses(index: int) -> tuple[str, ...]:
    """The addresses on one link (IFA_ADDRESS, as pyroute2 reports them), sorted."""
    out = []
    for body in _request(RTM_GETADDR, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        family, _plen, _flags, _scope, idx = _IFADDR.unpack_from(body)
        if idx != index:
            continue
        for t, p in _attrs(body, _IFADDR.size):
            if t == IFA_ADDRESS:
                out.append(socket.inet_ntop(family, p))
    return tuple(sorted(out))


def bridge_vlan_infos(names: dict[int, str], bridge_index: int) -> dict[int, list[tuple[int, int]]]:
    """(flags, vid) of every VLAN entry of the bridge and its ports (AF_BRIDGE dump,
    compressed ranges as the kernel sends them); `names`: their indexes. A port with
    an empty table is absent."""
    out: dict[int, list[tuple[int, int]]] = {}
    mask = _ext_mask(RTEXT_FILTER_BRVLAN_COMPRESSED | RTEXT_FILTER_SKIP_STATS)
    for body in _request(RTM_GETLINK, _IFINFO.pack(socket.AF_BRIDGE, 0, 0, 0, 0), mask):
        _family, _type, index, _flags, _change = _IFINFO.unpack_from(body)
        if index not in names:
            continue
        master, infos = None, []
        for t, p in _attrs(body, _IFINFO.size):
            if t == IFLA_MASTER and len(p) >= 4:
                master = struct.unpack_from("=I", p)[0] or None
            elif t == IFLA_AF_SPEC:
                infos = [struct.unpack_from("=HH", vp) for vt, vp in _attrs(p) if vt == IFLA_BRIDGE_VLAN_INFO and len(vp) >= 4]
        if index != bridge_index and master not in (bridge_index, None):
            continue
        out[index] = [(flags, vid) for flags, vid in infos]
    return out
