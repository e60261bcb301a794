"""A busybox initramfs for the test VM, written as a newc cpio by hand (no cpio tool
needed), cached by the hash of everything that goes into it.

Contents: static busybox, our init script, a /dev/console node (without it the
kernel starts init with no stdout, and the serial log stays empty), and the NIC
driver modules of the guest kernel with their dependencies in load order.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import stat
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
BUSYBOX = Path("/bin/busybox")
CACHE = Path(os.environ.get("SEGGUARD_VM_CACHE", "/var/cache/segguard/libvirt-vm"))
# e1000: one module, no dependencies, emulated by every qemu.  The guest kernel is
# Debian's, where every NIC driver is a module.
NIC_MODULES = ("e1000",)


class InitramfsError(RuntimeError):
    pass


def kernel_image(kernel_root: Path) -> tuple[Path, str]:
    """(vmlinuz, version) inside an extracted linux-image package (or / for the host's)."""
    imgs = sorted((kernel_root / "boot").glob("vmlinuz-*"))
    for img in reversed(imgs):
        kver = img.name[len("vmlinuz-"):]
        if (kernel_root / "lib" / "modules" / kver / "modules.dep").exists():
            return img, kver
    raise InitramfsError(f"no boot/vmlinuz-* with matching lib/modules/*/modules.dep under {kernel_root}")


def module_order(moddir: Path, names: tuple[str, ...]) -> list[Path]:
    """Module files for *names* and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        base = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[base] = path
    order: list[str] = []

    def visit(path: str) -> None:
        for d in deps.get(path, []):
            visit(d)
        if path not in order:
            order.append(path)

    for n in names:
        key = n.replace("-", "_")
        if key not in by_name:
            raise InitramfsError(f"module {n} not in {moddir}/modules.dep (built in? then drop it from NIC_MODULES)")
        visit(by_name[key])
    return [moddir / p for p in order]


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard  # type: ignore[import-not-found]  # only for zstd-packed kernels

        return zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
    return data


class _Cpio:
    """newc ("070701") writer: enough for files, directories, symlinks and device nodes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.out += b"070701" + b"".join(b"%08x" % v for v in fields)
        self.out += name.encode() + b"\0"
        self.out += b"\0" * (-len(self.out) % 4)
        self.out += data
        self.out += b"\0" * (-len(self.out) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.out += b"\0" * (-len(self.out) % 512)
        return bytes(self.out)


def build(kernel_root: Path, cache: Path = CACHE) -> Path:
    """Path of the (cached) initramfs for the kernel under *kernel_root*."""
    _img, kver = kernel_image(kernel_root)
    moddir = kernel_root / "lib" / "modules" / kver
    mods = module_order(moddir, NIC_MODULES)
    if not BUSYBOX.exists():
        raise InitramfsError(f"{BUSYBOX} missing: apt-get install busybox-static")
    busybox = BUSYBOX.read_bytes()
    init = INIT_SCRIPT.read_bytes()
    mod_data = [(m.name.split(".ko")[0] + ".ko", _module_bytes(m)) for m in mods]
    h = hashlib.sha256(busybox + init + kver.encode())
    for name, data in mod_data:
        h.update(name.encode() + data)
    out = cache / f"initramfs-{kver}-{h.hexdigest()[:16]}.cpio"
    if out.exists():
        return out

    c = _Cpio()
    for d in ("bin", "dev", "lib", "lib/modules", "proc", "sys", "tmp"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", busybox, 0o755)
    c.file("init", init, 0o755)
    for name, data in mod_data:
        c.file(f"lib/modules/{name}", data)
    c.file("lib/modules/order", ("\n".join(n for n, _ in mod_data) + "\n").encode())
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".initramfs-", dir=cache)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(c.finish())
        os.replace(tmp, out)  # concurrent builders write identical bytes; last rename wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def guest_kernel() -> tuple[Path, Path]:
    """(vmlinuz, kernel_root): the kernel lab's cached Debian 6.1 package when there is
    one (known to boot here), else the host's own kernel when /boot has one with its
    modules, else the kernel lab's package downloaded now."""
    from tests.kernel_lab.runner import DEFAULT_CACHE, fetch_kernel, newest_cached

    cache = Path(os.environ.get("SEGGUARD_KERNEL_CACHE", DEFAULT_CACHE))
    candidates: list[Path | None] = [newest_cached(cache), Path("/")]
    for root in candidates:
        if root is None:
            continue
        try:
            img, _ = kernel_image(root)
            return img, root
        except InitramfsError:
            continue
    root = fetch_kernel(cache)
    img, _ = kernel_image(root)
    return img, root
