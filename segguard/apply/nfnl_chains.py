"""A bind's netdev port chains (compile/nft.py _port_ingress) over nfnetlink, in the
same batch as its elements, and their read-back.

Why: before it adds a rule libnftables fills its cache with every chain of every
table (nftables 1.0.6 src/cache.c); with 5,000 guests that is ~10,000 chains and
~20 ms of a tap's bind, and listing the new chain to read it back costs as much again.
A port chain is small and fixed in shape: a base chain on one device's ingress and
two rules, each one match of the Ethernet header, a counter and a verdict (or log +
accept in audit mode). This module encodes exactly those shapes, the way libnftables
does (the `meta iiftype ether` guard it puts in front of a link-layer match included);
anything else raises nfnl.Unencodable and the caller sends the delta through
libnftables. tests/netns/test_nfnl_chains.py holds the kernel's copy of chains written
here byte for byte against the same chains written by libnftables.

The read-back asks the kernel for each touched chain by name (its hook, device,
priority, type and policy) and dumps its rules in order, comparing every expression's
attributes with what was sent. A deleted chain must be gone."""
from __future__ import annotations

import struct
from typing import Any

from segguard.apply import nfnl
from segguard.apply.nfnl import NLA_F_NESTED, NLM_F_CREATE, Unencodable, _attr, parse_attrs

NFPROTO_NETDEV = 5
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE = 0, 1, 2
NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN, NFT_MSG_DELCHAIN = 3, 4, 5
NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 6, 7
NLM_F_EXCL, NLM_F_APPEND = 0x200, 0x800

TABLE_NAME = 1
CHAIN_TABLE, CHAIN_NAME, CHAIN_HOOK, CHAIN_POLICY, CHAIN_TYPE = 1, 3, 4, 5, 7
HOOK_NUM, HOOK_PRIORITY, HOOK_DEV, HOOK_DEVS = 1, 2, 3, 4
RULE_TABLE, RULE_CHAIN, RULE_EXPRESSIONS, RULE_USERDATA = 1, 2, 4, 7
EXPR_NAME, EXPR_DATA = 1, 2
UDATA_RULE_COMMENT = 0

NF_NETDEV_INGRESS = 0
NF_DROP, NF_ACCEPT = 0, 1
REG_VERDICT, REG_1 = 0, 1
META_IIFTYPE = 8
ARPHRD_ETHER = 1
PAYLOAD_LL_HEADER = 0
CMP_OPS = {"==": 0, "!=": 1}
ETHER_FIELDS = {"daddr": 0, "saddr": 6}   # offset in the Ethernet header; 6 bytes each
# what the kernel reports for an attribute the sender left out (nft_log.c: warning)
LOG_LEVEL_ATTR, LOG_LEVEL_DEFAULT = 5, 4


def _u32(v: int) -> bytes:
    return struct.pack(">I", v & 0xFFFFFFFF)


def _str(v: str) -> bytes:
    return v.encode() + b"\0"


def _nest(kind: int, payload: bytes, nested: int) -> bytes:
    return _attr(kind | nested, payload)


def _mac(v: Any) -> bytes:
    try:
        b = bytes(int(x, 16) for x in v.split(":"))
    except (AttributeError, ValueError) as exc:
        raise Unencodable(f"ether address {v!r}") from exc
    if len(b) != 6:
        raise Unencodable(f"ether address {v!r}")
    return b


# ---- expressions: (name, [(attribute type, payload)]); nests built with `nested` ------

Expr = tuple[str, list[tuple[int, bytes]]]


def _value(data: bytes) -> bytes:
    return _attr(1, data)  # NFTA_DATA_VALUE, inside the expression's data nest


