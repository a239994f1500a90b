//! Turns a description into a layout, finding every problem on the way (not just the first).

use crate::desc::{BackendDesc, Description, DeviceDesc};
use crate::layout::*;
use crate::problem::{Invalid, Problem, Rule};
use crate::region::Region;
use crate::size::{ByteSize, KIB, MIB};
use std::path::PathBuf;
use std::time::Duration;

/// The layout and the warnings it comes with.
#[derive(Debug)]
pub struct Resolved {
    pub layout: Layout,
    pub warnings: Vec<Problem>,
}

/// Everything validation can say of a description: `Err` when any problem is an error.
pub fn resolve(desc: &Description) -> Result<Resolved, Invalid> {
    let mut p = Vec::new();
    let layout = build(desc, &mut p);
    if p.iter().any(Problem::is_error) {
        Err(Invalid { problems: p })
    } else {
        Ok(Resolved {
            layout,
            warnings: p,
        })
    }
}

/// All problems of a description, errors and warnings.
pub fn check(desc: &Description) -> Vec<Problem> {
    match resolve(desc) {
        Ok(r) => r.warnings,
        Err(e) => e.problems,
    }
}

fn build(d: &Description, p: &mut Vec<Problem>) -> Layout {
    let ram = Region::new("RAM", d.memory.base, d.memory.size.0);
    let pool = d
        .pool
        .map(|x| Region::new("restricted DMA pool", x.base, x.size.0));
    let v2m = d.gic.v2m.map(|v| V2m {
        region: Region::new("GICv2m frame", v.base, v.size.0),
        spi_base: v.spi_base,
        spi_count: v.spi_count,
    });
    let pci = Pci {
        ecam: Region::new("PCI ECAM", d.pci.ecam_base, d.pci.ecam_size.0),
        bus_start: d.pci.bus_range[0],
        bus_end: d.pci.bus_range[1],
        io: Region::new("PCI I/O window", d.pci.io.base, d.pci.io.size.0),
        mem32: Region::new("PCI 32-bit window", d.pci.mem32.base, d.pci.mem32.size.0),
        mem64: d
            .pci
            .mem64
            .map(|w| Region::new("PCI 64-bit window", w.base, w.size.0)),
        intx_spis: d.pci.intx_spis,
        pool_reference: d.pci.pool_reference,
    };
    let mut layout = Layout {
        name: d.name.clone(),
        profile: d.profile.clone(),
        vcpus: d.vcpus,
        halt_poll: halt_poll(d.halt_poll_us, p),
        vcpu_affinity: vcpu_affinity(d.vcpu_affinity.as_ref(), d.vcpus, p),
        ram,
        pool,
        gic_dist: Region::new(
            "GIC distributor",
            d.gic.distributor,
            d.gic.distributor_size.0,
        ),
        gic_cpu: Region::new(
            "GIC CPU interface",
            d.gic.cpu_interface,
            d.gic.cpu_interface_size.0,
        ),
        v2m,
        uart: Uart {
            region: Region::new("PL011 UART", d.uart.base, d.uart.size.0),
            spi: d.uart.spi,
            clock_hz: d.uart.clock_hz,
        },
        timer_ppis: d.timer.ppis,
        pci,
        cmdline: d.kernel.cmdline.clone(),
        kernel: d.kernel.image.clone(),
        initrd: d.kernel.initrd.clone(),
        devices: Vec::new(),
        rpc_poll: None,
        ram_huge_pages: d.memory.huge_pages.unwrap_or(true),
        rpc_restarts: d
            .backend
            .as_ref()
            .and_then(|b| b.restarts)
            .unwrap_or(DEFAULT_RPC_RESTARTS),
        rpc_connect: d
            .backend
            .as_ref()
            .and_then(|b| b.connect.clone().or_else(|| b.device_vm.clone())),
        rpc_device_vm: d.backend.as_ref().is_some_and(|b| b.device_vm.is_some()),
        rpc_jail: match &d.backend {
            Some(b) if b.jail == Some(false) => None,
            b => Some((
                b.as_ref().and_then(|b| b.jail_uid).unwrap_or(NOBODY),
                b.as_ref().and_then(|b| b.jail_gid).unwrap_or(NOBODY),
            )),
        },
        gic_irqs: 0,
    };
    check_vcpus(&layout, p);
    let regions_ok = check_regions(&layout, p);
    check_ram(&layout, p);
    check_pool(&layout, p);
    check_ecam(&layout, p);
    check_gic_cpu(&layout, p);
    check_mem32(&layout, p);
    check_irqs(&layout, p);
    check_cmdline(&layout, p);
    if regions_ok {
        layout.devices = place_devices(&layout, &d.devices, p);
    }
    layout.rpc_poll = backend_poll(d.backend.as_ref(), &layout, p);
    check_device_vm(d.backend.as_ref(), &layout, p);
    layout.gic_irqs = gic_irqs(&layout);
    layout
}

/// `[backend] poll_us`: bounded, and a warning when no device runs in the backend.
fn backend_poll(b: Option<&BackendDesc>, l: &Layout, p: &mut Vec<Problem>) -> Option<Duration> {
    let us = b.map_or(0, |b| b.poll_us);
    if us > MAX_RPC_POLL_US {
        p.push(Problem::error(
            Rule::Backend,
            format!(
                "backend.poll_us = {us}: a spin longer than {MAX_RPC_POLL_US} µs burns a host \
                 CPU without making messages faster"
            ),
            format!(
                "set backend.poll_us between 0 (no spinning) and {MAX_RPC_POLL_US}; 50 suits most"
            ),
        ));
        return None;
    }
    if us > 0 && !l.devices.iter().any(|d| d.placement == Placement::Backend) {
        p.push(Problem::warning(
            Rule::Backend,
            format!("backend.poll_us = {us}, but no device runs in the backend process"),
            "remove [backend] or give a device placement = \"backend\"",
        ));
    }
    rpc_poll(us)
}

/// How long a side of the RPC spins for `us` µs of `poll_us` (0: not at all, None).
pub fn rpc_poll(us: u32) -> Option<Duration> {
    (us > 0).then(|| Duration::from_micros(u64::from(us)))
}

