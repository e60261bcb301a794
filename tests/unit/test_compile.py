"""compile_plan(config, HostFacts) -> Plan is pure: these tests assert the structure of
the nftables objects it produces, never timing and never a kernel."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import netaddr
import pytest

from segguard.compile import compile_plan
from segguard.compile.policy import EXACT_SUFFIX, INTERVAL_SETS
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


def is_fast(rule: dict) -> bool:
    return rule.get("comment", "").startswith("fast path:")


def walk(plan: Plan, chain: str, fast: bool = False) -> list[dict]:
    """The rules of `chain` in the order a frame meets them: an unconditional `jump` to
    a shared chain is replaced by that chain's rules (a chain ending without a verdict
    returns to the rule after the jump), so ordering guarantees are asserted on what
    the kernel evaluates, not on how the table happens to be factored. The fast-path
    rules (which accept only what the walk accepts too: test_fast_path_*) are left out
    unless asked for."""
    out = []
    for r in rules(plan, chain):
        if is_fast(r) and not fast:
            continue
        if len(r["expr"]) == 1 and "jump" in r["expr"][0]:
            out += walk(plan, r["expr"][0]["jump"]["target"])
        else:
            out.append(r)
    return out


def named(plan: Plan, kind: str, name: str) -> dict:
    (found,) = [o for o in objs(plan, kind) if o["name"] == name]
    return found


def elems(plan: Plan, kind: str, name: str) -> list:
    """A set's elements; a port-keyed policy set is two halves (`name`: prefixes and
    ranges, `name_x`: single values), read here as the one set they are."""
    if kind == "set" and name in INTERVAL_SETS:
        return named(plan, kind, name).get("elem", []) + named(plan, kind, name + EXACT_SUFFIX).get("elem", [])
    return named(plan, kind, name).get("elem", [])


def has_expr(rule: dict, key: str) -> bool:
    return any(key in e for e in rule["expr"])


def has_any_drop(plan: Plan, chains) -> bool:
    """Whether a frame entering `chains` can reach a drop, following jumps and gotos
    (the per-port verdict-map lookups are left out: name the guest's nd_ chain)."""
    reach, todo = set(), list(chains)
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


def dispatch(plan: Plan, m: str, port: str) -> str:
    """The chain a port's frames go to through verdict map `m`."""
    (target,) = [next(iter(v.values()))["target"] for k, v in elems(plan, "map", m) if k == port]
    return target


def _field(e: dict) -> str:
    if "meta" in e:
        return e["meta"]["key"]
    p = e["payload"]
    return f"{p['protocol']} {p['field']}"


def lookups(rule: dict) -> list[tuple[list[str], str]]:
    """(key fields, set name) of every `match` of a rule against a named set keyed by
    a concatenation (the port-keyed policy sets)."""
    out = []
    for e in rule["expr"]:
        m = e.get("match")
        if m and isinstance(m["right"], str) and m["right"].startswith("@") and "concat" in m["left"]:
            out.append(([_field(p) for p in m["left"]["concat"]], m["right"][1:].removesuffix(EXACT_SUFFIX)))
    return out


def looks_up(rule: dict, *names: str) -> bool:
    return any(s in names for _, s in lookups(rule))


POLICY_SETS = tuple(f"{d}_{k}{fam}" for d in ("out", "in") for k in ("open", "echo", "rerr") for fam in (4, 6)) + ("frag4", "frag6")


def _covers(elem, value) -> bool:
    if isinstance(elem, dict) and "prefix" in elem:
        return netaddr.IPAddress(value) in netaddr.IPNetwork(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")
    if isinstance(elem, dict) and "range" in elem:
        lo, hi = elem["range"]
        if isinstance(lo, int):
            return lo <= value <= hi
        return netaddr.IPAddress(lo) <= netaddr.IPAddress(value) <= netaddr.IPAddress(hi)
    if isinstance(elem, str) and isinstance(value, str) and netaddr.valid_ipv4(elem) | netaddr.valid_ipv6(elem):
        return netaddr.valid_ipv4(value) | netaddr.valid_ipv6(value) and netaddr.IPAddress(elem) == netaddr.IPAddress(value)
    return elem == value


def member(plan: Plan, name: str, *values) -> bool:
    """Whether the tuple `values` is in set `name` (addresses in prefixes and ranges,
    ports in port ranges). The elements must not overlap: at most one may match."""
    hits = [e for e in elems(plan, "set", name)
            if len(e["concat"]) == len(values) and all(_covers(p, v) for p, v in zip(e["concat"], values))]
    assert len(hits) <= 1, (name, values, hits)
    return bool(hits)


def port_elems(plan: Plan, name: str, port: str) -> list[list]:
    """The elements of a port-keyed set that belong to `port`, without it."""
    return [e["concat"][1:] for e in elems(plan, "set", name) if e["concat"][0] == port]


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
    # toward a guest the fast path (v4, v6; opens and stateless replies) precedes the dispatch
    assert counts(one) == counts(fifty) == {"prerouting": 2, "input": 2, "forward": 5, "output": 5}
    # one vmap lookup per hook (and the MAC guard's); the guests live in the maps and sets
    for p, n in ((one, 1), (fifty, 50)):
        assert len(elems(p, "map", "out_dispatch")) == len(elems(p, "map", "in_dispatch")) == n
        assert len(elems(p, "map", "legacy_macs")) == len(elems(p, "set", "bound_ports")) == n
        for c in BASE_CHAINS:
            assert sum(has_expr(r, "vmap") for r in rules(p, c)) == (2 if c in ("prerouting", "input") else 1)
            assert all(is_fast(r) for r in rules(p, c) if not has_expr(r, "vmap"))
            # an unbind leaves interval-set elements behind, harmless only if no lookup
            # of them comes before the dispatch (apply/incremental.py, leftovers)
            named_sets = [e["match"]["right"][1:] for r in rules(p, c) for e in r["expr"]
                          if isinstance(e.get("match", {}).get("right"), str) and e["match"]["right"].startswith("@")]
            assert not set(named_sets) & INTERVAL_SETS, (c, named_sets)
            assert bool(named_sets) == (c in ("forward", "output"))  # the fast path's hash sets
    # base-chain rules are literally the same (no guest value inlined)
    assert [r for r in objs(fifty, "rule") if r["chain"] in BASE_CHAINS] == \
        [r for r in objs(one, "rule") if r["chain"] in BASE_CHAINS]


def test_dispatch_maps_point_at_the_class_chains(tmp_path):
    cfg = load_config(LAB)
    plan = compile_plan(cfg, lab_facts())
    # xp-line3: deny by default; scada-line4: allow; both block internet and domain
    assert elems(plan, "map", "out_dispatch") == [
        ["vnet7", {"goto": {"target": "gout_inet_dom_deny"}}], ["vnet8", {"goto": {"target": "gout_inet_dom_allow"}}]]
    assert elems(plan, "map", "in_dispatch") == [
        ["vnet7", {"goto": {"target": "gin_inet_dom_deny"}}], ["vnet8", {"goto": {"target": "gin_inet_dom_allow"}}]]
    # only the IPv6 guest has an ND-target chain, reached by its own port only
    assert elems(plan, "map", "nd_dispatch") == [["vnet8", {"jump": {"target": "nd_scada_line4_srv"}}]]
    chains = {c["name"] for c in objs(plan, "chain")}
    for m in ("out_dispatch", "in_dispatch", "nd_dispatch"):
        for _, verdict in elems(plan, "map", m):
            assert next(iter(verdict.values()))["target"] in chains
    # what the bindings say they dispatch to is what the maps do
    for b in plan.bindings:
        assert b.chains == (dispatch(plan, "out_dispatch", b.port), dispatch(plan, "in_dispatch", b.port))
    # every class chain ends with its profile's default
    assert rules(plan, "gout_inet_dom_deny")[-1]["comment"] == "default: deny"
    assert rules(plan, "gout_inet_dom_allow")[-1]["comment"] == "default: allow"
    # from a port: its dispatch first (a bound port's chain checks its MAC), then the MAC guard
    assert [r["expr"] for r in rules(plan, "prerouting")] == [
        [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@out_dispatch"}}],
        [{"vmap": {"key": {"payload": {"protocol": "ether", "field": "saddr"}}, "data": "@legacy_macs"}}]]
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
    guard = elems(bound_plan, "map", "legacy_macs")
    assert [mac for mac, _ in guard] == [f"52:54:00:00:00:0{i}" for i in range(1, 7)]
    assert all(verdict == {"goto": {"target": "foreign_mac"}} for _, verdict in guard)
    assert [r["expr"] for r in rules(bound_plan, "foreign_mac")] == [[{"counter": None}, {"drop": None}]]
    bound = [e["concat"] for e in elems(bound_plan, "set", "bound_ports")]
    assert bound == [["52:54:00:00:00:01", "vnet1"], ["52:54:00:00:00:02", "vnet2"], ["52:54:00:00:00:03", "vnet3"],
                     ["52:54:00:00:00:05", "vnet50"], ["52:54:00:00:00:06", "vnet5"]]
    assert all(mac != "52:54:00:00:00:04" for mac, _ in bound)
    assert "'g4'" not in repr(elems(bound_plan, "map", "out_dispatch"))
    # prerouting: a bound port goes to its chain, whose first identity rule drops a MAC
    # not bound to it; any other port meets the guard, which drops every legacy MAC
    first, guard_rule = rules(bound_plan, "prerouting")
    assert first["expr"] == [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@out_dispatch"}}]
    assert guard_rule["expr"] == [{"vmap": {"key": {"payload": {"protocol": "ether", "field": "saddr"}}, "data": "@legacy_macs"}}]
    for port, _ in elems(bound_plan, "map", "out_dispatch"):
        mac_check = next(r for r in walk(bound_plan, dispatch(bound_plan, "out_dispatch", port)) if "@bound_ports" in repr(r))
        assert mac_check["expr"][0]["match"] == {"op": "!=", "left": {"concat": [
            {"payload": {"protocol": "ether", "field": "saddr"}}, {"meta": {"key": "iifname"}}]}, "right": "@bound_ports"}
        assert mac_check["expr"][-1] == {"drop": None}


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
STATELESS_ONLY_SETS = ("out_rerr4", "out_rerr6", "in_rerr4", "in_rerr6")


def test_stateful_uses_ct_state_and_no_reply_rules():
    plan = compile_plan(load_config(LAB), lab_facts(bridge_conntrack=True))
    assert plan.stateful is True
    all_rules = objs(plan, "rule")
    # no stateless reply rule: nothing keyed on a source port, no echo-reply, no icmp-error sets
    assert not [r for r in all_rules if r.get("comment", "").startswith("replies:")]
    assert not [r for r in all_rules if any(f.endswith("sport") for k, _ in lookups(r) for f in k)]
    assert "echo-reply" not in json.dumps([r["expr"] for r in all_rules])
    names = {s["name"] for s in objs(plan, "set")}
    assert not names & set(STATELESS_ONLY_SETS)
    assert not [r for r in all_rules if looks_up(r, *STATELESS_ONLY_SETS)]
    ct = [r for r in all_rules if uses_ct(r)]
    assert ct
    for chain in ("gout_inet_dom_deny", "gin_inet_dom_deny", "gout_inet_dom_allow", "gin_inet_dom_allow"):
        exprs = [r["expr"] for r in walk(plan, chain)]
        assert [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}, {"counter": None}, {"drop": None}] in exprs
        assert [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": None}] in exprs
    # every allow rule of a profile (flows and echo requests it opens) matches only new flows
    allow = [r for r in all_rules if looks_up(r, "out_open4", "out_open6", "in_open4", "in_open6",
                                              "out_echo4", "out_echo6", "in_echo4", "in_echo6")]
    # 2 kinds of profile x (out, in) x (open, echo) x (v4, v6) x 2 halves, + the fast path's
    # open lookups (2 kinds x (out, in) x (v4, v6))
    assert len(allow) == 4 * 4 * 2 + 2 * 2 * 2
    assert all({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}} in r["expr"] for r in allow)


def test_stateless_uses_reply_rules_and_no_ct():
    plan = compile_plan(load_config(LAB), lab_facts(bridge_conntrack=False))
    assert plan.stateful is False
    all_rules = objs(plan, "rule")
    assert not [r for r in all_rules if uses_ct(r)]
    port = {"out": "iifname", "in": "oifname"}
    peer = {("out", 4): "ip daddr", ("out", 6): "ip6 daddr", ("in", 4): "ip saddr", ("in", 6): "ip6 saddr"}
    ack = {"match": {"op": "==", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, "ack"]}, "right": "ack"}}
    reply_sets = {}
    for chain in ("gout_inet_dom_deny", "gin_inet_dom_deny", "gout_inet_dom_allow", "gin_inet_dom_allow"):
        d, other = ("out", "in") if chain.startswith("gout_") else ("in", "out")
        rs = [r for r in rules(plan, chain) if not is_fast(r)]
        for fam in (4, 6):
            # a reply is the other side's opened flow seen backwards: keyed on the
            # source port, looked up in the other direction's own set
            tcp = [r for r in rs if any(k == [port[d], peer[d, fam], "l4proto", "tcp sport"] for k, _ in lookups(r))]
            udp = [r for r in rs if any(k == [port[d], peer[d, fam], "l4proto", "udp sport"] for k, _ in lookups(r))]
            assert len(tcp) == len(udp) == 2, (chain, fam)  # one rule per half of the set
            assert lookups(tcp[0])[0][1] == lookups(udp[0])[0][1] == f"{other}_open{fam}"
            # a TCP reply must carry ACK (a bare SYN from the service port is not a reply)
            assert ack in tcp[0]["expr"] and tcp[0]["expr"][-1] == {"accept": None}
            assert not has_expr(udp[0], "&")
            icmp = "icmp" if fam == 4 else "icmpv6"
            echo = [r for r in rs if {"match": {"op": "==", "left": {"payload": {"protocol": icmp, "field": "type"}}, "right": "echo-reply"}} in r["expr"]]
            assert len(echo) == 2 and lookups(echo[0]) == lookups(echo[1]) == [([port[d], peer[d, fam]], f"{other}_echo{fam}")]
            errs = [r for r in rs if looks_up(r, f"{d}_rerr{fam}")]
            assert len(errs) == 2 and errs[0]["expr"][-1] == errs[1]["expr"][-1] == {"accept": None}
            reply_sets[chain, fam] = lookups(tcp[0])[0][1]
    # xp-line3 (vnet7): egress tcp/1433 to historian_db; ingress tcp/3389 from jump_hosts
    s_in, s_out = reply_sets["gin_inet_dom_deny", 4], reply_sets["gout_inet_dom_deny", 4]
    assert member(plan, s_in, "vnet7", "10.30.0.20", "tcp", 1433)       # historian answers the guest
    assert not member(plan, s_in, "vnet7", "10.30.0.20", "tcp", 1434)   # only from its service port
    assert not member(plan, s_in, "vnet7", "10.30.0.21", "tcp", 1433)   # only that peer
    assert not member(plan, s_in, "vnet7", "10.30.0.20", "udp", 514)    # scada-line4's rule, not xp's
    assert member(plan, s_out, "vnet7", "10.30.0.30", "tcp", 3389)      # the guest answers the jump host
    assert not member(plan, s_out, "vnet7", "10.30.0.30", "tcp", 22)
    # icmp errors: only to/from the peers of the other side's rules
    assert port_elems(plan, "in_rerr4", "vnet7") == [["10.30.0.20"]]
    assert port_elems(plan, "out_rerr4", "vnet7") == [["10.30.0.30"]]
    assert port_elems(plan, "out_rerr6", "vnet7") == [] and port_elems(plan, "in_rerr6", "vnet7") == []
    # echo replies: scada-line4 may ping historian_db and be pinged by jump_hosts
    assert port_elems(plan, "out_echo4", "vnet8") == [["10.30.0.20"]] and port_elems(plan, "in_echo4", "vnet8") == [["10.30.0.30"]]
    assert port_elems(plan, "out_echo4", "vnet7") == [] and port_elems(plan, "in_echo4", "vnet7") == []


# -------------------------------------------------------------------------- audit
def test_audit_mode_logs_and_accepts_instead_of_dropping(tmp_path):
    gs = [guest(1, v6=True)]
    enforce = compile_plan(load_config(write_config(tmp_path / "e", {"p": profile("p", gs)})), HostFacts())
    audit = compile_plan(load_config(write_config(tmp_path / "a", {"p": profile("p", gs, mode="audit")})), HostFacts())
    e_own = ("gout_inet_dom_deny", "gin_inet_dom_deny", "nd_g1")
    a_own = ("a_p_out", "a_p_in", "nd_g1")
    assert (dispatch(audit, "out_dispatch", "vnet1"), dispatch(audit, "in_dispatch", "vnet1")) == a_own[:2]
    assert (dispatch(enforce, "out_dispatch", "vnet1"), dispatch(enforce, "in_dispatch", "vnet1")) == e_own[:2]
    e_rules = [r for c in e_own for r in walk(enforce, c)]
    a_rules = [r for c in a_own for r in walk(audit, c)]
    # an audit port's frames skip the base chains' MAC guard too (dispatched first), so
    # its chain has the guard's rule: an enforced guest's MAC is dropped on this port
    # as on every port but its own (vmap legacy_macs -> foreign_mac); its own is bound
    guard = {"family": "bridge", "table": "segguard", "chain": "a_p_out", "comment": "a legacy MAC not bound to this port",
             "expr": [{"match": {"op": "!=", "left": {"concat": [{"payload": {"protocol": "ether", "field": "saddr"}},
                                                                 {"meta": {"key": "iifname"}}]}, "right": "@bound_ports"}},
                      {"vmap": {"key": {"payload": {"protocol": "ether", "field": "saddr"}}, "data": "@legacy_macs"}}]}
    assert a_rules[0] == guard and guard not in e_rules
    a_rules = a_rules[1:]
    assert len(e_rules) == len(a_rules)
    # no audit profile shares a chain with enforcing ones: every drop it could reach
    # is in a chain of its own
    assert not has_any_drop(audit, a_own) and has_any_drop(enforce, e_own)
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
    # on a foreign port the MAC is logged (jump: the frame goes on), not dropped (goto)
    assert elems(audit, "map", "legacy_macs") == [["52:54:00:00:00:01", {"jump": {"target": "foreign_mac_audit"}}]]
    assert elems(enforce, "map", "legacy_macs") == [["52:54:00:00:00:01", {"goto": {"target": "foreign_mac"}}]]
    assert [r["expr"] for r in rules(audit, "foreign_mac_audit")] == [
        [{"counter": None}, {"log": {"prefix": "segguard audit legacy MAC on foreign port: "}}]]
    assert audit.bindings[0].mode == "audit"


def test_audit_guest_next_to_enforcing_guests_reaches_no_drop(tmp_path):
    """In one table with enforcing profiles of the same kind, the audit guest's port
    leads only to chains of its own."""
    profs = {"p": profile("p", [guest(1, v6=True)]), "q": profile("q", [guest(2, v6=True)], mode="audit")}
    plan = compile_plan(load_config(write_config(tmp_path, profs)), HostFacts())
    q = (dispatch(plan, "out_dispatch", "vnet2"), dispatch(plan, "in_dispatch", "vnet2"), dispatch(plan, "nd_dispatch", "vnet2"))
    p = (dispatch(plan, "out_dispatch", "vnet1"), dispatch(plan, "in_dispatch", "vnet1"), dispatch(plan, "nd_dispatch", "vnet1"))
    assert q == ("a_q_out", "a_q_in", "nd_g2") and p == ("gout_inet_dom_deny", "gin_inet_dom_deny", "nd_g1")
    assert not has_any_drop(plan, q)
    assert has_any_drop(plan, p)


def test_audit_log_prefix_names_the_reason(tmp_path):
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [guest(1)], mode="audit")})), HostFacts())
    for chain in ("a_p_out", "a_p_in"):
        last = rules(plan, chain)[-1]
        assert last["expr"] == [{"counter": None}, {"log": {"prefix": "segguard audit p default-deny: "}}, {"accept": None}]
    first = walk(plan, "a_p_out")[1]  # after the MAC guard's rule
    assert first["expr"][-2:] == [{"log": {"prefix": "segguard audit p spoofed-mac: "}}, {"accept": None}]


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


