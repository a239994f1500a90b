//! Built-in profiles: complete VM descriptions that a file starts from. Every address of the
//! memory map lives here, once, with where it comes from. `docs/ARCHITECTURE.md` draws the map.

use crate::desc::*;
use crate::size::{ByteSize, KIB, MIB};

// ---- Shared by both profiles: the Arm platform block of QEMU's virt machine, which the seed's
// ---- driver VM copies (seed: "GICv2m for MSI", "earlycon=pl011,0x9000000").

/// GIC-400 distributor (seed, QEMU virt).
pub const GIC_DIST_BASE: u64 = 0x0800_0000;
pub const GIC_DIST_SIZE: u64 = 64 * KIB;
/// GIC-400 CPU interface (seed, QEMU virt). The hardware needs 8 KiB; the seed reserves 64 KiB.
pub const GIC_CPU_BASE: u64 = 0x0801_0000;
pub const GIC_CPU_SIZE: u64 = 64 * KIB;
/// GICv2m MSI frame: one 4 KiB page (seed, QEMU virt, Arm SBSA).
pub const V2M_BASE: u64 = 0x0802_0000;
pub const V2M_SIZE: u64 = 4 * KIB;
/// PL011 UART (seed's earlycon address) on SPI 1, as in QEMU virt.
pub const UART_BASE: u64 = 0x0900_0000;
pub const UART_SIZE: u64 = 4 * KIB;
pub const UART_SPI: u32 = 1;
/// The PL011's `apb_pclk`: 24 MHz as on QEMU virt and Arm's FVP.
pub const UART_CLOCK_HZ: u32 = 24_000_000;
/// Arch timer PPIs (secure phys, non-secure phys, virt, hyp): the Arm SBSA numbers KVM uses.
pub const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// INTA..INTD after the swizzle, SPIs 3..6 as on QEMU virt.
pub const INTX_SPIS: [u32; 4] = [3, 4, 5, 6];
/// Guest RAM starts at 1 GiB on both (seed, QEMU virt).
pub const RAM_BASE: u64 = 0x4000_0000;

// ---- The driver VM (default): the seed's values, with the PCI windows moved out of RAM.

/// 512 MiB of RAM (seed: `mem=512M`), ending at 0x6000_0000.
pub const DRIVER_RAM_SIZE: u64 = 512 * MIB;
/// The seed's 64 MiB restricted DMA pool, inside RAM.
pub const DRIVER_POOL_BASE: u64 = 0x5000_0000;
pub const DRIVER_POOL_SIZE: u64 = 64 * MIB;
/// The seed's ECAM: 16 MiB, room for 16 buses; bus 0 is used.
pub const DRIVER_ECAM_BASE: u64 = 0x7000_0000;
pub const DRIVER_ECAM_SIZE: u64 = 16 * MIB;
/// The seed put the 32-bit window at 0x5000_0000, inside RAM and over the pool (facts #2).
/// QEMU virt's window below RAM is free in this map too: 0x1000_0000..0x3eff_0000.
pub const DRIVER_MEM32_BASE: u64 = 0x1000_0000;
pub const DRIVER_MEM32_SIZE: u64 = 0x2eff_0000;
/// The I/O window just above it (QEMU virt's PIO), 64 KiB.
pub const DRIVER_IO_BASE: u64 = 0x3eff_0000;
pub const DRIVER_IO_SIZE: u64 = 64 * KIB;
/// 64-bit prefetchable window at 512 GiB, 64 GiB long: far above any RAM, and it ends below
/// 1 TiB, the 40-bit guest physical space KVM gives a VM by default.
pub const DRIVER_MEM64_BASE: u64 = 0x80_0000_0000;
pub const DRIVER_MEM64_SIZE: u64 = 0x10_0000_0000;
/// 64 MSI SPIs from interrupt ID 64 (seed: `arm,msi-base-spi = <64>`).
pub const DRIVER_V2M_SPI_BASE: u32 = 64;
pub const DRIVER_V2M_SPI_COUNT: u32 = 64;
/// No `root=`: the default VM has no disk, so it runs the initramfs it is given.
pub const DRIVER_CMDLINE: &str = "console=ttyAMA0 earlycon=pl011,0x9000000";

// ---- qemu-virt: QEMU's own virt machine (hw/arm/virt.c), so that our DTB can replace QEMU's.

