# The board boots splitvirt guests on KVM: the project's kernel, which gets a line typed on
# splitvirt's stdin once it says it is ready (a real UART drops what arrives before the port is
# opened), then Debian's stock kernel. Guest consoles are prefixed "guest| " / "stock| ".
check kvm_device test -c /dev/kvm
# The board's side of the guest's network: tap0 (created by splitvirt) gets 10.0.2.1.
insmod /tun.ko
( i=0
  while [ ! -e /sys/class/net/tap0 ] && [ "$i" -lt 1200 ]; do sleep 0.5; i=$((i + 1)); done
  ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up ) &
mkfifo /tmp/typing
exec 3<>/tmp/typing
( /splitvirt run --config /guest/vm.toml --kernel /guest/Image --initrd /guest/initrd.cpio \
	--cmdline "console=ttyAMA0 earlycon=pl011,0x9000000 loglevel=7" </tmp/typing
  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do
	echo "guest| $l"
	case "$l" in *"@@ READY"*) echo "$TYPED" >&3 ;; esac
done
exec 3>&-
( /splitvirt run --config /guest/vm.toml --kernel /guest/Image --initrd /guest/disk.cpio \
	--cmdline "console=ttyAMA0 loglevel=4" </dev/null
  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do echo "disk| $l"; done
( /splitvirt run --config /guest/root.toml --kernel /guest/Image \
	--cmdline "console=ttyAMA0 earlycon=pl011,0x9000000 root=/dev/vda2 rw" </dev/null
  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do echo "root| $l"; done
( /splitvirt run --config /guest/nodisk.toml --kernel /guest/stock-Image --initrd /guest/stock.cpio \
	--cmdline "console=ttyAMA0 earlycon=pl011,0x9000000" </dev/null
  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do echo "stock| $l"; done
# A guest that does what KVM cannot emulate (an ldp to MMIO): splitvirt must end non-zero and
# show the vCPU's registers.
( /splitvirt run --config /guest/nodisk.toml --kernel /guest/fault-Image --cmdline "" </dev/null
  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do echo "fault| $l"; done