def _ether_match(m: dict[str, Any]) -> list[Expr]:
    op = CMP_OPS.get(m.get("op", "=="))
    left, right = m.get("left"), m.get("right")
    mask = None
    if isinstance(left, dict) and "&" in left:
        left, mask = left["&"]
    field = left.get("payload", {}) if isinstance(left, dict) else {}
    if op is None or field.get("protocol") != "ether" or field.get("field") not in ETHER_FIELDS or set(field) != {"protocol", "field"}:
        raise Unencodable(f"match {m!r}")
    out: list[Expr] = [
        # libnftables' dependency for a link-layer field in the netdev family
        ("meta", [(2, _u32(META_IIFTYPE)), (1, _u32(REG_1))]),
        ("cmp", [(1, _u32(REG_1)), (2, _u32(0)), (3, _value(struct.pack("=H", ARPHRD_ETHER)))]),
        ("payload", [(1, _u32(REG_1)), (2, _u32(PAYLOAD_LL_HEADER)), (3, _u32(ETHER_FIELDS[field["field"]])), (4, _u32(6))]),
    ]
    if mask is not None:
        out.append(("bitwise", [(1, _u32(REG_1)), (2, _u32(REG_1)), (3, _u32(6)), (6, _u32(0)),
                                (4, _value(_mac(mask))), (5, _value(b"\0" * 6))]))
    out.append(("cmp", [(1, _u32(REG_1)), (2, _u32(op)), (3, _value(_mac(right)))]))
    return out


def _verdict(code: int, nested: int) -> Expr:
    return ("immediate", [(1, _u32(REG_VERDICT)), (2, _nest(2, _attr(1, struct.pack(">i", code)), nested))])


def exprs(rule: dict[str, Any], nested: int = NLA_F_NESTED) -> list[Expr]:
    """The expressions of one port-chain rule (its JSON body), or Unencodable."""
    out: list[Expr] = []
    for e in rule.get("expr", []):
        if not isinstance(e, dict) or len(e) != 1:
            raise Unencodable(f"expression {e!r}")
        (kind, body), = e.items()
        if kind == "match" and isinstance(body, dict):
            out += _ether_match(body)
        elif kind == "counter" and body is None:
            out.append(("counter", []))
        elif kind == "log" and isinstance(body, dict) and set(body) == {"prefix"}:
            out.append(("log", [(2, _str(body["prefix"]))]))
        elif kind in ("drop", "accept") and body is None:
            out.append(_verdict(NF_DROP if kind == "drop" else NF_ACCEPT, nested))
        else:
            raise Unencodable(f"expression {e!r}")
    return out


def _expressions_attr(xs: list[Expr]) -> bytes:
    elems = b""
    for name, attrs in xs:
        data = b"".join(_attr(t, p) if t not in _NESTED.get(name, ()) else _nest(t, p, NLA_F_NESTED) for t, p in attrs)
        body = _attr(EXPR_NAME, _str(name)) + (_nest(EXPR_DATA, data, NLA_F_NESTED) if attrs else b"")
        elems += _nest(1, body, NLA_F_NESTED)
    return _nest(RULE_EXPRESSIONS, elems, NLA_F_NESTED)


# attributes that are nests (NLA_F_NESTED on the way in; the kernel reports them without)
_NESTED = {"cmp": (3,), "bitwise": (4, 5), "immediate": (2,)}


def _comment(rule: dict[str, Any]) -> bytes:
    c = rule.get("comment")
    if not c:
        return b""
    b = _str(c)
    if len(b) > 255:
        raise Unencodable("comment longer than a userdata TLV")
    return bytes([UDATA_RULE_COMMENT, len(b)]) + b


# ---- messages -----------------------------------------------------------------------

def _chain_hook(body: dict[str, Any]) -> bytes:
    return _nest(CHAIN_HOOK, _attr(HOOK_NUM, _u32(NF_NETDEV_INGRESS)) + _attr(HOOK_PRIORITY, _u32(body["prio"]))
                 + _attr(HOOK_DEV, _str(body["dev"])), NLA_F_NESTED)


