//! The guest device tree, one small function per node (after crosvm's `aarch64/src/fdt.rs`).

use layout::{DeviceKind, Layout, PoolReference};
use vm_fdt::{FdtWriter, FdtWriterResult};

pub const PHANDLE_GIC: u32 = 1;
pub const PHANDLE_V2M: u32 = 2;
pub const PHANDLE_POOL: u32 = 3;
pub const PHANDLE_APB_PCLK: u32 = 4;

// include/dt-bindings/interrupt-controller/arm-gic.h and irq.h
pub const GIC_SPI: u32 = 0;
pub const GIC_PPI: u32 = 1;
pub const IRQ_TYPE_EDGE_RISING: u32 = 1;
pub const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
pub const IRQ_TYPE_LEVEL_LOW: u32 = 8;

// PCI address space codes of the first `ranges` cell (IEEE 1275 PCI binding).
const PCI_SPACE_IO: u32 = 0x0100_0000;
const PCI_SPACE_MEM32: u32 = 0x0200_0000;
const PCI_SPACE_MEM64_PREFETCH: u32 = 0x4300_0000;

/// What the loader decides at boot and the tree must carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// Guest physical [start, end) of the initrd.
    pub initrd: Option<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
#[error("device tree generation failed: {0}")]
pub struct GenError(#[from] vm_fdt::Error);

pub fn generate(l: &Layout, boot: &BootInfo) -> Result<Vec<u8>, GenError> {
    let mut w = FdtWriter::new()?;
    let root = w.begin_node("")?;
    root_props(&mut w)?;
    chosen(&mut w, l, boot)?;
    memory(&mut w, l)?;
    cpus(&mut w, l)?;
    psci(&mut w)?;
    timer(&mut w, l)?;
    gic(&mut w, l)?;
    apb_pclk(&mut w, l)?;
    serial(&mut w, l)?;
    reserved_memory(&mut w, l)?;
    pci(&mut w, l)?;
    w.end_node(root)?;
    Ok(w.finish()?)
}

fn root_props(w: &mut FdtWriter) -> FdtWriterResult<()> {
    // QEMU's compatible for a machine that is described only by its tree.
    w.property_string("compatible", "linux,dummy-virt")?;
    w.property_string("model", "splitvirt")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_u32("interrupt-parent", PHANDLE_GIC)
}

pub fn serial_node_name(l: &Layout) -> String {
    format!("serial@{:x}", l.uart.region.base)
}

fn chosen(w: &mut FdtWriter, l: &Layout, boot: &BootInfo) -> FdtWriterResult<()> {
    let n = w.begin_node("chosen")?;
    w.property_string("bootargs", &l.cmdline)?;
    w.property_string("stdout-path", &format!("/{}", serial_node_name(l)))?;
    if let Some((start, end)) = boot.initrd {
        w.property_u64("linux,initrd-start", start)?;
        w.property_u64("linux,initrd-end", end)?;
    }
    w.end_node(n)
}

fn memory(w: &mut FdtWriter, l: &Layout) -> FdtWriterResult<()> {
    let n = w.begin_node(&format!("memory@{:x}", l.ram.base))?;
    w.property_string("device_type", "memory")?;
    w.property_array_u64("reg", &[l.ram.base, l.ram.size])?;
    w.end_node(n)
}

fn cpus(w: &mut FdtWriter, l: &Layout) -> FdtWriterResult<()> {
    let n = w.begin_node("cpus")?;
    w.property_u32("#address-cells", 1)?;
    w.property_u32("#size-cells", 0)?;
    for id in 0..l.vcpus {
        let c = w.begin_node(&format!("cpu@{id:x}"))?;
        w.property_string("device_type", "cpu")?;
        w.property_string("compatible", "arm,armv8")?;
        w.property_string("enable-method", "psci")?;
        // KVM's MPIDR for vCPU n has Aff0 = n for the first 16 vCPUs.
        w.property_u32("reg", id)?;
        w.end_node(c)?;
    }
    w.end_node(n)
}

fn psci(w: &mut FdtWriter) -> FdtWriterResult<()> {
    let n = w.begin_node("psci")?;
    w.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    w.property_string("method", "hvc")?;
    w.end_node(n)
}

/// GICv2 PPI flags carry a mask of the CPUs the interrupt goes to in bits 8..15.
fn ppi_flags(l: &Layout, trigger: u32) -> u32 {
    let mask = (1u32 << l.vcpus.min(8)) - 1;
    (mask << 8) | trigger
}

fn timer(w: &mut FdtWriter, l: &Layout) -> FdtWriterResult<()> {
    let n = w.begin_node("timer")?;
    w.property_string("compatible", "arm,armv8-timer")?;
    let flags = ppi_flags(l, IRQ_TYPE_LEVEL_LOW);
    let mut cells = Vec::new();
    for ppi in l.timer_ppis {
        cells.extend([GIC_PPI, ppi, flags]);
    }
    w.property_array_u32("interrupts", &cells)?;
    w.property_null("always-on")?;
    w.end_node(n)
}

fn gic(w: &mut FdtWriter, l: &Layout) -> FdtWriterResult<()> {
    let n = w.begin_node(&format!("interrupt-controller@{:x}", l.gic_dist.base))?;
    w.property_string("compatible", "arm,gic-400")?;
    w.property_u32("#interrupt-cells", 3)?;
    w.property_null("interrupt-controller")?;
    w.property_array_u64(
        "reg",
        &[
            l.gic_dist.base,
            l.gic_dist.size,
            l.gic_cpu.base,
            l.gic_cpu.size,
        ],
    )?;
    w.property_u32("phandle", PHANDLE_GIC)?;
    if l.v2m.is_some() {
        // The frame is a child with its own reg: the GIC node must translate addresses.
        w.property_u32("#address-cells", 2)?;
        w.property_u32("#size-cells", 2)?;
        w.property_null("ranges")?;
        v2m(w, l)?;
    } else {
        // interrupt-map entries carry #address-cells parent cells: say there are none.
        w.property_u32("#address-cells", 0)?;
    }
    w.end_node(n)
}

fn v2m(w: &mut FdtWriter, l: &Layout) -> FdtWriterResult<()> {
    let Some(v) = &l.v2m else { return Ok(()) };
    let n = w.begin_node(&format!("v2m@{:x}", v.region.base))?;
    w.property_string("compatible", "arm,gic-v2m-frame")?;
    w.property_null("msi-controller")?;
    w.property_array_u64("reg", &[v.region.base, v.region.size])?;
    w.property_u32("arm,msi-base-spi", v.spi_base)?;
    w.property_u32("arm,msi-num-spis", v.spi_count)?;
    w.property_u32("phandle", PHANDLE_V2M)?;
    w.end_node(n)
}

fn apb_pclk(w: &mut FdtWriter, l: &Layout) -> FdtWriterResult<()> {
    let n = w.begin_node("clock-apb-pclk")?;
    w.property_string("compatible", "fixed-clock")?;
    w.property_u32("#clock-cells", 0)?;
    w.property_u32("clock-frequency", l.uart.clock_hz)?;
    w.property_string("clock-output-names", "apb_pclk")?;
    w.property_u32("phandle", PHANDLE_APB_PCLK)?;
    w.end_node(n)
}

fn serial(w: &mut FdtWriter, l: &Layout) -> FdtWriterResult<()> {
    let n = w.begin_node(&serial_node_name(l))?;
    w.property_string_list(
        "compatible",
        vec!["arm,pl011".into(), "arm,primecell".into()],
    )?;
    w.property_array_u64("reg", &[l.uart.region.base, l.uart.region.size])?;
    w.property_array_u32("interrupts", &[GIC_SPI, l.uart.spi, IRQ_TYPE_LEVEL_HIGH])?;
    w.property_array_u32("clocks", &[PHANDLE_APB_PCLK, PHANDLE_APB_PCLK])?;
    w.property_string_list("clock-names", vec!["uartclk".into(), "apb_pclk".into()])?;
    w.end_node(n)
}

pub fn pool_node_name(base: u64) -> String {
    format!("swiotlb@{base:x}")
}

fn reserved_memory(w: &mut FdtWriter, l: &Layout) -> FdtWriterResult<()> {
    let Some(pool) = &l.pool else { return Ok(()) };
    let n = w.begin_node("reserved-memory")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_null("ranges")?;
    // Never `reusable` or `no-map`: Linux refuses a restricted pool that has them (facts #1).
    let p = w.begin_node(&pool_node_name(pool.base))?;
    w.property_string("compatible", "restricted-dma-pool")?;
    w.property_array_u64("reg", &[pool.base, pool.size])?;
    w.property_u32("phandle", PHANDLE_POOL)?;
    w.end_node(p)?;
    w.end_node(n)
}

/// 64-bit values as two cells, high first.
fn split(v: u64) -> [u32; 2] {
    [(v >> 32) as u32, v as u32]
}

fn pci_ranges(l: &Layout) -> Vec<u32> {
    let mut r = Vec::new();
    let mut add = |space: u32, pci_addr: u64, cpu: u64, size: u64| {
        r.push(space);
        r.extend(split(pci_addr));
        r.extend(split(cpu));
        r.extend(split(size));
    };
    let p = &l.pci;
    // I/O ports count from 0 on the bus; memory is identity-mapped.
    add(PCI_SPACE_IO, 0, p.io.base, p.io.size);
    add(PCI_SPACE_MEM32, p.mem32.base, p.mem32.base, p.mem32.size);
    if let Some(m) = &p.mem64 {
        add(PCI_SPACE_MEM64_PREFETCH, m.base, m.base, m.size);
    }
    r
}

/// INTx routing for the first four slots and all four pins; the mask folds every other slot
/// onto them, which is the standard swizzle (QEMU virt does the same).
pub fn interrupt_map(l: &Layout) -> Vec<u32> {
    let mut m = Vec::new();
    for slot in 0..4u32 {
        for pin in 1..=4u32 {
            m.extend([slot << 11, 0, 0, pin]);
            // The GIC has #address-cells = 2 when it has the v2m child, else 0.
            m.push(PHANDLE_GIC);
            if l.v2m.is_some() {
                m.extend([0, 0]);
            }
            m.extend([GIC_SPI, l.swizzle(slot, pin), IRQ_TYPE_LEVEL_HIGH]);
        }
    }
    m
}

pub const INTERRUPT_MAP_MASK: [u32; 4] = [0x1800, 0, 0, 7];

fn pci(w: &mut FdtWriter, l: &Layout) -> FdtWriterResult<()> {
    let p = &l.pci;
    let n = w.begin_node(&format!("pcie@{:x}", p.ecam.base))?;
    w.property_string("compatible", "pci-host-ecam-generic")?;
    w.property_string("device_type", "pci")?;
    w.property_array_u64("reg", &[p.ecam.base, p.ecam.size])?;
    w.property_array_u32("bus-range", &[p.bus_start, p.bus_end])?;
    w.property_u32("linux,pci-domain", 0)?;
    w.property_u32("#address-cells", 3)?;
    w.property_u32("#size-cells", 2)?;
    w.property_u32("#interrupt-cells", 1)?;
    w.property_array_u32("ranges", &pci_ranges(l))?;
    w.property_array_u32("interrupt-map", &interrupt_map(l))?;
    w.property_array_u32("interrupt-map-mask", &INTERRUPT_MAP_MASK)?;
    // A dangling msi-parent makes every device fail to probe (facts #9): only with a frame.
    if l.v2m.is_some() {
        w.property_u32("msi-parent", PHANDLE_V2M)?;
    }
    w.property_null("dma-coherent")?;
    if l.pool.is_some() {
        match p.pool_reference {
            PoolReference::HostBridge => w.property_u32("memory-region", PHANDLE_POOL)?,
            PoolReference::PerDevice => pci_device_nodes(w, l)?,
        }
    }
    w.end_node(n)
}

/// One child per function, so that each device finds the pool in its own node (facts #7).
fn pci_device_nodes(w: &mut FdtWriter, l: &Layout) -> FdtWriterResult<()> {
    for d in &l.devices {
        let name = match d.kind {
            DeviceKind::VirtioBlk { .. }
            | DeviceKind::VirtioNet { .. }
            | DeviceKind::VirtioConsole { .. }
            | DeviceKind::VhostUser { .. }
            | DeviceKind::VirtioPmem { .. } => "virtio",
            DeviceKind::Connector { .. } => "connector",
            // It reaches no memory of this VM's but what KVM maps into its BARs: no pool.
            DeviceKind::RpcPort { .. } => continue,
        };
        let n = w.begin_node(&format!("{name}@{:x},0", d.slot))?;
        w.property_array_u32("reg", &[d.slot << 11, 0, 0, 0, 0])?;
        w.property_u32("memory-region", PHANDLE_POOL)?;
        w.end_node(n)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Tree;
    use layout::{resolve, Description};

    /// The seed's driver VM (disk, network and console), as the examples file writes it.
    fn default_layout() -> Layout {
        let f =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/driver-vm.toml");
        resolve(&Description::load(&f).unwrap()).unwrap().layout
    }

    /// Runs one node function inside a root node and reads the result back.
    fn only(f: impl FnOnce(&mut FdtWriter) -> FdtWriterResult<()>) -> Tree {
        let mut w = FdtWriter::new().unwrap();
        let r = w.begin_node("").unwrap();
        f(&mut w).unwrap();
        w.end_node(r).unwrap();
        Tree::parse(&w.finish().unwrap()).unwrap()
    }

    #[test]
    fn chosen_has_bootargs_stdout_and_initrd_only_when_given() {
        let l = default_layout();
        let t = only(|w| chosen(w, &l, &BootInfo::default()));
        let c = t.find("/chosen").unwrap();
        assert_eq!(c.strings("bootargs"), vec![l.cmdline.as_str()]);
        assert_eq!(c.strings("stdout-path"), vec!["/serial@9000000"]);
        assert!(!c.has("linux,initrd-start"));
        let t = only(|w| {
            chosen(
                w,
                &l,
                &BootInfo {
                    initrd: Some((0x4800_0000, 0x4810_0000)),
                },
            )
        });
        let c = t.find("/chosen").unwrap();
        assert_eq!(c.cells("linux,initrd-start"), Some(vec![0, 0x4800_0000]));
        assert_eq!(c.cells("linux,initrd-end"), Some(vec![0, 0x4810_0000]));
    }

    #[test]
    fn memory_node_matches_ram() {
        let l = default_layout();
        let t = only(|w| memory(w, &l));
        let m = t.find("/memory@40000000").unwrap();
        assert_eq!(m.strings("device_type"), vec!["memory"]);
        assert_eq!(m.reg(2, 2), Some(vec![(0x4000_0000, 0x2000_0000)]));
    }

    #[test]
    fn one_cpu_node_per_vcpu_with_psci() {
        let mut l = default_layout();
        l.vcpus = 3;
        let t = only(|w| cpus(w, &l));
        let c = t.find("/cpus").unwrap();
        assert_eq!(c.children.len(), 3);
        assert_eq!(c.child("cpu@2").unwrap().prop_u32("reg"), Some(2));
        assert_eq!(
            c.child("cpu@0").unwrap().strings("enable-method"),
            vec!["psci"]
        );
    }

    #[test]
    fn psci_uses_hvc() {
        let t = only(psci);
        let p = t.find("/psci").unwrap();
        assert_eq!(
            p.strings("compatible"),
            vec!["arm,psci-1.0", "arm,psci-0.2"]
        );
        assert_eq!(p.strings("method"), vec!["hvc"]);
    }

    #[test]
    fn timer_ppis_carry_the_cpu_mask() {
        let l = default_layout();
        let t = only(|w| timer(w, &l));
        let cells = t.find("/timer").unwrap().cells("interrupts").unwrap();
        // 2 vCPUs: mask 0b11 in bits 8..15, level-low.
        assert_eq!(&cells[..3], &[GIC_PPI, 13, 0x308]);
        assert_eq!(
            cells.iter().skip(1).step_by(3).copied().collect::<Vec<_>>(),
            vec![13, 14, 11, 10]
        );
    }

    #[test]
    fn gic_has_the_v2m_frame_as_child() {
        let l = default_layout();
        let t = only(|w| gic(w, &l));
        let g = t.find("/interrupt-controller@8000000").unwrap();
        assert!(g.is_compatible("arm,gic-400"));
        assert_eq!(
            g.reg(2, 2),
            Some(vec![(0x0800_0000, 0x1_0000), (0x0801_0000, 0x1_0000)])
        );
        let v = g.child("v2m@8020000").unwrap();
        assert!(v.has("msi-controller"));
        assert_eq!(v.prop_u32("arm,msi-base-spi"), Some(64));
        assert_eq!(v.prop_u32("arm,msi-num-spis"), Some(64));
        assert_eq!(v.prop_u32("phandle"), Some(PHANDLE_V2M));
    }

    #[test]
    fn gic_without_v2m_has_no_children_or_address_cells() {
        let mut l = default_layout();
        l.v2m = None;
        let t = only(|w| gic(w, &l));
        let g = t.find("/interrupt-controller@8000000").unwrap();
        assert!(g.children.is_empty());
        assert_eq!(g.prop_u32("#address-cells"), Some(0));
    }

    #[test]
    fn serial_and_its_clock() {
        let l = default_layout();
        let t = only(|w| {
            apb_pclk(w, &l)?;
            serial(w, &l)
        });
        let s = t.find("/serial@9000000").unwrap();
        assert_eq!(
            s.cells("interrupts"),
            Some(vec![GIC_SPI, 1, IRQ_TYPE_LEVEL_HIGH])
        );
        assert_eq!(s.strings("clock-names"), vec!["uartclk", "apb_pclk"]);
        let c = t.find("/clock-apb-pclk").unwrap();
        assert_eq!(c.prop_u32("clock-frequency"), Some(24_000_000));
    }

    #[test]
    fn pool_is_never_reusable_or_no_map() {
        let l = default_layout();
        let t = only(|w| reserved_memory(w, &l));
        let p = t.find("/reserved-memory/swiotlb@50000000").unwrap();
        assert!(p.is_compatible("restricted-dma-pool"));
        assert_eq!(p.reg(2, 2), Some(vec![(0x5000_0000, 0x400_0000)]));
        for bad in [
            "reusable",
            "no-map",
            "linux,cma-default",
            "linux,dma-default",
        ] {
            assert!(!p.has(bad), "{bad}");
        }
    }

    #[test]
    fn pci_ranges_cover_io_mem32_mem64() {
        let l = default_layout();
        let r = pci_ranges(&l);
        assert_eq!(r.len(), 21);
        assert_eq!(&r[..7], &[PCI_SPACE_IO, 0, 0, 0, 0x3eff_0000, 0, 0x1_0000]);
        assert_eq!(r[7], PCI_SPACE_MEM32);
        assert_eq!(&r[14..17], &[PCI_SPACE_MEM64_PREFETCH, 0x80, 0]);
    }

    #[test]
    fn interrupt_map_follows_the_swizzle() {
        let l = default_layout();
        let m = interrupt_map(&l);
        assert_eq!(m.len(), 16 * 10);
        // slot 1, INTA -> second line (SPI 4), as QEMU virt routes it.
        let e = &m[10 * 4..10 * 5];
        assert_eq!(
            e,
            &[
                1 << 11,
                0,
                0,
                1,
                PHANDLE_GIC,
                0,
                0,
                GIC_SPI,
                4,
                IRQ_TYPE_LEVEL_HIGH
            ]
        );
        let mut l2 = l.clone();
        l2.v2m = None;
        assert_eq!(interrupt_map(&l2).len(), 16 * 8);
    }

    #[test]
    fn pci_node_per_device_pool_reference() {
        let l = default_layout();
        let t = only(|w| pci(w, &l));
        let p = t.find("/pcie@70000000").unwrap();
        assert!(p.is_compatible("pci-host-ecam-generic"));
        assert_eq!(p.prop_u32("msi-parent"), Some(PHANDLE_V2M));
        assert!(p.has("dma-coherent") && !p.has("memory-region"));
        assert_eq!(p.children.len(), 3);
        let d = p.child("virtio@2,0").unwrap();
        assert_eq!(d.cells("reg"), Some(vec![2 << 11, 0, 0, 0, 0]));
        assert_eq!(d.prop_u32("memory-region"), Some(PHANDLE_POOL));
    }

    #[test]
    fn pci_node_host_bridge_reference_and_no_msi_without_frame() {
        let mut l = default_layout();
        l.pci.pool_reference = PoolReference::HostBridge;
        l.v2m = None;
        let t = only(|w| pci(w, &l));
        let p = t.find("/pcie@70000000").unwrap();
        assert_eq!(p.prop_u32("memory-region"), Some(PHANDLE_POOL));
        assert!(p.children.is_empty());
        assert!(!p.has("msi-parent"));
    }
}
