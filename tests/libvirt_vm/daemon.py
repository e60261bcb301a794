"""A private libvirtd + virtlogd for one test, inside one lab network namespace.

systemd is not PID 1 here, so the daemons are started by hand.  They run in the
hypervisor namespace of a lab (its taps land on that namespace's br0, and any
firewall rules libvirt might write stay there) and in a mount namespace of their
own, where /etc/libvirt, /run/libvirt, /var/lib/libvirt and /var/log/libvirt are
bind mounts of a per-test directory.  So nothing they write (sockets, pid files,
domain state, the qemu.conf they read) touches the host's own libvirt, and two
tests never share a socket.  Only the qemu capabilities cache is shared between
runs (CACHE/var-cache-libvirt): probing qemu costs seconds on every cold start.

Clients outside that mount namespace reach the daemon through ``uri``
(``qemu:///system?socket=<dir>/run/libvirt-sock``); a process that must see it as
the plain ``qemu:///system`` (the agent) is started through ``enter_cmd()``.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.libvirt_vm.initramfs import CACHE

PACKAGES = ("libvirt-daemon-system", "libvirt-clients", "python3-libvirt", "qemu-system-x86", "busybox-static")
BINARIES = ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "unshare", "nsenter")
# (bind source under the test dir, mount point)
BINDS = (("etc", "/etc/libvirt"), ("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
         ("log", "/var/log/libvirt"))
CAPS_CACHE = CACHE / "var-cache-libvirt"


class LibvirtError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def ensure_installed() -> None:
    """apt-get install the libvirt stack when a binary is missing (CI hosts start bare)."""
    if not missing_binaries():
        try:
            import libvirt  # noqa: F401
            return
        except ImportError:
            pass
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if res.returncode != 0:
            raise LibvirtError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    if missing_binaries():
        raise LibvirtError(f"still missing after apt-get: {', '.join(missing_binaries())}")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        raise LibvirtError("python3-libvirt is installed but not importable from this interpreter "
                           "(a venv made without --system-site-packages?)") from None


def _private_qemu_conf(text: str) -> str:
    # user/group root: otherwise libvirt re-probes qemu as another user on every
    # start (~50 s here).  No security driver: no AppArmor/SELinux on test hosts,
    # and a label failure would be a libvirt problem, not segguard's.
    keys = ("user", "group", "security_driver", "dynamic_ownership")
    kept = [ln for ln in text.splitlines() if not re.match(rf"\s*({'|'.join(keys)})\s*=", ln)]
    return "\n".join([*kept, 'user = "root"', 'group = "root"', 'security_driver = "none"',
                      "dynamic_ownership = 0", ""])


class PrivateLibvirt:
    def __init__(self, netns: str, workdir: Path) -> None:
        self.netns = netns
        self.dir = workdir
        self.pidfiles = {"virtlogd": workdir / "virtlogd.pid", "libvirtd": workdir / "libvirtd.pid"}
        self.pids: dict[str, int] = {}

    @property
    def socket(self) -> Path:
        return self.dir / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        return self.dir / "log" / "libvirtd.log"

    def _prepare(self) -> None:
        etc = self.dir / "etc"
        shutil.copytree("/etc/libvirt", etc, symlinks=True)
        # No host networks (virbr0 + dnsmasq), no autostarted domains, and no hooks:
        # a segguard hook installed on this host must not judge the test's VM.
        for sub in ("qemu/networks/autostart", "qemu/autostart", "hooks"):
            shutil.rmtree(etc / sub, ignore_errors=True)
        for xml in (etc / "qemu" / "networks").glob("*.xml"):
            xml.unlink()
        conf = etc / "qemu.conf"
        conf.write_text(_private_qemu_conf(conf.read_text() if conf.exists() else ""))
        for name in ("libvirtd.conf", "virtlogd.conf"):
            p = etc / name
            base = p.read_text() if p.exists() else ""
            log = "libvirtd.log" if name == "libvirtd.conf" else "virtlogd.log"
            p.write_text(base + f'\nlog_outputs = "3:file:/var/log/libvirt/{log}"\n')
        for sub, _ in BINDS:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        CAPS_CACHE.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 60.0) -> PrivateLibvirt:
        if missing_binaries():
            raise LibvirtError(f"missing: {', '.join(missing_binaries())} (apt-get install {' '.join(PACKAGES)})")
        self._prepare()
        binds = [(str(self.dir / s), m) for s, m in BINDS] + [(str(CAPS_CACHE), "/var/cache/libvirt")]
        mounts = "; ".join(f"mkdir -p {shlex.quote(m)} && mount --bind {shlex.quote(s)} {shlex.quote(m)}"
                           for s, m in binds)
        daemons = (f"virtlogd -d -p {shlex.quote(str(self.pidfiles['virtlogd']))} && "
                   f"libvirtd -d -p {shlex.quote(str(self.pidfiles['libvirtd']))}")
        script = f"set -e; {mounts}; exec ip netns exec {shlex.quote(self.netns)} /bin/sh -c {shlex.quote(daemons)}"
        # --propagation private: the bind mounts never leak back into the host's tree.
        res = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script],
                             capture_output=True, text=True, timeout=timeout)
        self._read_pids()
        if res.returncode != 0:
            self.stop()
            raise LibvirtError(f"starting libvirtd in {self.netns} failed (rc {res.returncode}):\n"
                               f"{res.stdout}{res.stderr}{self._log_tail()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.virsh("version", check=False).returncode == 0:
                return self
            time.sleep(0.2)
        self.stop()
        raise LibvirtError(f"libvirtd in {self.netns} never answered on {self.socket}{self._log_tail()}")

    def _read_pids(self) -> None:
        for name, pf in self.pidfiles.items():
            with contextlib.suppress(OSError, ValueError):
                self.pids[name] = int(pf.read_text().strip())

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\nlibvirtd.log:\n" + self.log.read_text()[-3000:]
        return ""

    def virsh(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        res = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)}: {res.stderr.strip()}{self._log_tail()}")
        return res

    def enter_cmd(self, cmd: list[str]) -> list[str]:
        """*cmd* as `ip netns exec <ns> cmd` inside the daemons' mount namespace: there
        the private libvirtd is plain qemu:///system.  nsenter and ip both exec, so the
        Popen pid is the command's own."""
        pid = self.pids.get("libvirtd")
        if pid is None:
            raise LibvirtError("libvirtd is not running")
        return ["nsenter", "-t", str(pid), "-m", "--", "ip", "netns", "exec", self.netns, *cmd]

    def qemu_pids(self) -> list[int]:
        pids = []
        for pf in (self.dir / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(pf.read_text().strip()))
        return pids

    def stop(self) -> None:
        """Destroy every domain, then stop the daemons; every process by its own pid."""
        with contextlib.suppress(Exception):
            if self.pids.get("libvirtd"):
                for name in self.virsh("list", "--name", check=False, timeout=20).stdout.split():
                    self.virsh("destroy", name, check=False, timeout=30)
        for pid in self.qemu_pids():
            _kill(pid)
        for name in ("libvirtd", "virtlogd"):
            pid = self.pids.pop(name, None)
            if pid:
                _kill(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _kill(pid: int, grace: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            if _zombie(pid):
                return  # gone; whoever is PID 1 here reaps it (or not) in its own time
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
