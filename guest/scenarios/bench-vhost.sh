# `cargo xtask bench vhost`: one VM with three raw disks on the board's RAM-backed root, read
# in rotation by its guest (MODE=abc): vda in splitvirt's process, vdb in the backend process,
# vdc served by Debian's qemu-storage-daemon over vhost-user. Then a 64 MiB file read from ext4
# on vdd (the daemon again) and from virtio-fs (virtiofsd sharing the same file) in
# alternation. Console "abc| ".
check kvm_device test -c /dev/kvm
# The board's files come without modes.
chmod 755 /lib/ld-linux-aarch64.so.1 /usr/bin/qemu-storage-daemon
mkdir -p /tmp/share
mv /guest/big.bin /tmp/share/big.bin
start_virtiofsd /tmp/share /tmp/vhost-fs.sock
truncate -s 96M /tmp/ab-in.raw
truncate -s 128M /tmp/ab-backend.raw
truncate -s 160M /tmp/abc-vhost.raw
/usr/bin/qemu-storage-daemon \
	--blockdev driver=file,node-name=f,filename=/tmp/abc-vhost.raw \
	--blockdev driver=raw,node-name=d,file=f \
	--export type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=/tmp/vhost-abc.sock,writable=on \
	--blockdev driver=file,node-name=ff,filename=/guest/bench-fs.img \
	--blockdev driver=raw,node-name=fd,file=ff \
	--export type=vhost-user-blk,id=ef,node-name=fd,addr.type=unix,addr.path=/tmp/vhost-fsblk.sock \
	--pidfile /tmp/qsd.pid &
i=0
while { [ ! -s /tmp/qsd.pid ] || [ ! -S /tmp/vhost-fs.sock ]; } && [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
check qsd_started test -s /tmp/qsd.pid
check virtiofsd_started test -S /tmp/vhost-fs.sock
/splitvirt run --config /guest/bench-abc.toml --kernel /guest/Image --initrd /guest/initrd.cpio \
	--cmdline "console=ttyAMA0 loglevel=4 MODE=abc" </dev/null 2>&1 |
	while IFS= read -r l; do echo "abc| $l"; done
kill "$(cat /tmp/qsd.pid)" "$virtiofsd" 2>/dev/null
