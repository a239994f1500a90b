# Booted with root=/dev/vda2 from a disk that qemu-storage-daemon serves over vhost-user
# (`cargo xtask kvmvhost`): the root file system, a second vhost-user disk read, then that
# second device taken from its driver and programmed by a hostile driver (vqpoke) with its
# rings at the base of RAM, outside the pool; the root disk carries on (a file for the host).
value root_dev "$(awk '$5 == "/" {print $3; exit}' /proc/self/mountinfo)"
value vda2_dev "$(cat /sys/class/block/vda2/dev 2>/dev/null)"
value root_type "$(awk '$2 == "/" && $1 != "rootfs" {print $3; exit}' /proc/mounts)"
value host_file "$(cat /from-host.txt 2>/dev/null)"
value vdb_text "$(head -c 64 /dev/vdb | tr -d '\0')"
# virtio-fs from virtiofsd: a file of the host's read, one written that the host finds.
mkdir -p /share
check fs_mount mount -t virtiofs share /share
value fs_host_file "$(cat /share/from-host.txt 2>/dev/null)"
[ -n "$FS_TOKEN" ] && echo "$FS_TOKEN-from-guest" >/share/from-guest.txt
umount /share
# virtio-console from vhost-device-console: a line out to the board. (Not one back:
# vhost-device-console 0.1.0 adds a used element for every byte it writes into a receive
# buffer, so that the driver takes the buffer again and again, "a", "ab", "abc"...)
check console_hvc0 test -c /dev/hvc0
stty -F /dev/hvc0 raw -echo 2>/dev/null
echo "$CONSOLE_TOKEN-from-guest" >/dev/hvc0
# vsock through vhost-device-vsock: the board sends 4 MiB to port 1234, echoed back.
chmod +x /vsockecho
/vsockecho listen 1234
# vdc's daemon is killed and started again while this writes to it without pause, 4 KiB
# direct writes one at a time: none fails (the one waiting meanwhile goes to the new daemon),
# and what was written reads back.
mount -t tmpfs tmpfs /tmp
dd if=/dev/urandom of=/tmp/re bs=64k count=16 2>/dev/null
( n=0 bad=0
  while [ ! -e /tmp/re-stop ]; do
	dd if=/tmp/re of=/dev/vdc bs=4k oflag=direct conv=fsync 2>/dev/null || bad=$((bad + 1))
	n=$((n + 1))
  done
  value re_writes "$n"
  value re_failed "$bad" ) &
writer=$!
wait_for_board restarted
touch /tmp/re-stop
wait "$writer"
echo 3 >/proc/sys/vm/drop_caches
value re_sha "$(sha256sum </tmp/re | cut -d' ' -f1)"
value re_read_sha "$(dd if=/dev/vdc bs=64k count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
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
