# A device VM serving driver VMs' disks (docs/ARCHITECTURE.md, "The device VM"): consoles
# "device| ", "device2| ", "driver| " and "driver2| ". The device VM (two ports, two disks of
# its own) starts first; its guest says when its backends wait at the ports; then the driver
# VM, whose [backend] device_vm is the first port's socket, boots with its root file system on
# the device VM's first disk, writes and reads it and sends 4 MiB over TCP. With KILL=1, when it
# says so, the device VM's splitvirt is killed mid-I/O and a second device VM takes the sockets
# over; the driver VM (from an initramfs then, its file system on the disk mounted only before
# the kill) carries on with it. A second driver VM is served by the device VM of the
# moment through its second port, from its second disk, at the same time as the first: each
# says when it waits, and both get a line once both wait. The device VM's backends end with
# their connections and it powers off. Each splitvirt logs to a file of its own, read once it
# ended; the device VM's first disk goes back to the host (the outbox).
check kvm_device test -c /dev/kvm
cp /guest/dvm-root.img /tmp/dvm-disk.img
truncate -s 64M /tmp/dvm-disk2.img
device_vm() { # NAME
	( /splitvirt --log-file "/tmp/$1-sv.log" run --config /guest/device.toml --kernel /guest/device-Image \
		--initrd /guest/dvm-device.cpio --cmdline "console=ttyAMA0 loglevel=4 CONNECTIONS=1 KILL=$KILL POLL_US=$POLL_US" </dev/null &
	  echo $! >"/tmp/$1.pid"
	  wait $!
	  exited $? "/tmp/$1-sv.log" ) 2>&1 | while IFS= read -r l; do
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
# Its description pins its vCPU to the board's CPU 1 (vcpu_affinity); its other threads stay
# where the scheduler puts them.
pid=$(cat /tmp/device.pid)
value device_vcpu_cpus "$(for t in $(vcpu_tids "$pid"); do awk '/Cpus_allowed_list/ {print $2}' "/proc/$pid/task/$t/status"; done)"
value device_main_cpus "$(awk '/Cpus_allowed_list/ {print $2}' "/proc/$pid/status")"
# A driver VM, its console typed into from the fifo /tmp/NAME-in (the line that ends its wait).
driver_vm() { # NAME CMDLINE SPLITVIRT-RUN-ARGUMENTS...
	name=$1 cmdline=$2
	shift 2
	( /splitvirt --log-file "/tmp/$name-sv.log" run --kernel /guest/Image "$@" \
		--cmdline "console=ttyAMA0 loglevel=4 $cmdline" <"/tmp/$name-in"
	  exited $? "/tmp/$name-sv.log" ) 2>&1 | while IFS= read -r l; do
		echo "$name| $l"
		case "$l" in
		*"@@ KILL NOW"*) touch /tmp/kill-now ;;
		*"@@ WAIT both"*) touch "/tmp/$name-waits" ;;
		esac
	done
}
# The fifos stay open here, so that no driver VM sees its console end.
mkfifo /tmp/driver-in /tmp/driver2-in
exec 3<>/tmp/driver-in 4<>/tmp/driver2-in
# Its root file system is the device VM's disk, unless the device VM is to die under it: then
# it runs from an initramfs and mounts that file system for a while.
if [ "$KILL" = 1 ]; then
	driver_vm driver "TOKEN=$TOKEN KILL=1" --config /guest/driver.toml --initrd /guest/dvm-driver.cpio &
else
	driver_vm driver "root=/dev/vda2 rw TOKEN=$TOKEN KILL=0" --config /guest/driver.toml &
fi
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
	wait_for /tmp/device2-ready
fi
# A second driver VM, served by the device VM of the moment through its second port from its
# second disk, while the first is served.
driver_vm driver2 "TOKEN=$TOKEN2" --config /guest/driver2.toml --initrd /guest/dvm-driver2.cpio &
driver2=$!
# Once both wait, both go on at once.
wait_for /tmp/driver-waits
wait_for /tmp/driver2-waits
echo go >&3
echo go >&4
n=0
while { kill -0 "$driver" || kill -0 "$driver2"; } 2>/dev/null && [ $n -lt 600 ]; do
	sleep 0.5; n=$((n + 1))
	if [ $n = 600 ]; then
		hang_report devvm
		for f in /tmp/*-sv.log; do sed "s|^|hang $f: |" "$f"; done
		kill_matching 'splitvirt '
	fi
done
wait "$serving"
sed 's/^/device-sv| /' /tmp/device-sv.log
[ "$KILL" = 1 ] && sed 's/^/device2-sv| /' /tmp/device2-sv.log
sed 's/^/driver-sv| /' /tmp/driver-sv.log
sed 's/^/driver2-sv| /' /tmp/driver2-sv.log
# What the driver VMs wrote, in the device VM's disk images: the token at sector 2048 (the
# first driver VM's /dev/vda1) through the first device VM, 4 MiB at 4 MiB into /dev/vda1
# (5 MiB into the disk) through the second; the disk goes back to the host, which reads the
# file the driver VM wrote into its root file system.
value disk_token "$(dd if=/tmp/dvm-disk.img bs=512 skip=2048 count=1 2>/dev/null | head -n 1)"
value disk2_token "$(dd if=/tmp/dvm-disk2.img bs=512 skip=2048 count=1 2>/dev/null | head -n 1)"
value disk_after_sha "$(dd if=/tmp/dvm-disk.img bs=1M skip=5 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)"
outbox /tmp dvm-disk.img
