"""Observe -> diff -> apply.

  desired   the plan compiled from the last good config and the host as it is now
  applied   the plan this agent last made the kernel hold
  realized  the table as the kernel lists it now

realized != applied is drift (someone changed the kernel); desired != applied is a
change of the world (a tap appeared, the config changed). Either way the kernel is
made to hold `desired`: by element updates when only port bindings differ, else by the
one-transaction replace. Every write happens under flow.writer_lock, the lock every
writer takes. Nothing here ever deletes the table or flushes anything.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from segguard.agent.vlans import FULL_CHECK, restore_view
from segguard.apply.incremental import (ELEMENT_OBJECTS, LiveElements, apply_delta, catch_up_delta, collect_delta,
                                        delta_batch, element_delta, in_force_elements, interval_deletes,
                                        interval_elements, read_back_elements, read_back_touched, rebind_delta,
                                        record_collected, record_leftovers, send_delta, settle_leftovers,
                                        without_leftovers)
from segguard.apply.nftables import Fingerprint, NftablesApplier, diff_objects, normalize, rule_order
from segguard.compile import compile_plan
from segguard.compile.nft import FOREIGN_MAC, FOREIGN_MAC_AUDIT, ident, reachable
from segguard.config.validate import Config, LoadedProfile, load_config
from segguard.errors import ConfigError, SegguardError
from segguard.host import HostFacts
from segguard.plan import Binding, Plan, concat_fields, jsonable

MEMBERSHIP = ELEMENT_OBJECTS
# the full road sends an element delta with at most this many interval-set deletes
# (each up to ~50 ms in the kernel with 900 ports bound), and replaces the table past it
FEW_INTERVAL_DELETES = 16
# one port's leftovers are deleted by elements when fewer interval-set elements than
# this stay beside them; otherwise, and for several ports', the sets that hold them are
# rebuilt (NftablesApplier.rebuild). Measured on 6.18 (1,000 guests): 10 element
# deletes among 1,000 / 3,000 / 9,000 others 40 / 110 / 500 ms, 650 alone in the sets
# 118-250 ms; a rebuild 50 ms with few elements left, 0.2 s with 9,350; the replace of
# the whole table, the rebuild's fallback, 0.85 s beside 899 running taps
FEW_REMAINING = 300
SHARED_SETS = ("internal4", "internal6", "dc4", "dc6", "mgmt4", "mgmt6", "hyp4", "hyp6", "ad_ports")
# the base chains and the MAC guard's verdicts, which every guest's MAC meets
BASE_CHAINS = ("prerouting", "input", "forward", "output", FOREIGN_MAC, FOREIGN_MAC_AUDIT)


# ---------------------------------------------------------------- host facts, cheaply

class TopologyReader:
    """Host facts for the agent and the hook. Kernel capabilities are probed once (the
    VLAN probe creates a scratch bridge: doing that per link event would feed itself).
    Links come from the agent's LinkMonitor when one is attached (`monitor`: its table
    follows every link event, and is read afresh after lost events), otherwise from a
    dump per call; a bridge's addresses are read again only after an address event on
    it. A dump of 2,000 links per tap bind had made a bind with 1,000 taps present
    cost seconds."""

    def __init__(self, caps: HostFacts | None = None, with_libvirt: bool = True):
        self._caps = caps
        self.with_libvirt = with_libvirt
        self.monitor = None  # events.LinkMonitor
        self._addrs: dict[int, tuple[int, tuple[str, ...]]] = {}  # bridge index -> (addr_version, addresses)
        # bridge name -> (monitor epoch, changes seen, bridge index, BridgeFact): the last
        # reading of each bridge, brought up to date by the monitor's changes alone
        self._bridges: dict[str, tuple[int, int, int, Any]] = {}

    def caps(self) -> HostFacts:
        if self._caps is None:
            from segguard.host.netlink import _bridge_conntrack_available, _try_vlan_filtering

            self._caps = HostFacts(bridge_conntrack=_bridge_conntrack_available(), vlan_filtering=_try_vlan_filtering())
        return self._caps

    def _addresses(self, index: int) -> tuple[str, ...]:
        from segguard.host import rtnl

        if self.monitor is None:
            return rtnl.addresses(index)
        version = self.monitor.addr_version.get(index, 0)
        hit = self._addrs.get(index)
        if hit is None or hit[0] != version:
            hit = self._addrs[index] = (version, rtnl.addresses(index))
        return hit[1]

    def facts(self, bridges: list[str]) -> HostFacts:
        from segguard.host import rtnl
        from segguard.host.netlink import bridge_facts

        caps = self.caps()
        try:
            if self.monitor is not None and not caps.vlan_filtering:
                found = self._bridges_by_changes(bridges)
            else:
                links = self.monitor.links if self.monitor is not None else rtnl.links()
                found = bridge_facts(bridges, links, self._addresses, vlans=bool(caps.vlan_filtering))
        except OSError as exc:
            from segguard.errors import HostError

            raise HostError(f"cannot read links over netlink: {exc}") from exc
        lv: tuple[tuple[str, str], ...] = ()
        if self.with_libvirt:
            from segguard.host.libvirt import libvirt_ports

            lv = libvirt_ports()
        return HostFacts(bridges=tuple(found), libvirt_ports=lv, bridge_conntrack=caps.bridge_conntrack,
                         vlan_filtering=caps.vlan_filtering)

    def _bridges_by_changes(self, bridges: list[str]) -> list[Any]:
        """bridge_facts from the monitor's table, each bridge's last reading brought up
        to date by the link changes since (host/netlink.py bridge_fact_updated); a
        bridge read whole when the monitor read its table afresh, its log does not
        reach back, or the bridge link itself changed."""
        from segguard.host.netlink import bridge_fact_updated, bridge_facts

        mon = self.monitor
        found = []
        for name in sorted(set(bridges)):
            fact, hit = None, self._bridges.get(name)
            if hit is not None:
                epoch, seen, index, old = hit
                changes = mon.changes_since(epoch, seen)
                if changes is not None:
                    fact = bridge_fact_updated(old, index, changes, self._addresses(index))
            if fact is None:
                index = next((l.index for l in mon.links.values() if l.name == name), None)
                whole = bridge_facts([name], mon.links, self._addresses, vlans=False) if index is not None else []
                if not whole:
                    self._bridges.pop(name, None)
                    continue
                fact = whole[0]
            self._bridges[name] = (mon.epoch, mon.changes, index, fact)
            found.append(fact)
        return found

    def close(self) -> None:
        self._addrs.clear()
        self._bridges.clear()


# ---------------------------------------------------------------- drift, by kind

def classify_drift(applied: list[dict[str, Any]], realized: list[dict[str, Any]] | None) -> list[tuple[str, str]]:
    """(kind, detail) for each way the kernel differs from what was applied."""
    if realized is None:
        return [("table-deleted", "table bridge segguard is gone")]
    out: list[tuple[str, str]] = []
    d = diff_objects(applied, realized)
    seen: set[tuple[str, str]] = set()
    for side, objs in (("missing", d.missing), ("unexpected", d.unexpected)):
        for o in objs:
            kind, body = next(iter(o.items()))
            if kind == "rule":
                item = ("rule-changed", f"chain {body['chain']}")
            elif kind in ("set", "map"):
                item = ("elements-changed" if _same_but_elems(o, applied, realized) else "set-changed", f"{kind} {body['name']}")
            elif kind == "chain":
                item = ("chain-changed", f"chain {body['name']}")
            else:
                item = (f"{kind}-changed", json.dumps(body, sort_keys=True, default=jsonable)[:120])
            if item not in seen:
                seen.add(item)
                out.append(item)
    if not out and rule_order(applied) != rule_order(realized):
        out.append(("rule-order-changed", "rules reordered"))
    return out


def _same_but_elems(obj: dict[str, Any], a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    kind, body = next(iter(obj.items()))

    def bare(objs):
        for o in objs:
            k, bd = next(iter(o.items()))
            if k == kind and bd.get("name") == body.get("name"):
                return normalize([{k: {x: y for x, y in bd.items() if x != "elem"}}])
        return None

    x, y = bare(a), bare(b)
    return x is not None and x == y


# ---------------------------------------------------------------- one guest's slice

def _membership_filter(name: str, elems: list[Any], b: Binding) -> list[Any]:
    if name == "legacy_macs":  # [mac, verdict]
        return [e for e in elems if e[0] == b.mac]
    if name == "bound_ports":
        return [e for e in elems if (f := concat_fields(e)) is not None and (f[0] == b.mac or (b.port and f[1] == b.port))]
    if not b.port:
        return []
    return [e for e in elems if _keyed_port(e) == b.port]


def _keyed_port(e: Any) -> Any:
    """The port an element is keyed by: a map's [port, verdict], a port-keyed set's
    (port, ...) as a plan's Concat or a listing's {"concat": [...]}."""
    if type(e) is list:
        return e[0]
    fields = concat_fields(e)
    return fields[0] if fields else None


def _class_chain_names(objects: list[dict[str, Any]], b: Binding) -> set[str]:
    """The chains this guest's port is dispatched to: its profile's kind of chains
    (known even while it is unbound; bind.py records them). A binding read from a
    state file written before they were recorded has none: the dispatch maps say."""
    out = set(b.chains)
    if out:
        return out
    for obj in objects:
        body = obj.get("map")
        if body and body.get("name") in ("out_dispatch", "in_dispatch") and b.port:
            out |= {e[1]["goto"]["target"] for e in body.get("elem", []) if e[0] == b.port and "goto" in e[1]}
    return out


def guest_scope(objects: list[dict[str, Any]], b: Binding) -> tuple[set[str], set[str]]:
    """The chains and sets guest `b`'s frames can meet in `objects`."""
    own_nd = f"nd_{ident(b.guest)}"
    # (not traversed from the base chains: their dispatch maps name every port's chains)
    chains, used = reachable(objects, {own_nd, *_class_chain_names(objects, b)})
    # nd_dispatch names every IPv6 guest's ND chain; only its own is this guest's
    return {c for c in chains if not c.startswith("nd_") or c == own_nd} | set(BASE_CHAINS), used


