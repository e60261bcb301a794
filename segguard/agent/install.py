"""Files segguard installs on a host: the libvirt qemu hook and the agent's systemd unit."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from segguard.errors import SegguardError

HOOK_MARK = "# installed by segguard install-hook"


def hook_text(config: Path | None, python: str | None = None) -> str:
    cfg = f" --config {str(config)!r}" if config else ""
    return (f"#!/bin/sh\n{HOOK_MARK}: libvirt runs this as qemu <domain> <operation> <sub-op> <extra>,\n"
            "# domain XML on stdin; a non-zero exit on prepare/start aborts a legacy guest's start\n"
            "# when segguard cannot confirm its policy is loaded.\n"
            f"exec {python or sys.executable} -m segguard.agent.libvirt_hook{cfg} \"$@\"\n")


def write_hook(path: Path, config: Path | None, force: bool = False) -> Path:
    path = Path(path)
    if path.exists() and HOOK_MARK not in path.read_text(errors="replace") and not force:
        raise SegguardError(f"{path} exists and was not written by segguard; call segguard.agent.libvirt_hook "
                            f"from it, install to {path.parent}/qemu.d/segguard, or pass --force")
    _write(path, hook_text(config), 0o755)
    return path


def unit_text(config: Path | None, metrics: str | None, python: str | None = None) -> str:
    args = (f" --config {config}" if config else "") + (f" --metrics {metrics}" if metrics else "")
    return f"""[Unit]
Description=segguard host agent (legacy guest walls in place before any guest starts)
Documentation=man:segguard(1)
# nftables.service flushes the whole ruleset when it starts: load after it, not before.
After=nftables.service firewalld.service network-pre.target
Wants=network-pre.target
# libvirt's guest autostart comes after READY=1, i.e. after the first apply.
Before=libvirt-guests.service libvirtd.service virtqemud.service
DefaultDependencies=no
After=local-fs.target
Before=shutdown.target
Conflicts=shutdown.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={python or sys.executable} -m segguard.cli agent{args}
ExecReload=/bin/kill -HUP $MAINPID
# Stopping the agent removes no rule; the kernel keeps the table.
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target libvirtd.service virtqemud.service

"""


def write_unit(path: Path, config: Path | None, metrics: str | None) -> Path:
    _write(Path(path), unit_text(config, metrics), 0o644)
    return Path(path)


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".segguard-tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    tmp.replace(path)
