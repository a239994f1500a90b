# I/O benchmark of splitvirt's virtio devices on KVM: one VM per disk format, each running
# iobench on /dev/vda (and, on the first, TCP to the board over the TAP).
insmod /tun.ko
( i=0
  while [ ! -e /sys/class/net/tap0 ] && [ "$i" -lt 1200 ]; do sleep 0.5; i=$((i + 1)); done
  ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up ) &
(sleep 3000 | nc -l -p 5000 >/dev/null) &
truncate -s 256M /tmp/bench.raw
for fmt in raw qcow2; do
	/splitvirt run --config /guest/bench-$fmt.toml --kernel /guest/Image --initrd /guest/initrd.cpio \
		--cmdline "console=ttyAMA0 loglevel=4 IOB_TCP=$([ $fmt = raw ] && echo yes)" </dev/null 2>&1 |
		while IFS= read -r l; do echo "$fmt| $l"; done
done
