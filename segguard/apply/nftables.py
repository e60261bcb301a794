"""Program our one table through libnftables' JSON API, in one transaction, and read
it back to prove the kernel holds exactly what was planned.

Only the `segguard` table is ever touched: libvirt's, firewalld's and docker's tables
are not listed, flushed or changed, and removing segguard is deleting its table.
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

from segguard.errors import ApplyError, SegguardError
from segguard.gcpause import gc_paused
from segguard.plan import Plan, jsonable

JSON_SCHEMA_VERSION = 1


class Nft:
    """Thin wrapper: one libnftables context, JSON in and out."""

    def __init__(self) -> None:
        try:
            import nftables
        except ImportError as exc:  # pragma: no cover - depends on the host
            raise SegguardError("the nftables Python module is missing: apt-get install python3-nftables "
                                "and use a venv made with --system-site-packages") from exc
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)

    @gc_paused()  # a listing parses into ~10^5 dicts (segguard/gcpause.py)
    def raw(self, batch: dict[str, Any]) -> tuple[int, str, str]:
        # json_cmd's own, but with plan elements written as JSON (plan.jsonable); no
        # copy of the batch needed (a copy of a 1,000-guest table cost a tenth of the apply)
        rc, out, err = self._nft.cmd(json.dumps(batch, default=jsonable))
        return rc, (json.loads(out) if out else out), err

    def run(self, batch: dict[str, Any], what: str) -> dict[str, Any]:
        rc, out, err = self.raw(batch)
        if rc != 0:
            raise ApplyError(f"kernel refused {what}: {err.strip()}", batch=batch, kernel_error=err.strip())
        return out if isinstance(out, dict) else (json.loads(out) if out else {})

    def list_table(self, table: str, family: str = "bridge") -> list[dict[str, Any]] | None:
        """The table's objects as the kernel reports them, or None if it does not exist."""
        rc, out, err = self.raw({"nftables": [{"list": {"table": {"family": family, "name": table}}}]})
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise ApplyError(f"cannot list table {family} {table}: {err.strip()}", kernel_error=err.strip())
        data = out if isinstance(out, dict) else json.loads(out)
        return [o for o in data.get("nftables", []) if "metainfo" not in o]

    def tables(self) -> set[tuple[str, str]]:
        """(family, name) of every table in this namespace, without their content."""
        rc, out, err = self.raw({"nftables": [{"list": {"tables": None}}]})
        if rc != 0:
            raise ApplyError(f"cannot list tables: {err.strip()}", kernel_error=err.strip())
        data = out if isinstance(out, dict) else (json.loads(out) if out else {})
        return {(o["table"]["family"], o["table"]["name"]) for o in data.get("nftables", []) if "table" in o}


def _metainfo() -> dict[str, Any]:
    return {"metainfo": {"json_schema_version": JSON_SCHEMA_VERSION}}


# Our tables: the bridge table holds the policy; the netdev table holds per-port
# ingress chains for frames that never meet a bridge hook. Same name, both ours.
FAMILIES = ("bridge", "netdev")


def replace_batch(plan: Plan) -> dict[str, Any]:
    """add + delete + add of our tables and all their content in ONE transaction: the
    kernel switches from the old policy to the new one atomically, with no moment in
    which a table is empty (never flush-then-add), and a refused batch changes nothing."""
    cmds: list[dict[str, Any]] = [_metainfo()]
    for family in FAMILIES:
        tbl = {"table": {"family": family, "name": plan.table}}
        cmds += [{"add": tbl}, {"delete": copy.deepcopy(tbl)}]
    cmds += [{"add": obj} for obj in plan.nft]
    return {"nftables": cmds}


