# splitvirt and QEMU/KVM side by side (`cargo xtask bench qemu`): ROUNDS rounds; in each, every
# test boots the same guest under QEMU, splitvirt with its devices in-process and splitvirt with
# them in the backend, in an order that rotates from round to round. /stamp times each VMM on
# the board's clock, from exec to the guest's "@@ INIT started" and to the VMM's end.
chmod 755 /lib/ld-linux-aarch64.so.1 /usr/bin/qemu-system-aarch64 /stamp
export LD_LIBRARY_PATH=/lib/aarch64-linux-gnu
/usr/bin/qemu-system-aarch64 --version | head -1
insmod /tun.ko
# vhost-net for the QEMU runs that use it (its modules in dependency order).
for m in tap vhost_iotlb vhost vhost_net; do insmod "/$m.ko" || echo "no $m module"; done
# splitvirt's pool on hugetlb pages, as the README recommends (QEMU's RAM, pool included, is
# anonymous memory on transparent huge pages).
echo 40 >/proc/sys/vm/nr_hugepages
tap_network
nc -ll -p 5001 -e /bin/cat &
truncate -s 64M /tmp/boot.raw

modern=disable-legacy=on,iommu_platform=on
verbose="console=ttyAMA0 earlycon=pl011,0x9000000"
quiet="console=ttyAMA0 quiet"
qemu() { # qemu CMDLINE INITRD [QEMU ARGS...]
	c=$1 i=$2; shift 2
	/stamp '@@ INIT started' /usr/bin/qemu-system-aarch64 -M virt,gic-version=2,highmem=off \
		-accel kvm -cpu host -smp 2 -m 512 -nodefaults -no-user-config -display none \
		-serial stdio -monitor none -no-reboot -kernel /guest/Image -initrd "$i" \
		-dtb /guest/qemu-virt.dtb -append "$c" "$@" </dev/null
}
sv() { # sv CONFIG CMDLINE INITRD
	# A VM that has not ended in 10 minutes hangs: say where each splitvirt thread waits, end it.
	start_watchdog 600 "$1"
	/stamp '@@ INIT started' /splitvirt run --stats --config "/guest/$1.toml" --kernel /guest/Image \
		--initrd "$3" --cmdline "$2" </dev/null
	kill "$watchdog" 2>/dev/null
}
blk() { echo "-drive file=$1,format=$2,if=none,id=d0,aio=threads,cache=none -device virtio-blk-pci,drive=d0,addr=1.0,$modern"; }
# Every I/O run starts from an empty disk: no run finds blocks or clusters an earlier one
# allocated.
fresh() { rm -f /tmp/io.raw /tmp/io.qcow2; truncate -s 256M /tmp/io.raw; cp /guest/empty.qcow2 /tmp/io.qcow2; }
qemu_io() { # qemu_io IMAGE FORMAT VHOST
	qemu "$quiet MODE=full" /guest/initrd.cpio $(blk "$1" "$2") \
		-netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=$3 \
		-device virtio-net-pci,netdev=n0,addr=2.0,romfile=,$modern \
		-device virtio-serial-pci,addr=3.0,$modern -chardev null,id=vc0 -device virtconsole,chardev=vc0
}
one() { # one TEST VMM
	case "$1-$2" in
	quiet-qemu) qemu "$quiet" /guest/boot.cpio ;;
	quiet-sv*) sv bare "$quiet" /guest/boot.cpio ;;
	verbose-qemu) qemu "$verbose" /guest/boot.cpio $(blk /tmp/boot.raw raw) ;;
	verbose-sv*) sv disk "$verbose" /guest/boot.cpio ;;
	io-qemu) fresh; qemu_io /tmp/io.raw raw off ;;
	io-qemuvh) fresh; qemu_io /tmp/io.raw raw on ;;
	io-sv*) fresh; sv "io-$2" "$quiet MODE=full" /guest/initrd.cpio ;;
	ioq-qemu) fresh; qemu_io /tmp/io.qcow2 qcow2 off ;;
	ioq-sv*) fresh; sv "ioq-$2" "$quiet MODE=full" /guest/initrd.cpio ;;
	esac
}
i=0
while [ "$i" -lt "$ROUNDS" ]; do
	i=$((i + 1))
	case $((i % 3)) in
	1) order="qemu qemuvh svin svbe" ;;
	2) order="svbe qemu qemuvh svin" ;;
	0) order="svin svbe qemuvh qemu" ;;
	esac
	for test in ${TESTS:-quiet verbose io ioq}; do
		for vmm in $order; do
			# The quiet and verbose boots have no in-process devices to tell apart; vhost-net
			# is measured once, with the raw disk.
			case "$test-$vmm" in quiet-svin | verbose-svin | *-qemuvh) [ "$test-$vmm" = io-qemuvh ] || continue ;; esac
			# TRACE=faults: the boots' stage-2 faults and exits, counted by the board's KVM.
			case "$TRACE-$test" in faults-quiet | faults-verbose) kvm_faults_start ;; esac
			one "$test" "$vmm" 2>&1 | while IFS= read -r l; do echo "$test-$vmm$i| $l"; done
			case "$TRACE-$test" in faults-quiet | faults-verbose) kvm_faults_report "$test-$vmm$i" ;; esac
		done
	done
done
echo 0 >/proc/sys/vm/nr_hugepages
