"""Every way a config can be wrong is reported as `file:line: field: message`, with the
line the offending value was written on, and exit code 2.

Each test writes a small config directory into tmp_path and runs from inside it, so
file names render relative (`site.yaml`, `profiles/a.yaml`) and messages compare whole.
Line numbers below refer to SITE and PROF as written here; keep them in sync.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segguard.config.schema import DEFAULT_INTERNAL
from segguard.config.validate import Config, load_config
from segguard.errors import ConfigError, ConfigProblem

SITE = """\
domain_controllers: [10.30.0.10]
management:
  networks: [10.30.250.0/24]
  vlans: [250]
hypervisor: [10.30.0.1]
groups:
  jump_hosts: [10.30.0.30]
  historian_db: [10.30.0.20, fd00:30::20]
"""
# line:  1 name  2 bridge  3 vlan  4 guests  5 - name  6 mac  7 ipv4  8 egress
#        9 egress[0]  10 ingress  11 ingress[0]
PROF = """\
name: p1
bridge: br0
vlan: 30
guests:
  - name: g1
    mac: "52:54:00:aa:00:01"
    ipv4: [10.30.0.15]
egress:
  - {to: historian_db, proto: tcp, ports: [1433]}
ingress:
  - {from: jump_hosts, proto: tcp, ports: [3389]}
