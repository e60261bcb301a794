"""Bind and unbind one port without replacing the table: element updates of the three
dispatch objects, in one transaction, then the same exact read-back as a full apply.

Every guest's chains exist in the plan whether or not it is bound (compile/nft.py), so
binding a tap only adds `port -> goto out_<guest>` / `port -> goto pin_<profile>` and
`(mac, port)`; unbinding deletes them. Nothing is flushed: until the transaction
commits the old elements judge every frame, after it the new ones do, and an unbound
guest's MAC is dropped by `legacy_macs` on every port in between.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from segguard.apply.nftables import Nft, NftablesApplier, _metainfo, diff_objects, normalize, rule_order
from segguard.errors import ApplyError
from segguard.plan import Plan

# The only objects whose elements change when a tap appears or goes away.
ELEMENT_OBJECTS = ("out_dispatch", "in_dispatch", "bound_ports")


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


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
            body = copy.deepcopy(body)
            elems[body["name"]] = (kind, body.pop("elem", []))
            rest.append({kind: body})
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
    if set(want) != set(ELEMENT_OBJECTS) or set(have) != set(ELEMENT_OBJECTS):
        return None
    kinds: dict[str, str] = {}
    delete, add = [], []
    for name in ELEMENT_OBJECTS:
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
    return ElementDelta(kinds, tuple(delete), tuple(add), tuple(copy.deepcopy(port_add)),
                        () if drop_table else port_delete, drop_table)


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
