# The places a driver VM's disk can be served from, side by side (`cargo xtask bench devvm`):
# in splitvirt's process ("in"), in the backend process ("be"), and by a device VM from its
# own virtio-blk ("dvm") or from its own virtio-pmem image ("pmem"), the same raw file each
# time, and its virtio-net likewise (a TAP of the board's, or of the device VM's); ROUNDS
# rounds of PLACES, the order rotating. TRACE=1: KVM's account of each device VM run's
# notifications; TRACE=timeline: where each random read's time goes.
# Consoles "PLACEMENT-ROUND| ", the device VMs' "device-PLACEMENT-ROUND| ".
check kvm_device test -c /dev/kvm
# The disk: 256 MiB of data (a disk's blocks are allocated; reading a hole costs a file
# nothing but a virtio-pmem mapping a fresh page), on huge pages (so that a virtio-pmem mapping
# of it is mapped 2 MiB at a time, as guest RAM is). huge=within_size would give a file
# written 1 MiB at a time none: each write's end is below the 2 MiB page it starts.
mkdir -p /disk
mount -t tmpfs -o huge=always tmpfs /disk
dd if=/dev/urandom of=/disk/bench.raw bs=1M count=256 2>/dev/null
value disk_huge_kib "$(awk '/ShmemHugePages/ {print $2}' /proc/meminfo)"
# TCP: to the board's TAP network (in-process and backend), or to the device VM (its own TAP,
# 10.0.5.1, where dvm-device.sh listens on port 5000).
insmod /tun.ko
tap_network
# A driver VM. Its splitvirt's counters (`wakes`), and its device VM's (pid in
# /tmp/device.pid) if it has one, are read at the guest's marks around its random reads:
# "wakes_NAME_MARK_WHO".
vm() { # NAME CONFIG [GUEST-SETTINGS]
	# A driver VM that has not ended in 8 minutes hangs: say where every splitvirt thread
	# waits (the device VM's own report comes on its console, DIAG), and end them.
	start_watchdog 480 "$1"
	( /splitvirt --log-file "/tmp/$1-sv.log" run --stats --config "/guest/$2.toml" --kernel /guest/Image \
		--initrd /guest/initrd.cpio --cmdline "console=ttyAMA0 loglevel=4 MODE=single $3" </dev/null &
	  echo $! >/tmp/driver.pid
	  wait $! ) 2>&1 |
		while IFS= read -r l; do
			echo "$1| $l"
			case "$l" in *"@@ MARK rand-read"*)
				at=start
				case "$l" in *done*) at=end ;; esac
				value "wakes_$1_${at}_driver" "$(wakes "$(cat /tmp/driver.pid)")"
				[ -e /tmp/device.pid ] && value "wakes_$1_${at}_device" "$(wakes "$(cat /tmp/device.pid)")"
				if [ "$TRACE" = timeline ]; then
					if [ $at = start ]; then
						kvm_timeline_start "$(cat /tmp/driver.pid)" "$(cat /tmp/device.pid 2>/dev/null)"
					else
						kvm_timeline_report "$1"
					fi
				fi ;;
			esac
		done
	kill "$watchdog" 2>/dev/null
	sed "s/^/$1-sv| /" "/tmp/$1-sv.log" 2>/dev/null
}
dvm() { # NAME DEVICE-CONFIG DRIVER-CONFIG-IN-THE-DEVICE-VM
	rm -f "/tmp/device-$1-ready"
	( ( /splitvirt --log-file "/tmp/device-$1-sv.log" run --config "/guest/$2.toml" \
		--kernel /guest/device-Image --initrd /guest/dvm-device.cpio \
		--cmdline "console=ttyAMA0 loglevel=4 CONNECTIONS=1 A_CONFIG=$3 DIAG=1 POLL_US=$POLL_US" </dev/null &
	    echo $! >/tmp/device.pid
	    wait $! ) 2>&1 |
		while IFS= read -r l; do
			echo "device-$1| $l"
			case "$l" in *"@@ PORT READY"*) touch "/tmp/device-$1-ready" ;; esac
		done ) &
	device=$!
	n=0; while [ ! -e "/tmp/device-$1-ready" ] && [ $n -lt 600 ]; do sleep 0.5; n=$((n + 1)); done
	[ "$TRACE" = 1 ] && kvm_trace_start
	vm "$1" driver "TCP_ME=10.0.5.2 TCP_PEER=10.0.5.1"
	wait "$device"
	[ "$TRACE" = 1 ] && kvm_trace_report "$1"
	sed "s/^/device-$1-sv| /" "/tmp/device-$1-sv.log" 2>/dev/null
	rm -f /tmp/device.pid
}
# PLACES: the placements to run, each round's order the last one's rotated by one.
order="$PLACES"
i=0
while [ "$i" -lt "$ROUNDS" ]; do
	i=$((i + 1))
	for p in $order; do
		case $p in
		dvm) dvm "dvm-$i" device /driver.toml ;;
		pmem) dvm "pmem-$i" device-pmem /driver-pmem.toml ;;
		*) vm "$p-$i" "$p" ;;
		esac
	done
	first=${order%% *}
	[ "$first" = "$order" ] || order="${order#* } $first"
done