def guest_view(objects: list[dict[str, Any]], b: Binding, scope: tuple[set[str], set[str]] | None = None) -> list[dict[str, Any]]:
    """What of the table concerns guest `b`: the chains its frames can reach from its
    port's chains (its ND chain, its kind of profile's chains and the common chains
    they jump to), the shared sets they use, the base chains, and exactly its
    elements of the port-keyed sets and maps (its MAC, its port)."""
    import re

    chains, used = scope or guest_scope(objects, b)

    port_chain = "in_" + re.sub(r"[^A-Za-z0-9_]", "_", b.port) if b.port else None
    out = []
    for obj in objects:
        kind, body = next(iter(obj.items()))
        if body.get("family") == "netdev":
            # the per-port ingress chain of its own port (compile/nft.py _port_ingress)
            # (not the netdev table itself: it exists iff some port has a chain)
            if kind != "table" and port_chain and body.get("chain" if kind == "rule" else "name") == port_chain:
                out.append(obj)
            continue
        if kind == "table":
            out.append(obj)
        elif kind in ("chain", "rule"):
            if body.get("chain" if kind == "rule" else "name") in chains:
                out.append(obj)
        elif kind in ("set", "map"):
            name = body.get("name", "")
            if name in MEMBERSHIP:
                body = copy.deepcopy(body)
                elems = _membership_filter(name, body.pop("elem", []), b)
                if elems:
                    body["elem"] = elems
                out.append({kind: body})
            elif name in SHARED_SETS or name in used:
                out.append(obj)
    return out


def guest_problems(plan: Plan, realized: list[dict[str, Any]] | None, guest: str) -> list[str]:
    """[] when the kernel holds exactly the plan's policy for this guest."""
    b = plan.binding(guest)
    if b is None:
        return [f"guest {guest} is not in the plan"]
    if realized is None:
        return [f"table bridge {plan.table} is not loaded"]
    # what the plan says the guest depends on, looked up on both sides: a chain
    # emptied by hand then shows as its missing rules, not as what it no longer jumps to
    scope = guest_scope(list(plan.nft), b)
    want, have = guest_view(list(plan.nft), b, scope), guest_view(realized, b, scope)
    d = diff_objects(want, have)
    problems = d.describe(limit=10)
    if not problems and rule_order(want) != rule_order(have):
        problems = ["rule order differs from the plan"]
    return problems