/// `[backend] device_vm`: one way to reach the backend, and no backend of splitvirt's own.
fn check_device_vm(b: Option<&BackendDesc>, l: &Layout, p: &mut Vec<Problem>) {
    let Some(b) = b.filter(|b| b.device_vm.is_some()) else {
        return;
    };
    if b.connect.is_some() {
        p.push(Problem::error(
            Rule::Backend,
            "backend.connect and backend.device_vm both name where the backend is".to_owned(),
            "keep device_vm (a device VM's rpc-port) or connect (`splitvirt backend --listen`),              not both",
        ));
    }
    if b.jail.is_some() || b.jail_uid.is_some() || b.jail_gid.is_some() {
        p.push(Problem::warning(
            Rule::Backend,
            "backend.jail settings do nothing for a device VM: the hypervisor confines it"
                .to_owned(),
            "remove jail, jail_uid and jail_gid from [backend]",
        ));
    }
    if l.pool.is_none() {
        p.push(Problem::error(
            Rule::Backend,
            "backend.device_vm: a device VM serves devices through the restricted DMA pool, and              this VM has none"
                .to_owned(),
            "give the VM a [pool], or remove device_vm",
        ));
    }
}

/// `halt_poll_us`: bounded; 0 is allowed (no polling at all).
fn halt_poll(us: Option<u32>, p: &mut Vec<Problem>) -> Option<Duration> {
    let us = us?;
    if us > MAX_HALT_POLL_US {
        p.push(Problem::error(
            Rule::Vcpus,
            format!(
                "halt_poll_us = {us}: a waiting vCPU polled longer than {MAX_HALT_POLL_US} µs \
                 burns a host CPU for wake-ups that a sleep serves as well"
            ),
            format!(
                "set halt_poll_us between 0 (a waiting vCPU sleeps at once) and \
                 {MAX_HALT_POLL_US}, or remove it for the host's default"
            ),
        ));
        return None;
    }
    Some(Duration::from_micros(u64::from(us)))
}

/// Host CPU numbers an affinity may name: glibc's `cpu_set_t` holds 1024.
pub const MAX_HOST_CPUS: usize = 1024;

/// A host CPU list as `taskset -c` writes it: `0-3,6`.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim) {
        let num = |s: &str| -> Result<usize, String> {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n < MAX_HOST_CPUS)
                .ok_or_else(|| format!("`{s}` is not a CPU number below {MAX_HOST_CPUS}"))
        };
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if first > last {
            return Err(format!("the range `{part}` runs backwards"));
        }
        for c in first..=last {
            if !cpus.contains(&c) {
                cpus.push(c);
            }
        }
    }
    cpus.sort_unstable();
    Ok(cpus)
}

/// CPUs as `taskset -c` writes them: `0-3,6`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// `vcpu_affinity`: CPU lists that parse, one or one per vCPU.
fn vcpu_affinity(
    a: Option<&crate::desc::AffinityDesc>,
    vcpus: u32,
    p: &mut Vec<Problem>,
) -> Option<Vec<Vec<usize>>> {
    use crate::desc::AffinityDesc;
    let lists: Vec<&String> = match a? {
        AffinityDesc::All(l) => std::iter::repeat_n(l, vcpus as usize).collect(),
        AffinityDesc::PerVcpu(v) if v.len() == vcpus as usize => v.iter().collect(),
        AffinityDesc::PerVcpu(v) => {
            p.push(Problem::error(
                Rule::Vcpus,
                format!(
                    "vcpu_affinity gives {} CPU list{} for {vcpus} vCPUs",
                    v.len(),
                    if v.len() == 1 { "" } else { "s" }
                ),
                "give one CPU list per vCPU, or one string (\"0-3\") for all of them",
            ));
            return None;
        }
    };
    let mut out = Vec::new();
    for (i, l) in lists.into_iter().enumerate() {
        match parse_cpu_list(l) {
            Ok(cpus) => out.push(cpus),
            Err(why) => {
                p.push(Problem::error(
                    Rule::Vcpus,
                    format!("vcpu_affinity of vCPU {i}, \"{l}\": {why}"),
                    "write host CPUs as taskset -c does: \"2\", \"0-3\", \"0,2,4-7\"",
                ));
                return None;
            }
        }
    }
    Some(out)
}

fn check_vcpus(l: &Layout, p: &mut Vec<Problem>) {
    if l.vcpus == 0 || l.vcpus > MAX_VCPUS {
        p.push(Problem::error(
            Rule::Vcpus,
            format!("vcpus = {}: a GICv2 serves 1 to {MAX_VCPUS} CPUs", l.vcpus),
            format!("set vcpus between 1 and {MAX_VCPUS}"),
        ));
    }
}

/// Size, wrap-around, address-space limit and pairwise overlap of every fixed region.
/// Returns false when a region is unusable, so that BAR placement is not attempted on it.
fn check_regions(l: &Layout, p: &mut Vec<Problem>) -> bool {
    let regions = l.regions();
    let mut ok = true;
    for r in &regions {
        if r.size == 0 {
            p.push(Problem::error(
                Rule::AddressSpace,
                format!("{} has size 0", r.name),
                format!("give the {} a size", r.name),
            ));
            ok = false;
        } else if r.end().is_none_or(|e| e > IPA_LIMIT) {
            p.push(Problem::error(
                Rule::AddressSpace,
                format!(
                    "{r} ends beyond 1 TiB (0x{IPA_LIMIT:x}), the 40-bit guest physical space KVM gives a VM"
                ),
                format!("move or shrink the {} so that it ends at or below 0x{IPA_LIMIT:x}", r.name),
            ));
            ok = false;
        }
    }
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            let pool_in_ram = [a.name.as_str(), b.name.as_str()] == ["RAM", "restricted DMA pool"]
                || [b.name.as_str(), a.name.as_str()] == ["RAM", "restricted DMA pool"];
            if !pool_in_ram && a.overlaps(b) {
                p.push(Problem::error(
                    Rule::Overlap,
                    format!("{a} overlaps {b}"),
                    format!(
                        "move the {} or the {} so that they are disjoint",
                        b.name, a.name
                    ),
                ));
                ok = false;
            }
        }
    }
    ok
}

fn check_ram(l: &Layout, p: &mut Vec<Problem>) {
    let r = &l.ram;
    if !r.size.is_multiple_of(2 * MIB) {
        p.push(Problem::error(
            Rule::RamSize,
            format!(
                "memory.size = {} is not a multiple of 2 MiB",
                ByteSize(r.size)
            ),
            format!(
                "use {} (the kernel maps RAM in 2 MiB blocks)",
                ByteSize(
                    r.size
                        .checked_next_multiple_of(2 * MIB)
                        .unwrap_or(r.size & !(2 * MIB - 1))
                )
            ),
        ));
    }
    if !r.base.is_multiple_of(2 * MIB) {
        p.push(Problem::error(
            Rule::Alignment,
            format!("memory.base = {:#x} is not 2 MiB aligned", r.base),
            "align RAM to 2 MiB: an arm64 Image is placed at a 2 MiB boundary of RAM",
        ));
    }
    if r.size != 0 && r.size < 64 * MIB {
        p.push(Problem::error(
            Rule::RamSize,
            format!(
                "memory.size = {} is too small to boot Linux",
                ByteSize(r.size)
            ),
            "give the VM at least 64 MiB",
        ));
    }
}

