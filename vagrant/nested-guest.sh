#!/usr/bin/env bash
# The nested check of the Vagrant lab (run by run-lab.sh; as root in the VM).
#
# A real VM -- a busybox initramfs booted with this VM's own kernel -- on a libvirt tap
# enslaved to the lab bridge, profiled as a legacy guest (bound through libvirt's
# <target dev>, as on a production host).  The guest pings a fixed list of lab hosts;
# tcpdump at each destination decides what arrived.  A "blocked" verdict needs a
# control: the same ping from the lab's unprofiled guest reaching the same sink.
#
# Lab traffic stays inside the lab namespaces: the tap is created in this VM's root
# namespace only because libvirt opens it there, then moved into the lab's hypervisor
# namespace before the guest runs.
#
# Environment:
#   SEGGUARD_NESTED_VIRT      kvm (default) | qemu: the libvirt domain type (qemu = TCG)
#   SEGGUARD_NESTED_LAUNCHER  libvirt (default) | qemu: start qemu directly inside the
#                             lab's hypervisor namespace instead (no libvirt daemon
#                             needed; how this script is checked on a host without one)
#   SEGGUARD_NESTED_KERNEL    kernel image (default /boot/vmlinuz-$(uname -r))
#   SEGGUARD_NESTED_MODROOT   root holding lib/modules/<kver> for that kernel (default /)
#   SEGGUARD_NESTED_TIMEOUT   seconds to wait for the guest (default 300 kvm, 1800 qemu)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
SRC=${SEGGUARD_SRC:-$(cd "$here/.." && pwd)}
VENV=${SEGGUARD_VENV:-/opt/segguard-venv}
SEGGUARD=$VENV/bin/segguard
VIRT=${SEGGUARD_NESTED_VIRT:-kvm}
LAUNCHER=${SEGGUARD_NESTED_LAUNCHER:-libvirt}
KERNEL=${SEGGUARD_NESTED_KERNEL:-/boot/vmlinuz-$(uname -r)}
MODROOT=${SEGGUARD_NESTED_MODROOT:-/}
KVER=$(basename "$KERNEL" | sed 's/^vmlinuz-//')
LOGS=${SEGGUARD_VAGRANT_LOGS:-/var/log/segguard-vagrant}
if [ "$VIRT" = kvm ]; then TIMEOUT=${SEGGUARD_NESTED_TIMEOUT:-300}; else TIMEOUT=${SEGGUARD_NESTED_TIMEOUT:-1800}; fi

P=sgnst-                  # lab namespace prefix of this check
HV=${P}hv
DOMAIN=sg-nested-legacy
TAP=vnet61
GUEST_MAC=52:54:00:aa:00:61
TAP_MAC=fe:54:00:aa:00:61  # libvirt's convention for the host side of a guest's tap
GUEST_IP=10.30.0.61
ROUTER_IP=10.30.0.254
CONTROL_NS=${P}guest       # the lab's unprofiled guest: nothing restricts it
CONTROL_IP=10.30.0.50
# name  address  sink-namespace  sink-iface  expected
TARGETS=(
    "app        10.30.0.20     ${P}app   eth0 arrive"   # the profile's one allow rule
    "dc         10.30.0.10     ${P}dc    eth0 blocked"  # block.domain guard rail
    "jump       10.30.0.30     ${P}jump  eth0 blocked"  # default deny
    "hypervisor 10.30.0.1      ${P}hv    br0  blocked"  # never the hypervisor
    "mgmt       10.30.250.10   ${P}mgmt  eth0 blocked"  # management network
    "inet       203.0.113.10   ${P}inet  eth0 blocked"  # block.internet
)

die() { echo "nested-guest.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
case "$VIRT" in kvm|qemu) ;; *) die "SEGGUARD_NESTED_VIRT must be kvm or qemu";; esac
case "$LAUNCHER" in libvirt|qemu) ;; *) die "SEGGUARD_NESTED_LAUNCHER must be libvirt or qemu";; esac
[ -r "$KERNEL" ] || die "kernel $KERNEL not readable"
[ -d "$MODROOT/lib/modules/$KVER" ] || die "no modules for $KVER under $MODROOT/lib/modules"
for tool in busybox tcpdump ip; do command -v "$tool" >/dev/null || die "$tool missing (vagrant/provision.sh installs it)"; done
[ -x /bin/busybox ] && file_bb=/bin/busybox || file_bb=$(command -v busybox)
[ "$LAUNCHER" = qemu ] || command -v virsh >/dev/null || die "virsh missing (libvirt-clients)"

# libvirt's qemu must read kernel and initrd: keep them where libvirt keeps boot images.
if [ "$LAUNCHER" = libvirt ]; then WORK=/var/lib/libvirt/boot/segguard-nested; else WORK=$(mktemp -d); fi
declare -a capture_pids=()
qemu_pid=""
tap_in_root=""

