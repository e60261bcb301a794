"""compile.vlan: (config, facts) -> per-bridge VLAN port table, before and after, and the
refusals. Pure; the kernel side is in tests/kernel_lab/test_vlan_layer.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from segguard.apply.bridge import check_vlan_plan
from segguard.audit import audit_vlans, vlan_plan_lines
from segguard.compile import compile_plan
from segguard.config.validate import load_config
from segguard.errors import VlanChangeRefused, VlanLayerMissing
from segguard.host import BridgeFact, HostFacts, PortFact
from segguard.host.vlans import PortVlans, fmt_vids, parse_vids, port_vlans_from_infos

ALL = tuple(range(1, 4095))

PROFILE = """\
name: xp
bridge: br0
vlan: 30
guests:
  - name: xp-hmi
    mac: "52:54:00:aa:00:01"
    port: vnet7
    ipv4: [10.30.0.15]
"""


def site(bridges: str = "", extra: str = "") -> str:
    return ("management: {networks: [10.30.250.0/24], vlans: [250]}\n" + (f"bridges:\n{bridges}" if bridges else "") + extra)


def config(tmp_path: Path, site_text: str, profiles: tuple[str, ...] = (PROFILE,)):
    (tmp_path / "profiles").mkdir(parents=True, exist_ok=True)
    (tmp_path / "site.yaml").write_text(site_text)
    for i, text in enumerate(profiles):
        (tmp_path / "profiles" / f"p{i}.yaml").write_text(text)
    return load_config(tmp_path)


def pv(port, vids, pvid=None, untagged=()):
    return PortVlans(port, tuple(sorted(vids)), pvid, tuple(sorted(untagged)))


def facts(filtering: bool = True, kernel: bool = True, **tables: PortVlans) -> HostFacts:
    """br0 with vnet7 (legacy), vnet9 (another guest), eno1 (uplink), tables given by name."""
    ports = ("vnet7", "vnet9", "eno1")
    default = {"vnet7": pv("vnet7", ALL, 1, (1,)), "vnet9": pv("vnet9", (30, 40), 40, (40,)),
               "eno1": pv("eno1", ALL, 1, (1,)), "br0": pv("br0", (1,), 1, (1,))}
    default.update(tables)
    return HostFacts(bridges=(BridgeFact("br0", ("10.30.0.1",), tuple(PortFact(p, f"52:54:00:00:00:0{i}") for i, p in enumerate(ports)),
                                         vlan_filtering=filtering, vlans=tuple(default[n] for n in sorted(default))),),
                     vlan_filtering=kernel)


def test_legacy_port_trunking_everything_ends_with_exactly_its_vlan(tmp_path):
    plan = compile_plan(config(tmp_path, site()), facts())
    (bv,) = plan.vlans
    row = bv.port("vnet7")
    assert row.role == "legacy" and row.guests == ("xp-hmi",)
    assert row.before.vids == ALL
    assert (row.after.vids, row.after.pvid, row.after.untagged) == ((30,), 30, (30,))
    assert 1 not in row.after.vids  # the default VLAN is gone too
    assert bv.refusals == () and bv.changed


def test_other_ports_and_the_bridge_are_left_as_found(tmp_path):
    f = facts()
    (bv,) = compile_plan(config(tmp_path, site()), f).vlans
    for name in ("vnet9", "br0"):
        row = bv.port(name)
        assert row.before == row.after == f.bridge("br0").port_vlans(name) and not row.changed
    # no uplink named in site.yaml: the uplink is an ordinary port, nothing pruned
    assert not bv.port("eno1").changed and bv.port("eno1").role == "other"


def test_in_sync_bridge_plans_no_change(tmp_path):
    f = facts(vnet7=pv("vnet7", (30,), 30, (30,)))
    (bv,) = compile_plan(config(tmp_path, site()), f).vlans
    assert not bv.changed and not any(p.changed for p in bv.ports)


def test_uplink_is_pruned_to_used_plus_keep_and_that_is_refused_unless_allowed(tmp_path):
    br = "  br0: {uplink: eno1, keep_vlans: [60]}\n"
    plan = compile_plan(config(tmp_path, site(br)), facts())
    (bv,) = plan.vlans
    up = bv.port("eno1")
    # used: 30 (vnet7 after), 30+40 (vnet9), 1 (the bridge itself); kept: 60
    assert up.role == "uplink" and up.after.vids == (1, 30, 40, 60)
    assert up.after.pvid == 1 and up.after.untagged == (1,)   # flags of kept VIDs as found
    (ref,) = bv.blocking
    assert ref.port == "eno1" and "eno1" in ref.message and "2-29" in ref.message and "allow_vlan_removal" in ref.message
    with pytest.raises(VlanChangeRefused) as exc:
        check_vlan_plan(plan)
    assert exc.value.exit_code == 7 and "port eno1 (the uplink) would lose VLAN 2-29,31-39,41-59,61-4094" in str(exc.value)

    allowed = compile_plan(config(tmp_path, site("  br0: {uplink: eno1, keep_vlans: [60], allow_vlan_removal: true}\n")), facts())
    check_vlan_plan(allowed)  # no exception
    assert allowed.vlans[0].refusals and not allowed.vlans[0].blocking


def test_uplink_gains_a_legacy_vlan_it_lacks_without_refusal(tmp_path):
    f = facts(eno1=pv("eno1", (1, 40), 1, (1,)), vnet9=pv("vnet9", (40,), 40, (40,)))
    (bv,) = compile_plan(config(tmp_path, site("  br0: {uplink: eno1}\n")), f).vlans
    assert bv.port("eno1").after.vids == (1, 30, 40) and bv.refusals == ()


def test_turning_filtering_on_names_every_non_legacy_port_and_vlan(tmp_path):
    f = facts(filtering=False, vnet7=pv("vnet7", (1,), 1, (1,)), vnet9=pv("vnet9", (1,), 1, (1,)),
              eno1=pv("eno1", (1,), 1, (1,)))
    plan = compile_plan(config(tmp_path, site("  br0: {}\n")), f)
    (bv,) = plan.vlans
    assert bv.managed and not bv.filtering_before and bv.filtering_after and bv.changed
    refused = {r.port: r for r in bv.blocking}
    assert set(refused) == {"vnet9", "eno1", "br0"}   # not vnet7: a legacy port may lose VLANs
    assert refused["vnet9"].vids == tuple(range(2, 4095))
    assert "port vnet9 (not a legacy guest port) would lose VLAN 2-4094: turning vlan_filtering on for br0 leaves it only 1" \
        in refused["vnet9"].message
    # the legacy VLAN is on no other port: a warning, since the guest would reach nothing
    assert any("VLAN 30 of legacy port vnet7" in w for w in bv.warnings)


def test_unnamed_non_vlan_aware_bridge_is_left_alone(tmp_path):
    f = facts(filtering=False)
    plan = compile_plan(config(tmp_path, site()), f)
    (bv,) = plan.vlans
    assert not bv.managed and not bv.changed and "bridges" in bv.reason
    assert all(not p.changed for p in bv.ports)
    check_vlan_plan(plan)
    required = compile_plan(config(tmp_path, site(extra="vlan_layer_required: true\n")), f)
    with pytest.raises(VlanLayerMissing):
        check_vlan_plan(required)


def test_kernel_without_vlan_filtering_plans_no_vlan_layer(tmp_path):
    plan = compile_plan(config(tmp_path, site()), facts(kernel=False))
    assert plan.vlans == () and "vlans" not in plan.to_dict()
    assert "lacks bridge VLAN filtering" in plan.vlan_layer
    check_vlan_plan(plan)  # warn, not fail
    required = compile_plan(config(tmp_path, site(extra="vlan_layer_required: true\n")), facts(kernel=False))
    with pytest.raises(VlanLayerMissing) as exc:
        check_vlan_plan(required)
    assert exc.value.exit_code == 8 and "lacks bridge VLAN filtering" in str(exc.value)


def test_uplink_that_is_a_legacy_port_is_refused_whatever_the_site_allows(tmp_path):
    plan = compile_plan(config(tmp_path, site("  br0: {uplink: vnet7, allow_vlan_removal: true}\n")), facts())
    (ref,) = plan.vlans[0].blocking
    assert ref.port == "vnet7" and not ref.overridable


def test_management_vlan_never_lands_on_a_legacy_port(tmp_path):
    plan = compile_plan(config(tmp_path, site("  br0: {uplink: eno1, allow_vlan_removal: true}\n")), facts())
    for bv in plan.vlans:
        for p in bv.ports:
            if p.role == "legacy":
                assert 250 not in p.after.vids and p.after.vids == (30,)


def test_native_legacy_vlan_on_uplink_warns_about_double_tagging(tmp_path):
    f = facts(eno1=pv("eno1", (1, 30), 30, (30,)))
    (bv,) = compile_plan(config(tmp_path, site("  br0: {uplink: eno1}\n")), f).vlans
    assert any("untagged" in w and "double-tagged" in w for w in bv.warnings)


def test_plan_json_and_text_show_every_port_before_and_after(tmp_path):
    plan = compile_plan(config(tmp_path, site("  br0: {uplink: eno1, allow_vlan_removal: true}\n")), facts())
    d = json.loads(plan.to_json())["vlans"][0]
    rows = {r["port"]: r for r in d["ports"]}
    assert set(rows) == {"vnet7", "vnet9", "eno1", "br0"}
    assert rows["vnet7"]["before"]["vids"] == "1-4094" and rows["vnet7"]["after"] == {"port": "vnet7", "vids": "30", "pvid": 30, "untagged": "30"}
    text = "\n".join(vlan_plan_lines(plan))
    assert "CHANGE vnet7" in text and "after:  pvid 30, untagged 30" in text
    assert "same   vnet9" in text and "allowed: port eno1 (the uplink) would lose VLAN" in text


def test_facts_round_trip_with_vlans_and_old_facts_still_load():
    f = facts()
    again = HostFacts.from_dict(json.loads(f.to_json()))
    assert again == f
    assert '"vids": "1-4094"' in f.to_json()
    old = HostFacts(bridges=(BridgeFact("br0", (), (PortFact("vnet7", "fe:54:00:aa:00:01"),)),))
    assert "vlans" not in old.to_json() and "vlan_filtering\": null" not in old.to_json()


def test_netlink_vlan_info_folding():
    # compressed dump: 1 pvid+untagged, 2-4094 as a RANGE_BEGIN/RANGE_END pair
    t = port_vlans_from_infos("p", [(0x6, 1), (0x8, 2), (0x10, 4094)])
    assert t.vids == ALL and t.pvid == 1 and t.untagged == (1,)
    t = port_vlans_from_infos("p", [(0x8 | 0x4, 10), (0x10 | 0x4, 12), (0, 20)])
    assert t.vids == (10, 11, 12, 20) and t.untagged == (10, 11, 12) and t.pvid is None
    assert fmt_vids([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8" and parse_vids("1-3,5,7-8") == (1, 2, 3, 5, 7, 8)


def test_audit_lists_trunked_unused_users_and_management_reach(tmp_path):
    cfg = config(tmp_path, site("  br0: {uplink: eno1, keep_vlans: [60]}\n"))
    f = facts(vnet7=pv("vnet7", (30, 250), 30, (30,)), vnet9=pv("vnet9", (30, 250), 30, (30,)),
              eno1=pv("eno1", (1, 30, 40, 60, 250), 1, (1,)))
    plan = compile_plan(cfg, f)
    (b,) = audit_vlans(cfg, f, plan)["bridges"]
    assert b["uplink_vlans"] == "1,30,40,60,250"
    assert b["unused_on_uplink"] == "40"    # 60 is kept on purpose; listed separately
    assert b["kept_but_unused"] == "60"
    users = {v["vlan"]: v["ports"] for v in b["vlans"]}
    assert users[30] == ["vnet7", "vnet9"] and users[1] == ["br0"] and 40 not in users
    reach = {r["port"]: r for r in b["management_reach"]}
    # vnet7 (the legacy guest) carries 250 today, so it reaches it; vnet9 too
    assert set(reach) == {"vnet7", "vnet9"} and reach["vnet7"]["kind"] == "legacy guest"
    assert any("LEGACY GUEST" in n for n in b["notes"])


def test_audit_on_a_kernel_without_filtering_says_every_port_reaches_everything(tmp_path):
    cfg = config(tmp_path, site("  br0: {uplink: eno1}\n"))
    f = facts(kernel=False, filtering=False)
    (b,) = audit_vlans(cfg, f, compile_plan(cfg, f))["bridges"]
    assert {r["port"] for r in b["management_reach"]} == {"vnet7", "vnet9", "br0"}
    assert any("no bridge VLAN filtering" in n for n in b["notes"])