fn check_pool(l: &Layout, p: &mut Vec<Problem>) {
    let Some(pool) = &l.pool else {
        p.push(Problem::warning(
            Rule::PoolOutsideRam,
            "no restricted DMA pool: devices can reach all of guest RAM",
            "add a [pool] section (base and size inside RAM) to confine device DMA",
        ));
        return;
    };
    if !l.ram.contains(pool) {
        p.push(Problem::error(
            Rule::PoolOutsideRam,
            format!("{pool} is not inside {}", l.ram),
            "place the pool inside RAM: Linux only uses a restricted-dma-pool that is RAM",
        ));
    }
    if pool.base % (4 * KIB) != 0 || pool.size % (4 * KIB) != 0 {
        p.push(Problem::error(
            Rule::Alignment,
            format!("{pool} is not 4 KiB aligned in base and size"),
            "align pool.base and pool.size to 4 KiB (0x1000)",
        ));
    }
    if pool.size < MIB {
        p.push(Problem::error(
            Rule::PoolSize,
            format!("{pool} is smaller than 1 MiB"),
            "one virtio-blk request alone can bounce 256 KiB (128 slabs of 2 KiB); use at least 1 MiB",
        ));
    }
}

fn check_ecam(l: &Layout, p: &mut Vec<Problem>) {
    let pci = &l.pci;
    if pci.bus_start > pci.bus_end || pci.bus_end > 255 {
        p.push(Problem::error(
            Rule::BusRange,
            format!(
                "pci.bus_range = [{}, {}] is not a range of buses 0..255",
                pci.bus_start, pci.bus_end
            ),
            "write [first, last] with first <= last <= 255, e.g. [0, 0]",
        ));
        return;
    }
    let buses = u64::from(pci.bus_end - pci.bus_start + 1);
    let need = buses * ECAM_BUS_SIZE;
    if pci.ecam.size < need || !pci.ecam.size.is_multiple_of(ECAM_BUS_SIZE) {
        p.push(Problem::error(
            Rule::EcamSize,
            format!(
                "{} does not cover pci.bus_range [{}, {}]: {buses} bus(es) need {} (1 MiB each)",
                pci.ecam,
                pci.bus_start,
                pci.bus_end,
                ByteSize(need)
            ),
            format!(
                "set pci.ecam_size to {} or narrow pci.bus_range",
                ByteSize(need)
            ),
        ));
    }
    if !pci.ecam.base.is_multiple_of(ECAM_BUS_SIZE) {
        p.push(Problem::error(
            Rule::Alignment,
            format!("{} is not 1 MiB aligned", pci.ecam),
            "align pci.ecam_base to 1 MiB (0x100000)",
        ));
    }
}

fn check_gic_cpu(l: &Layout, p: &mut Vec<Problem>) {
    let c = &l.gic_cpu;
    if c.size != 0 && c.size < GIC_CPU_MIN_SIZE {
        p.push(Problem::error(
            Rule::GicSize,
            format!(
                "{c}: gic.cpu_interface_size = {} is smaller than the GICv2 CPU interface (8 KiB: GICC_DIR is at offset 0x1000)",
                ByteSize(c.size)
            ),
            "set gic.cpu_interface_size to at least \"8K\" (the default is \"64K\", as on a GIC-400)",
        ));
    }
}

fn check_mem32(l: &Layout, p: &mut Vec<Problem>) {
    let w = &l.pci.mem32;
    if w.size != 0 && w.end().is_none_or(|e| e > FOUR_GIB) {
        p.push(Problem::error(
            Rule::PciWindow,
            format!(
                "{w} ends above 4 GiB: a 32-bit BAR cannot hold an address there"
            ),
            format!(
                "move pci.mem32 below 4 GiB (base + size <= 0x1_0000_0000; this size fits at base {:#x} or lower), and use pci.mem64 for the space above",
                FOUR_GIB.saturating_sub(w.size)
            ),
        ));
    }
}

/// One interrupt source for the collision check.
struct Irq {
    what: String,
    first: u32,
    count: u32,
}

fn check_irqs(l: &Layout, p: &mut Vec<Problem>) {
    let mut irqs: Vec<Irq> = Vec::new();
    let names = [
        "secure physical",
        "non-secure physical",
        "virtual",
        "hypervisor",
    ];
    for (ppi, name) in l.timer_ppis.iter().zip(names) {
        if *ppi >= 16 {
            p.push(Problem::error(
                Rule::IrqRange,
                format!("timer.ppis: the {name} timer's PPI {ppi} is not a PPI (0..15)"),
                "use the Arm SBSA numbers [13, 14, 11, 10]",
            ));
        } else {
            irqs.push(Irq {
                what: format!("the {name} timer (PPI {ppi})"),
                first: PPI_BASE_INTID + ppi,
                count: 1,
            });
        }
    }
    let spi = |what: String, spi: u32, p: &mut Vec<Problem>, irqs: &mut Vec<Irq>| {
        let id = SPI_BASE_INTID.saturating_add(spi);
        if id > MAX_INTID {
            p.push(Problem::error(
                Rule::IrqRange,
                format!("{what}: SPI {spi} is interrupt ID {id}, beyond the GICv2's {MAX_INTID}"),
                format!("use an SPI number from 0 to {}", MAX_INTID - SPI_BASE_INTID),
            ));
        } else {
            irqs.push(Irq {
                what: format!("{what} (SPI {spi}, interrupt ID {id})"),
                first: id,
                count: 1,
            });
        }
    };
    spi("the PL011 UART".into(), l.uart.spi, p, &mut irqs);
    for (i, s) in l.pci.intx_spis.iter().enumerate() {
        spi(
            format!("PCI INT{}", (b'A' + i as u8) as char),
            *s,
            p,
            &mut irqs,
        );
    }
    if let Some(v) = &l.v2m {
        let end = u64::from(v.spi_base) + u64::from(v.spi_count);
        let last = end.saturating_sub(1);
        // Linux's gic-v2m driver refuses a frame with base + count > 1019 (V2M_MAX_SPI), so
        // interrupt ID 1019 itself, a valid SPI, is out of an MSI frame's reach.
        if v.spi_count == 0 || v.spi_base < SPI_BASE_INTID || end > u64::from(V2M_MAX_END) {
            p.push(Problem::error(
                Rule::V2mRange,
                format!(
                    "gic.v2m: interrupt IDs {}..{} (spi_base {}, spi_count {}) are not all SPIs that Linux's GICv2m driver accepts (32..{})",
                    v.spi_base,
                    last,
                    v.spi_base,
                    v.spi_count,
                    V2M_MAX_END - 1
                ),
                format!(
                    "choose spi_base >= 32, spi_count >= 1 and spi_base + spi_count <= {V2M_MAX_END}{}",
                    if v.spi_count > 0 && v.spi_base >= SPI_BASE_INTID && v.spi_base < V2M_MAX_END {
                        format!(" (spi_count = {} with this base)", V2M_MAX_END - v.spi_base)
                    } else {
                        String::new()
                    }
                ),
            ));
        } else {
            irqs.push(Irq {
                what: format!(
                    "the GICv2m MSI range (interrupt IDs {}..{last})",
                    v.spi_base
                ),
                first: v.spi_base,
                count: v.spi_count,
            });
        }
    }
    for (i, a) in irqs.iter().enumerate() {
        for b in &irqs[i + 1..] {
            if a.first < b.first + b.count && b.first < a.first + a.count {
                p.push(Problem::error(
                    Rule::IrqCollision,
                    format!("{} collides with {}", a.what, b.what),
                    "give each interrupt source its own interrupt IDs",
                ));
            }
        }
    }
}

