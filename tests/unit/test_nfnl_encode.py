"""The nfnetlink element encoder without a kernel: known byte layouts and refusals
(tests/netns/test_nfnl.py compares every encoding with what the kernel holds)."""
from __future__ import annotations

import struct

import pytest

from segguard.apply import nfnl


def test_concat_fields_are_padded_to_four_bytes_and_ranges_give_an_end_key():
    key, end = nfnl.encode_key(["ifname", "ipv4_addr", "inet_proto", "inet_service"], True,
                               {"concat": ["vnet7", {"prefix": {"addr": "10.40.0.0", "len": 16}}, "tcp", {"range": [1000, 1100]}]})
    assert key == b"vnet7".ljust(16, b"\0") + bytes([10, 40, 0, 0]) + b"\x06\0\0\0" + b"\x03\xe8\0\0"
    assert end == b"vnet7".ljust(16, b"\0") + bytes([10, 40, 255, 255]) + b"\x06\0\0\0" + b"\x04\x4c\0\0"


def test_hash_sets_take_single_values_only():
    key, end = nfnl.encode_key(["ether_addr", "ifname"], False, {"concat": ["52:54:00:aa:00:01", "vnet7"]})
    assert key == bytes.fromhex("525400aa0001") + b"\0\0" + b"vnet7".ljust(16, b"\0") and end is None
    assert nfnl.encode_key(["ether_addr"], False, "52:54:00:aa:00:01") == (bytes.fromhex("525400aa0001"), None)
    with pytest.raises(nfnl.Unencodable):
        nfnl.encode_key(["ifname", "inet_service"], False, {"concat": ["vnet7", {"range": [1, 2]}]})


@pytest.mark.parametrize("types, value", [
    (["ifname", "ipv4_addr"], {"concat": ["vnet7", "2001:db8::1"]}),      # wrong family
    (["ifname", "ipv6_addr"], {"concat": ["vnet7", "10.0.0.1"]}),
    (["ifname", "ipv4_addr"], {"concat": ["a-name-far-too-long", "10.0.0.1"]}),
    (["ifname", "ipv4_addr"], {"concat": ["vnet7"]}),                      # too few fields
    (["ifname", "icmp_type"], {"concat": ["vnet7", "echo-request"]}),       # a type we do not encode
    (["ifname", "inet_service"], {"concat": ["vnet7", {"range": [20, 10]}]}),
    (["ifname", "ipv4_addr"], {"concat": ["vnet7", "not-an-address"]}),
    (["ipv4_addr"], "10.0.0.0/8"),                                          # single-field interval: not ours
])
def test_what_is_not_encoded_is_refused(types, value):
    with pytest.raises(nfnl.Unencodable):
        nfnl.encode_key(types, True, value)


def test_batch_is_begin_messages_end_and_every_message_wants_an_ack():
    spec = {"s": (["ifname", "ipv4_addr"], False, False), "m": (["ifname"], False, True)}
    batch, seqs = nfnl.element_batch("segguard", spec, [("s", [{"concat": ["v1", "10.0.0.1"]}]), ("m", ["v1"])],
                                     [("m", [["v1", {"goto": {"target": "gout_x"}}]])], seq=100)
    msgs = list(nfnl._replies(batch))
    kinds = [t for t, _s, _b in msgs]
    assert kinds == [nfnl.NFNL_MSG_BATCH_BEGIN, (10 << 8) | nfnl.NFT_MSG_DELSETELEM, (10 << 8) | nfnl.NFT_MSG_DELSETELEM,
                     (10 << 8) | nfnl.NFT_MSG_NEWSETELEM, nfnl.NFNL_MSG_BATCH_END]
    assert seqs == [s for _t, s, _b in msgs[1:-1]] == [101, 102, 103]
    flags = [struct.unpack_from("=H", batch, off + 6)[0] for off in _offsets(batch)]
    assert all(f & nfnl.NLM_F_ACK for f in flags[1:-1]) and flags[3] & nfnl.NLM_F_CREATE
    # the add carries the verdict: goto (-4) and the chain's name
    assert struct.pack(">i", -4) in msgs[3][2] and b"gout_x\0" in msgs[3][2]
    # the map's delete is its key alone
    assert b"gout_x" not in msgs[2][2]


def test_many_elements_are_split_over_messages():
    spec = {"s": (["ifname", "ipv4_addr"], False, False)}
    elems = [{"concat": ["v1", f"10.0.{i // 256}.{i % 256}"]} for i in range(600)]
    _batch, seqs = nfnl.element_batch("segguard", spec, [], [("s", elems)])
    assert len(seqs) == 3


def _offsets(batch: bytes):
    off = 0
    while off < len(batch):
        yield off
        off += (struct.unpack_from("=I", batch, off)[0] + 3) & ~3


# ---- element_payloads: the full replace's fast encoder, held to _elem_attrs ----------

def _slow(spec, elems):
    types, interval, is_map = spec
    out = []
    for e in elems:
        value, verdict = (e if is_map else (e, None))
        body = b"".join(nfnl._elem_attrs(types, interval, value, verdict, 0).values())
        out.append(struct.pack("=HH", 4 + len(body), nfnl.LIST_ELEM) + body)
    return out


def _plans():
    import json
    from pathlib import Path

    golden = Path(__file__).resolve().parents[1] / "golden"
    for case in sorted(p.name for p in golden.iterdir() if (p / "plan.json").exists()):
        yield case, json.loads((golden / case / "plan.json").read_text())["nft"]


