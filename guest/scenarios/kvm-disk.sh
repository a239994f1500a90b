# A second VM on the same disk image: what the first one wrote is there. It resets itself
# once (a marker on the disk tells the second time), so that splitvirt's reboot is exercised.
# Its console is hvc0 (console=hvc0): these lines and the typed one go through virtio-console.
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
value console "$(cat /sys/class/tty/console/active)"
echo "@@ READY for a line"
if read -t 60 line; then value typed "$line"; else result typed FAIL "nothing arrived on hvc0"; fi