fn check_cmdline(l: &Layout, p: &mut Vec<Problem>) {
    for word in l.cmdline.split_whitespace() {
        if let Some(v) = word.strip_prefix("swiotlb=") {
            check_swiotlb(l, v, p);
        }
        if let Some(v) = word.strip_prefix("earlycon=") {
            check_earlycon(l, v, p);
        }
    }
}

/// `swiotlb=N[,M][,force|noforce]`: N counts 2 KiB slabs (IO_TLB_SHIFT = 11) and sizes only
/// the default bounce pool, never the restricted pool (facts #3).
fn check_swiotlb(l: &Layout, value: &str, p: &mut Vec<Problem>) {
    let first = value.split(',').next().unwrap_or("");
    if first == "force" || first == "noforce" {
        return;
    }
    let Some(slabs) = first.parse::<u64>().ok().filter(|&n| n > 0) else {
        p.push(Problem::error(
            Rule::Swiotlb,
            format!("swiotlb={value}: `{first}` is not a number of slabs"),
            "write swiotlb=N with N the number of 2 KiB slabs, or remove it",
        ));
        return;
    };
    let bytes = slabs.saturating_mul(2 * KIB);
    let as_pages = slabs.saturating_mul(4 * KIB);
    let meaning = format!(
        "swiotlb={slabs} means {slabs} slabs of 2 KiB = {}, not {} (it does not count 4 KiB pages)",
        ByteSize(bytes),
        ByteSize(as_pages)
    );
    if bytes >= l.ram.size / 2 {
        p.push(Problem::error(
            Rule::Swiotlb,
            format!(
                "{meaning}, at least half of the VM's {}",
                ByteSize(l.ram.size)
            ),
            "remove swiotlb=, or size it in 2 KiB slabs well below RAM",
        ));
        return;
    }
    if let Some(pool) = &l.pool {
        let tried_to_size_pool = bytes == pool.size || as_pages == pool.size;
        let msg = format!(
            "{meaning}; it sizes only the default bounce pool, and the {} takes its size from its reg",
            ByteSize(pool.size).to_string() + " restricted DMA pool"
        );
        let fix = "to size the restricted pool set pool.size; remove swiotlb= unless you want a default bounce pool too";
        if tried_to_size_pool {
            p.push(Problem::error(Rule::Swiotlb, msg, fix));
        } else {
            p.push(Problem::warning(Rule::Swiotlb, msg, fix));
        }
    }
}

/// `earlycon=pl011,ADDR[,options]` must point at our PL011, or early messages go nowhere.
fn check_earlycon(l: &Layout, value: &str, p: &mut Vec<Problem>) {
    let mut parts = value.split(',');
    let (Some("pl011"), Some(addr)) = (parts.next(), parts.next()) else {
        return;
    };
    let addr = addr.strip_prefix("mmio32,").unwrap_or(addr);
    match crate::size::parse_u64(addr) {
        Some(a) if a == l.uart.region.base => {}
        _ => p.push(Problem::error(
            Rule::Earlycon,
            format!(
                "earlycon=pl011,{addr} does not point at the {}",
                l.uart.region
            ),
            format!("write earlycon=pl011,{:#x}", l.uart.region.base),
        )),
    }
}

fn gic_irqs(l: &Layout) -> u32 {
    let mut max = SPI_BASE_INTID + l.uart.spi;
    for s in l.pci.intx_spis {
        max = max.max(SPI_BASE_INTID.saturating_add(s));
    }
    if let Some(v) = &l.v2m {
        max = max.max(v.spi_base.saturating_add(v.spi_count).saturating_sub(1));
    }
    (max.min(MAX_INTID) + 1).next_multiple_of(32).max(64)
}

