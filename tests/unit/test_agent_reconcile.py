"""Pure parts of the agent: element deltas, drift kinds, one guest's slice, the hook's
XML handling, installed files."""
from __future__ import annotations

import copy

import pytest

from segguard.agent.hook import decide, domain_macs
from segguard.agent.install import hook_text, unit_text, write_hook
from segguard.agent.reconcile import classify_drift, guest_view
from segguard.apply.incremental import delta_batch, element_delta
from segguard.compile import compile_plan
from segguard.config.validate import load_config
from segguard.errors import SegguardError
from segguard.host import BridgeFact, HostFacts, PortFact
from tests.unit.test_compile import LAB


def facts(*ports: PortFact) -> HostFacts:
    return HostFacts(bridges=(BridgeFact("br0", ("10.30.0.1",), tuple(ports)),))


@pytest.fixture(scope="module")
def config():
    return load_config(LAB)


def test_a_tap_appearing_is_element_additions_only(config):
    before = compile_plan(config, facts())
    after = compile_plan(config, facts(PortFact("vnet8", "fe:54:00:aa:00:02")))
    assert after.binding("scada-line4-srv").port == "vnet8"
    d = element_delta(list(after.nft), list(before.nft))
    assert d is not None and not d.empty
    adds = dict(d.add)
    assert ["vnet8", {"goto": {"target": "gout_inet_dom_allow"}}] in adds["out_dispatch"]
    assert ["vnet8", {"goto": {"target": "gin_inet_dom_allow"}}] in adds["in_dispatch"]
    assert ["vnet8", {"jump": {"target": "nd_scada_line4_srv"}}] in adds["nd_dispatch"]
    assert {"concat": ["52:54:00:aa:00:02", "vnet8"]} in adds["bound_ports"]
    # its profile's policy arrives as elements keyed by its port, nothing else
    assert {"concat": ["vnet8", "10.30.0.20", "tcp", 1433]} in adds["out_open4_x"]
    assert {"concat": ["vnet8", "fd00:30::30", "tcp", 22]} in adds["in_open6_x"]
    assert {"concat": ["vnet8", "52:54:00:aa:00:02", "10.30.0.16"]} in adds["port_src4"]
    assert all(e["concat"][0] == "vnet8" if isinstance(e, dict) and name != "bound_ports" else True
               for name, elems in d.add for e in elems)
    assert not any(e for _, e in d.delete)
    batch = delta_batch("segguard", d)["nftables"]
    verbs = [next(iter(c)) for c in batch[1:]]
    assert "delete" not in verbs or verbs.index("delete") < verbs.index("add")
    assert not any("flush" in c for c in batch), "never flush"
    # and removing it again is the exact inverse
    back = element_delta(list(before.nft), list(after.nft))
    assert dict(back.delete)["out_dispatch"] == ("vnet8",)
    assert element_delta(list(after.nft), list(after.nft)).empty


def test_anything_but_elements_needs_the_full_replace(config):
    plan = compile_plan(config, facts())
    changed = copy.deepcopy(list(plan.nft))
    rule = next(o for o in changed if "rule" in o and o["rule"]["chain"] == "gout_inet_dom_deny")
    rule["rule"]["expr"] = [{"accept": None}]
    assert element_delta(list(plan.nft), changed) is None
    assert element_delta(list(plan.nft), None) is None


def test_drift_is_named_by_kind(config):
    plan = list(compile_plan(config, facts()).nft)
    assert classify_drift(plan, None) == [("table-deleted", "table bridge segguard is gone")]
    assert classify_drift(plan, plan) == []
    no_rule = [o for o in plan if not ("rule" in o and o["rule"]["chain"] == "gout_inet_dom_deny")]
    assert ("rule-changed", "chain gout_inet_dom_deny") in classify_drift(plan, no_rule)
    fewer = copy.deepcopy(plan)
    m = next(o for o in fewer if "map" in o and o["map"]["name"] == "out_dispatch")
    m["map"]["elem"] = m["map"]["elem"][1:]
    assert classify_drift(plan, fewer) == [("elements-changed", "map out_dispatch")]