def _check_chain(body: dict[str, Any]) -> None:
    want = {"family", "table", "name", "type", "hook", "dev", "prio", "policy"}
    if (set(body) != want or body["family"] != "netdev" or body["type"] != "filter" or body["hook"] != "ingress"
            or body["policy"] != "accept" or not isinstance(body["prio"], int) or not 0 < len(body["dev"].encode()) < 16):
        raise Unencodable(f"chain {body!r}")


def add_objects(batch: nfnl.Batch, objects: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> None:
    """The netdev table, chains and rules of `objects` (ElementDelta.port_chains_add),
    in order. Raises Unencodable before adding anything."""
    msgs = []
    for obj in objects:
        (kind, body), = obj.items()
        if body.get("family") != "netdev":
            raise Unencodable(f"{kind} of family {body.get('family')}")
        if kind == "table" and set(body) == {"family", "name"}:
            # the host's one netdev table: already there when another port has a chain
            msgs.append((NFT_MSG_NEWTABLE, NLM_F_CREATE, _attr(TABLE_NAME, _str(body["name"]))))
        elif kind == "chain":
            _check_chain(body)
            # EXCL: a chain of that name left behind would be appended to, not replaced
            msgs.append((NFT_MSG_NEWCHAIN, NLM_F_CREATE | NLM_F_EXCL,
                         _attr(CHAIN_TABLE, _str(body["table"])) + _attr(CHAIN_NAME, _str(body["name"]))
                         + _chain_hook(body) + _attr(CHAIN_POLICY, _u32(NF_ACCEPT))
                         + _attr(CHAIN_TYPE, _str("filter"))))
        elif kind == "rule" and set(body) <= {"family", "table", "chain", "expr", "comment"}:
            udata = _comment(body)
            msgs.append((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND,
                         _attr(RULE_TABLE, _str(body["table"])) + _attr(RULE_CHAIN, _str(body["chain"]))
                         + _expressions_attr(exprs(body)) + (_attr(RULE_USERDATA, udata) if udata else b"")))
        else:
            raise Unencodable(f"{kind} {body!r}")
    for mtype, flags, payload in msgs:
        batch.add(mtype, flags, NFPROTO_NETDEV, payload)


def delete_chain(batch: nfnl.Batch, table: str, name: str) -> None:
    # the kernel deletes a chain's rules with it (nf_tables_delchain)
    batch.add(NFT_MSG_DELCHAIN, 0, NFPROTO_NETDEV, _attr(CHAIN_TABLE, _str(table)) + _attr(CHAIN_NAME, _str(name)))


def delete_table(batch: nfnl.Batch, table: str) -> None:
    batch.add(NFT_MSG_DELTABLE, 0, NFPROTO_NETDEV, _attr(TABLE_NAME, _str(table)))


# ---- read-back ------------------------------------------------------------------------

def _attrs_of(data: bytes) -> list[tuple[int, bytes]]:
    """Attributes in order, type without flags, payload unpadded."""
    out, off = [], 0
    while off + 4 <= len(data):
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        out.append((atype & 0x3FFF, data[off + 4:off + alen]))
        off += (alen + 3) & ~3
    return out


def _unflag(payload: bytes) -> bytes:
    """A nest's payload with NLA_F_NESTED taken off its attributes (how the kernel dumps)."""
    return b"".join(_attr(t, p) for t, p in _attrs_of(payload))


def expected_rule(rule: dict[str, Any]) -> tuple[list[tuple[str, list[tuple[int, bytes]] | None]], bytes]:
    """(expressions as the kernel dumps them, userdata). A counter's attributes are its
    packet and byte counts, which frames change: None, only its place is compared."""
    out = []
    for name, attrs in exprs(rule, nested=0):
        if name == "counter":
            out.append((name, None))
            continue
        got = sorted(attrs)
        if name == "log" and not any(t == LOG_LEVEL_ATTR for t, _ in got):
            got = sorted([*got, (LOG_LEVEL_ATTR, _u32(LOG_LEVEL_DEFAULT))])
        out.append((name, got))
    return out, _comment(rule)


def held_rule(body: bytes) -> tuple[list[tuple[str, list[tuple[int, bytes]] | None]], bytes]:
    """A dumped NEWRULE message in the form of expected_rule."""
    top = parse_attrs(body, 4)
    out = []
    for le in parse_attrs((top.get(RULE_EXPRESSIONS) or [b""])[0]).get(1, []):
        e = parse_attrs(le)
        name = (e.get(EXPR_NAME) or [b""])[0].rstrip(b"\0").decode(errors="replace")
        attrs = [(t, _unflag(p) if t in _NESTED.get(name, ()) else p) for t, p in _attrs_of((e.get(EXPR_DATA) or [b""])[0])]
        out.append((name, None if name == "counter" else sorted(attrs)))
    return out, (top.get(RULE_USERDATA) or [b""])[0]


def _chain_problems(got: bytes, body: dict[str, Any]) -> list[str]:
    top = parse_attrs(got, 4)
    hook = parse_attrs((top.get(CHAIN_HOOK) or [b""])[0])
    devs = {p.rstrip(b"\0").decode(errors="replace") for p in hook.get(HOOK_DEV, [])}
    for nest in hook.get(HOOK_DEVS, []):
        devs |= {p.rstrip(b"\0").decode(errors="replace") for p in parse_attrs(nest).get(1, [])}
    problems = []
    if hook.get(HOOK_NUM) != [_u32(NF_NETDEV_INGRESS)] or hook.get(HOOK_PRIORITY) != [_u32(body["prio"])]:
        problems.append("hook or priority differs")
    if devs != {body["dev"]}:
        problems.append(f"device is {sorted(devs)}, not {body['dev']}")
    if top.get(CHAIN_TYPE) != [_str("filter")] or top.get(CHAIN_POLICY) != [_u32(NF_ACCEPT)]:
        problems.append("type or policy differs")
    return problems


def chain_problems(sock: nfnl.NfnlSocket, table: str, name: str, objs: list[dict[str, Any]] | None) -> list[str]:
    """What differs between the kernel's netdev chain `name` and `objs` (its chain and
    rules, in order; None: the chain must not exist)."""
    key = _attr(CHAIN_TABLE, _str(table)) + _attr(CHAIN_NAME, _str(name))
    got = sock.request(NFT_MSG_GETCHAIN, NFPROTO_NETDEV, key, f"get netdev chain {name}")
    if objs is None:
        return [f"netdev chain {name}: still present"] if got else []
    if not got:
        return [f"netdev chain {name}: missing"]
    chain = next(iter(objs[0].values()))
    problems = [f"netdev chain {name}: {p}" for p in _chain_problems(got[0], chain)]
    rules = sock.request(NFT_MSG_GETRULE, NFPROTO_NETDEV, _attr(RULE_TABLE, _str(table)) + _attr(RULE_CHAIN, _str(name)),
                         f"dump netdev chain {name}", dump=True) or []
    want = [expected_rule(next(iter(o.values()))) for o in objs[1:]]
    have = [held_rule(r) for r in rules]
    if have != want:
        problems.append(f"netdev chain {name}: {len(have)} rules held, {len(want)} planned, or a rule differs")
    return problems


def chain_present(sock: nfnl.NfnlSocket, table: str, name: str) -> bool:
    key = _attr(CHAIN_TABLE, _str(table)) + _attr(CHAIN_NAME, _str(name))
    return bool(sock.request(NFT_MSG_GETCHAIN, NFPROTO_NETDEV, key, f"get netdev chain {name}"))


def table_present(sock: nfnl.NfnlSocket, table: str) -> bool:
    return bool(sock.request(NFT_MSG_GETTABLE, NFPROTO_NETDEV, _attr(TABLE_NAME, _str(table)), "get netdev table"))

