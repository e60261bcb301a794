"""Load a config directory into a validated, resolved `Config`, or raise ConfigError
listing every problem as `file:line: field: message`."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

import netaddr
from pydantic import BaseModel, ValidationError

from segguard.config.loader import Document, SourceMap, load_yaml
from segguard.config.schema import Guest, Profile, Site
from segguard.errors import ConfigError, ConfigProblem
from segguard.gcpause import gc_paused

DEFAULT_CONFIG_DIR = Path("/etc/segguard")


@dataclass(frozen=True, slots=True)
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


# An agent keeps ~10 resolved rules per profile for a thousand profiles, and most name
# the same peers and ports: one tuple per distinct value serves them all (and pickles
# once, for the agent's load in a child). Bounded: an agent lives through many edits.
_SHARED: dict[tuple, tuple] = {}


def _shared(value: tuple) -> tuple:
    if len(_SHARED) >= 1 << 16:
        _SHARED.clear()
    return _SHARED.setdefault(value, value)


@dataclass(frozen=True, slots=True)
class LoadedProfile:
    """A validated profile as a loaded config keeps it: `egress`/`ingress` are the
    resolved rules (profile.egress/ingress, the raw rule models, are emptied once
    resolved), and `source` keeps the lines of what later cross-file checks can name
    (the profile's name, bridge, VLAN and guests): an agent holds a thousand of these."""
    profile: Profile
    source: SourceMap
    egress: tuple[ResolvedRule, ...]
    ingress: tuple[ResolvedRule, ...]

    def kept(self) -> LoadedProfile:
        lines = {k: v for k, v in self.source.lines.items() if not k or k[0] in _KEPT_LINES}
        return LoadedProfile(self.profile.model_copy(update={"egress": [], "ingress": []}),
                             SourceMap(self.source.file, lines), self.egress, self.ingress)

    @property
    def name(self) -> str:
        return self.profile.name


_KEPT_LINES = frozenset({"name", "bridge", "vlan", "guests", "mode", "default", "block"})


@dataclass(frozen=True)
class Config:
    directory: Path
    site: Site
    site_source: SourceMap
    profiles: tuple[LoadedProfile, ...]
    # each file's content digest (site.yaml's included, by resolved path): a reload
    # re-parses only the files whose bytes changed
    digests: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # the profile file names in load order (one per entry of `profiles`, unless a file
    # failed: then no Config exists), for a reload told which files changed
    files: tuple[str, ...] = field(default=(), compare=False, repr=False)
    # those of them that are symlinks: an edit of a link's target elsewhere raises no
    # event in profiles/, so a told reload reads them every time (their digest decides)
    links: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

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


def _display(path: Path, cwd: Path) -> str:
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


def _read(path: Path, display: str) -> tuple[bytes, str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigProblem(display, None, "", f"cannot read: {exc.strerror or exc}")]) from exc
    return data, hashlib.blake2b(data, digest_size=16).hexdigest()


