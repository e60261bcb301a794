"""Guest MAC -> tap name from libvirt.

For qemu:///system, libvirtd keeps the live XML of every running domain in a status
file, /run/libvirt/qemu/<domain>.xml (`<domstatus>` around the `<domain>`, rewritten
when a NIC is hot-plugged, removed when the domain stops). Reading those files is what
the agent does: no libvirt.so in its memory (~12 MB of its RSS) and no RPC per domain
per bind (the API needs a dumpxml of every running domain on every call). Each file is
parsed again only when its inode, size or mtime changed. Where that directory does not
exist but a libvirt socket does (another driver layout), the Python binding is used.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

QEMU_STATE_DIR = Path("/run/libvirt/qemu")
SOCKETS = (Path("/run/libvirt/libvirt-sock-ro"), Path("/run/libvirt/libvirt-sock"))


def ports_from_domain_xml(xml: str) -> list[tuple[str, str]]:
    """(MAC, tap) of each interface of a domain XML (or of a libvirt status file)."""
    out = []
    root = ET.fromstring(xml)
    if root.tag == "domstatus":
        root = root.find("domain")
        if root is None:
            return []
    for iface in root.findall("./devices/interface"):
        mac = iface.find("mac")
        target = iface.find("target")
        if mac is not None and target is not None and mac.get("address") and target.get("dev"):
            out.append((mac.get("address").lower(), target.get("dev")))
    return out


class StatusFiles:
    """The running domains' interfaces from libvirt's qemu status files, each file
    parsed once per change."""

    def __init__(self, directory: Path = QEMU_STATE_DIR):
        self.directory = Path(directory)
        self._cache: dict[str, tuple[tuple[int, int, int], list[tuple[str, str]]]] = {}

    def available(self) -> bool:
        return self.directory.is_dir()

    def ports(self) -> tuple[tuple[str, str], ...]:
        found: list[tuple[str, str]] = []
        seen = set()
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return ()
        for e in entries:
            if not e.name.endswith(".xml"):
                continue
            try:
                st = e.stat()
            except OSError:
                continue  # the domain stopped meanwhile
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            seen.add(e.name)
            hit = self._cache.get(e.name)
            if hit is None or hit[0] != key:
                try:
                    ports = ports_from_domain_xml(Path(e.path).read_text())
                except (OSError, ET.ParseError):
                    # being rewritten (libvirt renames a complete file into place):
                    # not cached, read again next time
                    self._cache.pop(e.name, None)
                    continue
                hit = (key, ports)
                self._cache[e.name] = hit
            found.extend(hit[1])
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        return tuple(sorted(set(found)))


_status = StatusFiles()


def libvirt_ports(uri: str = "qemu:///system") -> tuple[tuple[str, str], ...]:
    if uri == "qemu:///system" and _status.available():
        return _status.ports()
    if not any(s.exists() for s in SOCKETS):
        return ()  # no libvirtd here: nothing to ask (and libvirt.so stays out of memory)
    return _api_ports(uri)


def _api_ports(uri: str) -> tuple[tuple[str, str], ...]:
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
