"""The agent's scheduled real-packet verify (`--verify-every`), with the real agent
process in the lab hypervisor namespace: results per guest in `segguard status --json`
and in the metrics, and a wall that does not hold on this host reported as failed.

The failure is made honestly: a foreign nftables table (not segguard's, so no drift)
drops the flow the xp profile allows (TCP 1433 to the historian). The profile's
expectation "guest -> historian:1433 arrives" cannot hold on this host, and the probes
that see it are the same real frames `verify --live` sends."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from segguard.verify.lab import LAB_CONFIG
from tests.netns.conftest import unique_prefix
from tests.netns.test_agent import AgentProc, live_table, nsrun, wait_for

pytestmark = pytest.mark.netns
GUEST = "xp-line3-hmi"
ALLOW_ID = f"{GUEST}/allow/egress0/tcp4"
FOREIGN = "sgz_foreign"


@pytest.fixture
def lab_prefix() -> str:
    return unique_prefix("sgz")


def _metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return None


def test_scheduled_verify_keeps_results_in_status_and_metrics_and_sees_a_wall_that_does_not_hold(lab, tmp_path):
    hv = lab.topology.hv_ns
    cfg = tmp_path / "cfg"
    shutil.copytree(LAB_CONFIG, cfg)
    agent = AgentProc(hv, cfg, tmp_path / "state", tmp_path / "agent.log", 19391,
                      args=("--verify-every", "2", "--drift-every", "5"))
    agent.start()
    try:
        def verified(after: float = 0.0):
            v = ((agent.state_json() or {}).get("guests") or {}).get(GUEST, {}).get("last_verify")
            return v if v and v["at"] > after else None

        first = wait_for(verified, "the first scheduled verify of the xp guest", timeout=240, every=0.5)
        st = json.loads(agent.cli("status", "-c", str(cfg), "--json").stdout)
        v = st["agent"]["guests"][GUEST]["last_verify"]
        assert v["method"] == "live" and v["ok"] and v["failed"] == 0 and v["failing"] == [], v
        assert v["passed"] > 20 and v["at"] == first["at"]
        # this host has no VLAN layer: the agent says so and enforces nftables anyway
        assert st["agent"]["vlan_layer"].startswith("missing: this kernel lacks bridge VLAN filtering")
        assert st["agent"]["guests"][GUEST]["vlan"]["layer"] == st["agent"]["vlan_layer"]
        m = agent.metrics()
        assert _metric(m, "segguard_guest_verify_ok", guest=GUEST) == 1.0
        assert _metric(m, "segguard_verify_expectations", guest=GUEST, result="passed") == float(v["passed"])
        assert _metric(m, "segguard_verify_expectations", guest=GUEST, result="failed") == 0.0
        # the verify's switch to the stand-in plan and back is not drift, and the agent
        # did not fight it: the table is the agent's plan again
        # (the agent's state is written after its reconcile that follows each run; `status`
        # itself may catch the next guest's run with the stand-in enrolled)
        after = agent.state_json()
        assert not after.get("drift_counts") and after["guests"][GUEST]["in_sync"], after
        assert any(l["event"] == "verify-start" for l in agent.logs()) and live_table(hv) is not None

        # a wall on this host that contradicts the profile: the flow it allows is dropped
        nsrun(hv, "nft", "add", "table", "bridge", FOREIGN, check=True)
        nsrun(hv, "nft", "add", "chain", "bridge", FOREIGN, "f", "{ type filter hook forward priority 10; }", check=True)
        nsrun(hv, "nft", "add", "rule", "bridge", FOREIGN, "f", "tcp", "dport", "1433", "drop", check=True)
        try:
            bad = wait_for(lambda: (x := verified(first["at"])) and not x["ok"] and x, "a failed scheduled verify",
                           timeout=240, every=0.5)
            assert ALLOW_ID in bad["failing"] and bad["failed"] >= 1 and bad["passed"] > 20, bad
            assert any(p.startswith(f"{ALLOW_ID}: the allowed flow did not arrive") for p in bad["problems"]), bad
            st = json.loads(agent.cli("status", "-c", str(cfg), "--json").stdout)
            assert ALLOW_ID in st["agent"]["guests"][GUEST]["last_verify"]["failing"]
            text = agent.cli("status", "-c", str(cfg)).stdout
            assert f"last verify FAIL: {ALLOW_ID}" in text, text
            m = agent.metrics()
            assert _metric(m, "segguard_guest_verify_ok", guest=GUEST) == 0.0
            assert _metric(m, "segguard_verify_expectations", guest=GUEST, result="failed") == float(bad["failed"])
            assert any(l["event"] == "verified" and l["guest"] == GUEST and not l["ok"] and ALLOW_ID in l["failing"]
                       for l in agent.logs())
        finally:
            nsrun(hv, "nft", "delete", "table", "bridge", FOREIGN)
        # the foreign wall gone, the next run holds again: it was the wall, not the probes
        good = wait_for(lambda: (x := verified(bad["at"])) and x, "the next scheduled verify", timeout=240, every=0.5)
        assert good["ok"] and good["failed"] == 0, good
        assert not (agent.state_json() or {}).get("drift_counts")
    finally:
        agent.stop()