@gc_paused()  # ~10^5 objects that all stay alive: see segguard/gcpause.py
def load_config(directory: str | os.PathLike[str] | None = None, previous: Config | None = None,
                changed: Collection[str] | None = None) -> Config:
    """Load and validate the whole config directory. With `previous` (the last good
    config of the same directory), a profile file whose bytes and site.yaml are both
    unchanged is not parsed again: its validated profile is reused as it is (the agent
    reloading after one edit of a 1,000-profile config).

    `changed` (with `previous`): the names of the files in profiles/ that may have
    changed since `previous` was loaded, as inotify reported them; every other file
    is taken as it was without reading it (but for symlinks: their targets change
    unseen), and site.yaml must not be among them (the agent passes None whenever it
    cannot say: a lost event, the directory replaced; a symlinked site.yaml reads all).
    Cross-file checks run over every profile unless the re-parsed profiles kept their
    names, VLANs and guests (what those checks read) and no file came or went: the
    result is the one a fresh load gives either way."""
    root = config_dir(directory)
    cwd = Path.cwd()
    problems: list[ConfigProblem] = []
    site_path = root / "site.yaml"
    if not root.is_dir():
        raise ConfigError([ConfigProblem(str(root), None, "", "config directory does not exist")])
    pdir = root / "profiles"
    shown = _display(pdir, cwd)
    told = (changed is not None and previous is not None and previous.directory == root and "site.yaml" not in changed
            and previous.site_source.file == _display(site_path, cwd) and not any("/" in n for n in changed)
            and len(previous.files) == len(previous.profiles) and not site_path.is_symlink())
    digests: dict[str, str] = {}
    site_doc: Document | None
    if told:
        site, site_doc = previous.site, Document(None, previous.site_source)
        if str(site_path) in previous.digests:
            digests[str(site_path)] = previous.digests[str(site_path)]
    else:
        try:
            if site_path.exists():
                data, digests[str(site_path)] = _read(site_path, _display(site_path, cwd))
                site_doc = load_yaml(site_path, _display(site_path, cwd), data)
            else:
                site_doc = Document({}, SourceMap(_display(site_path, cwd)))
        except ConfigError as exc:
            problems.extend(exc.problems)
            site_doc = None
        site = _model(Site, site_doc, problems) if site_doc else None
    reusable: dict[str, LoadedProfile] = {}  # by file name
    if (previous is not None and previous.directory == root and site is not None
            and previous.digests.get(str(site_path)) == digests.get(str(site_path))
            and previous.site_source.file == _display(site_path, cwd)):  # the same cwd: the same file labels
        if len(previous.files) == len(previous.profiles):
            reusable = dict(zip(previous.files, previous.profiles))
        else:
            reusable = {lp.source.file.rpartition("/")[2]: lp for lp in previous.profiles}

    if told:
        names = list(previous.files)
        here = {n for n in changed if n.endswith((".yaml", ".yml")) and (pdir / n).is_file()}
        had = {n for n in changed if f"{pdir}/{n}" in previous.digests}
        aligned = here == had
        if not aligned:  # a file came or went: the load order is the sorted names again
            names = sorted(set(names) - set(changed) | here)
            names = [n for n in names if n.endswith(".yaml")] + [n for n in names if n.endswith(".yml")]
        links = (previous.links - set(changed)) | {n for n in here if (pdir / n).is_symlink()}
        to_read = here | links
    else:
        # names, not Path objects: sorting and relative_to on a thousand Paths cost more
        # than reading the files
        entries = list(os.scandir(pdir)) if pdir.is_dir() else []
        found = [e.name for e in entries]
        names = sorted(n for n in found if n.endswith(".yaml")) + sorted(n for n in found if n.endswith(".yml"))
        links = frozenset(e.name for e in entries if e.is_symlink())
        to_read, aligned = None, False  # read all

    reparsed: list[tuple[LoadedProfile | None, LoadedProfile]] = []  # (the file's previous profile, its new one)
    # Problems of rule resolution are reported only when no file failed to parse or
    # to match the schema (as ever); each profile is resolved and slimmed as soon as
    # it is read, so a thousand parsed documents never sit in memory at once.
    resolve_problems: list[ConfigProblem] = []
    pdir_s = str(pdir)
    slots: list[LoadedProfile | None]
    if to_read is not None and aligned and len(reusable) == len(names):
        # told which files changed, none came or went: the rest stays as it was,
        # without a step per file
        slots = list(previous.profiles)
        digests.update(previous.digests)
        todo = sorted((names.index(n), n) for n in to_read)
    else:
        slots = [None] * len(names)
        todo = list(enumerate(names))
    for i, name in todo:
        key = f"{pdir_s}/{name}"  # str(pdir / name), without a Path per file
        old = reusable.get(name)
        if to_read is not None and name not in to_read and old is not None:
            digests[key] = previous.digests[key]
            slots[i] = old
            continue
        path = pdir / name
        display = name if shown == "." else f"{shown}/{name}"
        try:
            data, digest = _read(path, display)
            digests[key] = digest
            if old is not None and previous.digests.get(key) == digest:
                slots[i] = old
                continue
            doc = load_yaml(path, display, data)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        prof = _model(Profile, doc, problems)
        if prof is not None and site is not None:
            lp = _resolve(site, doc, prof, resolve_problems).kept()
            slots[i] = lp
            reparsed.append((old, lp))
    if site is None or problems:
        raise ConfigError(problems)
    problems = resolve_problems
    profiles = tuple(slots)  # every slot is filled: an empty one recorded a problem, raised above
    same_keys = (previous is not None and reusable and tuple(names) == previous.files
                 and all(o is not None and _cross_key(o) == _cross_key(n) for o, n in reparsed))
    if not same_keys:
        _cross_checks(site, site_doc.source, profiles, problems)
    if problems:
        raise ConfigError(problems)
    return Config(root, site, site_doc.source, profiles, digests, tuple(names),
                  frozenset(links) & set(names) if links else frozenset())


