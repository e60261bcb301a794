"""Transactions straight over nfnetlink for the agent's deltas (a profile edited, a
tap bound or unbound): the batch, the port-keyed elements and their read-back. A
bind's netdev port chain is encoded by nfnl_chains.py into the same batch.

Why not libnftables: before evaluating a command it fills its cache, and a `delete`
of any element makes it fetch every chain of every table first (nftables 1.0.6
src/cache.c, CMD_DELETE). With 5,000 guests that is ~10,000 chains and ~30 ms for a
transaction that changes two elements; an add alone costs 0.05 ms. The kernel needs
no cache: a NEWSETELEM/DELSETELEM batch names table, set and the key bytes. So the
delta of port-keyed elements is encoded here, committed as one nfnetlink batch (all
or nothing, as libnftables' own), and read back with GETSETELEM of exactly the keys
it touched, not a listing of the set.

Only the datatypes the table's port-keyed sets and maps use are encoded (TYPES);
anything else raises Unencodable and the caller uses libnftables. tests/netns/test_nfnl.py
checks every encoding against the bytes the kernel holds for elements libnftables
wrote, so the two roads cannot drift apart silently.
"""
from __future__ import annotations

import errno
import functools
import os
import select
import socket
import struct
from typing import Any, Iterable

from segguard.plan import Concat, concat_fields


NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NFT_MSG_GETGEN, NFTA_GEN_ID = 16, 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x400
SO_SNDBUFFORCE = 32
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

@functools.lru_cache(maxsize=1 << 16)
def _ifname_str(v: str) -> tuple[bytes, bytes]:
    if not 0 < len(v.encode()) < 16:
        raise Unencodable(f"ifname {v!r}")
    b = v.encode().ljust(16, b"\0")
    return b, b


def _ifname(v: Any) -> tuple[bytes, bytes]:
    if not isinstance(v, str):
        raise Unencodable(f"ifname {v!r}")
    return _ifname_str(v)


@functools.lru_cache(maxsize=1 << 16)
def _ip(version: int, text: str) -> int:
    # inet_pton: a bind encodes ~150 addresses, and netaddr's parser was a third of it
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET if version == 4 else socket.AF_INET6, text), "big")
    except (OSError, TypeError, ValueError) as exc:
        raise Unencodable(f"{text!r} is not an IPv{version} address") from exc


def _addr(version: int):
    size, bits = (4, 32) if version == 4 else (16, 128)

    def enc(v: Any) -> tuple[bytes, bytes]:
        try:
            if isinstance(v, dict) and "prefix" in v:
                length = v["prefix"]["len"]
                if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= bits:
                    raise Unencodable(f"prefix {v!r}")
                host = (1 << (bits - length)) - 1
                first = _ip(version, v["prefix"]["addr"]) & ~host
                lo, hi = first, first | host
            elif isinstance(v, dict) and "range" in v:
                lo, hi = (_ip(version, x) for x in v["range"])
            elif isinstance(v, str):
                lo = hi = _ip(version, v)
            else:
                raise Unencodable(f"address {v!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise Unencodable(f"address {v!r}") from exc
        return lo.to_bytes(size, "big"), hi.to_bytes(size, "big")
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
    fields = concat_fields(value)
    if fields is None:
        fields = [value]
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


# ---- many elements at once (a full replace: ~56,000 at 1,000 guests) ------------------
# The same bytes as _elem_attrs(..., nested=0), i.e. the kernel's own dump of each
# element (tests/unit/test_nfnl_encode.py holds the two to each other): each field
# encoded once per distinct value, the attribute headers computed once per length.

def _freeze(v: Any) -> Any:
    """A hashable stand-in for one field's JSON value (Unencodable for what no
    encoder takes; a bool is refused here, where it would pass for 1 in a cache)."""
    if isinstance(v, bool):
        raise Unencodable(repr(v))
    if isinstance(v, dict) and len(v) == 1:
        if isinstance(v.get("prefix"), dict) and set(v["prefix"]) == {"addr", "len"}:
            return ("prefix", v["prefix"]["addr"], v["prefix"]["len"])
        if isinstance(v.get("range"), list) and len(v["range"]) == 2:
            return ("range", *v["range"])
    if isinstance(v, (dict, list)):
        raise Unencodable(f"value {v!r}")
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple):
        return {"prefix": {"addr": v[1], "len": v[2]}} if v[0] == "prefix" else {"range": [v[1], v[2]]}
    return v


