# splitvirt's backend process is killed while this guest writes to its disk (a device in the
# backend). splitvirt must stay up: the UART (in splitvirt's own process) keeps working.
( i=0
  while [ $i -lt 100000 ]; do
	dd if=/dev/zero of=/dev/vda bs=64k count=16 seek=$((i % 8 * 16)) conv=fsync 2>/dev/null ||
		{ echo "@@ VALUE dd_error yes"; break; }
	i=$((i + 1))
  done ) &
sleep 3
echo "@@ READY-KILL"
if read -t 120 line; then value after_kill "$line"; fi
sleep 20
value alive yes
# The disk's writes will never complete: power off without the sync that would wait for them.
echo "@@ DONE"
poweroff -f -n
