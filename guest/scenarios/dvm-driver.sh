# Inside the driver VM, whose disk a device VM serves from the device VM's own disk: an MBR disk
# whose partition 2 is a root file system and partition 1 8 MiB for raw writes. Booted with
# root=/dev/vda2, that file system is the root; with KILL=1 (the device VM dies under this VM,
# which must outlive it) the VM runs from an initramfs and mounts it at /mnt until the kill.
# It writes a file there (the board finds it in the device VM's disk image), a token at the
# start of /dev/vda1 (sector 2048 of the disk), 8 MiB into a file (flushed, dropped from the
# page cache, read back), then 4 MiB over TCP to the device VM. With KILL=1: writes to
# /dev/vda1 without pause until one fails (the board kills the device VM meanwhile), and again
# until one succeeds (a new device VM took over), 4 MiB at 4 MiB into /dev/vda1 read back, and
# the same 4 MiB over TCP to the new device VM. Then
# it waits for the board's line, which comes once the second driver VM waits too, and both
# write and read 2 MiB at once.
mount -t tmpfs tmpfs /tmp
fs=
if [ "$KILL" = 1 ]; then
	check mount_vda2 mount /dev/vda2 /mnt
	fs=/mnt
fi
value root_dev "$(awk '$5 == "/" {print $3; exit}' /proc/self/mountinfo)"
value vda2_dev "$(cat /sys/class/block/vda2/dev 2>/dev/null)"
value from_board "$(cat $fs/from-board.txt 2>/dev/null)"
echo "$TOKEN" | dd of=$fs/from-driver.txt conv=fsync 2>/dev/null
check root_write test "$(cat $fs/from-driver.txt)" = "$TOKEN"
printf 'splitvirt-device-vm %s\n' "$TOKEN" >/tmp/token
check token_write dd if=/tmp/token of=/dev/vda1 bs=512 conv=sync,fsync
dd if=/dev/urandom of=/tmp/r bs=1M count=8 2>/dev/null
value written_sha "$(sha256sum </tmp/r | cut -d' ' -f1)"
check bulk_write dd if=/tmp/r of=$fs/bulk.bin bs=1M conv=fsync
echo 3 >/proc/sys/vm/drop_caches
value read_sha "$(sha256sum <$fs/bulk.bin | cut -d' ' -f1)"
rm -f $fs/bulk.bin
value token_read "$(dd if=/dev/vda1 bs=512 count=1 2>/dev/null | head -n 1)"
# The console the device VM serves (hvc0): a line from the device VM's side, answered (in the
# background: what follows does not wait for it).
check console_hvc0 test -c /dev/hvc0
stty -F /dev/hvc0 raw -echo 2>/dev/null
( read -r line </dev/hvc0
  value console_line "$line"
  echo "pong-$line-$TOKEN" >/dev/hvc0 ) &
# 4 MiB over TCP to the device VM, through the virtio-net it serves from its own TAP.
ip addr add 10.0.5.2/24 dev eth0
ip link set eth0 up
dd if=/dev/urandom of=/tmp/tx bs=1M count=4 2>/dev/null
value tcp_tx_sha "$(sha256sum </tmp/tx | cut -d' ' -f1)"
n=0
until nc 10.0.5.1 5000 </tmp/tx || [ $n -ge 60 ]; do sleep 1; n=$((n + 1)); done
value tcp_tries "$n"
sync
if [ "$KILL" = 1 ]; then
	check umount_vda2 umount /mnt
	# Where the disk's requests stand, every 20 s while this runs (for a hang's report).
	( while sleep 20; do
		echo "diag: inflight $(cat /sys/block/vda/inflight) irqs $(grep -i virtio /proc/interrupts | tr -s ' ' | tr '\n' '|')"
	  done ) &
	echo "@@ KILL NOW"
	n=0
	while [ $n -lt 100000 ] && dd if=/tmp/r of=/dev/vda1 bs=1M seek=1 count=1 conv=fsync 2>/dev/null; do
		n=$((n + 1))
	done
	value writes_before_error "$n"
	dd if=/dev/urandom of=/tmp/r2 bs=1M count=4 2>/dev/null
	value after_sha "$(sha256sum </tmp/r2 | cut -d' ' -f1)"
	n=0
	until dd if=/tmp/r2 of=/dev/vda1 bs=1M seek=4 conv=fsync 2>/dev/null || [ $n -ge 300 ]; do
		sleep 1; n=$((n + 1))
	done
	value failed_tries "$n"
	echo 3 >/proc/sys/vm/drop_caches
	value after_read_sha "$(dd if=/dev/vda1 bs=1M skip=4 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)"
	# The network too, where the first device VM left it: 4 MiB over TCP to the second.
	n=0
	until nc 10.0.5.1 5000 </tmp/tx || [ $n -ge 60 ]; do sleep 1; n=$((n + 1)); done
	value tcp_after_tries "$n"
fi
# Both driver VMs at once, each on its own disk of the device VM.
wait_for_board both
write_read_back both /dev/vda1 2 2
