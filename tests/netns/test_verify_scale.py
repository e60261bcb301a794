"""Verification at scale on the host kernel: the scaled lab (built-in lab plus K copies
of the XP guest, each with its own namespace, port, profile) holds every extra guest's
expectations, verdicts together equal verdicts alone, a missing wall is seen on the
extra guests too, and nothing is left behind; and a sink's collect reports every frame
that reached its socket, however far its reader thread lags."""
from __future__ import annotations

import socket
import time
from collections import defaultdict

import pytest

from segguard.apply.nftables import NftablesApplier
from segguard.lab import netns as nl
from segguard.lab import scaled, topology
from segguard.verify.lab import apply_in_lab, verify_lab
from segguard.verify.probes import Probe, build_frame, new_marker
from segguard.verify.worker import Capture

from .conftest import unique_prefix

pytestmark = pytest.mark.netns
K = 3


def test_scaled_lab_extra_guests_hold_and_leave_nothing(tmp_path):
    prefix = unique_prefix("sgs")
    extras = [topology.extra_domain(i) for i in range(K)]
    try:
        with topology.lab(prefix, extra_legacy=K) as lab:
            assert set(nl.list_netns(prefix)) == {h.ns for h in lab.hosts}
            assert len(lab.hosts) == 10 + K and topology.extra_legacy_present(prefix) == K
            cfg = scaled.write_config(tmp_path / "cfg", lab.topology)
            _, plan, result = apply_in_lab(lab.topology, cfg)
            assert result.changed
            assert {b.guest for b in plan.bindings} >= set(extras)

            results = verify_lab(cfg, prefix)
            by_guest: dict[str, dict[str, dict]] = defaultdict(dict)
            for r in results:
                by_guest[r["guest"]][r["id"]] = r
            assert set(by_guest) == {"xp-line3-hmi", "scada-line4-srv", *extras}
            failed = [r for r in results if not r["pass"]]
            assert not failed, failed
            assert all(r["control"] == "arrived" for r in results if r["expected"] == "blocked")
            # lx000 is an IPv4-only copy of the XP guest: the same checks; lx001 is dual-stack
            assert len(by_guest[extras[0]]) == len(by_guest["xp-line3-hmi"])
            assert f"{extras[1]}/guard-rail/internet/tcp6" in by_guest[extras[1]]

            # One extra guest alone gets exactly the verdicts it got among all of them.
            alone = {r["id"]: (r["pass"], r["observed"], r["control"]) for r in verify_lab(cfg, prefix, guests=[extras[1]])}
            together = {i: (r["pass"], r["observed"], r["control"]) for i, r in by_guest[extras[1]].items()}
            assert alone == together

            # Take the wall down: the extra guests' guard rails must now be reported broken.
            with nl.enter_netns(lab.topology.hv_ns):
                assert NftablesApplier().remove(plan.table)
            broken = {r["id"]: r for r in verify_lab(cfg, prefix, guests=extras)}
            for g in extras:
                r = broken[f"{g}/guard-rail/internet/tcp4"]
                assert r["observed"] == "arrived" and not r["pass"], r
            r = broken[f"{extras[1]}/guard-rail/domain-controller/udp6"]
            assert r["observed"] == "arrived" and not r["pass"], r
        assert nl.list_netns(prefix) == []
    finally:
        topology.destroy(prefix)
    assert nl.list_netns(prefix) == []


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


def test_cli_lab_up_with_extra_legacy_then_verify_finds_them():
    """`segguard lab up --extra-legacy K` applies the scaled config itself, and a plain
    `segguard verify --lab-prefix` of that lab verifies the extra guests too."""
    import json
    import subprocess
    import sys

    prefix = unique_prefix("sgc")
    cli = [sys.executable, "-m", "segguard.cli"]
    try:
        up = subprocess.run([*cli, "lab", "up", "--prefix", prefix, "--extra-legacy", "2"], capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"{prefix}lx001" in up.stdout
        v = subprocess.run([*cli, "verify", "--lab-prefix", prefix, "--json", "--guest", topology.extra_domain(1)],
                           capture_output=True, text=True, timeout=300)
        assert v.returncode == 0, v.stdout + v.stderr
        out = json.loads(v.stdout)
        assert out["failed"] == 0 and out["passed"] > 20
        assert {r["guest"] for r in out["results"]} == {topology.extra_domain(1)}
    finally:
        subprocess.run([*cli, "lab", "down", "--prefix", prefix], capture_output=True, timeout=120)
    assert nl.list_netns(prefix) == []
