# The board can run KVM guests: /dev/kvm, an in-kernel vgic-v2, a guest that exits on MMIO.
check kvm_device test -c /dev/kvm
check host_check /splitvirt host-check
