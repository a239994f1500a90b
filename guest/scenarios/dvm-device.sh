# Inside the device VM: the connection module gives the rpc-port as a UIO device; the
# backend serves the driver VM described in /driver.toml from this VM's own disk (/dev/vda)
# and network (tap0, made by the backend: it gets 10.0.5.1 here), once per connection of the
# driver VM's splitvirt, CONNECTIONS times. The 4 MiB the driver VM sends to port 5000 are
# hashed.
check insmod insmod /connection.ko
uio=$(for d in /sys/class/uio/uio*; do [ "$(cat "$d/name")" = rpc-port ] && echo "$d"; done)
value port_maps "$(cat "$uio"/maps/map*/size 2>/dev/null | tr '\n' ' ')"
port=$(basename "$(readlink "$uio/device")")
value port_function "$port"
value own_disk_sectors "$(cat /sys/block/vda/size)"
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
echo "@@ PORT READY"
i=0
while [ "$i" -lt "$CONNECTIONS" ]; do
	/splitvirt backend --port "$port" --config /driver.toml
	value "backend_exit_$i" "$?"
	i=$((i + 1))
done
