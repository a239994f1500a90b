# The demo in the board: splitvirt boots the driver VM on KVM with its disk and console in the
# backend process. Guest console lines are prefixed "vm| "; what splitvirt logs goes to its own
# file. The backend is looked at from outside while the guest runs.
check kvm_device test -c /dev/kvm
up() { cut -d' ' -f1 /proc/uptime; }
backend_pid() { ps | awk '/[s]plitvirt-backend|[s]plitvirt backend/ {print $1; exit}'; }
( i=0
  while [ -z "$(backend_pid)" ] && [ "$i" -lt 600 ]; do sleep 0.2; i=$((i + 1)); done
  pid=$(backend_pid)
  sleep 2
  [ -n "$pid" ] || exit 0
  value backend_maps "$(grep -c . "/proc/$pid/maps")"
  value backend_pool_maps "$(grep -c splitvirt-pool "/proc/$pid/maps")"
  value backend_ram_maps "$(grep -c splitvirt-ram "/proc/$pid/maps")"
  value backend_uid "$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")"
  value backend_capeff "$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")"
  value backend_seccomp "$(awk '/^Seccomp:/ {print $2}' "/proc/$pid/status")"
  value backend_nonewprivs "$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$pid/status")"
  value backend_fds "$(ls "/proc/$pid/fd" | wc -l)" ) &
t0=$(up)
echo "demo: starting splitvirt (devices in its backend process)"
if [ -n "$DEMO_SHELL" ]; then
	/splitvirt --log-file /tmp/sv.log run --config /guest/demo.toml --kernel /guest/Image \
		--cmdline "console=ttyAMA0 root=/dev/vda2 rw loglevel=4 DEMO_SHELL=1"
	value splitvirt_exit $?
else
	( /splitvirt --log-file /tmp/sv.log run --config /guest/demo.toml --kernel /guest/Image \
		--cmdline "console=ttyAMA0 root=/dev/vda2 rw loglevel=4" </dev/null
	  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do
		case "$l" in *"@@ INIT started"*) value init_ms "$(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%d", (b - a) * 1000 }')" ;; esac
		echo "vm| $l"
	done
fi
wait
sed 's/^/svlog| /' /tmp/sv.log
