# Boot timings of splitvirt on KVM: RUNS boots of the project's kernel to init and off.
i=0
while [ "$i" -lt "$RUNS" ]; do
	i=$((i + 1))
	/splitvirt run --stats --config /guest/nodisk.toml --kernel /guest/Image --initrd /guest/initrd.cpio \
		--cmdline "console=ttyAMA0 earlycon=pl011,0x9000000" </dev/null 2>&1 | while IFS= read -r l; do echo "run$i| $l"; done
done
