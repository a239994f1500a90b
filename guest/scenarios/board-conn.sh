# Two VMs on KVM joined by two cross-VM connectors; consoles "ping| ", "pong| ". In MODE=test
# the pong VM is killed mid-exchange and another ("pong2| ") takes its place. Each splitvirt
# logs to a file of its own (/tmp/NAME-sv.log), read once it has ended.
check kvm_device test -c /dev/kvm
# The connectors' sockets and dataport files live in /tmp: a tmpfs that gives the dataports
# 2 MiB pages, as the README recommends.
mount -t tmpfs -o huge=within_size tmpfs /tmp
# The floor the event round trip is measured against: two processes of the board ping-ponging
# over eventfds, in the same run.
# How long the board's KVM polls a halted vCPU by default (a description's halt_poll_us
# overrides it for its VM).
value halt_poll_ns "$(cat /sys/module/kvm/parameters/halt_poll_ns)"
if [ "$MODE" = bench ]; then
	chmod +x /roundtrip
	value eventfd_floor_us "$(/roundtrip only eventfd 2000 | awk '{print $3}')"
	value spin_floor_us "$(/roundtrip only spin 2000 | awk '{print $3}')"
fi
vm() { # ROLE PREFIX
	( /splitvirt --log-file "/tmp/$2-sv.log" run --config /guest/conn.toml --kernel /guest/Image --initrd /guest/conn.cpio \
		--cmdline "console=ttyAMA0 loglevel=4 ROLE=$1 ROUNDS=$ROUNDS MODE=$MODE STORM=$STORM" </dev/null &
	  echo $! >"/tmp/$2.pid"
	  wait $!
	  exited $? "/tmp/$2-sv.log" ) 2>&1 | while IFS= read -r l; do
		echo "$2| $l"
		case "$l" in *"@@ VALUE phase restart"*) touch /tmp/restart-now ;; esac
	done &
}
# TRACE=faults: each VM's stage-2 faults and exits over the whole run.
[ "$TRACE" = faults ] && kvm_faults_start
vm pong pong
vm ping ping
if [ "$TRACE" = faults ]; then
	sleep 5
	for v in ping pong; do vcpu_tids "$(cat /tmp/$v.pid)" >/tmp/faults-$v; done
	# Memory left, huge pages, and the kernel's reclaim at work, once both VMs are busy.
	( sleep 60
	  echo "@@ FAULTS memory $(awk '/MemFree|MemAvailable|ShmemHugePages|ShmemPmdMapped/ {printf "%s %s ", $1, $2}' /proc/meminfo) $(awk '/^pgscan_kswapd|^pgscan_direct|^thp_/ && $2 > 0 {printf "%s %s ", $1, $2}' /proc/vmstat)" ) &
fi
if [ "$MODE" = test ]; then
	n=0
	while [ ! -e /tmp/restart-now ] && [ $n -lt 1200 ]; do sleep 1; n=$((n + 1)); done
	sleep 3
	check pong_killed kill -9 "$(cat /tmp/pong.pid)"
	sleep 2
	vm repong pong2
fi
wait
[ "$TRACE" = faults ] && kvm_faults_report ping pong
# What the survivor's splitvirt said of its peer: gone, then attached again.
value ping_peer_gone "$(grep -c 'peer went away' /tmp/ping-sv.log)"
value ping_peer_back "$(awk '/peer went away/ {gone = 1} gone && /peer attached/ {back = 1} END {print back ? "yes" : "no"}' /tmp/ping-sv.log)"
