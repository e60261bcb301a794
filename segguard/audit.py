"""`segguard audit vlans`: what each bridge trunks, who uses it, what nothing uses, and
who can reach a management VLAN -- the report a network team asks for. Pure: built
from host facts, the config and the plan's bindings; rendering is the CLI's."""
from __future__ import annotations

from typing import Any

from segguard.config.validate import Config
from segguard.host import HostFacts
from segguard.host.vlans import ALL_VLANS, fmt_vids
from segguard.plan import Plan


def audit_vlans(config: Config, facts: HostFacts, plan: Plan) -> dict[str, Any]:
    mgmt = sorted(set(config.site.management.vlans))
    names = sorted({lp.profile.bridge for lp in config.profiles} | set(config.site.bridges))
    bridges = []
    for name in names:
        bf = facts.bridge(name)
        site_br = config.site.bridges.get(name)
        uplink = site_br.uplink if site_br else None
        entry: dict[str, Any] = {"bridge": name, "present": bf is not None, "uplink": uplink,
                                 "keep_vlans": fmt_vids(site_br.keep_vlans) if site_br else ""}
        bridges.append(entry)
        if bf is None:
            entry["notes"] = [f"bridge {name} does not exist on this host"]
            continue
        legacy = {b.port: b for b in plan.bindings if b.bridge == name and b.port}
        filtering = bool(facts.vlan_filtering and bf.vlan_filtering)
        entry["vlan_filtering"] = filtering
        notes: list[str] = []
        if not facts.vlan_filtering:
            notes.append("this kernel has no bridge VLAN filtering: every port reaches every VLAN the uplink carries "
                         "(tagged frames pass as they are); only the nftables layer stops legacy guests' tags")
        elif not bf.vlan_filtering:
            notes.append(f"vlan_filtering is off on {name}: every port reaches every VLAN")
        ports = [p.name for p in bf.ports] + [name]

        def vids(port: str) -> frozenset[int]:
            if not filtering:
                return ALL_VLANS
            pv = bf.port_vlans(port)
            return frozenset(pv.vids) if pv else frozenset()

        def who(port: str) -> dict[str, Any]:
            if port == name:
                return {"port": port, "kind": "bridge (the host itself)"}
            if port == uplink:
                return {"port": port, "kind": "uplink"}
            b = legacy.get(port)
            return {"port": port, "kind": "legacy guest" if b else "other", **({"guest": b.guest, "profile": b.profile} if b else {})}

        if uplink and uplink not in ports:
            notes.append(f"uplink {uplink} is not a port of {name}")
        trunked = vids(uplink) if uplink in ports else frozenset()
        users: dict[int, list[str]] = {}
        if filtering:
            for port in ports:
                if port != uplink:
                    for v in vids(port):
                        users.setdefault(v, []).append(port)
        entry["uplink_vlans"] = fmt_vids(trunked) if filtering else ("all (unfiltered)" if uplink in ports else "")
        entry["vlans"] = [{"vlan": v, "ports": sorted(users[v]), "on_uplink": v in trunked, "management": v in mgmt}
                          for v in sorted(users)]
        unused = sorted(trunked - set(users) - set(site_br.keep_vlans if site_br else ()))
        entry["unused_on_uplink"] = fmt_vids(unused) if filtering else ("every VLAN but what is bridged (unfiltered)" if uplink in ports else "")
        entry["kept_but_unused"] = fmt_vids(sorted(set(site_br.keep_vlans if site_br else ()) - set(users)))
        reach = []
        for port in ports:
            if port == uplink:
                continue
            hit = sorted(vids(port) & set(mgmt))
            if hit:
                reach.append({**who(port), "management_vlans": fmt_vids(hit),
                              "why": "VLAN table" if filtering else "unfiltered bridge"})
        entry["management_reach"] = reach
        if any(r["kind"] == "legacy guest" for r in reach):
            notes.append("a LEGACY GUEST port can reach a management VLAN: `segguard apply` puts it on its one VLAN")
        entry["notes"] = notes
    return {"management_vlans": fmt_vids(mgmt), "kernel_vlan_filtering": facts.vlan_filtering, "bridges": bridges}


# ---- rendering (text for people; the JSON is the dicts above and the plan's) ----------

