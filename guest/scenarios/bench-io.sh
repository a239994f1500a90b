# I/O benchmark of splitvirt's virtio devices on KVM: one VM per disk format and device
# placement (in splitvirt's process, or in the backend process), each running iobench on
# /dev/vda and TCP to the board over the TAP.
insmod /tun.ko
# Each VM's splitvirt makes tap0 anew (it goes with the VM): give every one the address.
( while :; do
	if [ -e /sys/class/net/tap0 ] && ! ip addr show dev tap0 | grep -q 10.0.2.1; then
		ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up
	fi
	sleep 0.5
  done ) &
# A TCP sink that takes one connection after another and closes each at its end.
printf '#!/bin/sh\ncat >/dev/null\n' >/tmp/sink.sh
chmod +x /tmp/sink.sh
nc -ll -p 5000 -e /tmp/sink.sh &
truncate -s 256M /tmp/bench.raw
truncate -s 96M /tmp/ab-in.raw
truncate -s 128M /tmp/ab-backend.raw
for run in $RUNS; do
	mode=single
	[ "$run" = ab ] && mode=ab
	/splitvirt run --config /guest/bench-$run.toml --kernel /guest/Image --initrd /guest/initrd.cpio \
		--cmdline "console=ttyAMA0 loglevel=4 MODE=$mode" </dev/null 2>&1 |
		while IFS= read -r l; do echo "$run| $l"; done
done
