"""Small helpers returning libnftables JSON fragments (dicts), so rules read like nft
and no rule text is ever assembled from strings (no injection through profile values).

The shapes are the ones `nft -j list` prints back, so read-back compares exactly.
"""
from __future__ import annotations

from typing import Any

import netaddr

FAMILY = "bridge"
NETDEV = "netdev"
Expr = dict[str, Any]


def payload(protocol: str, field: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": field}}


def raw_payload(base: str, offset: int, length: int) -> Expr:
    return {"payload": {"base": base, "offset": offset, "len": length}}


def meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def match(left: Any, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def bitand(left: Any, mask: Any) -> Expr:
    return {"&": [left, mask]}


def concat(*parts: Any) -> Expr:
    return {"concat": list(parts)}


def exthdr_exists(name: str) -> Expr:
    return match({"exthdr": {"name": name}}, True)


def exthdr_missing(name: str) -> Expr:
    return match({"exthdr": {"name": name}}, False)


def ct_state(*states: str) -> Expr:
    right: Any = list(states) if len(states) > 1 else states[0]
    return match({"ct": {"key": "state"}}, right, "in")


def ref(set_name: str) -> str:
    return "@" + set_name


def addr_elem(net: netaddr.IPNetwork) -> Any:
    if net.size == 1:
        return str(net.ip)
    return {"prefix": {"addr": str(net.network), "len": net.prefixlen}}


def merged(nets, version: int) -> list[netaddr.IPNetwork]:
    return netaddr.cidr_merge([n for n in nets if n.version == version])


ACCEPT: Expr = {"accept": None}
DROP: Expr = {"drop": None}
COUNTER: Expr = {"counter": None}


def vmap_lookup(key: Expr, map_name: str) -> Expr:
    return {"vmap": {"key": key, "data": ref(map_name)}}


def jump(chain: str) -> Expr:
    return {"jump": {"target": chain}}


def goto(chain: str) -> Expr:
    return {"goto": {"target": chain}}


def log(prefix: str) -> Expr:
    return {"log": {"prefix": prefix[:127]}}


# ---- objects (the "add" commands of one batch) -------------------------------------

def table(name: str, family: str = FAMILY) -> Expr:
    return {"table": {"family": family, "name": name}}


def chain(tbl: str, name: str, hook: str | None = None, prio: int = 0) -> Expr:
    body: dict[str, Any] = {"family": FAMILY, "table": tbl, "name": name}
    if hook:
        body.update(type="filter", hook=hook, prio=prio, policy="accept")
    return {"chain": body}


def set_(tbl: str, name: str, type_: str | list[str], elems: list[Any], interval: bool = False) -> Expr:
    body: dict[str, Any] = {"family": FAMILY, "table": tbl, "name": name, "type": type_}
    if interval:
        body["flags"] = ["interval"]
    if elems:
        body["elem"] = elems
    return {"set": body}


def vmap(tbl: str, name: str, key_type: str, elems: list[tuple[str, Expr]]) -> Expr:
    body: dict[str, Any] = {"family": FAMILY, "table": tbl, "name": name, "type": key_type, "map": "verdict"}
    if elems:
        body["elem"] = [[k, v] for k, v in elems]
    return {"map": body}


def ingress_chain(tbl: str, name: str, dev: str, prio: int) -> Expr:
    """A netdev-family chain on one device's ingress: it sees every frame the device
    receives, before the bridge's rx handler (which sends some frames past all bridge
    hooks)."""
    return {"chain": {"family": NETDEV, "table": tbl, "name": name, "type": "filter", "hook": "ingress",
                      "dev": dev, "prio": prio, "policy": "accept"}}


def rule(tbl: str, chain_name: str, exprs: list[Expr], comment: str | None = None, family: str = FAMILY) -> Expr:
    body: dict[str, Any] = {"family": family, "table": tbl, "chain": chain_name, "expr": exprs}
    if comment:
        body["comment"] = comment[:127]
    return {"rule": body}
