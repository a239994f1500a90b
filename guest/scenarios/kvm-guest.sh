# Inside a splitvirt VM on KVM: CPUs, the device tree splitvirt wrote, and a line typed on
# splitvirt's stdin.
hex() { od -An -tx1 "$1" | tr -d ' \n'; }
value cpus "$(grep -c ^processor /proc/cpuinfo)"
value model "$(cat /proc/device-tree/model)"
value mem_reg "$(hex /proc/device-tree/memory@40000000/reg)"
value pool_reg "$(hex /proc/device-tree/reserved-memory/swiotlb@50000000/reg)"
echo "@@ READY for a line"
if read -t 60 line; then value typed "$line"; else result typed FAIL "nothing arrived on the console"; fi
