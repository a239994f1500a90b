# Boot timings of splitvirt on KVM: RUNS rounds, each booting the project's kernel to init and
# off four times: guest RAM on huge pages and on 4 KiB pages ([memory] huge_pages = false),
# each with a verbose console and with `quiet`; which kind of RAM goes first alternates.
i=0
while [ "$i" -lt "$RUNS" ]; do
	i=$((i + 1))
	if [ $((i % 2)) = 1 ]; then order="huge small"; else order="small huge"; fi
	for kind in $order; do
		for talk in verbose quiet; do
			case $talk in
			verbose) cmdline="console=ttyAMA0 earlycon=pl011,0x9000000" ;;
			quiet) cmdline="console=ttyAMA0 quiet" ;;
			esac
			/splitvirt run --stats --config "/guest/$kind.toml" --kernel /guest/Image --initrd /guest/initrd.cpio \
				--cmdline "$cmdline" </dev/null 2>&1 | while IFS= read -r l; do echo "$kind-$talk$i| $l"; done
		done
	done
done
