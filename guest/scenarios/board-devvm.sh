# A device VM serving driver VMs' disks (docs/ARCHITECTURE.md, "The device VM"): consoles
# "device| ", "device2| ", "driver| " and "driver2| ". The device VM (two ports, two disks of
# its own) starts first; its guest says when its backends wait at the ports; then the driver
# VM, whose [backend] device_vm is the first port's socket, boots and writes and reads its disk
# and sends 4 MiB over TCP. With KILL=1, when it says so, the device VM's splitvirt is killed
# mid-I/O and a second device VM takes the sockets over; the driver VM carries on with it and
# powers off.
# Then a second driver VM is served by the same device VM through its second port, from its
# second disk; the device VM's backends end with their connections and it powers off. Each
# splitvirt logs to a file of its own, read once it ended.
check kvm_device test -c /dev/kvm
truncate -s 64M /tmp/dvm-disk.img /tmp/dvm-disk2.img
device_vm() { # NAME
	( /splitvirt --log-file "/tmp/$1-sv.log" run --config /guest/device.toml --kernel /guest/device-Image \
		--initrd /guest/dvm-device.cpio --cmdline "console=ttyAMA0 loglevel=4 CONNECTIONS=1" </dev/null &
	  echo $! >"/tmp/$1.pid"
	  wait $!
	  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do
		echo "$1| $l"
		case "$l" in
		*"@@ PORT READY"*) touch "/tmp/$1-ready" ;;
		*"@@ VALUE tcp_rx_sha"*) touch "/tmp/$1-tcp-done" ;;
		esac
	done
}
wait_for() { n=0; while [ ! -e "$1" ] && [ $n -lt 600 ]; do sleep 0.5; n=$((n + 1)); done; }
device_vm device &
serving=$!
wait_for /tmp/device-ready
( /splitvirt --log-file /tmp/driver-sv.log run --config /guest/driver.toml --kernel /guest/Image \
	--initrd /guest/dvm-driver.cpio --cmdline "console=ttyAMA0 loglevel=4 TOKEN=$TOKEN KILL=$KILL" </dev/null
  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do
	echo "driver| $l"
	case "$l" in *"@@ KILL NOW"*) touch /tmp/kill-now ;; esac
done &
driver=$!
if [ "$KILL" = 1 ]; then
	# The driver VM writes without pause now (and the device VM has hashed what came over
	# TCP): the device VM dies under its I/O, and a second one takes its sockets over.
	wait_for /tmp/kill-now
	wait_for /tmp/device-tcp-done
	check device_killed kill -9 "$(cat /tmp/device.pid)"
	wait "$serving"
	device_vm device2 &
	serving=$!
fi
n=0
while kill -0 "$driver" 2>/dev/null && [ $n -lt 600 ]; do
	sleep 0.5; n=$((n + 1))
	[ $n = 600 ] && { hang_report devvm; pkill -9 -f 'splitvirt'; }
done
# A second driver VM, served by the same device VM through its second port from its second
# disk.
( /splitvirt --log-file /tmp/driver2-sv.log run --config /guest/driver2.toml --kernel /guest/Image \
	--initrd /guest/dvm-driver2.cpio --cmdline "console=ttyAMA0 loglevel=4 TOKEN=$TOKEN2" </dev/null
  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do echo "driver2| $l"; done
wait "$serving"
sed 's/^/device-sv| /' /tmp/device-sv.log
[ "$KILL" = 1 ] && sed 's/^/device2-sv| /' /tmp/device2-sv.log
sed 's/^/driver-sv| /' /tmp/driver-sv.log
sed 's/^/driver2-sv| /' /tmp/driver2-sv.log
# What the driver VM wrote, in the device VMs' disk image: the token through the first, 8 MiB
# through the second.
value disk_token "$(dd if=/tmp/dvm-disk.img bs=512 skip=2048 count=1 2>/dev/null | head -n 1)"
value disk2_token "$(dd if=/tmp/dvm-disk2.img bs=512 skip=2048 count=1 2>/dev/null | head -n 1)"
value disk_after_sha "$(dd if=/tmp/dvm-disk.img bs=1M skip=16 count=8 2>/dev/null | sha256sum | cut -d' ' -f1)"
