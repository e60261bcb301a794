"""Run the ``kernel_lab`` tests inside a real Debian kernel booted with virtme-ng.

The host kernel lacks bridge VLAN filtering, 8021q and nf_conntrack_bridge, so the
tests marked ``kernel_lab`` run in a guest: Debian's ``linux-image-6.1.0-N-amd64``
(downloaded with ``apt-get download`` and unpacked with ``dpkg -x`` into a cache),
booted by ``vng --run <vmlinuz> --disable-kvm`` (KVM hangs on this kind of machine).
The guest sees the host filesystem read-only; results come back through ``--rwdir``.

Usage (repo root, as root)::

    python -m tests.kernel_lab.runner [pytest args...]

Environment:
    SEGGUARD_KERNEL_PKG          image package to use (default: newest linux-image-6.1.0-N-amd64)
    SEGGUARD_KERNEL_CACHE        cache dir (default /var/cache/segguard/kernel-lab)
    SEGGUARD_KERNEL_LAB_RESULTS  results root (default <repo>/results/kernel-lab); each run
                                 gets a fresh run-* dir in it, `last` links the newest
    SEGGUARD_KERNEL_LAB_TIMEOUT  seconds before the guest is killed (default 1200)
    SEGGUARD_KERNEL_LAB_MEMORY   guest memory (default 1G)
    SEGGUARD_VENV                venv whose python and vng are used (default <repo>/.venv)

Exit code: pytest's exit code from the guest; 1 if the guest did not report or if
pytest collected no test (exit 5: a lab that ran nothing must not pass).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG_RE = re.compile(r"^linux-image-6\.1\.0-(\d+)-amd64$")
APT_PATTERN = r"^linux-image-6\.1\.0-[0-9]+-amd64$"  # POSIX ERE for apt-cache
DEFAULT_CACHE = "/var/cache/segguard/kernel-lab"
MODULES = ("bridge", "8021q", "nf_conntrack_bridge", "br_netfilter")
COMPLETE = ".segguard-complete"


class LabError(Exception):
    pass


def log(msg: str) -> None:
    print(f"kernel-lab: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def venv_dir() -> Path:
    env = os.environ.get("SEGGUARD_VENV")
    if env:
        return Path(env)
    if (REPO / ".venv" / "bin" / "python").exists():
        return REPO / ".venv"
    return Path(sys.prefix)


# ---------------------------------------------------------------- kernel package

def candidate_version(pkg: str) -> str | None:
    res = run(["apt-cache", "policy", pkg])
    m = re.search(r"^\s*Candidate:\s*(\S+)", res.stdout, re.M)
    if not m or m.group(1) == "(none)":
        return None
    return m.group(1)


def resolve_package() -> tuple[str, str] | None:
    """(package, version) to use, or None when apt knows no such package."""
    override = os.environ.get("SEGGUARD_KERNEL_PKG")
    if override:
        ver = candidate_version(override)
        if ver is None:
            raise LabError(f"SEGGUARD_KERNEL_PKG={override}: apt has no candidate "
                           "(run apt-get update?)")
        return override, ver
    res = run(["apt-cache", "search", "--names-only", APT_PATTERN])
    names = []
    for line in res.stdout.splitlines():
        name = line.split(" ", 1)[0]
        m = PKG_RE.match(name)
        if m:
            names.append((int(m.group(1)), name))
    for _, name in sorted(names, reverse=True):
        ver = candidate_version(name)
        if ver:
            return name, ver
    return None


def newest_cached(cache: Path) -> Path | None:
    done = [p for p in cache.glob("linux-image-*") if (p / COMPLETE).exists()]
    if not done:
        return None

    def key(p: Path):
        m = re.match(r"linux-image-6\.1\.0-(\d+)", p.name)
        return (int(m.group(1)) if m else -1, p.name)

    return max(done, key=key)


def fetch_kernel(cache: Path) -> Path:
    """Return the extracted package root (holds boot/ and lib/modules/)."""
    cache.mkdir(parents=True, exist_ok=True)
    resolved = resolve_package()
    if resolved is None and newest_cached(cache) is None:
        log("apt knows no linux-image-6.1.0-N-amd64; running apt-get update")
        run(["apt-get", "update", "-qq"])
        resolved = resolve_package()
    if resolved is None:
        cached = newest_cached(cache)
        if cached is None:
            raise LabError("apt knows no linux-image-6.1.0-N-amd64 package and nothing is "
                           f"cached in {cache} (run apt-get update; needs Debian bookworm "
                           "sources)")
        log(f"apt knows no kernel package; using cached {cached.name}")
        return cached
    pkg, ver = resolved
    root = cache / f"{pkg}_{ver}"
    if (root / COMPLETE).exists():
        return root
    log(f"downloading {pkg} {ver} into {cache}")
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{pkg}-", dir=cache))
    try:
        res = run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                   f"{pkg}={ver}"], cwd=work)
        debs = list(work.glob("*.deb"))
        if res.returncode != 0 or not debs:
            cached = newest_cached(cache)
            if cached is not None:
                log(f"apt-get download failed ({res.stderr.strip()[-300:]}); "
                    f"using cached {cached.name}")
                return cached
            raise LabError(f"apt-get download {pkg}={ver} failed:\n{res.stdout}{res.stderr}")
        tree = work / "root"
        res = run(["dpkg", "-x", str(debs[0]), str(tree)])
        if res.returncode != 0:
            raise LabError(f"dpkg -x {debs[0].name} failed:\n{res.stderr}")
        kver = kernel_version(tree)
        res = run(["depmod", "-a", "-b", str(tree), kver])
        if not (tree / "lib/modules" / kver / "modules.dep").exists():
            raise LabError(f"depmod -b {tree} {kver} made no modules.dep:\n{res.stderr}")
        (tree / COMPLETE).write_text(f"{pkg} {ver}\n")
        if (root / COMPLETE).exists():  # a concurrent run finished first
            return root
        if root.exists():
            shutil.rmtree(root)
        os.rename(tree, root)
        return root
    finally:
        shutil.rmtree(work, ignore_errors=True)


def kernel_version(root: Path) -> str:
    imgs = sorted(glob.glob(str(root / "boot" / "vmlinuz-*")))
    if not imgs:
        raise LabError(f"no boot/vmlinuz-* in {root}")
    return Path(imgs[-1]).name[len("vmlinuz-"):]


def link_modules(root: Path, kver: str) -> None:
    """/lib/modules/<kver> -> the extracted modules (the guest sees the host fs)."""
    target = root / "lib" / "modules" / kver
    link = Path("/lib/modules") / kver
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if os.readlink(link) == str(target):
            return
        link.unlink()
    elif link.exists():
        log(f"{link} is a real directory (installed kernel?); leaving it alone")
        return
    try:
        link.symlink_to(target)
    except FileExistsError:  # a concurrent run
        pass


# ---------------------------------------------------------------- guest script

def user_paths(pytest_args: list[str]) -> list[str]:
    """Positional args naming test paths or node ids (then the user picks the scope)."""
    return [a for a in pytest_args
            if not a.startswith("-") and (REPO / a.split("::", 1)[0]).exists()]


def host_collect(venv: Path, pytest_args: list[str]) -> list[str] | None:
    """Test files holding selected kernel_lab tests, collected on the host.

    Python under TCG is ~100x slower, so the guest is handed only these files.
    [] means nothing selected; None means collection failed (the guest then
    collects tests/ itself, so the errors show up in its report).
    """
    # Let the host write __pycache__ (git-ignored): the guest, which cannot write,
    # then finds the compiled and assertion-rewritten modules instead of redoing them.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    res = run([str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider",
               "--collect-only", "-q", "-m", "kernel_lab",
               *([] if user_paths(pytest_args) else ["tests/"]), *pytest_args],
              cwd=str(REPO), env=env)
    if res.returncode == 5:
        return []
    if res.returncode != 0 or user_paths(pytest_args):
        return None
    files: list[str] = []
    for line in res.stdout.splitlines():
        if "::" in line:
            f = line.split("::", 1)[0]
            if f not in files:
                files.append(f)
    return files or None


def guest_script(rw: Path, venv: Path, pytest_args: list[str],
                 files: list[str] | None = None) -> str:
    q = shlex.quote
    py = venv / "bin" / "python"
    pytest_cmd = shlex.join([str(py), "-m", "pytest", "-p", "no:cacheprovider",
                             "-m", "kernel_lab",
                             *(files or ([] if user_paths(pytest_args) else ["tests/"])),
                             *pytest_args])
    return f"""#!/bin/sh