# ------------------------------------------------------------------- guest identity
def port_keyed_sets(plan: Plan) -> list[str]:
    """Every set whose elements start with a port (ifname first)."""
    return [s["name"] for s in objs(plan, "set") if isinstance(s["type"], list) and s["type"][0] == "ifname"]


def test_guest_without_ipv6_whitelists_no_ip6(tmp_path):
    # the profile's egress peer db has an IPv6 address: g2 gets elements for it, g1 must not
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [guest(1), guest(2, v6=True)])})), HostFacts())
    assert port_elems(plan, "port_types", "vnet1") == [["arp"], ["ip"]]
    assert port_elems(plan, "port_types", "vnet2") == [["arp"], ["ip"], ["ip6"]]
    assert port_elems(plan, "port_src6", "vnet1") == []
    assert port_elems(plan, "port_src6", "vnet2") == [["52:54:00:00:00:02", "fd00:30::1:2"]]
    six = [n for n in port_keyed_sets(plan) if n.endswith("6")]
    assert {"out_open6", "frag6", "port_src6"} <= set(six)
    assert all(port_elems(plan, n, "vnet1") == [] for n in six)
    assert port_elems(plan, "out_open6", "vnet2") == [["fd00:30::20", "tcp", 1433]]
    # both dispatch to the same chain: the ethertype check against port_types is what drops g1's IPv6
    assert dispatch(plan, "out_dispatch", "vnet1") == dispatch(plan, "out_dispatch", "vnet2")
    ethertype = walk(plan, dispatch(plan, "out_dispatch", "vnet1"))[1]
    assert ethertype["expr"] == [
        {"match": {"op": "!=", "left": {"concat": [{"meta": {"key": "iifname"}}, {"payload": {"protocol": "ether", "field": "type"}}]},
                   "right": "@port_types"}}, {"counter": None}, {"drop": None}]
    chains = {c["name"] for c in objs(plan, "chain")}
    assert "nd_g2" in chains and "nd_g1" not in chains
    assert [k for k, _ in elems(plan, "map", "nd_dispatch")] == ["vnet2"]


