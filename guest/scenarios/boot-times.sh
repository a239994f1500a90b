# Inside a VM of `cargo xtask bench qemu`: the guest's own clock, from its kernel log (kept
# whatever the console's loglevel): uptime at init, the kernel's boot (its stamp at "Freeing
# unused kernel memory") and, where there is a disk, its probe (from the PCI host bridge's
# first line to the disk's).
value up "$(cut -d' ' -f1 /proc/uptime)"
stamp() { dmesg | grep -m1 "$1" | sed 's/^\[ *\([0-9.]*\)\].*/\1/'; }
value kernel_boot_s "$(stamp 'Freeing unused kernel memory')"
bridge=$(stamp 'PCI host bridge to bus')
disk=$(stamp 'virtio_blk virtio.*\[vda\]')
[ -n "$bridge" ] && [ -n "$disk" ] && value probe_ms "$(awk "BEGIN { printf \"%.0f\", ($disk - $bridge) * 1000 }")"
# Where the kernel's boot waits: every log line that came 20 ms or more after the one before.
dmesg | awk -F'[][]' '{ t = $2 + 0; if (NR > 1 && t - last >= 0.02) printf "@@ GAP %.3f %.3f %s\n", t - last, t, $3; last = t }'
