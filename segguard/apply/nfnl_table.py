"""The full replace of segguard's tables as one nfnetlink batch, and its read-back
from the kernel's dumps.

Why: through libnftables a full apply of 1,000 guests cost ~1.5-2 s. Its JSON
parser, evaluation and cache took ~0.5 s for the replace, and listing the table
back another ~0.5-1 s. Nearly all of that is per guest: ~56,000 port-keyed
elements, an ND chain per IPv6 guest and a netdev chain per port. The rules that
are not per guest number ~120 for any N.

How the rules are encoded without a second copy of libnftables' compiler: libnftables
encodes them itself, in the network namespace of a forked child that dies with it
(`learn`). The child writes the plan's skeleton there (every set without its
port-keyed elements, the chains, the rules that are not per guest) and hands back
what the kernel holds: each rule's expressions, each set's attributes, and the
elements of the sets nfnl.py does not encode. The real batch resends those bytes, so
the table holds what this host's libnftables would have written, whatever its
version. The per-guest parts are encoded here:
- port-keyed elements (nfnl.py's element_payloads);
- the netdev port chains (their hooks as nfnl_chains.py encodes them);
- the rules of the ND and port chains: raw-payload and Ethernet matches, counters,
  verdicts, log (`direct_rule`).

One rule of each shape of the last kind is learned too and compared byte for byte.
A libnftables that encodes them otherwise sends the apply down the libnftables road
(Unencodable), and so does anything else this module does not know.

Read-back: dumps of the table's sets, chains, rules and of every set's elements,
compared with what was sent (the kernel's own form: it was learned from a dump). A
rule's counters are compared by place, not value.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from segguard.apply import nfnl, nfnl_chains
from segguard.apply.nfnl import NFPROTO_BRIDGE, NLM_F_CREATE, Unencodable, _attr, parse_attrs

NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE = 0, 1, 2
NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN = 3, 4
NFT_MSG_NEWRULE, NFT_MSG_GETRULE, NFT_MSG_DELRULE = 6, 7, 8
NFT_MSG_NEWSET, NFT_MSG_GETSET, NFT_MSG_DELSET = 9, 10, 11
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM = 12, 13
NLM_F_APPEND = 0x800
CLONE_NEWNET = 0x40000000

TABLE_NAME = 1
CHAIN_TABLE, CHAIN_NAME, CHAIN_HOOK, CHAIN_POLICY, CHAIN_TYPE = 1, 3, 4, 5, 7
HOOK_NUM, HOOK_PRIORITY = 1, 2
RULE_TABLE, RULE_CHAIN, RULE_EXPRESSIONS, RULE_USERDATA = 1, 2, 4, 7
SET_TABLE, SET_NAME, SET_ID = 1, 2, 10
# the attributes of a set that describe it (flags, key and data types and lengths,
# policy, desc, timeout, gc interval, userdata, object type, expressions); a dump
# also holds the handle and what a newer kernel reports about its backend
SET_RESENT = (3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 17, 18)
LIST_ELEM, EXPR_NAME, EXPR_DATA = 1, 1, 2

BRIDGE_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
POLICIES = {"drop": 0, "accept": 1}
PAYLOAD_BASES = {"ll": 0, "nh": 1, "th": 2}
VERDICT_CODES = {"accept": 1, "drop": 0, "continue": -1, "return": -5, "jump": -3, "goto": -4}


def _u32(v: int) -> bytes:
    return struct.pack(">I", v & 0xFFFFFFFF)


def _str(v: str) -> bytes:
    return v.encode() + b"\0"


def _body(obj: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    (kind, body), = obj.items()
    return kind, body


# ---- per-guest rules, in the kernel's form -----------------------------------------------
# The ND chains' raw-payload matches and the netdev port chains' Ethernet matches, with
# counters, verdicts, log and comments. Each piece is built once per distinct value:
# ~5,000 such rules at 1,000 guests, most pieces shared.

@functools.lru_cache(maxsize=1 << 12)
def _expr(name: str, attrs: tuple[tuple[int, bytes], ...]) -> bytes:
    return _attr(LIST_ELEM, _attr(EXPR_NAME, _str(name)) + _attr(EXPR_DATA, b"".join(_attr(t, p) for t, p in attrs)))


def _data(value: bytes) -> bytes:
    return _attr(1, value)  # NFTA_DATA_VALUE


_COUNTER = _expr("counter", ((1, bytes(8)), (2, bytes(8))))


@functools.lru_cache(maxsize=1 << 14)
def _verdict(kind: str, target: str | None) -> bytes:
    verdict = _attr(1, struct.pack(">i", VERDICT_CODES[kind]))
    if target is not None:
        verdict += _attr(2, _str(target))
    # NFTA_IMMEDIATE_DREG = the verdict register; NFTA_IMMEDIATE_DATA{NFTA_DATA_VERDICT{...}}
    return _expr("immediate", ((1, _u32(0)), (2, _attr(2, verdict))))


@functools.lru_cache(maxsize=1 << 12)
def _load(base: int, offset: int, size: int, mask: bytes | None, guard: bool) -> bytes:
    """Load `size` bytes at `offset` of header `base` into register 1, masked. `guard`:
    libnftables' `meta iiftype ether` in front of a link-layer field of the netdev family."""
    out = b""
    if guard:
        out += _expr("meta", ((2, _u32(nfnl_chains.META_IIFTYPE)), (1, _u32(1))))
        out += _expr("cmp", ((1, _u32(1)), (2, _u32(0)), (3, _data(struct.pack("=H", nfnl_chains.ARPHRD_ETHER)))))
    out += _expr("payload", ((1, _u32(1)), (2, _u32(base)), (3, _u32(offset)), (4, _u32(size))))
    if mask is not None:
        # the order of the kernel's dump: sreg, dreg, len, op (mask-and-xor), mask, xor
        out += _expr("bitwise", ((1, _u32(1)), (2, _u32(1)), (3, _u32(size)), (6, _u32(0)),
                                 (4, _data(mask)), (5, _data(bytes(size)))))
    return out


