"""The built-in lab: a KVM hypervisor bridge with legacy guests, servers and a router.

Each host is a namespace ``<prefix><suffix>`` holding one ``eth0`` with a fixed
MAC, wired by veth to a named port on ``br0`` in the hypervisor namespace
(``<prefix>hv``) -- the way libvirt wires ``vnetN`` taps.  The router has its
br0 leg there too and two more legs towards a management host and an
"internet" host (documentation addresses only).

Deliberate deviations from a default Linux bridge, all for deterministic probes:

* lab ports have learning off and a static, sticky FDB entry for their host's
  MAC (libvirt's ``macTableManager='libvirt'`` does the same).  Probes spoof
  source MACs on purpose; with learning on, one spoofed frame would re-point the
  victim's MAC at the attacker's port and corrupt every later probe.
* br_netfilter's ``bridge-nf-call-*`` are off in the hypervisor namespace
  (Debian does not load br_netfilter by default).  With them on, bridged IP
  would also traverse the ip/ip6 hooks and be trimmed/validated there, so the
  lab would no longer test bridge-family rules alone.  ``build(...,
  br_netfilter=True)`` keeps the kernel default for experiments.
* the router and every host hold permanent neighbour entries for each other,
  so routed probes never depend on ARP/ND that a wall under test might block.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType

from segguard.lab import netns as nl

DEFAULT_PREFIX = "sglab-"
BRIDGE = "br0"
HOST_IFACE = "eth0"
# the longest generated interface name is fixed ("vnet9", "mgmt0", "lx149"...), but
# the namespace name is not an interface name; keep prefixes short anyway so they
# read well in `ip netns` and fit worker labels.
MAX_PREFIX_LEN = 12
# Extra legacy guests (``plan(..., extra_legacy=K)``): copies of the xp-line3-hmi kind
# for scale tests.  Guest i is host/role ``lx<iii>`` in namespace ``<prefix>lx<iii>``,
# port ``lx<iii>`` on br0, MAC 52:54:00:aa:01:<i hex>, IPv4 10.30.0.(100+i); one in
# EXTRA_DUAL_STACK_EVERY (i % 4 == 1: lx001, lx005, ...) is dual-stack with
# fd00:30::(100+i) (the lab's convention: the IPv4 host number's digits as the IPv6
# host part).
# 10.30.0.100-249 is free in the lab's /24, hence the cap.
EXTRA_ROLE = "lx"
MAX_EXTRA_LEGACY = 150
EXTRA_DUAL_STACK_EVERY = 4


@dataclass(frozen=True)
class Host:
    """One lab endpoint: where it lives and how to address it at L2/L3."""

    role: str
    ns: str
    iface: str
    mac: str
    ipv4: str | None  # CIDR, e.g. "10.30.0.15/24"
    ipv6: str | None
    port: str | None  # bridge port (hv ns) or router leg (rtr ns) facing this host
    port_mac: str | None = None
    segment: str = "br0"  # "br0", "mgmt" or "inet": which L2 segment eth0 sits on
    domain: str | None = None  # libvirt domain name the host stands for, if any

    @property
    def ip4(self) -> str | None:
        """Bare IPv4 address (no prefix length)."""
        return self.ipv4.split("/")[0] if self.ipv4 else None

    @property
    def ip6(self) -> str | None:
        return self.ipv6.split("/")[0] if self.ipv6 else None

    def ip(self, family: int) -> str | None:
        return self.ip4 if family == 4 else self.ip6


@dataclass(frozen=True)
class RouterLeg:
    """A router interface in the rtr namespace towards an off-bridge host."""

    iface: str
    mac: str
    ipv4: str
    ipv6: str


@dataclass(frozen=True)
class LabTopology:
    """The static plan of the lab for a given prefix (no kernel state)."""

    prefix: str
    hosts: tuple[Host, ...]
    router_legs: tuple[RouterLeg, ...]
    bridge: str = BRIDGE
    extra_legacy: int = 0

    def extra_legacy_hosts(self) -> tuple[Host, ...]:
        """The scale-test copies of the xp kind, in index order (empty by default)."""
        return tuple(h for h in self.hosts if is_extra_role(h.role))

    def host(self, role: str) -> Host:
        """Look a host up by role ("hypervisor", "router", ...) or ns suffix ("hv", "rtr")."""
        for h in self.hosts:
            if h.role == role:
                return h
        for h in self.hosts:
            if h.ns == self.prefix + role:
                return h
        raise KeyError(f"no lab host with role {role!r}; roles: {', '.join(self.roles)}")

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(h.role for h in self.hosts)

    @property
    def hv_ns(self) -> str:
        return self.host("hypervisor").ns

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(h.ns for h in self.hosts)

    def bridged_hosts(self) -> tuple[Host, ...]:
        """Hosts with a port on br0 (everything but hypervisor, mgmt, inet)."""
        return tuple(h for h in self.hosts if h.segment == "br0" and h.role != "hypervisor")

    def sink(self, role: str) -> tuple[str, str]:
        """(ns, iface) where frames *delivered to* this host are observed.

        For the hypervisor that is br0 itself: a frame reaches the host stack
        only after the bridge input hook let it up.
        """
        h = self.host(role)
        return (h.ns, h.iface)


@dataclass
class Lab:
    """A built lab.  Use as a context manager, or call destroy()."""

    topology: LabTopology
    build_seconds: float = 0.0
    _alive: bool = field(default=True, repr=False)

    @property
    def prefix(self) -> str:
        return self.topology.prefix

    @property
    def hosts(self) -> tuple[Host, ...]:
        return self.topology.hosts

    def host(self, role: str) -> Host:
        return self.topology.host(role)

    @property
    def hv_ns(self) -> str:
        return self.topology.hv_ns

    @property
    def bridge(self) -> str:
        return self.topology.bridge

    def sink(self, role: str) -> tuple[str, str]:
        return self.topology.sink(role)

    def destroy(self) -> None:
        if self._alive:
            destroy(self.prefix)
            self._alive = False

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _mac_port(mac: str) -> str:
    """libvirt tap convention: the host-side tap MAC is the guest MAC with 0xfe first."""
    return "fe:" + mac.split(":", 1)[1]


def extra_role(i: int) -> str:
    return f"{EXTRA_ROLE}{i:03d}"


def is_extra_role(role: str) -> bool:
    return len(role) == len(EXTRA_ROLE) + 3 and role.startswith(EXTRA_ROLE) and role[len(EXTRA_ROLE):].isdigit()


def extra_domain(i: int) -> str:
    """The libvirt domain (and config guest) name extra guest *i* stands for."""
    return f"lx-line3-hmi-{i:03d}"


def _extra_host(p: str, i: int) -> Host:
    role = extra_role(i)
    mac = f"52:54:00:aa:01:{i:02x}"
    v6 = f"fd00:30::{100 + i}/64" if i % EXTRA_DUAL_STACK_EVERY == 1 else None
    return Host(role, p + role, HOST_IFACE, mac, f"10.30.0.{100 + i}/24", v6, role, _mac_port(mac),
                domain=extra_domain(i))


def plan(prefix: str = DEFAULT_PREFIX, *, extra_legacy: int = 0) -> LabTopology:
    """The lab topology for *prefix*, without touching the kernel.

    ``extra_legacy=K`` adds K more legacy guests on br0 (see EXTRA_ROLE) to the
    built-in ones, for scale tests; everything else is the same lab."""
    if not prefix or len(prefix) > MAX_PREFIX_LEN or "/" in prefix:
        raise ValueError(f"lab prefix must be 1..{MAX_PREFIX_LEN} chars without '/': {prefix!r}")
    if not 0 <= extra_legacy <= MAX_EXTRA_LEGACY:
        raise ValueError(f"extra_legacy must be 0..{MAX_EXTRA_LEGACY}, not {extra_legacy}")
    p = prefix

    def bridged(role: str, suffix: str, port: str, mac: str, v4: str, v6: str | None,
                domain: str | None = None) -> Host:
        return Host(role, p + suffix, HOST_IFACE, mac, v4, v6, port, _mac_port(mac), domain=domain)

    hosts = (
        Host("hypervisor", p + "hv", BRIDGE, "52:54:00:00:00:01", "10.30.0.1/24", "fd00:30::1/64", None),
        bridged("xp", "xp", "vnet7", "52:54:00:aa:00:01", "10.30.0.15/24", None, "xp-line3-hmi"),
        bridged("scada", "scada", "vnet8", "52:54:00:aa:00:02", "10.30.0.16/24", "fd00:30::16/64",
                "scada-line4"),
        bridged("guest", "guest", "vnet9", "52:54:00:bb:00:01", "10.30.0.50/24", "fd00:30::50/64"),
        bridged("dc", "dc", "dc0", "52:54:00:cc:00:10", "10.30.0.10/24", "fd00:30::10/64"),
        bridged("app", "app", "app0", "52:54:00:cc:00:20", "10.30.0.20/24", "fd00:30::20/64"),
        bridged("jump", "jump", "jump0", "52:54:00:cc:00:30", "10.30.0.30/24", "fd00:30::30/64"),
        bridged("router", "rtr", "rtr0", "52:54:00:cc:00:fe", "10.30.0.254/24", "fd00:30::fe/64"),
        Host("mgmt", p + "mgmt", HOST_IFACE, "52:54:00:dd:00:10", "10.30.250.10/24", "fd00:250::10/64",
             "mgmt0", "52:54:00:dd:00:01", segment="mgmt"),
        Host("inet", p + "inet", HOST_IFACE, "52:54:00:ee:00:10", "203.0.113.10/24", "2001:db8:113::10/64",
             "inet0", "52:54:00:ee:00:01", segment="inet"),
        *(_extra_host(p, i) for i in range(extra_legacy)),
    )
    legs = (
        RouterLeg("mgmt0", "52:54:00:dd:00:01", "10.30.250.1/24", "fd00:250::1/64"),
        RouterLeg("inet0", "52:54:00:ee:00:01", "203.0.113.1/24", "2001:db8:113::1/64"),
    )
    return LabTopology(prefix=p, hosts=hosts, router_legs=legs, extra_legacy=extra_legacy)


def extra_legacy_present(prefix: str) -> int:
    """How many extra legacy guests the lab built under *prefix* has (0 for the
    built-in lab): the count of ``<prefix>lx<iii>`` namespaces, so a verify of a
    running lab binds the same topology it was built with."""
    n = len(prefix)
    return sum(1 for name in nl.list_netns(prefix) if is_extra_role(name[n:]))


# --------------------------------------------------------------------------- build / destroy

_QUIET_DEFAULTS = {
    # Applied to "all"/"default" before any interface exists, so veth ends
    # created in the namespace inherit them; per-interface writes follow anyway.
    "net.ipv6.conf.default.accept_dad": 0,
    "net.ipv6.conf.default.dad_transmits": 0,
    "net.ipv6.conf.default.accept_ra": 0,
    "net.ipv6.conf.default.autoconf": 0,
    "net.ipv6.conf.default.router_solicitations": 0,
    # Unsolicited IGMP/MLD reports repeat ~1 s apart after link-up; squeeze
    # them into the build so they are over before the first probe batch.
    "net.ipv4.conf.default.igmpv2_unsolicited_report_interval": 1,
    "net.ipv4.conf.default.igmpv3_unsolicited_report_interval": 1,
    "net.ipv6.conf.default.mldv1_unsolicited_report_interval": 1,
    "net.ipv6.conf.default.mldv2_unsolicited_report_interval": 1,
    "net.ipv6.conf.all.accept_dad": 0,
    "net.ipv6.conf.all.accept_ra": 0,
    "net.ipv6.conf.all.autoconf": 0,
}


def build(prefix: str = DEFAULT_PREFIX, *, br_netfilter: bool = False, register_cleanup: bool = True,
          extra_legacy: int = 0) -> Lab:
    """Build the lab in fresh namespaces named *prefix*..., removing leftovers first.

    On any failure the partial lab is destroyed before the exception propagates.
    """
    topo = plan(prefix, extra_legacy=extra_legacy)
    started = time.monotonic()
    destroy(prefix)
    if register_cleanup:
        _register(prefix)
    try:
        _build(topo, br_netfilter=br_netfilter)
    except BaseException:
        destroy(prefix)
        raise
    return Lab(topo, build_seconds=time.monotonic() - started)


@contextlib.contextmanager
def lab(prefix: str = DEFAULT_PREFIX, *, br_netfilter: bool = False, extra_legacy: int = 0) -> Iterator[Lab]:
    """``with lab("sgx-") as l: ...`` -- always destroyed on exit."""
    built = build(prefix, br_netfilter=br_netfilter, extra_legacy=extra_legacy)
    try:
        yield built
    finally:
        built.destroy()


def destroy(prefix: str) -> None:
    """Remove every namespace starting with *prefix* (links inside go with them)."""
    if not prefix:
        raise ValueError("refusing to destroy with an empty prefix")
    for name in nl.list_netns(prefix):
        nl.delete_netns(name)
    _unregister(prefix)


def _silence_resets(ns: str) -> None:
    """Lab hosts are sinks, not servers: their kernels must not answer a probe SYN to a
    closed port with a RST, which would tear down the bridge conntrack entry before the
    probe's own reply is sent and make the stateful path look broken."""
    import nftables

    batch = {"nftables": [
        {"add": {"table": {"family": "inet", "name": "sglab_quiet"}}},
        {"add": {"chain": {"family": "inet", "table": "sglab_quiet", "name": "out", "type": "filter",
                           "hook": "output", "prio": 0, "policy": "accept"}}},
        {"add": {"rule": {"family": "inet", "table": "sglab_quiet", "chain": "out", "expr": [
            {"match": {"op": "in", "left": {"payload": {"protocol": "tcp", "field": "flags"}}, "right": "rst"}},
            {"drop": None}]}}},
    ]}
    with nl.enter_netns(ns):
        ctx = nftables.Nftables()
        rc, _, err = ctx.json_cmd(batch)
    if rc != 0:
        raise RuntimeError(f"{ns}: cannot install the lab's RST silencer: {err}")


