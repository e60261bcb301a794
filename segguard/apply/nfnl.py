"""Element transactions straight over nfnetlink, for the element-only changes of the
agent (a profile edited, a port's dispatch elements) and their read-back.

Why not libnftables: before evaluating a command it fills its cache, and a `delete`
of any element makes it fetch every chain of every table first (nftables 1.0.6
src/cache.c, CMD_DELETE). With 5,000 guests that is ~10,000 chains and ~30 ms for a
transaction that changes two elements; an add alone costs 0.05 ms. The kernel needs
no cache: a NEWSETELEM/DELSETELEM batch names table, set and the key bytes. So the
delta of port-keyed elements is encoded here, committed as one nfnetlink batch (all
or nothing, as libnftables' own), and read back with GETSETELEM of exactly the keys
it touched, not a listing of the set.

Only the datatypes the table's port-keyed sets and maps use are encoded (TYPES);
anything else raises Unencodable and the caller uses libnftables. tests/test_nfnl.py
checks every encoding against the bytes the kernel holds for elements libnftables
wrote, so the two roads cannot drift apart silently.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import Any, Iterable

import netaddr

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLA_F_NESTED = 0x8000
NFPROTO_BRIDGE = 7

SET_ELEM_LIST_TABLE, SET_ELEM_LIST_SET, SET_ELEM_LIST_ELEMENTS = 1, 2, 3
LIST_ELEM = 1
SET_ELEM_KEY, SET_ELEM_DATA, SET_ELEM_KEY_END = 1, 2, 10
DATA_VALUE, DATA_VERDICT = 1, 2
VERDICT_CODE, VERDICT_CHAIN = 1, 2
VERDICTS = {"accept": 1, "drop": 0, "continue": -1, "return": -5, "jump": -3, "goto": -4}

_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")


class Unencodable(ValueError):
    """An element this module does not encode: the caller sends it through libnftables."""


class NetlinkError(OSError):
    """The kernel refused the batch (nothing of it was committed)."""


# ---- keys -----------------------------------------------------------------------

def _ifname(v: Any) -> tuple[bytes, bytes]:
    if not isinstance(v, str) or not 0 < len(v.encode()) < 16:
        raise Unencodable(f"ifname {v!r}")
    b = v.encode().ljust(16, b"\0")
    return b, b


def _addr(version: int):
    size = 4 if version == 4 else 16

    def enc(v: Any) -> tuple[bytes, bytes]:
        try:
            if isinstance(v, dict) and "prefix" in v:
                net = netaddr.IPNetwork(f"{v['prefix']['addr']}/{v['prefix']['len']}")
                ends = [netaddr.IPAddress(net.first, net.version), netaddr.IPAddress(net.last, net.version)]
            elif isinstance(v, dict) and "range" in v:
                ends = [netaddr.IPAddress(x) for x in v["range"]]
            elif isinstance(v, str):
                ends = [netaddr.IPAddress(v)] * 2
            else:
                raise Unencodable(f"address {v!r}")
        except (netaddr.AddrFormatError, ValueError, KeyError, TypeError) as exc:
            raise Unencodable(f"address {v!r}") from exc
        if any(a.version != version for a in ends):
            raise Unencodable(f"{v!r} is not an IPv{version} address")
        return int(ends[0]).to_bytes(size, "big"), int(ends[1]).to_bytes(size, "big")
    return enc


def _uint(size: int, names: dict[str, int] | None = None):
    def enc(v: Any) -> tuple[bytes, bytes]:
        if isinstance(v, dict) and "range" in v:
            lo, hi = (_num(x, names) for x in v["range"])
        else:
            lo = hi = _num(v, names)
        return lo.to_bytes(size, "big"), hi.to_bytes(size, "big")
    return enc


def _num(v: Any, names: dict[str, int] | None) -> int:
    if isinstance(v, bool):
        raise Unencodable(repr(v))
    if isinstance(v, int):
        return v
    if names and v in names:
        return names[v]
    raise Unencodable(f"value {v!r}")


def _ether(v: Any) -> tuple[bytes, bytes]:
    if not isinstance(v, str):
        raise Unencodable(f"ether_addr {v!r}")
    b = bytes(int(x, 16) for x in v.split(":"))
    if len(b) != 6:
        raise Unencodable(f"ether_addr {v!r}")
    return b, b


# The datatypes of the port-keyed sets and maps (compile/policy.py port_set_types,
# compile/nft.py). Byte order as the kernel holds them: checked by tests/test_nfnl.py.
TYPES = {
    "ifname": _ifname,
    "ether_addr": _ether,
    "ether_type": _uint(2, {"ip": 0x0800, "arp": 0x0806, "ip6": 0x86DD}),
    "ipv4_addr": _addr(4),
    "ipv6_addr": _addr(6),
    "inet_proto": _uint(1, {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}),
    "inet_service": _uint(2),
}


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def encode_key(types: list[str], interval: bool, value: Any) -> tuple[bytes, bytes | None]:
    """(key, key_end or None) of one element as the kernel stores it. A concatenation's
    fields are each padded to 4 bytes; a set with ranges of concatenations (pipapo)
    takes every element as a start and an end key."""
    fields = value["concat"] if isinstance(value, dict) and "concat" in value else [value]
    if len(fields) != len(types):
        raise Unencodable(f"{value!r} does not have the set's {len(types)} fields")
    starts, ends = [], []
    for t, v in zip(types, fields):
        enc = TYPES.get(t)
        if enc is None:
            raise Unencodable(f"datatype {t}")
        lo, hi = enc(v)
        if lo > hi:
            raise Unencodable(f"empty range {v!r}")
        starts.append(lo)
        ends.append(hi)
    if len(types) == 1:
        if interval:
            raise Unencodable("single-field interval sets take interval-end elements")
        return starts[0], None
    key = b"".join(_pad4(s) for s in starts)
    if interval:
        return key, b"".join(_pad4(e) for e in ends)
    if starts != ends:
        raise Unencodable(f"range {value!r} in a set without intervals")
    return key, None


def encode_verdict(v: Any) -> bytes:
    (kind, body), = v.items()
    code = VERDICTS.get(kind)
    if code is None:
        raise Unencodable(f"verdict {v!r}")
    out = _attr(VERDICT_CODE, struct.pack(">i", code))
    if kind in ("jump", "goto"):
        out += _attr(VERDICT_CHAIN, body["target"].encode() + b"\0")
    return out


# ---- messages -------------------------------------------------------------------

def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    """One attribute; `kind` may carry NLA_F_NESTED already."""
    head = _NLA.pack(_NLA.size + len(payload), kind | (NLA_F_NESTED if nested else 0))
    return _pad4(head + payload)


def _element(types: list[str], interval: bool, elem: Any, is_map: bool, nested: int = NLA_F_NESTED) -> bytes:
    """One NFTA_LIST_ELEM. A map's element is [key, verdict]; `is_map` False sends the
    key alone (a delete, or a get)."""
    if is_map:
        if not (isinstance(elem, list) and len(elem) == 2):
            raise Unencodable(f"map element {elem!r}")
        value, verdict = elem
    else:
        value, verdict = elem, None
    return _attr(LIST_ELEM, b"".join(_elem_attrs(types, interval, value, verdict, nested).values()), nested=True)


def _elem_attrs(types: list[str], interval: bool, value: Any, verdict: Any, nested: int) -> dict[int, bytes]:
    key, key_end = encode_key(types, interval, value)
    out = {SET_ELEM_KEY: _attr(SET_ELEM_KEY | nested, _attr(DATA_VALUE, key))}
    if key_end is not None:
        out[SET_ELEM_KEY_END] = _attr(SET_ELEM_KEY_END | nested, _attr(DATA_VALUE, key_end))
    if verdict is not None:
        out[SET_ELEM_DATA] = _attr(SET_ELEM_DATA | nested, _attr(DATA_VERDICT | nested, encode_verdict(verdict)))
    return out


def _msg(mtype: int, flags: int, seq: int, family: int, payload: bytes, res_id: int = 0) -> bytes:
    body = _NFGEN.pack(family, 0, socket.htons(res_id)) + payload
    return _NLMSG.pack(_NLMSG.size + len(body), mtype, flags, seq, 0) + body


def _elements_msg(mtype: int, flags: int, seq: int, table: str, name: str, elems: bytes) -> bytes:
    payload = (_attr(SET_ELEM_LIST_TABLE, table.encode() + b"\0") + _attr(SET_ELEM_LIST_SET, name.encode() + b"\0")
               + _attr(SET_ELEM_LIST_ELEMENTS, elems, nested=True))
    return _msg((NFNL_SUBSYS_NFTABLES << 8) | mtype, flags, seq, NFPROTO_BRIDGE, payload)


SetSpec = tuple[list[str], bool, bool]  # (key types, interval, is verdict map)

# Elements per message: the kernel takes a message up to the socket's limits; a few
# hundred elements of ~100 bytes keep each well under a page-sized skb chain.
_PER_MSG = 256


def element_batch(table: str, specs: dict[str, SetSpec], delete: Iterable[tuple[str, Iterable[Any]]],
                  add: Iterable[tuple[str, Iterable[Any]]], seq: int = 1) -> tuple[bytes, list[int]]:
    """One nfnetlink batch: the deletes, then the adds (a key whose verdict changes is
    deleted and re-added in the same commit). Returns (bytes, sequence numbers that
    expect an ACK). Raises Unencodable before anything is sent."""
    parts = [_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES)]
    seqs: list[int] = []
    for mtype, flags, groups in ((NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK, delete),
                                 (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, add)):
        for name, elems in groups:
            if name not in specs:
                raise Unencodable(f"object {name} is not a port-keyed set or map")
            types, interval, is_map = specs[name]
            # a map's deletes are bare keys (ElementDelta), its adds [key, verdict]
            encoded = [_element(types, interval, e, is_map and mtype == NFT_MSG_NEWSETELEM) for e in elems]
            for i in range(0, len(encoded), _PER_MSG):
                seq += 1
                seqs.append(seq)
                parts.append(_elements_msg(mtype, flags, seq, table, name, b"".join(encoded[i:i + _PER_MSG])))
    seq += 1
    parts.append(_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES))
    return b"".join(parts), seqs


def _replies(data: bytes) -> Iterable[tuple[int, int, bytes]]:
    off = 0
    while off + _NLMSG.size <= len(data):
        length, mtype, _flags, seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size:
            return
        yield mtype, seq, data[off + _NLMSG.size:off + length]
        off += (length + 3) & ~3


class NfnlSocket:
    """One NETLINK_NETFILTER socket: element batches and element gets."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.seq = 1000

    def close(self) -> None:
        self.sock.close()

    def _drain(self) -> list[tuple[int, int, bytes]]:
        # The kernel runs the whole batch inside sendmsg: every reply is queued by the
        # time it returns (libnftables reads them the same way, select with no timeout).
        out = []
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            out.extend(_replies(data))

    def commit(self, batch: bytes, seqs: list[int]) -> None:
        """Send one batch and check every message's ACK. NetlinkError when refused or
        when the answer was lost (then whether it committed is unknown: the caller must
        read the table again)."""
        try:
            self._drain()  # nothing stale may be read as this batch's answer
            self.sock.sendall(batch)
            replies = self._drain()
        except OSError as exc:
            raise NetlinkError(exc.errno or errno.EIO, f"nfnetlink: {exc}") from exc
        errors = []
        acked = set()
        for mtype, seq, body in replies:
            if mtype == NLMSG_ERROR and len(body) >= 4:
                code = struct.unpack_from("=i", body)[0]
                if code:
                    errors.append((seq, -code))
                else:
                    acked.add(seq)
        if errors:
            seq, err = errors[0]
            raise NetlinkError(err, f"{os.strerror(err)} (message {seqs.index(seq) + 1 if seq in seqs else '?'} of {len(seqs)})")
        if not set(seqs) <= acked:
            raise NetlinkError(errno.EPROTO, f"the kernel acknowledged {len(acked & set(seqs))} of {len(seqs)} messages")

    def send_elements(self, table: str, specs: dict[str, SetSpec], delete: Iterable[tuple[str, Iterable[Any]]],
                      add: Iterable[tuple[str, Iterable[Any]]]) -> None:
        """element_batch, numbered after this socket's last message, then commit."""
        batch, seqs = element_batch(table, specs, delete, add, self.seq)
        self.seq += len(seqs) + 2  # begin, the messages, end
        self.commit(batch, seqs)

    def get(self, table: str, name: str, spec: SetSpec, elem: Any) -> bytes | None:
        """The kernel's copy of one element (its NFTA_SET_ELEM attributes), or None
        when the set holds no such key. `elem` of a map: [key, verdict] (the verdict
        is not sent; the caller compares what comes back)."""
        types, interval, is_map = spec
        value = elem[0] if is_map else elem
        self.seq += 1
        seq = self.seq
        msg = _elements_msg(NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_ACK, seq, table, name,
                            _element(types, interval, value, False))
        found = None
        try:
            self._drain()
            self.sock.sendall(msg)
        except OSError as exc:
            raise NetlinkError(exc.errno or errno.EIO, f"get element of {name}: {exc}") from exc
        while True:
            try:
                # the answer is immediate; never wait forever on one
                if not select.select([self.sock], [], [], 5.0)[0]:
                    raise NetlinkError(errno.ETIMEDOUT, f"get element of {name}: no answer")
                data = self.sock.recv(1 << 20)
            except NetlinkError:
                raise
            except OSError as exc:
                raise NetlinkError(exc.errno or errno.EIO, f"get element of {name}: {exc}") from exc
            for mtype, s, body in _replies(data):
                if s != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code == 0:
                        return found
                    if code == errno.ENOENT:
                        return None
                    raise NetlinkError(code, f"get element of {name}: {os.strerror(code)}")
                found = body