# Written by tests/kernel_lab/runner.py; runs as root inside the lab guest.
RW={q(str(rw))}
LOG="$RW/lab.log"
up() {{ echo "lab: $1 at uptime $(cut -d' ' -f1 /proc/uptime)s" >>"$LOG"; }}
echo "lab: kernel $(uname -r)" >"$LOG"
up start
for m in {' '.join(MODULES)}; do
    modprobe "$m" >>"$LOG" 2>&1 || echo "lab: modprobe $m failed" >>"$LOG"
done
# / is the host fs, read-only; virtme overlays /etc /usr /var /tmp on a tmpfs.
mkdir -p /run/netns >>"$LOG" 2>&1
if ! ( : >/tmp/.sgk-w ) 2>/dev/null; then
    mount -t tmpfs tmpfs /tmp >>"$LOG" 2>&1
fi
rm -f /tmp/.sgk-w
up "modules loaded"
export SEGGUARD_KERNEL_LAB=1 PYTHONDONTWRITEBYTECODE=1 TMPDIR=/tmp
export PATH={q(str(venv / "bin"))}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if cd {q(str(REPO))}; then
    {pytest_cmd} >"$RW/pytest.log" 2>&1
    echo $? >"$RW/rc.tmp"
    up "pytest done"
else
    echo "lab: cannot cd to the repo" >"$RW/pytest.log"
    echo 1 >"$RW/rc.tmp"