def test_a_profile_edit_is_element_changes_only(config, tmp_path):
    """Editing a profile's allow rules changes elements keyed by its ports, not rules:
    the agent sends that delta, not the table."""
    import shutil
    shutil.copytree(LAB, tmp_path / "lab")
    prof = tmp_path / "lab" / "profiles" / "xp-line3.yaml"
    prof.write_text(prof.read_text().replace("3389", "3390"))
    ports = facts(PortFact("vnet8", "fe:54:00:aa:00:02"))
    before, after = compile_plan(config, ports), compile_plan(load_config(tmp_path / "lab"), ports)
    d = element_delta(list(after.nft), list(before.nft))
    assert d is not None and not d.empty
    touched = {e["concat"][0] for _, elems in (*d.add, *d.delete) for e in elems}
    assert touched == {"vnet7"}  # xp-line3's guest only
    assert {"concat": ["vnet7", "10.30.0.30", "tcp", 3390]} in dict(d.add)["in_open4_x"]
    assert {"concat": ["vnet7", "10.30.0.30", "tcp", 3389]} in dict(d.delete)["in_open4_x"]


def test_guest_view_ignores_other_guests_elements(config):
    plan = compile_plan(config, facts(PortFact("vnet8", "fe:54:00:aa:00:02")))
    xp = plan.binding("xp-line3-hmi")
    other = compile_plan(config, facts())  # scada unbound: only scada's elements differ
    assert guest_view(list(plan.nft), xp) == guest_view(list(other.nft), xp)
    scada = plan.binding("scada-line4-srv")
    assert guest_view(list(plan.nft), scada) != guest_view(list(other.nft), scada)


def test_domain_macs_and_unguarded_operations():
    xml = "<domain><devices><interface><mac address='52:54:00:AA:00:01'/></interface><disk/></devices></domain>"
    assert domain_macs(xml) == ["52:54:00:aa:00:01"]
    assert decide("stopped", "end", "not xml at all", None).allow
    assert not decide("prepare", "begin", "<domain", None).allow  # unparseable: fail closed


def test_installed_files(tmp_path):
    assert "Before=libvirt-guests.service libvirtd.service virtqemud.service" in unit_text(None, None)
    assert "Type=notify" in unit_text(None, None) and "After=nftables.service" in unit_text(None, None)
    assert "-m segguard.agent.libvirt_hook --config '/etc/sg'" in hook_text(tmp_path.__class__("/etc/sg"))
    foreign = tmp_path / "qemu"
    foreign.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(SegguardError):
        write_hook(foreign, None)
    assert write_hook(foreign, None, force=True).read_text().startswith("#!/bin/sh\n# installed by segguard")
    write_hook(foreign, None)  # ours: replaced without --force


def test_a_binding_from_an_older_state_file_finds_its_chains_in_the_dispatch_maps(config):
    """Bindings written before bind.py recorded their class chains have none: the
    per-guest view then takes them from the dispatch maps, and sees the same policy."""
    import dataclasses

    from segguard.agent.reconcile import _class_chain_names

    plan = compile_plan(config, facts(PortFact("vnet8", "fe:54:00:aa:00:02")))
    scada = plan.binding("scada-line4-srv")
    old = dataclasses.replace(scada, chains=())
    assert scada.chains == ("gout_inet_dom_allow", "gin_inet_dom_allow")
    assert _class_chain_names(list(plan.nft), old) == set(scada.chains)
    assert guest_view(list(plan.nft), old) == guest_view(list(plan.nft), scada)


def test_an_agent_counts_as_running_only_ready_alive_and_segguard(tmp_path, monkeypatch):
    """The libvirt hook refuses a port-less legacy guest unless an agent will bind its
    tap: a state file saying ready, of a process that exists and is segguard's (a pid
    reused by another program since is no agent)."""
    import subprocess
    import sys

    from segguard.agent.hook import agent_running
    from segguard.flow import write_state

    monkeypatch.setenv("SEGGUARD_STATE", str(tmp_path))
    assert not agent_running()  # no state file
    sleep = "import time; time.sleep(60)"
    like = subprocess.Popen([sys.executable, "-c", sleep, "segguard", "agent"])
    other = subprocess.Popen([sys.executable, "-c", sleep, "something-else"])
    try:
        write_state("agent", {"pid": like.pid, "ready": True})
        assert agent_running()
        write_state("agent", {"pid": like.pid, "ready": False})
        assert not agent_running()  # not ready yet (or stopped saying so)
        write_state("agent", {"pid": other.pid, "ready": True})
        assert not agent_running()  # the pid is another program's
    finally:
        for p in (like, other):
            p.kill()
            p.wait()
    write_state("agent", {"pid": like.pid, "ready": True})
    assert not agent_running()  # gone
