"""compile_plan(config, HostFacts) -> Plan is pure: these tests assert the structure of
the nftables objects it produces, never timing and never a kernel."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from segguard.compile import compile_plan
from segguard.config.validate import load_config
from segguard.host import BridgeFact, HostFacts, PortFact
from segguard.plan import Plan

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "profiles" / "lab"
BASE_CHAINS = ("prerouting", "input", "forward", "output")

SITE = """\
domain_controllers: [10.30.0.10]
management: {networks: [10.30.250.0/24], vlans: [250]}
groups:
  db: [10.30.0.20, fd00:30::20]
  jump: [10.30.0.30]
"""


def lab_facts(**kw) -> HostFacts:
    return HostFacts(bridges=(BridgeFact("br0", ("10.30.0.1", "fd00:30::1"), (
        PortFact("vnet7", "fe:54:00:aa:00:01"), PortFact("vnet8", "fe:54:00:aa:00:02"),
        PortFact("vnet9", "52:54:00:bb:00:99"))),), **kw)


def write_config(root: Path, profiles: dict[str, str], site: str = SITE) -> Path:
    (root / "profiles").mkdir(parents=True, exist_ok=True)
    (root / "site.yaml").write_text(site)
    for name, text in profiles.items():
        (root / "profiles" / f"{name}.yaml").write_text(text)
    return root


def profile(name: str, guests: list[dict], mode: str = "enforce", default: str = "deny",
            egress: str = "  - {to: db, proto: tcp, ports: [1433]}\n",
            ingress: str = "  - {from: jump, proto: tcp, ports: [3389]}\n") -> str:
    lines = [f"name: {name}", "bridge: br0", "vlan: 30", "guests:"]
    for g in guests:
        lines.append(f"  - name: {g['name']}")
        lines.append(f"    mac: \"{g['mac']}\"")
        if g.get("port"):
            lines.append(f"    port: {g['port']}")
        lines.append(f"    ipv4: {json.dumps(g.get('ipv4', []))}")
        lines.append(f"    ipv6: {json.dumps(g.get('ipv6', []))}")
    lines += [f"mode: {mode}", f"default: {default}", "egress:\n" + egress if egress else "egress: []\n",
              "ingress:\n" + ingress if ingress else "ingress: []\n"]
    return "\n".join(lines)


def guest(i: int, port: bool = True, v6: bool = False) -> dict:
    g = {"name": f"g{i}", "mac": f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", "ipv4": [f"10.30.1.{i}"]}
    if port:
        g["port"] = f"vnet{i}"
    if v6:
        g["ipv6"] = [f"fd00:30::1:{i:x}"]
    return g


# ------------------------------------------------------------------- plan helpers
def objs(plan: Plan, kind: str) -> list[dict]:
    return [o[kind] for o in plan.nft if kind in o]


def rules(plan: Plan, chain: str) -> list[dict]:
    return [r for r in objs(plan, "rule") if r["chain"] == chain]


def walk(plan: Plan, chain: str) -> list[dict]:
    """The rules of `chain` in the order a frame meets them: an unconditional `jump` to
    a shared chain is replaced by that chain's rules (a chain ending without a verdict
    returns to the rule after the jump), so ordering guarantees are asserted on what
    the kernel evaluates, not on how the table happens to be factored."""
    out = []
    for r in rules(plan, chain):
        if len(r["expr"]) == 1 and "jump" in r["expr"][0]:
            out += walk(plan, r["expr"][0]["jump"]["target"])
        else:
            out.append(r)
    return out


def named(plan: Plan, kind: str, name: str) -> dict:
    (found,) = [o for o in objs(plan, kind) if o["name"] == name]
    return found


def elems(plan: Plan, kind: str, name: str) -> list:
    return named(plan, kind, name).get("elem", [])


def has_expr(rule: dict, key: str) -> bool:
    return any(key in e for e in rule["expr"])


def has_any_drop(plan: Plan) -> bool:
    """Whether a frame of the profile chains can reach a drop (netdev/base chains aside)."""
    reach, todo = set(), [c["name"] for c in objs(plan, "chain") if c["name"].startswith(("pout_", "pin_", "out_", "nd_"))]
    while todo:
        c = todo.pop()
        if c in reach:
            continue
        reach.add(c)
        for r in rules(plan, c):
            for e in r["expr"]:
                for k in ("jump", "goto"):
                    if k in e:
                        todo.append(e[k]["target"])
    return any(has_expr(r, "drop") for c in reach for r in rules(plan, c))


def uses_ct(rule: dict) -> bool:
    return "'ct'" in repr(rule["expr"])


# ------------------------------------------------------------------- determinism
def test_same_input_twice_gives_identical_json():
    cfg = load_config(LAB)
    a, b = compile_plan(cfg, lab_facts()), compile_plan(load_config(LAB), lab_facts())
    assert a.to_json() == b.to_json()
    assert a == b


def test_profile_file_names_and_order_do_not_matter(tmp_path):
    copy = tmp_path / "renamed"
    (copy / "profiles").mkdir(parents=True)
    shutil.copy(LAB / "site.yaml", copy / "site.yaml")
    # reverse the sort order of the two files
    shutil.copy(LAB / "profiles" / "xp-line3.yaml", copy / "profiles" / "a-first.yaml")
    shutil.copy(LAB / "profiles" / "scada-line4.yaml", copy / "profiles" / "z-last.yml")
    orig, renamed = load_config(LAB), load_config(copy)
    assert [p.name for p in orig.profiles] != [p.name for p in renamed.profiles]
    assert compile_plan(orig, lab_facts()).to_json() == compile_plan(renamed, lab_facts()).to_json()


def test_facts_order_does_not_matter():
    f1 = lab_facts(libvirt_ports=(("52:54:00:aa:00:02", "vnet8"), ("52:54:00:cc:00:01", "vnet3")))
    f2 = HostFacts(bridges=(BridgeFact("br0", ("fd00:30::1", "10.30.0.1"), tuple(reversed(f1.bridges[0].ports))),),
                   libvirt_ports=tuple(reversed(f1.libvirt_ports)))
    cfg = load_config(LAB)
    assert compile_plan(cfg, f1).to_json() == compile_plan(cfg, f2).to_json()


def test_facts_json_round_trip_compiles_the_same():
    facts = lab_facts(libvirt_ports=(("52:54:00:aa:00:02", "vnet8"),), bridge_conntrack=True)
    again = HostFacts.from_dict(json.loads(facts.to_json()))
    assert again == facts
    cfg = load_config(LAB)
    assert compile_plan(cfg, again).to_json() == compile_plan(cfg, facts).to_json()


def test_plan_is_valid_json_and_starts_with_the_table():
    plan = compile_plan(load_config(LAB), lab_facts())
    data = json.loads(plan.to_json())
    assert data["table"] == "segguard"
    assert plan.nft[0] == {"table": {"family": "bridge", "name": "segguard"}}
    kinds = [next(iter(o)) for o in plan.nft]
    rank = {"table": 0, "set": 1, "chain": 2, "map": 3, "rule": 4}
    assert kinds == sorted(kinds, key=rank.__getitem__), "objects must be created before use"


# ------------------------------------------------------------ dispatch by verdict map
@pytest.mark.parametrize("layout", ["one-profile", "profile-per-guest"])
def test_base_chains_do_not_grow_with_guests(tmp_path, layout):
    def compiled(n: int) -> Plan:
        gs = [guest(i) for i in range(1, n + 1)]
        if layout == "one-profile":
            profs = {"p": profile("p", gs)}
        else:
            profs = {f"p{g['name']}": profile(f"p{g['name']}", [g]) for g in gs}
        return compile_plan(load_config(write_config(tmp_path / f"{layout}{n}", profs)), HostFacts())

    one, fifty = compiled(1), compiled(50)
    counts = lambda p: {c: len(rules(p, c)) for c in BASE_CHAINS}  # noqa: E731
    assert counts(one) == counts(fifty) == {"prerouting": 3, "input": 3, "forward": 1, "output": 1}
    # the per-packet path is one vmap lookup per hook; the guests live in the maps and sets
    for p, n in ((one, 1), (fifty, 50)):
        assert len(elems(p, "map", "out_dispatch")) == len(elems(p, "map", "in_dispatch")) == n
        assert len(elems(p, "set", "legacy_macs")) == len(elems(p, "set", "bound_ports")) == n
        for c in BASE_CHAINS:
            assert sum(has_expr(r, "vmap") for r in rules(p, c)) == 1
    # base-chain rules are literally the same (no guest value inlined)
    assert [r for r in objs(fifty, "rule") if r["chain"] in BASE_CHAINS] == \
        [r for r in objs(one, "rule") if r["chain"] in BASE_CHAINS]


def test_dispatch_maps_point_at_guest_and_profile_chains(tmp_path):
    cfg = load_config(LAB)
    plan = compile_plan(cfg, lab_facts())
    assert elems(plan, "map", "out_dispatch") == [
        ["vnet7", {"goto": {"target": "out_xp_line3_hmi"}}], ["vnet8", {"goto": {"target": "out_scada_line4_srv"}}]]
    assert elems(plan, "map", "in_dispatch") == [
        ["vnet7", {"goto": {"target": "pin_xp_line3"}}], ["vnet8", {"goto": {"target": "pin_scada_line4"}}]]
    chains = {c["name"] for c in objs(plan, "chain")}
    for _, verdict in elems(plan, "map", "out_dispatch") + elems(plan, "map", "in_dispatch"):
        assert verdict["goto"]["target"] in chains
    # every guest chain ends by handing over to its profile's chain
    assert rules(plan, "out_xp_line3_hmi")[-1]["expr"] == [{"goto": {"target": "pout_xp_line3"}}]
    assert rules(plan, "prerouting")[-1]["expr"] == [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@out_dispatch"}}]
    assert rules(plan, "forward")[-1]["expr"] == [{"vmap": {"key": {"meta": {"key": "oifname"}}, "data": "@in_dispatch"}}]


def test_hooked_chains_are_only_the_base_chains():
    plan = compile_plan(load_config(LAB), lab_facts())
    bridge = [c for c in objs(plan, "chain") if "hook" in c and c["family"] == "bridge"]
    assert {c["name"]: (c["hook"], c["prio"], c["policy"]) for c in bridge} == {h: (h, -190, "accept") for h in BASE_CHAINS}


def test_existing_legacy_ports_get_a_netdev_ingress_chain_before_the_bridge():
    """LLDP (and BPDUs with STP on) skip every bridge hook; the port's own ingress hook
    sees them. Only ports present on the host get one: a chain needs its device."""
    plan = compile_plan(load_config(LAB), lab_facts())
    netdev = [c for c in objs(plan, "chain") if c["family"] == "netdev"]
    present = {p.name for b in lab_facts().bridges for p in b.ports}
    bound = {b.port for b in plan.bindings if b.port}
    assert {c["dev"] for c in netdev} == bound & present
    assert all(c["hook"] == "ingress" and c["prio"] == -500 and c["policy"] == "accept" for c in netdev)
    rules = {c["name"]: [r for r in objs(plan, "rule") if r["family"] == "netdev" and r["chain"] == c["name"]] for c in netdev}
    assert all(len(r) == 2 and all(x["expr"][-1] == {"drop": None} for x in r) for r in rules.values())
    assert all(c["dev"] in present for c in netdev), "no chain for a port that does not exist"


# ----------------------------------------------------------------------- binding
BINDING_FACTS = HostFacts(
    bridges=(BridgeFact("br0", ("10.30.0.1",), (
        PortFact("vnet1", "fe:54:00:00:00:99"), PortFact("vnet2", "fe:54:00:00:00:02"),
        PortFact("vnet3", "fe:54:00:00:00:03"), PortFact("vnet5", "fe:54:00:00:00:05"))),),
    libvirt_ports=(("52:54:00:00:00:02", "vnet2"), ("52:54:00:00:00:05", "vnet50")),
)


@pytest.fixture
def bound_plan(tmp_path) -> Plan:
    gs = [guest(1), guest(2, port=False), guest(3, port=False), guest(4, port=False),
          guest(5, port=False), {**guest(6), "port": "vnet5"}]
    # g5: libvirt says vnet50 even though vnet5 carries its tap MAC -> libvirt wins
    # g6: explicit port vnet5 (on the bridge); g1: explicit port vnet1 (on the bridge, no warning)
    return compile_plan(load_config(write_config(tmp_path, {"p": profile("p", gs)})), BINDING_FACTS)


def test_binding_sources(bound_plan):
    got = {b.guest: (b.port, b.source) for b in bound_plan.bindings}
    assert got == {
        "g1": ("vnet1", "profile"),
        "g2": ("vnet2", "libvirt"),
        "g3": ("vnet3", "tap-mac"),
        "g4": (None, "unbound"),
        "g5": ("vnet50", "libvirt"),
        "g6": ("vnet5", "profile"),
    }


def test_explicit_port_beats_libvirt(tmp_path):
    facts = HostFacts(libvirt_ports=(("52:54:00:00:00:01", "vnet99"),))
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [guest(1)])})), facts)
    assert (plan.bindings[0].port, plan.bindings[0].source) == ("vnet1", "profile")


def test_unbound_guest_warns_and_is_dropped_everywhere(bound_plan):
    assert bound_plan.warnings == (
        "guest g4: no port found (set guests[].port, or start it under libvirt); its MAC 52:54:00:00:00:04 "
        "is dropped on every port until bound",
        "guest g5: port vnet50 is not on bridge br0 now (rules keyed on it take effect when it appears)",
    )
    assert "52:54:00:00:00:04" in elems(bound_plan, "set", "legacy_macs")
    assert sorted(elems(bound_plan, "set", "legacy_macs")) == [f"52:54:00:00:00:0{i}" for i in range(1, 7)]
    bound = [e["concat"] for e in elems(bound_plan, "set", "bound_ports")]
    assert bound == [["52:54:00:00:00:01", "vnet1"], ["52:54:00:00:00:02", "vnet2"], ["52:54:00:00:00:03", "vnet3"],
                     ["52:54:00:00:00:05", "vnet50"], ["52:54:00:00:00:06", "vnet5"]]
    assert all(mac != "52:54:00:00:00:04" for mac, _ in bound)
    assert "'g4'" not in repr(elems(bound_plan, "map", "out_dispatch"))
    # the first rule of prerouting drops a legacy MAC not on its bound port
    first = rules(bound_plan, "prerouting")[0]
    assert first["expr"][0]["match"]["right"] == "@legacy_macs"
    assert first["expr"][1]["match"] == {"op": "!=", "left": {"concat": [
        {"payload": {"protocol": "ether", "field": "saddr"}}, {"meta": {"key": "iifname"}}]}, "right": "@bound_ports"}
    assert first["expr"][-1] == {"drop": None}


def test_ambiguous_tap_mac_leaves_guest_unbound(tmp_path):
    facts = HostFacts(bridges=(BridgeFact("br0", (), (PortFact("vnetA", "fe:54:00:00:00:01"), PortFact("vnetB", "fe:54:00:00:00:01"))),))
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [guest(1, port=False)])})), facts)
    assert (plan.bindings[0].port, plan.bindings[0].source) == (None, "unbound")
    assert plan.warnings[0] == ("guest g1: ports vnetA, vnetB all carry tap MAC fe:54:00:00:00:01; "
                                "left unbound (its MAC is dropped everywhere)")


def test_missing_bridge_warns(tmp_path):
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [guest(1)])})), HostFacts())
    assert plan.warnings == ("guest g1: bridge br0 does not exist on this host (rules are loaded anyway and apply once it does)",)


# ---------------------------------------------------------------- stateful or not
def test_stateful_uses_ct_state_and_no_reply_rules():
    plan = compile_plan(load_config(LAB), lab_facts(bridge_conntrack=True))
    assert plan.stateful is True
    all_rules = objs(plan, "rule")
    assert not [r for r in all_rules if r.get("comment", "").startswith("reply:")]
    ct = [r for r in all_rules if uses_ct(r)]
    assert ct
    for chain in ("pout_xp_line3", "pin_xp_line3"):
        exprs = [r["expr"] for r in walk(plan, chain)]
        assert [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}, {"counter": None}, {"drop": None}] in exprs
        assert [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": None}] in exprs
    # every allow rule of the profile matches only new flows
    allow = [r for r in all_rules if r.get("comment", "").startswith(("egress[", "ingress["))]
    assert allow and all({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}} in r["expr"] for r in allow)


def test_stateless_uses_reply_rules_and_no_ct():
    plan = compile_plan(load_config(LAB), lab_facts(bridge_conntrack=False))
    assert plan.stateful is False
    all_rules = objs(plan, "rule")
    assert not [r for r in all_rules if uses_ct(r)]
    replies = sorted({(r["chain"], r["comment"]) for r in all_rules if r.get("comment", "").startswith("reply:")})
    assert replies == [
        ("pin_scada_line4", "reply: egress[0] to historian_db tcp/1433"),
        ("pin_scada_line4", "reply: egress[1] to historian_db udp/514"),
        ("pin_scada_line4", "reply: egress[2] to historian_db icmp"),
        ("pin_xp_line3", "reply: egress[0] to historian_db tcp/1433"),
        ("pout_scada_line4", "reply: ingress[0] from jump_hosts tcp/22,3389"),
        ("pout_scada_line4", "reply: ingress[1] from jump_hosts icmp"),
        ("pout_xp_line3", "reply: ingress[0] from jump_hosts tcp/3389"),
    ]
    # a TCP reply must carry ACK (a bare SYN from the service port is not a reply)
    tcp_reply = next(r for r in rules(plan, "pin_xp_line3") if r.get("comment") == "reply: egress[0] to historian_db tcp/1433")
    assert {"match": {"op": "==", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, "ack"]}, "right": "ack"}} in tcp_reply["expr"]
    assert {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "sport"}}, "right": 1433}} in tcp_reply["expr"]


# -------------------------------------------------------------------------- audit
def test_audit_mode_logs_and_accepts_instead_of_dropping(tmp_path):
    gs = [guest(1, v6=True)]
    enforce = compile_plan(load_config(write_config(tmp_path / "e", {"p": profile("p", gs)})), HostFacts())
    audit = compile_plan(load_config(write_config(tmp_path / "a", {"p": profile("p", gs, mode="audit")})), HostFacts())
    own = ("pout_p", "pin_p", "out_g1", "nd_g1")
    e_rules = [r for c in own for r in walk(enforce, c)]
    a_rules = [r for c in own for r in walk(audit, c)]
    assert len(e_rules) == len(a_rules)
    # no audit profile shares a chain with enforcing ones: every drop it could reach
    # is in a chain of its own
    assert not has_any_drop(audit)
    dropped = 0
    for e, a in zip(e_rules, a_rules):
        a, e = {**a, "chain": None}, {**e, "chain": None}
        assert not has_expr(a, "drop"), a
        if e["expr"][-2:] == [{"counter": None}, {"drop": None}]:
            dropped += 1
            assert a["expr"][:-3] == e["expr"][:-2]
            assert a["expr"][-3] == {"counter": None}
            assert a["expr"][-2]["log"]["prefix"].startswith("segguard audit p ")
            assert a["expr"][-1] == {"accept": None}
        else:
            assert a == e
    assert dropped > 20
    # the MAC moves from legacy_macs (dropped on foreign ports) to audit_macs (logged)
    assert elems(audit, "set", "legacy_macs") == [] and elems(audit, "set", "audit_macs") == ["52:54:00:00:00:01"]
    assert elems(enforce, "set", "audit_macs") == [] and elems(enforce, "set", "legacy_macs") == ["52:54:00:00:00:01"]
    audit_pre = rules(audit, "prerouting")[1]
    assert audit_pre["expr"][0]["match"]["right"] == "@audit_macs" and not has_expr(audit_pre, "drop")
    assert audit.bindings[0].mode == "audit"


def test_audit_log_prefix_names_the_reason(tmp_path):
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [guest(1)], mode="audit")})), HostFacts())
    last = rules(plan, "pout_p")[-1]
    assert last["expr"] == [{"counter": None}, {"log": {"prefix": "segguard audit p default-deny: "}}, {"accept": None}]


# ------------------------------------------------------------------ host addresses
def test_bridge_addresses_join_the_hypervisor_sets(tmp_path):
    facts = HostFacts(bridges=(
        BridgeFact("br0", ("10.30.0.1", "fd00:30::1", "fe80::1"), ()),
        BridgeFact("br9", ("192.168.9.1",), ()),  # no profile names br9
    ))
    site = SITE + "hypervisor: [10.30.0.2]\n"
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [guest(1)])}, site)), facts)
    assert elems(plan, "set", "hyp4") == ["10.30.0.1", "10.30.0.2"]  # site.yaml + discovered
    assert elems(plan, "set", "hyp6") == ["fd00:30::1", "fe80::1"]
    assert named(plan, "set", "hyp4")["flags"] == ["interval"]


def test_bridge_addresses_without_site_hypervisor(tmp_path):
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [guest(1)])})), lab_facts())
    assert elems(plan, "set", "hyp4") == ["10.30.0.1"]
    assert elems(plan, "set", "hyp6") == ["fd00:30::1"]


def test_no_guarded_bridge_means_no_discovered_hypervisor_addresses(tmp_path):
    plan = compile_plan(load_config(write_config(tmp_path, {})), lab_facts())
    assert elems(plan, "set", "hyp4") == [] and elems(plan, "set", "hyp6") == []


# ------------------------------------------------------------------- guest chains
def test_guest_without_ipv6_whitelists_no_ip6(tmp_path):
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [guest(1), guest(2, v6=True)])})), HostFacts())
    g1, g2 = rules(plan, "out_g1"), rules(plan, "out_g2")
    assert g1[1]["expr"][0] == {"match": {"op": "!=", "left": {"payload": {"protocol": "ether", "field": "type"}}, "right": "@ethertypes_ip_arp"}}
    assert g1[2]["expr"][0] == {"match": {"op": "!=", "left": {"meta": {"key": "protocol"}}, "right": "@ethertypes_ip_arp"}}
    assert elems(plan, "set", "ethertypes_ip_arp") == ["ip", "arp"]
    assert g2[1]["expr"][0]["match"]["right"] == "@ethertypes_ip_arp_ip6"
    assert elems(plan, "set", "ethertypes_ip_arp_ip6") == ["ip", "arp", "ip6"]
    assert "ip6" not in repr([r["expr"] for r in g1])
    chains = {c["name"] for c in objs(plan, "chain")}
    assert "nd_g2" in chains and "nd_g1" not in chains


def test_rules_carry_no_anonymous_sets():
    """libnftables 1.0 allocates anonymous sets in quadratic time (100 guests: 18 s);
    every multi-value match goes through a named set instead."""
    plan = compile_plan(load_config(LAB), replace(lab_facts(), bridge_conntrack=False))
    assert '"set": [' not in json.dumps([r["expr"] for r in objs(plan, "rule")])


def test_ipv6_only_guest_gets_no_arp(tmp_path):
    g = {"name": "g1", "mac": "52:54:00:00:00:01", "port": "vnet1", "ipv6": ["fd00:30::1:1"]}
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [g])})), HostFacts())
    assert rules(plan, "out_g1")[1]["expr"][0]["match"]["right"] == "ip6"
    assert "arp" not in repr([r["expr"] for r in rules(plan, "out_g1")])


def test_guest_without_addresses_may_send_nothing(tmp_path):
    g = {"name": "g1", "mac": "52:54:00:00:00:01", "port": "vnet1"}
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [g])})), HostFacts())
    assert [r["expr"] for r in rules(plan, "out_g1")] == [
        [{"match": {"op": "!=", "left": {"payload": {"protocol": "ether", "field": "saddr"}}, "right": "52:54:00:00:00:01"}},
         {"counter": None}, {"drop": None}],
        [{"counter": None}, {"drop": None}],
    ]


def test_guest_chain_starts_with_source_mac_check():
    plan = compile_plan(load_config(LAB), lab_facts())
    first = rules(plan, "out_scada_line4_srv")[0]
    assert first["expr"] == [
        {"match": {"op": "!=", "left": {"payload": {"protocol": "ether", "field": "saddr"}}, "right": "52:54:00:aa:00:02"}},
        {"counter": None}, {"drop": None}]


# -------------------------------------------------------------------- guard rails
ALLOW_PREFIXES = ("egress[", "ingress[", "reply:", "fragments:", "icmp errors:", "default:")


@pytest.mark.parametrize("conntrack", [False, True])
def test_guard_rails_come_before_every_allow_rule(conntrack):
    plan = compile_plan(load_config(LAB), lab_facts(bridge_conntrack=conntrack))
    chains = [c["name"] for c in objs(plan, "chain") if c["name"].startswith(("pout_", "pin_"))]
    assert len(chains) == 4
    for chain in chains:
        rs = walk(plan, chain)
        comments = [r.get("comment", "") for r in rs]
        rails = [i for i, c in enumerate(comments) if c.startswith("guard rail:")]
        # mgmt, hypervisor, DC (block.domain) and internet (block.internet), v4 and v6
        assert len(rails) == 8, chain
        allows = [i for i, r in enumerate(rs) if comments[i].startswith(ALLOW_PREFIXES)
                  or (r["expr"][-1] == {"accept": None} and uses_ct(r))]
        assert allows, chain
        assert max(rails) < min(allows), (chain, comments)
        # the rails drop, always
        for i in rails:
            assert rs[i]["expr"][-2:] == [{"counter": None}, {"drop": None}]


def test_guard_rails_follow_block_settings(tmp_path):
    prof = profile("p", [guest(1)]) + "block: {internet: false, domain: false}\n"
    plan = compile_plan(load_config(write_config(tmp_path, {"p": prof})), HostFacts())
    rails = [r["comment"] for r in walk(plan, "pout_p") if r.get("comment", "").startswith("guard rail:")]
    assert rails == ["guard rail: management"] * 2 + ["guard rail: hypervisor"] * 2
    assert not [r for r in walk(plan, "pout_p") if r.get("comment") == "AD protocol ports (block.domain)"]


def test_guard_rail_sets_carry_site_addresses():
    plan = compile_plan(load_config(LAB), lab_facts())
    assert elems(plan, "set", "mgmt4") == [{"prefix": {"addr": "10.30.250.0", "len": 24}}]
    assert elems(plan, "set", "mgmt6") == [{"prefix": {"addr": "fd00:250::", "len": 64}}]
    assert elems(plan, "set", "dc4") == ["10.30.0.10"] and elems(plan, "set", "dc6") == ["fd00:30::10"]
    assert elems(plan, "set", "internal6") == [{"prefix": {"addr": "fd00::", "len": 8}}]
    rail = next(r for r in walk(plan, "pout_xp_line3") if r.get("comment") == "guard rail: internet (not in site.internal)")
    assert rail["expr"][0] == {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@internal4"}}


def test_default_deny_and_allow_end_the_profile_chains():
    plan = compile_plan(load_config(LAB), lab_facts())
    assert rules(plan, "pout_xp_line3")[-1] == {**rules(plan, "pout_xp_line3")[-1], "comment": "default: deny",
                                                "expr": [{"counter": None}, {"drop": None}]}
    assert rules(plan, "pin_scada_line4")[-1]["comment"] == "default: allow"
    assert rules(plan, "pin_scada_line4")[-1]["expr"] == [{"accept": None}]


def test_allow_rule_matches_peer_set_and_port():
    plan = compile_plan(load_config(LAB), lab_facts())
    r = [r for r in rules(plan, "pin_scada_line4") if r.get("comment") == "ingress[0] from jump_hosts tcp/22,3389"]
    assert len(r) == 2
    v4, v6 = (x["expr"][0]["match"]["right"] for x in r)
    ports = r[0]["expr"][1]["match"]["right"]
    assert [x["expr"] for x in r] == [
        [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": v4}},
         {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": ports}},
         {"accept": None}],
        [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": v6}},
         {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": ports}},
         {"accept": None}],
    ]
    assert elems(plan, "set", v4[1:]) == ["10.30.0.30"] and named(plan, "set", v4[1:])["type"] == "ipv4_addr"
    assert elems(plan, "set", v6[1:]) == ["fd00:30::30"]
    assert elems(plan, "set", ports[1:]) == [22, 3389]


def test_two_guests_never_share_a_dispatch_key(tmp_path):
    """Explicit port of one == libvirt port of another: both unbound, warned, fail closed."""
    gs = [{**guest(1), "port": "vnet5"}, guest(2, port=False)]
    facts = HostFacts(libvirt_ports=(("52:54:00:00:00:02", "vnet5"),))
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", gs)})), facts)
    keys = [k for k, _ in elems(plan, "map", "out_dispatch")]
    assert len(keys) == len(set(keys)), keys
    assert "vnet5" not in keys
    assert all(b.port is None and b.source == "unbound" for b in plan.bindings)
    assert sum("also claimed by" in w for w in plan.warnings) == 2


def test_reply_mode_is_read_from_the_rules_themselves():
    from segguard.apply.nftables import uses_conntrack

    stateless = compile_plan(load_config(LAB), lab_facts())
    stateful = compile_plan(load_config(LAB), replace(lab_facts(), bridge_conntrack=True))
    assert uses_conntrack(list(stateful.nft)) and not uses_conntrack(list(stateless.nft))


# ------------------------------------------------------------------ shared chains
def test_ad_port_guard_sits_between_egress_allows_and_stateless_replies():
    plan = compile_plan(load_config(LAB), lab_facts(bridge_conntrack=False))
    for chain in ("pout_xp_line3", "pout_scada_line4"):
        comments = [r.get("comment", "") for r in walk(plan, chain)]
        ad = comments.index("AD protocol ports (block.domain)")
        egress = [i for i, c in enumerate(comments) if c.startswith("egress[")]
        replies = [i for i, c in enumerate(comments) if c.startswith(("reply:", "icmp errors:"))]
        assert egress and replies, chain
        assert max(egress) < ad < min(replies), (chain, comments)
        assert ad < comments.index("only TCP, UDP and ICMP (no GRE, IPIP, 6in4, ESP, SCTP...)") < min(replies)
        assert comments[-1].startswith("default:")


def test_profile_independent_rules_exist_once_per_block_combination(tmp_path):
    blocks = {"a": "{internet: true, domain: true}", "b": "{internet: true, domain: true}",
              "c": "{internet: false, domain: true}", "d": "{internet: false, domain: false}"}
    profs = {n: profile(n, [guest(i + 1)]) + f"block: {b}\n" for i, (n, b) in enumerate(blocks.items())}
    profs["e"] = profile("e", [guest(9)], mode="audit") + "block: {internet: true, domain: true}\n"
    plan = compile_plan(load_config(write_config(tmp_path, profs)), HostFacts())
    rails = [r for r in objs(plan, "rule") if r.get("comment", "").startswith("guard rail:")]
    # a and b share one copy; c, d one each; the audit profile e its own: 4 out + 4 in chains
    assert sorted({r["chain"] for r in rails}) == sorted(
        [f"common_{d}_{t}" for d in ("out", "in") for t in ("inet_dom", "dom", "open")] + ["a_e_common_out_inet_dom", "a_e_common_in_inet_dom"])
    assert [r["expr"][0] for r in rules(plan, "pout_a")][:1] == [{"jump": {"target": "common_out_inet_dom"}}]
    assert rules(plan, "pout_a")[0]["expr"] == rules(plan, "pout_b")[0]["expr"]
    assert rules(plan, "pout_e")[0]["expr"] == [{"jump": {"target": "a_e_common_out_inet_dom"}}]
    # the audit copies log under the audit profile's name and never drop
    for r in rules(plan, "a_e_common_out_inet_dom"):
        assert not has_expr(r, "drop")
    assert any("segguard audit e " in repr(r["expr"]) for r in rules(plan, "a_e_common_frag"))
    # what d (no domain block) walks has neither the DC rail nor the AD-port guard
    d = [r.get("comment", "") for r in walk(plan, "pout_d")]
    assert "AD protocol ports (block.domain)" not in d and "guard rail: domain controller" not in d
    assert "guard rail: domain controller" in [r.get("comment", "") for r in walk(plan, "pout_c")]


def test_rules_naming_the_same_peers_share_their_sets(tmp_path):
    """Peer and port sets are named after their content: every rule of every profile
    naming the same peers uses one set, so the set count does not grow with guests."""
    def peer_refs(plan, chain, text):
        return {r["expr"][0]["match"]["right"] for r in rules(plan, chain)
                if r.get("comment", "").startswith("egress[") and text in r["comment"]}

    plan = compile_plan(load_config(LAB), lab_facts(bridge_conntrack=False))
    # egress[0..2] of scada-line4 and egress[0] of xp-line3 all go to historian_db
    hist = peer_refs(plan, "pout_scada_line4", "to historian_db")
    assert len(hist) == 2 and hist == peer_refs(plan, "pout_xp_line3", "to historian_db")
    assert {elems(plan, "set", h[1:])[0] for h in hist} == {"10.30.0.20", "fd00:30::20"}
    many = {f"p{i}": profile(f"p{i}", [guest(i, v6=True)]) for i in range(1, 40)}
    big = compile_plan(load_config(write_config(tmp_path, many)), HostFacts())
    few = compile_plan(load_config(write_config(tmp_path / "few", {"p1": many["p1"]})), HostFacts())
    assert len(objs(big, "set")) == len(objs(few, "set"))


def test_reachable_names_what_a_guest_policy_uses():
    from segguard.compile.nft import reachable

    plan = compile_plan(load_config(LAB), lab_facts(bridge_conntrack=False))
    chains, sets = reachable(list(plan.nft), {"out_scada_line4_srv", "pin_scada_line4"})
    assert {"out_scada_line4_srv", "nd_scada_line4_srv", "pout_scada_line4", "pin_scada_line4",
            "common_out_inet_dom", "common_in_inet_dom", "common_frag", "common_out_post_dom"} == chains
    # the guard-rail sets and the shared peer sets its rules name, nobody else's
    assert {"mgmt4", "hyp6", "dc4", "internal6", "ad_ports"} <= sets
    peer = next(r for r in rules(plan, "pout_scada_line4") if r.get("comment", "").startswith("egress[0]"))
    assert peer["expr"][0]["match"]["right"][1:] in sets
    assert not any(c.startswith(("out_xp", "pout_xp", "pin_xp")) for c in chains)
    # from a base chain, every guest's chains hang off the dispatch map
    chains, _ = reachable(list(plan.nft), {"prerouting"})
    assert {"out_xp_line3_hmi", "out_scada_line4_srv", "pout_xp_line3", "common_out_inet_dom"} <= chains
