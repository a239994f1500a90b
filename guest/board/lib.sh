# Shell helpers of the board's scenarios (sourced by guest/board/init, and by the demo when it
# runs on an arm64 host itself).
result() { echo "@@ RESULT $1 $2 ${3:-}"; }
value() { echo "@@ VALUE $1 $2"; }
check() { name=$1; shift; if "$@"; then result "$name" PASS; else result "$name" FAIL "$*"; fi; }
# Every splitvirt process and thread with where it sleeps in the kernel: printed when a VM
# did not finish in time, so that a hang's log says where each side waits.
hang_report() {
	echo "@@ HANG $1: splitvirt threads (pid tid name state wchan)"
	for t in /proc/[0-9]*/task/[0-9]*; do
		case "$(tr '\0' ' ' <"${t%/task/*}/cmdline" 2>/dev/null)" in *splitvirt*) ;; *) continue ;; esac
		p=${t#/proc/}; p=${p%%/*}
		echo "@@ HANG $p ${t##*/} $(cat "$t/comm" 2>/dev/null) $(awk '/^State:/ {print $2}' "$t/status" 2>/dev/null) $(cat "$t/wchan" 2>/dev/null)"
		# The call it waits in (number and arguments) and its kernel stack.
		echo "@@ HANG   syscall $(cat "$t/syscall" 2>/dev/null)"
		sed 's/^/@@ HANG   /' "$t/stack" 2>/dev/null | head -12
		# A wait on one of the C library's own locks (FUTEX_WAIT_PRIVATE; Rust's locks use
		# FUTEX_WAIT_BITSET): 16 KiB of the user stack from its SP and the page of the
		# lock; xtask's board::print_user_stacks symbolizes the stack.
		set -- $(cat "$t/syscall" 2>/dev/null)
		if [ "$1" = 98 ] && [ "$3" = 0x80 ]; then
			dd if="/proc/$p/mem" bs=16 skip=$(($8 / 16)) count=1024 2>/dev/null | od -An -tx8 -v |
				sed "s/^/@@ STACK ${t##*/} $8 /"
			dd if="/proc/$p/mem" bs=16 skip=$(($2 / 4096 * 256)) count=256 2>/dev/null | od -An -tx8 -v |
				sed "s/^/@@ LOCK ${t##*/} /"
		fi
	done
}
# The exit status of a splitvirt that has just ended, as the value splitvirt_exit. One that died
# of a signal other than SIGKILL (a test's own kill) also gets what the kernel said of its
# fault (the pc and lr, which xtask symbolizes) and the end of its log, as "@@ CRASH" lines.
exited() { # STATUS [LOG]
	value splitvirt_exit "$1"
	{ [ "$1" -gt 128 ] && [ "$1" != 137 ]; } || return 0
	echo "@@ CRASH signal $(($1 - 128))"
	dmesg | grep -A16 -E "unhandled|segfault" | tail -n 40 | sed 's/^/@@ CRASH kernel: /'
	[ -n "$2" ] && tail -n 30 "$2" 2>/dev/null | sed 's/^/@@ CRASH log: /'
	return 0
}
# Sends DIR's FILES back to the host: a tar archive on the outbox disk (its driver is a module
# of the board's kernel), checked as "outbox".
outbox() { # DIR FILES...
	insmod /virtio_blk.ko
	n=0; while [ ! -b /dev/vda ] && [ $n -lt 60 ]; do sleep 0.5; n=$((n + 1)); done
	dir=$1; shift
	check outbox tar -cf /dev/vda -C "$dir" "$@"
}
# The pids of every process but this shell whose command line holds PATTERN, one a line (the
# board's busybox has no pgrep). Read in the shell, so that no process of the search has the
# pattern in its own command line.
pids_matching() {
	for c in /proc/[0-9]*/cmdline; do
		p=${c#/proc/}; p=${p%/cmdline}
		[ "$p" = $$ ] && continue
		case "$(tr '\0' ' ' <"$c" 2>/dev/null)" in *"$1"*) echo "$p" ;; esac
	done
}
# A watchdog: after SECONDS, say where every splitvirt thread waits (hang_report NAME) and end
# the VMs. Its pid in $watchdog: `kill "$watchdog"` ends it, its sleep too (a sleep left
# behind would hold the caller's output pipe open for its whole length).
start_watchdog() { # SECONDS NAME
	( trap 'kill $s 2>/dev/null; exit' TERM
	  sleep "$1" & s=$!
	  wait $s
	  hang_report "$2"
	  kill_matching 'splitvirt run' ) &
	watchdog=$!
}
# Kills (SIGKILL) every process whose command line holds PATTERN: no pkill either.
kill_matching() {
	for p in $(pids_matching "$1"); do kill -9 "$p" 2>/dev/null; done
}
# Debian trixie's virtiofsd (bookworm has none), under /opt/trixie with its own C library,
# sharing DIR at the vhost-user socket SOCKET with the tag "share"; its pid in $virtiofsd.
# --sandbox=chroot: the board's root is an initramfs, where pivot_root cannot work.
start_virtiofsd() { # DIR SOCKET
	chmod 755 /opt/trixie/lib/ld-linux-aarch64.so.1 /opt/trixie/usr/libexec/virtiofsd
	/opt/trixie/lib/ld-linux-aarch64.so.1 --library-path /opt/trixie/lib/aarch64-linux-gnu \
		/opt/trixie/usr/libexec/virtiofsd --socket-path="$2" --shared-dir="$1" \
		--tag=share --sandbox=chroot >/tmp/virtiofsd.log 2>&1 &
	virtiofsd=$!
}
# The process that serves a VM's backend devices: a "splitvirt backend" in a PID namespace of
# its own (two pids on its NSpid line; its keeper outside the jail has one). Unjailed, the
# backend process itself.
backend_pid() { for s in /proc/[0-9]*/status; do
	p=${s#/proc/}; p=${p%/status}
	case "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" in *"splitvirt backend "*) ;; *) continue ;; esac
	n=$(awk '/^NSpid:/ {print NF}' "$s" 2>/dev/null)
	[ "$n" = 3 ] && { echo "$p"; return; }
	[ -z "$first" ] && first=$p
