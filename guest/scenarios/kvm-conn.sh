# One side of a cross-VM connector (ROLE=ping or pong from the kernel command line): load the
# guest's `connection` module, find the UIO device by its name, then exchange messages with the
# other VM over the dataport, woken by the connector's events.
check insmod insmod /connection.ko
value uio_name "$(cat /sys/class/uio/uio0/name 2>/dev/null)"
value uio_maps "$(ls /sys/class/uio/uio0/maps 2>/dev/null | tr '\n' ' ')"
if [ "$ROLE" = ping ]; then
	/conntest seed
	/conntest ping "$ROUNDS"
else
	/conntest pong "$ROUNDS"
fi