def _field(datatype: str, frozen: Any) -> tuple[bytes, bytes]:
    """(start, end) of one field, each padded to 4 bytes; TYPES decides."""
    if isinstance(frozen, bool) or (isinstance(frozen, tuple) and any(isinstance(x, bool) for x in frozen)):
        raise Unencodable(repr(frozen))
    lo, hi = TYPES[datatype](_thaw(frozen))
    if lo > hi:
        raise Unencodable(f"empty range {_thaw(frozen)!r}")
    return _pad4(lo), _pad4(hi)


@functools.lru_cache(maxsize=64)
def _nest_head(kind: int, size: int) -> bytes:
    """The headers of attribute `kind` holding one NFTA_DATA_VALUE of `size` bytes."""
    inner = _NLA.size + size
    return _NLA.pack(_NLA.size + ((inner + 3) & ~3), kind) + _NLA.pack(inner, DATA_VALUE)


@functools.lru_cache(maxsize=1 << 14)
def _verdict_data(kind: str, target: str | None) -> bytes:
    body = {kind: {"target": target} if target is not None else None}
    return _attr(SET_ELEM_DATA, _attr(DATA_VERDICT, encode_verdict(body)))


# field values of the last full replace, per datatype: dicts, not lru_caches, for
# their speed (a few MB at 1,000 guests; nfnl_table.replace empties them)
_FIELDS: dict[str, dict[Any, tuple[bytes, bytes]]] = {}


def _field_of(cache: dict[Any, tuple[bytes, bytes]], datatype: str, v: Any) -> tuple[bytes, bytes]:
    k = v if type(v) is str or type(v) is int else _freeze(v)  # never a bool: 1 == True
    p = cache.get(k)
    if p is None:
        p = cache[k] = _field(datatype, k)
    return p


def element_payloads(spec: SetSpec, elems: Iterable[Any]) -> list[bytes]:
    """Each element as one NFTA_LIST_ELEM attribute holding its key, key end and
    verdict, byte for byte as the kernel dumps it."""
    types, interval, is_map = spec
    if not all(t in TYPES for t in types):
        raise Unencodable(f"datatype {types}")
    n = len(types)
    if n == 1 and interval:
        raise Unencodable("single-field interval sets take interval-end elements")
    caches = [_FIELDS.setdefault(t, {}) for t in types]
    pairs = list(zip(caches, types))
    verdicts: dict[tuple[str, Any], bytes] = {}
    pack = _NLA.pack
    out: list[bytes] = []
    head = head_end = None
    for e in elems:
        if is_map:
            if not (type(e) is list and len(e) == 2 and type(e[1]) is dict and len(e[1]) == 1):
                raise Unencodable(f"map element {e!r}")
            value = e[0]
            (vkind, vbody), = e[1].items()
            target = vbody.get("target") if type(vbody) is dict else None
            data = verdicts.get((vkind, target))
            if data is None:
                if vkind not in VERDICTS or (vkind in ("jump", "goto")) != isinstance(target, str):
                    raise Unencodable(f"verdict {e[1]!r}")
                data = verdicts[vkind, target] = _verdict_data(vkind, target)
        else:
            value, data = e, b""
        if n == 1:
            if type(value) is dict or type(value) is list or type(value) is Concat:
                raise Unencodable(f"range {value!r} in a set without intervals")
            lo, hi = _field_of(caches[0], types[0], value)
            if lo != hi:
                raise Unencodable(f"range {value!r} in a set without intervals")
            if head is None:  # the unpadded length goes into the header
                head = _nest_head(SET_ELEM_KEY, len(TYPES[types[0]](value)[0]))
            body = head + lo + data
        else:
            if type(value) is Concat:  # a plan's element
                fields = value.parts
            else:  # JSON, as a listing has it
                try:
                    fields = value["concat"]
                except (TypeError, KeyError, IndexError) as exc:
                    raise Unencodable(f"{value!r} is not a concatenation") from exc
                if type(fields) is not list or len(value) != 1:
                    raise Unencodable(f"{value!r} does not have the set's {n} fields")
            if len(fields) != n:
                raise Unencodable(f"{value!r} does not have the set's {n} fields")
            for v in fields:
                if v is True or v is False:  # a cache would take it for 1 or 0
                    raise Unencodable(f"value {v!r}")
            try:  # the common case: every field a str or int seen before
                parts = [c[v] for c, v in zip(caches, fields)]
            except (KeyError, TypeError):
                parts = [_field_of(c, t, v) for (c, t), v in zip(pairs, fields)]
            key = b"".join([p[0] for p in parts])
            if head is None:  # every datatype here has one size: one key length per set
                head, head_end = _nest_head(SET_ELEM_KEY, len(key)), _nest_head(SET_ELEM_KEY_END, len(key))
            if interval:
                body = head + key + head_end + b"".join([p[1] for p in parts]) + data
            else:
                for p in parts:
                    if p[0] != p[1]:
                        raise Unencodable(f"range {value!r} in a set without intervals")
                body = head + key + data
        out.append(pack(4 + len(body), LIST_ELEM) + body)
    return out


