# Boot timings of splitvirt on KVM: RUNS boots of the project's kernel to init and off.
i=0
while [ "$i" -lt "$RUNS" ]; do
	i=$((i + 1))
	/splitvirt run --stats --kernel /guest/Image --initrd /guest/initrd.cpio \
		--cmdline "console=ttyAMA0 loglevel=4" </dev/null 2>&1 | grep -E 'splitvirt-stats|@@ VALUE up' | sed "s/^/run$i| /"
done
