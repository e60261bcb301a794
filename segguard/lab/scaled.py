"""The config for a scaled lab (``topology.plan(prefix, extra_legacy=K)``): the
built-in lab's site and profiles (profiles/lab) plus one profile per extra legacy
guest, each a copy of the xp-line3 profile (same guard rails and allow rules,
default deny) naming that guest's own MAC, port and addresses."""
from __future__ import annotations

from pathlib import Path

import yaml

from segguard.lab.topology import LabTopology, extra_role

LAB_CONFIG = Path(__file__).resolve().parents[2] / "profiles" / "lab"
TEMPLATE = "xp-line3.yaml"


def extra_profile(topo: LabTopology, i: int, template: dict | None = None) -> dict:
    """Extra guest *i*'s profile, derived from profiles/lab's xp-line3."""
    if template is None:
        template = yaml.safe_load((LAB_CONFIG / "profiles" / TEMPLATE).read_text())
    h = topo.host(extra_role(i))
    prof = dict(template)
    prof["name"] = f"lx-line3-{i:03d}"
    prof["description"] = f"scale-test copy {i} of {template['name']} ({'IPv4 + IPv6' if h.ipv6 else 'IPv4 only'})"
    prof["guests"] = [{"name": h.domain, "mac": h.mac, "port": h.port,
                       "ipv4": [h.ip4], "ipv6": [h.ip6] if h.ip6 else []}]
    return prof


def write_config(dest: str | Path, topo: LabTopology) -> Path:
    """site.yaml and profiles/ under *dest*: profiles/lab's own files plus one
    profile per extra legacy guest of *topo*. Returns *dest*."""
    dest = Path(dest)
    (dest / "profiles").mkdir(parents=True, exist_ok=True)
    (dest / "site.yaml").write_text((LAB_CONFIG / "site.yaml").read_text())
    for f in sorted((LAB_CONFIG / "profiles").glob("*.yaml")):
        (dest / "profiles" / f.name).write_text(f.read_text())
    template = yaml.safe_load((LAB_CONFIG / "profiles" / TEMPLATE).read_text())
    for i in range(topo.extra_legacy):
        prof = extra_profile(topo, i, template)
        (dest / "profiles" / f"{prof['name']}.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    return dest