def test_rules_carry_no_anonymous_sets():
    """libnftables 1.0 allocates anonymous sets in quadratic time (100 guests: 18 s);
    every multi-value match goes through a named set instead."""
    plan = compile_plan(load_config(LAB), replace(lab_facts(), bridge_conntrack=False))
    assert '"set": [' not in json.dumps([r["expr"] for r in objs(plan, "rule")])


def test_ipv6_only_guest_gets_no_arp(tmp_path):
    g = {"name": "g1", "mac": "52:54:00:00:00:01", "port": "vnet1", "ipv6": ["fd00:30::1:1"]}
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [g])})), HostFacts())
    assert port_elems(plan, "port_types", "vnet1") == [["ip6"]]
    assert port_elems(plan, "port_src4", "vnet1") == []
    assert all(port_elems(plan, n, "vnet1") == [] for n in port_keyed_sets(plan) if n.endswith("4"))
    assert port_elems(plan, "port_src6", "vnet1") == [["52:54:00:00:00:01", "fd00:30::1:1"]]
    assert port_elems(plan, "out_open6", "vnet1") == [["fd00:30::20", "tcp", 1433]]


def test_guest_without_addresses_may_send_nothing(tmp_path):
    g = {"name": "g1", "mac": "52:54:00:00:00:01", "port": "vnet1"}
    plan = compile_plan(load_config(write_config(tmp_path, {"p": profile("p", [g])})), HostFacts())
    # its port is bound (its MAC may use it) but has no element in any other port-keyed set
    assert [e["concat"] for e in elems(plan, "set", "bound_ports")] == [["52:54:00:00:00:01", "vnet1"]]
    assert all(port_elems(plan, n, "vnet1") == [] for n in port_keyed_sets(plan))
    # ... so the ethertype whitelist, before anything that accepts, drops every frame
    # (its fast path is entered through port_src4/6, where it has no element either)
    rs = walk(plan, dispatch(plan, "out_dispatch", "vnet1"))
    assert [r["expr"][0]["match"]["right"] for r in rs[:3]] == ["@bound_ports", "@port_types", "@port_types"]
    assert all(r["expr"][0]["match"]["op"] == "!=" and r["expr"][-1] == {"drop": None} for r in rs[:3])