/// A device after its kind-specific fields are checked.
fn device_kind(i: usize, d: &DeviceDesc, p: &mut Vec<Problem>) -> Option<DeviceKind> {
    let at = format!("device[{i}] ({})", d.kind);
    // The fields each kind takes; any other kind-specific field given is a mistake.
    let takes: &[&str] = match d.kind.as_str() {
        "virtio-blk" => &["image", "read_only", "format", "placement"],
        "virtio-net" => &["backend", "mac", "placement"],
        "virtio-console" => &["backend", "placement"],
        "connector" => &["name", "dataport_size", "peer", "placement"],
        "rpc-port" => &["socket", "pool_size"],
        "virtio-pmem" => &["image"],
        "vhost-user" => &["socket", "device", "queues", "queue_size"],
        _ => &[],
    };
    let given = [
        ("image", d.image.is_some()),
        ("read_only", d.read_only.is_some()),
        ("format", d.format.is_some()),
        ("backend", d.backend.is_some()),
        ("mac", d.mac.is_some()),
        ("name", d.name.is_some()),
        ("dataport_size", d.dataport_size.is_some()),
        ("peer", d.peer.is_some()),
        ("socket", d.socket.is_some()),
        ("pool_size", d.pool_size.is_some()),
        ("placement", d.placement.is_some()),
        ("device", d.device.is_some()),
        ("queues", d.queues.is_some()),
        ("queue_size", d.queue_size.is_some()),
    ];
    // An unknown kind (takes nothing) is said below, once.
    let stray = given
        .iter()
        .filter(|(n, present)| *present && !takes.is_empty() && !takes.contains(n));
    for (name, _) in stray {
        p.push(Problem::error(
            Rule::Device,
            format!("{at}: `{name}` is not a field of a {} device", d.kind),
            format!("remove `{name}` from this [[device]]"),
        ));
    }
    // The device's `image`, which it cannot do without (`what`: more of the fix).
    let image = |p: &mut Vec<Problem>, what: &str| match &d.image {
        Some(img) if !img.as_os_str().is_empty() => Some(img.clone()),
        _ => {
            p.push(Problem::error(
                Rule::Device,
                format!("{at} has no image"),
                format!("add image = \"path/to/disk.img\"{what}"),
            ));
            None
        }
    };
    let kind = match d.kind.as_str() {
        "virtio-blk" => DeviceKind::VirtioBlk {
            image: image(p, "")?,
            read_only: d.read_only.unwrap_or(false),
            format: match d.format.as_deref() {
                None => None,
                Some("raw") => Some(DiskFormat::Raw),
                Some("qcow2") => Some(DiskFormat::Qcow2),
                Some(other) => {
                    p.push(Problem::error(
                        Rule::Device,
                        format!("{at}: format `{other}` is not one splitvirt reads"),
                        "use format = \"raw\" or format = \"qcow2\" (qemu-img convert -O qcow2 \
                         makes one)",
                    ));
                    return None;
                }
            },
        },
        "virtio-net" => {
            let text = d.backend.clone().unwrap_or_default();
            let backend = if let Some(path) = text.strip_prefix("socket:") {
                NetBackend::Socket(PathBuf::from(path))
            } else {
                NetBackend::Tap(text.strip_prefix("tap:").unwrap_or(&text).to_owned())
            };
            let bad = match &backend {
                NetBackend::Tap(name) if name.is_empty() => Some(format!("{at} has no backend")),
                NetBackend::Tap(name) if name.len() > 15 || name.contains(['/', ' ', ':']) => {
                    Some(format!("{at}: backend `{text}` is not a TAP interface name (1 to 15 bytes, no `/`, space or `:`)"))
                }
                NetBackend::Socket(path) if path.as_os_str().is_empty() => {
                    Some(format!("{at}: backend `{text}` names no socket path"))
                }
                // sun_path holds 108 bytes with the NUL.
                NetBackend::Socket(path) if path.as_os_str().len() > 107 => {
                    Some(format!("{at}: socket path {} is longer than 107 bytes", path.display()))
                }
                _ => None,
            };
            if let Some(message) = bad {
                p.push(Problem::error(
                    Rule::Device,
                    message,
                    "use backend = \"tap0\" (a TAP interface) or backend = \"socket:/run/vm-link.sock\" (a link to another VM)",
                ));
                return None;
            }
            let mac = match &d.mac {
                None => default_mac(i),
                Some(text) => match parse_mac(text) {
                    Some(m) if m[0] & 1 == 0 => m,
                    Some(_) => {
                        p.push(Problem::error(
                            Rule::Device,
                            format!("{at}: mac {text} is a multicast address"),
                            "clear the lowest bit of the first byte, e.g. 52:54:00:12:34:56",
                        ));
                        return None;
                    }
                    None => {
                        p.push(Problem::error(
                            Rule::Device,
                            format!("{at}: mac `{text}` is not six hex bytes"),
                            "write it as 52:54:00:12:34:56",
                        ));
                        return None;
                    }
                },
            };
            DeviceKind::VirtioNet { backend, mac }
        }
        "virtio-console" => {
            let text = d.backend.as_deref().unwrap_or("stdio");
            let backend = match text {
                "stdio" => ConsoleBackend::Stdio,
                "pty" => ConsoleBackend::Pty,
                _ => match text.strip_prefix("socket:") {
                    Some(path) if !path.is_empty() && path.len() <= 107 => {
                        ConsoleBackend::Socket(PathBuf::from(path))
                    }
                    _ => {
                        p.push(Problem::error(
                            Rule::Device,
                            format!("{at}: backend `{text}` is not stdio, pty or socket:PATH (at most 107 bytes)"),
                            "use backend = \"stdio\", \"pty\" or \"socket:/run/vm-console.sock\"",
                        ));
                        return None;
                    }
                },
            };
            DeviceKind::VirtioConsole { backend }
        }
        "connector" => {
            let name = d.name.clone().unwrap_or_default();
            if name.is_empty() || name.len() > CONNECTOR_NAME_MAX || name.contains('\0') {
                p.push(Problem::error(
                    Rule::Device,
                    format!(
                        "{at}: name `{name}` must be 1 to {CONNECTOR_NAME_MAX} bytes without NUL"
                    ),
                    "give the connector a short name, e.g. name = \"storage\"",
                ));
                return None;
            }
            let size = d.dataport_size.map_or(0, |s| s.0);
            if size < 4 * KIB || !size.is_power_of_two() {
                p.push(Problem::error(
                    Rule::Device,
                    format!(
                        "{at}: dataport_size {} must be a power of two of at least 4 KiB (it is a PCI BAR)",
                        ByteSize(size)
                    ),
                    format!(
                        "use dataport_size = \"{}\"",
                        ByteSize(size.max(4 * KIB).checked_next_power_of_two().unwrap_or(1 << 63))
                    ),
                ));
                return None;
            }
            DeviceKind::Connector {
                name,
                dataport_size: size,
                peer: d.peer.clone(),
            }
        }
        "rpc-port" => {
            let Some(socket) = unix_socket(d) else {
                p.push(Problem::error(
                    Rule::Device,
                    format!("{at}: needs `socket`, a Unix socket path of at most 107 bytes"),
                    "write socket = \"/run/splitvirt/driver-a.sock\" (the driver VM's \
                         [backend] device_vm names the same path)",
                ));
                return None;
            };
            let size = d.pool_size.map_or(0, |s| s.0);
            if size < 64 * KIB || !size.is_multiple_of(4 * KIB) || size > 1 << 40 {
                p.push(Problem::error(
                    Rule::Device,
                    format!(
                        "{at}: pool_size {} must be the driver VM's pool size: a multiple of \
                         4 KiB from 64 KiB to 1 TiB",
                        ByteSize(size)
                    ),
                    "write the size of the driver VM's [pool], e.g. pool_size = \"64M\"",
                ));
                return None;
            }
            DeviceKind::RpcPort {
                socket,
                pool_size: size,
            }
        }
        // The window is given when the devices are placed.
        "virtio-pmem" => DeviceKind::VirtioPmem {
            image: image(p, " (a file whose size is a multiple of 2 MiB)")?,
            window: 0,
        },
        "vhost-user" => {
            return vhost_user_kind(&at, d, p);
        }
        other => {
            p.push(Problem::error(
                Rule::Device,
                format!("device[{i}]: unknown kind `{other}`"),
                "use one of virtio-blk, virtio-net, virtio-console, virtio-pmem, connector, rpc-port, vhost-user",
            ));
            return None;
        }
    };
    Some(kind)
}

