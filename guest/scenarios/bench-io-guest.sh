# Inside a benchmark VM. MODE=ab: two disks in one VM, vda in splitvirt's process and vdb in
# the backend process, read in alternation (same guest, same minutes: the fairest comparison
# this noisy machine allows); MODE=abc: a third, vdc, served over vhost-user, then one file read
# from ext4 on a fourth (vdd, vhost-user) and from virtio-fs in alternation. Otherwise:
# sequential and random I/O on /dev/vda, then TCP to the board (MODE=full: random writes and
# TCP round trips too; MODE=disk: the disk alone).
# Every disk of each order in turn, a sequential and a random read each.
read_rounds() { # "ORDER"...
	for order in "$@"; do
		for d in $order; do
			/iobench seq-read /dev/$d "$IOB_MIB" | sed "s/@@ VALUE /@@ VALUE $d /"
			/iobench rand-read /dev/$d 5 | sed "s/@@ VALUE /@@ VALUE $d /"
		done
	done
}
if [ "$MODE" = ab ]; then
	value vda_sectors "$(cat /sys/block/vda/size)"
	value vdb_sectors "$(cat /sys/block/vdb/size)"
	for d in vda vdb; do /iobench seq-write /dev/$d "$IOB_MIB" >/dev/null; done
	# Five rounds; which disk goes first alternates, so neither always runs on a warmer cache.
	read_rounds "vda vdb" "vdb vda" "vda vdb" "vdb vda" "vda vdb"
elif [ "$MODE" = abc ]; then
	# Three disks (`bench vhost`): the order rotates, so each goes first, second and last.
	for d in vda vdb vdc; do
		value "${d}_sectors" "$(cat /sys/block/$d/size)"
		/iobench seq-write /dev/$d "$IOB_MIB" >/dev/null
	done
	read_rounds "vda vdb vdc" "vdb vdc vda" "vdc vda vdb" "vda vdb vdc" "vdb vdc vda"
	# The same 64 MiB file from ext4 on vdd (qemu-storage-daemon's vhost-user-blk) and from
	# virtio-fs (virtiofsd), in alternation, the page cache emptied before each read.
	mkdir -p /mnt/blk /mnt/fs
	check fs_bench_mounts sh -c 'mount -o ro /dev/vdd2 /mnt/blk && mount -t virtiofs share /mnt/fs'
	# Two unmeasured reads of each first: the first rounds ran far slower than the rest
	# (the guest's memory touched for the first time costs most under nested KVM).
	for m in blk fs blk fs; do /iobench file-read /mnt/$m/big.bin >/dev/null; done
	for order in "blk fs" "fs blk" "blk fs" "fs blk" "blk fs"; do
		for m in $order; do
			/iobench file-read /mnt/$m/big.bin | sed "s/@@ VALUE /@@ VALUE $m /"
		done
	done
	umount /mnt/blk /mnt/fs
else
	/iobench seq-write /dev/vda "$IOB_MIB"
	/iobench seq-read /dev/vda "$IOB_MIB"
	# The board may count what the VMMs do meanwhile: it reads its counters on each mark, while
	# this waits.
	echo "@@ MARK rand-read"
	sleep 2
	/iobench rand-read /dev/vda "$IOB_SECONDS"
	echo "@@ MARK rand-read done"
	sleep 2
	[ "$MODE" = full ] && /iobench rand-write /dev/vda "$IOB_SECONDS"
	# MODE=disk: the disk alone (a VM without the board's network).
	[ "$MODE" = disk ] && return 0
	# The board's TAP network, or TCP_ME and TCP_PEER where another VM serves the network.
	ip addr add "${TCP_ME:-10.0.2.15}/24" dev eth0
	ip link set eth0 up
	/iobench tcp-send "${TCP_PEER:-10.0.2.1}" 5000 "$IOB_MIB"
	[ "$MODE" = full ] && /iobench tcp-rr 10.0.2.1 5001 "$IOB_SECONDS"
fi
