#!/usr/bin/env bash
# Vagrant "lab" provisioner, as root inside the Debian 12 VM (or by hand:
# `vagrant ssh -c 'sudo /segguard/vagrant/run-lab.sh'`).
#
# The VM runs its own Debian kernel, which has what this project's CI host lacks
# (bridge vlan_filtering, 8021q, nf_conntrack_bridge).  So here the kernel-lab tests run
# directly, no qemu runner: SEGGUARD_KERNEL_LAB=1 tells tests/conftest.py that this
# kernel must have the features, and a missing one FAILS those tests instead of
# skipping them.
#
#   1. segguard lab run        the namespace lab: build, apply, verify, tear down
#   2. pytest -m "netns or kernel_lab"
#   3. nested real VM on a libvirt tap (vagrant/nested-guest.sh), optional:
#      SEGGUARD_NESTED=auto (default: run if /dev/kvm works, else report "skipped"),
#      on (required: no KVM is a failure), tcg (run without KVM, slow), off.
#
# Exit status: non-zero if any step that ran failed, or if SEGGUARD_NESTED=on and the
# nested check could not run.  Logs: /var/log/segguard-vagrant/<step>.log
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
if [ -z "${SEGGUARD_SRC:-}" ]; then
    # run by hand from the checkout, or uploaded by vagrant to /tmp
    if [ -x "$here/../dev.sh" ]; then SEGGUARD_SRC=$(cd "$here/.." && pwd); else SEGGUARD_SRC=/segguard; fi
fi
SRC=$SEGGUARD_SRC
VENV=${SEGGUARD_VENV:-/opt/segguard-venv}
NESTED=${SEGGUARD_NESTED:-auto}
LOGS=${SEGGUARD_VAGRANT_LOGS:-/var/log/segguard-vagrant}
PY=$VENV/bin/python
SEGGUARD=$VENV/bin/segguard
LAB_PREFIX=sgvag-

die() { echo "run-lab.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
[ -x "$PY" ] && [ -x "$SEGGUARD" ] || die "no segguard in $VENV; run vagrant/provision.sh first"
[ -f "$SRC/pyproject.toml" ] || die "no checkout at $SRC"
case "$NESTED" in auto|on|off|tcg) ;; *) die "SEGGUARD_NESTED must be auto, on, off or tcg (got $NESTED)";; esac
mkdir -p "$LOGS"
cd "$SRC"

declare -a summary=()
rc=0
record() {  # record <step> <status> <detail>
    summary+=("$(printf '%-26s %-8s %s' "$1" "$2" "$3")")
    [ "$2" = FAIL ] && rc=1
    return 0
}
step() {  # step <name> <command...>: run, tee into the step's log, record pass/fail
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$LOGS/$name.log"
    local st=${PIPESTATUS[0]}
    if [ "$st" = 0 ]; then record "$name" PASS "log $LOGS/$name.log"
    else record "$name" FAIL "exit $st, log $LOGS/$name.log"; fi
}

echo "== kernel $(uname -r) on $(. /etc/os-release; echo "$PRETTY_NAME")"
# The same modules the qemu kernel lab loads (tests/kernel_lab/runner.py MODULES).
modules=$("$PY" -c 'from tests.kernel_lab.runner import MODULES; print(" ".join(MODULES))') \
    || die "cannot read the kernel lab's module list from tests/kernel_lab/runner.py"
for m in $modules; do
    modprobe "$m" || echo "run-lab.sh: modprobe $m failed; the kernel_lab tests will say what is missing" >&2
done

# 1. the namespace lab, as `./dev.sh lab` runs it
step lab-run "$SEGGUARD" lab run --prefix "$LAB_PREFIX"

# 2. the test suite of the kernel lab, plus the netns tier, on this real kernel
# SEGGUARD_PYTEST_ARGS is split like a shell command line (quotes allowed, no expansion)
mapfile -t extra < <("$PY" -c 'import os, shlex; [print(a) for a in shlex.split(os.environ.get("SEGGUARD_PYTEST_ARGS", ""))]') \
    || die "SEGGUARD_PYTEST_ARGS does not parse: ${SEGGUARD_PYTEST_ARGS:-}"
step pytest env SEGGUARD_KERNEL_LAB=1 "$PY" -m pytest -p no:cacheprovider -m "netns or kernel_lab" \
    "${extra[@]}" tests/

# 3. optional: a real VM on a libvirt tap in the lab bridge
kvm_ok() {
    [ -c /dev/kvm ] || { why="/dev/kvm is absent (nested virtualization is off on the host, or the provider does not pass VMX/SVM)"; return 1; }
    if command -v virt-host-validate >/dev/null; then
        local out
        out=$(virt-host-validate qemu 2>&1)
        if grep -E "hardware virtualization|/dev/kvm" <<<"$out" | grep -q FAIL; then
            why="virt-host-validate: $(grep -E 'hardware virtualization|/dev/kvm' <<<"$out" | grep FAIL | head -1 | tr -s ' ')"
            return 1
        fi
    fi
    return 0
}
why=""
case "$NESTED" in
    off) record nested-vm SKIPPED "SEGGUARD_NESTED=off" ;;
    tcg) step nested-vm env SEGGUARD_NESTED_VIRT=qemu "$SRC/vagrant/nested-guest.sh" ;;
    auto|on)
        if kvm_ok; then
            step nested-vm env SEGGUARD_NESTED_VIRT=kvm "$SRC/vagrant/nested-guest.sh"
        elif [ "$NESTED" = on ]; then
            record nested-vm FAIL "SEGGUARD_NESTED=on but $why"
        else
            record nested-vm SKIPPED "$why; SEGGUARD_NESTED=tcg runs it without KVM (slow)"
        fi ;;
esac

echo
echo "== segguard Vagrant lab, kernel $(uname -r)"
printf '%s\n' "${summary[@]}"
if [ "$rc" = 0 ]; then echo "== all steps that ran passed"; else echo "== FAILED"; fi
exit "$rc"