def test_guest_chain_starts_with_source_mac_check():
    plan = compile_plan(load_config(LAB), lab_facts())
    for chain in {dispatch(plan, "out_dispatch", p) for p in ("vnet7", "vnet8")}:
        # (before it only the fast path's entry, a lookup of port, MAC and source together)
        assert walk(plan, chain)[0]["expr"] == [
            {"match": {"op": "!=", "left": {"concat": [{"payload": {"protocol": "ether", "field": "saddr"}}, {"meta": {"key": "iifname"}}]},
                       "right": "@bound_ports"}},
            {"counter": None}, {"drop": None}]
    # the guest's MAC is bound to its port and nowhere else
    assert [e["concat"] for e in elems(plan, "set", "bound_ports")] == [
        ["52:54:00:aa:00:01", "vnet7"], ["52:54:00:aa:00:02", "vnet8"]]


def test_identity_checks_precede_everything_else_from_the_guest():
    """MAC, ethertype, ARP and source addresses are checked before any rule that could
    accept a frame (only ARP, once fully checked, is accepted among them)."""
    plan = compile_plan(load_config(LAB), lab_facts())
    for chain in ("gout_inet_dom_deny", "gout_inet_dom_allow"):
        rs = rules(plan, chain)
        # the fast path's entry first: one lookup of what the identity rules check one by
        # one (port, MAC, source address; the family: meta protocol, the lookup's
        # dependency, and ether type), jumping to chains that only accept
        for fam, r in zip((4, 6), rs[:2]):
            ip = "ip" if fam == 4 else "ip6"
            assert is_fast(r) and r["expr"] == [
                {"match": {"op": "==", "left": {"concat": [{"meta": {"key": "iifname"}}, {"payload": {"protocol": "ether", "field": "saddr"}},
                                                           {"payload": {"protocol": ip, "field": "saddr"}}]}, "right": f"@port_src{fam}"}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "type"}}, "right": ip}},
                {"jump": {"target": f"{chain}_fast{fam}"}}]
            assert rules(plan, f"{chain}_fast{fam}") and all(
                is_fast(x) and x["expr"][-1] == {"accept": None} for x in rules(plan, f"{chain}_fast{fam}"))
        assert port_elems(plan, "port_src4", "vnet7") == [["52:54:00:aa:00:01", "10.30.0.15"]]
        assert port_elems(plan, "port_src6", "vnet8") == [["52:54:00:aa:00:02", "fd00:30::16"]]
        own = rs[2:]
        ident = own[:next(i for i, r in enumerate(own) if has_expr(r, "jump"))]
        keys = [s for r in ident for _, s in lookups(r)]
        assert keys == ["bound_ports", "port_types", "port_types", "port_src4", "bound_ports", "port_src4", "port_src6"]
        accepts = [i for i, r in enumerate(ident) if r["expr"][-1] == {"accept": None}]
        assert accepts == [6] and ident[6]["expr"][0]["match"]["right"] == "arp"
        spoof6 = ident[8]
        assert spoof6["comment"] == "IPv6 source is not the guest's" and spoof6["expr"][-1] == {"drop": None}
        # neighbour advertisements go to the guest's ND-target chain through its port
        assert ident[9]["expr"][-1] == {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@nd_dispatch"}}
    nd = rules(plan, "nd_scada_line4_srv")
    assert nd[-1]["expr"] == [{"counter": None}, {"drop": None}] and all(r["expr"][-1] == {"return": None} for r in nd[:-1])



def test_frames_to_the_guest_pass_the_ethertype_whitelist_before_any_accept_of_the_walk():
    """Also for `default: allow`, where nothing else would stop a tagged or LLC frame
    or a family the guest has no address for."""
    plan = compile_plan(load_config(LAB), lab_facts())
    check = [{"match": {"op": "!=", "left": {"concat": [{"meta": {"key": "oifname"}}, {"payload": {"protocol": "ether", "field": "type"}}]},
                        "right": "@port_types"}}, {"counter": None}, {"drop": None}]
    for chain in ("gin_inet_dom_deny", "gin_inet_dom_allow"):
        rs = walk(plan, chain)
        first_accept = next(i for i, r in enumerate(rs) if r["expr"][-1] == {"accept": None})
        assert [r["expr"] for r in rs[:first_accept]] == [check], chain
    # and the fast path before it accepts only through the port's own elements, which
    # exist only for the families the guest has addresses in
    assert port_elems(plan, "in_open6", "vnet7") == [] and port_elems(plan, "in_open4", "vnet7")

# -------------------------------------------------------------------- guard rails
@pytest.mark.parametrize("conntrack", [False, True])
def test_guard_rails_come_before_every_allow_rule(conntrack):
    plan = compile_plan(load_config(LAB), lab_facts(bridge_conntrack=conntrack))
    chains = sorted({c for b in plan.bindings for c in b.chains})
    assert len(chains) == 4
    for chain in chains:
        rs = walk(plan, chain)
        comments = [r.get("comment", "") for r in rs]
        rails = [i for i, c in enumerate(comments) if c.startswith("guard rail:")]
        # mgmt, hypervisor, DC (block.domain) and internet (block.internet), v4 and v6
        assert len(rails) == 8, chain
        # every rule that lets a frame through because of the guest's policy: a lookup of
        # a port-keyed policy set (opened flows, echo, replies, fragments, icmp errors),
        # and conntrack's established flows
        allows = [i for i, r in enumerate(rs) if looks_up(r, *POLICY_SETS) or (r["expr"][-1] == {"accept": None} and uses_ct(r))]
        assert allows, chain
        assert all(rs[i]["expr"][-1] == {"accept": None} for i in allows)
        assert max(rails) < min(allows), (chain, comments)
        # the rails drop, always
        for i in rails:
            assert rs[i]["expr"][-2:] == [{"counter": None}, {"drop": None}]
        # and they live behind an unconditional jump in the class chain itself
        own = [r for r in rules(plan, chain) if not is_fast(r)]
        jump = next(i for i, r in enumerate(own) if has_expr(r, "jump"))
        assert own[jump]["expr"][0]["jump"]["target"].startswith("common_")
        assert not any(looks_up(r, *POLICY_SETS) for r in own[:jump])



def _fast_rules(plan: Plan, chain: str) -> list[dict]:
    """The fast-path rules a frame of `chain`'s direction meets: toward the guest in the
    base chains before the dispatch; from it, stateless, in the chains its entry jumps
    to (stateful: inline after the identity rules)."""
    if chain.startswith("gin_"):
        fast = [r for r in rules(plan, "forward") if is_fast(r)]
        assert fast == [r | {"chain": "forward"} for r in rules(plan, "output") if is_fast(r)]
        return fast
    return [r for c in (chain, f"{chain}_fast4", f"{chain}_fast6") for r in rules(plan, c)
            if is_fast(r) and not has_expr(r, "jump")]


FRAG4_NONE = {"match": {"op": "==", "left": {"&": [{"payload": {"protocol": "ip", "field": "frag-off"}}, 16383]}, "right": 0}}
FRAG6_NONE = {"match": {"op": "==", "left": {"exthdr": {"name": "frag"}}, "right": False}}


@pytest.mark.parametrize("conntrack", [False, True])
def test_fast_path_excludes_what_the_walk_drops_before_its_allows(conntrack):
    """The fast path accepts before the guard rails, fragments and rogue-service rules;
    each of its rules must carry the conditions under which the walk could drop first."""
    plan = compile_plan(load_config(LAB), lab_facts(bridge_conntrack=conntrack))
    for chain in sorted({c for b in plan.bindings for c in b.chains}):
        out = chain.startswith("gout_")
        fast = _fast_rules(plan, chain)
        assert len(fast) == (2 if conntrack else 4), chain
        for r in fast:
            ex = r["expr"]
            assert ex[-1] == {"accept": None}
            # single values only: the hash halves
            assert [m["match"]["right"] for m in ex if "match" in m and str(m["match"]["right"]).startswith("@")
                    and "concat" in m["match"]["left"]] == [f"@{lookups(r)[0][1]}{EXACT_SUFFIX}"]
            v6 = "ip6" in lookups(r)[0][0][1]
            # unfragmented only (first fragments keep the walk's fragment rules)
            assert (FRAG6_NONE if v6 else FRAG4_NONE) in ex
            if out and v6:
                assert {"match": {"op": "==", "left": {"exthdr": {"name": "rt"}}, "right": False}} in ex
                assert {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "@ip6_linklocal"}} in ex
            sport = {"payload": {"protocol": "th", "field": "sport"}}
            opens = lookups(r)[0][0][-1] == "th dport"
            if opens:
                assert lookups(r)[0][1].startswith("out_open" if out else "in_open")
                assert ({"match": {"op": "!=", "left": sport, "right": "@dhcp_server_ports"}} in ex) == out
                assert ({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}} in ex) == conntrack
            else:  # a stateless TCP reply: ACK set, and from the guest never to an AD port
                assert not conntrack and lookups(r)[0][0][-1] == "tcp sport"
                assert lookups(r)[0][1].startswith("in_open" if out else "out_open")
                assert {"match": {"op": "==", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, "ack"]},
                                  "right": "ack"}} in ex
                tcp_dport = {"payload": {"protocol": "tcp", "field": "dport"}}
                assert ({"match": {"op": "!=", "left": tcp_dport, "right": "@ad_ports"}} in ex) == out  # lab: block.domain on