done; [ -n "$first" ] && [ -z "$BACKEND_JAILED" ] && echo "$first"; first=; }
# Waits (at most 120 s) until the jailed backend has its pool mapped and its policy on, then
# prints the values seen from outside.
backend_values() {
	i=0
	while [ "$i" -lt 600 ]; do
		pid=$(BACKEND_JAILED=1 backend_pid)
		[ -n "$pid" ] && grep -q '^Seccomp:.2' "/proc/$pid/status" 2>/dev/null && break
		sleep 0.2; i=$((i + 1))
	done
	[ -n "$pid" ] || return 0
	value backend_maps "$(grep -c . "/proc/$pid/maps")"
	value backend_pool_maps "$(grep -c splitvirt-pool "/proc/$pid/maps")"
	# Shared memory other than the pool and the RPC region (guest RAM is anonymous in splitvirt).
	value backend_other_memory "$(grep /memfd: "/proc/$pid/maps" | grep -vc "splitvirt-pool\|splitvirt-rpc")"
	value backend_uid "$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")"
	value backend_capeff "$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")"
	value backend_seccomp "$(awk '/^Seccomp:/ {print $2}' "/proc/$pid/status")"
	value backend_nonewprivs "$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$pid/status")"
	value backend_fds "$(ls "/proc/$pid/fd" | wc -l)"
	value backend_own_pidns "$([ "$(readlink "/proc/$pid/ns/pid")" != "$(readlink /proc/self/ns/pid)" ] && echo 1 || echo 0)"
	value backend_own_netns "$([ "$(readlink "/proc/$pid/ns/net")" != "$(readlink /proc/self/ns/net)" ] && echo 1 || echo 0)"
	value backend_root_entries "$(ls -A "/proc/$pid/root/" 2>/dev/null | wc -l)"
}

# The board's side of a TAP network: every tap0 a VM's VMM makes (anew for each VM) gets
# 10.0.2.1, and port 5000 takes one TCP connection after another, reading each to its end.
tap_network() {
	( while :; do
		if [ -e /sys/class/net/tap0 ] && ! ip addr show dev tap0 | grep -q 10.0.2.1; then
			ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up
		fi
		sleep 0.5
	  done ) &
	printf '#!/bin/sh\ncat >/dev/null\n' >/tmp/sink.sh
	chmod +x /tmp/sink.sh
	nc -ll -p 5000 -e /tmp/sink.sh &
}