/// `VIRT_PCIE_ECAM`: the low ECAM, 16 buses. QEMU 7.2 has no `highmem-ecam` switch: it uses
/// this one only with `-M virt,highmem=off`, which also drops the high MMIO window, so this
/// profile has no 64-bit window.
pub const QEMU_ECAM_BASE: u64 = 0x3f00_0000;
pub const QEMU_ECAM_SIZE: u64 = 16 * MIB;
/// `VIRT_PCIE_MMIO` and `VIRT_PCIE_PIO`.
pub const QEMU_MEM32_BASE: u64 = 0x1000_0000;
pub const QEMU_MEM32_SIZE: u64 = 0x2eff_0000;
pub const QEMU_IO_BASE: u64 = 0x3eff_0000;
pub const QEMU_IO_SIZE: u64 = 64 * KIB;
/// `NUM_GICV2M_SPIS` = 64 from SPI 48 (`irqmap[VIRT_GIC_V2M]`), interrupt ID 80.
pub const QEMU_V2M_SPI_BASE: u32 = 80;
pub const QEMU_V2M_SPI_COUNT: u32 = 64;
pub const QEMU_RAM_SIZE: u64 = 512 * MIB;
/// The pool in the upper half of RAM, clear of the kernel at the bottom.
pub const QEMU_POOL_BASE: u64 = 0x5000_0000;
pub const QEMU_POOL_SIZE: u64 = 64 * MIB;
pub const QEMU_CMDLINE: &str = "console=ttyAMA0 earlycon=pl011,0x9000000";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    DriverVm,
    QemuVirt,
}

impl Profile {
    pub const ALL: [Profile; 2] = [Profile::DriverVm, Profile::QemuVirt];

    pub fn name(self) -> &'static str {
        match self {
            Profile::DriverVm => "driver-vm",
            Profile::QemuVirt => "qemu-virt",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn description(self) -> Description {
        let gic = |spi_base, spi_count| GicDesc {
            distributor: GIC_DIST_BASE,
            distributor_size: ByteSize(GIC_DIST_SIZE),
            cpu_interface: GIC_CPU_BASE,
            cpu_interface_size: ByteSize(GIC_CPU_SIZE),
            v2m: Some(V2mDesc {
                base: V2M_BASE,
                size: ByteSize(V2M_SIZE),
                spi_base,
                spi_count,
            }),
        };
        let uart = UartDesc {
            base: UART_BASE,
            size: ByteSize(UART_SIZE),
            spi: UART_SPI,
            clock_hz: UART_CLOCK_HZ,
        };
        let win = |base, size| Window {
            base,
            size: ByteSize(size),
        };
        match self {
            Profile::DriverVm => Description {
                profile: self.name().into(),
                name: "driver-vm".into(),
                vcpus: 2,
                halt_poll_us: None,
                vcpu_affinity: None,
                memory: MemoryDesc {
                    base: RAM_BASE,
                    size: ByteSize(DRIVER_RAM_SIZE),
                    huge_pages: None,
                },
                gic: gic(DRIVER_V2M_SPI_BASE, DRIVER_V2M_SPI_COUNT),
                uart,
                timer: TimerDesc { ppis: TIMER_PPIS },
                pci: PciDesc {
                    ecam_base: DRIVER_ECAM_BASE,
                    ecam_size: ByteSize(DRIVER_ECAM_SIZE),
                    bus_range: [0, 0],
                    io: win(DRIVER_IO_BASE, DRIVER_IO_SIZE),
                    mem32: win(DRIVER_MEM32_BASE, DRIVER_MEM32_SIZE),
                    mem64: Some(win(DRIVER_MEM64_BASE, DRIVER_MEM64_SIZE)),
                    intx_spis: INTX_SPIS,
                    pool_reference: PoolReference::PerDevice,
                },
                pool: Some(PoolDesc {
                    base: DRIVER_POOL_BASE,
                    size: ByteSize(DRIVER_POOL_SIZE),
                }),
                kernel: KernelDesc {
                    cmdline: DRIVER_CMDLINE.into(),
                    image: None,
                    initrd: None,
                },
                backend: None,
                // Only what needs no host file or privilege: a console, served by the backend
                // process. The seed's disk and TAP are in examples/driver-vm.toml.
                devices: vec![DeviceDesc {
                    kind: "virtio-console".into(),
                    ..Default::default()
                }],
            },
            Profile::QemuVirt => Description {
                profile: self.name().into(),
                name: "qemu-virt".into(),
                vcpus: 2,
                halt_poll_us: None,
                vcpu_affinity: None,
                memory: MemoryDesc {
                    base: RAM_BASE,
                    size: ByteSize(QEMU_RAM_SIZE),
                    huge_pages: None,
                },
                gic: gic(QEMU_V2M_SPI_BASE, QEMU_V2M_SPI_COUNT),
                uart,
                timer: TimerDesc { ppis: TIMER_PPIS },
                pci: PciDesc {
                    ecam_base: QEMU_ECAM_BASE,
                    ecam_size: ByteSize(QEMU_ECAM_SIZE),
                    bus_range: [0, 15],
                    io: win(QEMU_IO_BASE, QEMU_IO_SIZE),
                    mem32: win(QEMU_MEM32_BASE, QEMU_MEM32_SIZE),
                    mem64: None,
                    intx_spis: INTX_SPIS,
                    pool_reference: PoolReference::PerDevice,
                },
                pool: Some(PoolDesc {
                    base: QEMU_POOL_BASE,
                    size: ByteSize(QEMU_POOL_SIZE),
                }),
                kernel: KernelDesc {
                    cmdline: QEMU_CMDLINE.into(),
                    image: None,
                    initrd: None,
                },
                backend: None,
                devices: Vec::new(),
            },
        }
    }
}
