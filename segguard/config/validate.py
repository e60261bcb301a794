"""Load a config directory into a validated, resolved `Config`, or raise ConfigError
listing every problem as `file:line: field: message`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netaddr
from pydantic import BaseModel, ValidationError

from segguard.config.loader import Document, SourceMap, load_yaml
from segguard.config.schema import AD_PORTS, Guest, Profile, Site
from segguard.errors import ConfigError, ConfigProblem
from segguard.gcpause import gc_paused

DEFAULT_CONFIG_DIR = Path("/etc/segguard")


@dataclass(frozen=True)
class ResolvedRule:
    """An allow rule with its peers resolved to addresses. `direction` is 'egress'
    (the guest opens the flow to `peers`) or 'ingress' (`peers` open it to the guest)."""

    direction: str
    index: int
    peers_named: tuple[str, ...]
    peers: tuple[netaddr.IPNetwork, ...]
    proto: str
    ports: tuple[tuple[int, int], ...]

    @property
    def label(self) -> str:
        ports = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.ports)
        return f"{self.direction}[{self.index}] {'to' if self.direction == 'egress' else 'from'} {'+'.join(self.peers_named)} {self.proto}{('/' + ports) if ports else ''}"


@dataclass(frozen=True)
class LoadedProfile:
    profile: Profile
    source: SourceMap
    egress: tuple[ResolvedRule, ...]
    ingress: tuple[ResolvedRule, ...]

    @property
    def name(self) -> str:
        return self.profile.name


@dataclass(frozen=True)
class Config:
    directory: Path
    site: Site
    site_source: SourceMap
    profiles: tuple[LoadedProfile, ...]

    def guests(self) -> list[tuple[LoadedProfile, Guest]]:
        return [(lp, g) for lp in self.profiles for g in lp.profile.guests]


def config_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("SEGGUARD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_DIR


def _model(cls: type[BaseModel], doc: Document, problems: list[ConfigProblem]) -> Any:
    if not isinstance(doc.data, dict):
        problems.append(doc.source.problem((), f"must be a YAML mapping, got {type(doc.data).__name__}"))
        return None
    try:
        return cls.model_validate(doc.data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required field is missing"
            problems.append(doc.source.problem(loc, msg))
        return None


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@gc_paused()  # ~10^5 objects that all stay alive: see segguard/gcpause.py
def load_config(directory: str | os.PathLike[str] | None = None) -> Config:
    root = config_dir(directory)
    problems: list[ConfigProblem] = []
    site_path = root / "site.yaml"
    if not root.is_dir():
        raise ConfigError([ConfigProblem(str(root), None, "", "config directory does not exist")])
    try:
        site_doc = load_yaml(site_path, _display(site_path, root)) if site_path.exists() else Document({}, SourceMap(_display(site_path, root)))
    except ConfigError as exc:
        problems.extend(exc.problems)
        site_doc = None
    site = _model(Site, site_doc, problems) if site_doc else None

    docs: list[tuple[Document, Profile | None]] = []
    profile_files = sorted((root / "profiles").glob("*.yaml")) + sorted((root / "profiles").glob("*.yml"))
    for path in profile_files:
        try:
            doc = load_yaml(path, _display(path, root))
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        docs.append((doc, _model(Profile, doc, problems)))

    if site is None or problems:
        raise ConfigError(problems)
    profiles = tuple(_resolve(site, doc, prof, problems) for doc, prof in docs if prof is not None)
    _cross_checks(site, site_doc.source, profiles, problems)
    if problems:
        raise ConfigError(problems)
    return Config(root, site, site_doc.source, profiles)


def _resolve(site: Site, doc: Document, prof: Profile, problems: list[ConfigProblem]) -> LoadedProfile:
    src = doc.source
    internal = netaddr.IPSet(site.internal)
    dcs = netaddr.IPSet(site.domain_controllers)
    mgmt = netaddr.IPSet(site.management.networks)
    hyp = netaddr.IPSet(site.hypervisor)

    def resolve_rules(direction: str, rules, key: str) -> tuple[ResolvedRule, ...]:
        out = []
        for i, rule in enumerate(rules):
            names = rule.to if direction == "egress" else rule.from_
            scalar = not isinstance(doc.data[direction][i][key], list)
            peers: list[netaddr.IPNetwork] = []
            for j, name in enumerate(names):
                path = (direction, i, key) if scalar else (direction, i, key, j)
                if name in site.groups:
                    peers.extend(site.groups[name])
                    continue
                try:
                    net = netaddr.IPNetwork(name)
                except (netaddr.AddrFormatError, ValueError):
                    known = ", ".join(sorted(site.groups)) or "none defined"
                    problems.append(src.problem(path, f"unknown group {name!r} (site.yaml groups: {known})"))
                    continue
                if net.ip != net.network:  # as schema._cidr: never widen silently
                    problems.append(src.problem(path, f"{name!r} has host bits set; did you mean {net.cidr}?"))
                    continue
                peers.append(net.cidr)
            rr = ResolvedRule(direction, i, tuple(names), tuple(peers), rule.proto, tuple(rule.ports))
            where = (direction, i, key)
            peerset = netaddr.IPSet(peers)
            verb = "to" if direction == "egress" else "from"
            if peerset & mgmt:
                problems.append(src.problem(where, f"rule {rr.label}: {_fmt(peerset & mgmt)} is in management.networks, which a legacy guest may never reach"))
            if peerset & hyp:
                problems.append(src.problem(where, f"rule {rr.label}: {_fmt(peerset & hyp)} is a hypervisor address, which a legacy guest may never reach"))
            if prof.block.internet and (outside := peerset - internal):
                problems.append(src.problem(where, f"rule {rr.label}: {_fmt(outside)} is outside site.internal (internet) and block.internet is on"))
            if prof.block.domain and peerset & dcs:
                problems.append(src.problem(where, f"rule {rr.label}: {_fmt(peerset & dcs)} is a domain controller and block.domain is on"))
            out.append(rr)
        return tuple(out)

    return LoadedProfile(prof, src, resolve_rules("egress", prof.egress, "to"), resolve_rules("ingress", prof.ingress, "from"))


def _fmt(ipset: netaddr.IPSet) -> str:
    cidrs = [str(c) for c in ipset.iter_cidrs()]
    return ", ".join(cidrs[:4]) + (f" (+{len(cidrs) - 4} more)" if len(cidrs) > 4 else "")


def _same_ident(name: str, other: str) -> str:
    return f" as {other!r} ('-' and '_' are the same in nftables names)" if name != other else ""


def _cross_checks(site: Site, site_src: SourceMap, profiles: tuple[LoadedProfile, ...], problems: list[ConfigProblem]) -> None:
    seen_profile: dict[str, tuple[str, str]] = {}  # ident(name) -> (name, "file:line")
    guest_names: dict[str, str] = {}  # ident(name) -> name
    seen: dict[tuple[str, str], str] = {}  # (kind, value) -> "file:line"
    mgmt_vlans = set(site.management.vlans)
    for lp in profiles:
        src, prof = lp.source, lp.profile
        here = f"{src.file}:{src.line(('name',))}"
        # nftables object names replace '-' by '_' (compile.nft.ident): names equal after
        # that would share chains, so they count as the same name
        pkey = prof.name.replace("-", "_")
        if pkey in seen_profile:
            other, where = seen_profile[pkey]
            problems.append(src.problem(("name",), f"profile name {prof.name!r} is also used by {where}{_same_ident(prof.name, other)}"))
        seen_profile.setdefault(pkey, (prof.name, here))
        if prof.vlan in mgmt_vlans:
            problems.append(src.problem(("vlan",), f"VLAN {prof.vlan} is a management VLAN (site.yaml management.vlans); a legacy guest may never be on it"))
        for gi, guest in enumerate(prof.guests):
            checks = [("guest name", guest.name.replace("-", "_"), ("guests", gi, "name")), ("MAC", guest.mac, ("guests", gi, "mac"))]
            if guest.port:
                checks.append(("port", guest.port, ("guests", gi, "port")))
            checks += [("IP", str(a), ("guests", gi, "ipv4", k)) for k, a in enumerate(guest.ipv4)]
            checks += [("IP", str(a), ("guests", gi, "ipv6", k)) for k, a in enumerate(guest.ipv6)]
            for kind, value, path in checks:
                loc = f"{src.file}:{src.line(path)}"
                if (kind, value) in seen:
                    shown = guest.name if kind == "guest name" else value
                    note = _same_ident(guest.name, guest_names[value]) if kind == "guest name" else ""
                    problems.append(src.problem(path, f"{kind} {shown} is also used by {seen[(kind, value)]}{note}"))
                else:
                    seen[(kind, value)] = loc
                    if kind == "guest name":
                        guest_names[value] = guest.name
            for k, addr in enumerate(guest.ipv4 + guest.ipv6):
                fam = "ipv4" if addr.version == 4 else "ipv6"
                idx = k if addr.version == 4 else k - len(guest.ipv4)
                if addr in netaddr.IPSet(site.management.networks):
                    problems.append(src.problem(("guests", gi, fam, idx), f"{addr} is inside management.networks"))
                if addr in netaddr.IPSet(site.hypervisor) or addr in netaddr.IPSet(site.domain_controllers):
                    problems.append(src.problem(("guests", gi, fam, idx), f"{addr} is a hypervisor or domain controller address"))
