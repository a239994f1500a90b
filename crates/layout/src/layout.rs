//! The resolved layout: a description with every address, slot, BAR and interrupt decided.

use crate::desc::PoolReference;
use crate::region::Region;
use std::path::PathBuf;

/// GIC interrupt ID of SPI 0.
pub const SPI_BASE_INTID: u32 = 32;
/// GIC interrupt ID of PPI 0.
pub const PPI_BASE_INTID: u32 = 16;
/// Largest interrupt ID a GICv2 can route (1020..1023 are special).
pub const MAX_INTID: u32 = 1019;
/// A GICv2m frame's `spi_base + spi_count` may not exceed this (Linux's `V2M_MAX_SPI`).
pub const V2M_MAX_END: u32 = 1019;
/// The GIC CPU interface KVM's vgic-v2 maps is 8 KiB (GICC_DIR sits at 0x1000).
pub const GIC_CPU_MIN_SIZE: u64 = 8 * 1024;
/// The end of what a 32-bit BAR can address.
pub const FOUR_GIB: u64 = 1 << 32;
/// GICv2 addresses at most 8 CPUs.
pub const MAX_VCPUS: u32 = 8;
/// Longest RPC polling spin: past a few milliseconds a spin only burns the CPU that an
/// idle device's sleeping side would give back.
pub const MAX_RPC_POLL_US: u32 = 10_000;
/// Longest halt poll a description may ask for: KVM caps it at no value, and a vCPU polling
/// longer than this burns the CPU for waits that a sleep serves as well.
pub const MAX_HALT_POLL_US: u32 = 10_000;
/// Backend restarts when the description does not say.
pub const DEFAULT_RPC_RESTARTS: u32 = 3;
/// The id a jailed backend started by root runs as by default (`nobody`).
pub const NOBODY: u32 = 65534;
/// KVM's default guest physical address space on arm64 (40 bits).
pub const IPA_LIMIT: u64 = 1 << 40;
/// Device numbers on one PCI bus; 0 is the host bridge.
pub const PCI_SLOTS: u32 = 32;
/// One ECAM bus: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// The virtio-pci BAR: common, ISR, device and notify structures plus the MSI-X table and PBA,
/// each on its own 4 KiB page (the virtio transport lays them out).
pub const VIRTIO_BAR_SIZE: u64 = 0x8000;
/// The connector's event page (BAR0).
pub const CONNECTOR_EVENT_SIZE: u64 = 0x1000;
/// The connector's BAR 2: its MSI-X table and pending bits.
pub const CONNECTOR_MSIX_SIZE: u64 = 0x1000;
/// The connector's name field: 50 bytes with the NUL (facts: "Cross-VM connector").
pub const CONNECTOR_NAME_MAX: usize = 49;
/// The rpc-port's BAR 0: its registers, MSI-X table and pending bits.
pub const PORT_REGS_SIZE: u64 = 0x1000;
/// The rpc-port's BAR 2: the driver VM's RPC control region (0xb000 bytes) rounded up to a
/// power of two.
pub const PORT_CONTROL_BAR: u64 = 0x10000;
/// Where virtio-pmem regions go: windows of `PMEM_WINDOW` from here, one per device, above the
/// PCI windows and below `IPA_LIMIT`, outside RAM and every BAR (the guest maps a region by
/// the address its device's config gives).
pub const PMEM_BASE: u64 = 0xc0_0000_0000;
pub const PMEM_WINDOW: u64 = 1 << 36;
/// virtio-pmem devices a VM can have (their windows fill the space up to `IPA_LIMIT`).
pub const PMEM_MAX: u64 = (IPA_LIMIT - PMEM_BASE) / PMEM_WINDOW;

