# splitvirt's backend process is killed while this guest writes to its disk (a device in the
# backend). splitvirt must stay up: the UART (in splitvirt's own process) keeps working, the
# writes in flight fail, and a new backend takes the disk over where it stood.
( i=0
  while [ $i -lt 100000 ]; do
	dd if=/dev/zero of=/dev/vda bs=64k count=16 seek=$((i % 8 * 16)) conv=fsync 2>/dev/null ||
		{ echo "@@ VALUE dd_error yes"; break; }
	i=$((i + 1))
  done ) &
writer=$!
sleep 3
echo "@@ READY-KILL"
if read -t 120 line; then value after_kill "$line"; fi
kill "$writer" 2>/dev/null
wait "$writer" 2>/dev/null
# The restarted backend serves the same disk: a pattern written, written back, dropped from
# the page cache and read again from the device. (Not `conv=fsync`: the first fsync after the
# failed writes may report their error, which Linux keeps for the next one to look.)
sleep 5
dd if=/dev/urandom of=/tmp/pattern bs=64k count=4 2>/dev/null
if dd if=/tmp/pattern of=/dev/vda bs=64k seek=96 count=4 2>/dev/null; then
	sync
	echo 3 >/proc/sys/vm/drop_caches
	dd if=/dev/vda of=/tmp/back bs=64k skip=96 count=4 2>/dev/null
	if cmp -s /tmp/pattern /tmp/back; then value after_restart ok; else value after_restart differs; fi
else
	value after_restart write-failed
fi
value alive yes
echo "@@ DONE"
poweroff -f -n
