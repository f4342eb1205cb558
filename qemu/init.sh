#!/bin/busybox sh
# /init of the boot test's initramfs (`cargo xtask qemu`), run by busybox sh on every boot of
# the guest. Its settings are in /etc/qemu-test.env (written by xtask/src/qemu/image.rs). What
# the host reads goes to the serial console as lines starting with `BBTEST:`, `BBKMSG ` (one
# kmsg record) and `BBFOOT ` (xtask/src/qemu/check.rs parses them).
#
# MODE=panic, boot 1: the agent runs with --board; two apps under logos print numbered lines
#   while the kernel prints its own (sysrq m, module loads); the agent uploads them; then the
#   network goes down and the apps print as many lines again, which only the agent's ring in
#   reserved memory holds; a marker line; every kmsg record is copied to the console between
#   `BBTEST: kmsg begin` and `BBTEST: kmsg end`; `echo c > /proc/sysrq-trigger`; panic=1 reboots.
#   Boot 2: the board's init script (etc/init.d/S50blackbox) starts the agent, which uploads
#   what the ring kept and the pstore dump, and the host stops QEMU
#   once the store holds everything. A spare reserved page (SCRATCH, through devmem) counts the
#   boots: RAM survives the reboot.
# MODE=once: boot 1 without the network going down and without the panic.
# MODE=footprint: one app prints RATE lines a second for SECS seconds while the agent forwards
#   them; VmHWM/VmRSS of the agent and of logos go to the console every 5 s.

# Run by logos as an app (never as process 1): print lines and exit.
if [ "$$" != 1 ]; then
	case "$1" in
	count) # count NAME FIRST LAST: numbered lines
		i=$3
		while [ "$i" -le "$4" ]; do
			echo "$2 line $i"
			i=$((i + 1))
		done
		;;
	load) # load RATE SECS: RATE lines of about 100 bytes a second, for SECS seconds
		s=0
		while [ "$s" -lt "$3" ]; do
			sleep 1 &
			tick=$!
			i=0
			while [ "$i" -lt "$2" ]; do
				echo "load $s.$i: the quick brown fox jumps over the lazy dog, 0123456789 abcdefghij"
				i=$((i + 1))
			done
			wait $tick
			s=$((s + 1))
		done
		;;
	esac
	exit 0
fi

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
. /etc/qemu-test.env

say() { echo "BBTEST: $*"; }
forever() { while :; do sleep 3600; done; }

case "$(devmem "$SCRATCH" 32)" in
0xB0070001) boot=2 ;;
0xB0070002) boot=3 ;;
*) boot=1 ;;
esac
devmem "$SCRATCH" 32 $((0xB0070000 + boot))
# Without a real-time clock the guest starts in 1970, before the certificates are valid.
[ "$(date +%s)" -lt "$NOW" ] && date -s "@$NOW" >/dev/null
say "boot $boot $(cat /proc/sys/kernel/random/boot_id)"
if [ "$boot" -gt 2 ]; then
	say "unexpected boot $boot: powering off"
	poweroff -f
fi

while read -r ko args; do
	# $args unquoted: one word per module parameter.
	insmod "/lib/modules/$ko" $args || say "insmod $ko failed"
done </lib/modules/load
[ "$PSTORE" = 1 ] && mount -t pstore pstore /sys/fs/pstore
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

agent() {
	blackbox-agent run --server "$SERVER" --server-ca /etc/blackbox/ca.pem --board "$BOARD" \
		--device-id "$DEVICE" --interval 1 --pstore-dir /sys/fs/pstore &
	AGENT=$!
}

# Two apps print lines FIRST..LAST while the kernel prints the memory summary.
apps() {
	blackbox-agent logos alpha -- /init count alpha "$1" "$2" &
	a=$!
	blackbox-agent logos beta -- /init count beta "$1" "$2" &
	b=$!
	echo m >/proc/sysrq-trigger
	wait $a $b
}

# Every kmsg record so far, to the console (the kernel's own console lines would cut into them).
dump() {
	echo 1 >/proc/sys/kernel/printk
	# cat waits for more at the end of the log: stop it after a while.
	timeout 3 cat /dev/kmsg >/tmp/kmsg
	say "kmsg begin"
	sed 's/^/BBKMSG /' /tmp/kmsg
	say "kmsg end"
	echo 7 >/proc/sys/kernel/printk
}

vm() { awk '/^Vm(HWM|RSS):/ { printf " %s%s", $1, $2 }' "/proc/$1/status" 2>/dev/null; }

if [ "$MODE" = footprint ]; then
	agent
	sleep 2
	blackbox-agent logos load -- /init load "$RATE" "$SECS" &
	load=$!
	say "footprint start $(cut -d' ' -f1 /proc/uptime)"
	while kill -0 $load 2>/dev/null; do
		echo "BBFOOT t=$(cut -d' ' -f1 /proc/uptime) agent$(vm $AGENT) logos$(vm $load)"
		sleep 5
	done
	say "footprint end $(cut -d' ' -f1 /proc/uptime)"
	sleep 5
	echo "BBFOOT t=$(cut -d' ' -f1 /proc/uptime) agent$(vm $AGENT)"
	say done
	forever
fi

if [ "$boot" = 2 ]; then
	say "pstore:$(ls /sys/fs/pstore 2>/dev/null | tr '\n' ' ')"
	# As on a device: the board's init script (board-support/overlay/etc/init.d/S50blackbox,
	# with /etc/default/blackbox naming this image's agent) starts and supervises the agent,
	# whose settings are in agent.toml's [run]; the identity is the one boot 1 used.
	cat >>/etc/blackbox/agent.toml <<-EOF
		[run]
		server = "$SERVER"
		server_ca = "/etc/blackbox/ca.pem"
		board = "$BOARD"
		device_id = "$DEVICE"
		interval = 1
	EOF
	/etc/init.d/S50blackbox start
	say "init-script $(/etc/init.d/S50blackbox status)"
	forever
fi

agent 2>/tmp/agent.log
sleep 1
apps 1 $((LINES / 2))
if [ "$MODE" = panic ]; then
	sleep 3
	say "network down"
	ip link set eth0 down
fi
apps $((LINES / 2 + 1)) "$LINES"
echo "qemu-test: marker: the last line before the check" >/dev/kmsg
sleep 2
dump
cat /tmp/agent.log
if [ "$MODE" = panic ]; then
	say panic
	echo c >/proc/sysrq-trigger
fi
tail -n 0 -f /tmp/agent.log &
say done
forever