def _build(topo: LabTopology, *, br_netfilter: bool) -> None:
    hv = topo.host("hypervisor")
    rtr = topo.host("router")
    for h in topo.hosts:
        nl.create_netns(h.ns)
        defaults = dict(_QUIET_DEFAULTS)
        if not h.ipv6:
            # Legacy XP guests: IPv4 only.  Disabling by default means eth0 is
            # born without IPv6, so it never emits a single ND/MLD frame.
            defaults["net.ipv6.conf.default.disable_ipv6"] = 1
        nl.write_sysctls(h.ns, defaults)
        if h.role not in ("hypervisor", "router"):
            _silence_resets(h.ns)

    with nl.ipr(hv.ns) as ip:
        br = nl.create_bridge(ip, BRIDGE, hv.mac)
        # Bridge ports carry no L3 config (like libvirt taps); without IPv6 they
        # do not chatter MLD/ND onto the segment.  br0 already exists, so it
        # keeps IPv6.
        nl.write_sysctls(hv.ns, {"net.ipv6.conf.default.disable_ipv6": 1})
        for h in topo.bridged_hosts():
            assert h.port is not None
            port = nl.create_veth(ip, h.port, h.port_mac, h.iface, h.mac, h.ns)
            nl.enslave(ip, port, br, learning=False)
            nl.add_static_fdb(ip, port, h.mac)
            nl.set_up(ip, port)
        nl.write_sysctls(hv.ns, nl.quiet_ipv6_sysctls(BRIDGE))
        nl.add_address(ip, br, hv.ipv4 or "")
        nl.add_address(ip, br, hv.ipv6 or "")
        nl.set_up(ip, br)
        nl.add_default_route(ip, rtr.ip4 or "")
        nl.add_default_route(ip, rtr.ip6 or "")
        nl.add_permanent_neighbor(ip, br, rtr.ip4 or "", rtr.mac)
        nl.add_permanent_neighbor(ip, br, rtr.ip6 or "", rtr.mac)
    if not br_netfilter:
        # These sysctls exist only once the namespace has a bridge; a kernel
        # without br_netfilter has nothing to switch off.
        nl.write_sysctls(hv.ns, {
            "net.bridge.bridge-nf-call-iptables": 0,
            "net.bridge.bridge-nf-call-ip6tables": 0,
            "net.bridge.bridge-nf-call-arptables": 0,
        }, missing_ok=True)
    nl.disable_tx_checksum_offload(hv.ns, [h.port for h in topo.bridged_hosts() if h.port])

    # Router legs towards mgmt and inet: the host end is created straight in
    # the host namespace, the router end stays in the router namespace.
    off_bridge = {"mgmt": topo.router_legs[0], "inet": topo.router_legs[1]}
    with nl.ipr(rtr.ns) as ip:
        for role, leg in off_bridge.items():
            h = topo.host(role)
            nl.create_veth(ip, leg.iface, leg.mac, h.iface, h.mac, h.ns)
    nl.write_sysctls(rtr.ns, {
        "net.ipv4.ip_forward": 1,
        "net.ipv6.conf.all.forwarding": 1,
        # Probes carry spoofed sources on purpose; the kernel uses max(all, iface).
        "net.ipv4.conf.all.rp_filter": 0,
        "net.ipv4.conf.default.rp_filter": 0,
        **{f"net.ipv4.conf.{i}.rp_filter": 0 for i in (HOST_IFACE, *off_bridge_ifaces(topo))},
        # forwarding=1 ignores RAs anyway; ICMP redirects would be noise on br0
        # (router and targets share the segment when probes are spoofed).
        "net.ipv4.conf.all.send_redirects": 0,
        **{f"net.ipv4.conf.{i}.send_redirects": 0 for i in (HOST_IFACE, *off_bridge_ifaces(topo))},
        **{k: v for i in off_bridge_ifaces(topo) for k, v in nl.quiet_ipv6_sysctls(i).items()},
    })
    with nl.ipr(rtr.ns) as ip:
        for leg in topo.router_legs:
            idx = nl.link_index(ip, leg.iface)
            nl.add_address(ip, idx, leg.ipv4)
            nl.add_address(ip, idx, leg.ipv6)
            nl.set_up(ip, idx)
        # Permanent neighbours for everything the router forwards to.
        br_leg = nl.link_index(ip, HOST_IFACE)
        for h in topo.hosts:
            if h.role == "router":
                continue
            idx = br_leg if h.segment == "br0" else nl.link_index(ip, off_bridge[h.role].iface)
            for addr in (h.ip4, h.ip6):
                if addr:
                    nl.add_permanent_neighbor(ip, idx, addr, h.mac)
    nl.disable_tx_checksum_offload(rtr.ns, [leg.iface for leg in topo.router_legs])

    for h in topo.hosts:
        if h.role == "hypervisor":
            continue
        _configure_host(topo, h)


