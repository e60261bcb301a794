"""The CLI as a user meets it: real processes, real output, real exit codes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from segguard.verify.lab import LAB_CONFIG

SEGGUARD = [sys.executable, "-m", "segguard.cli"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SEGGUARD, *args], capture_output=True, text=True, timeout=60, env=env)


def test_help_documents_exit_codes():
    out = run("--help").stdout
    assert "Exit codes: 0 ok" in out and "2 invalid config" in out and "5 verification failed" in out
    for verb in ("validate", "plan", "apply", "status", "verify", "lab", "remove"):
        assert verb in out


def test_validate_ok():
    p = run("validate", "-c", str(LAB_CONFIG))
    assert p.returncode == 0
    assert p.stdout.strip() == f"ok: 2 profiles, 2 legacy guests in {LAB_CONFIG}"


def test_validate_reports_every_problem_with_file_line_field(tmp_path):
    cfg = tmp_path / "cfg"
    shutil.copytree(LAB_CONFIG, cfg)
    prof = cfg / "profiles" / "xp-line3.yaml"
    text = prof.read_text().replace("vlan: 30 ", "vlan: 250 ").replace("ports: [3389]", "ports: [70000]")
    prof.write_text(text)
    p = run("validate", "-c", str(cfg))
    assert p.returncode == 2
    lines = text.splitlines()
    vlan_line = next(i for i, l in enumerate(lines, 1) if l.startswith("vlan: 250"))
    port_line = next(i for i, l in enumerate(lines, 1) if "70000" in l)
    assert f"xp-line3.yaml:{vlan_line}: vlan: VLAN 250 is a management VLAN" not in p.stderr  # schema errors first
    assert f"xp-line3.yaml:{port_line}: ingress[0].ports[0]: port 70000 is out of range 1-65535" in p.stderr
    assert "configuration invalid (1 problems); nothing was applied" in p.stderr
    # fix the port: now the cross-file check speaks
    prof.write_text(text.replace("[70000]", "[3389]"))
    p = run("validate", "-c", str(cfg))
    assert p.returncode == 2
    assert f"xp-line3.yaml:{vlan_line}: vlan: VLAN 250 is a management VLAN (site.yaml management.vlans)" in p.stderr


def test_config_from_environment(tmp_path):
    import os
    env = {**os.environ, "SEGGUARD_CONFIG": str(tmp_path / "nowhere")}
    p = run("validate", env=env)
    assert p.returncode == 2
    assert f"{tmp_path / 'nowhere'}: config directory does not exist" in p.stderr


def test_plan_offline_is_deterministic_and_touches_no_kernel(tmp_path):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"bridges": [{"name": "br0", "addresses": ["10.30.0.1"],
                                              "ports": [{"name": "vnet8", "mac": "fe:54:00:aa:00:02"}]}]}))
    a = run("plan", "-c", str(LAB_CONFIG), "--facts", str(facts), "--json")
    b = run("plan", "-c", str(LAB_CONFIG), "--facts", str(facts), "--json")
    assert a.returncode == 0 and a.stdout == b.stdout
    plan = json.loads(a.stdout)
    assert plan["table"] == "segguard" and plan["stateful"] is False
    assert {x["guest"]: x["source"] for x in plan["bindings"]} == {"xp-line3-hmi": "profile", "scada-line4-srv": "tap-mac"}
    human = run("plan", "-c", str(LAB_CONFIG), "--offline")
    assert "xp-line3-hmi (xp-line3): 52:54:00:aa:00:01 on br0/vnet7 [profile] enforce" in human.stdout
    assert "scada-line4-srv (scada-line4): 52:54:00:aa:00:02 on br0/UNBOUND [unbound] enforce" in human.stdout


def test_verify_without_a_lab_says_how_to_start_one():
    p = run("verify", "-c", str(LAB_CONFIG), "--lab-prefix", "sgnolab-")
    assert p.returncode == 6
    assert "the lab is not up" in p.stderr and "segguard lab up --prefix sgnolab-" in p.stderr


def test_lab_extra_legacy_is_bounded_as_the_topology_is():
    from segguard import cli
    from segguard.lab import topology

    assert cli._MAX_EXTRA == topology.MAX_EXTRA_LEGACY
    p = run("lab", "up", "--prefix", "sgnolab-", "--extra-legacy", str(topology.MAX_EXTRA_LEGACY + 1))
    assert p.returncode == 2 and "--extra-legacy" in p.stderr