def audit_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"management VLANs: {report['management_vlans'] or 'none configured'}"]
    for b in report["bridges"]:
        lines.append(f"bridge {b['bridge']}: " + ("absent" if not b["present"] else
                     f"vlan_filtering {'on' if b.get('vlan_filtering') else 'OFF'}, uplink {b['uplink'] or '(none named in site.yaml)'}"))
        if not b["present"]:
            continue
        if b["uplink"]:
            lines.append(f"  uplink trunks: {b['uplink_vlans'] or 'nothing'}")
            lines.append(f"  trunked but used by nothing on this host: {b['unused_on_uplink'] or 'none'}")
        if b.get("kept_but_unused"):
            lines.append(f"  kept (keep_vlans) though nothing here uses them: {b['kept_but_unused']}")
        for v in b["vlans"]:
            lines.append(f"  VLAN {v['vlan']}{' (MANAGEMENT)' if v['management'] else ''}: {', '.join(v['ports'])}"
                         f"{'' if v['on_uplink'] or not b['uplink'] else '  [not on the uplink]'}")
        for r in b["management_reach"]:
            who = f"{r['port']} ({r['kind']}{', ' + r['guest'] if r.get('guest') else ''})"
            lines.append(f"  reaches management VLAN {r['management_vlans']}: {who} [{r['why']}]")
        lines += [f"  note: {n}" for n in b["notes"]]
    return lines


def vlan_plan_lines(plan: Plan) -> list[str]:
    """Every port's before and after, per bridge, and what apply would refuse."""
    lines: list[str] = []
    if plan.vlan_layer:
        lines.append(f"VLAN layer missing: {plan.vlan_layer}")
    for bv in plan.vlans:
        if not bv.managed:
            lines.append(f"VLAN layer, bridge {bv.bridge}: not applied: {bv.reason}")
            continue
        filt = "on (unchanged)" if bv.filtering_before else "off -> ON"
        lines.append(f"VLAN layer, bridge {bv.bridge}: vlan_filtering {filt}; uplink {bv.uplink or '-'}"
                     + (f"; keep_vlans {fmt_vids(bv.keep_vlans)}" if bv.keep_vlans else ""))
        width = max([len(p.port) for p in bv.ports] + [4])
        for p in bv.ports:
            before = p.before.describe() if bv.filtering_before or p.role == "legacy" else f"unfiltered (table: {p.before.describe()})"
            mark = "CHANGE" if p.changed or (not bv.filtering_before and p.lost) else "same  "
            who = p.role + (f" {','.join(p.guests)}" if p.guests else "")
            lines.append(f"  {mark} {p.port:<{width}} {who:<24} before: {before}")
            if p.changed or (not bv.filtering_before and p.lost):
                lines.append(f"         {'':<{width}} {'':<24} after:  {p.after.describe()}"
                             + (f"  (loses {fmt_vids(p.lost)})" if p.lost else ""))
        for r in bv.refusals:
            allowed = r.overridable and bv.allow_removal
            lines.append(f"  {'allowed' if allowed else 'REFUSED'}: {r.message}")
        lines += [f"  warning: {w}" for w in bv.warnings]
    return lines


def vlan_status(plan: Plan) -> dict[str, Any]:
    """Per port desired vs live (the plan was just compiled from live facts, so each
    row's `before` is what the kernel holds now), plus hardening read back."""
    if plan.vlan_layer:
        return {"layer": "missing: kernel lacks bridge VLAN filtering", "in_sync": not plan.vlan_required, "bridges": []}
    from segguard.apply.bridge import BridgeApplier

    out, in_sync = [], True
    for bv in plan.vlans:
        if not bv.managed:
            out.append({"bridge": bv.bridge, "managed": False, "reason": bv.reason})
            in_sync = in_sync and not plan.vlan_required
            continue
        rows = [{"port": p.port, "role": p.role, "guests": list(p.guests), "desired": p.after.describe(),
                 "live": p.before.describe(), "in_sync": not p.changed} for p in bv.ports]
        hardening = BridgeApplier().hardening(bv)
        synced = not bv.changed
        in_sync = in_sync and synced
        out.append({"bridge": bv.bridge, "managed": True, "vlan_filtering_live": bv.filtering_before,
                    "in_sync": synced, "ports": rows, "hardening": hardening})
    layer = "available" if not out else ("in sync" if in_sync else "DRIFT")
    return {"layer": layer, "in_sync": in_sync, "bridges": out}


def vlan_status_lines(vs: dict[str, Any]) -> list[str]:
    lines = [f"VLAN layer: {vs['layer']}"]
    for b in vs["bridges"]:
        if not b["managed"]:
            lines.append(f"  {b['bridge']}: not applied: {b['reason']}")
            continue
        lines.append(f"  {b['bridge']}: vlan_filtering {'on' if b['vlan_filtering_live'] else 'OFF (desired on)'}")
        width = max([len(r["port"]) for r in b["ports"]] + [4])
        for r in b["ports"]:
            state = "ok   " if r["in_sync"] else "DRIFT"
            lines.append(f"    {state} {r['port']:<{width}} {r['role']:<7} desired: {r['desired']}"
                         + ("" if r["in_sync"] else f"   live: {r['live']}"))
        for k, v in sorted(b["hardening"].items()):
            lines.append(f"    hardening {k}: {v}")
    return lines
