#!/usr/bin/env bash
# The persistent ring across a real kernel panic, on a stock Debian x86_64 kernel in QEMU (TCG):
# boot 1 logs 200 app lines into /dev/kmsg with the server unreachable (everything stays in
# the ring in reserved memory, memmap=1M$0x1e000000), panics with sysrq; `panic=1` reboots;
# boot 2 uploads what the ring kept. Passes when all 200 lines are stored exactly once under
# boot 1's id and nothing of boot 1 went under another id.
#
# Needs: qemu-system-x86, busybox-static, cpio (apt-get install them), the musl target
# (rustup target add x86_64-unknown-linux-musl). `cargo xtask qemu` (issue 6) will replace this.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-$root/target/qemu-ring}
port=${PORT:-18080}
mkdir -p "$work" && cd "$work"

deb=$(ls linux-image-6.1.0-*-amd64_*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
  pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: \(linux-image-6[^ ]*-amd64\)$/\1/p' | head -1)
  apt-get download "$pkg"
  deb=$(ls linux-image-6.1.0-*-amd64_*.deb | head -1)
fi
[ -d k ] || dpkg -x "$deb" k
kernel=$(ls k/boot/vmlinuz-*)

(cd "$root" && cargo build --release -q -p blackbox-agent --target x86_64-unknown-linux-musl \
   && cargo build --release -q -p blackbox-server)
rm -rf initramfs store && mkdir -p initramfs/{bin,sbin,proc,sys,dev,tmp,lib/mod}
cp "$(command -v busybox)" initramfs/bin/
cp "$root/target/x86_64-unknown-linux-musl/release/blackbox-agent" initramfs/sbin/
cp "$(find k -name e1000.ko | head -1)" initramfs/lib/mod/
install -m 755 "$root/qemu/ring-panic-init.sh" initramfs/init
(cd initramfs && find . | cpio -o -H newc 2>/dev/null | gzip -1) > initrd.gz

"$root/target/release/blackbox-server" serve --listen 127.0.0.1:$port --store "$work/store" \
  --segment-max-age-ms 200 > server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sleep 1
kill -0 $server 2>/dev/null || { cat server.log; echo "server did not start (port $port busy? set PORT)"; exit 1; }
timeout 300 qemu-system-x86_64 -accel tcg -m 512 -nographic -kernel "$kernel" -initrd initrd.gz \
  -append "console=ttyS0 panic=1 oops=panic loglevel=3 memmap=1M\$0x1e000000 memmap=4K\$0x1d000000 bbport=$port" \
  -nic user,model=e1000 > qemu.log 2>&1 || true
grep -E "BBTEST|blackbox-agent|Kernel panic" qemu.log || true
kill $server 2>/dev/null || true; wait $server 2>/dev/null || true

first=$(sed -n 's/.*BBTEST: first boot \([0-9a-f-]*\).*/\1/p' qemu.log)
zcat store/raw/*/*/*.seg.gz | python3 -c '
import sys, json, collections
first = sys.argv[1]
apps = collections.defaultdict(list)
boots = collections.Counter()
for line in sys.stdin:
    d = json.loads(line)
    boots[d["boot"]] += 1
    if d["msg"].startswith("app: line "):
        apps[d["boot"]].append(int(d["msg"].split()[-1]))
print("records per boot:", dict(boots))
ok = sorted(apps[first]) == list(range(1, 201)) and len(boots) == 2
print("PASS" if ok else "FAIL", ": boot", first, "app lines", len(apps[first]))
sys.exit(0 if ok else 1)
' "$first"