fi
mv "$RW/rc.tmp" "$RW/rc"
"""


def fresh_results_dir(results: Path, keep: int = 5) -> Path:
    """A new run dir under results/ (runs may overlap); older finished runs pruned."""
    results.mkdir(parents=True, exist_ok=True)
    rw = Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=results))
    rw.chmod(0o755)
    runs = sorted((p for p in results.glob("run-*") if p.is_dir() and p != rw),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in runs[keep:]:
        if (old / "rc").exists() or time.time() - old.stat().st_mtime > 7200:
            shutil.rmtree(old, ignore_errors=True)
    last = results / "last"
    try:
        if last.is_symlink():
            last.unlink()
        last.symlink_to(rw.name)
    except OSError:
        pass
    return rw


class Tail(threading.Thread):
    """Copy a growing file to stdout until stopped."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.stop, self.pos = path, threading.Event(), 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.pos += len(data)
            sys.stdout.buffer.write(data)
            sys.stdout.flush()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.pump()
        self.pump()


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        log("run as root (writes the kernel cache and /lib/modules)")
        return 1
    venv = venv_dir()
    vng = venv / "bin" / "vng"
    if not vng.exists():
        found = shutil.which("vng")
        if not found:
            log(f"vng not found in {venv}/bin or PATH (pip install virtme-ng)")
            return 1
        vng = Path(found)
    cache = Path(os.environ.get("SEGGUARD_KERNEL_CACHE", DEFAULT_CACHE))
    results = Path(os.environ.get("SEGGUARD_KERNEL_LAB_RESULTS", REPO / "results" / "kernel-lab"))
    timeout = float(os.environ.get("SEGGUARD_KERNEL_LAB_TIMEOUT", "1200"))
    memory = os.environ.get("SEGGUARD_KERNEL_LAB_MEMORY", "1G")

    t0 = time.monotonic()
    try:
        root = fetch_kernel(cache)
        kver = kernel_version(root)
        link_modules(root, kver)
    except LabError as e:
        log(str(e))
        return 1
    vmlinuz = root / "boot" / f"vmlinuz-{kver}"

    files = host_collect(venv, argv)
    if files == []:
        log("FAILED: no kernel_lab test selected (pytest exit 5 on the host); "
            "a lab that runs nothing must not pass")
        return 1

    rw = fresh_results_dir(results)
    script = rw / "lab.sh"
    script.write_text(guest_script(rw, venv, argv, files))
    script.chmod(0o755)

    # The guest mounts a tmpfs over /var/cache, so hand the kernel tree in explicitly.
    cmd = [str(vng), "--run", str(vmlinuz), "--disable-kvm", "--force-9p", "--memory", memory,
           "--rodir", str(root), "--rwdir", str(rw), "--exec", str(script)]
    env = dict(os.environ)
    env["PATH"] = f"{vng.parent}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    log(f"booting {root.name} ({kver}) under qemu/TCG; results in {rw}")
    t_boot = time.monotonic()
    tail = Tail(rw / "pytest.log")
    tail.start()
    timed_out = False
    with open(rw / "vng.log", "wb") as vlog:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=vlog,
                                stderr=subprocess.STDOUT, env=env, cwd=str(rw),
                                start_new_session=True)
        try:
            vrc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                vrc = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                vrc = proc.wait()
    tail.stop.set()
    tail.join()
    elapsed = time.monotonic() - t_boot

    rc_file = rw / "rc"
    if timed_out:
        log(f"the lab timed out after {timeout:.0f}s and was killed")
    if not rc_file.exists():
        vtext = (rw / "vng.log").read_text(errors="replace").splitlines()
        sys.stderr.write("\n".join(vtext[-40:]) + "\n")
        lab_log = rw / "lab.log"
        if lab_log.exists():
            sys.stderr.write(lab_log.read_text(errors="replace"))
        log(f"FAILED: the lab did not report (no {rc_file}; vng exit {vrc}); "
            f"see {rw}/vng.log")
        return 1
    try:
        rc = int(rc_file.read_text().strip())
    except ValueError:
        log(f"FAILED: unreadable {rc_file}: {rc_file.read_text()!r}")
        return 1
    log(f"guest pytest exit {rc}; boot+tests {elapsed:.1f}s "
        f"(total {time.monotonic() - t0:.1f}s)")
    if rc == 5:
        log("FAILED: pytest collected no kernel_lab test in the lab; a lab that ran "
            "nothing must not pass")
        return 1
    if rc != 0:
        lab_log = rw / "lab.log"
        if lab_log.exists():
            sys.stderr.write(lab_log.read_text(errors="replace"))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
