"""Guest MAC -> tap from libvirt's qemu status files (segguard/host/libvirt.py): the
live `<domstatus>` XML of each running domain, parsed once per change of the file."""
from __future__ import annotations

import os

from segguard.host import libvirt as lv

STATUS = """<domstatus state='running' reason='booted' pid='4242'>
  <taint flag='high-privileges'/>
  <monitor path='/var/lib/libvirt/qemu/domain-1-{name}/monitor.sock' type='unix'/>
  <domain type='qemu' id='1'>
    <name>{name}</name>
    <devices>
{ifaces}
    </devices>
  </domain>
</domstatus>
"""
IFACE = """      <interface type='bridge'>
        <mac address='{mac}'/>
        <source bridge='br0'/>
        <target dev='{dev}'/>
        <model type='e1000'/>
      </interface>"""


def write(d, name, *pairs):
    tmp = d / f".{name}.new"
    tmp.write_text(STATUS.format(name=name, ifaces="\n".join(IFACE.format(mac=m, dev=t) for m, t in pairs)))
    os.replace(tmp, d / f"{name}.xml")  # as libvirt rewrites it


def test_running_domains_interfaces_follow_their_status_files(tmp_path, monkeypatch):
    parsed = []
    real = lv.ports_from_domain_xml
    monkeypatch.setattr(lv, "ports_from_domain_xml", lambda x: parsed.append(1) or real(x))
    sf = lv.StatusFiles(tmp_path)
    write(tmp_path, "xp", ("52:54:00:AA:00:01", "vnet0"))
    write(tmp_path, "scada", ("52:54:00:aa:00:02", "vnet1"))
    (tmp_path / "xp.monitor").write_text("not xml")  # other files of the directory
    assert sf.ports() == (("52:54:00:aa:00:01", "vnet0"), ("52:54:00:aa:00:02", "vnet1"))
    assert len(parsed) == 2
    assert sf.ports() == (("52:54:00:aa:00:01", "vnet0"), ("52:54:00:aa:00:02", "vnet1"))
    assert len(parsed) == 2  # unchanged files are not parsed again
    # a NIC hot-plugged into scada, xp stopped
    write(tmp_path, "scada", ("52:54:00:aa:00:02", "vnet1"), ("52:54:00:aa:00:03", "vnet5"))
    (tmp_path / "xp.xml").unlink()
    assert sf.ports() == (("52:54:00:aa:00:02", "vnet1"), ("52:54:00:aa:00:03", "vnet5"))
    assert len(parsed) == 3


def test_a_file_caught_mid_write_is_skipped_and_read_next_time(tmp_path):
    sf = lv.StatusFiles(tmp_path)
    (tmp_path / "xp.xml").write_text("<domstatus><domain><devices><interface")
    assert sf.ports() == ()
    write(tmp_path, "xp", ("52:54:00:aa:00:01", "vnet0"))
    assert sf.ports() == (("52:54:00:aa:00:01", "vnet0"),)


def test_plain_domain_xml_still_parses():
    xml = "<domain><devices>" + IFACE.format(mac="52:54:00:AA:00:09", dev="vnet9") + "</devices></domain>"
    assert lv.ports_from_domain_xml(xml) == [("52:54:00:aa:00:09", "vnet9")]


def test_no_libvirtd_means_no_binding_loaded(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(lv, "_status", lv.StatusFiles(tmp_path / "absent"))
    monkeypatch.setattr(lv, "SOCKETS", (tmp_path / "no-sock",))
    monkeypatch.delitem(sys.modules, "libvirt", raising=False)
    assert lv.libvirt_ports() == ()
    assert "libvirt" not in sys.modules