cleanup() {
    set +e
    for pid in "${capture_pids[@]}"; do kill "$pid" 2>/dev/null; done
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null
    if [ "$LAUNCHER" = libvirt ]; then
        virsh -q destroy "$DOMAIN" >/dev/null 2>&1
    fi
    # only a tap this script made, and only while it is still in this namespace
    [ -n "$tap_in_root" ] && ip link show "$TAP" >/dev/null 2>&1 && ip link del "$TAP"
    "$SEGGUARD" lab down --prefix "$P" >/dev/null 2>&1
    [ -f "$WORK/console.log" ] && mkdir -p "$LOGS" && cp "$WORK/console.log" "$LOGS/nested-console.log"
    rm -rf "$WORK"
}
trap cleanup EXIT
rm -rf "$WORK"; mkdir -p "$WORK"; chmod 755 "$WORK"

# ---------------------------------------------------------------- the guest image
build_initramfs() {
    local root=$WORK/initramfs
    mkdir -p "$root"/{bin,dev,proc,sys,modules}
    cp "$file_bb" "$root/bin/busybox"
    # virtio_net and its dependencies in load order, from the kernel's own modules.dep
    : >"$root/modules.order"
    modprobe -a -d "$MODROOT" -S "$KVER" --show-depends virtio_pci virtio_net |
        awk '$1 == "insmod" && !seen[$2]++ {print $2}' |
        while read -r ko; do
            local name; name=$(basename "$ko")
            case "$ko" in
                *.xz)  xz -dc "$ko" >"$root/modules/${name%.xz}"; name=${name%.xz} ;;
                *.zst) zstd -qdc "$ko" >"$root/modules/${name%.zst}"; name=${name%.zst} ;;
                *)     cp "$ko" "$root/modules/$name" ;;
            esac
            echo "$name" >>"$root/modules.order"
        done
    local probes=""
    for t in "${TARGETS[@]}"; do probes+="$(awk '{print $2}' <<<"$t") "; done
    cat >"$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in \$(cat /modules.order); do insmod /modules/\$m || echo "SGNESTED insmod-failed \$m"; done
say() { echo "SGNESTED \$*"; }
ip link set lo up
# virtio devices are probed asynchronously after insmod
n=0
until [ -e /sys/class/net/eth0 ]; do n=\$((n+1)); [ \$n -ge 50 ] && break; sleep 0.2; done
[ -e /sys/class/net/eth0 ] || say no-eth0 \$(ls /sys/class/net)
ip link set eth0 up
ip addr add $GUEST_IP/24 dev eth0
ip route add default via $ROUTER_IP
# The host resumes this guest only after the tap is on the bridge and the policy is
# applied; a few tries cover ARP and link-up.
n=0
until ping -c1 -W1 10.30.0.20 >/dev/null 2>&1; do n=\$((n+1)); [ \$n -ge 20 ] && break; done
say ready \$n
for ip in $probes; do
    if ping -c3 -W2 \$ip >/dev/null 2>&1; then say reply \$ip; else say noreply \$ip; fi
done
say done
sync
poweroff -f
EOF
    chmod 755 "$root/init"
    (cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$WORK/initrd.gz"
    cp "$KERNEL" "$WORK/vmlinuz"
    chmod 644 "$WORK/initrd.gz" "$WORK/vmlinuz"
}