# ---------------------------------------------------------------- the reconciler

@dataclass
class Outcome:
    action: str                       # none | incremental | full | skipped | error
    seconds: float = 0.0
    drift: list[tuple[str, str]] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    error: str | None = None
    vlan_changes: list[str] = field(default_factory=list)


# Reasons the one-binding road can answer alone: a port came, went or moved, a
# bridge's addresses or a port's VLANs may have changed. It re-reads the host facts
# and hands anything beyond port bindings (an address that did change) to the full road.
LINK_REASONS = frozenset({"link-new", "link-del", "link-moved", "bridge-address", "bridge-port"})


def _sub_config(config: Config, guests: set[str], where: dict[str, int]) -> Config:
    """The config with only `guests` (and their profiles), in the config's order;
    `where`: each guest's profile position in `config`."""
    profiles = []
    for i in sorted({where[g] for g in guests if g in where}):
        lp = config.profiles[i]
        mine = [g for g in lp.profile.guests if g.name in guests]
        profiles.append(dataclasses.replace(lp, profile=lp.profile.model_copy(update={"guests": mine})))
    return dataclasses.replace(config, profiles=tuple(profiles))


def _ports_moved(old: HostFacts, new: HostFacts) -> set[tuple[str, str, str]]:
    """(bridge, port, MAC) that came or went between two readings of the host."""
    before = {b.name: b for b in old.bridges}
    out: set[tuple[str, str, str]] = set()
    for br in new.bridges:
        prev = before.pop(br.name, None)
        if prev is None:
            out |= {(br.name, n, m) for n, m in br.port_keys}
        elif prev.ports is not br.ports:
            out |= {(br.name, n, m) for n, m in prev.port_keys ^ br.port_keys}
    for br in before.values():
        out |= {(br.name, n, m) for n, m in br.port_keys}
    return out


def _changed_profiles(old: Config, new: Config) -> dict[str, tuple[LoadedProfile, LoadedProfile]] | None:
    """The profiles a reload changed, by name: (before, after). None when more changed
    than profile files in place (site.yaml, a profile added, removed or renamed)."""
    if old.site_source.file != new.site_source.file or old.directory != new.directory:
        return None
    if old.site is not new.site and old.site != new.site:
        return None
    if len(old.profiles) != len(new.profiles):
        return None
    # load_config hands back the very object for a file whose bytes did not change,
    # in the same order when no file came or went
    out = {}
    for o, n in zip(old.profiles, new.profiles):
        if o is not n:
            if o.name != n.name:
                return _changed_by_name(old, new)
            out[n.name] = (o, n)
    return out


def _changed_by_name(old: Config, new: Config) -> dict[str, tuple[LoadedProfile, LoadedProfile]] | None:
    old_by = {lp.name: lp for lp in old.profiles}
    new_by = {lp.name: lp for lp in new.profiles}
    if old_by.keys() != new_by.keys():
        return None
    return {name: (old_by[name], lp) for name, lp in new_by.items() if lp is not old_by[name]}


@dataclass
class LeftoverCollection:
    """A collection of unbound ports' leftovers in flight (Reconciler.begin_collect):
    `encode` runs in a forked child and answers the rebuild's batch and Expected."""

    ports: list[str]
    names: set[str]
    before: dict[str, dict[Any, Any]]  # the rebuilt sets' elements, as the child encodes them
    live: LiveElements                 # the view it was taken from (a full apply makes another)
    full_gen: int
    elements: int
    started: float
    encode: Callable[[], Any]


