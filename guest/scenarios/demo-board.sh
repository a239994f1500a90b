# The demo on an arm64 host with KVM (the board, or this machine itself): splitvirt boots the
# driver VM with its disk and console in the backend process. Guest console lines are prefixed
# "vm| "; what splitvirt logs goes to its own file. The backend is looked at from outside while
# the guest runs. SV is the splitvirt binary, G the directory with Image, root.img, demo.toml.
SV=${SV:-/splitvirt}
G=${G:-/guest}
LOG=${LOG:-/tmp/sv.log}
check kvm_device test -c /dev/kvm
up() { cut -d' ' -f1 /proc/uptime; }
( backend_values ) &
t0=$(up)
echo "demo: starting splitvirt (devices in its backend process)"
if [ -n "$DEMO_SHELL" ]; then
	"$SV" --log-file "$LOG" run --config "$G/demo.toml" --kernel "$G/Image" \
		--cmdline "console=ttyAMA0 root=/dev/vda2 rw loglevel=4 DEMO_SHELL=1"
	exited $? "$LOG"
else
	( "$SV" --log-file "$LOG" run --config "$G/demo.toml" --kernel "$G/Image" \
		--cmdline "console=ttyAMA0 root=/dev/vda2 rw loglevel=4" </dev/null
	  exited $? "$LOG" ) 2>&1 | while IFS= read -r l; do
		case "$l" in *"@@ INIT started"*) value init_ms "$(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%d", (b - a) * 1000 }')" ;; esac
		echo "vm| $l"
	done
fi
wait
sed 's/^/svlog| /' "$LOG"
