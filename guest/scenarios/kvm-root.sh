# Booted with root=/dev/vda2 (the seed's command line): the root file system is the disk's
# second partition (/proc/mounts calls it /dev/root; compare device numbers). Settings come as
# environment variables from the kernel command line (NAME=value words the kernel does not know).
value root_dev "$(awk '$5 == "/" {print $3; exit}' /proc/self/mountinfo)"
value vda2_dev "$(cat /sys/class/block/vda2/dev 2>/dev/null)"
value root_type "$(awk '$2 == "/" && $1 != "rootfs" {print $3; exit}' /proc/mounts)"
value host_file "$(cat /from-host.txt 2>/dev/null)"
value msi_irqs "$(grep -c -i msi /proc/interrupts)"
# A TCP transfer to the VM at the other end of a socket link (LINK_ROLE listen or send):
# 4 MiB of random bytes, hashed on both sides.
if [ -n "$LINK_ROLE" ]; then
	check eth0 test -e /sys/class/net/eth0
	ip addr add "$LINK_ME/24" dev eth0
	ip link set eth0 up
	if [ "$LINK_ROLE" = listen ]; then
		# nc ends a connection when its stdin ends: keep stdin open.
		(sleep 900 | nc -l -p 5001 >/tmp/rx.bin) &
		i=0
		while [ "$(wc -c </tmp/rx.bin 2>/dev/null || echo 0)" -lt 4194304 ] && [ $i -lt 1200 ]; do
			sleep 0.5
			i=$((i + 1))
		done
		value link_rx_sha "$(sha256sum /tmp/rx.bin | cut -d' ' -f1)"
	else
		dd if=/dev/urandom of=/tmp/tx.bin bs=64k count=64 2>/dev/null
		value link_tx_sha "$(sha256sum /tmp/tx.bin | cut -d' ' -f1)"
		i=0
		until nc "$LINK_PEER" 5001 </tmp/tx.bin 2>/dev/null; do
			i=$((i + 1))
			[ $i -gt 300 ] && break
			sleep 1
		done
		[ $i -le 300 ] && result link_sent PASS
		# Stay up while the listener hashes and prints: our power-off makes its splitvirt log
		# "peer went away", and two writers on one console can interleave inside a line.
		sleep 20
	fi
fi
# A file for the host to find in the image after power-off.
if [ -n "$ROOT_TOKEN" ]; then
	echo "$ROOT_TOKEN" >/from-guest.txt
	sync
fi