#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub name: String,
    pub profile: String,
    pub vcpus: u32,
    /// How long the hypervisor polls a waiting vCPU before it sleeps (None: its default).
    pub halt_poll: Option<std::time::Duration>,
    /// Per vCPU, the host CPUs its thread may run on (None: anywhere).
    pub vcpu_affinity: Option<Vec<Vec<usize>>>,
    pub ram: Region,
    /// RAM outside the pool asks the host for transparent huge pages.
    pub ram_huge_pages: bool,
    pub pool: Option<Region>,
    pub gic_dist: Region,
    pub gic_cpu: Region,
    pub v2m: Option<V2m>,
    pub uart: Uart,
    pub timer_ppis: [u32; 4],
    pub pci: Pci,
    pub cmdline: String,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub devices: Vec<Device>,
    /// How long each side of the backend's RPC spins for a message before it sleeps (None:
    /// it sleeps at once).
    pub rpc_poll: Option<std::time::Duration>,
    /// How many times a backend process that dies is started again.
    pub rpc_restarts: u32,
    /// The socket of a backend that `splitvirt backend --listen` serves (None: splitvirt
    /// starts its own).
    pub rpc_connect: Option<PathBuf>,
    /// The backend at `rpc_connect` is a device VM: the backend devices' host ends are its
    /// own, and splitvirt opens none.
    pub rpc_device_vm: bool,
    /// The ids a jailed backend runs as when started by root (uid, gid); None: no jail.
    pub rpc_jail: Option<(u32, u32)>,
    /// Interrupt lines the GIC must implement (a multiple of 32, covering every ID in use).
    pub gic_irqs: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct V2m {
    pub region: Region,
    /// First interrupt ID.
    pub spi_base: u32,
    pub spi_count: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Uart {
    pub region: Region,
    /// SPI number (interrupt ID - 32).
    pub spi: u32,
    pub clock_hz: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pci {
    pub ecam: Region,
    pub bus_start: u32,
    pub bus_end: u32,
    pub io: Region,
    pub mem32: Region,
    pub mem64: Option<Region>,
    /// SPI numbers of the four swizzled INTx lines.
    pub intx_spis: [u32; 4],
    pub pool_reference: PoolReference,
}

#[derive(Clone, Debug, PartialEq)]
pub enum DeviceKind {
    VirtioBlk {
        image: PathBuf,
        read_only: bool,
        /// None: by the file name (`.qcow2`), else raw.
        format: Option<DiskFormat>,
    },
    VirtioNet {
        backend: NetBackend,
        mac: [u8; 6],
    },
    VirtioConsole {
        backend: ConsoleBackend,
    },
    Connector {
        name: String,
        dataport_size: u64,
        peer: Option<String>,
    },
    /// A device VM's port to one driver VM: the driver's splitvirt connects at `socket` and
    /// hands over its pool (`pool_size` bytes, BAR 4), its control region (BAR 2) and its
    /// doorbells (docs/ARCHITECTURE.md, "The device VM").
    RpcPort {
        socket: PathBuf,
        pool_size: u64,
    },
    /// A virtio-pmem device (type 27): the file `image` mapped into the guest at `window` (no
    /// exit per access), flushed to stable storage when the driver asks.
    VirtioPmem {
        image: PathBuf,
        window: u64,
    },
    /// A virtio device that another program serves over vhost-user at `socket`, splitvirt
    /// being the frontend; the program is handed the pool alone.
    VhostUser {
        socket: PathBuf,
        /// The virtio device ID (2 = block, 3 = console, 19 = vsock, 26 = file system).
        device_type: u32,
        queues: u16,
        queue_size: u16,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// Where a virtio-net device's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// A TAP interface of the host (`tap0` or `tap:tap0`).
    Tap(String),
    /// A link to another VM over a Unix socket (`socket:/path`): the first VM to start listens,
    /// the other connects.
    Socket(PathBuf),
}

/// Where a virtio-console's `/dev/hvc0` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// splitvirt's own stdin and stdout.
    Stdio,
    /// A Unix socket splitvirt listens on (`socket:/path`), one client at a time.
    Socket(PathBuf),
    /// A new pseudo-terminal, whose name splitvirt prints.
    Pty,
}

impl DeviceKind {
    pub fn label(&self) -> &'static str {
        match self {
            DeviceKind::VirtioBlk { .. } => "virtio-blk",
            DeviceKind::VirtioNet { .. } => "virtio-net",
            DeviceKind::VirtioConsole { .. } => "virtio-console",
            DeviceKind::Connector { .. } => "connector",
            DeviceKind::RpcPort { .. } => "rpc-port",
            DeviceKind::VhostUser { .. } => "vhost-user",
            DeviceKind::VirtioPmem { .. } => "virtio-pmem",
        }
    }

    /// PCI vendor and device ID: modern virtio (0x1040 + type), the cross-VM connector, or a
    /// device VM's rpc-port.
    pub fn pci_id(&self) -> (u16, u16) {
        match self {
            DeviceKind::VirtioBlk { .. } => (0x1af4, 0x1042),
            DeviceKind::VirtioNet { .. } => (0x1af4, 0x1041),
            DeviceKind::VirtioConsole { .. } => (0x1af4, 0x1043),
            DeviceKind::Connector { .. } => (0x1af4, 0xa111),
            DeviceKind::RpcPort { .. } => (0x1af4, 0xa112),
            DeviceKind::VhostUser { device_type, .. } => (0x1af4, 0x1040 + *device_type as u16),
            DeviceKind::VirtioPmem { .. } => (0x1af4, 0x1040 + 27),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: u8,
    pub base: u64,
    pub size: u64,
    pub is_64bit: bool,
    pub prefetchable: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    pub kind: DeviceKind,
    pub slot: u32,
    pub bars: Vec<Bar>,
    /// 1 = INTA .. 4 = INTD.
    pub intx_pin: u32,
    /// SPI number of the line this device's pin reaches after the swizzle.
    pub intx_spi: u32,
    /// MSI-X vectors the device gets (0: INTx only).
    pub msi_vectors: u32,
    /// Interrupt IDs of the v2m frame that the budget sets aside for it.
    pub msi_intids: Option<(u32, u32)>,
    /// Which process runs the device model.
    pub placement: Placement,
}

/// Where a device model runs: in splitvirt's own process, or in the backend process that sees
/// only the pool (docs/RPC.md). The connector always runs in splitvirt (it is mostly shared
/// memory mapped into the guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    InProcess,
    Backend,
}

impl Layout {
    /// Every region of the map, sorted by address (the pool after the RAM holding it).
    pub fn regions(&self) -> Vec<Region> {
        let mut r = vec![
            self.ram.clone(),
            self.gic_dist.clone(),
            self.gic_cpu.clone(),
            self.uart.region.clone(),
            self.pci.ecam.clone(),
            self.pci.io.clone(),
            self.pci.mem32.clone(),
        ];
        r.extend(self.pool.clone());
        r.extend(self.v2m.as_ref().map(|v| v.region.clone()));
        r.extend(self.pci.mem64.clone());
        r.sort_by_key(|x| (x.base, std::cmp::Reverse(x.size)));
        r
    }

    /// The interrupt ID the swizzle gives a slot's pin (1..=4), as in QEMU virt and the DT map.
    /// The devices that run in the backend process (never a connector: those are in-process).
    pub fn backend_devices(&self) -> impl Iterator<Item = &Device> {
        self.devices
            .iter()
            .filter(|d| d.placement == Placement::Backend)
    }

    pub fn swizzle(&self, slot: u32, pin: u32) -> u32 {
        self.pci.intx_spis[((slot + pin - 1) % 4) as usize]
    }
}