def _msg(mtype: int, flags: int, seq: int, family: int, payload: bytes, res_id: int = 0) -> bytes:
    body = _NFGEN.pack(family, 0, socket.htons(res_id)) + payload
    return _NLMSG.pack(_NLMSG.size + len(body), mtype, flags, seq, 0) + body


def _elements_payload(table: str, name: str, elems: bytes) -> bytes:
    return (_attr(SET_ELEM_LIST_TABLE, table.encode() + b"\0") + _attr(SET_ELEM_LIST_SET, name.encode() + b"\0")
            + _attr(SET_ELEM_LIST_ELEMENTS, elems, nested=True))


SetSpec = tuple[list[str], bool, bool]  # (key types, interval, is verdict map)

# Elements per message: the kernel takes a message up to the socket's limits; a few
# hundred elements of ~100 bytes keep each well under a page-sized skb chain.
_PER_MSG = 256
# Gets per datagram: their answers (~200 bytes each, with the ACKs) stay far below the
# socket's receive buffer, which would drop what does not fit.
_PER_SEND = 256


class Batch:
    """One nfnetlink batch under construction: BATCH_BEGIN, messages that each expect
    an ACK, BATCH_END. The kernel applies all of it or nothing."""

    def __init__(self, seq: int = 1, ack_last: bool = False) -> None:
        self.seq = seq
        # ack_last: only the last message asks for an ACK. The kernel reports every
        # refused message whatever its flags (nfnetlink_rcv_batch), and queues the ACKs
        # until the batch is committed or aborted; 7,000 ACKs of a full replace were
        # 7,000 skbs to make and parse for nothing
        self.ack_last = ack_last
        # one buffer, written in place: a full replace at 1,000 guests is ~5 MB, and a
        # list of its messages joined at the end was a second copy at the agent's peak
        self.buf = bytearray(_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES))
        self.seqs: list[int] = []
        self._last = -1      # where the last message starts
        self._acks: list[int] | None = None  # set by finish()

    def add(self, mtype: int, flags: int, family: int, payload: bytes) -> None:
        if self._acks is not None:
            raise RuntimeError("message added to a finished batch")
        self.seq += 1
        self.seqs.append(self.seq)
        ack = 0 if self.ack_last else NLM_F_ACK
        self._last = len(self.buf)
        # what _msg builds, without its two intermediate copies
        self.buf += _NLMSG.pack(_NLMSG.size + _NFGEN.size + len(payload), (NFNL_SUBSYS_NFTABLES << 8) | mtype,
                                flags | NLM_F_REQUEST | ack, self.seq, 0)
        self.buf += _NFGEN.pack(family, 0, 0)
        self.buf += payload

    def elements(self, table: str, specs: dict[str, SetSpec], delete: Iterable[tuple[str, Iterable[Any]]],
                 add: Iterable[tuple[str, Iterable[Any]]]) -> None:
        """The deletes, then the adds (a key whose verdict changes is deleted and
        re-added in the same commit). Raises Unencodable before anything is added."""
        msgs = []
        for mtype, flags, groups in ((NFT_MSG_DELSETELEM, 0, delete), (NFT_MSG_NEWSETELEM, NLM_F_CREATE, add)):
            for name, elems in groups:
                if name not in specs:
                    raise Unencodable(f"object {name} is not a port-keyed set or map")
                types, interval, is_map = specs[name]
                # a map's deletes are bare keys (ElementDelta), its adds [key, verdict]
                encoded = [_element(types, interval, e, is_map and mtype == NFT_MSG_NEWSETELEM) for e in elems]
                for i in range(0, len(encoded), _PER_MSG):
                    msgs.append((mtype, flags, _elements_payload(table, name, b"".join(encoded[i:i + _PER_MSG]))))
        for mtype, flags, payload in msgs:
            self.add(mtype, flags, NFPROTO_BRIDGE, payload)

    def finish(self) -> tuple[bytearray, list[int]]:
        """(the batch, sequence numbers that expect an ACK). Ends the batch; a second
        call answers the same."""
        if self._acks is None:
            self.seq += 1
            if self.ack_last and self.seqs:
                length, mtype, flags, seq, pid = _NLMSG.unpack_from(self.buf, self._last)
                _NLMSG.pack_into(self.buf, self._last, length, mtype, flags | NLM_F_ACK, seq, pid)
                self._acks = [self.seqs[-1]]
            else:
                self._acks = list(self.seqs)
            self.buf += _msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, self.seq, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES)
        return self.buf, list(self._acks)


