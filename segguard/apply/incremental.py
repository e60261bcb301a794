"""Change the table by elements, not by replacing it: binding or unbinding a port,
editing a profile's rules or a guest's addresses, in one transaction.

The table's rules are the same whatever the guests (compile/nft.py): binding a tap adds
its dispatch elements (`port -> goto gout_<kind>`, ...), `(mac, port)` and its policy
elements in the port-keyed sets (compile/policy.py); unbinding deletes them; a profile
edit replaces the changed elements of its ports. Nothing is flushed: until the
transaction commits the old elements judge every frame, after it the new ones do, and
an unbound guest's MAC is dropped by the `legacy_macs` guard on every port in between. Anything
beyond elements (a new kind of profile, an ND chain) needs the full replace.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from segguard.apply.nftables import Nft, NftablesApplier, _metainfo, canonical_key, diff_objects, normalize, rule_order
from segguard.errors import ApplyError
from segguard.compile.policy import INTERVAL_SETS, port_set_types
from segguard.plan import Concat, Plan, concat_fields, jsonable

# The objects whose elements change when a tap appears or goes away, or a profile's
# rules change: everything keyed by port (compile/policy.py). A stateful table has no
# reply sets; `_split` takes the ones a plan holds.
ELEMENT_OBJECTS = ("legacy_macs", "out_dispatch", "in_dispatch", "nd_dispatch", "bound_ports",
                   *port_set_types(stateful=False))


# Objects whose missing element can only drop more: identity (`!= @set drop`) and
# policy (`@set accept`) sets. The agent reads every touched element back by key over
# nfnetlink (read_back_touched); this listing road (read_back_elements) is its fallback
# for an element or chain nfnl.py / nfnl_chains.py cannot encode, and lists only the others -- the dispatch maps
# and MAC sets, one element per guest: the fleet-wide policy sets hold ~50 per guest,
# and listing them (or libnftables' `get element`, which fetches every set's elements
# first) cost 0.2-2.6 s at 1,000 guests; the periodic whole-table check covers them.
FAILS_CLOSED = frozenset({"bound_ports", *port_set_types(stateful=False)})


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=jsonable)


def _lkey(value: Any) -> Any:
    """An element's key in LiveElements: a plan's Concat (hashable) or a name is its own
    key, a listing's concatenation becomes a Concat, anything else (a prefix element)
    its JSON. A JSON string per element had been ~4.5 MB at 1,000 guests."""
    t = type(value)
    if t is Concat or t is str or t is int:
        return value
    c = Concat.of(value)
    return c if c is not None else _key(value)


@dataclass(frozen=True)
class ElementDelta:
    """Per object: elements to delete, elements to add. Deletes go first in the batch,
    so a key whose verdict changes (port handed to another guest) is re-added at once."""

    kind: dict[str, str]                            # object name -> "map" | "set"
    delete: tuple[tuple[str, tuple[Any, ...]], ...]  # (object, elems)
    add: tuple[tuple[str, tuple[Any, ...]], ...]
    # per-port netdev ingress chains (compile/nft.py _port_ingress) of ports that came or
    # went: whole chains with their rules, never a rule edited in place
    port_chains_add: tuple[dict[str, Any], ...] = ()   # objects: the table, chains, rules
    port_chains_delete: tuple[str, ...] = ()           # chain names
    delete_port_table: bool = False

    @property
    def empty(self) -> bool:
        return (not any(e for _, e in self.delete) and not any(e for _, e in self.add)
                and not self.port_chains_add and not self.port_chains_delete and not self.delete_port_table)

    def describe(self) -> list[str]:
        out = [f"delete {name} {_key(e)}" for name, elems in self.delete for e in elems]
        out += [f"add {name} {_key(e)}" for name, elems in self.add for e in elems]
        out += [f"delete netdev chain {c}" for c in self.port_chains_delete]
        out += [f"add netdev chain {next(iter(o.values()))['name']}" for o in self.port_chains_add if "chain" in o]
        return out


def _split(objects: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, tuple[str, list[Any]]]]:
    """Objects with the dispatch elements taken out, and those elements by object."""
    rest: list[dict[str, Any]] = []
    elems: dict[str, tuple[str, list[Any]]] = {}
    for obj in objects:
        kind, body = next(iter(obj.items()))
        if kind in ("set", "map") and body.get("name") in ELEMENT_OBJECTS:
            # a shallow copy without the elements: both halves are only read from here
            # on (a deep copy of every port-keyed set was a tenth of a tap's bind)
            elems[body["name"]] = (kind, body.get("elem", []))
            rest.append({kind: {k: v for k, v in body.items() if k != "elem"}})
        else:
            rest.append(obj)
    return rest, elems


def _family(obj: dict[str, Any]) -> str:
    return next(iter(obj.values())).get("family", "bridge")


def _port_chains(objects: list[dict[str, Any]]) -> tuple[bool, dict[str, str]] | None:
    """netdev objects grouped by chain: (table present, chain -> canonical content)."""
    table, groups = False, {}
    for obj in objects:
        kind, body = next(iter(obj.items()))
        if kind == "table":
            table = True
        elif kind in ("chain", "rule"):
            groups.setdefault(body["name"] if kind == "chain" else body["chain"], []).append(obj)
        else:
            return None  # a netdev set or map: not a shape this module knows
    return table, {c: _key([normalize(objs), rule_order(objs)]) for c, objs in groups.items()}


def element_delta(desired: list[dict[str, Any]], realized: list[dict[str, Any]] | None) -> ElementDelta | None:
    """The element changes that turn `realized` into `desired`, or None when anything
    else differs (a rule, a chain, another set): that needs the full replace."""
    if realized is None:
        return None
    want_nd = [o for o in desired if _family(o) == "netdev"]
    have_nd = [o for o in realized if _family(o) == "netdev"]
    desired = [o for o in desired if _family(o) != "netdev"]
    realized = [o for o in realized if _family(o) != "netdev"]
    wp, hp = _port_chains(want_nd), _port_chains(have_nd)
    if wp is None or hp is None:
        return None
    (want_table, want_chains), (have_table, have_chains) = wp, hp
    if any(want_chains[c] != have_chains[c] for c in set(want_chains) & set(have_chains)):
        return None
    new_chains = sorted(set(want_chains) - set(have_chains))
    port_add = []
    if new_chains:
        port_add = [o for o in want_nd if "table" in o]
        port_add += [o for o in want_nd if "chain" in o and o["chain"]["name"] in new_chains]
        port_add += [o for o in want_nd if "rule" in o and o["rule"]["chain"] in new_chains]
    port_delete = tuple(sorted(set(have_chains) - set(want_chains)))
    drop_table = have_table and not want_table
    want_rest, want = _split(desired)
    have_rest, have = _split(realized)
    if not diff_objects(want_rest, have_rest).empty or rule_order(want_rest) != rule_order(have_rest):
        return None
    if set(want) != set(have) or not want:
        return None
    kinds, delete, add = _elem_diff(want, have)
    return ElementDelta(kinds, tuple(delete), tuple(add), tuple(copy.deepcopy(port_add)),
                        () if drop_table else port_delete, drop_table)


def _elem_diff(want: dict[str, tuple[str, list[Any]]], have: dict[str, tuple[str, list[Any]]]):
    kinds: dict[str, str] = {}
    delete, add = [], []
    for name in sorted(want):
        kind, w = want[name]
        _, h = have[name]
        kinds[name] = kind
        if kind == "map":
            wk = {_key(e[0]): e for e in w}
            hk = {_key(e[0]): e for e in h}
            gone = [hk[k][0] for k in sorted(hk) if k not in wk or _key(wk[k]) != _key(hk[k])]
            new = [wk[k] for k in sorted(wk) if k not in hk or _key(wk[k]) != _key(hk[k])]
        else:
            wk = {_key(e): e for e in w}
            hk = {_key(e): e for e in h}
            gone = [hk[k] for k in sorted(hk) if k not in wk]
            new = [wk[k] for k in sorted(wk) if k not in hk]
        delete.append((name, tuple(gone)))
        add.append((name, tuple(new)))
    return kinds, delete, add


def delta_batch(table: str, delta: ElementDelta) -> dict[str, Any]:
    cmds: list[dict[str, Any]] = [_metainfo()]
    for name in delta.port_chains_delete:
        cmds.append({"delete": {"chain": {"family": "netdev", "table": table, "name": name}}})
    if delta.delete_port_table:
        cmds.append({"delete": {"table": {"family": "netdev", "name": table}}})
    # chains and rules after the elements: the order within one transaction does not
    # change what any frame meets, the commit is atomic
    for verb, part in (("delete", delta.delete), ("add", delta.add)):
        for name, elems in part:
            if elems:
                cmds.append({verb: {"element": {"family": "bridge", "table": table, "name": name,
                                                "elem": copy.deepcopy(list(elems))}}})
    cmds += [{"add": copy.deepcopy(o)} for o in delta.port_chains_add]
    return {"nftables": cmds}


def apply_delta(plan: Plan, delta: ElementDelta, nft: Nft | None = None) -> None:
    """One transaction of element updates, then the exact read-back of the whole table."""
    applier = NftablesApplier(nft)
    batch = delta_batch(plan.table, delta)
    applier.nft.run(batch, "element updates of the segguard table")
    after = applier.realized(plan.table)
    if after is None or not applier.same(plan, after):
        d = diff_objects(list(plan.nft), after)
        raise ApplyError("read-back of table bridge %s differs from the plan after element updates" % plan.table,
                         batch=batch, details=d.describe())


# ---- one guest's binding, without the whole table ------------------------------------
#
# A tap appearing or going changes only the elements of its port and the port's netdev
# chain. The reconciler compiles just the guests whose binding changed (before and
# after, the same sub-config), diffs those two small slices, sends the delta, and reads
# back the dispatch maps and MAC sets it wrote (FAILS_CLOSED) and the touched netdev
# chains: the compile does not grow with the number of guests configured.

@dataclass
class LiveElements:
    """What the kernel holds in the objects a binding changes: every element of the
    port-keyed sets and maps (by canonical key) and every netdev port chain (its objects
    in order). Kept next to the last full plan, so that plan need not be rebuilt per tap."""

    kind: dict[str, str]
    elems: dict[str, dict[str, Any]]          # object -> canonical key -> element
    netdev: dict[str, list[dict[str, Any]]]   # chain -> [chain, rules...]
    spec: dict[str, tuple[list[str], bool, bool]] = dataclasses.field(default_factory=dict)  # object -> (key types, interval, map)
    # unbound ports' interval-set elements the kernel still holds (in `elems` too):
    # port -> set -> elements; see `settle_leftovers`
    leftover: dict[str, dict[str, list[Any]]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, objects: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> "LiveElements":
        kind: dict[str, str] = {}
        elems: dict[str, dict[str, Any]] = {}
        netdev: dict[str, list[dict[str, Any]]] = {}
        spec: dict[str, tuple[list[str], bool, bool]] = {}
        for obj in objects:
            k, body = next(iter(obj.items()))
            if body.get("family") == "netdev":
                if k in ("chain", "rule"):
                    netdev.setdefault(body["name"] if k == "chain" else body["chain"], []).append(obj)
            elif k in ("set", "map") and body.get("name") in ELEMENT_OBJECTS:
                kind[body["name"]] = k
                elems[body["name"]] = {_elem_key(k, e): e for e in body.get("elem", [])}
                t = body["type"]
                spec[body["name"]] = (list(t) if isinstance(t, list) else [t], "interval" in body.get("flags", ()), k == "map")
        return cls(kind, elems, netdev, spec)

    def apply(self, delta: ElementDelta) -> None:
        for name, gone in delta.delete:
            for e in gone:  # a map's deletes are bare keys
                self.elems[name].pop(_lkey(e), None)
        for name, new in delta.add:
            for e in new:
                self.elems[name][_elem_key(self.kind[name], e)] = e
        for c in delta.port_chains_delete:
            self.netdev.pop(c, None)
        if delta.delete_port_table:
            self.netdev.clear()
        for o in delta.port_chains_add:
            k, body = next(iter(o.items()))
            if k == "chain":
                self.netdev[body["name"]] = [o]
            elif k == "rule":
                self.netdev[body["chain"]].append(o)

    def objects(self, base: tuple[dict[str, Any], ...], table: str) -> list[dict[str, Any]]:
        """`base` (a full plan's objects) with these dispatch elements and port chains."""
        out = []
        for obj in base:
            k, body = next(iter(obj.items()))
            if body.get("family") == "netdev":
                continue
            if k in ("set", "map") and body.get("name") in ELEMENT_OBJECTS:
                body = {x: y for x, y in body.items() if x != "elem"}
                elems = list(self.elems[body["name"]].values())
                if elems:
                    body["elem"] = elems
                obj = {k: body}
            out.append(obj)
        if self.netdev:
            out.append({"table": {"family": "netdev", "name": table}})
            for objs in self.netdev.values():
                out += objs
        return out


def _elem_key(kind: str, e: Any) -> Any:
    return _lkey(e[0]) if kind == "map" else _lkey(e)


def rebind_delta(before: list[dict[str, Any]], after: list[dict[str, Any]], live: LiveElements) -> ElementDelta | None:
    """The delta between two slices compiled from the same sub-config (only the guests
    whose binding changed), or None if they differ in more than elements. The netdev
    table is the whole host's: it goes only when no port chain is left anywhere, and
    `add table` of one that exists is a no-op."""
    # both slices come from one compiler run's inputs but the bindings: everything but
    # the elements and port chains is expected identical, so plain equality (no
    # canonical form) decides, and only the elements are diffed
    before_rest, have = _split([o for o in before if _family(o) != "netdev"])
    after_rest, want = _split([o for o in after if _family(o) != "netdev"])
    if before_rest != after_rest or set(want) != set(have) or not want:
        return None
    kinds, delete, add = _elem_diff(want, have)

    def chains(objs):
        return {o["chain"]["name"] for o in objs if _family(o) == "netdev" and "chain" in o}

    def group(objs):
        g: dict[str, list[dict[str, Any]]] = {}
        for o in objs:
            k, body = next(iter(o.items()))
            if _family(o) == "netdev" and k in ("chain", "rule"):
                g.setdefault(body["name"] if k == "chain" else body["chain"], []).append(o)
        return g

    gb, ga = group(before), group(after)
    if any(gb[c] != ga[c] for c in set(gb) & set(ga)):
        return None
    new_chains = sorted(set(ga) - set(gb))
    port_add = [o for c in new_chains for o in ga[c]]
    if port_add:
        port_add = [{"table": {"family": "netdev", "name": next(iter(port_add[0].values()))["table"]}}, *port_add]
    d = ElementDelta(kinds, tuple(delete), tuple(add), tuple(copy.deepcopy(port_add)))
    gone = tuple(sorted(chains(before) - chains(after)))
    remaining = (set(live.netdev) - set(gone)) | chains(d.port_chains_add)
    drop = bool(live.netdev) and not remaining
    return dataclasses.replace(d, port_chains_delete=gone, delete_port_table=drop)


def read_back_elements(nft: Nft, table: str, live: LiveElements, delta: ElementDelta) -> list[str]:
    """Compare the dispatch objects and the port chains `delta` touched with `live`
    (which already has `delta` applied). Returns what differs ([] when exact). Reads
    the dispatch maps and MAC sets the transaction wrote and a chain per touched port,
    not the table (FAILS_CLOSED says why not the policy sets)."""
    problems: list[str] = []
    touched = {name for name, elems in (*delta.delete, *delta.add) if elems}
    for name, kind in live.kind.items():
        if name not in touched or name in FAILS_CLOSED:
            continue  # not written now, or verified by the next whole-table check
        rc, out, err = nft.raw({"nftables": [{"list": {kind: {"family": "bridge", "table": table, "name": name}}}]})
        if rc != 0:
            problems.append(f"{kind} {name}: cannot list: {err.strip()}")
            continue
        data = out if isinstance(out, dict) else json.loads(out)
        body = next((o[kind] for o in data.get("nftables", []) if kind in o), {})
        have = {_elem_key(kind, e) for e in body.get("elem", [])}
        want = set(live.elems[name])
        problems += [f"{kind} {name}: missing {_key(k)}" for k in sorted(want - have, key=_key)[:5]]
        problems += [f"{kind} {name}: unexpected {_key(k)}" for k in sorted(have - want, key=_key)[:5]]
        if kind == "map":
            got = {_lkey(e[0]): _key(e) for e in body.get("elem", [])}
            problems += [f"map {name}: {_key(k)} has another verdict" for k in sorted(want & have, key=_key)
                         if got[k] != _key(live.elems[name][k])][:5]
    return problems + read_back_port_chains(nft, table, live, delta)


def read_back_port_chains(nft: Nft, table: str, live: LiveElements, delta: ElementDelta) -> list[str]:
    """Each netdev port chain `delta` added (listed, compared with `live`) or deleted
    (must be gone)."""
    problems: list[str] = []
    added = [next(iter(o.values()))["name"] for o in delta.port_chains_add if "chain" in o]
    for chain in added + list(delta.port_chains_delete):
        rc, out, err = nft.raw({"nftables": [{"list": {"chain": {"family": "netdev", "table": table, "name": chain}}}]})
        if chain not in live.netdev:
            if rc == 0:
                problems.append(f"netdev chain {chain}: still present")
            continue
        if rc != 0:
            problems.append(f"netdev chain {chain}: cannot list: {err.strip()}")
            continue
        data = out if isinstance(out, dict) else json.loads(out)
        have = [o for o in data.get("nftables", []) if "metainfo" not in o]
        want = live.netdev[chain]
        if sorted(canonical_key(o) for o in have) != sorted(canonical_key(o) for o in want) or rule_order(have) != rule_order(want):
            problems.append(f"netdev chain {chain}: differs from the plan")
    return problems



# ---- leftovers: an unbind's interval-set deletes, deferred -------------------------
#
# Deleting an element from an interval concatenation set (the kernel's pipapo) costs
# time that grows with the set: with 900 ports bound, ~50 ms per element of a port
# bound late, ~0.5 s for one guest's 10 (host kernel 6.18, benchmarks/README.md), while
# adding them and deleting from hash sets costs ~1 ms. So an unbind deletes the port's
# dispatch, identity and hash-set elements at once and leaves its interval-set elements
# in the kernel as leftovers. They allow nothing: every lookup in those sets is keyed by
# the port (iifname from the guest, oifname to it) and sits in chains entered only
# through out_dispatch/in_dispatch under the same key, whose element the unbind
# deleted (the base chains' fast path looks up hash sets only: test_compile holds
# it). A bind to that port name settles them in its own transaction (keeps what the
# new guest wants, deletes the rest), and the agent deletes the others when it is
# quiet, by rebuilding the sets that hold them: a child encodes the rebuild while binds
# go on, and the commit catches up with them (Reconciler.begin_collect).

def _port(elem: Any) -> str:
    return concat_fields(elem)[0]  # every policy set is keyed by (port, ...) first


class _Dispatched:
    """Whether a port has a dispatch element once `delta` is committed: what makes its
    policy elements reachable."""

    MAPS = ("out_dispatch", "in_dispatch")  # nd_dispatch jumps to ND chains, which use no policy set

    def __init__(self, live: LiveElements, delta: ElementDelta):
        self.elems = live.elems
        self.gone = {(n, _lkey(k)) for n, keys in delta.delete if n in self.MAPS for k in keys}
        self.new = {(n, _lkey(e[0])) for n, elems in delta.add if n in self.MAPS for e in elems}

    def __contains__(self, port: str) -> bool:
        k = _lkey(port)
        return any((n, k) in self.new or (k in self.elems.get(n, ()) and (n, k) not in self.gone) for n in self.MAPS)


def settle_leftovers(delta: ElementDelta, live: LiveElements
                     ) -> tuple[ElementDelta, dict[str, dict[str, list[Any]]], set[str], list[tuple[str, Any]]]:
    """`delta` as it is sent, and what it changes about the leftovers:
    (delta, deferred, settled, kept). A port with leftovers that has a dispatch element
    after `delta` gets them settled: those `delta` would add again stay (not re-added;
    `kept` lists them for the read-back), the others are deleted in the same
    transaction. Interval-set deletes of ports without a dispatch element after
    `delta` are `deferred` (left in the kernel)."""
    bound = _Dispatched(live, delta)
    add = {name: list(elems) for name, elems in delta.add}
    delete = {name: list(elems) for name, elems in delta.delete}
    settled = {p for p in live.leftover if p in bound}
    kept: list[tuple[str, Any]] = []
    for p in sorted(settled):
        for name, elems in live.leftover[p].items():
            wanted = {_key(e) for e in add.get(name, ()) if _port(e) == p}
            for e in elems:
                if _key(e) in wanted:
                    kept.append((name, e))
                else:
                    delete.setdefault(name, []).append(e)
            if wanted:
                held = {_key(e) for e in elems}
                add[name] = [e for e in add[name] if not (_port(e) == p and _key(e) in held)]
    deferred: dict[str, dict[str, list[Any]]] = {}
    for name in INTERVAL_SETS & set(delete):
        now = []
        for e in delete[name]:
            if _port(e) in bound:
                now.append(e)
            else:
                deferred.setdefault(_port(e), {}).setdefault(name, []).append(e)
        delete[name] = now
    names = [name for name, _ in delta.delete]
    names += [name for name in delete if name not in names]
    out = dataclasses.replace(delta, delete=tuple((n, tuple(delete.get(n, ()))) for n in names),
                              add=tuple((n, tuple(add.get(n, ()))) for n, _ in delta.add))
    return out, deferred, settled, kept


def record_leftovers(live: LiveElements, deferred: dict[str, dict[str, list[Any]]], settled: set[str]) -> None:
    """After the transaction committed: the settled ports have none left, the deferred
    deletes are leftovers (still in `live.elems`, as in the kernel)."""
    for p in settled:
        live.leftover.pop(p, None)
    for p, by_set in deferred.items():
        mine = live.leftover.setdefault(p, {})
        for name, elems in by_set.items():
            mine.setdefault(name, []).extend(elems)


def interval_deletes(delta: ElementDelta) -> int:
    """How many interval-set elements `delta` deletes: past a few, replacing the whole
    table (~0.6 s at 1,000 guests, however many) is cheaper than the deletes."""
    return sum(len(elems) for name, elems in delta.delete if name in INTERVAL_SETS)


def without_leftovers(live: LiveElements) -> LiveElements:
    """`live` as it would be with every leftover deleted: the plan in force."""
    gone = {name: {_lkey(e) for by_set in live.leftover.values() for e in by_set.get(name, ())} for name in live.kind}
    elems = {name: {k: e for k, e in by_key.items() if k not in gone[name]} for name, by_key in live.elems.items()}
    return LiveElements(live.kind, elems, live.netdev, live.spec)


def strip_inert_leftovers(realized: list[dict[str, Any]], ports: set[str] | list[str]) -> tuple[list[dict[str, Any]], int]:
    """A listing of the table without the leftovers of `ports` (those the agent says it
    has not deleted yet), and how many elements that took out. Judged on the listing
    itself: only interval-set elements, only of ports with no dispatch element in it."""
    dispatched: set[str] = set()
    for o in realized:
        kind, body = next(iter(o.items()))
        if kind == "map" and body.get("name") in _Dispatched.MAPS and body.get("family", "bridge") == "bridge":
            dispatched |= {e[0] for e in body.get("elem", ())}
    inert = set(ports) - dispatched
    if not inert:
        return realized, 0
    out, n = [], 0
    for o in realized:
        kind, body = next(iter(o.items()))
        if kind == "set" and body.get("name") in INTERVAL_SETS and body.get("family", "bridge") == "bridge" and "elem" in body:
            kept = [e for e in body["elem"] if not ((f := concat_fields(e)) is not None and f[0] in inert)]
            if len(kept) != len(body["elem"]):
                n += len(body["elem"]) - len(kept)
                body = {k: v for k, v in body.items() if k != "elem"}
                if kept:
                    body["elem"] = kept
                o = {kind: body}
        out.append(o)
    return out, n


def collect_delta(live: LiveElements, ports: list[str]) -> ElementDelta:
    """The deletes of unbound ports' leftovers."""
    names = sorted(live.kind)
    delete = {n: [e for p in ports for e in live.leftover[p].get(n, ())] for n in names}
    return ElementDelta({n: live.kind[n] for n in names}, tuple((n, tuple(delete[n])) for n in names),
                        tuple((n, ()) for n in names))


def in_force_elements(live: LiveElements, names: set[str] | list[str]) -> dict[str, dict[Any, Any]]:
    """The elements of the sets `names` with every leftover deleted (by canonical key):
    what a rebuild from the plan in force writes into them."""
    out = {}
    for name in names:
        # a dict's copy keeps its keys' hashes: an interval element's is its JSON, and
        # hashing 10,000 of them again would cost the loop ~50 ms
        elems = dict(live.elems[name])
        for key in _leftover_keys(live, name, list(live.leftover)):
            elems.pop(key, None)
        out[name] = elems
    return out


def _leftover_keys(live: LiveElements, name: str, ports: list[str]) -> set[Any]:
    return {_lkey(e) for p in ports for e in live.leftover.get(p, {}).get(name, ())}


def catch_up_delta(live: LiveElements, before: dict[str, dict[Any, Any]], ports: list[str]) -> ElementDelta:
    """A rebuild of the sets in `before` was encoded from those elements (the plan in
    force when it was encoded: in_force_elements) and `live` has moved on since: binds,
    unbinds and edits were committed meanwhile. The delta that, in the rebuild's own
    commit, brings the sets to what `live` holds now without the leftovers of `ports`
    (the ports being collected; a port with leftovers now and not among them keeps
    them: its unbind came after the encoding, and its elements are in `before`).
    A bound guest's element added meanwhile is added again, one deleted meanwhile is
    deleted again (else the rebuild would bring back an allow its guest lost)."""
    names = sorted(before)
    delete, add = [], []
    for name in names:
        elems, was = live.elems[name], before[name]
        # sets made from dicts reuse the dicts' hashes; only what differs is hashed
        now, old = set(elems) - _leftover_keys(live, name, ports), set(was)
        delete.append((name, tuple(was[k] for k in old - now)))
        add.append((name, tuple(elems[k] for k in now - old)))
    return ElementDelta({n: live.kind[n] for n in names}, tuple(delete), tuple(add))


def record_collected(live: LiveElements, names: set[str] | list[str], ports: list[str]) -> int:
    """After a collection of `ports` rebuilt the sets `names` (with catch_up_delta): their
    leftovers there are gone from the kernel, and from `live`. Leftovers in other sets
    (a port unbound again meanwhile, with other elements) stay. Returns how many
    elements went."""
    n = 0
    for name in names:
        for k in _leftover_keys(live, name, ports):
            n += live.elems[name].pop(k, None) is not None
    for p in ports:
        by_set = live.leftover.get(p)
        if by_set is None:
            continue
        for name in names:
            by_set.pop(name, None)
        if not by_set:
            del live.leftover[p]
    return n


def interval_elements(live: LiveElements) -> int:
    return sum(len(live.elems[name]) for name in live.kind if name in INTERVAL_SETS)


# ---- deltas straight over nfnetlink (apply/nfnl.py, nfnl_chains.py say why) -------

def send_delta(sock, table: str, live: LiveElements, delta: ElementDelta) -> None:
    """Commit a delta -- its elements and a bind's netdev port chains -- as one
    nfnetlink batch, in delta_batch's order. Raises nfnl.Unencodable before sending
    anything it cannot encode (the caller then uses libnftables), and ApplyError with
    the equivalent libnftables JSON attached when the kernel refuses (nothing of the
    batch is committed then)."""
    from segguard.apply import nfnl, nfnl_chains

    try:
        # a kernel that deletes a single-device netdev chain with its device (6.1;
        # 6.18 keeps it, unhooked) leaves the unbind of a gone tap nothing to delete,
        # and a DELCHAIN of nothing would fail the whole batch
        present = [name for name in delta.port_chains_delete if nfnl_chains.chain_present(sock, table, name)]
        batch = sock.batch()  # numbered after those gets
        for name in present:
            nfnl_chains.delete_chain(batch, table, name)
        if delta.delete_port_table:
            nfnl_chains.delete_table(batch, table)
        batch.elements(table, live.spec, [(n, e) for n, e in delta.delete if e], [(n, e) for n, e in delta.add if e])
        nfnl_chains.add_objects(batch, delta.port_chains_add)
        sock.send(batch)
    except nfnl.NetlinkError as exc:
        raise ApplyError(f"kernel refused updates of the segguard table: {exc.strerror}",
                         batch=delta_batch(table, delta), kernel_error=str(exc)) from exc


def read_back_touched(sock, table: str, live: LiveElements, delta: ElementDelta,
                      kept: list[tuple[str, Any]] = ()) -> list[str]:
    """Ask the kernel for exactly what `delta` touched (`live` has it applied): each
    element it added must be there as written (a map's verdict included), each key it
    deleted and did not re-add must be gone; each port chain it added must hold its
    hook and rules as planned, each it deleted must be gone. A get per element and per
    chain, not a listing: the read-back of an edit or a bind costs the same with 10 or
    5,000 guests, and covers the policy sets too (a deleted allow element left behind
    is an open door). `kept`: (set, element) a bind found already there (a leftover
    its guest wants: settle_leftovers), read back as its adds are. Raises
    nfnl.Unencodable for a chain of a shape nfnl_chains.py does not know (the caller
    lists it instead)."""
    from segguard.apply import nfnl

    try:
        return _read_back_touched(sock, table, live, delta, kept)
    except nfnl.NetlinkError as exc:
        return [f"cannot read the touched objects back: {exc.strerror}"]


def _read_back_touched(sock, table: str, live: LiveElements, delta: ElementDelta, kept=()) -> list[str]:
    from segguard.apply import nfnl, nfnl_chains

    problems: list[str] = []
    added = [next(iter(o.values()))["name"] for o in delta.port_chains_add if "chain" in o]
    for chain in added + list(delta.port_chains_delete):
        problems += nfnl_chains.chain_problems(sock, table, chain, live.netdev.get(chain))
    if delta.delete_port_table and not live.netdev and nfnl_chains.table_present(sock, table):
        problems.append(f"netdev table {table}: still present")
    adds = [(name, live.spec[name], e) for name, elems in delta.add for e in elems]
    adds += [(name, live.spec[name], e) for name, e in kept]
    # a map's deletes are bare keys; a key re-added (another verdict) is checked with the adds
    deletes = [(name, (live.spec[name][0], live.spec[name][1], False), k) for name, keys in delta.delete
               for k in keys if _lkey(k) not in live.elems[name]]
    got = sock.get_many(table, adds + deletes)
    for (name, spec, e), body in zip(adds, got[:len(adds)]):
        if not nfnl.held(nfnl.element_of_reply(body) if body else None, nfnl.expected_attrs(spec, e)):
            problems.append(f"{live.kind[name]} {name}: {_key(e)} is not held as written")
    for (name, spec, k), body in zip(deletes, got[len(adds):]):
        el = nfnl.element_of_reply(body) if body else None
        if el is not None and all(el.get(a) == v for a, v in nfnl.expected_attrs(spec, k).items()):
            problems.append(f"{live.kind[name]} {name}: {_key(k)} is still there")
    return problems
