#!/usr/bin/env bash
# One entry point for people and CI.  Run as root on Debian 12 (bookworm): the venv
# needs its python3 >= 3.11 and python3-nftables, the kernel lab Debian's linux-image-6.1.
#   ./dev.sh lab    install what is needed, then run the built-in lab (segguard lab run)
#   ./dev.sh test   install what is needed, then run every test: unit, netns, kernel lab
#   ./dev.sh setup  only install
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SEGGUARD_VENV:-$PWD/.venv}
APT_PACKAGES=(nftables python3-nftables python3-venv python3-pip iproute2 kmod
              qemu-system-x86 busybox-static
              libvirt-daemon-system libvirt-clients python3-libvirt
              vagrant)  # only for `vagrant validate` of vagrant/Vagrantfile (tests/unit/test_vagrant.py)

need_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "dev.sh: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

setup() {
  [ "$(id -u)" = 0 ] || { echo "dev.sh: run as root (network namespaces and nftables need it)" >&2; exit 1; }
  need_apt
  if [ ! -x "$VENV/bin/python" ]; then
    # system python: Debian's python3-nftables lives in its dist-packages
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"
}

run_tests() {
  local rc=0
  echo "== unit and CLI tests"
  "$VENV/bin/python" -m pytest -q -m "not netns and not kernel_lab" "$@" || rc=$?
  echo "== netns tests (host kernel)"
  "$VENV/bin/python" -m pytest -q -m "netns" "$@" || rc=$?
  echo "== kernel lab tests (Debian kernel under qemu)"
  "$VENV/bin/python" -m tests.kernel_lab.runner "$@" || rc=$?
  return $rc
}

cmd=${1:-}; shift || true
case "$cmd" in
  setup) setup ;;
  lab)   setup; exec "$VENV/bin/segguard" lab run "$@" ;;
  test)  setup; run_tests "$@" ;;
  *) echo "usage: $0 lab|test|setup" >&2; exit 64 ;;
esac
