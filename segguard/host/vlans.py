"""Bridge VLAN facts: each port's VLAN table and the bridge's vlan_filtering, as plain
data, and how they are read over netlink (pyroute2, AF_BRIDGE dumps).

A port's table is `PortVlans`; the bridge device itself (its "self" entries, which
decide what the host's own stack sees on the bridge) is listed under the bridge's
name, like `bridge vlan show` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

VLAN_INFO_PVID = 0x2
VLAN_INFO_UNTAGGED = 0x4
VLAN_INFO_RANGE_BEGIN = 0x8
VLAN_INFO_RANGE_END = 0x10
ALL_VLANS = frozenset(range(1, 4095))


def fmt_vids(vids: Iterable[int]) -> str:
    """1,2,3,5,7-4094 -> '1-3,5,7-4094': the compact form people (and facts JSON) read."""
    s = sorted(set(vids))
    out: list[str] = []
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        out.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(out)


def parse_vids(text: str) -> tuple[int, ...]:
    vids: set[int] = set()
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        lo, _, hi = part.partition("-")
        vids.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(vids))


@dataclass(frozen=True)
class PortVlans:
    """One port's VLAN table: every VID it carries, which one untagged frames are
    classified into (PVID), and which leave it untagged."""

    port: str
    vids: tuple[int, ...] = ()
    pvid: int | None = None
    untagged: tuple[int, ...] = ()

    def describe(self) -> str:
        if not self.vids:
            return "none"
        parts = []
        if self.pvid is not None:
            parts.append(f"pvid {self.pvid}")
        untagged = [v for v in self.untagged if v in self.vids]
        if untagged:
            parts.append(f"untagged {fmt_vids(untagged)}")
        tagged = [v for v in self.vids if v not in self.untagged]
        if tagged:
            parts.append(f"tagged {fmt_vids(tagged)}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port, "vids": fmt_vids(self.vids), "pvid": self.pvid, "untagged": fmt_vids(self.untagged)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PortVlans":
        return cls(d["port"], parse_vids(d.get("vids", "")), d.get("pvid"), parse_vids(d.get("untagged", "")))


def port_vlans_from_infos(port: str, infos: Iterable[tuple[int, int]]) -> PortVlans:
    """Fold (flags, vid) entries as netlink reports them (compressed: a range is a
    RANGE_BEGIN entry and a RANGE_END entry carrying the same flags) into a table."""
    vids: set[int] = set()
    untagged: set[int] = set()
    pvid = None
    begin: int | None = None
    for flags, vid in infos:
        if flags & VLAN_INFO_RANGE_BEGIN:
            begin = vid
            continue
        lo = begin if (flags & VLAN_INFO_RANGE_END and begin is not None) else vid
        begin = None
        span = range(lo, vid + 1)
        vids.update(span)
        if flags & VLAN_INFO_UNTAGGED:
            untagged.update(span)
        if flags & VLAN_INFO_PVID:
            pvid = vid
    return PortVlans(port, tuple(sorted(vids)), pvid, tuple(sorted(untagged)))


def bridge_filtering(link: Any) -> bool | None:
    """vlan_filtering of a bridge link message (None: the kernel did not say)."""
    info = link.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    if data is None:
        return None
    value = data.get_attr("IFLA_BR_VLAN_FILTERING")
    return None if value is None else bool(value)