def _cross_key(lp: LoadedProfile) -> tuple:
    """What the cross-file checks read of a profile (its name, VLAN and guests)."""
    return lp.profile.name, lp.profile.vlan, lp.profile.guests


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
            rr = ResolvedRule(direction, i, _shared(tuple(names)), _shared(tuple(peers)), rule.proto,
                              _shared(tuple(_shared(tuple(p)) for p in rule.ports)))
            where = (direction, i, key)
            peerset = netaddr.IPSet(peers)
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


def _where(src: SourceMap, path: tuple) -> str:
    return f"{src.file}:{src.line(path)}"


def _ranges(nets) -> list[tuple[int, int, int]]:
    return [(n.version, n.first, n.last) for n in map(netaddr.IPNetwork, nets)]


def _inside(addr: netaddr.IPAddress, ranges: list[tuple[int, int, int]]) -> bool:
    v, version = int(addr), addr.version
    for ver, lo, hi in ranges:
        if ver == version and lo <= v <= hi:
            return True
    return False


def _cross_checks(site: Site, site_src: SourceMap, profiles: tuple[LoadedProfile, ...], problems: list[ConfigProblem]) -> None:
    seen_profile: dict[str, tuple[str, str]] = {}  # ident(name) -> (name, "file:line")
    guest_names: dict[str, str] = {}  # ident(name) -> name
    seen: dict[tuple[str, str], tuple[SourceMap, tuple]] = {}  # (kind, value) -> where (formatted only if needed)
    mgmt_vlans = set(site.management.vlans)
    # as (version, first, last): netaddr's `in IPSet` costs ~80 hashes per address, and
    # this runs for every guest address of the fleet on every reload
    mgmt_ranges = _ranges(site.management.networks)
    infra_ranges = _ranges([*site.hypervisor, *site.domain_controllers])
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
                if (kind, value) in seen:
                    shown = guest.name if kind == "guest name" else value
                    note = _same_ident(guest.name, guest_names[value]) if kind == "guest name" else ""
                    problems.append(src.problem(path, f"{kind} {shown} is also used by {_where(*seen[(kind, value)])}{note}"))
                else:
                    seen[(kind, value)] = (src, path)
                    if kind == "guest name":
                        guest_names[value] = guest.name
            for k, addr in enumerate(guest.ipv4 + guest.ipv6):
                fam = "ipv4" if addr.version == 4 else "ipv6"
                idx = k if addr.version == 4 else k - len(guest.ipv4)
                if _inside(addr, mgmt_ranges):
                    problems.append(src.problem(("guests", gi, fam, idx), f"{addr} is inside management.networks"))
                if _inside(addr, infra_ranges):
                    problems.append(src.problem(("guests", gi, fam, idx), f"{addr} is a hypervisor or domain controller address"))