"""
# a second, non-conflicting profile with the same line layout
PROF2 = (PROF.replace("name: p1", "name: p2").replace("name: g1", "name: g2")
         .replace("aa:00:01", "aa:00:02").replace("10.30.0.15", "10.30.0.16"))


@pytest.fixture
def cfgdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """write(site=..., a=..., b=...) -> the directory; profiles are profiles/<key>.yaml.
    site=None leaves site.yaml out."""
    monkeypatch.chdir(tmp_path)

    def write(site: str | None = SITE, **profiles: str) -> Path:
        if site is not None:
            (tmp_path / "site.yaml").write_text(site)
        if profiles:
            (tmp_path / "profiles").mkdir(exist_ok=True)
        for name, text in profiles.items():
            (tmp_path / "profiles" / f"{name}.yaml").write_text(text)
        return tmp_path

    return write


@pytest.fixture
def errors(cfgdir):
    """errors(site=..., a=...) -> the rendered problems; fails if the config loads."""

    def run(site: str | None = SITE, **profiles: str) -> list[str]:
        with pytest.raises(ConfigError) as info:
            load_config(cfgdir(site, **profiles))
        assert info.value.exit_code == 2
        assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
        return [str(p) for p in info.value.problems]

    return run


@pytest.fixture
def loads(cfgdir):
    def run(site: str | None = SITE, **profiles: str) -> Config:
        return load_config(cfgdir(site, **profiles))

    return run


def test_baseline_config_is_valid(loads):
    """Every error test below is this config with one thing changed."""
    cfg = loads(a=PROF, b=PROF2)
    assert [lp.name for lp in cfg.profiles] == ["p1", "p2"]
    assert cfg.profiles[0].egress[0].label == "egress[0] to historian_db tcp/1433"


def test_problem_rendering():
    assert str(ConfigProblem("profiles/a.yaml", 9, "egress[0].to", "m")) == "profiles/a.yaml:9: egress[0].to: m"
    assert str(ConfigProblem("site.yaml", None, "", "m")) == "site.yaml: m"
    assert ConfigError([]).exit_code == 2


# --------------------------------------------------------------------------- YAML
def test_yaml_parse_error(errors):
    assert errors(a="name: p1\n  bridge: br0\n") == [
        "profiles/a.yaml:2: YAML parse error: mapping values are not allowed here"]


def test_yaml_parse_error_in_site_still_checks_profiles(errors):
    assert errors(site="groups: {a: [1.2.3.4]\n", a=PROF.replace("vlan: 30", "vlan: 0")) == [
        "profiles/a.yaml:3: vlan: VLAN 0 is out of range 1-4094",
        "site.yaml:2: YAML parse error: while parsing a flow mapping expected ',' or '}', but got '<stream end>'",
    ]


def test_duplicate_yaml_key(errors):
    assert errors(a=PROF + "vlan: 31\n") == ["profiles/a.yaml:12: vlan: duplicate key"]


def test_document_must_be_a_mapping(errors):
    assert errors(a="- 1\n") == ["profiles/a.yaml:1: must be a YAML mapping, got list"]


def test_unquoted_mac_like_value_stays_a_string(loads):
    # YAML 1.1 reads 52:54:00:11:00:01 as a base-60 integer; our loader must not
    assert yaml.safe_load("mac: 52:54:00:11:00:01")["mac"] == 41135079601  # the trap
    cfg = loads(a=PROF.replace('"52:54:00:aa:00:01"', "52:54:00:11:00:01"))
    assert cfg.profiles[0].profile.guests[0].mac == "52:54:00:11:00:01"


def test_loader_leaves_yaml_safe_load_alone():
    # the loader's resolver tweak must stay on its own Loader class
    import segguard.config.loader  # noqa: F401  (imported above too; explicit here)

    assert yaml.safe_load("a: 5\nb: 1:30\n") == {"a": 5, "b": 90}


def test_loader_still_reads_numbers(tmp_path):
    from segguard.config.loader import load_yaml

    (tmp_path / "x.yaml").write_text("a: 5\nb: 0x10\nc: 1.5\nd: 1_000\ne: 1:30\n")
    assert load_yaml(tmp_path / "x.yaml").data == {"a": 5, "b": 16, "c": 1.5, "d": 1000, "e": "1:30"}


def test_mac_is_normalised(loads):
    cfg = loads(a=PROF.replace("52:54:00:aa:00:01", "52-54-00-AA-00-01"))
    assert cfg.profiles[0].profile.guests[0].mac == "52:54:00:aa:00:01"


# ------------------------------------------------------------------ unknown keys
def test_unknown_top_level_key(errors):
    assert errors(a=PROF + "colour: red\n") == ["profiles/a.yaml:12: colour: unknown key"]


def test_unknown_key_in_guest(errors):
    prof = PROF.replace("    ipv4: [10.30.0.15]\n", "    ipv4: [10.30.0.15]\n    colour: red\n")
    assert errors(a=prof) == ["profiles/a.yaml:8: guests[0].colour: unknown key"]


def test_unknown_key_in_site(errors):
    assert errors(site=SITE + "colour: red\n", a=PROF) == ["site.yaml:9: colour: unknown key"]


def test_unknown_key_in_site_nested(errors):
    site = SITE.replace("  vlans: [250]\n", "  vlans: [250]\n  vlan: 250\n")
    assert errors(site=site, a=PROF) == ["site.yaml:5: management.vlan: unknown key"]


def test_from_underscore_is_an_unknown_key_not_a_crash(errors):
    # `from_` is the Python attribute; in YAML only `from` exists
    assert errors(a=PROF.replace("{from: jump_hosts", "{from_: jump_hosts")) == [
        "profiles/a.yaml:11: ingress[0].from: required field is missing",
        "profiles/a.yaml:11: ingress[0].from_: unknown key",
    ]


def test_missing_required_fields(errors):
    assert errors(a="description: nothing else\n") == [
        "profiles/a.yaml:1: bridge: required field is missing",
        "profiles/a.yaml:1: guests: required field is missing",
        "profiles/a.yaml:1: name: required field is missing",
        "profiles/a.yaml:1: vlan: required field is missing",
    ]


# -------------------------------------------------------------------------- CIDRs
def test_bad_cidr(errors):
    site = SITE.replace("10.30.250.0/24", "10.30.250.0/33")
    assert errors(site=site, a=PROF) == [
        "site.yaml:3: management.networks[0]: '10.30.250.0/33' is not an IP address or CIDR"]


def test_cidr_with_host_bits(errors):
    site = SITE.replace("10.30.250.0/24", "10.30.250.1/24")
    assert errors(site=site, a=PROF) == [
        "site.yaml:3: management.networks[0]: '10.30.250.1/24' has host bits set; did you mean 10.30.250.0/24?"]


def test_cidr_with_host_bits_in_group(errors):
    site = SITE.replace("historian_db: [10.30.0.20, fd00:30::20]", "historian_db: [10.30.0.20, fd00:30::20/32]")
    assert errors(site=site, a=PROF) == [
        "site.yaml:8: groups.historian_db[1]: 'fd00:30::20/32' has host bits set; did you mean fd00:30::/32?"]


def test_inline_peer_with_host_bits(errors):
    # written inline in a rule, the same mistake must not silently widen the rule
    assert errors(a=PROF.replace("to: historian_db", "to: 10.30.0.20/24")) == [
        "profiles/a.yaml:9: egress[0].to: '10.30.0.20/24' has host bits set; did you mean 10.30.0.0/24?"]


def test_ipv6_address_in_ipv4_list(errors):
    assert errors(a=PROF.replace("[10.30.0.15]", "[10.30.0.15, 'fd00:30::15']")) == [
        "profiles/a.yaml:7: guests[0].ipv4[1]: fd00:30::15 is not an IPv4 address"]


def test_cidr_as_guest_address(errors):
    assert errors(a=PROF.replace("[10.30.0.15]", "[10.30.0.0/24]")) == [
        "profiles/a.yaml:7: guests[0].ipv4[0]: '10.30.0.0/24' is not a single IP address"]


# ------------------------------------------------------------------------- groups
def test_unknown_group_in_to(errors):
    assert errors(a=PROF.replace("to: historian_db", "to: historian")) == [
        "profiles/a.yaml:9: egress[0].to: unknown group 'historian' (site.yaml groups: historian_db, jump_hosts)"]


def test_unknown_group_in_from_list(errors):
    assert errors(a=PROF.replace("from: jump_hosts", "from: [jump_hosts, jumphost]")) == [
        "profiles/a.yaml:11: ingress[0].from[1]: unknown group 'jumphost' (site.yaml groups: historian_db, jump_hosts)"]


def test_unknown_group_without_groups(errors):
    site = SITE.split("groups:")[0]
    assert errors(site=site, a=PROF) == [
        "profiles/a.yaml:9: egress[0].to: unknown group 'historian_db' (site.yaml groups: none defined)",
        "profiles/a.yaml:11: ingress[0].from: unknown group 'jump_hosts' (site.yaml groups: none defined)",
    ]


def test_empty_peer_list(errors):
    assert errors(a=PROF.replace("to: historian_db", "to: []")) == [
        "profiles/a.yaml:9: egress[0].to: must name at least one group or address"]


# ------------------------------------------------------------------- ports, proto
BLOCK_RULE = PROF.replace("  - {to: historian_db, proto: tcp, ports: [1433]}\n", """\
  - to: historian_db
    proto: tcp
    ports:
      - 1433
      - PORT
