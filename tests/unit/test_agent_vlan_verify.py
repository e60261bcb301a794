"""The agent's VLAN layer (drift kinds, incremental writes, restoring vlan_filtering)
against a fake bridge, and its verify rounds and summaries. Pure; the kernel side is
tests/kernel_lab/test_agent_vlan.py and tests/netns/test_agent_verify.py."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from segguard.agent.log import Log
from segguard.agent.verify import VerifyRounds, errored, summarize
from segguard.agent.vlans import VlanLayer, classify_vlan_drift, restore_view
from segguard.apply.bridge import BridgeReport
from segguard.compile import compile_plan
from segguard.config.validate import load_config
from segguard.host import BridgeFact, HostFacts, PortFact
from segguard.host.vlans import PortVlans

SITE = "internal: [10.0.0.0/8]\nbridges:\n  br0: {}\n"
PROFILE = """\
name: newvm
bridge: br0
vlan: 30
guests:
  - {name: newvm-1, mac: "52:54:00:aa:00:09", ipv4: [10.30.0.19]}
"""
TAP, TAP_MAC = "vnet9", "fe:54:00:aa:00:09"
V30 = PortVlans(TAP, (30,), 30, (30,))


class FakeBridge:
    """The kernel side of BridgeApplier: tables, vlan_filtering, knobs; records writes."""

    def __init__(self, tables: dict[str, PortVlans], filtering: bool = True):
        self.tables, self.filtering = dict(tables), filtering
        self.knobs: dict[str, str] = {}
        self.writes: list[list[str]] = []

    def apply(self, plans):
        reports = []
        for bv in plans:
            self.writes.append([p.port for p in bv.ports])
            for p in bv.ports:
                self.tables[p.port] = replace(p.after, port=p.port)
                if p.role == "legacy":
                    self.knobs[f"{p.port}.bpdu_guard"] = "on"
            self.filtering = True
            reports.append(BridgeReport(bv.bridge, True, self.hardening(bv)))
        return reports

    def hardening(self, bv):
        return {k: v for k, v in self.knobs.items() if k.rsplit(".", 1)[0] in {p.port for p in bv.ports if p.role == "legacy"}}

    def live(self, bv):
        return self.filtering, dict(self.tables)

    def facts(self, ports: list[str]) -> HostFacts:
        pf = tuple(PortFact(n, TAP_MAC if n == TAP else "52:54:00:bb:00:20") for n in ports)
        vl = tuple(self.tables.get(n, PortVlans(n)) for n in ports)
        return HostFacts(bridges=(BridgeFact("br0", ("10.30.0.1",), pf, self.filtering, vl),), vlan_filtering=True)


class Drift(list):
    def __call__(self, kind, detail, guests=None):
        self.append((kind, detail, guests))


@pytest.fixture
def config(tmp_path: Path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "site.yaml").write_text(SITE)
    (tmp_path / "profiles" / "newvm.yaml").write_text(PROFILE)
    return load_config(tmp_path)


def _round(layer: VlanLayer, config, fake: FakeBridge, ports: list[str], full: bool = False) -> tuple[list[str], Drift]:
    facts = fake.facts(ports)
    plan = compile_plan(config, facts)
    plan = replace(plan, vlans=restore_view(config, facts, plan.bindings, layer.applied))
    drift = Drift()
    return layer.reconcile(plan, facts, full, frozenset({"test"}), drift), drift


def test_a_tap_bind_writes_that_port_only_and_later_drift_is_named_and_repaired(config):
    app = PortVlans("app0", (30,), 30, (30,))
    fake = FakeBridge({"app0": app})
    layer = VlanLayer(Log(open("/dev/null", "w")), applier=fake)
    _round(layer, config, fake, ["app0"], full=True)
    assert fake.writes == [] and layer.layer == "available"

    fake.tables[TAP] = PortVlans(TAP, (1,), 1, (1,))  # plugged with the default VLAN
    changes, drift = _round(layer, config, fake, ["app0", TAP])
    assert fake.writes == [[TAP]], "only the new port is written"
    assert fake.tables[TAP] == V30 and fake.tables["app0"] == app and not drift
    assert changes == ["br0 port vnet9: pvid 1, untagged 1 -> pvid 30, untagged 30"]
    b = compile_plan(config, fake.facts(["app0", TAP])).binding("newvm-1")
    assert layer.guest(b, 30) == {"vlan": 30, "layer": "in force", "desired": "pvid 30, untagged 30",
                                  "realized": "pvid 30, untagged 30", "in_sync": True}

    fake.tables[TAP] = PortVlans(TAP, (30, 40), 30, (30,))  # `bridge vlan add dev vnet9 vid 40`
    _, drift = _round(layer, config, fake, ["app0", TAP])
    assert drift == [("port-vlan-added", "VLAN 40 added to port vnet9 (legacy: newvm-1)", ["newvm-1"])]
    assert fake.tables[TAP] == V30 and fake.writes[-1] == [TAP]

    fake.tables[TAP] = PortVlans(TAP, (30,), None, (30,))
    _, drift = _round(layer, config, fake, ["app0", TAP])
    assert [d[0] for d in drift] == ["port-vlan-changed"] and fake.tables[TAP] == V30

    # a knob we set, off again: found on the full check, that port re-hardened
    fake.knobs[f"{TAP}.bpdu_guard"] = "off (IFLA_BRPORT_GUARD=0)"
    _, drift = _round(layer, config, fake, ["app0", TAP])
    assert drift == [], "knobs are read back on full checks only"
    _, drift = _round(layer, config, fake, ["app0", TAP], full=True)
    assert drift == [("port-knob-changed", "vnet9.bpdu_guard turned off (IFLA_BRPORT_GUARD=0)", ["newvm-1"])]
    assert fake.knobs[f"{TAP}.bpdu_guard"] == "on" and fake.writes[-1] == [TAP]


def test_vlan_filtering_turned_off_is_restored_without_a_refusal(config):
    app = PortVlans("app0", (30,), 30, (30,))
    fake = FakeBridge({"app0": app, TAP: V30})
    layer = VlanLayer(Log(open("/dev/null", "w")), applier=fake)
    _round(layer, config, fake, ["app0", TAP], full=True)
    fake.filtering = False
    facts = fake.facts(["app0", TAP])
    # what the compiler alone says: turning it on re-cuts app0, a refusal
    assert compile_plan(config, facts).vlans[0].blocking
    changes, drift = _round(layer, config, fake, ["app0", TAP])
    assert [d[0] for d in drift] == ["vlan-filtering-off"] and drift[0][1] == "bridge br0: vlan_filtering turned off"
    assert fake.filtering and "br0: vlan_filtering on" in changes
    assert fake.tables == {"app0": app, TAP: V30}
    assert layer.state["br0"]["result"] == "in sync"


def test_other_ports_are_never_judged(config):
    applied = {}
    fake = FakeBridge({"app0": PortVlans("app0", (30,), 30, (30,)), TAP: V30})
    layer = VlanLayer(Log(open("/dev/null", "w")), applier=fake)
    _round(layer, config, fake, ["app0", TAP], full=True)
    applied = layer.applied
    fake.tables["app0"] = PortVlans("app0", (30, 77), 30, (30,))
    assert classify_vlan_drift(applied, fake.facts(["app0", TAP])) == []


def test_no_vlan_layer_on_this_kernel_is_said_and_nothing_written(config):
    fake = FakeBridge({})
    layer = VlanLayer(Log(open("/dev/null", "w")), applier=fake)
    facts = HostFacts(bridges=(BridgeFact("br0", (), (PortFact(TAP, TAP_MAC),)),), vlan_filtering=False)
    plan = compile_plan(config, facts)
    assert layer.reconcile(plan, facts, True, frozenset({"start"}), Drift()) == []
    assert layer.layer.startswith("missing: this kernel lacks bridge VLAN filtering") and fake.writes == []
    assert layer.guest(plan.binding("newvm-1"), 30)["layer"] == layer.layer


def test_verify_rounds_one_guest_per_pass_and_never_doubled():
    ran: list[str] = []
    r = VerifyRounds(ran.append, lambda: ["a", "b"], 10.0)
    r.start(100.0)
    assert r.deadline() == 110.0 and not r.maybe_run(105.0)
    assert r.maybe_run(110.0) and ran == ["a"] and r.deadline() == 0.0   # the rest is due at once
    assert r.maybe_run(111.0) and ran == ["a", "b"] and r.deadline() == 120.0
    # a round that ran long: the next starts when it is done, not twice
    assert r.maybe_run(145.0) and r.maybe_run(146.0) and ran == ["a", "b", "a", "b"]
    assert r.deadline() == 150.0 and r.rounds == 2
    off = VerifyRounds(ran.append, lambda: ["a"], 0)
    off.start(0.0)
    assert off.deadline() is None and not off.maybe_run(1e9)


def test_verify_summary_counts_and_names_failures():
    rows = [{"id": "g/default/udp4", "pass": True}, {"id": "g/egress/0/tcp4", "pass": False, "why": "the allowed flow did not arrive"}]
    s = summarize(rows, 1.0, 2.5)
    assert (s["ok"], s["passed"], s["failed"], s["failing"]) == (False, 1, 1, ["g/egress/0/tcp4"])
    assert s["problems"] == ["g/egress/0/tcp4: the allowed flow did not arrive"]
    assert summarize([], 1.0, 0.1)["ok"] is False, "a run with no expectation proves nothing"
    e = errored(RuntimeError("no bridge"), 1.0, 0.2)
    assert not e["ok"] and "no bridge" in e["error"]