# What splitvirt process PID and its VM have done so far, as "exits kernel threads...": its
# vCPUs' exits to splitvirt for MMIO (KVM's mmio_exit_user), the MMIO writes KVM served itself
# (mmio_exit_kernel: ioeventfds), then NAME=N for each of its threads that is not a vCPU, N its
# context switches so far (each wake-up of that thread is one).
wakes() {
	[ -d /sys/kernel/debug/kvm ] || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
	d=$(ls -d /sys/kernel/debug/kvm/"$1"-* 2>/dev/null | head -n 1)
	printf '%s %s' "$(cat "$d/mmio_exit_user" 2>/dev/null || echo -)" "$(cat "$d/mmio_exit_kernel" 2>/dev/null || echo -)"
	for t in /proc/"$1"/task/*; do
		n=$(cat "$t/comm" 2>/dev/null)
		case "$n" in vcpu*) continue ;; esac
		printf ' %s=%s' "$n" "$(awk '/ctxt_switches/ {s += $2} END {print s}' "$t/status" 2>/dev/null)"
	done
	echo
}

# The board kernel's KVM tracepoints EVENT... traced into an empty 32 MiB buffer per CPU; $t
# is the tracing directory.
trace_kvm() { # EVENT...
	t=/sys/kernel/tracing
	[ -e $t/trace ] || mount -t tracefs tracefs $t 2>/dev/null
	echo 0 >$t/tracing_on
	echo 32768 >$t/buffer_size_kb
	echo >$t/trace
	for e; do echo 1 >$t/events/kvm/$e/enable; done
	echo 1 >$t/tracing_on
}
# Tracing stopped, and how many events the buffer lost: "@@ WHAT overrun N".
trace_stop() { # WHAT
	t=/sys/kernel/tracing
	echo 0 >$t/tracing_on
	echo "@@ $1 overrun $(grep -h overrun $t/per_cpu/cpu*/stats | awk '{s += $2} END {print s}')"
}
# The tracepoints EVENT... off, the buffer emptied.
trace_clear() { # EVENT...
	for e; do echo 0 >$t/events/kvm/$e/enable; done
	echo >$t/trace
}
# An awk function: the thread id of a trace line ("comm-TID [cpu] ...").
trace_tid='function tid_of(line,   i, h) { i = index(line, " ["); h = substr(line, 1, i - 1); sub(/.*-/, "", h); gsub(/ /, "", h); return h }'

# KVM's own account of notifications (bench devvm with TRACE=1): every MMIO write a guest makes
# and every interrupt KVM injects, from the board kernel's tracepoints. An ioeventfd bound to
# another VM's irqfd injects in the writing vCPU's thread, right after its write: the report
# pairs each write with the SPI injection that followed it in the same thread, per address
# (the vCPUs' own timer interrupts are left out).
kvm_trace_start() {
	trace_kvm kvm_mmio vgic_update_irq_pending
}
kvm_trace_report() { # NAME
	trace_stop "TRACE $1:"
	awk -v name="$1" "$trace_tid"'
	/kvm_mmio: mmio write/ {
		p = tid_of($0); for (i = 1; i < NF; i++) if ($i == "gpa") g = $(i + 1)
		if (p in open) alone[open[p]]++
		open[p] = g; writes[g]++; next
	}
	/vgic_update_irq_pending:.*level: 1/ {
		p = tid_of($0); irq = $0; sub(/.*IRQ /, "", irq); sub(/,.*/, "", irq)
		if (irq + 0 < 32) next
		if (p in open) { pair[open[p] " " irq]++; delete open[p] } else other[irq]++
	}
	END {
		for (p in open) alone[open[p]]++
		for (k in pair) { split(k, a, " "); print "@@ TRACE " name ": write " a[1] " x" writes[a[1]] " -> IRQ " a[2] " x" pair[k] ", no injection after x" (alone[a[1]] + 0) }
		for (i in other) print "@@ TRACE " name ": IRQ " i " x" other[i] " from elsewhere"
	}' $t/trace
	trace_clear kvm_mmio vgic_update_irq_pending
}