/// The device's `socket`, if it is a path a Unix socket can have (sun_path holds 108 bytes
/// with the NUL).
fn unix_socket(d: &DeviceDesc) -> Option<PathBuf> {
    d.socket
        .clone()
        .filter(|s| !s.as_os_str().is_empty() && s.as_os_str().len() <= 107)
}

/// A vhost-user device: its backend's socket, the virtio device it serves, its queues.
fn vhost_user_kind(at: &str, d: &DeviceDesc, p: &mut Vec<Problem>) -> Option<DeviceKind> {
    let mut bad = |what: String, fix: &str| {
        p.push(Problem::error(Rule::Device, format!("{at}: {what}"), fix));
    };
    let Some(socket) = unix_socket(d) else {
        bad(
            "needs `socket`, the Unix socket path (at most 107 bytes) its backend listens on"
                .into(),
            "write socket = \"/run/vhost/disk.sock\" (qemu-storage-daemon --export \
                 type=vhost-user-blk,addr.type=unix,addr.path=/run/vhost/disk.sock,...)",
        );
        return None;
    };
    // (device ID, queues it has unless told)
    let (device_type, default_queues) = match d.device.as_deref() {
        Some("blk") => (2, 1),
        // The high-priority queue and one request queue.
        Some("fs") => (26, 2),
        // Receive and transmit of port 0 (no multiport).
        Some("console") => (3, 2),
        // Receive, transmit and events.
        Some("vsock") => (19, 3),
        other => {
            bad(
                format!(
                    "device {} is not one splitvirt can be the vhost-user frontend of",
                    other.map_or("(none)".into(), |o| format!("`{o}`"))
                ),
                "write device = \"blk\", \"fs\", \"vsock\" or \"console\"",
            );
            return None;
        }
    };
    let queues = d.queues.unwrap_or(default_queues);
    // blk: 1 to 64 request queues; console: port 0's two, or with its control queues
    // (VIRTIO_CONSOLE_F_MULTIPORT, one port) four.
    let allowed = match device_type {
        2 => (1..=64).contains(&queues),
        3 => queues == 2 || queues == 4,
        _ => queues == default_queues,
    };
    if !allowed {
        bad(
            format!("queues = {queues} is not a queue count this device can have"),
            "leave queues out, or give 1 to 64 for blk, 2 or 4 (multiport) for console",
        );
        return None;
    }
    let queue_size = d.queue_size.unwrap_or(128);
    if !queue_size.is_power_of_two() || queue_size < 2 {
        bad(
            format!("queue_size = {queue_size} is not a power of two from 2 to 32768"),
            "leave queue_size out (128), or write 256, 1024, ...",
        );
        return None;
    }
    Some(DeviceKind::VhostUser {
        socket,
        device_type,
        queues,
        queue_size,
    })
}

/// Locally administered, unicast, distinct per device.
fn default_mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(i as u8)]
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn default_msi_vectors(k: &DeviceKind) -> u32 {
    match k {
        // One vector for configuration changes plus one per virtqueue.
        DeviceKind::VirtioBlk { .. } => 2,
        DeviceKind::VirtioNet { .. } => 3,
        DeviceKind::VirtioConsole { .. } => 3,
        // One vector for the peer's events (its guest driver falls back to a shared INTx).
        DeviceKind::Connector { .. } => 1,
        // One vector for every doorbell of the driver VM (its backend looks at everything).
        DeviceKind::RpcPort { .. } => 1,
        DeviceKind::VhostUser { queues, .. } => 1 + u32::from(*queues),
        // Its one queue (flushes) and configuration changes.
        DeviceKind::VirtioPmem { .. } => 2,
    }
}