def test_element_payloads_are_the_element_encoder_s_bytes_for_every_golden_element():
    from segguard.apply.nfnl_table import _spec

    checked = 0
    for _case, objs in _plans():
        for o in objs:
            kind, body = next(iter(o.items()))
            spec = _spec(body) if kind in ("set", "map") else None
            if spec is None or (len(spec[0]) == 1 and spec[1]):
                continue
            try:
                want = _slow(spec, body.get("elem", []))
            except nfnl.Unencodable:
                with pytest.raises(nfnl.Unencodable):
                    nfnl.element_payloads(spec, body.get("elem", []))
                continue
            assert nfnl.element_payloads(spec, body.get("elem", [])) == want, body["name"]
            checked += len(want)
    assert checked > 100


@pytest.mark.parametrize("spec, elems", [
    ((["ifname", "ipv4_addr", "inet_proto", "inet_service"], True, False),
     [{"concat": ["vnet7", {"prefix": {"addr": "10.40.0.0", "len": 16}}, "tcp", {"range": [1000, 1100]}]},
      {"concat": ["vnet7", {"range": ["10.0.0.1", "10.0.0.9"]}, "udp", 53]}]),
    ((["ifname", "ipv6_addr"], False, False), [{"concat": ["vnet8", "fd00:30::2"]}] * 2),
    ((["ether_addr"], False, False), ["52:54:00:aa:00:01"]),
    ((["ifname"], False, True), [["vnet7", {"goto": {"target": "gout_x"}}], ["vnet8", {"drop": None}]]),
    ((["ifname", "ether_addr"], False, True),
     [[{"concat": ["vnet7", "52:54:00:aa:00:01"]}, {"jump": {"target": "g7"}}],
      [{"concat": ["vnet8", "52:54:00:aa:00:02"]}, {"accept": None}]]),
])
def test_element_payloads_match_the_slow_encoder_for_ranges_prefixes_and_verdicts(spec, elems):
    nfnl._FIELDS.clear()
    assert nfnl.element_payloads(spec, elems) == _slow(spec, elems)
    assert nfnl.element_payloads(spec, elems) == _slow(spec, elems)  # from the caches


@pytest.mark.parametrize("spec, elem", [
    ((["ifname", "inet_proto"], False, False), {"concat": ["vnet7", True]}),   # a bool is not 1
    ((["ifname", "inet_service"], False, False), {"concat": ["vnet7", {"range": [1, 2]}]}),
    ((["ifname", "ipv4_addr"], False, False), {"concat": ["vnet7"]}),
    ((["ifname"], False, True), ["vnet7", {"jump": None}]),
    ((["ifname"], False, True), "vnet7"),
    ((["inet_proto"], False, False), "no-such-proto"),
    # a range seen before in an interval set is still not a single value
    ((["ifname", "inet_service"], False, False), {"concat": ["vnet7", {"range": [1000, 1100]}]}),
])
def test_element_payloads_refuse_what_the_encoder_refuses(spec, elem):
    nfnl._FIELDS.clear()
    nfnl.element_payloads((["ifname", "inet_proto"], False, False), [{"concat": ["vnet7", 1]}])  # 1 in the cache
    nfnl.element_payloads((["ifname", "inet_service"], True, False), [{"concat": ["vnet7", {"range": [1000, 1100]}]}])
    with pytest.raises(nfnl.Unencodable):
        nfnl.element_payloads(spec, [elem])


def test_a_batch_that_acks_only_its_last_message():
    b = nfnl.Batch(ack_last=True)
    for _ in range(3):
        b.add(nfnl.NFT_MSG_NEWSETELEM, 0, nfnl.NFPROTO_BRIDGE, b"")
    data, expect = b.finish()
    flags = []
    off = 0
    while off < len(data):
        length, _t, fl, seq, _pid = struct.unpack_from("=IHHII", data, off)
        flags.append((seq, bool(fl & nfnl.NLM_F_ACK)))
        off += length
    assert flags == [(1, False), (2, False), (3, False), (4, True), (5, False)] and expect == [4]
    assert b.seqs == [2, 3, 4]  # every message, for naming the refused one


# ---- read-back of a set's elements: cut at their one length ---------------------------

class _DumpOf:
    """A socket whose element dump answers `lists` (each an NFTA_SET_ELEM_LIST_ELEMENTS)."""

    def __init__(self, *lists: bytes):
        self.lists = lists

    def request(self, *_a, **_k):
        return [bytes(4) + nfnl._attr(3, lst, nested=True) for lst in self.lists]


def test_elements_read_back_at_one_length_are_what_a_header_walk_finds():
    from collections import Counter

    from segguard.apply import nfnl_table

    spec = (["ifname", "ipv4_addr"], False, False)
    elems = nfnl.element_payloads(spec, [{"concat": [f"vnet{i}", f"10.0.0.{i}"]} for i in range(6)])
    size = len(elems[0])
    assert {len(e) for e in elems} == {size} and size % 4 == 0
    held = _DumpOf(b"".join(elems[:4]), b"".join(elems[4:]))
    assert nfnl_table.element_payloads(held, "t", "s", size) == nfnl_table.element_payloads(held, "t", "s") == elems
    # an element of another length (a map's verdict, say) is not cut into look-alikes
    other = nfnl.element_payloads((["ifname", "ipv4_addr"], False, True),
                                  [[{"concat": ["vnet9", "10.0.0.9"]}, {"accept": None}]])[0]
    odd = _DumpOf(b"".join(elems[:3]) + other)
    assert Counter(nfnl_table.element_payloads(odd, "t", "s", size)) != Counter(elems[:3] + [elems[0]])
    assert nfnl_table.element_payloads(odd, "t", "s", size) == elems[:3] + [other]
