"""Low-level network-namespace plumbing for the lab and for probe ports.

Everything here talks netlink through pyroute2, except sysctls, which have no
netlink API: for those the *calling thread* briefly joins the target namespace
(``setns`` is per thread, and ``/proc/sys/net`` resolves against the current
thread's namespace), writes the files and returns.  That avoids forking one
``ip netns exec sysctl`` per namespace and keeps a lab build well under a second.

Names passed as ``ns`` are names under /run/netns; ``None`` means the namespace
the calling process is in (the root namespace for the CLI), which is only used
for probe ports on live bridges.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as _pr_netns

NETNS_DIR = Path("/run/netns")
IFNAMSIZ_MAX = 15  # kernel IFNAMSIZ is 16 including the NUL

CLONE_NEWNET = 0x40000000
NUD_NOARP = 0x40  # what `bridge fdb add ... static` / `ip neigh ... noarp` use
NUD_PERMANENT = 0x80
NTF_MASTER = 0x04
NTF_STICKY = 0x40
IFA_F_NODAD = 0x02

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """A namespace or link operation failed in a way the caller should see."""


def check_ifname(name: str) -> str:
    """Reject interface names the kernel would truncate or refuse."""
    if not name or len(name) > IFNAMSIZ_MAX or "/" in name or " " in name:
        raise NetnsError(f"invalid interface name {name!r} (1..{IFNAMSIZ_MAX} chars, no '/' or space)")
    return name


# --------------------------------------------------------------------------- namespaces


def list_netns(prefix: str = "") -> list[str]:
    """Named namespaces whose name starts with *prefix*, sorted."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create_netns(name: str) -> None:
    """Create a named namespace (same mount dance as `ip netns add`) with lo up."""
    if netns_exists(name):
        raise NetnsError(f"netns {name} already exists")
    _pr_netns.create(name)
    with ipr(name) as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def netns_pids(name: str) -> list[int]:
    """PIDs whose network namespace is *name* (workers left behind by a crash)."""
    try:
        target = os.stat(NETNS_DIR / name).st_ino
    except FileNotFoundError:
        return []
    me = os.getpid()
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                pids.append(int(entry))
        except OSError:  # process exited meanwhile, or a kernel thread
            continue
    return pids


