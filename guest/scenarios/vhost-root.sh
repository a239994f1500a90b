# Booted with root=/dev/vda2 from a disk that qemu-storage-daemon serves over vhost-user
# (`cargo xtask kvmvhost`): the root file system, a second vhost-user disk read, then that
# second device taken from its driver and programmed by a hostile driver (vqpoke) with its
# rings at the base of RAM, outside the pool; the root disk carries on (a file for the host).
value root_dev "$(awk '$5 == "/" {print $3; exit}' /proc/self/mountinfo)"
value vda2_dev "$(cat /sys/class/block/vda2/dev 2>/dev/null)"
value root_type "$(awk '$2 == "/" && $1 != "rootfs" {print $3; exit}' /proc/mounts)"
value host_file "$(cat /from-host.txt 2>/dev/null)"
value vdb_text "$(head -c 64 /dev/vdb | tr -d '\0')"
# The PCI function under vdb's virtio device: away from its driver, to the hostile one.
dev=$(basename "$(dirname "$(readlink -f /sys/block/vdb/device)")")
value vdb_function "$dev"
echo "$dev" >/sys/bus/pci/drivers/virtio-pci/unbind
chmod +x /vqpoke
/vqpoke "/sys/bus/pci/devices/$dev" 0x40000000
if [ -n "$ROOT_TOKEN" ]; then
	echo "$ROOT_TOKEN" >/from-guest.txt
	sync
fi
value root_after "$(cat /from-guest.txt 2>/dev/null)"
