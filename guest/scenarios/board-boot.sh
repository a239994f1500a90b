# The board boots splitvirt guests on KVM. Guest consoles are prefixed "guest| ", "disk| ",
# "root| ", "qroot| ", "stock| ", "abort| "; the guest's socket console "hvc| ".
check kvm_device test -c /dev/kvm
# Two VMs at once, each booting root=/dev/vda2 (one raw image, one qcow2 with INTx only),
# linked by a socket: 4 MiB over TCP from one to the other.
root_pair() {
	( /splitvirt run --config /guest/root.toml --kernel /guest/Image \
		--cmdline "console=ttyAMA0 earlycon=pl011,0x9000000 loglevel=4 root=/dev/vda2 rw LINK_ROLE=listen LINK_ME=10.0.3.1 ROOT_TOKEN=$ROOT_TOKEN" </dev/null
	  exited $? ) 2>&1 | while IFS= read -r l; do echo "root| $l"; done &
	pair=$!
	( /splitvirt run --config /guest/qroot.toml --kernel /guest/Image \
		--cmdline "console=ttyAMA0 loglevel=4 root=/dev/vda2 rw LINK_ROLE=send LINK_ME=10.0.3.2 LINK_PEER=10.0.3.1 ROOT_TOKEN=$QROOT_TOKEN" </dev/null
	  exited $? ) 2>&1 | while IFS= read -r l; do echo "qroot| $l"; done &
	pair="$pair $!"
	i=0
	while [ "$(ps | grep -c '[r]oot.toml')" -gt 0 ]; do
		sleep 1; i=$((i + 1))
		# Far past what the two VMs need (about a minute): say where everything waits, and end
		# them so that the rest runs and the checks name what is missing.
		if [ $i = "${ROOT_WATCHDOG:-600}" ]; then hang_report root-qroot; kill_matching 'root.toml'; fi
	done
	# Their consoles' last lines too.
	wait $pair
}
# ROOT_ROUNDS=N (`cargo xtask kvmboot --root-rounds N`): only this pair, N times, to chase a
# rare hang.
if [ -n "$ROOT_ROUNDS" ]; then
	ROOT_WATCHDOG=240
	r=0
	while [ "$r" -lt "$ROOT_ROUNDS" ]; do
		r=$((r + 1))
		echo "@@ ROUND $r"
		root_pair
	done
	return 0
fi
# The board's side of the guest's network: tap0 (created by splitvirt) gets 10.0.2.1.
insmod /tun.ko
( i=0
  while [ ! -e /sys/class/net/tap0 ] && [ "$i" -lt 1200 ]; do sleep 0.5; i=$((i + 1)); done
  ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up ) &
# The guest sends 4 MiB over TCP; nc ends a connection when its stdin ends: keep it open.
(sleep 1500 | nc -l -p 5000 >/tmp/tap-rx.bin) &
(sleep 1500 | nc -l -p 5002 >/tmp/tap-rx2.bin) &
# The guest's hvc0 is on /tmp/hvc.sock: attach to it and answer the guest's line.
mkfifo /tmp/hvc-in
exec 4<>/tmp/hvc-in
( i=0
  while [ ! -S /tmp/hvc.sock ] && [ "$i" -lt 1200 ]; do sleep 0.5; i=$((i + 1)); done
  /splitvirt console /tmp/hvc.sock --linger 1500 </tmp/hvc-in 2>&1 | while IFS= read -r l; do
	echo "hvc| $l"
	case "$l" in *"hvc0-says-"*) echo "hvc-reply-$HVC_REPLY" >&4 ;; esac
  done ) &
