# The demo's workload inside the driver VM, whose root file system is partition 2 of the disk
# (root=/dev/vda2) that splitvirt's backend process serves.
echo "demo: root file system $(awk '$2 == "/" && $1 != "rootfs" {print $1 " (" $3 ")"; exit}' /proc/mounts)"
# Scratch copies live in RAM, the file under test on the disk.
mount -t tmpfs tmpfs /tmp
up() { cut -d' ' -f1 /proc/uptime; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%d", (b - a) * 1000 }'; }
MIB=16
echo "demo: writing $MIB MiB to /demo.bin and syncing it to the disk"
t0=$(up)
dd if=/dev/urandom of=/tmp/demo.src bs=1M count=$MIB 2>/dev/null
t1=$(up)
dd if=/tmp/demo.src of=/demo.bin bs=1M conv=fsync 2>/dev/null
sync
t2=$(up)
value write_ms "$(ms "$t1" "$t2")"
echo 3 >/proc/sys/vm/drop_caches
echo "demo: reading it back from the disk (page cache dropped)"
t3=$(up)
dd if=/demo.bin of=/tmp/demo.back bs=1M 2>/dev/null
t4=$(up)
value read_ms "$(ms "$t3" "$t4")"
value demo_mib "$MIB"
check readback cmp /tmp/demo.src /tmp/demo.back
rm -f /demo.bin
pool=$(ls -d /sys/kernel/debug/swiotlb@* 2>/dev/null | head -n 1)
echo "demo: restricted DMA pool ${pool#/sys/kernel/debug/}: $(cat "$pool/io_tlb_used") of $(cat "$pool/io_tlb_nslabs") 2 KiB slabs in use"
value pool_used "$(cat "$pool/io_tlb_used")"
value pool_slabs "$(cat "$pool/io_tlb_nslabs")"
echo "demo: the devices' interrupts (/proc/interrupts):"
grep -E 'virtio|uart|pl011|MSI' /proc/interrupts
value virtio_irqs "$(grep -c virtio /proc/interrupts)"
if [ -n "$DEMO_SHELL" ]; then
	echo "demo: a shell in the guest; 'exit' powers the VM off, Ctrl-A x ends splitvirt"
	setsid cttyhack sh
fi
echo "demo: powering off"
