#!/usr/bin/env bash
# Vagrant "setup" provisioner, as root inside the Debian 12 VM: install segguard from the
# synced checkout exactly as README.md says (./dev.sh setup), plus what the lab run
# needs on top: libvirt for the optional nested real VM, tcpdump to observe its frames.
set -euo pipefail

SRC=${SEGGUARD_SRC:-/segguard}
export SEGGUARD_VENV=${SEGGUARD_VENV:-/opt/segguard-venv}
export DEBIAN_FRONTEND=noninteractive

[ "$(id -u)" = 0 ] || { echo "provision.sh: run as root" >&2; exit 1; }
[ -x "$SRC/dev.sh" ] || { echo "provision.sh: no checkout at $SRC (did the rsync synced folder run?)" >&2; exit 1; }

. /etc/os-release
if [ "${VERSION_CODENAME:-}" != bookworm ]; then
    echo "provision.sh: warning: box is ${PRETTY_NAME:-unknown}, segguard targets Debian 12 (bookworm)" >&2
fi

apt-get update -qq
# libvirt makes the VM a real libvirt host (segguard reads domains' <target dev> from it);
# the nested check also needs tcpdump at the sinks.  The README setup comes after, so a
# failure there is the project's, not this box's.
apt-get install -y -qq --no-install-recommends \
    libvirt-daemon-system libvirt-clients python3-libvirt tcpdump >/dev/null

cd "$SRC"
./dev.sh setup

"$SEGGUARD_VENV/bin/segguard" --help >/dev/null
echo "provision.sh: segguard installed in $SEGGUARD_VENV from $SRC"
echo "provision.sh: kernel $(uname -r)"
