# Inside the second driver VM, served by the same device VM from another disk of its own (a
# virtio-pmem image, /dev/pmem0 in the device VM): what
# it finds at sector 2048 before writing ("x" and nothing: not the first driver VM's token,
# which is on the other disk), then its own token written and read back. Then it waits for the
# board's line, which comes once the first driver VM waits too, and both write and read 2 MiB
# at once.
value before "x$(dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | tr -d '\0' | head -n 1)"
printf 'splitvirt-device-vm-2 %s\n' "$TOKEN" >/tmp/token
check token_write dd if=/tmp/token of=/dev/vda bs=512 seek=2048 conv=sync,fsync
echo 3 >/proc/sys/vm/drop_caches
value token_read "$(dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -n 1)"
# Both driver VMs at once, each on its own disk of the device VM.
wait_for_board both
write_read_back both /dev/vda 8 2
