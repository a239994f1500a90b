# vhost-user devices served by third-party backends, splitvirt being the frontend; the VM's
# console is "vhost| ". Debian's qemu-storage-daemon (unpacked into the board with its
# libraries) exports the VM's qcow2 root disk and a small raw disk; Debian trixie's virtiofsd
# (with trixie's C library, under /opt/trixie) shares /tmp/share; vhost-device-vsock (built
# from crates.io) bridges the guest's vsock to the Unix socket /tmp/vm3.vsock. Once the
# guest listens on vsock port 1234 (all its devices are started then), an echo crosses it from
# here and each backend's memory maps are read from outside: what it was handed of the guest.
# A second qemu-storage-daemon serves vdc alone: when the guest writes to it without pause, it
# is killed and started again on the same socket, and the guest is told (a line on its
# console) once it is back. The VM powers off by itself; splitvirt's log (a file, read once it
# ended) is "vhost-sv| "; the root image goes back to the host (the outbox).
check kvm_device test -c /dev/kvm
# The board's files come without modes.
chmod 755 /lib/ld-linux-aarch64.so.1 /usr/bin/qemu-storage-daemon /usr/local/bin/vhost-device-vsock \
	/guest/vsockecho /usr/local/bin/vhost-device-console
mkdir -p /tmp/share
echo "$FS_TOKEN" >/tmp/share/from-host.txt
start_virtiofsd /tmp/share /tmp/vhost-fs.sock
/usr/local/bin/vhost-device-vsock --vm guest-cid=3,socket=/tmp/vhost-vsock.sock,uds-path=/tmp/vm3.vsock \
	>/tmp/vsock.log 2>&1 &
vsockd=$!
# vhost-device-console's network backend: the guest's hvc0 is a TCP connection to port 12345
# (taken while the VM boots), where the guest's line arrives.
ip link set lo up
/usr/local/bin/vhost-device-console --socket-path=/tmp/vhost-console.sock --socket-count=1 \
	--backend=network --tcp-port=12345 >/tmp/console.log 2>&1 &
consoled=$!
truncate -s 16M /tmp/vhost-re.img
restart_daemon() { # the daemon of vdc, its pid in $qsd2
	rm -f /tmp/qsd2.pid
	/usr/bin/qemu-storage-daemon \
		--blockdev driver=file,node-name=ref,filename=/tmp/vhost-re.img \
		--blockdev driver=raw,node-name=re,file=ref \
		--export type=vhost-user-blk,id=e3,node-name=re,addr.type=unix,addr.path=/tmp/vhost-re.sock,writable=on \
		--pidfile /tmp/qsd2.pid >>/tmp/qsd2.log 2>&1 &
	qsd2=$!
	i=0
	while [ ! -s /tmp/qsd2.pid ] && [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
}
restart_daemon
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
while { [ ! -s /tmp/qsd.pid ] || [ ! -S /tmp/vhost-fs.sock ] || [ ! -S /tmp/vhost-vsock.sock ] ||
	[ ! -S /tmp/vhost-console.sock0 ]; } && [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
check qsd_started test -s /tmp/qsd.pid
check virtiofsd_started test -S /tmp/vhost-fs.sock
check vsock_backend_started test -S /tmp/vhost-vsock.sock
check console_backend_started test -S /tmp/vhost-console.sock0
sleep 1200 | nc 127.0.0.1 12345 >/tmp/console-out 2>/dev/null &
check qsd2_started test -s /tmp/qsd2.pid
sed 's/^/qsd| /' /tmp/qsd.log
qsd=$(cat /tmp/qsd.pid)
# The VM's console input: a fifo held open here (the line that ends the guest's wait).
mkfifo /tmp/vhost-in
exec 3<>/tmp/vhost-in
( /splitvirt --log-file /tmp/vhost-sv.log run --config /guest/vhost.toml --kernel /guest/Image \
	--cmdline "console=ttyAMA0 loglevel=4 root=/dev/vda2 rw ROOT_TOKEN=$ROOT_TOKEN FS_TOKEN=$FS_TOKEN CONSOLE_TOKEN=$CONSOLE_TOKEN" </tmp/vhost-in
  exited $? /tmp/vhost-sv.log ) 2>&1 | while IFS= read -r l; do
	echo "vhost| $l"
	case "$l" in
	*"@@ VSOCK LISTENING"*) touch /tmp/vsock-listening ;;
	*"@@ WAIT restarted"*) touch /tmp/restart-now ;;
	esac
