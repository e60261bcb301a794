"""The compiled plan: pure data, deterministic, diffable.

`desired` plans come from the compiler; the nftables applier reads the live table back
into the same shape (`realized`) so the two compare with ==.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Iterator

TABLE = "segguard"


class Concat:
    """One element of a concatenation-keyed set, `{"concat": [...]}` in libnftables
    JSON, kept as a tuple of its fields. A plan holds ~50 per guest (compile/policy.py):
    as a dict and a list each cost 272 bytes, as this 112, and it is hashable, so the
    agent's record of what the kernel holds keys them by themselves instead of by a
    JSON string of each (1,000 guests: ~13 MB less). It equals its JSON form (a
    listing's dict), and `jsonable` writes it as one; json.dumps without `jsonable`
    refuses it rather than writing something else."""

    __slots__ = ("parts",)

    def __init__(self, parts: tuple[Any, ...]):
        self.parts = parts

    @classmethod
    def of(cls, value: Any) -> "Concat | None":
        """A listing's `{"concat": [...]}` as a Concat; None for anything else."""
        if type(value) is Concat:
            return value
        if type(value) is dict and len(value) == 1 and type(value.get("concat")) is list:
            return cls(tuple(value["concat"]))
        return None

    def __eq__(self, other: Any) -> bool:
        if type(other) is Concat:
            return self.parts == other.parts
        if type(other) is dict:
            return len(other) == 1 and other.get("concat") == list(self.parts)
        return NotImplemented

    def __getitem__(self, key: str) -> list[Any]:
        """Reads as its JSON form: `e["concat"]` is the list of fields."""
        if key != "concat":
            raise KeyError(key)
        return list(self.parts)

    def __hash__(self) -> int:
        try:
            return hash(self.parts)
        except TypeError:  # a prefix or range field is a dict: hash its JSON
            return hash(json.dumps(self.parts, sort_keys=True))

    def __repr__(self) -> str:
        return f"Concat({self.parts!r})"

    def __reduce__(self):  # pickle and copy: no __dict__ to save
        return Concat, (self.parts,)


def jsonable(value: Any) -> Any:
    """`default` of every json.dumps of plan objects."""
    if type(value) is Concat:
        return {"concat": list(value.parts)}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def concat_fields(value: Any) -> "tuple[Any, ...] | list[Any] | None":
    """The fields of a concatenation element in either form (plan or listing)."""
    if type(value) is Concat:
        return value.parts
    if type(value) is dict and type(value.get("concat")) is list:
        return value["concat"]
    return None


@dataclass(frozen=True)
class Binding:
    """Where one legacy guest is plugged in, and how we know."""

    profile: str
    guest: str
    mac: str
    bridge: str
    port: str | None
    source: str  # profile | libvirt | tap-mac | unbound
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]
    mode: str  # enforce | audit
    # the (from the guest, to the guest) chains its port dispatches to: its kind of
    # profile's chains (compile/nft.py class_chains), known even while it is unbound
    chains: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    table: str
    stateful: bool                 # ct state (nf_conntrack_bridge) vs stateless reply rules
    bindings: tuple[Binding, ...]
    nft: tuple[dict[str, Any], ...]  # the objects of our one table, in creation order
    warnings: tuple[str, ...] = ()
    # the VLAN layer: one compile.vlan.BridgeVlanPlan per bridge a profile names; empty
    # where the kernel has no bridge VLAN filtering (and then absent from the JSON)
    vlans: tuple[Any, ...] = ()
    # "" or why this host has no VLAN layer (a kernel without bridge VLAN filtering),
    # and site.yaml vlan_layer_required; derived from facts and site, so not in the JSON
    vlan_layer: str = ""
    vlan_required: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = {
            "table": self.table,
            "stateful": self.stateful,
            "bindings": [asdict(b) for b in self.bindings],
            "warnings": list(self.warnings),
            "nft": list(self.nft),
        }
        if self.vlans:
            d["vlans"] = [v.to_dict() for v in self.vlans]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, default=jsonable) + "\n"

    def binding(self, guest: str) -> Binding | None:
        return next((b for b in self.bindings if b.guest == guest), None)


# objects of the plan's nft list encoded per piece of the file
_CHUNK = 2000


def compact_json(plan: "Plan") -> Iterator[str]:
    """json.dumps(plan.to_dict(), separators=(",", ":")) + newline, in pieces, for the
    applied-plan file: the whole text of a 1,000-guest plan (1.3-4.5 MB, twice that
    while the encoder grows it) had been the agent's memory peak at its start, and the
    indented form (Plan.to_json) goes through json's pure-Python encoder (0.6 s)."""
    sep = (",", ":")
    yield "{"
    for n, (key, value) in enumerate(plan.to_dict().items()):
        yield ("," if n else "") + json.dumps(key) + ":"
        if key != "nft":
            yield json.dumps(value, separators=sep, default=jsonable)
            continue
        yield "["
        for i in range(0, len(value), _CHUNK):
            yield ("," if i else "") + json.dumps(value[i:i + _CHUNK], separators=sep, default=jsonable)[1:-1]
        yield "]"
    yield "}\n"
