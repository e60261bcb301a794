#!/bin/busybox sh
# PID 1 of the test VM.  Everything it is told comes from the kernel command line
# (sgr.* words), so one cached initramfs serves every run; everything it learns goes
# to the serial console as "SGR-..." lines, which the test reads from the log file.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

up() { cut -d' ' -f1 /proc/uptime; }
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
say() { echo "SGR-$*"; }

say "BOOT $(up)"
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" || say "MODULE-FAILED $m"; done

i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
ip link set lo up
ip link set eth0 up
ip addr add "$(arg sgr.ip)" dev eth0
ip route add default via "$(arg sgr.gw)"
# Static neighbours: a verdict must never hinge on ARP, which the wall under test
# could be what blocks.  sgr.n=ip@mac,ip@mac
for n in $(arg sgr.n | tr ',' ' '); do
    arp -i eth0 -s "${n%@*}" "${n#*@}" || say "NEIGH-FAILED $n"
done
# The e1000 link comes up asynchronously; probes before carrier would read as blocked.
i=0
while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
say "NET-UP $(up) $(cat /sys/class/net/eth0/address)"
arp -an

# No grace period: the host must have bound and enforced the tap before the guest's
# first frame, so probes start the moment the link is up.
# sgr.p<N>=name:kind:ip:port:marker   kind: tcp | udp | ping
for w in $(cat /proc/cmdline); do
    case "$w" in sgr.p*=*) ;; *) continue;; esac
    spec="${w#*=}"
    IFS=: read -r name kind ip port marker <<EOS
$spec
EOS
    case "$kind" in
    tcp)
        # nc exits 0 only when connect() succeeded and the marker was written.
        if echo "$marker" | timeout 4 nc -w 3 "$ip" "$port" >/dev/null 2>&1; then r=connected; else r=failed; fi ;;
    udp)
        # tftp RRQ: the file name (the marker) rides in the first UDP datagram, to any port.
        timeout 2 tftp -g -r "$marker" -l /tmp/tftp.out "$ip" "$port" >/dev/null 2>&1
        r=sent ;;
    ping)
        if ping -c 2 -W 2 "$ip" >/dev/null 2>&1; then r=replied; else r=failed; fi ;;
    *) r="unknown-kind-$kind" ;;
    esac
    say "PROBE $name $r $(up)"
done
say "DONE $(up)"
sync
poweroff -f
