# Inside the device VM: the connection module gives the rpc-port as a UIO device; the
# backend serves the driver VM described in /driver.toml from this VM's own disk (/dev/vda),
# once per connection of the driver VM's splitvirt, CONNECTIONS times.
check insmod insmod /connection.ko
uio=$(for d in /sys/class/uio/uio*; do [ "$(cat "$d/name")" = rpc-port ] && echo "$d"; done)
value port_maps "$(cat "$uio"/maps/map*/size 2>/dev/null | tr '\n' ' ')"
port=$(basename "$(readlink "$uio/device")")
value port_function "$port"
value own_disk_sectors "$(cat /sys/block/vda/size)"
echo "@@ PORT READY"
i=0
while [ "$i" -lt "$CONNECTIONS" ]; do
	/splitvirt backend --port "$port" --config /driver.toml
	value "backend_exit_$i" "$?"
	i=$((i + 1))
done
