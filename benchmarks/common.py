"""Shared pieces of the benchmarks: synthetic fleets in the documented config schema,
fake host facts, benchmark namespaces, statistics, tables and JSON results.

Every namespace a benchmark creates is named with the `sgb` prefix and deleted in a
`finally`, so a failed run leaves nothing behind (and never touches the root
namespace's addresses, routes or nftables)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NS_PREFIX = "sgb"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from segguard.host import BridgeFact, HostFacts, PortFact  # noqa: E402

BRIDGE = "br0"
BRIDGE_V4, BRIDGE_V6 = "10.64.0.1", "fd00:64::1"
CLIENT_V4, CLIENT_V6 = "10.66.0.50", "fd00:66::50"  # the forwarding benchmark's sender

SITE_YAML = """\
internal: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fd00::/8]
domain_controllers: [10.65.0.10, fd00:65::10]
management:
  networks: [10.65.250.0/24, fd00:65:250::/64]
  vlans: [250]
hypervisor: [10.65.0.1, fd00:65::1]
groups:
  historian_db: [10.65.0.20, fd00:65::20]
  file_srv: [10.65.0.21, fd00:65::21]
  print_srv: [10.65.0.22, fd00:65::22]
  ntp: [10.65.0.23, fd00:65::23]
  backup: [10.65.0.24/31, fd00:65::24/127]
  jump_hosts: [10.65.0.30, fd00:65::30, {client4}, {client6}]
""".format(client4=CLIENT_V4, client6=CLIENT_V6)

# Ten allow rules, every peer dual-stack: 20 per-family allow rules per guest, the
# "~20 rules, v4 and v6" of issue 5.
RULES_YAML = """\
egress:
  - {to: historian_db, proto: tcp, ports: [1433]}
  - {to: historian_db, proto: udp, ports: [514]}
  - {to: historian_db, proto: icmp}
  - {to: file_srv, proto: tcp, ports: [445]}
  - {to: print_srv, proto: tcp, ports: [9100, "515-516"]}
  - {to: ntp, proto: udp, ports: [123]}
  - {to: backup, proto: tcp, ports: [10000-10010]}
ingress:
  - {from: jump_hosts, proto: tcp, ports: [22, 3389, 5201]}
  - {from: jump_hosts, proto: icmp}
  - {from: backup, proto: tcp, ports: [10080]}
