# Boot timings of splitvirt on KVM: RUNS rounds, each booting the project's kernel to init and
# off twice, with guest RAM on huge pages and with 4 KiB pages ([memory] huge_pages = false),
# which goes first alternating.
i=0
while [ "$i" -lt "$RUNS" ]; do
	i=$((i + 1))
	if [ $((i % 2)) = 1 ]; then order="huge small"; else order="small huge"; fi
	for kind in $order; do
		/splitvirt run --stats --config "/guest/$kind.toml" --kernel /guest/Image --initrd /guest/initrd.cpio \
			--cmdline "console=ttyAMA0 earlycon=pl011,0x9000000" </dev/null 2>&1 | while IFS= read -r l; do echo "$kind$i| $l"; done
	done
done