class Reconciler:
    """Holds ONE copy of the policy: the last full plan (`_base`) plus the dispatch
    elements and port chains bindings have changed since (`_live`). `applied`,
    `desired` and `realized` are views of it, rebuilt only when a full check needs the
    objects; after a read-back that matched, the kernel's listing is not kept."""

    def __init__(self, config_dir: str | Path | None, log, metrics=None, topology: TopologyReader | None = None,
                 applier: NftablesApplier | None = None, on_change: Callable[[], None] | None = None):
        self.config_dir = config_dir
        self.log = log
        self.metrics = metrics
        self.topology = topology or TopologyReader()
        self.applier = applier or NftablesApplier()
        self.config: Config | None = None
        self.config_error: list[str] | None = None
        self.config_error_at: float | None = None
        self._base: Plan | None = None          # last full plan (its bindings are current, its elements may not be)
        self._live: LiveElements | None = None  # dispatch elements and port chains as the kernel holds them
        self._stale = False                     # _base's own elements lag behind _live
        self._view: Plan | None = None
        self._realized_other: list[dict[str, Any]] | None = None  # a listing that did NOT match the plan
        self._realized_same = False
        self._facts: HostFacts | None = None    # what the applied plan was compiled from
        self._facts_config: Config | None = None
        self.last_apply: dict[str, Any] | None = None
        self.last_drift: dict[str, Any] | None = None
        self.guest_drift: dict[str, dict[str, Any]] = {}
        self.drift_counts: dict[str, int] = {}
        self.on_change = on_change
        self.former_ports: dict[str, Binding] = {}
        self.dirty = False                      # applied.json lags behind (written when idle)
        self.fast_path_skipped: str | None = None
        self.road = ""                          # the last reconcile's: "fast" (one binding), "profile" (edited profiles) or "full"
        self.generation = 0                     # bumped by every write of ours
        self._index = None                      # (config, guests by tap MAC, by explicit port, by MAC)
        self._guest_pos = None                  # (config, guest -> profile position): a bind must not walk every profile
        self._profiles_changed = None           # (config before the last load, {name: (before, after)} it changed)
        self._nfnl = None                       # nfnetlink socket of element-only transactions
        self._sent_by = ""                      # the last element transaction's road
        self._sent = None                       # (the last element delta as sent, its deferred deletes)
        self._binding_pos = None                # (full road count, guest -> position in the bindings)
        self.load_in_child = False              # the agent sets it: its first load runs in a fork (child.result_of_child)
        self._full_gen = 0                      # full roads taken (each may order the bindings anew)
        self._owner = None                      # (bindings, port -> guest bound to it)
        self._bridges = None                    # (config, bridge names)
        from segguard.agent.vlans import VlanLayer

        self.vlan = VlanLayer(log, metrics)

    # -- the one copy, and its views -------------------------------------------------------
    @property
    def applied(self) -> Plan | None:
        if self._base is not None and self._stale:
            if self._view is None:
                self._view = dataclasses.replace(self._base, nft=tuple(self._live.objects(self._base.nft, self._base.table)))
            return self._view
        return self._base

    desired = applied  # the agent makes the kernel hold what it compiled: after a reconcile they are one

    @property
    def realized(self) -> list[dict[str, Any]] | None:
        if self._realized_same:
            a = self.applied
            return list(a.nft) if a is not None else None
        return self._realized_other

    @property
    def bindings(self) -> tuple[Binding, ...]:
        return self._base.bindings if self._base is not None else ()

    def kernel_matches(self) -> bool:
        """Whether the live table is exactly the applied plan (a read-only check, for
        the agent's forked drift checker: its own libnftables context, since a forked
        child must not share the parent's netlink socket)."""
        from segguard.apply.nftables import Nft

        plan = self.applied
        realized = NftablesApplier(Nft()).realized(plan.table)
        return realized is not None and Fingerprint.of(realized) == Fingerprint.of(list(plan.nft))

    def in_sync(self) -> bool:
        """The last read-back matched the plan (every guest's policy realized)."""
        return self._realized_same

    @property
    def table_present(self) -> bool:
        return self._realized_same or self._realized_other is not None

    def _set_full(self, plan: Plan, facts: HostFacts, realized_same: bool, realized: list[dict[str, Any]] | None) -> None:
        self._base, self._live, self._stale, self._view = plan, LiveElements.of(plan.nft), False, None
        self._full_gen += 1
        self._facts, self._facts_config = facts, self.config
        self._realized_same, self._realized_other = realized_same, (None if realized_same else realized)

    # -- config ---------------------------------------------------------------------
    def load(self, changed: set[str] | None = None) -> bool:
        """Load and validate the config. A bad one keeps the last good one in force.
        `changed`: the profile files that may have changed (load_config), None: all."""
        old = self.config
        self._profiles_changed = None
        try:
            cfg = None
            if old is None and self.load_in_child:
                # the first load parses every profile: in a child, so its garbage (1,000
                # profiles leave ~23 MB of RSS in the process that parsed them, the
                # config unpickled ~14) does not stay in the agent's heap. A later load
                # reuses this config's objects (identity tells what changed): in process.
                from segguard.child import result_of_child

                ok, got = result_of_child(lambda: load_config(self.config_dir))
                cfg = got if ok and isinstance(got, Config) else None
            if cfg is None:  # and a child's error is found again, with its file and line
                cfg = load_config(self.config_dir, previous=old, changed=changed)
        except ConfigError as exc:
            self.config_error = [str(p) for p in exc.problems]
            self.config_error_at = time.time()
            self.log.error("config-invalid", problems=self.config_error,
                           kept="last good config" if self.config else "nothing loaded yet; the kernel's table is left as it is")
            if self.metrics:
                self.metrics.config_valid.set(0)
            return False
        self.config, self.config_error, self.config_error_at = cfg, None, None
        self._profiles_changed = (old, _changed_profiles(old, cfg)) if old is not None else None
        if self.metrics:
            self.metrics.config_valid.set(1)
        if changed is None:
            self.log.info("config-loaded", directory=str(cfg.directory), profiles=len(cfg.profiles),
                          guests=sum(len(lp.profile.guests) for lp in cfg.profiles))
        else:  # an edit: not a walk over the fleet to count it
            self.log.info("config-loaded", directory=str(cfg.directory), profiles=len(cfg.profiles), files=sorted(changed)[:20])
        return True

    @property
    def bridges(self) -> list[str]:
        """The bridges the profiles name, once each (per config: every link event asks)."""
        if self.config is None:
            return []
        if self._bridges is None or self._bridges[0] is not self.config:
            self._bridges = (self.config, sorted({lp.profile.bridge for lp in self.config.profiles}))
        return self._bridges[1]

    def guest_by_port(self, port: str) -> Binding | None:
        """Who is (or was last) bound to `port`: a tap moved off its bridge is already
        unbound by the time its event is read, and the event still names its guest."""
        b = next((b for b in self.bindings if b.port == port), None)
        return b or self.former_ports.get(port)

    # -- drift bookkeeping ------------------------------------------------------------
    def record_drift(self, kind: str, detail: str, guests: list[str] | None = None) -> None:
        now = time.time()
        ev = {"at": now, "kind": kind, "detail": detail}
        self.last_drift = ev
        self.drift_counts[kind] = self.drift_counts.get(kind, 0) + 1
        for g in guests if guests is not None else [b.guest for b in self.bindings]:
            self.guest_drift[g] = ev
        if self.metrics:
            self.metrics.drift.labels(kind).inc()
        self.log.warning("drift", kind=kind, detail=detail, guests=guests)

    def _guests_touched(self, kind: str, detail: str) -> list[str] | None:
        if self._base is None or kind == "table-deleted":
            return None
        hit = []
        objects = list(self._base.nft)
        for b in self.bindings:
            names = {f"nd_{ident(b.guest)}", *_class_chain_names(objects, b)}
            if any(detail.endswith(" " + n) for n in names):
                hit.append(b.guest)
        return hit or None  # base chains, shared sets: every guest

    # -- the loop body -----------------------------------------------------------------
    def reconcile(self, reasons: frozenset[str] | set[str] = frozenset({"manual"})) -> Outcome:
        from segguard.flow import writer_lock

        if self.config is None:
            return Outcome("skipped", error="no valid config loaded")
        start = time.monotonic()
        kind = "none"
        try:
            with writer_lock():
                fast = self._fast_roads(set(reasons), start)
                if fast is not None:
                    return fast
                kind, drift, changes, vlan_changes = self._full(reasons)
        except SegguardError as exc:
            seconds = time.monotonic() - start
            self.log.error("apply-failed", error=str(exc), reasons=sorted(reasons),
                           details=getattr(exc, "details", []), kept="the previous table stays in force")
            if self.metrics:
                self.metrics.applies.labels(kind if kind != "none" else "full", "error").inc()
            self.last_apply = {"at": time.time(), "kind": kind, "result": "error", "error": str(exc)}
            return Outcome("error", seconds, error=str(exc))
        return self._done(kind, start, reasons, changes, drift, vlan_changes)

    def _fast_roads(self, reasons: set[str], start: float) -> Outcome | None:
        """The roads that compile only what changed: a bind (link reasons), a profile
        edit ("config"), or both when one burst brought an edit and a tap together:
        the edit's delta first, against the facts its plan was compiled from, then the
        bind's against the edited config, each its own transaction read back. None:
        the full road decides (and re-observes everything, so a first road that went
        through is not undone by the second one's refusal)."""
        if reasons <= LINK_REASONS:
            return self._rebind(reasons, start)
        if reasons == {"config"}:
            return self._reprofile(reasons, start)
        links = reasons - {"config"}
        if not links <= LINK_REASONS:  # (a set of link reasons alone went to _rebind above)
            return None
        # measured at 1,000 guests: such a burst on the full road took 2.1 s and ~40 MB
        # more than the agent holds idle (a whole compile beside the plan in force)
        edited = self._reprofile({"config"}, start)
        if edited is None:
            return None
        bound = self._rebind(links, time.monotonic())
        if bound is None:
            return None
        return Outcome("incremental" if "incremental" in (edited.action, bound.action) else bound.action,
                       time.monotonic() - start, [], edited.changes + bound.changes, vlan_changes=bound.vlan_changes)

    def _done(self, kind: str, start: float, reasons, changes: list[str], drift=(), vlan_changes=()) -> Outcome:
        seconds = time.monotonic() - start
        if kind != "none":
            self.last_apply = {"at": time.time(), "kind": kind, "result": "ok", "seconds": round(seconds, 4)}
            if self.metrics:
                self.metrics.applies.labels(kind, "ok").inc()
                self.metrics.apply_seconds.labels(kind).observe(seconds)
            extra = {"txn": self._sent_by} if kind == "incremental" and self.road != "full" else {}
            if why := getattr(self.applier, "child_failure", ""):
                # the forked commit failed and this process did the work: correct, but
                # the agent's memory then holds the replace's peak again (said once)
                extra["in_process_because"], self.applier.child_failure = why, ""
            self.log.info("applied", kind=kind, road=self.road, seconds=round(seconds, 4), reasons=sorted(reasons),
                          changes=changes[:20], **extra)
        self._count_guests()
        return Outcome(kind, seconds, list(drift), changes, vlan_changes=list(vlan_changes))

    def _full(self, reasons) -> tuple[str, list, list[str], list[str]]:
        """Observe everything: compile the whole plan, list the whole table, classify
        drift against what was applied, repair by elements or by the one-transaction
        replace, read back."""
        kind = "none"
        self.road = "full"
        facts = self.topology.facts(self.bridges)
        desired = compile_plan(self.config, facts)
        if desired.vlans:
            desired = dataclasses.replace(desired, vlans=restore_view(self.config, facts, desired.bindings, self.vlan.applied))
        realized = self.applier.realized(desired.table)
        want = Fingerprint.of(list(desired.nft))
        have = Fingerprint.of(realized) if realized is not None else None
        applied = self.applied
        # after a live verify the table holds the plan the verifier put back (or its
        # stand-in plan, if it failed half-way): our own switch, not drift
        ours = "after-verify" in reasons
        drift: list[tuple[str, str]] = []
        if applied is not None and not ours:
            # the common case, nothing changed anywhere: applied is desired, whose
            # fingerprint is at hand, so no third fingerprint of the whole table
            same = have is not None and have == (want if applied.nft == desired.nft else Fingerprint.of(list(applied.nft)))
            if not same:
                drift = classify_drift(list(applied.nft), realized)
        for k, detail in drift:
            self.record_drift(k, detail, self._guests_touched(k, detail))
        # until a write is read back, the kernel's listing is the truth (a refused apply keeps it)
        self._realized_same, self._realized_other = False, realized
        if have is not None and have == want:
            changes: list[str] = []
        else:
            self.generation += 1
            delta = element_delta(list(desired.nft), realized)
            # many interval-set deletes (an unbound fleet's leftovers, say) cost the
            # kernel far more than the replace does
            if delta is not None and not delta.empty and interval_deletes(delta) <= FEW_INTERVAL_DELETES:
                kind, changes = "incremental", delta.describe()
                apply_delta(desired, delta, self.applier.nft)
            else:
                kind = "full"
                changes = ["table absent: created"] if realized is None else diff_objects(list(desired.nft), realized, want).describe(limit=10)
                self.applier.apply(desired)
        if kind == "none":
            # a whole-table look that found nothing to do: cheap to log, and it says
            # what keeps the agent busy when it is
            self.log.info("checked", road="full", reasons=sorted(reasons), drift=len(drift))
        if kind != "none" or self._base is None or self.applied.bindings != desired.bindings:
            self.dirty = True
        for b in self.bindings:
            if b.port:
                self.former_ports[b.port] = b
        # a write above was read back exactly (else it raised); without one, the listing is the truth
        del realized
        self._set_full(desired, facts, True, None)
        vlan_changes = self.vlan.reconcile(desired, facts, bool(set(reasons) & FULL_CHECK), frozenset(reasons),
                                           self.record_drift)
        if vlan_changes:
            self.dirty = True
        return kind, drift, changes, vlan_changes

    def _rebind(self, reasons, start: float) -> Outcome | None:
        """A port came, went or moved: compile only the guests whose binding changed,
        send their element delta in one transaction, read back only what it touched.
        None when anything else changed too (the full road then decides)."""
        from segguard.compile.nft import compile_nft
        from segguard.compile.vlan import vlan_layer_missing

        base, live, old_facts = self._base, self._live, self._facts
        if base is None or live is None or old_facts is None or self._facts_config is not self.config or not self._realized_same:
            return self._skip("no full plan in force yet")
        facts = self.topology.facts(self.bridges)
        if ([(b.name, b.addresses) for b in facts.bridges] != [(b.name, b.addresses) for b in old_facts.bridges]
                or facts.bridge_conntrack != base.stateful):
            return self._skip("bridges or their addresses changed")
        present, was_present = facts.port_names, old_facts.port_names
        rebound = self._bind_changed(old_facts, facts)
        if rebound is None:
            return self._skip("two guests claim one port")
        bindings, fresh = rebound
        old = base.bindings
        pos = self._binding_index()
        changed = {g for g, n in fresh.items()
                   if n.port != old[pos[g]].port or (n.port is not None and (n.port in present) != (n.port in was_present))}
        kind, changes = "none", []
        plan = dataclasses.replace(base, bindings=tuple(bindings))
        if changed:
            sub = self._sub_config(changed)
            idx = sorted(pos[g] for g in changed)
            sent = self._slice_delta(compile_nft(sub, old_facts, [old[i] for i in idx], base.stateful, base.table),
                                     compile_nft(sub, facts, [bindings[i] for i in idx], base.stateful, base.table),
                                     "guests")
            if isinstance(sent, str):
                return self._skip(sent)
            kind, changes = sent
        owner = self._port_owner()
        for g in changed:
            b, n = old[pos[g]], fresh[g]
            if b.port:
                self.former_ports[b.port] = b
                if owner.get(b.port) == g:
                    del owner[b.port]
            if n.port:
                owner[n.port] = g
        self.road = "fast"
        self._base, self._facts = plan, facts
        self._owner = (plan.bindings, owner)
        if self._stale:
            self._view = None
        vlan_changes: list[str] = []
        if facts.vlan_filtering or base.vlans:
            vplan = dataclasses.replace(plan, vlans=restore_view(self.config, facts, plan.bindings, self.vlan.applied),
                                        vlan_layer=vlan_layer_missing(self.config, facts))
            vlan_changes = self.vlan.reconcile(vplan, facts, False, frozenset(reasons), self.record_drift)
            self._base = dataclasses.replace(self._base, vlans=vplan.vlans, vlan_layer=vplan.vlan_layer)
            if vlan_changes:
                self.dirty = True
        return self._done(kind, start, reasons, changes, (), vlan_changes)

    def _slice_delta(self, before: list[dict[str, Any]], after: list[dict[str, Any]], what: str) -> tuple[str, list[str]] | str:
        """Send the element delta between two slices of the same sub-config: (kind,
        changes) when done, or why the full road must take over."""
        delta = rebind_delta(before, after, self._live)
        if delta is None:
            return f"the changed {what}' slices differ in more than elements"
        if delta.empty:
            return "none", []
        if (why := self._send(delta)) is not None:
            return why
        sent, deferred = self._sent
        changes = sent.describe()
        if deferred:
            n = sum(len(e) for by_set in deferred.values() for e in by_set.values())
            changes.append(f"leave {n} interval-set elements of {', '.join(sorted(deferred))} for later (no dispatch reaches them)")
        return "incremental", changes

    def _send(self, delta, settle: bool = True) -> str | None:
        """One transaction, then the read-back of what it touched. Returns why the full
        road must take over, or None when it is done. With `settle`, an unbound port's
        interval-set deletes are left for later and a port bound again settles its
        leftovers in the same transaction (apply/incremental.py `settle_leftovers`).

        Deltas go straight over nfnetlink -- a profile edit's elements, a bind's
        elements and its netdev port chain -- and are read back object by object
        (apply/nfnl.py, nfnl_chains.py: libnftables' cache made a two-element delete
        cost ~30 ms and a port chain ~20 ms at 5,000 guests). A delta of a shape they
        do not encode goes through libnftables, and is read back the same way when it
        can be, by listing what it touched when not."""
        from segguard.apply import nfnl

        base, live = self._base, self._live
        delta, deferred, settled, kept = settle_leftovers(delta, live) if settle else (delta, {}, set(), [])
        self._sent = (delta, deferred)
        try:
            if self._nfnl is None:
                self._nfnl = nfnl.NfnlSocket()
            self.generation += 1
            send_delta(self._nfnl, base.table, live, delta)
        except nfnl.Unencodable as exc:
            self.log.info("nfnl-skipped", why=str(exc))
        except SegguardError as exc:
            self._realized_same, self._realized_other = False, None
            return f"transaction refused: {exc}"
        else:
            live.apply(delta)
            record_leftovers(live, deferred, settled)
            self._stale, self._view = True, None
            self._sent_by = "nfnetlink"
            return self._read_back(read_back_touched(self._nfnl, base.table, live, delta, kept))
        batch = delta_batch(base.table, delta)
        self.generation += 1
        try:
            self.applier.nft.run(batch, "element updates of the segguard table")
        except SegguardError as exc:
            self._realized_same, self._realized_other = False, None  # unknown now: the full road lists and repairs
            return f"element transaction refused: {exc}"
        live.apply(delta)
        record_leftovers(live, deferred, settled)
        self._stale, self._view = True, None
        self._sent_by = "libnftables"
        try:
            problems = read_back_touched(self._nfnl, base.table, live, delta, kept)
        except nfnl.Unencodable:
            problems = read_back_elements(self.applier.nft, base.table, live, delta)  # listings, as before nfnl.py
        return self._read_back(problems)

    @property
    def leftover_ports(self) -> list[str]:
        """Unbound ports whose interval-set elements are still in the kernel, oldest first."""
        return list(self._live.leftover) if self._live is not None else []

    def collect_leftover(self) -> None:
        """Delete the leftovers of unbound ports, read back: one port's among few other
        interval-set elements in one element transaction, else by rebuilding the sets
        that hold them (or, when that cannot be encoded, replacing the whole table with
        the plan in force). A refused or differing transaction leaves the table unknown
        (not in_sync): the next reconcile takes the full road, and the caller asks for
        one."""
        from segguard.flow import writer_lock

        live, base = self._live, self._base
        if live is None or not live.leftover or base is None or not self._realized_same:
            return
        ports = list(live.leftover)
        n = sum(len(e) for by_set in live.leftover.values() for e in by_set.values())
        start = time.monotonic()
        with writer_lock():
            if len(ports) == 1 and interval_elements(live) - n < FEW_REMAINING:
                why, road = self._send(collect_delta(live, ports), settle=False), self._sent_by
            else:
                why, road = self._rebuild_in_force(ports)
        seconds = round(time.monotonic() - start, 4)
        if why is not None:
            self.log.warning("leftover-collect-failed", ports=ports[:20], why=why, seconds=seconds)
            return
        self._live.leftover.clear()
        self.log.info("leftover-collected", ports=ports[:20], port_count=len(ports), elements=n, seconds=seconds, txn=road)

    def begin_collect(self) -> "LeftoverCollection | None":
        """The collection of every unbound port's leftovers, to be encoded by a forked
        child while the agent goes on with its events (a rebuild's encoding costs ~0.2 s
        at 1,000 guests, its commit ~0.05 s: a tap plugged meanwhile waits only for the
        commit). The caller forks right away, so that the child's copy of the table is
        the one `before` describes, runs LeftoverCollection.encode there and hands its
        answer to finish_collect. None: nothing to collect, or a collection cheap
        enough to do here and now (one port's few elements: an element delete), done."""
        live, base = self._live, self._base
        if live is None or not live.leftover or base is None or not self._realized_same:
            return None
        encode = getattr(self.applier, "encode_rebuild", None)
        ports = list(live.leftover)
        n = sum(len(e) for by_set in live.leftover.values() for e in by_set.values())
        if encode is None or (len(ports) == 1 and interval_elements(live) - n < FEW_REMAINING):
            self.collect_leftover()
            return None
        names = {name for name, elems in collect_delta(live, ports).delete if elems}

        # a test's way to land binds while the child encodes (tests/netns/test_agent.py)
        delay = float(os.environ.get("SEGGUARD_TEST_COLLECT_DELAY") or 0)

        def in_child():
            time.sleep(delay)
            plan = dataclasses.replace(base, nft=tuple(without_leftovers(live).objects(base.nft, base.table)))
            return encode(plan, names)
        return LeftoverCollection(ports, names, in_force_elements(live, names), live, self._full_gen, n,
                                  time.monotonic(), in_child)

    def finish_collect(self, job: "LeftoverCollection", ok: bool, answer: Any) -> None:
        """Commit a collection the child encoded (begin_collect), brought up to date in
        the same transaction with what was committed since (catch_up_delta), and read
        back: the rebuilt sets and their chains, every element. A table replaced
        meanwhile makes it moot (the full apply wrote no leftovers: those left are
        newer); a child that could not encode leaves it to collect_leftover. Failure
        is as collect_leftover's: the table is unknown, the caller asks for a reconcile."""
        from segguard.apply import nfnl_table
        from segguard.apply.nfnl import Unencodable
        from segguard.apply.nftables import rebuild_batch
        from segguard.flow import writer_lock

        live, base = self._live, self._base
        if live is not job.live or self._full_gen != job.full_gen or base is None or not self._realized_same:
            self.log.info("leftover-collect-moot", ports=job.ports[:20], why="the table was written whole meanwhile")
            return
        if not ok:
            self.log.info("rebuild-encode-failed", why=str(answer)[:500])
            self.collect_leftover()
            return
        batch, expected = answer
        encoded = round(time.monotonic() - job.started, 4)
        start = time.monotonic()
        with writer_lock():
            catch_up = catch_up_delta(live, job.before, job.ports)
            try:
                nfnl_table.extend_rebuild(batch, expected, live.spec, list(catch_up.delete), list(catch_up.add))
            except Unencodable as exc:
                self.log.info("rebuild-encode-failed", why=f"the catch-up: {exc}")
                self.collect_leftover()
                return

            def as_json():  # what the batch asks the kernel for, as libnftables JSON
                view = LiveElements(live.kind, {k: dict(v) for k, v in live.elems.items()}, live.netdev, live.spec,
                                    copy.deepcopy(live.leftover))
                record_collected(view, job.names, job.ports)
                return rebuild_batch(dataclasses.replace(base, nft=tuple(view.objects(base.nft, base.table))), job.names)
            self.generation += 1
            try:
                self.applier.commit_rebuild(base.table, job.names, batch, expected, as_json)
            except SegguardError as exc:
                self._realized_same, self._realized_other = False, None
                self.log.warning("leftover-collect-failed", ports=job.ports[:20], why=f"rebuild refused or differs: {exc}",
                                 seconds=round(time.monotonic() - start, 4))
                return
        n = record_collected(live, job.names, job.ports)
        self._stale, self._view, self.dirty = True, None, True
        self.log.info("leftover-collected", ports=job.ports[:20], port_count=len(job.ports), elements=n,
                      seconds=round(time.monotonic() - start, 4), encoded_in_child_seconds=encoded,
                      caught_up=catch_up.describe()[:20], txn="rebuild")

    def _rebuild_in_force(self, ports: list[str]) -> tuple[str | None, str]:
        """Rebuild the sets holding the leftovers of `ports` (all there are) with the
        plan in force, read back. Returns (why not or None, the road taken)."""
        from segguard.apply.nfnl import Unencodable

        base, live = self._base, self._live
        delta = collect_delta(live, ports)
        names = {name for name, elems in delta.delete if elems}
        rebuild = getattr(self.applier, "rebuild", None)
        if rebuild is None:
            return self._replace_in_force(), "replace"
        plan = dataclasses.replace(base, nft=tuple(without_leftovers(live).objects(base.nft, base.table)))
        self.generation += 1
        try:
            rebuild(plan, names)
        except Unencodable as exc:
            self.log.info("rebuild-skipped", why=str(exc))
            return self._replace_in_force(), "replace"
        except SegguardError as exc:
            self._realized_same, self._realized_other = False, None
            return f"rebuild refused or differs: {exc}", "rebuild"
        live.apply(delta)
        self._stale, self._view, self.dirty = True, None, True
        return None, "rebuild"

    def _replace_in_force(self) -> str | None:
        """Replace the table with the plan in force (the applied plan without
        leftovers), read back as every full apply is. Returns why not, or None."""
        base, facts, compiled_from = self._base, self._facts, self._facts_config
        plan = dataclasses.replace(base, nft=tuple(without_leftovers(self._live).objects(base.nft, base.table)))
        self.generation += 1
        try:
            self.applier.apply(plan)
        except SegguardError as exc:
            self._realized_same, self._realized_other = False, None
            return f"replace refused or differs: {exc}"
        self._set_full(plan, facts, True, None)
        self._facts_config = compiled_from  # the same plan: compiled from the same config
        self.road, self.dirty = "full", True
        return None

    def _read_back(self, problems: list[str]) -> str | None:
        if problems:
            self._realized_same, self._realized_other = False, None
            self.log.warning("read-back-differs", after="element updates", problems=problems[:10])
            return "read-back of the touched objects differs"
        self.dirty = True
        return None

    def _reprofile(self, reasons, start: float) -> Outcome | None:
        """Profile files changed and nothing else: compile the changed profiles' guests
        alone (before and after), send the element delta in one transaction. The agent
        does not compile or list the fleet for one edited profile. None when the edit
        is more than elements of port-keyed sets (a guest added, removed or re-addressed,
        another kind of profile, bridge or VLAN): the full road decides then.

        Read-back: every element the transaction touched, key by key (`_send`), the
        allow elements it deleted included (one left behind would let a flow
        through)."""
        from segguard.compile.bind import bind_guests
        from segguard.compile.nft import compile_nft

        before, changed = self._profiles_changed or (None, None)
        self._profiles_changed = None
        base, live, facts = self._base, self._live, self._facts
        if changed is None or base is None or live is None or facts is None or not self._realized_same:
            return self._skip("no full plan in force, or the site changed")
        if before is not self._facts_config:
            return self._skip("the plan in force was not compiled from the config before this edit")
        guests: set[str] = set()
        for name, (o_lp, n_lp) in changed.items():
            o, n = o_lp.profile, n_lp.profile
            if (o.bridge, o.vlan) != (n.bridge, n.vlan) or [g.model_dump() for g in o.guests] != [g.model_dump() for g in n.guests]:
                return self._skip(f"profile {name}: its guests, bridge or VLAN changed")
            guests |= {g.name for g in n.guests}
        kind, changes = "none", []
        if guests:
            # every guest of a changed profile is in the slice: whole profiles, by name
            edited = dataclasses.replace(self.config, profiles=tuple(n for _o, n in changed.values()))
            bound, _warnings = bind_guests(edited, facts)
            old_b = self._bindings_of(guests)
            if bound != old_b:
                return self._skip("the changed profiles' guests bind differently (mode or kind of profile changed)")
            was = dataclasses.replace(before, profiles=tuple(o for o, _n in changed.values()))
            sent = self._slice_delta(compile_nft(was, facts, old_b, base.stateful, base.table),
                                     compile_nft(edited, facts, bound, base.stateful, base.table),
                                     "profiles")
            if isinstance(sent, str):
                return self._skip(sent)
            kind, changes = sent
        self.road = "profile"
        self._facts_config = self.config
        self._index = None
        return self._done(kind, start, reasons, changes)

    def _bind_changed(self, old_facts: HostFacts, facts: HostFacts) -> list[Binding] | None:
        """The bindings under `facts`, re-deriving only the guests a changed port or
        libvirt interface can concern (compile/bind.py decides, on a sub-config of
        them): binding one tap does not walk every guest's profile. None if two guests
        end up claiming one port (the full road then leaves both unbound)."""
        from segguard.compile.bind import bind_guests, tap_mac

        if self._index is None or self._index[0] is not self.config:
            by_tap: dict[str, list[str]] = {}
            by_port: dict[str, list[str]] = {}
            by_mac: dict[str, list[str]] = {}
            for _lp, g in self.config.guests():
                by_tap.setdefault(tap_mac(g.mac), []).append(g.name)
                by_mac.setdefault(g.mac, []).append(g.name)
                if g.port:
                    by_port.setdefault(g.port, []).append(g.name)
            self._index = (self.config, by_tap, by_port, by_mac)
        _, by_tap, by_port, by_mac = self._index
        moved = _ports_moved(old_facts, facts)
        names = {n for _b, n, _m in moved}
        cand = {g for _b, n, m in moved for g in [*by_tap.get(m, ()), *by_port.get(n, ())]}
        cand |= {g for _p, mac in set(old_facts.libvirt_ports) ^ set(facts.libvirt_ports) for g in by_mac.get(mac, ())}
        old = self._base.bindings
        owner = self._port_owner()
        cand |= {owner[n] for n in names if n in owner}
        if not cand:
            return list(old), {}
        fresh, _warnings = bind_guests(self._sub_config(cand), facts)
        new = {b.guest: b for b in fresh}
        # two guests on one port: among the re-bound, or a re-bound one on a port that
        # a guest left alone still holds
        claimed: dict[str, str] = {}
        for b in fresh:
            if b.port:
                if claimed.setdefault(b.port, b.guest) != b.guest:
                    return None
                holder = owner.get(b.port)
                if holder is not None and holder != b.guest and holder not in new:
                    return None
        pos = self._binding_index()
        out = list(old)
        for g, b in new.items():
            out[pos[g]] = b
        return out, new

    def _port_owner(self) -> dict[str, str]:
        """port -> guest of the bindings in force, kept up to date by binds (one entry
        per changed guest) and rebuilt after a full road: not a walk per bind."""
        if self._owner is None or self._owner[0] is not self._base.bindings:
            self._owner = (self._base.bindings, {b.port: b.guest for b in self._base.bindings if b.port})
        return self._owner[1]

    def _binding_index(self) -> dict[str, int]:
        """guest -> position in the bindings (the same from one full road to the next:
        binds and edits replace entries, they never reorder them)."""
        if self._binding_pos is None or self._binding_pos[0] != self._full_gen:
            self._binding_pos = (self._full_gen, {b.guest: i for i, b in enumerate(self._base.bindings)})
        return self._binding_pos[1]

    def _sub_config(self, guests: set[str]) -> Config:
        if self._guest_pos is None or self._guest_pos[0] is not self.config:
            self._guest_pos = (self.config, {g.name: i for i, lp in enumerate(self.config.profiles) for g in lp.profile.guests})
        return _sub_config(self.config, guests, self._guest_pos[1])

    def _bindings_of(self, guests: set[str]) -> list[Binding]:
        """The current bindings of `guests`, in the bindings' order (an edit does not
        walk every guest's binding)."""
        pos = self._binding_index()
        return [self._base.bindings[i] for i in sorted(pos[g] for g in guests if g in pos)]

    def _skip(self, why: str) -> None:
        self.fast_path_skipped = why
        return None

    def _count_guests(self) -> None:
        if self.metrics and self._base is not None:
            bound = sum(1 for b in self.bindings if b.port)
            self.metrics.guests.labels("protected").set(bound)
            self.metrics.guests.labels("unbound").set(len(self.bindings) - bound)