def rebuild_batch(plan: Plan, sets: set[str]) -> dict[str, Any]:
    """The libnftables JSON of NftablesApplier.rebuild's one transaction: flush the
    chains that look the sets up, delete and re-add the sets with the plan's elements,
    then those chains' rules in plan order. What a refused rebuild attaches, so the
    failure can be replayed with `nft -j -f`."""
    from segguard.apply.nfnl_table import rebuilt_chains

    objects = list(plan.nft)
    chains = rebuilt_chains(objects, sets)
    cmds: list[dict[str, Any]] = [_metainfo()]
    cmds += [{"flush": {"chain": {"family": "bridge", "table": plan.table, "name": c}}} for c in chains]
    rebuilt = [o for o in objects if ("set" in o or "map" in o) and next(iter(o.values()))["name"] in sets]
    cmds += [{"delete": {kind: {"family": "bridge", "table": plan.table, "name": body["name"]}}}
             for kind, body in (next(iter(o.items())) for o in rebuilt)]
    cmds += [{"add": o} for o in rebuilt]
    cmds += [{"add": o} for o in objects if "rule" in o and o["rule"]["family"] == "bridge" and o["rule"]["chain"] in chains]
    return {"nftables": cmds}


def delete_batch(table: str, families: tuple[str, ...] = FAMILIES) -> dict[str, Any]:
    return {"nftables": [_metainfo(), *({"delete": {"table": {"family": f, "name": table}}} for f in families)]}


# ---- read-back ----------------------------------------------------------------------

_VOLATILE = ("handle",)


def _canonical_sets(value: Any) -> Any:
    """Anonymous sets are unordered; the kernel lists their elements by value."""
    if isinstance(value, dict):
        out = {k: _canonical_sets(v) for k, v in value.items()}
        if set(out) == {"set"} and isinstance(out["set"], list):
            out["set"] = sorted(out["set"], key=lambda e: json.dumps(e, sort_keys=True))
        return out
    if isinstance(value, list):
        return [_canonical_sets(v) for v in value]
    return value


def canonical_key(obj: dict[str, Any]) -> str:
    """One object as a canonical string, without what differs between what we send and
    what the kernel lists without being a difference in policy: handles, counter
    values, element order of sets, and (libnftables 1.0.x lists netdev chains without
    their device) the device of a netdev chain, which its name in_<port> carries and
    the probes prove. Builds new containers; never mutates `obj`."""
    kind, body = next(iter(obj.items()))
    body = {k: v for k, v in body.items() if k not in _VOLATILE}
    if kind == "chain" and body.get("family") == "netdev":
        body.pop("dev", None)
    if kind == "rule":
        body["expr"] = [({"counter": None} if "counter" in e else e) for e in body["expr"]]
        key = _dumps({kind: body})
        # only a rule that holds an anonymous set (ours never do; a hand-edited one
        # may) needs the recursive walk that sorts its elements
        if '"set": [' not in key:
            return key
        body["expr"] = [_canonical_sets(e) for e in body["expr"]]
    if kind in ("set", "map") and "elem" in body:
        elems = sorted(map(_dumps, body.pop("elem")))
        if body and min(body) > "elem":
            # byte for byte what the general case gives, each element encoded once
            return f'{{"{kind}": {{"elem": [{", ".join(elems)}], {_dumps(body)[1:]}}}'
        body["elem"] = [json.loads(e) for e in elems]
    return _dumps({kind: body})


_dumps = json.JSONEncoder(sort_keys=True, default=jsonable).encode


