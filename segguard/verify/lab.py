"""The lab vantage point: bind expectations to the lab's namespaces and send the probes
from inside the legacy guests' own namespaces, observing at the destinations."""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from segguard.errors import LabError
from segguard.lab import netns as nl
from segguard.lab import topology
from segguard.lab.topology import Host, LabTopology
from segguard.plan import Plan
from segguard.verify.expectations import Intent, expectations_for
from segguard.verify.probes import Probe
from segguard.verify.run import Extra, run_expectations

LAB_CONFIG = Path(__file__).resolve().parents[2] / "profiles" / "lab"


def lab_config_dir(explicit: str | Path | None) -> str:
    return str(explicit) if explicit else str(LAB_CONFIG)


@contextlib.contextmanager
def lab_config(explicit: str | Path | None, topo: LabTopology) -> Iterator[str]:
    """The config a lab is run with: the explicit one, else the built-in lab's, plus
    one profile per extra legacy guest of a scaled lab (segguard/lab/scaled.py: the
    same for the same topology, so `lab up` and a later `verify` agree)."""
    if explicit or not topo.extra_legacy:
        yield lab_config_dir(explicit)
        return
    from segguard.lab import scaled

    with tempfile.TemporaryDirectory(prefix="segguard-lab-") as d:
        yield str(scaled.write_config(d, topo))


def apply_in_lab(topo: LabTopology, config_dir: str | Path | None):
    """Compile against the lab hypervisor's real facts and apply there."""
    from segguard.flow import apply_plan, build_plan

    with lab_config(config_dir, topo) as cfg, nl.enter_netns(topo.hv_ns):
        config, facts, plan = build_plan(cfg)
        result = apply_plan(plan)
    return config, plan, result


def lab_up(prefix: str, config_dir: str | Path | None, extra_legacy: int = 0):
    lab = topology.build(prefix, register_cleanup=False, extra_legacy=extra_legacy)
    try:
        apply_in_lab(lab.topology, config_dir)
    except BaseException:
        lab.destroy()
        raise
    return lab


def lab_run(prefix: str, config_dir: str | Path | None, keep: bool = False, extra_legacy: int = 0) -> list[dict]:
    lab = topology.build(prefix, register_cleanup=not keep, extra_legacy=extra_legacy)
    try:
        apply_in_lab(lab.topology, config_dir)
        return verify_lab(config_dir, prefix, lab_extras=True)
    finally:
        if not keep:
            lab.destroy()


class _Binder:
    """Turns intents into concrete frames, senders and sinks of this lab."""

    def __init__(self, topo: LabTopology, guest_host: Host):
        self.topo = topo
        self.guest = guest_host
        self.by_ip: dict[str, Host] = {}
        for h in topo.hosts:
            for ip in (h.ip4, h.ip6):
                if ip:
                    self.by_ip[ip] = h
        self.router = topo.host("router")

    def host(self, ref: str) -> Host:
        if ref == "guest":
            return self.guest
        if ref == "hypervisor":
            return self.topo.host("hypervisor")
        if ref.startswith("addr:"):
            ip = ref[5:]
            if ip not in self.by_ip:
                raise LabError(f"no lab host has address {ip}")
            return self.by_ip[ip]
        raise LabError(f"unknown probe endpoint {ref!r}")

    def unrestricted_for(self, sink: Host) -> Host:
        """A host no policy restricts, other than the sink itself."""
        for role in ("guest", "app", "jump"):
            h = self.topo.host(role)
            if h.role != sink.role:
                return h
        raise LabError("no unrestricted lab host")

    def bind(self, it: Intent) -> tuple[str, Probe, str]:
        sink = self.host(it.sink)
        sender = self.unrestricted_for(sink) if it.sender == "unrestricted" else self.host(it.sender)
        if sink.segment == "br0":
            dst_mac = sink.mac
        else:  # behind the router
            dst_mac = self.router.mac
        dst_ip = it.dst_ip or sink.ip(it.family)
        src_ip = it.src_ip or sender.ip(it.family) or ("fd00:30::99" if it.family == 6 else "10.30.0.99")
        probe = Probe(
            kind=it.kind, family=it.family, src_mac=it.src_mac or sender.mac, dst_mac=it.dst_mac or dst_mac,
            src_ip=src_ip, dst_ip=dst_ip,
            sport=it.sport, dport=it.dport, flags=it.flags, icmp_type=it.icmp_type, vlan_tags=it.vlan_tags,
            llc_snap=it.llc_snap, ethertype=it.ethertype, ip_proto=it.ip_proto, frag_offset=it.frag_offset, more_fragments=it.more_fragments,
            ipv6_ext=tuple({"routing": "routing", "fragment": "frag"}.get(e, e) for e in it.ipv6_ext),
            arp_psrc=it.arp_psrc, arp_hwsrc=(it.src_mac or sender.mac) if it.kind == "arp" else None,
            arp_pdst=dst_ip if it.kind == "arp" else None,
        )
        return sender.role, probe, sink.role


def _guest_hosts(topo: LabTopology, plan: Plan) -> dict[str, Host]:
    by_mac = {h.mac: h for h in topo.hosts}
    return {b.guest: by_mac[b.mac] for b in plan.bindings if b.mac in by_mac}


def verify_lab(config_dir: str | Path | None, prefix: str, guests: list[str] | None = None,
               lab_extras: bool = False) -> list[dict]:
    from segguard.flow import build_plan

    # A scaled lab (built with extra_legacy=K) is bound as the topology it was built with.
    topo = topology.plan(prefix, extra_legacy=topology.extra_legacy_present(prefix))
    missing = [ns for ns in topo.namespaces if not nl.netns_exists(ns)]
    if missing:
        raise LabError(f"the lab is not up (missing namespaces {', '.join(missing)}): run `segguard lab up --prefix {prefix}`")
    with lab_config(config_dir, topo) as cfg, nl.enter_netns(topo.hv_ns):
        config, facts, plan = build_plan(cfg)
    ordinary, mgmt = topo.host("guest"), topo.host("mgmt")
    exps = expectations_for(config, plan, {4: ordinary.ip4, 6: ordinary.ip6}, guests,
                            management={4: mgmt.ip4, 6: mgmt.ip6})
    hosts = _guest_hosts(topo, plan)
    unknown = sorted({e.guest for e in exps} - set(hosts))
    if unknown:
        raise LabError(f"guests {', '.join(unknown)} have no host in the lab")
    extras = []
    if lab_extras:
        b = _Binder(topo, topo.host("guest"))
        for fam, dst in ((4, topo.host("inet").ip4), (6, topo.host("inet").ip6)):
            extras.append(Extra(f"lab/ordinary-guest-internet/v{fam}",
                                f"the ordinary guest (no profile) still reaches the internet host {dst}",
                                b, Intent("guest", f"addr:{dst}", "tcp", fam, dst, dport=443)))
    binders: dict[str, _Binder] = {}

    def binder_for(g: str) -> _Binder:
        if g not in binders:
            binders[g] = _Binder(topo, hosts[g])
        return binders[g]

    return run_expectations(exps, binder_for, lambda role: topo.sink(role), extras)
