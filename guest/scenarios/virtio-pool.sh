# Every virtio device on a splitvirt DTB, confined to the restricted pool.
value cpus "$(grep -c ^processor /proc/cpuinfo)"
value pci_devices "$(ls /sys/bus/pci/devices | wc -l)"
check vda2 test -b /dev/vda2
check eth0 test -e /sys/class/net/eth0
check hvc0 test -c /dev/hvc0
for d in /sys/bus/virtio/devices/virtio*; do
	f=$(cat "$d/features")
	value "features_$(basename "$d")" "$f"
done
if mount -t ext4 /dev/vda2 /mnt; then
	result mount_vda2 PASS
	value host_file "$(cat /mnt/from-host.txt)"
	# Bounce traffic through the pool: read the whole partition.
	dd if=/dev/vda2 of=/dev/null bs=256k 2>/dev/null
	echo "$GUEST_TOKEN" > /mnt/from-guest.txt
	sync
	umount /mnt && result umount PASS
else
	result mount_vda2 FAIL "mount /dev/vda2"
fi
pool=$(ls -d /sys/kernel/debug/swiotlb@* 2>/dev/null | head -n 1)
if [ -n "$pool" ]; then
	value pool_dir "$(basename "$pool")"
	value pool_nslabs "$(cat "$pool/io_tlb_nslabs")"
	value pool_used "$(cat "$pool/io_tlb_used")"
	value pool_hiwater "$(cat "$pool/io_tlb_used_hiwater" 2>/dev/null)"
else
	result pool_debugfs FAIL "no /sys/kernel/debug/swiotlb@*"
fi
