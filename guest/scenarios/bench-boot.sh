# Boot timings of splitvirt on KVM: RUNS rounds of the project's kernel to init and off, once
# with each guest RAM backing (/guest/private.toml, /guest/memfd.toml), alternating which goes
# first so that the board's drift falls on both.
i=0
while [ "$i" -lt "$RUNS" ]; do
	i=$((i + 1))
	if [ $((i % 2)) -eq 1 ]; then order="private memfd"; else order="memfd private"; fi
	for v in $order; do
		/splitvirt run --stats --config "/guest/$v.toml" --kernel /guest/Image --initrd /guest/initrd.cpio \
			--cmdline "console=ttyAMA0 earlycon=pl011,0x9000000" </dev/null 2>&1 | while IFS= read -r l; do echo "$v$i| $l"; done
	done
done
