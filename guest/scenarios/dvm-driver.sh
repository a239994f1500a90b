# Inside the driver VM: its /dev/vda is served by a device VM from the device VM's own disk.
# A token at sector 2048 (the board finds it in the device VM's disk image), 8 MiB of random
# bytes written, flushed, dropped from the page cache and read back through the device VM.
# Then 4 MiB over TCP to the device VM. Then writes without pause until one fails (the board kills the device VM meanwhile), and
# again until one succeeds (a new device VM took over), 8 MiB at 16 MiB read back.
value vda_sectors "$(cat /sys/block/vda/size)"
printf 'splitvirt-device-vm %s\n' "$TOKEN" >/tmp/token
check token_write dd if=/tmp/token of=/dev/vda bs=512 seek=2048 conv=sync,fsync
dd if=/dev/urandom of=/tmp/r bs=1M count=8 2>/dev/null
value written_sha "$(sha256sum </tmp/r | cut -d' ' -f1)"
check bulk_write dd if=/tmp/r of=/dev/vda bs=1M seek=8 conv=fsync
echo 3 >/proc/sys/vm/drop_caches
value read_sha "$(dd if=/dev/vda bs=1M skip=8 count=8 2>/dev/null | sha256sum | cut -d' ' -f1)"
value token_read "$(dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -n 1)"
# 4 MiB over TCP to the device VM, through the virtio-net it serves from its own TAP.
ip addr add 10.0.5.2/24 dev eth0
ip link set eth0 up
dd if=/dev/urandom of=/tmp/tx bs=1M count=4 2>/dev/null
value tcp_tx_sha "$(sha256sum </tmp/tx | cut -d' ' -f1)"
n=0
until nc 10.0.5.1 5000 </tmp/tx || [ $n -ge 60 ]; do sleep 1; n=$((n + 1)); done
value tcp_tries "$n"
# Without KILL=1 the board kills nothing: done.
[ "$KILL" = 1 ] || return 0
echo "@@ KILL NOW"
n=0
while [ $n -lt 100000 ] && dd if=/tmp/r of=/dev/vda bs=1M seek=8 count=1 conv=fsync 2>/dev/null; do
	n=$((n + 1))
done
value writes_before_error "$n"
dd if=/dev/urandom of=/tmp/r2 bs=1M count=8 2>/dev/null
value after_sha "$(sha256sum </tmp/r2 | cut -d' ' -f1)"
n=0
until dd if=/tmp/r2 of=/dev/vda bs=1M seek=16 conv=fsync 2>/dev/null || [ $n -ge 300 ]; do
	sleep 1; n=$((n + 1))
done
value failed_tries "$n"
echo 3 >/proc/sys/vm/drop_caches
value after_read_sha "$(dd if=/dev/vda bs=1M skip=16 count=8 2>/dev/null | sha256sum | cut -d' ' -f1)"