def parse_attrs(data: bytes, off: int = 0) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    while off + _NLA.size <= len(data):
        alen, atype = _NLA.unpack_from(data, off)
        if alen < _NLA.size:
            break
        out.setdefault(atype & 0x3FFF, []).append(data[off + _NLA.size:off + alen])
        off += (alen + 3) & ~3
    return out


def element_of_reply(body: bytes) -> dict[int, bytes] | None:
    """The one element of a NEWSETELEM reply: {attribute type: the whole attribute}
    of its first list element, as `expected_attrs` writes them."""
    top = parse_attrs(body, _NFGEN.size)
    lists = top.get(SET_ELEM_LIST_ELEMENTS)
    if not lists:
        return None
    elems = parse_attrs(lists[0]).get(LIST_ELEM)
    if not elems:
        return None
    out: dict[int, bytes] = {}
    data, off = elems[0], 0
    while off + _NLA.size <= len(data):
        alen, atype = _NLA.unpack_from(data, off)
        if alen < _NLA.size:
            break
        out[atype & 0x3FFF] = _pad4(data[off:off + alen])
        off += (alen + 3) & ~3
    return out


def expected_attrs(spec: SetSpec, elem: Any) -> dict[int, bytes]:
    """The key, key end and verdict attributes the kernel reports for `elem` (it dumps
    nests without NLA_F_NESTED); other attributes of a reply (flags) are not compared."""
    types, interval, is_map = spec
    value, verdict = (elem if is_map else (elem, None))
    return _elem_attrs(types, interval, value, verdict, 0)


def held(got: dict[int, bytes] | None, want: dict[int, bytes]) -> bool:
    """Whether a get's answer is exactly `want` (a pipapo get answers with the element
    that contains the key's start, which after a delete can be another one)."""
    return got is not None and all(got.get(k) == v for k, v in want.items()) and \
        (SET_ELEM_KEY_END in want) == (SET_ELEM_KEY_END in got)
