# A device VM serving a driver VM's disk (docs/ARCHITECTURE.md, "The device VM"): consoles
# "device| " and "driver| ". The device VM starts first; its guest says when its backend waits
# at the port; then the driver VM, whose [backend] device_vm is the port's socket, boots,
# writes and reads its disk and powers off; the device VM's backend ends with the connection
# and the device VM powers off. Each splitvirt logs to a file of its own, read once it ended.
check kvm_device test -c /dev/kvm
truncate -s 64M /tmp/dvm-disk.img
( /splitvirt --log-file /tmp/device-sv.log run --config /guest/device.toml --kernel /guest/Image \
	--initrd /guest/dvm-device.cpio --cmdline "console=ttyAMA0 loglevel=4 CONNECTIONS=1" </dev/null
  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do
	echo "device| $l"
	case "$l" in *"@@ PORT READY"*) touch /tmp/port-ready ;; esac
done &
device_console=$!
n=0
while [ ! -e /tmp/port-ready ] && [ $n -lt 600 ]; do sleep 0.5; n=$((n + 1)); done
( /splitvirt --log-file /tmp/driver-sv.log run --config /guest/driver.toml --kernel /guest/Image \
	--initrd /guest/dvm-driver.cpio --cmdline "console=ttyAMA0 loglevel=4 TOKEN=$TOKEN" </dev/null
  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do echo "driver| $l"; done
n=0
while [ "$(ps | grep -c '[d]evice.toml')" -gt 0 ] && [ $n -lt 600 ]; do
	sleep 0.5; n=$((n + 1))
	[ $n = 600 ] && { hang_report devvm; pkill -f device.toml; }
done
# Its console to the end (the exit status comes after splitvirt ended).
wait "$device_console"
sed 's/^/device-sv| /' /tmp/device-sv.log
sed 's/^/driver-sv| /' /tmp/driver-sv.log
# What the driver VM wrote, in the device VM's own disk image.
value disk_token "$(dd if=/tmp/dvm-disk.img bs=512 skip=2048 count=1 2>/dev/null | head -n 1)"
