# vhost-user devices served by Debian's qemu-storage-daemon (unpacked into the board with its
# libraries), splitvirt being the frontend; the VM's console is "vhost| ". The daemon exports
# the VM's qcow2 root disk and a small raw disk. Once the guest's driver started the root
# disk, the daemon's memory maps are read from outside: what it was handed of the guest. The
# VM powers off by itself; splitvirt's log (a file, read once it ended) is "vhost-sv| "; the
# root image goes back to the host (the outbox).
check kvm_device test -c /dev/kvm
# The board's files come without modes.
chmod 755 /lib/ld-linux-aarch64.so.1 /usr/bin/qemu-storage-daemon
/usr/bin/qemu-storage-daemon \
	--blockdev driver=file,node-name=rootf,filename=/guest/vhost-root.qcow2 \
	--blockdev driver=qcow2,node-name=root,file=rootf \
	--blockdev driver=file,node-name=twof,filename=/guest/vhost-two.img \
	--blockdev driver=raw,node-name=two,file=twof \
	--export type=vhost-user-blk,id=e1,node-name=root,addr.type=unix,addr.path=/tmp/vhost-root.sock,writable=on \
	--export type=vhost-user-blk,id=e2,node-name=two,addr.type=unix,addr.path=/tmp/vhost-two.sock,writable=on \
	--pidfile /tmp/qsd.pid >/tmp/qsd.log 2>&1 &
# The daemon writes its pid file once its exports listen.
i=0
while [ ! -s /tmp/qsd.pid ] && [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
check qsd_started test -s /tmp/qsd.pid
sed 's/^/qsd| /' /tmp/qsd.log
qsd=$(cat /tmp/qsd.pid)
( /splitvirt --log-file /tmp/vhost-sv.log run --config /guest/vhost.toml --kernel /guest/Image \
	--cmdline "console=ttyAMA0 loglevel=4 root=/dev/vda2 rw ROOT_TOKEN=$ROOT_TOKEN" </dev/null
  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do echo "vhost| $l"; done &
vm=$!
# The memory table arrives when the guest's driver starts the root disk's queue.
i=0
while ! grep -q 'memfd:' "/proc/$qsd/maps" 2>/dev/null && [ "$(ps | grep -c '[v]host.toml')" -gt 0 ] &&
	[ "$i" -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
value qsd_memfd_names "$(awk '/memfd:/ {print $6}' "/proc/$qsd/maps" | sort -u | tr '\n' ' ')"
value qsd_memfd_ranges "$(awk '/memfd:/ {print $1}' "/proc/$qsd/maps" | tr '\n' ' ')"
i=0
while [ "$(ps | grep -c '[v]host.toml')" -gt 0 ]; do
	sleep 1; i=$((i + 1))
	if [ $i = 600 ]; then hang_report vhost; kill_matching 'vhost.toml'; fi
done
wait $vm
value needs_reset_lines "$(grep -c 'needs reset' /tmp/vhost-sv.log)"
sed 's/^/vhost-sv| /' /tmp/vhost-sv.log
kill "$qsd"
i=0
while [ -e "/proc/$qsd" ] && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
outbox /guest vhost-root.qcow2
