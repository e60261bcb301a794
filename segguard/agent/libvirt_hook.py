"""`python -m segguard.agent.libvirt_hook [--config DIR] <domain> <operation> <sub-op> <extra>`
with the domain XML on stdin: exactly how libvirt runs /etc/libvirt/hooks/qemu.
Exit 0 lets libvirt go on; non-zero on `prepare begin` / `start begin` aborts the
start, and libvirt shows what we wrote on stderr."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config = None
    if len(args) >= 2 and args[0] == "--config":
        config, args = args[1], args[2:]
    if len(args) < 3:
        sys.stderr.write("usage: libvirt_hook [--config DIR] <domain> <operation> <sub-op> [extra]\n")
        return 0 if len(args) < 2 else 1
    domain, operation, sub_op = args[0], args[1], args[2]
    from segguard.agent.hook import GUARDED_OPS, decide

    if (operation, sub_op) not in GUARDED_OPS:
        return 0  # libvirt still writes the XML; we need not read it
    xml = sys.stdin.read()
    try:
        d = decide(operation, sub_op, xml, config)
    except Exception as exc:  # noqa: BLE001 - whatever broke, a legacy guest must not start unguarded
        sys.stderr.write(f"segguard: hook failed for domain {domain}: {exc!r}; refusing to start it\n")
        return 1
    if not d.allow:
        sys.stderr.write(d.message + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