@functools.lru_cache(maxsize=1 << 14)
def _cmp(op: str, value: bytes) -> bytes:
    return _expr("cmp", ((1, _u32(1)), (2, _u32(CMP_OPS[op])), (3, _data(value))))


CMP_OPS = {"==": 0, "!=": 1}


def _match(m: Any, family: str) -> tuple[bytes, tuple]:
    """(expressions, shape) of one match."""
    try:
        op, left, right = m["op"], m["left"], m["right"]
    except (TypeError, KeyError) as exc:
        raise Unencodable(f"match {m!r}") from exc
    mask = None
    if type(left) is dict and "&" in left and len(left) == 1:
        left, mask = left["&"] if type(left["&"]) is list and len(left["&"]) == 2 else (None, None)
    p = left.get("payload") if type(left) is dict and len(left) == 1 else None
    if len(m) != 3 or op not in CMP_OPS or type(p) is not dict:
        raise Unencodable(f"match {m!r}")
    if "base" in p and len(p) == 3 and p["base"] in PAYLOAD_BASES:
        # a raw payload: libnftables adds no dependency
        offset, bits = p.get("offset"), p.get("len")
        if (type(offset) is not int or type(bits) is not int or type(right) is not int or offset % 8 or bits % 8
                or not 0 < bits <= 128 or offset < 0 or not 0 <= right < 1 << bits
                or (mask is not None and (type(mask) is not int or not 0 <= mask < 1 << bits))):
            raise Unencodable(f"match {m!r}")
        size = bits // 8
        code = (_load(PAYLOAD_BASES[p["base"]], offset // 8, size, None if mask is None else mask.to_bytes(size, "big"), False)
                + _cmp(op, right.to_bytes(size, "big")))
        return code, ("raw", p["base"], offset, bits, mask is not None, op)
    if (family == "netdev" and p.get("protocol") == "ether" and len(p) == 2
            and p.get("field") in nfnl_chains.ETHER_FIELDS and (mask is None or type(mask) is str)):
        code = (_load(0, nfnl_chains.ETHER_FIELDS[p["field"]], 6, None if mask is None else nfnl_chains._mac(mask), True)
                + _cmp(op, nfnl_chains._mac(right)))
        return code, ("ether", p["field"], mask, op)
    raise Unencodable(f"match {m!r}")


def direct_rule(body: dict[str, Any]) -> tuple[bytes, bytes, tuple]:
    """(NFTA_RULE_EXPRESSIONS payload, userdata, shape) of a per-guest rule as the
    kernel dumps it; Unencodable for anything outside that vocabulary. The shape is
    what decides the encoding besides the constants (values compared, integer masks,
    comment, jump target, log prefix): one rule of each is checked against libnftables."""
    if not set(body) <= RULE_KEYS:
        raise Unencodable(f"rule {body!r}")
    family = body.get("family")
    parts, shape = [], [family, bool(body.get("comment"))]
    for e in body.get("expr", ()):
        if type(e) is not dict or len(e) != 1:
            raise Unencodable(f"expression {e!r}")
        (kind, arg), = e.items()
        if kind == "match":
            code, sh = _match(arg, family)
            parts.append(code)
            shape.append(sh)
            continue
        if kind == "counter" and arg is None:
            parts.append(_COUNTER)
        elif kind in VERDICT_CODES and kind not in ("jump", "goto") and arg is None:
            parts.append(_verdict(kind, None))
        elif kind in ("jump", "goto") and type(arg) is dict and len(arg) == 1 and type(arg.get("target")) is str:
            parts.append(_verdict(kind, arg["target"]))
        elif kind == "log" and type(arg) is dict and len(arg) == 1 and type(arg.get("prefix")) is str:
            # the kernel reports the level it defaults to (nft_log.c: warning)
            parts.append(_expr("log", ((2, _str(arg["prefix"])), (nfnl_chains.LOG_LEVEL_ATTR, _u32(nfnl_chains.LOG_LEVEL_DEFAULT)))))
        else:
            raise Unencodable(f"expression {e!r}")
        shape.append(kind)
    return b"".join(parts), nfnl_chains._comment(body), tuple(shape)


RULE_KEYS = frozenset({"family", "table", "chain", "expr", "comment"})


# ---- what libnftables makes of the skeleton --------------------------------------------

SAMPLE_CHAIN = "__sample{}"  # no plan names a chain so (compile/nft.py)


@dataclass
class Learned:
    sets: dict[str, dict[int, bytes]]                     # set -> resent attributes
    rules: dict[tuple[int, str], list[tuple[bytes, bytes]]]  # (family, chain) -> (expressions, userdata) in order
    elements: dict[str, list[bytes]]                      # learned set -> its elements (LIST_ELEM attributes)
    samples: list[tuple[bytes, bytes]]                    # one learned rule per direct shape, in order


def _targets(node: Any, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("jump", "goto") and isinstance(v, dict) and isinstance(v.get("target"), str):
                out.add(v["target"])
            else:
                _targets(v, out)
    elif isinstance(node, list):
        for v in node:
            _targets(v, out)
    return out


def _skeleton(table: str, bridge: list[dict[str, Any]], direct_sets: set[str], learned_rules: list[dict[str, Any]],
              samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The libnftables batch the child writes: the bridge table with every set (the
    direct ones empty), the chains the learned rules are in or jump to, those rules,
    and one chain per sample rule (a netdev one hooked on the child's loopback)."""
    sets, chains = [], {}
    for obj in bridge:
        kind, body = _body(obj)
        if kind in ("set", "map"):
            sets.append({kind: {k: v for k, v in body.items() if k != "elem"}} if body["name"] in direct_sets else obj)
        elif kind == "chain":
            chains[body["name"]] = obj
    needed = {_body(r)[1]["chain"] for r in learned_rules} | _targets(learned_rules, set()) | _targets(sets, set())
    needed |= _targets(samples, set()) | {n for n, c in chains.items() if "hook" in _body(c)[1]}
    cmds: list[dict[str, Any]] = [{"metainfo": {"json_schema_version": 1}}, {"add": {"table": {"family": "bridge", "name": table}}}]
    if any(_body(x)[1]["family"] == "netdev" for x in samples):
        cmds.append({"add": {"table": {"family": "netdev", "name": table}}})
    cmds += [{"add": o} for o in sets]
    cmds += [{"add": chains[n]} for n in chains if n in needed]
    for i, x in enumerate(samples):
        body = _body(x)[1]
        chain = {"family": body["family"], "table": table, "name": SAMPLE_CHAIN.format(i)}
        if body["family"] == "netdev":
            chain.update(type="filter", hook="ingress", dev="lo", prio=0, policy="accept")
        cmds.append({"add": {"chain": chain}})
        cmds.append({"add": {"rule": {**body, "chain": chain["name"]}}})
    cmds += [{"add": r} for r in learned_rules]
    return {"nftables": cmds}


def _rules_of(sock: nfnl.NfnlSocket, family: int, table: str, chain: str | None = None) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every rule of a table (or of one chain of it), by chain in order: (expressions, userdata)."""
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    want = _attr(RULE_TABLE, _str(table)) + (_attr(RULE_CHAIN, _str(chain)) if chain is not None else b"")
    for body in sock.request(NFT_MSG_GETRULE, family, want, "dump rules", dump=True) or []:
        a = parse_attrs(body, 4)
        # the dump is filtered; a kernel that did not is not trusted
        if a.get(RULE_TABLE) != [_str(table)] or (chain is not None and a.get(RULE_CHAIN) != [_str(chain)]):
            continue
        out.setdefault(a[RULE_CHAIN][0].rstrip(b"\0").decode(), []).append(
            ((a.get(RULE_EXPRESSIONS) or [b""])[0], (a.get(RULE_USERDATA) or [b""])[0]))
    return out


def _sets_of(sock: nfnl.NfnlSocket, table: str) -> dict[str, dict[int, bytes]]:
    out = {}
    for body in sock.request(NFT_MSG_GETSET, NFPROTO_BRIDGE, _attr(TABLE_NAME, _str(table)), "dump sets", dump=True) or []:
        a = parse_attrs(body, 4)
        if a.get(SET_TABLE) != [_str(table)]:
            continue
        out[a[SET_NAME][0].rstrip(b"\0").decode()] = {t: a[t][0] for t in SET_RESENT if t in a}
    return out


def _dump_learned(sock: nfnl.NfnlSocket, table: str, learned_sets: list[str], samples: list[int]) -> Learned:
    rules = {(fam, c): rs for fam in set(samples) | {NFPROTO_BRIDGE} for c, rs in _rules_of(sock, fam, table).items()}
    got = [rules.pop((fam, SAMPLE_CHAIN.format(i)))[0] for i, fam in enumerate(samples)]
    elements = {name: element_payloads(sock, table, name) for name in learned_sets}
    return Learned(_sets_of(sock, table), rules, elements, got)


def element_payloads(sock: nfnl.NfnlSocket, table: str, name: str, size: int | None = None) -> list[bytes]:
    """Every element of a set as the kernel dumps it (each NFTA_LIST_ELEM, whole).

    `size`: the one length, a multiple of 4, of every element expected. A list of that
    many bytes is cut every `size` bytes without reading each header. Compared with the
    expected elements that is exact: the cuts equal them only if the list is those
    elements one after the other, and a list that holds them parses into these cuts."""
    key = _attr(1, _str(table)) + _attr(2, _str(name))
    out: list[bytes] = []
    for body in sock.request(NFT_MSG_GETSETELEM, NFPROTO_BRIDGE, key, f"dump elements of {name}", dump=True) or []:
        for lst in parse_attrs(body, 4).get(3, []):  # NFTA_SET_ELEM_LIST_ELEMENTS
            off, end = 0, len(lst)
            if size and end % size == 0:
                out += [lst[i:i + size] for i in range(0, end, size)]
                continue
            while off + 4 <= end:
                alen = struct.unpack_from("=H", lst, off)[0]
                if alen < 4:
                    break
                out.append(lst[off:off + alen])
                off += (alen + 3) & ~3
    return out


_libc = ctypes.CDLL(None, use_errno=True)


def learn(table: str, skeleton: dict[str, Any], learned_sets: list[str], samples: list[int]) -> Learned:
    """Run `skeleton` through libnftables in a network namespace of a forked child
    (gone with the child: nothing to clean up, nothing the host's tables or traffic
    see) and hand back the kernel's dump of it. `samples`: the family of each sample."""
    from segguard.child import result_of_child

    def in_child() -> tuple[str, Any]:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        from segguard.apply.nftables import Nft

        rc, _out, err = Nft().raw(skeleton)
        if rc != 0:
            return "refused", err.strip()
        return "ok", _dump_learned(nfnl.NfnlSocket(), table, learned_sets, samples)

    ok, got = result_of_child(in_child)
    if not ok:
        raise Unencodable(f"the encoding child answered nothing usable: {got}")
    status, result = got
    if status != "ok":
        raise Unencodable(f"libnftables' encoding of the skeleton: {status}: {result}")
    return result


# one skeleton at a time: a host has one site config, and the rules that are not per
# guest change only with it
_LEARNED: dict[str, Learned] = {}


# ---- the batch ------------------------------------------------------------------------

FAMILIES = {"bridge": NFPROTO_BRIDGE, "netdev": nfnl_chains.NFPROTO_NETDEV}


@dataclass
class Expected:
    """What the kernel must hold after the batch, in the form of its dumps."""

    table: str
    families: set[int] = field(default_factory=set)                   # tables
    sets: dict[str, dict[int, bytes]] = field(default_factory=dict)
    chains: dict[tuple[int, str], tuple] = field(default_factory=dict)  # (family, chain) -> _chain_view
    rules: dict[tuple[int, str], list[tuple[bytes, bytes]]] = field(default_factory=dict)
    elements: dict[str, Counter] = field(default_factory=dict)
    element_size: dict[str, int | None] = field(default_factory=dict)  # the one length of a set's elements
    # a rebuild's: only these sets and the rules of these chains are what it wrote
    partial: bool = False


def _spec(body: dict[str, Any]) -> nfnl.SetSpec | None:
    """(types, interval, map) of a set nfnl.py encodes the elements of, else None."""
    t = body.get("type")
    types = list(t) if isinstance(t, list) else [t]
    if "map" in body and body["map"] != "verdict":
        return None
    if not all(isinstance(x, str) and x in nfnl.TYPES for x in types):
        return None
    return types, "interval" in body.get("flags", ()), "map" in body


def _chain_msg(table: str, body: dict[str, Any]) -> bytes:
    payload = _attr(CHAIN_TABLE, _str(table)) + _attr(CHAIN_NAME, _str(body["name"]))
    extra = set(body) - {"family", "table", "name"}
    if not extra:
        return payload
    if body["family"] == "netdev":
        nfnl_chains._check_chain(body)
        return (payload + nfnl_chains._chain_hook(body) + _attr(CHAIN_POLICY, _u32(POLICIES["accept"]))
                + _attr(CHAIN_TYPE, _str("filter")))
    if (extra != {"type", "hook", "prio", "policy"} or body["type"] != "filter" or body["hook"] not in BRIDGE_HOOKS
            or type(body["prio"]) is not int or body["policy"] not in POLICIES):
        raise Unencodable(f"chain {body!r}")
    hook = _attr(HOOK_NUM, _u32(BRIDGE_HOOKS[body["hook"]])) + _attr(HOOK_PRIORITY, _u32(body["prio"]))
    return (payload + _attr(CHAIN_HOOK, hook, nested=True) + _attr(CHAIN_POLICY, _u32(POLICIES[body["policy"]]))
            + _attr(CHAIN_TYPE, _str("filter")))


def _rule_msg(table: str, chain: str, exprs: bytes, udata: bytes) -> bytes:
    return (_attr(RULE_TABLE, _str(table)) + _attr(RULE_CHAIN, _str(chain)) + _attr(RULE_EXPRESSIONS, exprs)
            + (_attr(RULE_USERDATA, udata) if udata else b""))


def replace(plan, rebuild: set[str] | None = None) -> tuple[nfnl.Batch, Expected]:
    """The batch that replaces our tables with `plan` (what nftables.replace_batch
    does: add + delete + add in one commit), and what the kernel must hold after it.
    With `rebuild`, the batch that re-creates only those bridge sets (see _rebuild).
    Raises Unencodable before anything is sent."""
    table, objects = plan.table, list(plan.nft)
    exp = Expected(table)
    bridge: list[dict[str, Any]] = []
    direct_elems: dict[str, list[bytes]] = {}
    learned_sets: list[str] = []
    direct: dict[int, tuple[bytes, bytes]] = {}   # object index -> encoded rule
    samples: dict[tuple, int] = {}                # shape -> object index
    learned_rules: list[dict[str, Any]] = []
    try:
        for i, o in enumerate(objects):
            kind, body = _body(o)
            fam = body.get("family")
            if fam not in FAMILIES or kind not in ("table", "set", "map", "chain", "rule") or (fam == "netdev" and kind in ("set", "map")):
                raise Unencodable(f"{kind} of family {fam}")
            if fam == "bridge" and kind != "rule":
                bridge.append(o)
            if kind in ("set", "map"):
                spec = _spec(body)
                try:
                    if spec is None:
                        raise Unencodable(f"datatype of {body['name']}")
                    if rebuild is not None and body["name"] not in rebuild:
                        direct_elems[body["name"]] = []  # not sent: no need to encode them
                    else:
                        direct_elems[body["name"]] = nfnl.element_payloads(spec, body.get("elem", []))
                except Unencodable:
                    learned_sets.append(body["name"])  # e.g. a single-field interval set
            elif kind == "rule":
                try:
                    exprs, udata, shape = direct_rule(body)
                    direct[i] = (exprs, udata)
                    samples.setdefault(shape, i)
                except Unencodable:
                    if fam == "netdev":  # its chain's device is not in the child's namespace
                        raise
                    learned_rules.append(o)
    finally:
        nfnl._FIELDS.clear()  # a few MB at 1,000 guests, of no use once the elements are encoded
    sample_objs = [objects[i] for i in samples.values()]
    skeleton = _skeleton(table, bridge, set(direct_elems), learned_rules, sample_objs)
    key = hashlib.sha256(json.dumps(skeleton, sort_keys=True).encode()).hexdigest()
    learned = _LEARNED.get(key)
    if learned is None:
        learned = learn(table, skeleton, learned_sets, [FAMILIES[_body(x)[1]["family"]] for x in sample_objs])
        _LEARNED.clear()
        _LEARNED[key] = learned
    for i, got in zip(samples.values(), learned.samples):
        if direct[i] != got:
            raise Unencodable(f"this libnftables encodes a rule like {json.dumps(_body(objects[i])[1])[:200]} "
                              "otherwise than nfnl_table.py")

    if rebuild is not None:
        return _rebuild(table, objects, rebuild, direct, direct_elems, learned)
    batch = nfnl.Batch(ack_last=True)
    tname = _attr(TABLE_NAME, _str(table))
    for family in FAMILIES.values():
        batch.add(NFT_MSG_NEWTABLE, NLM_F_CREATE, family, tname)
        batch.add(NFT_MSG_DELTABLE, 0, family, tname)
    tables, sets_msgs, chain_msgs, elem_msgs, rule_msgs = [], [], [], [], []
    learned_iter = {k: iter(rs) for k, rs in learned.rules.items()}
    for i, o in enumerate(objects):
        kind, body = _body(o)
        fam = FAMILIES[body["family"]]
        if kind == "table":
            exp.families.add(fam)
            tables.append(fam)
        elif kind in ("set", "map"):
            name = body["name"]
            attrs = learned.sets.get(name)
            if attrs is None:
                raise Unencodable(f"{kind} {name}: not in the learned skeleton")
            exp.sets[name] = attrs
            # the kernel requires a set id, which names the set within its batch
            sets_msgs.append(_attr(SET_TABLE, _str(table)) + _attr(SET_NAME, _str(name))
                             + b"".join(_attr(t, attrs[t]) for t in SET_RESENT if t in attrs)
                             + _attr(SET_ID, _u32(len(sets_msgs) + 1)))
            payloads = direct_elems[name] if name in direct_elems else learned.elements.get(name, [])
            exp.elements[name] = Counter(payloads)
            exp.element_size[name] = _one_size(exp.elements[name])
            elem_msgs.append((name, payloads))
        elif kind == "chain":
            chain_msgs.append((fam, _chain_msg(table, body)))
            exp.chains[fam, body["name"]] = _planned_view(body)
        else:
            chain = body["chain"]
            if i in direct:
                exprs, udata = direct[i]
            else:
                try:
                    exprs, udata = next(learned_iter[fam, chain])
                except (KeyError, StopIteration) as exc:
                    raise Unencodable(f"rule in {chain}: not in the learned skeleton") from exc
            exp.rules.setdefault((fam, chain), []).append((exprs, udata))
            rule_msgs.append((fam, _rule_msg(table, chain, exprs, udata)))
    if any(next(it, None) is not None for it in learned_iter.values()):
        raise Unencodable("the learned skeleton holds rules the plan does not")
    # tables, sets, chains, then elements (a verdict names a chain that must exist), then rules
    for fam in tables:
        batch.add(NFT_MSG_NEWTABLE, NLM_F_CREATE, fam, tname)
    for p in sets_msgs:
        batch.add(NFT_MSG_NEWSET, NLM_F_CREATE, NFPROTO_BRIDGE, p)
    for fam, p in chain_msgs:
        batch.add(NFT_MSG_NEWCHAIN, NLM_F_CREATE, fam, p)
    for name, payloads in elem_msgs:  # joined here, each message copied into the batch and dropped
        for j in range(0, len(payloads), nfnl._PER_MSG):
            batch.add(NFT_MSG_NEWSETELEM, NLM_F_CREATE, NFPROTO_BRIDGE,
                      nfnl._elements_payload(table, name, b"".join(payloads[j:j + nfnl._PER_MSG])))
    for fam, p in rule_msgs:
        batch.add(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, fam, p)
    return batch, exp


def _set_refs(node: Any, out: set[str]) -> set[str]:
    """The names of the sets and maps an expression looks up ("@name")."""
    if isinstance(node, str):
        if node.startswith("@"):
            out.add(node[1:])
    elif isinstance(node, dict):
        for v in node.values():
            _set_refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _set_refs(v, out)
    return out


def rebuilt_chains(objects: list[dict[str, Any]], names: set[str]) -> list[str]:
    """The bridge chains a rebuild of the sets `names` flushes and refills: those with
    a rule that looks one of them up."""
    return sorted({body["chain"] for kind, body in map(_body, objects)
                   if kind == "rule" and body["family"] == "bridge" and _set_refs(body["expr"], set()) & names})


def _rebuild(table: str, objects: list[dict[str, Any]], names: set[str], direct: dict[int, tuple[bytes, bytes]],
             direct_elems: dict[str, list[bytes]], learned: "Learned") -> tuple[nfnl.Batch, Expected]:
    """One commit that deletes the bridge sets `names` and creates them again with the
    plan's elements. A set in use cannot be deleted, so every bridge chain with a rule
    that looks one of them up is flushed first and gets the plan's rules back, in
    order. Why: deleting elements of an interval (pipapo) set costs the 6.18 kernel
    time that grows with the set, per element (650 deletes among 9,000: 0.40 s), and a
    whole replace rewrites everything (0.85 s beside 899 running taps); a set built
    afresh costs only its adds (the same 8,350 elements: 0.13 s)."""
    bridge_sets = {_body(o)[1]["name"] for o in objects
                   if _body(o)[0] in ("set", "map") and _body(o)[1].get("family") == "bridge"}
    if not names or not names <= bridge_sets:
        raise Unencodable(f"rebuild of sets the plan does not hold: {sorted(names - bridge_sets)}")
    exp = Expected(table, partial=True)
    chains = rebuilt_chains(objects, names)
    batch = nfnl.Batch(ack_last=True)
    for chain in chains:  # no handle: every rule of the chain
        batch.add(NFT_MSG_DELRULE, 0, NFPROTO_BRIDGE, _attr(RULE_TABLE, _str(table)) + _attr(RULE_CHAIN, _str(chain)))
    for name in sorted(names):
        batch.add(NFT_MSG_DELSET, 0, NFPROTO_BRIDGE, _attr(SET_TABLE, _str(table)) + _attr(SET_NAME, _str(name)))
    learned_iter = {k: iter(rs) for k, rs in learned.rules.items()}
    rule_msgs: list[bytes] = []
    for i, o in enumerate(objects):
        kind, body = _body(o)
        if kind in ("set", "map") and body["name"] in names:
            name = body["name"]
            attrs = learned.sets.get(name)
            if attrs is None:
                raise Unencodable(f"{kind} {name}: not in the learned skeleton")
            exp.sets[name] = attrs
            batch.add(NFT_MSG_NEWSET, NLM_F_CREATE, NFPROTO_BRIDGE,
                      _attr(SET_TABLE, _str(table)) + _attr(SET_NAME, _str(name))
                      + b"".join(_attr(t, attrs[t]) for t in SET_RESENT if t in attrs) + _attr(SET_ID, _u32(len(exp.sets))))
            payloads = direct_elems[name] if name in direct_elems else learned.elements.get(name, [])
            exp.elements[name] = Counter(payloads)
            exp.element_size[name] = _one_size(payloads)
            for j in range(0, len(payloads), nfnl._PER_MSG):
                batch.add(NFT_MSG_NEWSETELEM, NLM_F_CREATE, NFPROTO_BRIDGE,
                          nfnl._elements_payload(table, name, b"".join(payloads[j:j + nfnl._PER_MSG])))
        elif kind == "rule":
            fam, chain = FAMILIES[body["family"]], body["chain"]
            if i in direct:
                enc = direct[i]
            else:  # every learned rule is taken in order, sent or not
                try:
                    enc = next(learned_iter[fam, chain])
                except (KeyError, StopIteration) as exc:
                    raise Unencodable(f"rule in {chain}: not in the learned skeleton") from exc
            if fam == NFPROTO_BRIDGE and chain in chains:
                exp.rules.setdefault((fam, chain), []).append(enc)
                rule_msgs.append(_rule_msg(table, chain, *enc))
    if any(next(it, None) is not None for it in learned_iter.values()):
        raise Unencodable("the learned skeleton holds rules the plan does not")
    for p in rule_msgs:
        batch.add(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, NFPROTO_BRIDGE, p)
    return batch, exp


def extend_rebuild(batch: nfnl.Batch, exp: Expected, specs: dict[str, nfnl.SetSpec],
                   delete: list[tuple[str, list[Any]]], add: list[tuple[str, list[Any]]]) -> None:
    """A rebuild's batch and Expected (replace(..., rebuild=...)), encoded from an older
    plan, brought up to a newer one whose rebuilt sets differ by these elements: the
    deletes and adds go after the sets are created, in the same commit, and the
    read-back expects the newer plan's elements. How the agent collects leftovers with
    the encoding done in a child while binds go on (Reconciler.begin_collect)."""
    batch.elements(exp.table, specs, [(n, e) for n, e in delete if e], [(n, e) for n, e in add if e])
    for name, elems in delete:
        if elems:
            exp.elements[name] -= Counter(nfnl.element_payloads(specs[name], elems))
    for name, elems in add:
        if elems:
            exp.elements[name] += Counter(nfnl.element_payloads(specs[name], elems))
    nfnl._FIELDS.clear()
    for name, _ in (*delete, *add):
        exp.element_size[name] = _one_size(exp.elements[name])


def _one_size(payloads) -> int | None:
    """The one length of all these elements when it is a multiple of 4 (element_payloads
    then cuts a dump without parsing it), else None."""
    lengths = set(map(len, payloads))
    size = lengths.pop() if len(lengths) == 1 else None
    return size if size and size % 4 == 0 else None


# ---- read-back ---------------------------------------------------------------------------

def _zero_counters(exprs: bytes) -> bytes:
    """An expressions payload with every counter's values at zero (frames move them)."""
    out, off = [], 0
    while off + 4 <= len(exprs):
        alen = struct.unpack_from("=H", exprs, off)[0]
        if alen < 4:
            break
        elem = exprs[off:off + ((alen + 3) & ~3)]
        if (parse_attrs(elem, 4).get(EXPR_NAME) or [b""])[0] == b"counter\0":
            elem = _COUNTER
        out.append(elem)
        off += (alen + 3) & ~3
    return b"".join(out)


def _same_multiset(a: Counter, b: Counter) -> bool:
    return dict.__eq__(a, b)  # Counter's own == walks every key in Python


def _chain_view(payload: bytes) -> tuple:
    """What a chain is, from a NEWCHAIN payload or a dump: name, hook number, priority,
    devices, policy, type (not its handle, use count or flags)."""
    a = parse_attrs(payload, 0)
    hook = parse_attrs(a[CHAIN_HOOK][0]) if CHAIN_HOOK in a else {}
    devs = {p.rstrip(b"\0") for p in hook.get(nfnl_chains.HOOK_DEV, [])}
    for nest in hook.get(nfnl_chains.HOOK_DEVS, []):
        devs |= {p.rstrip(b"\0") for p in parse_attrs(nest).get(1, [])}
    return (a.get(CHAIN_NAME), hook.get(HOOK_NUM), hook.get(HOOK_PRIORITY), sorted(devs), a.get(CHAIN_POLICY), a.get(CHAIN_TYPE))


def _planned_view(body: dict[str, Any]) -> tuple:
    """_chain_view of the chain `body` plans, built from the plan, not parsed back."""
    if "hook" not in body:
        return ([_str(body["name"])], None, None, [], None, None)
    num = 0 if body["family"] == "netdev" else BRIDGE_HOOKS[body["hook"]]
    devs = [body["dev"].encode()] if body["family"] == "netdev" else []
    return ([_str(body["name"])], [_u32(num)], [_u32(body["prio"])], devs, [_u32(POLICIES[body["policy"]])], [_str("filter")])


def problems(sock: nfnl.NfnlSocket, exp: Expected, limit: int = 10) -> list[str] | None:
    """What differs between the kernel's tables and `exp`, from dumps of everything;
    None when the bridge table is absent. A partial `exp` (a rebuild's) is compared
    with the sets and the rules of the chains it names, and nothing else."""
    table = exp.table
    tname = _attr(TABLE_NAME, _str(table))
    out: list[str] = []
    if exp.partial:
        if sock.request(NFT_MSG_GETTABLE, NFPROTO_BRIDGE, tname, "get bridge table") is None:
            return None
        for (fam, chain), want in sorted(exp.rules.items()):
            have = _rules_of(sock, fam, table, chain).get(chain, [])
            if have != want and [(_zero_counters(e), u) for e, u in have] != want:
                out.append(f"bridge chain {chain}: {len(have)} rules held, {len(want)} planned, or a rule differs")
        held_sets = _sets_of(sock, table)
        for name in sorted(exp.sets):
            if held_sets.get(name) != exp.sets[name]:
                out.append(f"set {name}: " + ("missing" if name not in held_sets else "differs"))
            elif not _same_multiset(Counter(element_payloads(sock, table, name, exp.element_size.get(name))), exp.elements[name]):
                out.append(f"set {name}: its elements differ")
        return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])
    for name, fam in FAMILIES.items():
        present = sock.request(NFT_MSG_GETTABLE, fam, tname, f"get {name} table") is not None
        if fam == NFPROTO_BRIDGE and not present:
            return None
        if present != (fam in exp.families):
            out.append(f"{name} table: {'unexpected' if present else 'missing'}")
        if not present:
            continue
        held = {}
        for body in sock.request(NFT_MSG_GETCHAIN, fam, tname, f"dump {name} chains", dump=True) or []:
            # the kernel dumps every table's chains (nf_tables_dump_chains has no filter)
            if parse_attrs(body, 4).get(CHAIN_TABLE) != [_str(table)]:
                continue
            view = _chain_view(body[4:])
            held[view[0][0].rstrip(b"\0").decode()] = view
        want = {c: v for (f, c), v in exp.chains.items() if f == fam}
        for chain in sorted(set(held) | set(want)):
            if held.get(chain) != want.get(chain):
                what = "missing" if chain not in held else "unexpected" if chain not in want else "hook, device, priority, type or policy differs"
                out.append(f"{name} chain {chain}: {what}")
        rules = _rules_of(sock, fam, table)
        want_rules = {c: rs for (f, c), rs in exp.rules.items() if f == fam}
        for chain in sorted(set(rules) | set(want_rules)):
            have, w = rules.get(chain, []), want_rules.get(chain, [])
            if have != w and [(_zero_counters(e), u) for e, u in have] != w:
                out.append(f"{name} chain {chain}: {len(have)} rules held, {len(w)} planned, or a rule differs")
    held_sets = _sets_of(sock, table)
    for name in sorted(set(held_sets) | set(exp.sets)):
        if held_sets.get(name) != exp.sets.get(name):
            out.append(f"set {name}: " + ("missing" if name not in held_sets else "unexpected" if name not in exp.sets else "differs"))
        elif not _same_multiset(Counter(element_payloads(sock, table, name, exp.element_size.get(name))), exp.elements[name]):
            out.append(f"set {name}: its elements differ")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])