# The devices run in splitvirt's backend process, jailed: its memory map holds the pool memfd
# and no guest RAM (the RAM memfd is never sent to it), and it has a seccomp filter, no
# capability and namespaces of its own.
( backend_values ) &
# The project's kernel, which gets a line typed on splitvirt's stdin once it says it is ready
# (a real UART drops what arrives before the port is opened).
mkfifo /tmp/typing
exec 3<>/tmp/typing
( /splitvirt --log-file /tmp/guest-sv.log run --config /guest/vm.toml --kernel /guest/Image \
	--initrd /guest/initrd.cpio --cmdline "console=ttyAMA0 earlycon=pl011,0x9000000 loglevel=7" </tmp/typing
  exited $? /tmp/guest-sv.log ) 2>&1 | while IFS= read -r l; do
	echo "guest| $l"
	case "$l" in *"@@ READY"*) echo "$TYPED" >&3 ;; esac
done
value guest_powered_off "$(grep -c 'the guest powered off' /tmp/guest-sv.log)"
# The guest's load pair and vector load of one BAR address: one line, logged once.
value undecodable_lines "$(grep -c 'cannot emulate' /tmp/guest-sv.log)"
i=0
while [ "$(wc -c </tmp/tap-rx.bin)" -lt 4194304 ] && [ $i -lt 60 ]; do sleep 0.5; i=$((i + 1)); done
value tap_rx_sha "$(sha256sum /tmp/tap-rx.bin | cut -d' ' -f1)"
i=0
while [ "$(wc -c </tmp/tap-rx2.bin)" -lt 4194304 ] && [ $i -lt 60 ]; do sleep 0.5; i=$((i + 1)); done
value stress_rx_sha "$(sha256sum /tmp/tap-rx2.bin | cut -d' ' -f1)"
# The same disk, console=hvc0: the guest's console is the virtio-console on stdio, both ways.
( /splitvirt --log-file /tmp/disk-sv.log run --config /guest/vm-hvc.toml --kernel /guest/Image \
	--initrd /guest/disk.cpio --cmdline "console=hvc0 loglevel=4" </tmp/typing
  exited $? /tmp/disk-sv.log ) 2>&1 | while IFS= read -r l; do
	echo "disk| $l"
	case "$l" in *"@@ READY"*) echo "$TYPED_HVC" >&3 ;; esac
done
exec 3>&-
value disk_reset "$(grep -c 'the guest reset; starting it again' /tmp/disk-sv.log)"
root_pair
# The images go back to the host (the outbox disk) to be read there.
outbox /guest root.img root.qcow2
# The backend killed mid-I/O: splitvirt stays up and says so; the guest's UART still works.
truncate -s 8M /tmp/kill.img
mkfifo /tmp/kill-in
exec 5<>/tmp/kill-in
# splitvirt logs to a file of its own, read after it ends: its lines never mix with the guest's.
( /splitvirt --log-file /tmp/kill-sv.log run --config /guest/kill.toml --kernel /guest/Image \
	--initrd /guest/kill.cpio --cmdline "console=ttyAMA0 loglevel=4" </tmp/kill-in
  exited $? /tmp/kill-sv.log ) 2>&1 | while IFS= read -r l; do
	echo "kill| $l"
	case "$l" in *"@@ READY-KILL"*)
		kill -9 "$(backend_pid)"
		sleep 2
		echo "typed-after-kill" >&5 ;;
	esac
done
exec 5>&-
value kill_ioerr "$(grep -c 'failed with an I/O error' /tmp/kill-sv.log)"
value kill_lost "$(grep -c 'backend lost: the backend process' /tmp/kill-sv.log)"
value kill_restarted "$(grep -c 'backend restarted' /tmp/kill-sv.log)"
# Debian's stock kernel on the built-in default VM, from an empty directory: only a kernel and
# an initramfs, nothing else on the command line.
mkdir -p /tmp/empty
( cd /tmp/empty && /splitvirt run --kernel /guest/stock-Image --initrd /guest/stock.cpio </dev/null
  exited $? ) 2>&1 | while IFS= read -r l; do echo "stock| $l"; done
# A bare guest that does what KVM cannot emulate (an ldp from the UART): it gets an external
# abort, its handler prints D and powers off (guest/tools/abort.S).
( /splitvirt run --config /guest/nodisk.toml --kernel /guest/abort-Image --cmdline "" </dev/null
  exited $? ) 2>&1 | while IFS= read -r l; do echo "abort| $l"; done