""")  # egress[0] on line 9, proto 10, ports 11, ports[0] 12, ports[1] 13


def test_port_out_of_range(errors):
    assert errors(a=PROF.replace("[1433]", "[1433, 70000]")) == [
        "profiles/a.yaml:9: egress[0].ports[1]: port 70000 is out of range 1-65535"]


def test_port_out_of_range_block_style_points_at_its_line(errors):
    assert errors(a=BLOCK_RULE.replace("PORT", "70000")) == [
        "profiles/a.yaml:13: egress[0].ports[1]: port 70000 is out of range 1-65535"]


def test_reversed_port_range(errors):
    assert errors(a=BLOCK_RULE.replace("PORT", "'200-100'")) == [
        "profiles/a.yaml:13: egress[0].ports[1]: port range 200-100 is reversed"]


def test_port_zero_and_garbage(errors):
    assert errors(a=PROF.replace("[1433]", "[0, http]")) == [
        "profiles/a.yaml:9: egress[0].ports[0]: port 0 is out of range 1-65535",
        "profiles/a.yaml:9: egress[0].ports[1]: 'http' is not a port (1-65535) or range like '137-139'",
    ]


def test_tcp_rule_without_ports(errors):
    assert errors(a=PROF.replace("proto: tcp, ports: [1433]", "proto: tcp")) == [
        "profiles/a.yaml:9: egress[0]: tcp rules must list ports (name the service; 'all ports' is what default: allow is for)"]


def test_udp_ingress_rule_without_ports(errors):
    assert errors(a=PROF.replace("proto: tcp, ports: [3389]", "proto: udp")) == [
        "profiles/a.yaml:11: ingress[0]: udp rules must list ports (name the service; 'all ports' is what default: allow is for)"]


def test_icmp_with_ports(errors):
    assert errors(a=PROF.replace("proto: tcp, ports: [1433]", "proto: icmp, ports: [7]")) == [
        "profiles/a.yaml:9: egress[0].ports: icmp rules take no ports"]


def test_unknown_proto(errors):
    assert errors(a=PROF.replace("proto: tcp, ports: [1433]", "proto: sctp, ports: [1433]")) == [
        "profiles/a.yaml:9: egress[0].proto: Input should be 'tcp', 'udp' or 'icmp'"]


# ----------------------------------------------------------------- duplicates
def test_duplicate_mac_across_files(errors):
    assert errors(a=PROF, b=PROF2.replace("aa:00:02", "aa:00:01")) == [
        "profiles/b.yaml:6: guests[0].mac: MAC 52:54:00:aa:00:01 is also used by profiles/a.yaml:6"]


def test_duplicate_mac_differently_written(errors):
    assert errors(a=PROF, b=PROF2.replace("52:54:00:aa:00:02", "52-54-00-AA-00-01")) == [
        "profiles/b.yaml:6: guests[0].mac: MAC 52:54:00:aa:00:01 is also used by profiles/a.yaml:6"]


def test_duplicate_ip_across_guests(errors):
    assert errors(a=PROF, b=PROF2.replace("10.30.0.16", "10.30.0.15")) == [
        "profiles/b.yaml:7: guests[0].ipv4[0]: IP 10.30.0.15 is also used by profiles/a.yaml:7"]


def test_duplicate_ipv6_in_other_notation(errors):
    a = PROF.replace("    ipv4: [10.30.0.15]\n", "    ipv4: [10.30.0.15]\n    ipv6: ['fd00:30::15']\n")
    b = PROF2.replace("    ipv4: [10.30.0.16]\n", "    ipv4: [10.30.0.16]\n    ipv6: ['fd00:30:0:0::15']\n")
    assert errors(a=a, b=b) == [
        "profiles/b.yaml:8: guests[0].ipv6[0]: IP fd00:30::15 is also used by profiles/a.yaml:8"]


def test_duplicate_guest_name(errors):
    assert errors(a=PROF, b=PROF2.replace("name: g2", "name: g1")) == [
        "profiles/b.yaml:5: guests[0].name: guest name g1 is also used by profiles/a.yaml:5"]


def test_duplicate_guest_within_one_profile(errors):
    prof = PROF.replace("    ipv4: [10.30.0.15]\n", """\
    ipv4: [10.30.0.15]
  - name: g1
    mac: "52:54:00:aa:00:01"