"""


def guest_name(i: int) -> str:
    return f"g{i:05d}"


def guest_mac(i: int) -> str:
    return "52:54:01:%02x:%02x:%02x" % ((i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF)


def tap_mac(i: int) -> str:
    return "fe" + guest_mac(i)[2:]


def guest_port(i: int) -> str:
    return f"vnet{i}"


def guest_v4(i: int) -> str:
    n = i + 10
    return f"10.64.{n >> 8}.{n & 0xFF}"


def guest_v6(i: int) -> str:
    return f"fd00:64::{i + 10:x}"


def profile_yaml(i: int, *, port: bool = True, variant: int = 0, shared_name: str | None = None,
                 guests: list[int] | None = None) -> str:
    """One profile. By default one guest per profile (every legacy VM its own policy,
    the worst case for the table's size); `guests` puts several guests under one
    shared profile (what an nwfilter filter shared by N ports corresponds to)."""
    name = shared_name or guest_name(i)
    members = guests if guests is not None else [i]
    lines = [f"name: {name}", f"bridge: {BRIDGE}", "vlan: 30", "guests:"]
    for g in members:
        lines.append(f"  - name: {guest_name(g)}")
        lines.append(f'    mac: "{guest_mac(g)}"')
        if port:
            lines.append(f"    port: {guest_port(g)}")
        lines.append(f"    ipv4: [{guest_v4(g)}]")
        lines.append(f'    ipv6: ["{guest_v6(g)}"]')
    lines.append("block: {internet: true, domain: true}")
    rules = RULES_YAML
    if variant:
        # the "changed profile": one more egress port, as an admin edit would be
        rules = rules.replace("[1433]", f"[1433, {1500 + variant}]")
    lines.append(rules.rstrip())
    lines.append("default: deny")
    lines.append("mode: enforce")
    return "\n".join(lines) + "\n"


def write_fleet(directory: Path, n: int, *, unbound: set[int] = frozenset(), shared: bool = False) -> Path:
    """site.yaml + N single-guest profiles (or one profile of N guests with `shared`)."""
    (directory / "profiles").mkdir(parents=True, exist_ok=True)
    (directory / "site.yaml").write_text(SITE_YAML)
    if shared:
        (directory / "profiles" / "shared.yaml").write_text(profile_yaml(0, shared_name="shared", guests=list(range(n))))
    else:
        for i in range(n):
            (directory / "profiles" / f"{guest_name(i)}.yaml").write_text(profile_yaml(i, port=i not in unbound))
    return directory


def write_profile(directory: Path, i: int, **kw: Any) -> None:
    (directory / "profiles" / f"{guest_name(i)}.yaml").write_text(profile_yaml(i, **kw))


def facts(n: int, *, absent: set[int] = frozenset()) -> HostFacts:
    """The bridge with its address and the taps of guests 0..n-1 (libvirt's tap MAC
    convention), except those in `absent` (a tap that has not appeared yet)."""
    ports = tuple(PortFact(guest_port(i), tap_mac(i)) for i in range(n) if i not in absent)
    return HostFacts(bridges=(BridgeFact(BRIDGE, (BRIDGE_V4, BRIDGE_V6), ports),))


@contextlib.contextmanager
def tempdir(tag: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"sgb-{tag}-") as d:
        yield Path(d)


# ---- statistics ------------------------------------------------------------------------

def summarize(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    if not s:
        return {"n": 0}
    # nearest-rank p99: with fewer than 100 samples it is the maximum, said as such
    k = max(0, min(len(s) - 1, int(round(0.99 * len(s) + 0.5)) - 1))
    return {"n": len(s), "median": statistics.median(s), "p99": s[k], "min": s[0], "max": s[-1],
            "mean": statistics.fmean(s)}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} us"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def table(title: str, headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [f"\n== {title} ==", line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def stat_row(label: str, st: dict[str, float]) -> list[str]:
    if not st.get("n"):
        return [label, "0", "-", "-", "-"]
    return [label, str(st["n"]), fmt_s(st["median"]), fmt_s(st["p99"]), f"{fmt_s(st['min'])} - {fmt_s(st['max'])}"]


STAT_HEADERS = ["case", "runs", "median", "p99", "min - max"]


def machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"host": platform.node(), "kernel": platform.release(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "loadavg": load,
            "note": "2 cores shared with other engineers' qemu runs: absolute figures are indicative; ratios measured in one run are what count"}


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **data}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    print(f"-> {path.relative_to(ROOT)}", flush=True)
    return path


# ---- namespaces ------------------------------------------------------------------------

@contextlib.contextmanager
def bench_netns(suffix: str) -> Iterator[str]:
    """A fresh named namespace `sgb-<suffix>`, deleted (with anything left inside) on exit."""
    from segguard.lab import netns as nl

    name = f"{NS_PREFIX}-{suffix}"
    if nl.netns_exists(name):
        nl.delete_netns(name)
    nl.create_netns(name)
    try:
        yield name
    finally:
        nl.delete_netns(name)


def apt_install(*packages: str) -> None:
    """The benchmark's own install step (dev.sh does not carry benchmark tools)."""
    import shutil

    missing = [p for p in packages if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p],
                                                       capture_output=True, text=True).stdout != "install ok installed"]
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise SystemExit(f"need {' '.join(missing)} and there is no apt-get here")
    print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("this benchmark needs root (it creates network namespaces)")