done &
vm=$!
# Every device is started once the guest listens on vsock: the echo, then what each backend
# maps of the guest.
i=0
while [ ! -e /tmp/vsock-listening ] && [ "$(ps | grep -c '[v]host.toml')" -gt 0 ] &&
	[ "$i" -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
/guest/vsockecho call /tmp/vm3.vsock 1234 4194304
maps() { # NAME PID: the memfds the backend maps, and their ranges
	value "$1_memfd_names" "$(awk '/memfd:/ {print $6}' "/proc/$2/maps" | sort -u | tr '\n' ' ')"
	value "$1_memfd_ranges" "$(awk '/memfd:/ {print $1}' "/proc/$2/maps" | tr '\n' ' ')"
}
maps qsd "$qsd"
maps vsock "$vsockd"
maps console "$consoled"
# virtiofsd: the youngest process running it (a sandbox may fork).
fsd=$(pids_matching libexec/virtiofsd | sort -n | tail -n 1)
maps virtiofsd "${fsd:-$virtiofsd}"
# Every queue's kick is KVM's (an ioeventfd per queue): splitvirt has no thread that replays
# notifications (notifyN) for these devices, which are all it has.
sv=$(pids_matching "run --config /guest/vhost.toml" | tail -n 1)
value sv_threads "$(cat /proc/"$sv"/task/*/comm 2>/dev/null | sort | uniq -c | tr -s ' ' | tr '\n' ',')"
value notify_threads "$(cat /proc/"$sv"/task/*/comm 2>/dev/null | grep -c '^notify')"
# vdc's daemon killed under the guest's writes, and started again on its socket.
i=0
while [ ! -e /tmp/restart-now ] && [ "$(ps | grep -c '[v]host.toml')" -gt 0 ] &&
	[ "$i" -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
check qsd2_killed kill -9 "$qsd2"
wait "$qsd2"
restart_daemon
check qsd2_restarted test -s /tmp/qsd2.pid
echo restarted >&3
i=0
while [ "$(ps | grep -c '[v]host.toml')" -gt 0 ]; do
	sleep 1; i=$((i + 1))
	if [ $i = 600 ]; then hang_report vhost; kill_matching 'vhost.toml'; fi
done
wait $vm
value needs_reset_lines "$(grep -c 'needs reset' /tmp/vhost-sv.log)"
value reconnected_lines "$(grep -c 'vhost-re.sock: connected again' /tmp/vhost-sv.log)"
value uncaught_lines "$(grep -c 'will not catch' /tmp/vhost-sv.log)"
sed 's/^/vhost-sv| /' /tmp/vhost-sv.log
value fs_from_guest "$(cat /tmp/share/from-guest.txt 2>/dev/null)"
value console_out "$(tr -d '\r' </tmp/console-out | grep -m 1 from-guest)"
sed 's/^/consoled| /' /tmp/console.log
sed 's/^/virtiofsd| /' /tmp/virtiofsd.log
sed 's/^/vsockd| /' /tmp/vsock.log
kill "$qsd" "$qsd2" "$vsockd" "$virtiofsd" "$consoled" 2>/dev/null
kill_matching 'nc 127.0.0.1 12345'
kill_matching 'sleep 1200'
i=0
while [ -e "/proc/$qsd" ] && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
outbox /guest vhost-root.qcow2