def element_batch(table: str, specs: dict[str, SetSpec], delete: Iterable[tuple[str, Iterable[Any]]],
                  add: Iterable[tuple[str, Iterable[Any]]], seq: int = 1) -> tuple[bytearray, list[int]]:
    """One nfnetlink batch of element deletes and adds (Batch.elements)."""
    batch = Batch(seq)
    batch.elements(table, specs, delete, add)
    return batch.finish()


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

    def commit(self, batch: bytes | bytearray, seqs: list[int], messages: list[int] | None = None) -> None:
        """Send one batch and check every message's ACK. NetlinkError when refused or
        when the answer was lost (then whether it committed is unknown: the caller must
        read the table again)."""
        try:
            self._drain()  # nothing stale may be read as this batch's answer
            # a batch is one datagram: the kernel takes it whole or not at all, so the
            # send buffer must hold it (libnftables raises it the same way)
            if len(batch) > self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(batch) + 65536)
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
            every = messages or seqs  # `messages`: all of the batch, when only some ask for an ACK
            raise NetlinkError(err, f"{os.strerror(err)} (message {every.index(seq) + 1 if seq in every else '?'} of {len(every)})")
        if not set(seqs) <= acked:
            raise NetlinkError(errno.EPROTO, f"the kernel acknowledged {len(acked & set(seqs))} of {len(seqs)} messages")

    def batch(self) -> Batch:
        """A batch numbered after this socket's last message (send it with `send`)."""
        return Batch(self.seq)

    def send(self, batch: Batch) -> None:
        data, seqs = batch.finish()
        self.seq = batch.seq + 1
        self.commit(data, seqs, batch.seqs)

    def send_elements(self, table: str, specs: dict[str, SetSpec], delete: Iterable[tuple[str, Iterable[Any]]],
                      add: Iterable[tuple[str, Iterable[Any]]]) -> None:
        """Batch.elements, numbered after this socket's last message, then commit."""
        batch = self.batch()
        batch.elements(table, specs, delete, add)
        self.send(batch)

    def get(self, table: str, name: str, spec: SetSpec, elem: Any) -> bytes | None:
        """The kernel's copy of one element (its NFTA_SET_ELEM attributes), or None
        when the set holds no such key. `elem` of a map: [key, verdict] (the verdict
        is not sent; the caller compares what comes back)."""
        return self.get_many(table, [(name, spec, elem)])[0]

    def get_many(self, table: str, wanted: list[tuple[str, SetSpec, Any]]) -> list[bytes | None]:
        """`get` of each (set, spec, element), the requests sent _PER_SEND to a datagram
        (the kernel answers each message of it in turn): one round trip per chunk, not
        per element, for a bind's ~55 elements."""
        out: list[bytes | None] = []
        for i in range(0, len(wanted), _PER_SEND):
            out += self._get_chunk(table, wanted[i:i + _PER_SEND])
        return out

    def _get_chunk(self, table: str, wanted: list[tuple[str, SetSpec, Any]]) -> list[bytes | None]:
        seqs, msgs = [], []
        for name, (types, interval, is_map), elem in wanted:
            self.seq += 1
            seqs.append(self.seq)
            msgs.append(_msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_ACK, self.seq,
                             NFPROTO_BRIDGE, _elements_payload(table, name, _element(types, interval, elem[0] if is_map else elem, False))))
        found: dict[int, bytes | None] = {}
        done: set[int] = set()
        index = {s: i for i, s in enumerate(seqs)}
        what = f"get elements of {', '.join(sorted({n for n, _, _ in wanted}))}"
        try:
            self._drain()
            self.sock.sendall(b"".join(msgs))
        except OSError as exc:
            raise NetlinkError(exc.errno or errno.EIO, f"{what}: {exc}") from exc
        while len(done) < len(seqs):
            for mtype, s, body in _replies(self._answer(what, f"{len(seqs) - len(done)} of {len(seqs)} unanswered")):
                if s not in index or s in done:
                    continue
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code == errno.ENOENT:
                        found[s] = None
                    elif code:
                        raise NetlinkError(code, f"get element of {wanted[index[s]][0]}: {os.strerror(code)}")
                    done.add(s)
                else:
                    found[s] = body
        return [found.get(s) for s in seqs]

    def _answer(self, what: str, unanswered: str) -> bytes:
        """The next datagram of answers. They are immediate: never wait forever on one."""
        try:
            ready = select.select([self.sock], [], [], 5.0)[0]
            data = self.sock.recv(1 << 20) if ready else None
        except OSError as exc:
            raise NetlinkError(exc.errno or errno.EIO, f"{what}: {exc}") from exc
        if data is None:
            raise NetlinkError(errno.ETIMEDOUT, f"{what}: {unanswered}")
        return data

    def generation(self) -> int:
        """The ruleset's generation id: every commit in the namespace advances it by one."""
        bodies = self.request(NFT_MSG_GETGEN, socket.AF_UNSPEC, b"", "get the ruleset generation")
        ids = parse_attrs(bodies[0], _NFGEN.size).get(NFTA_GEN_ID) if bodies else None
        if not ids or len(ids[0]) != 4:
            raise NetlinkError(errno.EPROTO, "get the ruleset generation: no generation id in the answer")
        return struct.unpack(">I", ids[0])[0]

    def request(self, mtype: int, family: int, payload: bytes, what: str, dump: bool = False) -> list[bytes] | None:
        """One get (or, with `dump`, a dump filtered by `payload`): the answers' bodies,
        or None when the kernel has no such object (ENOENT)."""
        self.seq += 1
        seq = self.seq
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_DUMP if dump else 0)
        msg = _msg((NFNL_SUBSYS_NFTABLES << 8) | mtype, flags, seq, family, payload)
        found: list[bytes] = []
        try:
            self._drain()
            self.sock.sendall(msg)
        except OSError as exc:
            raise NetlinkError(exc.errno or errno.EIO, f"{what}: {exc}") from exc
        while True:
            for mtype_, s, body in _replies(self._answer(what, "no answer")):
                if s != seq:
                    continue
                if mtype_ == NLMSG_DONE:
                    return found
                if mtype_ == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code == 0:
                        return found
                    if code == errno.ENOENT:
                        return None
                    raise NetlinkError(code, f"{what}: {os.strerror(code)}")
                found.append(body)


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
