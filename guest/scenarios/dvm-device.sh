# Inside the device VM: the connection module gives each rpc-port as a UIO device. Per port, a
# backend serves the driver VM described in /driver.toml (the port at 00:02.0) or
# /driver2.toml (00:03.0) from this VM's own disks (/dev/vda; /dev/pmem0, a virtio-pmem image
# where there is one) and network (tap0,
# made by the backend: it gets 10.0.5.1 here), once per connection of that driver VM's
# splitvirt, CONNECTIONS times, polling its queues for POLL_US µs after its last work (unset:
# none); the VM powers off when every port has been served so. The
# 4 MiB a driver VM sends to port 5000 are hashed.
check insmod insmod /connection.ko
ports=$(for d in /sys/class/uio/uio*; do
	[ "$(cat "$d/name")" = rpc-port ] && basename "$(readlink "$d/device")"
done | sort | tr '\n' ' ')
value ports "$ports"
value port_maps "$(cat /sys/class/uio/uio0/maps/map*/size 2>/dev/null | tr '\n' ' ')"
[ -e /sys/block/pmem0/size ] && value pmem0_bytes "$(($(cat /sys/block/pmem0/size) * 512))"
( while :; do
	if [ -e /sys/class/net/tap0 ] && ! ip addr show dev tap0 | grep -q 10.0.5.1; then
		ip addr add 10.0.5.1/24 dev tap0 && ip link set tap0 up
	fi
	sleep 0.5
  done ) &
# nc ends the connection when its stdin ends: keep it open. The driver VM sends 4 MiB.
( sleep 1500 | nc -l -p 5000 >/tmp/rx ) &
( n=0
  while [ "$(wc -c </tmp/rx 2>/dev/null || echo 0)" -lt 4194304 ] && [ $n -lt 2400 ]; do
	sleep 0.5; n=$((n + 1))
  done
  value tcp_rx_sha "$(sha256sum </tmp/rx | cut -d' ' -f1)" ) &
# The console of the driver VM at 00:02.0, which its backend serves on a socket of this VM
# (where /driver.toml says): a line in, the driver VM's answer out. The line goes again every
# second (what comes before the driver VM opens its console is dropped there) until the answer
# is there. Only the first device VM to serve that console gets an answer; the one that takes
# over after a kill waits in vain.
( n=0
  until [ -S /tmp/dvm-console.sock ] || [ $n -ge 2400 ]; do sleep 0.5; n=$((n + 1)); done
  ( n=0
    while [ $n -lt 1200 ] && ! grep -q pong /tmp/console.out 2>/dev/null; do
	echo ping-console; sleep 1; n=$((n + 1))
    done ) | /splitvirt console /tmp/dvm-console.sock >/tmp/console.out 2>&1 &
  n=0
  until grep -q pong /tmp/console.out 2>/dev/null || [ $n -ge 2400 ]; do sleep 0.5; n=$((n + 1)); done
  value console_rx "$(tr -d '\r' </tmp/console.out | grep -o 'pong-[a-z0-9-]*' | head -n 1)" ) &
serve() { # NAME PORT DESCRIPTION
	i=0
	while [ "$i" -lt "$CONNECTIONS" ]; do
		/splitvirt backend --port "$2" --config "$3" ${POLL_US:+--poll-us "$POLL_US"}
		value "backend_exit_${1}_$i" "$?"
		i=$((i + 1))
	done
}
pids=
for p in $ports; do
	case "$p" in
	*:02.0) serve a "$p" "${A_CONFIG:-/driver.toml}" & ;;
	*) serve b "$p" /driver2.toml & ;;
	esac
	pids="$pids $!"
done
# The ports' interrupts, every 20 s while this runs (for a hang's report).
[ "$KILL" = 1 ] && ( while sleep 20; do
	echo "diag: $(grep -i rpc-port /proc/interrupts | tr -s ' ' | tr '\n' '|')"
  done ) &
# With DIAG=1, after 5 minutes and every 30 s then, what this VM's threads wait on (a hang's
# report from inside).
[ "$DIAG" = 1 ] && ( sleep 300; while :; do
	for t in /proc/[0-9]*/task/*; do
		echo "diag: $(cat "$t/comm" 2>/dev/null) $(cut -d' ' -f3 "$t/stat" 2>/dev/null) $(cat "$t/wchan" 2>/dev/null)"
	done | grep -v " I \| S do_sys_poll\| S worker_thread"
	dmesg | tail -5 | sed 's/^/diag: /'
	sleep 30
  done ) &
echo "@@ PORT READY"
for p in $pids; do wait "$p"; done
# The ports' interrupts as this kernel took them, and as UIO counted them.
value port_irqs "$(grep -i rpc-port /proc/interrupts | tr -s ' ' | tr '\n' '|')"
value port_uio_events "$(cat /sys/class/uio/uio*/event | tr '\n' ' ')"
