# One side of a cross-VM connector (ROLE=ping or pong from the kernel command line): load the
# guest's `connection` module, find the UIO device by its name, then exchange messages with the
# other VM over the dataport, woken by the connector's events.
check insmod insmod /connection.ko
value uio_name "$(cat /sys/class/uio/uio0/name 2>/dev/null)"
value uio_maps "$(ls /sys/class/uio/uio0/maps 2>/dev/null | tr '\n' ' ')"
# First the Rust library's channel through its CLI, one message each way (ping is side a,
# pong side b; each receives from the other's ring).
if [ "$ROLE" = ping ]; then
	/conn send chan a "hello-from-a" && result conn_send PASS
	value conn_reply "$(/conn recv chan a 120)"
else
	value conn_message "$(/conn recv chan b 120)"
	/conn send chan b "hello-from-b" && result conn_send PASS
fi
if [ "$ROLE" = ping ]; then
	/conntest seed
	/conntest ping "$ROUNDS"
else
	/conntest pong "$ROUNDS"
fi
