# A second VM on the same disk image: what the first one wrote is there. It resets itself
# once (a marker on the disk tells the second time), so that splitvirt's reboot is exercised.
if mount -t ext4 /dev/vda2 /mnt; then
	if [ -e /mnt/rebooted ]; then
		value rebooted yes
		value previous "$(cat /mnt/from-guest.txt 2>/dev/null)"
		umount /mnt
	else
		touch /mnt/rebooted
		sync
		umount /mnt
		echo "@@ REBOOTING"
		reboot -f
	fi
else
	result mount_vda2 FAIL "mount /dev/vda2"
fi
