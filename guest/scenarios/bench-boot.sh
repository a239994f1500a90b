# Boot timings of splitvirt on KVM: RUNS rounds, each booting the project's kernel to init and
# off six times: guest RAM on huge pages and on 4 KiB pages ([memory] huge_pages = false), and
# huge pages with the board's hugetlb pages reserved for the restricted pool; each with a
# verbose console and with `quiet`. Which kind goes first rotates.
i=0
while [ "$i" -lt "$RUNS" ]; do
	i=$((i + 1))
	case $((i % 3)) in
	1) order="huge small hugetlb" ;;
	2) order="small hugetlb huge" ;;
	0) order="hugetlb huge small" ;;
	esac
	for kind in $order; do
		config=$kind
		if [ "$kind" = hugetlb ]; then
			echo 40 >/proc/sys/vm/nr_hugepages; config=huge
		fi
		for talk in verbose quiet; do
			case $talk in
			verbose) cmdline="console=ttyAMA0 earlycon=pl011,0x9000000" ;;
			quiet) cmdline="console=ttyAMA0 quiet" ;;
			esac
			/splitvirt run --stats --config "/guest/$config.toml" --kernel /guest/Image --initrd /guest/initrd.cpio \
				--cmdline "$cmdline" </dev/null 2>&1 | while IFS= read -r l; do echo "$kind-$talk$i| $l"; done
		done
		echo 0 >/proc/sys/vm/nr_hugepages
	done
done
