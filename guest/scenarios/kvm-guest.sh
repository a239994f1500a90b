# Inside a splitvirt VM on KVM: CPUs, the device tree splitvirt wrote, and a line typed on
# splitvirt's stdin.
hex() { od -An -tx1 "$1" | tr -d ' \n'; }
value cpus "$(grep -c ^processor /proc/cpuinfo)"
value model "$(cat /proc/device-tree/model)"
value mem_reg "$(hex /proc/device-tree/memory@40000000/reg)"
value pool_reg "$(hex /proc/device-tree/reserved-memory/swiotlb@50000000/reg)"
echo "@@ READY for a line"
if read -t 60 line; then value typed "$line"; else result typed FAIL "nothing arrived on the console"; fi
# virtio-console on splitvirt's PCI, its rings and buffers in the restricted pool.
value pci_devices "$(ls /sys/bus/pci/devices | tr '\n' ' ')"
# virtio-blk's BAR 0 read with a load pair and a vector load, which KVM cannot emulate: the
# program gets SIGBUS and the VM goes on (everything below runs after it).
for d in /sys/bus/pci/devices/*; do
	[ "$(cat "$d/device")" = 0x1042 ] && /conntest loads virtio "$d/resource0"
done
check hvc0 test -c /dev/hvc0
# hvc0 is on a Unix socket; the board's `splitvirt console` answers our line. Keep hvc0 open
# throughout so that the answer cannot arrive while it is closed.
exec 5<>/dev/hvc0
stty -F /dev/hvc0 -echo 2>/dev/null
echo "hvc0-says-$HVC_TOKEN" >&5
if read -t 120 reply <&5; then value hvc_reply "$reply"; else result hvc_reply FAIL "no answer on hvc0"; fi
exec 5>&-
for d in /sys/bus/virtio/devices/virtio*; do value "features_$(basename "$d")" "$(cat "$d/features")"; done
pool=$(ls -d /sys/kernel/debug/swiotlb@* 2>/dev/null | head -n 1)
value pool_used "$(cat "$pool/io_tlb_used" 2>/dev/null)"
# virtio-blk: the root partition of the disk image, read and written through the pool.
check vda2 test -b /dev/vda2
if mount -t ext4 /dev/vda2 /mnt; then
	value host_file "$(cat /mnt/from-host.txt)"
	echo "$GUEST_TOKEN" > /mnt/from-guest.txt
	dd if=/dev/vda of=/dev/null bs=64k 2>/dev/null
	sync
	umount /mnt && result umount PASS
else
	result mount_vda2 FAIL "mount /dev/vda2"
fi
value pool_hiwater "$(cat "$pool/io_tlb_used_hiwater" 2>/dev/null)"
# virtio-net over the board's tap0: the guest pings the board.
check eth0 test -e /sys/class/net/eth0
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
check ping ping -c 3 -W 10 10.0.2.1
# TCP through the TAP: 4 MiB of random bytes to the board, hashed on both sides.
dd if=/dev/urandom of=/tmp/tx.bin bs=64k count=64 2>/dev/null
value tap_tx_sha "$(sha256sum /tmp/tx.bin | cut -d' ' -f1)"
check tcp_tap nc 10.0.2.1 5000 </tmp/tx.bin
# Both vCPUs at once: 3 MiB to the disk while 4 MiB go over TCP; then both checked by hash
# (the disk's copy re-read from the device, not the page cache).
dd if=/dev/urandom of=/tmp/stress.bin bs=64k count=48 2>/dev/null
if mount -t ext4 /dev/vda2 /mnt; then
	( cp /tmp/stress.bin /mnt/stress.bin && sync ) &
	( nc 10.0.2.1 5002 </tmp/tx.bin ) &
	wait
	umount /mnt
	echo 3 >/proc/sys/vm/drop_caches
	mount -t ext4 /dev/vda2 /mnt
	[ "$(sha256sum </tmp/stress.bin)" = "$(sha256sum </mnt/stress.bin)" ] && result stress_disk PASS
	rm -f /mnt/stress.bin
	umount /mnt
fi