def delete_netns(name: str, kill_timeout: float = 1.0) -> None:
    """Remove a namespace, first ending processes still inside it.

    Only namespaces we named are ever passed here, so any process inside one was
    started by us (a probe worker); if it survived, the namespace (and its veth
    ends and bridge) would stay alive anonymously after the name is gone.
    """
    pids = netns_pids(name)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + kill_timeout
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            if pids:
                time.sleep(0.02)
        if not pids:
            break
    try:
        _pr_netns.remove(name)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def enter_netns(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside namespace *name*.

    Only safe for short, synchronous bodies (sysctl writes, ioctls): anything the
    body opens lives in *name* for good, and other threads are unaffected.
    """
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            # If this failed the thread would stay in the lab namespace and
            # later root-namespace work would silently happen in the wrong place.
            _setns(own)
    finally:
        os.close(own)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def ipr(ns: str | None) -> IPRoute:
    """An IPRoute bound to *ns* (pyroute2 forks a helper to open the socket there)."""
    return IPRoute(netns=ns) if ns else IPRoute()


# --------------------------------------------------------------------------- sysctls


def write_sysctls(ns: str | None, values: Mapping[str, str | int], *, missing_ok: bool = False) -> None:
    """Write ``net.*`` sysctls (dotted keys, e.g. ``net.ipv6.conf.eth0.accept_dad``) in *ns*."""
    with enter_netns(ns):
        for key, value in values.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                path.write_text(f"{value}\n")
            except FileNotFoundError:
                if not missing_ok:
                    raise NetnsError(f"sysctl {key} does not exist in netns {ns}") from None


def quiet_ipv6_sysctls(ifname: str) -> dict[str, int]:
    """IPv6 knobs that make addresses usable at once and stop autoconf chatter.

    accept_dad=0: DAD would keep static addresses "tentative" (unusable as a
    source, silently dropped as a destination) for ~1 s after link-up.
    The rest stops RS/RA/SLAAC so sinks see little besides probes.
    """
    return {
        f"net.ipv6.conf.{ifname}.accept_dad": 0,
        f"net.ipv6.conf.{ifname}.dad_transmits": 0,
        f"net.ipv6.conf.{ifname}.accept_ra": 0,
        f"net.ipv6.conf.{ifname}.autoconf": 0,
        f"net.ipv6.conf.{ifname}.router_solicitations": 0,
    }


# --------------------------------------------------------------------------- links


def link_index(ip: IPRoute, ifname: str) -> int:
    found = ip.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(f"no interface {ifname}")
    return int(found[0])


def create_bridge(ip: IPRoute, name: str, mac: str) -> int:
    """A plain (non-VLAN-aware) bridge with STP off, so ports forward at once.

    The MAC is set explicitly: otherwise a Linux bridge takes the lowest port
    MAC and changes it as ports come and go.
    """
    ip.link(
        "add",
        ifname=check_ifname(name),
        kind="bridge",
        address=mac,
        br_stp_state=0,
        br_forward_delay=0,
    )
    return link_index(ip, name)


def create_veth(
    ip: IPRoute,
    name: str,
    mac: str | None,
    peer_name: str,
    peer_mac: str | None,
    peer_ns: str | None,
) -> int:
    """Create veth *name* in ip's namespace with its peer created directly in *peer_ns*.

    Creating the peer inside its namespace (rather than moving it afterwards)
    lets every host's end be called ``eth0`` without name clashes.
    """
    peer: dict[str, object] = {"ifname": check_ifname(peer_name)}
    if peer_mac:
        peer["address"] = peer_mac
    if peer_ns:
        peer["net_ns_fd"] = peer_ns
    spec: dict[str, object] = {"ifname": check_ifname(name), "kind": "veth", "peer": peer}
    if mac:
        spec["address"] = mac
    ip.link("add", **spec)
    return link_index(ip, name)


def enslave(ip: IPRoute, port: int, bridge: int, *, learning: bool = True) -> None:
    ip.link("set", index=port, master=bridge)
    if not learning:
        ip.brport("set", index=port, learning=0)


def add_static_fdb(ip: IPRoute, port: int, mac: str) -> None:
    """Pin *mac* to bridge *port* (static + sticky): spoofed source MACs cannot move it."""
    ip.fdb("add", ifindex=port, lladdr=mac, state=NUD_NOARP, flags=NTF_MASTER | NTF_STICKY)


def set_up(ip: IPRoute, index: int) -> None:
    ip.link("set", index=index, state="up")


def add_address(ip: IPRoute, index: int, cidr: str) -> None:
    addr, plen = cidr.split("/")
    if ":" in addr:
        ip.addr("add", index=index, address=addr, prefixlen=int(plen), flags=IFA_F_NODAD)
    else:
        ip.addr("add", index=index, address=addr, prefixlen=int(plen))


def add_default_route(ip: IPRoute, gateway: str) -> None:
    family = 10 if ":" in gateway else 2
    dst = "::/0" if family == 10 else "0.0.0.0/0"
    ip.route("add", dst=dst, gateway=gateway, family=family)


def add_permanent_neighbor(ip: IPRoute, index: int, address: str, mac: str) -> None:
    family = 10 if ":" in address else 2
    ip.neigh("replace", dst=address, lladdr=mac, ifindex=index, state=NUD_PERMANENT, family=family)


def delete_link(ns: str | None, name: str) -> None:
    """Delete a link if present (deleting one veth end removes the pair)."""
    with ipr(ns) as ip:
        found = ip.link_lookup(ifname=name)
        if found:
            with contextlib.suppress(Exception):
                ip.link("del", index=found[0])


def disable_tx_checksum_offload(ns: str | None, ifnames: list[str]) -> None:
    """Make kernel-generated frames carry real checksums on the wire.

    veth defaults to tx checksum offload, so packets the kernel itself emits
    (echo replies, RSTs, forwarded-and-rewritten packets) cross the pair with
    CHECKSUM_PARTIAL and look corrupt to an AF_PACKET reader such as scapy.
    Probe frames are built in user space with complete checksums either way;
    this only matters for anyone inspecting the lab's own replies.  Best effort:
    a kernel without the ethtool ioctl still gives a usable lab.
    """
    from pyroute2.ethtool import Ethtool  # imported lazily: rarely needed, slowish

    with enter_netns(ns):
        try:
            with Ethtool() as et:
                for name in ifnames:
                    feats = et.get_features(name)
                    changed = False
                    for feat_name in ("tx-checksum-ip-generic", "tx-checksumming"):
                        feat = feats.features.get(feat_name)
                        if feat is not None and feat.enable and feat.available:
                            feat.enable = False
                            changed = True
                    if changed:
                        et.set_features(name, feats)
        except Exception:  # noqa: BLE001 - documented as best effort
            pass