def test_fast_path_elements_lie_outside_every_guard_rail_of_their_port(tmp_path):
    """The fast path's one claim the rules cannot carry: no element it can hit is in a
    guard-railed range of that port's profile (validation refuses such rules), so
    accepting before the rails changes no verdict. Checked on the plan's own sets."""
    blocks = {"a": "{internet: true, domain: true}", "b": "{internet: false, domain: true}",
              "c": "{internet: true, domain: false}", "d": "{internet: false, domain: false}"}
    profs = {}
    for i, (n, b) in enumerate(blocks.items()):
        # each profile names what its blocks allow: the internet where internet is off,
        # the DC where domain is off
        eg = "  - {to: db, proto: tcp, ports: [1433]}\n"
        if "internet: false" in b:
            eg += "  - {to: 198.51.100.7, proto: udp, ports: [53]}\n"
        if "domain: false" in b:
            eg += "  - {to: 10.30.0.10, proto: tcp, ports: [88]}\n"
        profs[n] = profile(n, [guest(i + 1, v6=True)], egress=eg) + f"block: {b}\n"
    for plan in (compile_plan(load_config(write_config(tmp_path, profs)), HostFacts()),
                 compile_plan(load_config(LAB), lab_facts())):
        rail = {name: netaddr.IPSet(
            netaddr.IPNetwork(f"{e['prefix']['addr']}/{e['prefix']['len']}") if isinstance(e, dict) and "prefix" in e
            else netaddr.IPRange(*e["range"]) if isinstance(e, dict) else netaddr.IPNetwork(e)
            for e in elems(plan, "set", name)) for name in ("mgmt4", "mgmt6", "hyp4", "hyp6", "dc4", "dc6", "internal4", "internal6")}
        hit = 0
        for port, _ in elems(plan, "map", "out_dispatch"):
            tag = dispatch(plan, "out_dispatch", port).split("_")[1:-1]  # gout_<tag>_<default>
            for d in ("out", "in"):
                for fam in (4, 6):
                    for e in named(plan, "set", f"{d}_open{fam}{EXACT_SUFFIX}").get("elem", []):
                        if e["concat"][0] != port:
                            continue
                        addr = netaddr.IPAddress(e["concat"][1])
                        hit += 1
                        assert addr not in rail[f"mgmt{fam}"] and addr not in rail[f"hyp{fam}"], (port, e)
                        if "dom" in tag:
                            assert addr not in rail[f"dc{fam}"], (port, e)
                        if "inet" in tag:
                            assert addr in rail[f"internal{fam}"], (port, e)
        assert hit
    # the synthetic fleet does hold elements the rails of other kinds would drop
    assert member(plan := compile_plan(load_config(write_config(tmp_path, profs)), HostFacts()), "out_open4", "vnet2", "198.51.100.7", "udp", 53)
    assert member(plan, "out_open4", "vnet3", "10.30.0.10", "tcp", 88)

