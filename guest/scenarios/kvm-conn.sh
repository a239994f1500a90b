# One side of two cross-VM connectors, `chan` (64 KiB) and `bulk` (2 MiB; 32 MiB in MODE=bench), as ROLE says: ping
# (side a), pong (side b) or repong (side b again, in a VM started after the first pong was
# killed). MODE=test checks, MODE=bench measures. Each loads the `connection` module; the UIO
# devices are found by name.
check insmod insmod /connection.ko
value uio_names "$(cat /sys/class/uio/uio*/name 2>/dev/null | tr '\n' ' ')"
value uio_maps "$(ls /sys/class/uio/uio0/maps 2>/dev/null | tr '\n' ' ')"
# Connectors whose events come by MSI-X (the peer's VMM raises it through KVM), of two.
value msix_connectors "$(dmesg | grep -c 'events by MSI-X')"
# `conn` prints `key value` lines; they become values named PREFIX_key.
values() { while read -r k v; do value "$1_$k" "$v"; done; }
uio_of() { for d in /sys/class/uio/uio*; do [ "$(cat "$d/name")" = "$1" ] && echo "/dev/${d##*/}"; done; }
case "$ROLE" in
ping)
	# The library's channel through the CLI, one message each way.
	/conn send chan a "hello-from-a" && result conn_send PASS
	value conn_reply "$(/conn recv chan a 120)"
	/conntest seed
	# A plain C program on the seed's mappings: printf of the name, strcpy/memcpy of messages
	# at the end of bulk's dataport, one each way.
	/conntest send bulk -512 plain-from-a
	/conntest recv bulk -256
	# The event page read with a load pair and a vector load (no syndrome for KVM to emulate):
	# it is memory, so they read the name.
	/conntest loads event "$(uio_of chan)" 8
	/conn ping chan "$ROUNDS" | values ping
	if [ "$MODE" = bench ]; then
		# Again with both sides sleeping at once (no polling): every message an interrupt.
		CONN_SPIN_US=0 /conn ping chan "$ROUNDS" | values sleeping
		# And polling for 5 ms, longer than a round trip through interrupts takes here.
		CONN_SPIN_US=5000 /conn ping chan "$ROUNDS" | values longspin
		# 15 MiB chunks: two fill the bench's 32 MiB dataport's bulk area, and each costs one
		# event round trip (milliseconds here) against ~15 ms of copying.
		/conn memcpy 128 15360 | values memcpy
		# The same copies into and out of the dataport with the peer idle.
		/conn alone bulk 128 15360 | values alone
		/conn alone bulk 128 15360 | values alone2
		/conn alone bulk 128 512 | values alone_small
		/conn memcpy 128 512 | values memcpy_small
		/conn stream bulk 128 15360 | values stream
	else
		# A first fill of 512 KiB of the bulk area from a new mapping: no page faults (the
		# module maps it writable and dirty from the start).
		/conn alone bulk 1 256 | values alone
		/conn stream bulk 16 | values stream
	fi
	# A storm of events on bulk, as fast as this vCPU emits them; the peer counts them.
	[ "$(/conn recv chan a 120)" = storm-ready ] && /conntest emit bulk "$STORM"
	/conn send chan a storm-done
	if [ "$MODE" != bench ]; then
		# The host kills the peer VM once it sees this, and starts another.
		value phase restart
		/conn ping chan 3000 | values restart
	fi ;;
pong)
	value conn_message "$(/conn recv chan b 120)"
	/conn send chan b "hello-from-b" && result conn_send PASS
	/conntest recv bulk -512
	/conntest send bulk -256 plain-from-b
	/conn pong chan | values pong
	if [ "$MODE" = bench ]; then
		CONN_SPIN_US=0 /conn pong chan | values sleeping
		CONN_SPIN_US=5000 /conn pong chan | values longspin
	fi
	/conn sink bulk | values sink
	base=$(/conntest events bulk | sed 's/.* //')
	/conn send chan b storm-ready
	[ "$(/conn recv chan b 120)" = storm-done ] &&
		value storm_events "$(($(/conntest events bulk | sed 's/.* //') - base))"
	# The dataport's copies from this side too, the peer done by now.
	if [ "$MODE" = bench ]; then
		/conn memcpy 128 15360 | values memcpy
		/conn alone bulk 128 15360 | values alone
	fi
	# In MODE=test this VM is killed while it answers.
	[ "$MODE" = bench ] || /conn pong chan | values restart ;;
repong)
	/conn pong chan | values restart ;;
esac