# Where a request's time goes at queue depth 1 (bench devvm with TRACE=timeline), from the
# board kernel's KVM tracepoints over a driver VM's random reads. A request's cycle runs from
# one completion interrupt injected into the driver VM to the next: the driver's vCPU enters
# its guest again ("wake"), the guest completes the read and submits the next one until its
# vCPU waits in WFI ("driver"), then whoever serves the queue finds the request, reads and
# raises the next completion ("serve"). DRIVER and DEVICE are the splitvirt pids.
timeline_events="kvm_entry kvm_exit kvm_wfx_arm64 kvm_vcpu_wakeup vgic_update_irq_pending kvm_guest_fault"
kvm_timeline_start() { # DRIVER-PID [DEVICE-PID]
	vcpu_tids "$1" >/tmp/timeline-driver
	[ -n "$2" ] && vcpu_tids "$2" >/tmp/timeline-device
	trace_kvm $timeline_events
}
vcpu_tids() { # PID
	for task in /proc/"$1"/task/*; do
		case "$(cat "$task/comm" 2>/dev/null)" in vcpu*) printf '%s ' "${task##*/}" ;; esac
	done
}
kvm_timeline_report() { # NAME
	trace_stop "TIMELINE $1:"
	awk -v name="$1" -v drv="$(cat /tmp/timeline-driver 2>/dev/null)" -v dev="$(cat /tmp/timeline-device 2>/dev/null)" "$trace_tid"'
	BEGIN {
		n = split(drv, a, " "); for (i = 1; i <= n; i++) isdrv[a[i]] = 1
		n = split(dev, a, " "); for (i = 1; i <= n; i++) isdev[a[i]] = 1
	}
	{
		tid = tid_of($0)
		ts = ""; for (k = 2; k < NF; k++) if ($k ~ /^[0-9]+\.[0-9]+:$/) { ts = substr($k, 1, length($k) - 1); ev = $(k + 1); break }
		if (ts == "") next
		ts = ts * 1000000
		cpu = $0; sub(/^[^[]*\[/, "", cpu); sub(/\].*/, "", cpu); cpu += 0
	}
	ev == "vgic_update_irq_pending:" && / level: 1/ && !(tid in isdrv) {
		irq = $0; sub(/.*IRQ /, "", irq); sub(/,.*/, "", irq); irq += 0
		if (irq < 32) next
		if (want == "") { seen[irq]++; if (seen[irq] < 20) next; want = irq }
		if (irq != want) next
		if (t0 != "" && t1 != "" && t2 != "") {
			cycles++; wake += t1 - t0; drive += t2 - t1; serve += ts - t2
			if (td != "") { split_n++; find += td - t2; raise += ts - td }
			dx += ndx; vx += nvx; wk += nwk
			if (ts - t0 > 5000) slow++
		}
		t0 = ts; injcpu = cpu; t1 = ""; t2 = ""; td = ""; ndx = 0; nvx = 0; nwk = 0
		next
	}
	t0 == "" { next }
	ev == "kvm_entry:" && (tid in isdrv) { if (t1 == "") { t1 = ts; if (cpu == injcpu) same++ }; next }
	ev == "kvm_entry:" && (tid in isdev) { devcpu[cpu]++; next }
	ev == "kvm_wfx_arm64:" && (tid in isdrv) { if (t1 != "" && t2 == "") t2 = ts; next }
	ev == "kvm_vcpu_wakeup:" && (tid in isdrv) { if (/poll time/) nwk++; next }
	ev == "kvm_guest_fault:" {
		ipa = $0; sub(/.*ipa /, "", ipa); sub(/,.*/, "", ipa)
		# By 256 MiB of guest-physical space: which region faults.
		region = substr(ipa, 1, length(ipa) - 7)
		if (tid in isdrv) dfault["0x" substr(region, 3) "0000000"]++
		else if (tid in isdev) vfault["0x" substr(region, 3) "0000000"]++
		next
	}
	ev == "kvm_exit:" {
		r = $0; sub(/.*\(/, "", r); sub(/\).*/, "", r); r = $(k + 2) " " r
		if (tid in isdrv) { ndx++; dreason[r]++ }
		else if (tid in isdev) {
			nvx++; vreason[r]++
			# The device VM first data abort once the request is in the ring: its store
			# to the port doorbell (its disk on huge pages faults no more).
			if (t2 != "" && td == "" && r ~ /DABT_LOW/) td = ts
		}
	}
	END {
		if (!cycles) { print "@@ TIMELINE " name ": no cycle (irq " want ")"; exit }
		printf "@@ TIMELINE %s: irq %d, %d cycles, mean %.0f us: wake %.0f, driver %.0f, serve %.0f; per cycle driver exits %.2f, device VM exits %.2f, driver woken while halt-polled %.2f; cycles over 5 ms %d\n", name, want, cycles, (wake + drive + serve) / cycles, wake / cycles, drive / cycles, serve / cycles, dx / cycles, vx / cycles, wk / cycles, slow
		if (split_n) printf "@@ TIMELINE %s: serve split over %d cycles: %.0f us to the device VM doorbell store, %.0f us from it to the injection\n", name, split_n, find / split_n, raise / split_n
		printf "@@ TIMELINE %s: the driver vCPU entered on the injecting CPU %.2f of cycles; device VM vCPU entries by CPU:", name, same / cycles
		for (c in devcpu) printf " %s:%d", c, devcpu[c]
		print ""
		for (r in dfault) printf "@@ TIMELINE %s: driver stage-2 faults at %s.. %.2f\n", name, r, dfault[r] / cycles
		for (r in vfault) printf "@@ TIMELINE %s: device VM stage-2 faults at %s.. %.2f\n", name, r, vfault[r] / cycles
		for (r in dreason) printf "@@ TIMELINE %s: driver exit %s %.2f\n", name, r, dreason[r] / cycles
		for (r in vreason) printf "@@ TIMELINE %s: device VM exit %s %.2f\n", name, r, vreason[r] / cycles
	}' $t/trace
	trace_clear $timeline_events
}

# Stage-2 faults and exits per VM (bench conn with TRACE=faults): every guest abort KVM takes
# (kvm_guest_fault: a first touch, a write to a page mapped read-only, or MMIO) by 256 MiB and
# by MiB of guest-physical space and the pages hit 100 times or more, every exit by its cause
# and every exit to the VMM by its reason, for the vCPU threads listed in /tmp/faults-NAME (see
# vcpu_tids), or for every thread where there is no such list (bench qemu: one VM at a time).
faults_events="kvm_guest_fault kvm_exit kvm_userspace_exit"
kvm_faults_start() {
	trace_kvm $faults_events
}
kvm_faults_report() { # NAME...
	trace_stop FAULTS
	for name in "$@"; do
		awk -v name="$name" -v tids="$(cat "/tmp/faults-$name" 2>/dev/null)" "$trace_tid"'
		BEGIN { n = split(tids, a, " "); for (i = 1; i <= n; i++) mine[a[i]] = 1 }
		n && !(tid_of($0) in mine) { next }
		/kvm_guest_fault:/ {
			ipa = $0; sub(/.*ipa /, "", ipa); sub(/,.*/, "", ipa)
			# By 256 MiB (the address without its last 7 hex digits), and by MiB (5).
			faults[substr(ipa, 3, length(ipa) - 9)]++
			mib[substr(ipa, 3, length(ipa) - 7)]++; total++
			page[substr(ipa, 3, length(ipa) - 5)]++
			next
		}
		/kvm_exit:/ { r = $0; sub(/.*kvm_exit: /, "", r); sub(/ HSR_EC.*\(/, " ", r); sub(/\).*/, "", r); exits[r]++ }
		/kvm_userspace_exit:/ { r = $0; sub(/.*reason /, "", r); sub(/ .*/, "", r); user[r]++ }
		END {
			printf "@@ FAULTS %s: %d guest aborts\n", name, total
			for (b in faults) printf "@@ FAULTS %s: 0x%s0000000.. (256 MiB) %d\n", name, b, faults[b]
			for (b in mib) if (mib[b] >= 256) printf "@@ FAULTS %s: 0x%s00000.. (1 MiB) %d\n", name, b, mib[b]
			# Pages that fault again and again (MMIO, or a mapping KVM keeps losing).
			for (b in page) if (page[b] >= 100) printf "@@ FAULTS %s: page 0x%s000 %d\n", name, b, page[b]
			for (r in exits) printf "@@ FAULTS %s: exit %s %d\n", name, r, exits[r]
			for (r in user) printf "@@ FAULTS %s: to userspace %s %d\n", name, r, user[r]
		}' $t/trace
	done
	trace_clear $faults_events
}
