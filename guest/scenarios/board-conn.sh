# Two VMs on KVM joined by a cross-VM connector at /tmp/conn.sock; consoles "ping| ", "pong| ".
check kvm_device test -c /dev/kvm
for role in pong ping; do
	( /splitvirt run --config /guest/conn.toml --kernel /guest/Image --initrd /guest/conn.cpio \
		--cmdline "console=ttyAMA0 loglevel=4 ROLE=$role ROUNDS=$ROUNDS" </dev/null
	  echo "@@ VALUE splitvirt_exit $?" ) 2>&1 | while IFS= read -r l; do echo "$role| $l"; done &
done
wait