def off_bridge_ifaces(topo: LabTopology) -> tuple[str, ...]:
    return tuple(leg.iface for leg in topo.router_legs)


def _configure_host(topo: LabTopology, h: Host) -> None:
    rtr = topo.host("router")
    if h.segment == "br0":
        gw4, gw6, gw_mac = rtr.ip4, rtr.ip6, rtr.mac
    else:
        leg = topo.router_legs[0] if h.segment == "mgmt" else topo.router_legs[1]
        gw4, gw6, gw_mac = leg.ipv4.split("/")[0], leg.ipv6.split("/")[0], leg.mac
    sysctls: dict[str, int] = {}
    if h.ipv6:
        sysctls.update(nl.quiet_ipv6_sysctls(h.iface))
    else:
        sysctls[f"net.ipv6.conf.{h.iface}.disable_ipv6"] = 1
    nl.write_sysctls(h.ns, sysctls)
    nl.disable_tx_checksum_offload(h.ns, [h.iface])
    with nl.ipr(h.ns) as ip:
        idx = nl.link_index(ip, h.iface)
        if h.ipv4:
            nl.add_address(ip, idx, h.ipv4)
        if h.ipv6:
            nl.add_address(ip, idx, h.ipv6)
        nl.set_up(ip, idx)
        if h.role == "router":
            return  # the router's own default routes would point at itself
        if gw4:
            nl.add_default_route(ip, gw4)
            nl.add_permanent_neighbor(ip, idx, gw4, gw_mac)
        if h.ipv6 and gw6:
            nl.add_default_route(ip, gw6)
            nl.add_permanent_neighbor(ip, idx, gw6, gw_mac)


