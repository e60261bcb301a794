"""The real-libvirt test VM: a busybox initramfs (initramfs.py, init.sh), a domain
template (domain.xml) and a private libvirtd in a lab namespace (daemon.py)."""
from __future__ import annotations

import string
from pathlib import Path

DOMAIN_XML = Path(__file__).resolve().parent / "domain.xml"


def render_domain(*, name: str, kernel: Path, initrd: Path, cmdline: str, mac: str, bridge: str,
                  console_log: Path) -> str:
    from xml.sax.saxutils import escape

    values = {"name": name, "kernel": kernel, "initrd": initrd, "cmdline": cmdline, "mac": mac,
              "bridge": bridge, "console_log": console_log}
    return string.Template(DOMAIN_XML.read_text()).substitute({k: escape(str(v)) for k, v in values.items()})