/// Slots, BARs, INTx and the MSI budget: derived, or as the description overrides them.
fn place_devices(l: &Layout, descs: &[DeviceDesc], p: &mut Vec<Problem>) -> Vec<Device> {
    let kinds: Vec<(usize, &DeviceDesc, DeviceKind)> = descs
        .iter()
        .enumerate()
        .filter_map(|(i, d)| device_kind(i, d, p).map(|k| (i, d, k)))
        .collect();
    check_unique_connectors(&kinds, p);

    // Slots: explicit ones first, then the lowest free slot from 1.
    let mut taken = [false; PCI_SLOTS as usize];
    taken[0] = true;
    let mut slots = vec![None; kinds.len()];
    for (n, (i, d, k)) in kinds.iter().enumerate() {
        let Some(s) = d.slot else { continue };
        if s == 0 || s >= PCI_SLOTS {
            p.push(Problem::error(
                Rule::Slots,
                format!(
                    "device[{i}] ({}): slot {s} is not 1..{}",
                    k.label(),
                    PCI_SLOTS - 1
                ),
                "slot 0 is the host bridge; use 1 to 31",
            ));
        } else if taken[s as usize] {
            p.push(Problem::error(
                Rule::Slots,
                format!("device[{i}] ({}): slot {s} is already taken", k.label()),
                "give each device its own slot, or leave slot out to have one chosen",
            ));
        } else {
            taken[s as usize] = true;
            slots[n] = Some(s);
        }
    }
    for (n, (i, d, k)) in kinds.iter().enumerate() {
        if d.slot.is_some() {
            continue;
        }
        match (1..PCI_SLOTS).find(|&s| !taken[s as usize]) {
            Some(s) => {
                taken[s as usize] = true;
                slots[n] = Some(s);
            }
            None => p.push(Problem::error(
                Rule::Slots,
                format!(
                    "device[{i}] ({}): more devices ({}) than PCI slots on bus 0 ({})",
                    k.label(),
                    kinds.len(),
                    PCI_SLOTS - 1
                ),
                "remove devices, or connect fewer than 32 per VM",
            )),
        }
    }

    let mut fixed_bars = Vec::new();
    let mut next_msi = l.v2m.as_ref().map(|v| v.spi_base);
    let mut msi_total = 0u32;
    let mut out = Vec::new();
    for (n, (i, d, kind)) in kinds.into_iter().enumerate() {
        let Some(slot) = slots[n] else { continue };
        let pin = match d.intx_pin.as_deref() {
            None => 1,
            Some(s @ ("A" | "B" | "C" | "D")) => u32::from(s.as_bytes()[0] - b'A' + 1),
            Some(other) => {
                p.push(Problem::error(
                    Rule::Device,
                    format!(
                        "device[{i}] ({}): intx_pin `{other}` is not A, B, C or D",
                        kind.label()
                    ),
                    "write intx_pin = \"A\"",
                ));
                1
            }
        };
        let msi_vectors = d.msi_vectors.unwrap_or_else(|| default_msi_vectors(&kind));
        if matches!(kind, DeviceKind::Connector { .. }) && msi_vectors > 1 {
            p.push(Problem::error(
                Rule::MsiBudget,
                format!("device[{i}] (connector): msi_vectors = {msi_vectors}, but the connector has one MSI-X vector"),
                "write msi_vectors = 1 (events by MSI-X) or 0 (INTx only), or leave it out",
            ));
        }
        if matches!(kind, DeviceKind::RpcPort { .. }) && (msi_vectors != 1 || l.v2m.is_none()) {
            p.push(Problem::error(
                Rule::MsiBudget,
                format!("device[{i}] (rpc-port): it has exactly one MSI-X vector and no INTx, so it needs msi_vectors = 1 and a GICv2m frame (msi_vectors = {msi_vectors}, v2m {})", if l.v2m.is_some() { "on" } else { "off" }),
                "leave msi_vectors out and keep gic.v2m on",
            ));
        }
        let msi_vectors = if l.v2m.is_some() { msi_vectors } else { 0 };
        msi_total = msi_total.saturating_add(msi_vectors);
        let msi_intids = next_msi.filter(|_| msi_vectors > 0).map(|first| {
            next_msi = Some(first.saturating_add(msi_vectors));
            (first, msi_vectors)
        });
        let placement = match (d.placement.as_deref(), &kind) {
            (
                _,
                DeviceKind::Connector { .. }
                | DeviceKind::RpcPort { .. }
                | DeviceKind::VhostUser { .. }
                | DeviceKind::VirtioPmem { .. },
            )
            | (Some("in-process"), _) => Placement::InProcess,
            (None | Some("backend"), _) => Placement::Backend,
            (Some(other), _) => {
                p.push(Problem::error(
                    Rule::Device,
                    format!(
                        "device[{i}] ({}): placement `{other}` is not in-process or backend",
                        kind.label()
                    ),
                    "write placement = \"backend\" (a separate process that sees only the pool) or \"in-process\"",
                ));
                Placement::InProcess
            }
        };
        fixed_bars.push((i, d.bar_base));
        out.push(Device {
            placement,
            intx_spi: l.swizzle(slot, pin),
            kind,
            slot,
            bars: Vec::new(),
            intx_pin: pin,
            msi_vectors,
            msi_intids,
        });
    }
    if let Some(v) = &l.v2m {
        if msi_total > v.spi_count {
            let parts: Vec<String> = out
                .iter()
                .filter(|d| d.msi_vectors > 0)
                .map(|d| format!("{} {}", d.kind.label(), d.msi_vectors))
                .collect();
            p.push(Problem::error(
                Rule::MsiBudget,
                format!(
                    "the devices need {msi_total} MSI SPIs ({}), the GICv2m frame has {}",
                    parts.join(" + "),
                    v.spi_count
                ),
                "raise gic.v2m.spi_count, lower msi_vectors on some devices, or remove devices",
            ));
        }
    }
    // BARs: fixed ones first, then the rest in slot order around them.
    let mut alloc = BarAllocator::new(l);
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by_key(|&n| (fixed_bars[n].1.is_none(), out[n].slot));
    for n in order {
        let (i, fixed) = fixed_bars[n];
        let msi = out[n].msi_vectors > 0;
        out[n].bars = alloc.place(i, out[n].slot, &out[n].kind, msi, fixed, p);
    }
    // An in-process device whose pin the description leaves open takes one whose line no
    // backend device uses (see check_intx_sharing).
    let backend_lines: Vec<u32> = out
        .iter()
        .filter(|d| d.placement == Placement::Backend)
        .map(|d| d.intx_spi)
        .collect();
    for (n, d) in out.iter_mut().enumerate() {
        let open = descs
            .get(fixed_bars[n].0)
            .is_some_and(|desc| desc.intx_pin.is_none());
        if d.placement == Placement::InProcess && open && backend_lines.contains(&d.intx_spi) {
            if let Some(pin) = (1..=4).find(|&n| !backend_lines.contains(&l.swizzle(d.slot, n))) {
                d.intx_pin = pin;
                d.intx_spi = l.swizzle(d.slot, pin);
            }
        }
    }
    out.sort_by_key(|d| d.slot);
    place_pmem(l, &mut out, p);
    check_intx_sharing(l, &out, p);
    out
}

/// Gives each virtio-pmem device its window, in slot order, clear of every region of the map.
fn place_pmem(l: &Layout, devices: &mut [Device], p: &mut Vec<Problem>) {
    let regions = l.regions();
    let mut n = 0;
    for d in devices.iter_mut() {
        let DeviceKind::VirtioPmem { window, .. } = &mut d.kind else {
            continue;
        };
        if n == PMEM_MAX {
            p.push(Problem::error(
                Rule::Device,
                format!("slot {}: more than {PMEM_MAX} virtio-pmem devices", d.slot),
                format!("a VM has room for {PMEM_MAX} regions of up to 64 GiB: remove some"),
            ));
            return;
        }
        let r = Region::new(
            "virtio-pmem window",
            PMEM_BASE + n * PMEM_WINDOW,
            PMEM_WINDOW,
        );
        if let Some(o) = regions.iter().find(|o| o.overlaps(&r)) {
            p.push(Problem::error(
                Rule::Overlap,
                format!("slot {}: the virtio-pmem device's {r} overlaps {o}", d.slot),
                format!("keep the {} below {PMEM_BASE:#x}", o.name),
            ));
        }
        *window = r.base;
        n += 1;
    }
}