domain_xml() {
    cat <<EOF
<domain type='$VIRT'>
  <name>$DOMAIN</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>$WORK/vmlinuz</kernel>
    <initrd>$WORK/initrd.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 ipv6.disable=1 loglevel=4</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <interface type='ethernet'>
      <mac address='$GUEST_MAC'/>
      <target dev='$TAP' managed='no'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='$WORK/console.log'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# ---------------------------------------------------------------- lab and policy
config_dir() {
    cp -r "$SRC/profiles/lab" "$WORK/config"
    cat >"$WORK/config/profiles/nested-legacy.yaml" <<EOF
# Written by vagrant/nested-guest.sh: the nested real VM as a legacy guest.
name: nested-legacy
description: a real VM on a libvirt tap in the lab bridge
bridge: br0
vlan: 30
guests:
  - name: $DOMAIN
    mac: "$GUEST_MAC"
    ipv4: [$GUEST_IP]
    ipv6: []
block: {internet: true, domain: true}
egress:
  - {to: historian_db, proto: icmp}
default: deny
mode: enforce
EOF
}

attach_tap() {  # the tap is in $HV now: on the bridge, up
    ip -n "$HV" link set "$TAP" address "$TAP_MAC"
    ip -n "$HV" link set "$TAP" master br0
    ip -n "$HV" link set "$TAP" up
}

start_capture() {  # start_capture <ns> <iface> <file>
    ip netns exec "$1" tcpdump -n -U -i "$2" -w "$3" icmp 2>"$3.err" &
    capture_pids+=("$!")
    local i
    for i in $(seq 50); do grep -q "listening on" "$3.err" 2>/dev/null && return 0; sleep 0.2; done
    die "tcpdump in $1 did not start: $(cat "$3.err")"
}

echo_requests_from() {  # echo_requests_from <pcap> <src> <dst>
    tcpdump -n -r "$1" "icmp[icmptype] == icmp-echo and src host $2 and dst host $3" 2>/dev/null | wc -l
}

echo "nested: building the guest image from $KERNEL ($KVER)"
build_initramfs
config_dir
echo "nested: lab ${P}* up"
"$SEGGUARD" lab up --prefix "$P" >/dev/null

for t in "${TARGETS[@]}"; do
    read -r name _ ns iface _ <<<"$t"
    start_capture "$ns" "$iface" "$WORK/$name.pcap"
done

echo "nested: starting $DOMAIN ($LAUNCHER, $VIRT)"
if [ "$LAUNCHER" = libvirt ]; then
    ip tuntap add dev "$TAP" mode tap
    tap_in_root=1
    domain_xml >"$WORK/domain.xml"
    virsh -q create --paused "$WORK/domain.xml"
    ip link set "$TAP" netns "$HV"
    tap_in_root=""
    attach_tap
else
    ip -n "$HV" tuntap add dev "$TAP" mode tap
    attach_tap
fi
# Applied after the tap is on br0, so the guest is bound (libvirt <target dev>, else the
# tap MAC convention) instead of dropped everywhere as unbound.
ip netns exec "$HV" "$SEGGUARD" apply -c "$WORK/config"
ip netns exec "$HV" "$SEGGUARD" status -c "$WORK/config" || true

if [ "$LAUNCHER" = libvirt ]; then
    virsh -q resume "$DOMAIN"
else
    accel=tcg; [ "$VIRT" = kvm ] && accel=kvm
    ip netns exec "$HV" qemu-system-x86_64 -accel "$accel" -m 256 -smp 1 -display none \
        -no-reboot -monitor none -serial "file:$WORK/console.log" \
        -kernel "$WORK/vmlinuz" -initrd "$WORK/initrd.gz" \
        -append "console=ttyS0 panic=-1 ipv6.disable=1 loglevel=4" \
        -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no" \
        -device "virtio-net-pci,netdev=n0,mac=$GUEST_MAC" >"$WORK/qemu.log" 2>&1 &
    qemu_pid=$!
fi

echo "nested: waiting up to ${TIMEOUT}s for the guest"
deadline=$((SECONDS + TIMEOUT))
until grep -q "SGNESTED done" "$WORK/console.log" 2>/dev/null; do
    if [ -n "$qemu_pid" ] && ! kill -0 "$qemu_pid" 2>/dev/null; then break; fi
    [ "$SECONDS" -ge "$deadline" ] && break
    sleep 2
done
grep -a "SGNESTED" "$WORK/console.log" 2>/dev/null | sed 's/^/guest: /' || true
grep -q "SGNESTED done" "$WORK/console.log" 2>/dev/null || {
    tail -n 30 "$WORK/console.log" 2>/dev/null || true
    die "the guest did not finish within ${TIMEOUT}s (console above)"
}

# controls: the unprofiled guest, same destinations, same captures
for t in "${TARGETS[@]}"; do
    read -r _ addr _ _ expect <<<"$t"
    [ "$expect" = blocked ] && ip netns exec "$CONTROL_NS" busybox ping -c2 -W1 "$addr" >/dev/null 2>&1 || true
done
sleep 1
for pid in "${capture_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
wait "${capture_pids[@]}" 2>/dev/null || true
capture_pids=()

fail=0
printf '%-11s %-14s %-8s %-10s %-10s %s\n' target address expect "vm-frames" control verdict
for t in "${TARGETS[@]}"; do
    read -r name addr _ _ expect <<<"$t"
    seen=$(echo_requests_from "$WORK/$name.pcap" "$GUEST_IP" "$addr")
    if [ "$expect" = arrive ]; then
        ctl=-
        if [ "$seen" -gt 0 ]; then verdict=ok; else verdict=FAIL; fi
    else
        ctl=$(echo_requests_from "$WORK/$name.pcap" "$CONTROL_IP" "$addr")
        if [ "$ctl" -eq 0 ]; then verdict="FAIL(control did not arrive: sink unobservable)"
        elif [ "$seen" -eq 0 ]; then verdict=ok
        else verdict=FAIL; fi
    fi
    [ "$verdict" = ok ] || fail=1
    printf '%-11s %-14s %-8s %-10s %-10s %s\n' "$name" "$addr" "$expect" "$seen" "$ctl" "$verdict"
done
if [ "$fail" = 0 ]; then
    echo "nested: the real VM on its tap ($LAUNCHER, $VIRT) was held to its profile"
else
    echo "nested: FAILED"
fi
exit "$fail"
