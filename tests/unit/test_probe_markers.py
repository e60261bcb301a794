"""The probe engine's markers: unique within a session by construction."""
from __future__ import annotations

from segguard.verify import probes


def test_markers_never_repeat_within_a_session(monkeypatch):
    seq = iter([b"SGPROBE000000000001", b"SGPROBE000000000001", b"SGPROBE000000000002"])
    monkeypatch.setattr(probes, "new_marker", lambda: next(seq))
    used: set[bytes] = set()
    assert probes.fresh_marker(used) == b"SGPROBE000000000001"
    assert probes.fresh_marker(used) == b"SGPROBE000000000002"  # the repeat was drawn again
