"""Guest MAC -> tap name from libvirt, when libvirt (and its Python binding) is there."""
from __future__ import annotations

import xml.etree.ElementTree as ET


def ports_from_domain_xml(xml: str) -> list[tuple[str, str]]:
    out = []
    root = ET.fromstring(xml)
    for iface in root.findall("./devices/interface"):
        mac = iface.find("mac")
        target = iface.find("target")
        if mac is not None and target is not None and mac.get("address") and target.get("dev"):
            out.append((mac.get("address").lower(), target.get("dev")))
    return out


def libvirt_ports(uri: str = "qemu:///system") -> tuple[tuple[str, str], ...]:
    try:
        import libvirt  # python3-libvirt; optional
    except ImportError:
        return ()
    # libvirt prints every error to stderr by default; "no daemon here" is not one
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError:
        return ()
    try:
        found: list[tuple[str, str]] = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            found.extend(ports_from_domain_xml(dom.XMLDesc(0)))
        return tuple(sorted(set(found)))
    finally:
        conn.close()
