"""Verification at scale on the host kernel: a sink's collect reports every frame that
reached its socket, however far its reader thread lags."""
from __future__ import annotations

import socket
import time

import pytest

from segguard.lab import netns as nl
from segguard.verify.probes import Probe, build_frame, new_marker
from segguard.verify.worker import Capture

from .conftest import unique_prefix

pytestmark = pytest.mark.netns


def test_collect_reports_frames_its_reader_thread_has_not_taken():
    """The reader thread is not even started: what reached the socket must still be
    counted by collect (a sink under a hundred guests' probes lags; a frame left in the
    socket would have read as blocked)."""
    ns = unique_prefix("sgc") + "cap"
    try:
        nl.create_netns(ns)
        nl.write_sysctls(ns, {"net.ipv6.conf.default.disable_ipv6": 1})
        with nl.ipr(ns) as ip:
            nl.create_veth(ip, "sgcap0", None, "sgcap1", None, None)
            for name in ("sgcap0", "sgcap1"):
                nl.set_up(ip, nl.link_index(ip, name))
        with nl.enter_netns(ns):
            cap = Capture("sgcap0", start=False)
            tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            tx.bind(("sgcap1", 0))
        try:
            markers = [new_marker() for _ in range(300)]
            probe = Probe(kind="raw", src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02")
            for m in markers:
                tx.send(build_frame(probe, m))
            time.sleep(0.2)
            got = cap.collect(reset=True)
            assert set(got["markers"]) == {m.decode() for m in markers}
            assert got["frames"] >= len(markers)
            assert cap.collect(reset=True)["markers"] == {}
            late = new_marker()
            tx.send(build_frame(probe, late))
            time.sleep(0.05)
            assert set(cap.collect(reset=True)["markers"]) == {late.decode()}
        finally:
            tx.close()
            cap.sock.close()
    finally:
        nl.delete_netns(ns)
    assert not nl.netns_exists(ns)