/// A backend holds its devices' INTx levels; on a line shared with an in-process device it
/// could hold the line up and starve that device (and the guest's handler with it), unless the
/// device uses MSI-X (splitvirt then ignores its INTx). In-process devices whose pin is left
/// open avoid backend lines (`place_devices`); what sharing remains is said as a warning.
fn check_intx_sharing(l: &Layout, devices: &[Device], p: &mut Vec<Problem>) {
    let backend_lines: Vec<u32> = devices
        .iter()
        .filter(|d| d.placement == Placement::Backend)
        .map(|d| d.intx_spi)
        .collect();
    for d in devices
        .iter()
        .filter(|d| d.placement == Placement::InProcess)
    {
        let Some(b) = devices
            .iter()
            .find(|b| b.placement == Placement::Backend && b.intx_spi == d.intx_spi)
        else {
            continue;
        };
        let pin = |n: u32| ["A", "B", "C", "D"][(n - 1) as usize];
        let free = (1..=4).find(|&n| !backend_lines.contains(&l.swizzle(d.slot, n)));
        p.push(Problem::warning(
            Rule::IntxShared,
            format!(
                "the {} at slot {} (in-process, INTx pin {}) and the {} at slot {} (in the \
                 backend, pin {}) share INTx line SPI {}: unless the guest gives the backend's \
                 device MSI-X, the backend could hold the line and starve the in-process device",
                d.kind.label(),
                d.slot,
                pin(d.intx_pin),
                b.kind.label(),
                b.slot,
                pin(b.intx_pin),
                d.intx_spi
            ),
            match free {
                Some(n) => format!(
                    "give the {} intx_pin = \"{}\" (a line no backend device uses), or move it \
                     to another slot",
                    d.kind.label(),
                    pin(n)
                ),
                None => "backend devices use all four INTx lines: move some devices in-process \
                         or to slots whose lines they share among themselves"
                    .into(),
            },
        ));
    }
}

fn check_unique_connectors(kinds: &[(usize, &DeviceDesc, DeviceKind)], p: &mut Vec<Problem>) {
    let names: Vec<(usize, &str)> = kinds
        .iter()
        .filter_map(|(i, _, k)| match k {
            DeviceKind::Connector { name, .. } => Some((*i, name.as_str())),
            _ => None,
        })
        .collect();
    for (n, (i, a)) in names.iter().enumerate() {
        if let Some((j, _)) = names[n + 1..].iter().find(|(_, b)| b == a) {
            p.push(Problem::error(
                Rule::Device,
                format!("device[{i}] and device[{j}] are both connectors named `{a}`"),
                "give each connector its own name: the guest finds it by name",
            ));
        }
    }
}

/// Naturally aligned first-fit allocation in the PCI windows.
struct BarAllocator {
    mem32: Region,
    mem64: Option<Region>,
    placed: Vec<Region>,
}

impl BarAllocator {
    fn new(l: &Layout) -> Self {
        BarAllocator {
            mem32: l.pci.mem32.clone(),
            mem64: l.pci.mem64.clone(),
            placed: Vec::new(),
        }
    }

    /// The lowest aligned base in `window` clear of every placed BAR. Each step moves past
    /// one placed BAR for good, so this takes at most `placed.len()` steps.
    fn first_free(&self, window: &Region, size: u64) -> Option<u64> {
        let mut base = window.base.checked_next_multiple_of(size)?;
        loop {
            let r = Region::new("", base, size);
            if r.end().is_none() || !window.contains(&r) {
                return None;
            }
            match self.placed.iter().find(|o| o.overlaps(&r)) {
                Some(o) => base = o.last().checked_add(1)?.checked_next_multiple_of(size)?,
                None => return Some(base),
            }
        }
    }

    fn place(
        &mut self,
        i: usize,
        slot: u32,
        kind: &DeviceKind,
        msi: bool,
        fixed: Option<u64>,
        p: &mut Vec<Problem>,
    ) -> Vec<Bar> {
        // (index, size, 64-bit, prefetchable)
        let wanted: Vec<(u8, u64, bool, bool)> = match kind {
            DeviceKind::Connector { dataport_size, .. } => {
                // 32-bit BARs so that the dataport is BAR1, as the guest driver expects; the
                // MSI-X table is BAR 2, where there are MSIs.
                let mut bars = vec![
                    (0, CONNECTOR_EVENT_SIZE, false, true),
                    (1, *dataport_size, false, true),
                ];
                if msi {
                    bars.push((2, CONNECTOR_MSIX_SIZE, false, false));
                }
                bars
            }
            DeviceKind::RpcPort { pool_size, .. } => {
                // The registers (with the MSI-X table), the control region and the pool, at
                // the same indices whether or not there is a 64-bit window.
                let wide = self.mem64.is_some();
                vec![
                    (0, PORT_REGS_SIZE, false, false),
                    (2, PORT_CONTROL_BAR, wide, true),
                    (4, pool_size.next_power_of_two(), wide, true),
                ]
            }
            _ => vec![(
                0,
                VIRTIO_BAR_SIZE,
                self.mem64.is_some(),
                self.mem64.is_some(),
            )],
        };
        let mut cursor = fixed;
        let mut bars = Vec::new();
        for (index, size, is_64bit, prefetchable) in wanted {
            let window = match (&self.mem64, is_64bit) {
                (Some(w), true) => w.clone(),
                _ => self.mem32.clone(),
            };
            let what = format!("device[{i}] ({}) at slot {slot}: BAR{index}", kind.label());
            let base = match cursor {
                Some(c) if c % size != 0 && Some(c) == fixed => {
                    p.push(Problem::error(
                        Rule::BarPlacement,
                        format!(
                            "{what}: bar_base {c:#x} is not aligned to the BAR's size {}",
                            ByteSize(size)
                        ),
                        format!("use a multiple of {size:#x}"),
                    ));
                    return bars;
                }
                Some(c) => c.checked_next_multiple_of(size),
                None => self.first_free(&window, size),
            };
            let Some(base) = base else {
                p.push(Problem::error(
                    Rule::BarPlacement,
                    format!("{what} ({}) does not fit in the {window}", ByteSize(size)),
                    format!("enlarge the {}, or remove devices", window.name),
                ));
                return bars;
            };
            let r = Region::new(what.clone(), base, size);
            if r.end().is_none() || !window.contains(&r) {
                p.push(Problem::error(
                    Rule::BarPlacement,
                    format!("{r} is not inside the {window}"),
                    "fix the device's bar_base, or leave it out to have BARs placed for you",
                ));
                return bars;
            }
            if let Some(o) = self.placed.iter().find(|o| o.overlaps(&r)) {
                p.push(Problem::error(
                    Rule::BarPlacement,
                    format!("{r} overlaps {o}"),
                    "choose a bar_base clear of the other devices' BARs",
                ));
                return bars;
            }
            self.placed.push(r);
            cursor = cursor.map(|_| base + size);
            bars.push(Bar {
                index,
                base,
                size,
                is_64bit,
                prefetchable,
            });
        }
        bars
    }
}