def normalize(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects in canonical form, sorted by content (the kernel lists sets, maps,
    then chains with their rules; creation order is not comparable)."""
    return [json.loads(k) for k in sorted(canonical_key(o) for o in objects)]


@dataclass(frozen=True)
class Fingerprint:
    """What makes two rulesets the same policy: the multiset of canonical objects, and
    the order of rules within each chain."""

    objects: Counter
    order: dict[str, list[str]]  # "family chain" -> rule keys in order

    @classmethod
    @gc_paused()
    def of(cls, objects: list[dict[str, Any]]) -> "Fingerprint":
        keys = [canonical_key(o) for o in objects]
        order: dict[str, list[str]] = {}
        for obj, key in zip(objects, keys):
            if "rule" in obj:
                order.setdefault(f'{obj["rule"]["family"]} {obj["rule"]["chain"]}', []).append(key)
        return cls(Counter(keys), order)


@dataclass(frozen=True)
class TableDiff:
    missing: tuple[dict[str, Any], ...]     # planned, not in the kernel
    unexpected: tuple[dict[str, Any], ...]  # in the kernel, not planned

    @property
    def empty(self) -> bool:
        return not self.missing and not self.unexpected

    def describe(self, limit: int = 10) -> list[str]:
        def short(o):
            kind, body = next(iter(o.items()))
            if kind == "rule":
                return f"rule in {body['chain']}: {body.get('comment') or json.dumps(body['expr'])[:160]}"
            return f"{kind} {body.get('name', '')}"
        lines = [f"missing {short(o)}" for o in self.missing[:limit]]
        lines += [f"unexpected {short(o)}" for o in self.unexpected[:limit]]
        return lines


def diff_objects(desired: list[dict[str, Any]], realized: list[dict[str, Any]] | None,
                 want: Fingerprint | None = None) -> TableDiff:
    w = (want or Fingerprint.of(desired)).objects
    h = Fingerprint.of(realized or []).objects
    # multiset difference: a duplicated rule is a difference too
    missing = [json.loads(k) for k in sorted((w - h).elements())]
    unexpected = [json.loads(k) for k in sorted((h - w).elements())]
    return TableDiff(tuple(missing), tuple(unexpected))


def rule_order(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Rule order per chain matters for semantics; compare it separately from content."""
    return Fingerprint.of(objects).order


def uses_conntrack(objects: list[dict[str, Any]]) -> bool:
    """Whether any rule matches on `ct state`: the live table is the stateful kind."""
    def has_ct(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("ct", {}).get("key") == "state" if "ct" in node else any(has_ct(v) for v in node.values())
        return isinstance(node, list) and any(has_ct(v) for v in node)
    return any(has_ct(o["rule"]["expr"]) for o in objects if "rule" in o)


class NftablesApplier:
    def __init__(self, nft: Nft | None = None, nfnetlink: bool = True):
        self.nft = nft or Nft()
        # the full replace goes over nfnetlink (apply/nfnl_table.py) unless told not to
        # or the plan holds what that road does not encode
        self.nfnetlink = nfnetlink
        self._sock = None
        self.road = ""  # how the last apply went: "nfnetlink" | "libnftables" | ""
        self.unencodable = ""  # why the last apply could not take the nfnetlink road
        # around the replace's commit and read-back: sock -> context manager (the
        # agent's NftMonitor.quiet: it stops listening to our own notifications)
        self.quiet: Callable[[Any], ContextManager[Any]] | None = None
        # the agent's choice: the replace and the rebuild are encoded, committed and read
        # back in a forked child. At 1,000 guests the batch and its read-back are ~17 MB
        # of short-lived objects, which in the long-lived agent became its RSS peak (and,
        # fragmented, part of its idle RSS); the child's memory is gone when it exits.
        self.in_child = False
        self.child_failure = ""  # why the last forked commit fell back to this process
        self.commits = 0  # batches the kernel accepted through this applier's socket

    def realized(self, table: str) -> list[dict[str, Any]] | None:
        """Everything of ours in the kernel; None when the policy table is absent."""
        policy = self.nft.list_table(table, "bridge")
        if policy is None:
            return None
        return policy + (self.nft.list_table(table, "netdev") or [])

    def diff(self, plan: Plan) -> TableDiff:
        if self.holds_exactly(plan):
            return TableDiff((), ())
        return diff_objects(list(plan.nft), self.realized(plan.table))

    def holds_exactly(self, plan: Plan) -> bool:
        """Whether the kernel holds `plan` exactly, judged from nfnetlink dumps as the
        replace's read-back judges it (0.4 s at 1,000 guests; libnftables' listing and
        its comparison take ~2 s). False also when that cannot be told that way: the
        caller then lists the table to find out what differs."""
        if not self.nfnetlink:
            return False
        from segguard.apply import nfnl, nfnl_table

        try:
            with gc_paused():
                _batch, expected = nfnl_table.replace(plan)
                return nfnl_table.problems(self._socket(), expected) == []
        except (nfnl.Unencodable, nfnl.NetlinkError):
            return False

    def apply(self, plan: Plan) -> bool:
        """Make the kernel hold `plan`. Returns False if it already did (nothing sent)."""
        self.road, self.unencodable = "", ""
        if self.nfnetlink:
            from segguard.apply.nfnl import Unencodable

            try:
                return self._apply_nfnl(plan)
            except Unencodable as why:
                self.unencodable = str(why)
        return self._apply_libnftables(plan)

    def _apply_nfnl(self, plan: Plan) -> bool:
        """The one-batch replace of apply/nfnl_table.py, read back from the kernel's
        dumps. Raises Unencodable before sending anything it cannot encode."""
        if self.in_child:
            return self._forked(lambda: self._apply_nfnl_here(plan), lambda: replace_batch(plan))
        return self._apply_nfnl_here(plan)

    def _apply_nfnl_here(self, plan: Plan) -> bool:
        from segguard.apply import nfnl, nfnl_table

        with gc_paused():  # ~10^5 short-lived byte strings and no cycles among them
            batch, expected = nfnl_table.replace(plan)
            sock = self._socket()
            self.road = "nfnetlink"
            try:
                same = nfnl_table.problems(sock, expected) == []
            except nfnl.NetlinkError:
                same = False  # what cannot be read is replaced
            if same:
                return False
            after = self._commit(sock, batch, expected, "kernel refused the segguard table", lambda: replace_batch(plan))
        if after is None or after:
            raise ApplyError("read-back of table bridge %s differs from the plan" % plan.table,
                             batch=replace_batch(plan), details=after or ["the table is absent after the commit"])
        return True

    def rebuild(self, plan: Plan, sets: set[str]) -> None:
        """Re-create the bridge sets `sets` with the plan's elements in one transaction
        (nfnl_table._rebuild says why and how), then read back what it wrote. The rest
        of the table must already be the plan's: the caller knows it is. Raises
        Unencodable before sending anything, ApplyError when refused or differing."""
        if self.in_child:
            self._forked(lambda: self._rebuild_here(plan, sets), lambda: rebuild_batch(plan, sets))
            return
        self._rebuild_here(plan, sets)

    def _rebuild_here(self, plan: Plan, sets: set[str]) -> None:
        batch, expected = self.encode_rebuild(plan, sets)
        with gc_paused():
            self.commit_rebuild(plan.table, sets, batch, expected, lambda: rebuild_batch(plan, sets))

    @staticmethod
    def encode_rebuild(plan: Plan, sets: set[str]) -> tuple[Any, Any]:
        """The nfnetlink batch and Expected of rebuild(plan, sets), sent by nobody: the
        agent has a child encode them (a third of a second at 1,000 guests) while its
        loop goes on, then commits them with commit_rebuild. Raises Unencodable."""
        from segguard.apply import nfnl_table

        with gc_paused():
            return nfnl_table.replace(plan, rebuild=set(sets))

    def commit_rebuild(self, table: str, sets: set[str], batch: Any, expected: Any,
                       as_json: Callable[[], Any]) -> None:
        """Send an encoded rebuild (encode_rebuild, maybe brought up to date with
        nfnl_table.extend_rebuild) in this process, then read back what it wrote.
        ApplyError when refused (with `as_json()`, the equivalent libnftables JSON) or
        differing."""
        refused = f"kernel refused the rebuild of sets {', '.join(sorted(sets))}"
        after = self._commit(self._socket(), batch, expected, refused, as_json)
        if after is None or after:
            raise ApplyError(f"read-back of the rebuilt sets of table bridge {table} differs from the plan",
                             details=after or ["the table is absent after the commit"])

    def _forked(self, work: Callable[[], Any], as_json: Callable[[], Any]) -> Any:
        """`work` (a commit through nfnetlink and its read-back) run in a forked child,
        its answer or its ApplyError / Unencodable handed back; the JSON an ApplyError
        carries is built here, only when one is raised. The quiet window is this
        process's (its monitor, its socket's generation), around the child's commit. A
        child that died or could not answer leaves the work to this process: a replace
        it committed is then found in place before any send; a rebuild is sent again,
        which writes the same sets the same way."""
        from segguard.apply.nfnl import Unencodable
        from segguard.child import result_of_child

        def child() -> tuple:
            self._sock, self.quiet, self.commits = None, None, 0  # a socket of its own
            try:
                value = work()
            except ApplyError as exc:
                return "apply-error", self.commits, self.road, (str(exc), exc.kernel_error, exc.details)
            except Unencodable as exc:
                return "unencodable", self.commits, self.road, str(exc)
            return "done", self.commits, self.road, value

        sock = self._socket()
        with self.quiet(sock) if self.quiet else contextlib.nullcontext() as window:
            ok, answer = result_of_child(child)
            if ok and window is not None:
                window.commits += answer[1]
        if not ok:
            self.child_failure = str(answer)
            return work()
        self.child_failure = ""
        kind, commits, self.road, value = answer
        self.commits += commits
        if kind == "apply-error":
            message, kernel_error, details = value
            raise ApplyError(message, batch=as_json(), kernel_error=kernel_error, details=details)
        if kind == "unencodable":
            raise Unencodable(value)
        return value

    def _socket(self):
        from segguard.apply import nfnl

        if self._sock is None:
            self._sock = nfnl.NfnlSocket()
        return self._sock

    def _commit(self, sock, batch, expected, refused: str, as_json: Callable[[], Any] | None = None) -> list[str] | None:
        """Send one nfnetlink batch (out of the agent's monitor group, when it set
        `quiet`), then what the read-back of `expected` found different. Raises
        ApplyError, with the equivalent libnftables JSON when `as_json` gives it,
        when the kernel refuses the batch."""
        from segguard.apply import nfnl, nfnl_table

        with self.quiet(sock) if self.quiet else contextlib.nullcontext() as window:
            try:
                sock.send(batch)
            except nfnl.NetlinkError as exc:
                raise ApplyError(f"{refused}: {exc.strerror}", batch=as_json() if as_json else None,
                                 kernel_error=str(exc)) from exc
            self.commits += 1
            if window is not None:
                window.commits += 1
            try:
                return nfnl_table.problems(sock, expected)
            except nfnl.NetlinkError as exc:
                return [f"cannot read the table back: {exc.strerror}"]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _apply_libnftables(self, plan: Plan) -> bool:
        self.road = "libnftables"
        want = Fingerprint.of(list(plan.nft))
        current = self.realized(plan.table)
        if current is not None and Fingerprint.of(current) == want:
            return False
        batch = self._element_batch(plan, current) or replace_batch(plan)
        self.nft.run(batch, "the segguard table")
        after = self.realized(plan.table)
        if after is None or Fingerprint.of(after) != want:
            d = diff_objects(list(plan.nft), after, want)
            details = d.describe() if not d.empty else ["same rules, different order within a chain"]
            raise ApplyError("read-back of table bridge %s differs from the plan" % plan.table,
                             batch=batch, details=details)
        return True

    @staticmethod
    def _element_batch(plan: Plan, current: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        """When the live table differs from the plan only in port-keyed elements (a tap,
        a profile's allow rules, a guest's addresses), the transaction that changes just
        those; the rules stay as they are. None: the full replace is needed."""
        from segguard.apply.incremental import delta_batch, element_delta

        delta = element_delta(list(plan.nft), current)
        return delta_batch(plan.table, delta) if delta is not None and not delta.empty else None

    def same(self, plan: Plan, realized: list[dict[str, Any]] | None) -> bool:
        return realized is not None and Fingerprint.of(realized) == Fingerprint.of(list(plan.nft))

    def remove(self, table: str) -> bool:
        # which of our tables exist, from the list of tables alone: listing their
        # content to find out cost seconds with 1,000 guests loaded
        present = tuple(f for f in FAMILIES if (f, table) in self.nft.tables())
        if not present:
            return False
        self.nft.run(delete_batch(table, present), f"deleting segguard's tables {', '.join(present)}")
        return True
