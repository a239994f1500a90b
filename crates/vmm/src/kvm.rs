//! KVM on aarch64.

use crate::{Error, HostReport};
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2,
    kvm_userspace_memory_region, kvm_vcpu_init, KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_REG_ARM64, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64, KVM_VGIC_V2_ADDR_TYPE_CPU,
    KVM_VGIC_V2_ADDR_TYPE_DIST,
};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm {
        what,
        detail: e.to_string(),
    }
}

/// Register id of a 64-bit core register at `offset` bytes into `struct kvm_regs`.
fn core_reg(offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | (offset / 4)
}
/// `regs.pc` follows x0..x30 and sp in `struct user_pt_regs`.
const PC: u64 = 32 * 8;

const RAM: u64 = 0x4000_0000;
const GIC_DIST: u64 = 0x0800_0000;
const GIC_CPU: u64 = 0x0801_0000;
const UART: u64 = 0x0900_0000;
const GIC_IRQS: u32 = 128;

/// movz x1, #0x900, lsl #16; movz x0, #0x41; strb w0, [x1]; b .
const GUEST_CODE: [u32; 4] = [0xd2a1_2001, 0xd280_0820, 0x3900_0020, 0x1400_0000];

pub fn smoke() -> Result<HostReport, Error> {
    let kvm = Kvm::new().map_err(|e| Error::NoKvm(e.to_string()))?;
    let api_version = kvm.get_api_version();
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM), 0x10000)])
        .map_err(|e| Error::Memory(e.to_string()))?;
    let code: Vec<u8> = GUEST_CODE.iter().flat_map(|i| i.to_le_bytes()).collect();
    mem.write_slice(&code, GuestAddress(RAM))
        .map_err(|e| Error::Memory(e.to_string()))?;
    let host = mem
        .get_host_address(GuestAddress(RAM))
        .map_err(|e| Error::Memory(e.to_string()))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: RAM,
        memory_size: 0x10000,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` maps this range and outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("map guest memory"))?;

    let vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU 0"))?;
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(kvm_err("name a preferred CPU target"))?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    vcpu.vcpu_init(&kvi).map_err(kvm_err("initialise vCPU 0"))?;

    // The vgic-v2 is created after the vCPUs and initialised last (KVM's order).
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2,
        fd: 0,
        flags: 0,
    };
    let gic = vm.create_device(&mut dev).map_err(kvm_err(
        "create an in-kernel vgic-v2 (is GICv2 emulation available?)",
    ))?;
    let set = |group: u32, attr: u64, addr: u64, what| {
        gic.set_device_attr(&kvm_device_attr {
            flags: 0,
            group,
            attr,
            addr,
        })
        .map_err(kvm_err(what))
    };
    let (dist, cpu, irqs) = (GIC_DIST, GIC_CPU, GIC_IRQS);
    set(
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V2_ADDR_TYPE_DIST),
        &dist as *const u64 as u64,
        "place the GIC distributor",
    )?;
    set(
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V2_ADDR_TYPE_CPU),
        &cpu as *const u64 as u64,
        "place the GIC CPU interface",
    )?;
    set(
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        &irqs as *const u32 as u64,
        "size the GIC",
    )?;
    set(
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
        0,
        "initialise the vgic-v2",
    )?;

    vcpu.set_one_reg(core_reg(PC), &RAM.to_le_bytes())
        .map_err(kvm_err("set the PC"))?;
    let mut vcpu = vcpu;
    // A few exits at most before the store; bounded so that a broken host cannot hang the check.
    for _ in 0..16 {
        match vcpu.run().map_err(kvm_err("run vCPU 0"))? {
            VcpuExit::MmioWrite(addr, data) if addr == UART => {
                return Ok(HostReport {
                    api_version,
                    mmio_exit: (addr, data.to_vec()),
                    gic_irqs: GIC_IRQS,
                });
            }
            VcpuExit::MmioWrite(..) | VcpuExit::MmioRead(..) => {}
            other => return Err(Error::UnexpectedExit(format!("{other:?}"))),
        }
    }
    Err(Error::UnexpectedExit(
        "16 exits without the expected write".into(),
    ))
}
