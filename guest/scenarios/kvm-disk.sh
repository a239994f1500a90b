# A second VM on the same disk image: what the first one wrote is there.
if mount -t ext4 -o ro /dev/vda2 /mnt; then
	value previous "$(cat /mnt/from-guest.txt 2>/dev/null)"
	umount /mnt
else
	result mount_vda2 FAIL "mount /dev/vda2"
fi
