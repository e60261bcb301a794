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
