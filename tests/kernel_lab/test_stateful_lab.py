"""The stateful path: with nf_conntrack_bridge, replies are admitted by `ct state`, not
by stateless reply rules. Runs in the kernel lab (the host kernel lacks the module)."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

from segguard.lab import netns as nl
from segguard.lab import topology
from segguard.verify.lab import LAB_CONFIG, apply_in_lab, verify_lab
from segguard.verify.probes import Probe, ProbeSession

pytestmark = pytest.mark.kernel_lab
# qemu without KVM: python workers take seconds to start and frames are slow
os.environ.setdefault("SEGGUARD_PROBE_SETTLE", "2.5")
os.environ.setdefault("SEGGUARD_PROBE_START_TIMEOUT", "180")


@pytest.fixture
def lab():
    prefix = f"sgks{secrets.token_hex(2)}-"
    try:
        yield topology.build(prefix)
    finally:
        topology.destroy(prefix)


def test_example_config_verifies_in_stateful_mode(lab):
    config, plan, result = apply_in_lab(lab.topology, None)
    assert plan.stateful, "the lab kernel has nf_conntrack_bridge: the plan must use ct state"
    rules = [json.dumps(o) for o in plan.nft if "rule" in o]
    assert any('"ct"' in r for r in rules) and not any('"reply: ' in r for r in rules)
    results = verify_lab(None, lab.topology.prefix, lab_extras=True)
    failed = [r for r in results if not r["pass"]]
    assert not failed, failed
    st = subprocess.run(["ip", "netns", "exec", lab.topology.hv_ns, sys.executable, "-m", "segguard.cli", "status",
                         "-c", str(LAB_CONFIG), "--json"], capture_output=True, text=True, timeout=120)
    status = json.loads(st.stdout)
    assert status["reply_mode_live"] == "stateful (ct state)" and status["conntrack_bridge_available"] is True


def test_a_reply_with_no_flow_behind_it_is_dropped(lab):
    """What only conntrack can do: the same SYN-ACK from the historian's service port is
    admitted after the guest opened the flow, and dropped when it did not."""
    apply_in_lab(lab.topology, None)
    t = lab.topology
    xp, app = t.host("xp"), t.host("app")
    eps = {"xp": t.sink("xp"), "app": t.sink("app")}
    syn = Probe(kind="tcp", src_mac=xp.mac, dst_mac=app.mac, src_ip=xp.ip4, dst_ip=app.ip4, sport=41000, dport=1433)
    synack = Probe(kind="tcp", src_mac=app.mac, dst_mac=xp.mac, src_ip=app.ip4, dst_ip=xp.ip4, sport=1433, dport=41000, flags="SA")
    orphan = Probe(kind="tcp", src_mac=app.mac, dst_mac=xp.mac, src_ip=app.ip4, dst_ip=xp.ip4, sport=1433, dport=41001, flags="SA")
    with ProbeSession(eps, eps, settle=2.5, start_timeout=180) as s:
        first = s.run([("syn", "xp", syn, ["app"]), ("orphan", "app", orphan, ["xp"])])
        second = s.run([("synack", "app", synack, ["xp"])])
    assert first == {"syn": {"app": True}, "orphan": {"xp": False}}
    assert second == {"synack": {"xp": True}}