def test_guard_rails_follow_block_settings(tmp_path):
    prof = profile("p", [guest(1)]) + "block: {internet: false, domain: false}\n"
    plan = compile_plan(load_config(write_config(tmp_path, {"p": prof})), HostFacts())
    chain = dispatch(plan, "out_dispatch", "vnet1")
    assert chain == "gout_open_deny"
    rails = [r["comment"] for r in walk(plan, chain) if r.get("comment", "").startswith("guard rail:")]
    assert rails == ["guard rail: management"] * 2 + ["guard rail: hypervisor"] * 2
    assert not [r for r in walk(plan, chain) if r.get("comment") == "AD protocol ports (block.domain)"]
    rails_in = [r["comment"] for r in walk(plan, dispatch(plan, "in_dispatch", "vnet1")) if r.get("comment", "").startswith("guard rail:")]
    assert rails_in == rails


def test_guard_rail_sets_carry_site_addresses():
    plan = compile_plan(load_config(LAB), lab_facts())
    assert elems(plan, "set", "mgmt4") == [{"prefix": {"addr": "10.30.250.0", "len": 24}}]
    assert elems(plan, "set", "mgmt6") == [{"prefix": {"addr": "fd00:250::", "len": 64}}]
    assert elems(plan, "set", "dc4") == ["10.30.0.10"] and elems(plan, "set", "dc6") == ["fd00:30::10"]
    assert elems(plan, "set", "internal6") == [{"prefix": {"addr": "fd00::", "len": 8}}]
    rail = next(r for r in walk(plan, "gout_inet_dom_deny") if r.get("comment") == "guard rail: internet (not in site.internal)")
    assert rail["expr"][0] == {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@internal4"}}
    rail = next(r for r in walk(plan, "gin_inet_dom_deny") if r.get("comment") == "guard rail: internet (not in site.internal)")
    assert rail["expr"][0] == {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@internal4"}}


def test_default_deny_and_allow_end_the_class_chains():
    plan = compile_plan(load_config(LAB), lab_facts())
    for chain in ("gout_inet_dom_deny", "gin_inet_dom_deny"):
        assert rules(plan, chain)[-1] == {**rules(plan, chain)[-1], "comment": "default: deny",
                                          "expr": [{"counter": None}, {"drop": None}]}
    for chain in ("gout_inet_dom_allow", "gin_inet_dom_allow"):
        assert rules(plan, chain)[-1]["comment"] == "default: allow"
        assert rules(plan, chain)[-1]["expr"] == [{"accept": None}]
    # the default applies to the profile that asked for it
    assert dispatch(plan, "in_dispatch", "vnet7") == "gin_inet_dom_deny"   # xp-line3: deny
    assert dispatch(plan, "in_dispatch", "vnet8") == "gin_inet_dom_allow"  # scada-line4: allow


def test_allow_rule_matches_peer_and_port():
    plan = compile_plan(load_config(LAB), lab_facts())
    # scada-line4 (vnet8): ingress {from: jump_hosts, proto: tcp, ports: [22, 3389]}
    for fam, ip, jump in ((4, "ip", "10.30.0.30"), (6, "ip6", "fd00:30::30")):
        halves = [r for r in rules(plan, "gin_inet_dom_allow") if looks_up(r, f"in_open{fam}") and not is_fast(r)]
        assert [r["expr"] for r in halves] == [[
            {"match": {"op": "==", "left": {"concat": [{"meta": {"key": "oifname"}}, {"payload": {"protocol": ip, "field": "saddr"}},
                                                       {"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]},
                       "right": f"@in_open{fam}{x}"}},
            {"accept": None}] for x in (EXACT_SUFFIX, "")]
        assert named(plan, "set", f"in_open{fam}{EXACT_SUFFIX}").get("flags") is None  # single values: a hash
        assert port_elems(plan, f"in_open{fam}", "vnet8") == [[jump, "tcp", 22], [jump, "tcp", 3389]]
        assert named(plan, "set", f"in_open{fam}")["type"] == ["ifname", f"ipv{fam}_addr", "inet_proto", "inet_service"]
        assert named(plan, "set", f"in_open{fam}")["flags"] == ["interval"]
    assert member(plan, "in_open4", "vnet8", "10.30.0.30", "tcp", 22)
    assert not member(plan, "in_open4", "vnet8", "10.30.0.30", "udp", 22)
    assert not member(plan, "in_open4", "vnet8", "10.30.0.31", "tcp", 22)
    # xp-line3 (vnet7) lets jump_hosts in on 3389 only, and the other guest's rules are not its own
    assert member(plan, "in_open4", "vnet7", "10.30.0.30", "tcp", 3389)
    assert not member(plan, "in_open4", "vnet7", "10.30.0.30", "tcp", 22)
    assert port_elems(plan, "out_open4", "vnet7") == [["10.30.0.20", "tcp", 1433]]
    assert port_elems(plan, "out_open4", "vnet8") == [["10.30.0.20", "tcp", 1433], ["10.30.0.20", "udp", 514]]
    for out in [r for r in rules(plan, "gout_inet_dom_deny") if looks_up(r, "out_open4") and not is_fast(r)]:
        assert lookups(out) == [(["iifname", "ip daddr", "l4proto", "th dport"], "out_open4")]


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
    for chain in ("gout_inet_dom_deny", "gout_inet_dom_allow"):
        rs = walk(plan, chain)
        comments = [r.get("comment", "") for r in rs]
        ad = comments.index("AD protocol ports (block.domain)")
        egress = [i for i, r in enumerate(rs) if looks_up(r, "out_open4", "out_open6", "out_echo4", "out_echo6")]
        # replies from the guest: the other direction's tuples, and icmp errors
        replies = [i for i, r in enumerate(rs) if looks_up(r, "in_open4", "in_open6", "in_echo4", "in_echo6", "out_rerr4", "out_rerr6")]
        assert len(egress) == 4 * 2 and len(replies) == 8 * 2, chain  # each lookup: two halves
        assert max(egress) < ad < min(replies), (chain, comments)
        assert ad < comments.index("only TCP, UDP and ICMP (no GRE, IPIP, 6in4, ESP, SCTP...)") < min(replies)
        assert ad < comments.index("well-known UDP tunnel ports (VXLAN, Geneve, WireGuard, OpenVPN, L2TP, IPsec NAT-T, Teredo)") < min(replies)
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
    # a and b (same block, default, mode) share their class chains too
    out = {n: dispatch(plan, "out_dispatch", f"vnet{i + 1}") for i, n in enumerate(blocks)}
    assert out == {"a": "gout_inet_dom_deny", "b": "gout_inet_dom_deny", "c": "gout_dom_deny", "d": "gout_open_deny"}
    assert dispatch(plan, "out_dispatch", "vnet9") == "a_e_out"

    def jumps(chain):  # (the fast path's entries left out)
        return [r["expr"][0]["jump"]["target"] for r in rules(plan, chain) if has_expr(r, "jump") and not is_fast(r)]

    assert jumps("gout_inet_dom_deny")[0] == "common_out_inet_dom"
    assert jumps("a_e_out")[0] == "a_e_common_out_inet_dom"
    assert all(j.startswith("a_e_common_") for j in jumps("a_e_out") + jumps("a_e_in"))
    assert not any(j.startswith("a_") for c in out.values() for j in jumps(c))
    # the audit copies log under the audit profile's name and never drop
    for r in rules(plan, "a_e_common_out_inet_dom"):
        assert not has_expr(r, "drop")
    assert any("segguard audit e " in repr(r["expr"]) for r in rules(plan, "a_e_common_frag"))
    # what d (no domain block) walks has neither the DC rail nor the AD-port guard
    d = [r.get("comment", "") for r in walk(plan, out["d"])]
    assert "AD protocol ports (block.domain)" not in d and "guard rail: domain controller" not in d
    c = [r.get("comment", "") for r in walk(plan, out["c"])]
    assert "guard rail: domain controller" in c and "AD protocol ports (block.domain)" in c
    assert "guard rail: internet (not in site.internal)" not in c


def test_rules_do_not_grow_with_guests_or_profiles(tmp_path):
    """The rules are the same for one profile or twenty distinct ones of the same kind
    (block, default, mode): their allow rules are elements keyed by port, not rules.
    Only the per-guest ND-target chains (IPv6 guests) grow."""
    many = {f"p{i}": profile(f"p{i}", [guest(i, v6=True)],
                             egress=f"  - {{to: db, proto: tcp, ports: [{1000 + i}]}}\n  - {{to: [10.30.{i}.0/24], proto: udp, ports: [{2000 + i}]}}\n",
                             ingress=f"  - {{from: jump, proto: tcp, ports: [{3000 + i}]}}\n")
            for i in range(1, 21)}
    big = compile_plan(load_config(write_config(tmp_path / "big", many)), HostFacts())
    few = compile_plan(load_config(write_config(tmp_path / "few", {"p1": many["p1"]})), HostFacts())

    def shape(plan):
        rs = [{**r, "comment": r.get("comment")} for r in objs(plan, "rule") if not r["chain"].startswith("nd_")]
        chains = [c["name"] for c in objs(plan, "chain") if not c["name"].startswith(("nd_", "in_vnet"))]
        return rs, chains, [s["name"] for s in objs(plan, "set")]

    assert shape(big) == shape(few)
    assert len([c for c in objs(big, "chain") if c["name"].startswith("nd_")]) == 20
    # ... and each profile's own policy is in the elements of its port
    assert len(elems(big, "set", "out_open4")) == 40 and len(elems(few, "set", "out_open4")) == 2
    for i in (1, 7, 20):
        assert sorted(map(str, port_elems(big, "out_open4", f"vnet{i}"))) == sorted(map(str, [
            ["10.30.0.20", "tcp", 1000 + i], [{"prefix": {"addr": f"10.30.{i}.0", "len": 24}}, "udp", 2000 + i]]))
        assert port_elems(big, "in_open4", f"vnet{i}") == [["10.30.0.30", "tcp", 3000 + i]]
        assert not member(big, "out_open4", f"vnet{i}", "10.30.0.20", "tcp", 1001 + i)


def test_reachable_names_what_a_guest_policy_uses():
    from segguard.compile.nft import reachable

    plan = compile_plan(load_config(LAB), lab_facts(bridge_conntrack=False))
    scada = next(b for b in plan.bindings if b.guest == "scada-line4-srv")
    chains, sets = reachable(list(plan.nft), set(scada.chains))
    assert {"gout_inet_dom_allow", "gin_inet_dom_allow", "nd_scada_line4_srv", "gout_inet_dom_allow_fast4",
            "gout_inet_dom_allow_fast6", "common_out_inet_dom", "common_in_inet_dom", "common_frag", "common_out_post_dom"} == chains
    # the guard-rail sets and the port-keyed policy sets its rules look up
    assert {"mgmt4", "hyp6", "dc4", "internal6", "ad_ports", "bound_ports", "port_types", "port_src4", "port_src6",
            "out_open4", "in_open6", "frag4", "out_rerr6", "nd_dispatch"} <= sets
    assert not any(c.endswith("_deny") for c in chains), "xp-line3's chains are not scada-line4's"
    # from a base chain, every guest's chains hang off the dispatch maps
    chains, _ = reachable(list(plan.nft), {"prerouting"})
    assert {"gout_inet_dom_deny", "gout_inet_dom_allow", "nd_scada_line4_srv", "common_out_inet_dom"} <= chains
    chains, _ = reachable(list(plan.nft), {"forward"})
    assert {"gin_inet_dom_deny", "gin_inet_dom_allow", "common_in_inet_dom"} <= chains