""")
    assert errors(a=prof) == [
        "profiles/a.yaml:8: guests[1].name: guest name g1 is also used by profiles/a.yaml:5",
        "profiles/a.yaml:9: guests[1].mac: MAC 52:54:00:aa:00:01 is also used by profiles/a.yaml:6",
    ]


def test_guest_names_equal_after_nft_ident_mapping(errors):
    # g-1 and g_1 would both become chain out_g_1
    assert errors(a=PROF.replace("name: g1", "name: g-1"), b=PROF2.replace("name: g2", "name: g_1")) == [
        "profiles/b.yaml:5: guests[0].name: guest name g_1 is also used by profiles/a.yaml:5 as 'g-1' "
        "('-' and '_' are the same in nftables names)"]


def test_duplicate_profile_name(errors):
    assert errors(a=PROF, b=PROF2.replace("name: p2", "name: p1")) == [
        "profiles/b.yaml:1: name: profile name 'p1' is also used by profiles/a.yaml:1"]


def test_profile_names_equal_after_nft_ident_mapping(errors):
    assert errors(a=PROF.replace("name: p1", "name: line-3"), b=PROF2.replace("name: p2", "name: line_3")) == [
        "profiles/b.yaml:1: name: profile name 'line_3' is also used by profiles/a.yaml:1 as 'line-3' "
        "('-' and '_' are the same in nftables names)"]


def test_duplicate_explicit_port(errors):
    port = "    port: vnet7\n    ipv4"
    assert errors(a=PROF.replace("    ipv4", port), b=PROF2.replace("    ipv4", port)) == [
        "profiles/b.yaml:7: guests[0].port: port vnet7 is also used by profiles/a.yaml:7"]


# --------------------------------------------------------------- interface names
def test_bridge_name_too_long(errors):
    assert errors(a=PROF.replace("bridge: br0", "bridge: br0123456789abcd")) == [
        "profiles/a.yaml:2: bridge: interface name 'br0123456789abcd' is 16 characters; Linux allows at most 15"]


def test_bridge_name_of_15_characters_is_fine(loads):
    assert loads(a=PROF.replace("bridge: br0", "bridge: br0123456789abc")).profiles[0].profile.bridge == "br0123456789abc"


def test_bridge_name_odd_characters(errors):
    assert errors(a=PROF.replace("bridge: br0", "bridge: br0;rm")) == [
        "profiles/a.yaml:2: bridge: interface name 'br0;rm' may only contain letters, digits, '_', '.', '-' "
        "and must start with a letter or digit"]


def test_port_name_too_long(errors):
    assert errors(a=PROF.replace("    ipv4", "    port: vnet0123456789abc\n    ipv4")) == [
        "profiles/a.yaml:7: guests[0].port: interface name 'vnet0123456789abc' is 17 characters; Linux allows at most 15"]


def test_port_name_odd_characters(errors):
    assert errors(a=PROF.replace("    ipv4", "    port: vnet0;rm\n    ipv4")) == [
        "profiles/a.yaml:7: guests[0].port: interface name 'vnet0;rm' may only contain letters, digits, '_', '.', '-' "
        "and must start with a letter or digit"]


def test_site_bridge_key_is_an_interface_name(errors):
    assert errors(site=SITE + "bridges:\n  'br 0': {uplink: eth0}\n", a=PROF) == [
        "site.yaml:10: bridges.br 0.[key]: interface name 'br 0' may only contain letters, digits, '_', '.', '-' "
        "and must start with a letter or digit"]


# -------------------------------------------------------------------- VLANs, MACs
def test_vlan_is_a_management_vlan(errors):
    assert errors(a=PROF.replace("vlan: 30", "vlan: 250")) == [
        "profiles/a.yaml:3: vlan: VLAN 250 is a management VLAN (site.yaml management.vlans); a legacy guest may never be on it"]


@pytest.mark.parametrize("vlan", [0, 4095])
def test_vlan_out_of_range(errors, vlan):
    assert errors(a=PROF.replace("vlan: 30", f"vlan: {vlan}")) == [
        f"profiles/a.yaml:3: vlan: VLAN {vlan} is out of range 1-4094"]


def test_management_vlan_out_of_range(errors):
    assert errors(site=SITE.replace("vlans: [250]", "vlans: [250, 4095]"), a=PROF) == [
        "site.yaml:4: management.vlans[1]: VLAN 4095 is out of range 1-4094"]


def test_multicast_mac(errors):
    assert errors(a=PROF.replace("52:54:00:aa:00:01", "01:00:5e:00:00:01")) == [
        "profiles/a.yaml:6: guests[0].mac: 01:00:5e:00:00:01 is a multicast/broadcast MAC; a guest NIC has a unicast MAC"]


def test_malformed_mac(errors):
    assert errors(a=PROF.replace("52:54:00:aa:00:01", "52:54:00:aa:00")) == [
        "profiles/a.yaml:6: guests[0].mac: '52:54:00:aa:00' is not a MAC address like 52:54:00:aa:00:01"]


# ------------------------------------------------------------------- guard rails
def test_egress_to_internet_with_block_internet(errors):
    assert errors(a=PROF.replace("to: historian_db", "to: 8.8.8.8")) == [
        "profiles/a.yaml:9: egress[0].to: rule egress[0] to 8.8.8.8 tcp/1433: 8.8.8.8/32 is outside site.internal "
        "(internet) and block.internet is on"]


def test_egress_to_internet_allowed_when_block_internet_off(loads):
    cfg = loads(a=PROF.replace("to: historian_db", "to: 8.8.8.8") + "block: {internet: false}\n")
    (rule,) = cfg.profiles[0].egress
    assert [str(p) for p in rule.peers] == ["8.8.8.8/32"]


def test_egress_to_internet_via_group(errors):
    site = SITE.replace("historian_db: [10.30.0.20, fd00:30::20]", "historian_db: [10.30.0.20, 2001:db8::/32]")
    assert errors(site=site, a=PROF) == [
        "profiles/a.yaml:9: egress[0].to: rule egress[0] to historian_db tcp/1433: 2001:db8::/32 is outside site.internal "
        "(internet) and block.internet is on"]


def test_second_rule_is_named(errors):
    prof = PROF.replace("egress:\n", "egress:\n  - {to: historian_db, proto: udp, ports: [514]}\n").replace(
        "to: historian_db, proto: tcp", "to: 1.1.1.1, proto: tcp")
    assert errors(a=prof) == [
        "profiles/a.yaml:10: egress[1].to: rule egress[1] to 1.1.1.1 tcp/1433: 1.1.1.1/32 is outside site.internal "
        "(internet) and block.internet is on"]


def test_ingress_from_internet_with_block_internet(errors):
    assert errors(a=PROF.replace("from: jump_hosts", "from: 203.0.113.0/24")) == [
        "profiles/a.yaml:11: ingress[0].from: rule ingress[0] from 203.0.113.0/24 tcp/3389: 203.0.113.0/24 is outside "
        "site.internal (internet) and block.internet is on"]


def test_egress_to_domain_controller_with_block_domain(errors):
    assert errors(a=PROF.replace("to: historian_db", "to: 10.30.0.10")) == [
        "profiles/a.yaml:9: egress[0].to: rule egress[0] to 10.30.0.10 tcp/1433: 10.30.0.10/32 is a domain controller "
        "and block.domain is on"]


def test_egress_to_domain_controller_inside_a_wider_cidr(errors):
    assert errors(a=PROF.replace("to: historian_db", "to: 10.30.0.0/28")) == [
        "profiles/a.yaml:9: egress[0].to: rule egress[0] to 10.30.0.0/28 tcp/1433: 10.30.0.1/32 is a hypervisor address, "
        "which a legacy guest may never reach",
        "profiles/a.yaml:9: egress[0].to: rule egress[0] to 10.30.0.0/28 tcp/1433: 10.30.0.10/32 is a domain controller "
        "and block.domain is on",
    ]


def test_egress_to_domain_controller_allowed_when_block_domain_off(loads):
    cfg = loads(a=PROF.replace("to: historian_db", "to: 10.30.0.10") + "block: {domain: false}\n")
    assert [str(p) for p in cfg.profiles[0].egress[0].peers] == ["10.30.0.10/32"]


def test_egress_into_management_networks(errors):
    assert errors(a=PROF.replace("to: historian_db", "to: 10.30.250.0/28") + "block: {internet: false, domain: false}\n") == [
        "profiles/a.yaml:9: egress[0].to: rule egress[0] to 10.30.250.0/28 tcp/1433: 10.30.250.0/28 is in "
        "management.networks, which a legacy guest may never reach"]


def test_ingress_from_hypervisor(errors):
    assert errors(a=PROF.replace("from: jump_hosts", "from: [jump_hosts, 10.30.0.1]")) == [
        "profiles/a.yaml:11: ingress[0].from: rule ingress[0] from jump_hosts+10.30.0.1 tcp/3389: 10.30.0.1/32 is a "
        "hypervisor address, which a legacy guest may never reach"]


def test_guest_address_in_management_network(errors):
    assert errors(a=PROF.replace("[10.30.0.15]", "[10.30.250.5]")) == [
        "profiles/a.yaml:7: guests[0].ipv4[0]: 10.30.250.5 is inside management.networks"]


def test_guest_address_is_the_hypervisor(errors):
    assert errors(a=PROF.replace("[10.30.0.15]", "[10.30.0.1]")) == [
        "profiles/a.yaml:7: guests[0].ipv4[0]: 10.30.0.1 is a hypervisor or domain controller address"]


# ------------------------------------------------------------- whole-run behaviour
def test_several_problems_are_all_reported_sorted(errors):
    a = PROF.replace("vlan: 30", "vlan: 0").replace("[1433]", "[70000]")
    b = PROF2.replace("bridge: br0", "bridge: br0;x")
    site = SITE.replace("10.30.250.0/24", "10.30.250.0/33")
    assert errors(site=site, a=a, b=b) == [
        "profiles/a.yaml:3: vlan: VLAN 0 is out of range 1-4094",
        "profiles/a.yaml:9: egress[0].ports[0]: port 70000 is out of range 1-65535",
        "profiles/b.yaml:2: bridge: interface name 'br0;x' may only contain letters, digits, '_', '.', '-' "
        "and must start with a letter or digit",
        "site.yaml:3: management.networks[0]: '10.30.250.0/33' is not an IP address or CIDR",
    ]


def test_several_semantic_problems_are_all_reported(errors):
    a = PROF.replace("to: historian_db", "to: 8.8.8.8").replace("from: jump_hosts", "from: nobody")
    b = PROF2.replace("aa:00:02", "aa:00:01").replace("vlan: 30", "vlan: 250")
    assert errors(a=a, b=b) == [
        "profiles/a.yaml:9: egress[0].to: rule egress[0] to 8.8.8.8 tcp/1433: 8.8.8.8/32 is outside site.internal "
        "(internet) and block.internet is on",
        "profiles/a.yaml:11: ingress[0].from: unknown group 'nobody' (site.yaml groups: historian_db, jump_hosts)",
        "profiles/b.yaml:3: vlan: VLAN 250 is a management VLAN (site.yaml management.vlans); a legacy guest may never be on it",
        "profiles/b.yaml:6: guests[0].mac: MAC 52:54:00:aa:00:01 is also used by profiles/a.yaml:6",
    ]


def test_problems_carry_structured_fields(cfgdir):
    with pytest.raises(ConfigError) as info:
        load_config(cfgdir(a=PROF.replace("[1433]", "[1433, 70000]")))
    assert info.value.problems == [
        ConfigProblem("profiles/a.yaml", 9, "egress[0].ports[1]", "port 70000 is out of range 1-65535")]


def test_missing_site_yaml_means_defaults(loads):
    cfg = loads(site=None, a=PROF.replace("to: historian_db", "to: 10.30.0.20").replace("from: jump_hosts", "from: 10.30.0.30"))
    assert [str(n) for n in cfg.site.internal] == list(DEFAULT_INTERNAL)
    assert cfg.site.groups == {} and cfg.site.hypervisor == [] and cfg.site.management.vlans == []
    assert cfg.site_source.file == "site.yaml"


def test_missing_site_yaml_still_checks_groups(errors):
    assert errors(site=None, a=PROF) == [
        "profiles/a.yaml:9: egress[0].to: unknown group 'historian_db' (site.yaml groups: none defined)",
        "profiles/a.yaml:11: ingress[0].from: unknown group 'jump_hosts' (site.yaml groups: none defined)",
    ]


def test_no_profiles_is_a_valid_config(loads):
    cfg = loads()
    assert cfg.profiles == ()


def test_missing_config_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.exit_code == 2
    assert [str(p) for p in info.value.problems] == [f"{missing}: config directory does not exist"]


def test_absolute_file_names_outside_cwd(tmp_path, monkeypatch):
    d = tmp_path / "cfg"
    (d / "profiles").mkdir(parents=True)
    (d / "site.yaml").write_text(SITE)
    (d / "profiles" / "a.yaml").write_text(PROF.replace("vlan: 30", "vlan: 0"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ConfigError) as info:
        load_config(d)
    assert [str(p) for p in info.value.problems] == [f"{d}/profiles/a.yaml:3: vlan: VLAN 0 is out of range 1-4094"]