# --------------------------------------------------------------------------- crash cleanup

_registered: set[str] = set()
_reg_lock = threading.Lock()
_handlers_installed = False
# Forked children (pyroute2 forks helpers to open sockets in a namespace and
# SIGTERMs them when done) inherit these handlers; without the pid check such a
# child would tear down the lab its parent is still building.
_owner_pid = 0


def _register(prefix: str) -> None:
    """Remember *prefix* so atexit / SIGTERM / SIGINT remove its namespaces."""
    global _handlers_installed, _owner_pid
    with _reg_lock:
        _registered.add(prefix)
        if _handlers_installed:
            return
        _handlers_installed = True
        _owner_pid = os.getpid()
    atexit.register(_cleanup_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            prev = signal.getsignal(sig)
            if prev == signal.SIG_IGN:
                continue  # whoever ignores the signal expects to keep running, lab included
            signal.signal(sig, _make_handler(sig, prev))


def _unregister(prefix: str) -> None:
    with _reg_lock:
        _registered.discard(prefix)


def _cleanup_all() -> None:
    if os.getpid() != _owner_pid:
        return
    with _reg_lock:
        prefixes = sorted(_registered)
    for p in prefixes:
        with contextlib.suppress(Exception):
            destroy(p)


def _make_handler(sig: int, prev: object):  # type: ignore[no-untyped-def]
    def handler(signum: int, frame: FrameType | None) -> None:
        _cleanup_all()
        if callable(prev):
            prev(signum, frame)  # e.g. Python's default SIGINT -> KeyboardInterrupt
        elif prev == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handler
