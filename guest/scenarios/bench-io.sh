# I/O benchmark of splitvirt's virtio devices on KVM: one VM per disk format and device
# placement (in splitvirt's process, or in the backend process), each running iobench on
# /dev/vda and TCP to the board over the TAP.
insmod /tun.ko
tap_network
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
