#!/bin/busybox sh
# Runs as /init in the initramfs of qemu/ring-panic-x86_64.sh (busybox sh). The first boot is
# told apart from the second by a word in a second reserved region (memmap=4K$0x1d000000).
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
PORT=$(sed -n 's/.*bbport=\([0-9]*\).*/\1/p' /proc/cmdline)
MARK=$(devmem 0x1d000000 32)
if [ "$MARK" != "0xB0071234" ]; then
  devmem 0x1d000000 32 0xB0071234
  echo "BBTEST: first boot $(cat /proc/sys/kernel/random/boot_id)"
  blackbox-agent run --server http://10.0.2.2:1 --state-dir /tmp/state --ring mem:0x1e000000:1M \
     --interval 1 --device-id qemu-x86 --pstore-dir /tmp/nopstore 2>/tmp/agent.log &
  sleep 2
  i=1; while [ $i -le 200 ]; do echo "app: line $i" > /dev/kmsg; i=$((i+1)); done
  sleep 3
  grep -E "ring|recover" /tmp/agent.log
  echo "BBTEST: panicking"
  echo c > /proc/sysrq-trigger
else
  echo "BBTEST: second boot $(cat /proc/sys/kernel/random/boot_id)"
  insmod /lib/mod/e1000.ko
  ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
  blackbox-agent run --server http://10.0.2.2:$PORT --state-dir /tmp/state --ring mem:0x1e000000:1M \
     --interval 1 --device-id qemu-x86 --pstore-dir /tmp/nopstore 2>/tmp/agent.log &
  sleep 12
  cat /tmp/agent.log
  echo "BBTEST: done"
  poweroff -f
fi
sleep 1000
