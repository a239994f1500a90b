//! One bad description per rule: each must be rejected by that rule, with a message that
//! names the things involved.

use layout::{check, resolve, Description, Rule, Severity};
use std::time::Duration;

fn problems(toml: &str) -> Vec<layout::Problem> {
    let d = Description::parse(toml, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    check(&d)
}

/// The layout a valid description resolves to.
fn layout_of(toml: &str) -> layout::Layout {
    resolve(&Description::parse(toml, "t.toml").unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|e| panic!("{e}"))
        .layout
}

/// Asserts an error of `rule` whose message contains every needle.
fn rejects(toml: &str, rule: Rule, needles: &[&str]) {
    finds(toml, rule, Severity::Error, needles)
}

/// Asserts a problem of `rule` and `severity` whose message contains every needle.
fn finds(toml: &str, rule: Rule, severity: Severity, needles: &[&str]) {
    let ps = problems(toml);
    let hit = ps.iter().find(|p| {
        p.rule == rule && p.severity == severity && needles.iter().all(|n| p.message.contains(n))
    });
    assert!(
        hit.is_some(),
        "expected {rule:?} with {needles:?}, got:\n{}",
        layout::problem::render(&ps)
    );
    assert!(!hit.unwrap().fix.is_empty());
}

/// Asserts that `rule` finds nothing in the description (the boundary case of a `rejects`).
fn accepts(toml: &str, rule: Rule) {
    let ps = problems(toml);
    assert!(
        !ps.iter().any(|p| p.rule == rule),
        "{rule:?} should accept it:\n{}",
        layout::problem::render(&ps)
    );
}

#[test]
fn the_default_is_valid_and_has_no_warnings() {
    let r = resolve(&Description::default_vm()).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let l = r.layout;
    assert_eq!(l.vcpus, 2);
    assert_eq!((l.ram.base, l.ram.size), (0x4000_0000, 512 << 20));
    assert_eq!(
        l.pool.as_ref().map(|p| (p.base, p.size)),
        Some((0x5000_0000, 64 << 20))
    );
    // Nothing that needs a host file or privilege: one console, in the backend.
    assert_eq!(l.devices.len(), 1);
    assert_eq!(l.devices[0].slot, 1);
    assert!(!l.cmdline.contains("root="), "{}", l.cmdline);
}

/// The seed's driver VM with its disk, TAP and console, as examples/driver-vm.toml writes it.
fn seed_vm() -> Description {
    Description::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/driver-vm.toml"),
    )
    .unwrap()
}

#[test]
fn the_seeds_driver_vm_is_valid() {
    let r = resolve(&seed_vm()).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(
        r.layout.devices.iter().map(|d| d.slot).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(r.layout.cmdline.contains("root=/dev/vda2"));
}

#[test]
fn the_qemu_virt_profile_is_valid() {
    let d = Description::parse("profile = \"qemu-virt\"", "t").unwrap();
    let l = resolve(&d).unwrap().layout;
    assert_eq!(l.pci.ecam.base, 0x3f00_0000);
    assert_eq!(l.v2m.unwrap().spi_base, 80);
}

#[test]
fn the_seeds_overlapping_window_is_rejected_naming_both_regions() {
    // facts #2: the seed's 32-bit window at 0x5000_0000 lies inside RAM and over the pool.
    rejects(
        "[pci.mem32]\nbase = 0x50000000\nsize = \"512M\"\n",
        Rule::Overlap,
        &[
            "RAM [0x40000000-0x5fffffff]",
            "PCI 32-bit window [0x50000000-0x6fffffff]",
        ],
    );
    rejects(
        "[pci.mem32]\nbase = 0x50000000\nsize = \"512M\"\n",
        Rule::Overlap,
        &["restricted DMA pool", "PCI 32-bit window"],
    );
}

#[test]
fn every_pair_of_fixed_regions_is_checked() {
    rejects(
        "[uart]\nbase = 0x08000000\n",
        Rule::Overlap,
        &["GIC distributor", "PL011 UART"],
    );
    rejects(
        "[gic.v2m]\nbase = 0x08010000\n",
        Rule::Overlap,
        &["GIC CPU interface", "GICv2m frame"],
    );
    rejects(
        "[pci]\necam_base = 0x3ef00000\n",
        Rule::Overlap,
        &["PCI ECAM", "PCI I/O window"],
    );
    rejects(
        "[pci.mem64]\nbase = 0x10000000\nsize = \"64M\"\n",
        Rule::Overlap,
        &["PCI 32-bit window", "PCI 64-bit window"],
    );
    rejects(
        "[memory]\nsize = \"1G\"\n",
        Rule::Overlap,
        &["RAM", "PCI ECAM"],
    );
}

#[test]
fn pool_outside_ram_or_misaligned() {
    rejects(
        "[pool]\nbase = 0x70000000\n",
        Rule::PoolOutsideRam,
        &["restricted DMA pool", "RAM"],
    );
    rejects(
        "[pool]\nbase = 0x5e000000\n",
        Rule::PoolOutsideRam,
        &["0x61ffffff"],
    );
    rejects(
        "[pool]\nbase = 0x50000800\n",
        Rule::Alignment,
        &["restricted DMA pool", "4 KiB"],
    );
    rejects(
        "[pool]\nsize = 4097\n",
        Rule::Alignment,
        &["restricted DMA pool"],
    );
    rejects("[pool]\nsize = \"512K\"\n", Rule::PoolSize, &["512 KiB"]);
}

#[test]
fn no_pool_is_a_warning_not_an_error() {
    let mut d = Description::default_vm();
    d.pool = None;
    let r = resolve(&d).unwrap();
    assert!(r
        .warnings
        .iter()
        .any(|w| w.message.contains("reach all of guest RAM")));
}

#[test]
fn ecam_must_cover_the_bus_range() {
    rejects(
        "[pci]\nbus_range = [0, 31]\n",
        Rule::EcamSize,
        &["PCI ECAM", "[0, 31]", "32 MiB"],
    );
    rejects("[pci]\nbus_range = [3, 1]\n", Rule::BusRange, &["[3, 1]"]);
    rejects(
        "[pci]\necam_base = 0x70080000\n",
        Rule::Alignment,
        &["PCI ECAM"],
    );
}

#[test]
fn ram_must_be_whole_2mib_blocks() {
    rejects(
        "[memory]\nsize = \"513M\"\n",
        Rule::RamSize,
        &["513 MiB", "2 MiB"],
    );
    rejects(
        "[memory]\nbase = 0x40100000\n",
        Rule::Alignment,
        &["0x40100000"],
    );
    rejects("[memory]\nsize = \"32M\"\n", Rule::RamSize, &["32 MiB"]);
}

#[test]
fn interrupt_collisions_are_named() {
    rejects(
        "[uart]\nspi = 3\n",
        Rule::IrqCollision,
        &["PL011 UART", "PCI INTA"],
    );
    rejects(
        "[pci]\nintx_spis = [40, 4, 5, 6]\n",
        Rule::IrqCollision,
        &["PCI INTA", "GICv2m"],
    );
    rejects(
        "[uart]\nspi = 33\n",
        Rule::IrqCollision,
        &["PL011 UART", "GICv2m"],
    );
    rejects(
        "[timer]\nppis = [13, 13, 11, 10]\n",
        Rule::IrqCollision,
        &["secure physical", "non-secure physical"],
    );
    rejects(
        "[timer]\nppis = [13, 14, 11, 20]\n",
        Rule::IrqRange,
        &["hypervisor", "PPI 20"],
    );
    rejects("[uart]\nspi = 2000\n", Rule::IrqRange, &["SPI 2000"]);
}

#[test]
fn v2m_range_must_be_spis() {
    rejects("[gic.v2m]\nspi_base = 16\n", Rule::V2mRange, &["16"]);
    rejects(
        "[gic.v2m]\nspi_base = 1000\nspi_count = 64\n",
        Rule::V2mRange,
        &["1063"],
    );
    rejects(
        "[gic.v2m]\nspi_count = 0\n",
        Rule::V2mRange,
        &["spi_count 0"],
    );
    // Interrupt ID 1019 is an SPI, but Linux's gic-v2m refuses base + count > 1019.
    rejects(
        "[gic.v2m]\nspi_base = 1000\nspi_count = 20\n",
        Rule::V2mRange,
        &["1000..1019", "spi_count 20"],
    );
    accepts(
        "[gic.v2m]\nspi_base = 1000\nspi_count = 19\n",
        Rule::V2mRange,
    );
}

#[test]
fn gic_cpu_interface_holds_gicc_dir() {
    rejects(
        "[gic]\ncpu_interface_size = \"4K\"\n",
        Rule::GicSize,
        &["GIC CPU interface", "4 KiB", "8 KiB"],
    );
    accepts("[gic]\ncpu_interface_size = \"8K\"\n", Rule::GicSize);
}

#[test]
fn the_32_bit_window_ends_below_4_gib() {
    rejects(
        "[pci.mem32]\nbase = 0xf0000000\nsize = \"512M\"\n",
        Rule::PciWindow,
        &["PCI 32-bit window", "0xf0000000", "4 GiB"],
    );
    accepts(
        "[pci.mem32]\nbase = 0xe0000000\nsize = \"512M\"\n",
        Rule::PciWindow,
    );
}

#[test]
fn too_many_devices_for_slots_or_spis() {
    let many = "[[device]]\nkind = \"virtio-console\"\n".repeat(32);
    rejects(&many, Rule::Slots, &["more devices (32) than PCI slots"]);
    let few_spis = format!(
        "[gic.v2m]\nspi_count = 8\n{}",
        "[[device]]\nkind = \"virtio-net\"\nbackend = \"t\"\n".repeat(3)
    );
    rejects(&few_spis, Rule::MsiBudget, &["9 MSI SPIs", "has 8"]);
    rejects(
        "[[device]]\nkind = \"virtio-console\"\nslot = 0\n",
        Rule::Slots,
        &["slot 0"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-console\"\nslot = 4\n[[device]]\nkind = \"virtio-console\"\nslot = 4\n",
        Rule::Slots,
        &["slot 4 is already taken"],
    );
}

#[test]
fn swiotlb_counts_2kib_slabs() {
    // The seed's own value: it thought 65536 x 4 KiB = 256 MiB; it is 128 MiB, a quarter of RAM.
    let ps = problems("[kernel]\ncmdline = \"console=ttyAMA0 swiotlb=65536\"\n");
    let p = ps
        .iter()
        .find(|p| p.rule == Rule::Swiotlb)
        .expect("swiotlb flagged");
    assert!(
        p.message.contains("128 MiB") && p.message.contains("not 256 MiB"),
        "{}",
        p.message
    );
    // Trying to size the 64 MiB pool with 4 KiB pages: an error.
    rejects(
        "[kernel]\ncmdline = \"swiotlb=16384\"\n",
        Rule::Swiotlb,
        &["32 MiB", "not 64 MiB", "restricted DMA pool"],
    );
    // Half of RAM or more cannot be meant.
    rejects(
        "[kernel]\ncmdline = \"swiotlb=262144\"\n",
        Rule::Swiotlb,
        &["512 MiB"],
    );
    rejects(
        "[kernel]\ncmdline = \"swiotlb=lots\"\n",
        Rule::Swiotlb,
        &["lots"],
    );
    assert!(problems("[kernel]\ncmdline = \"swiotlb=noforce\"\n").is_empty());
}

#[test]
fn earlycon_must_point_at_the_uart() {
    rejects(
        "[kernel]\ncmdline = \"earlycon=pl011,0x9001000\"\n",
        Rule::Earlycon,
        &["0x9001000", "PL011 UART [0x9000000"],
    );
}

#[test]
fn vcpus_fit_a_gicv2() {
    rejects("vcpus = 9\n", Rule::Vcpus, &["vcpus = 9"]);
    rejects("vcpus = 0\n", Rule::Vcpus, &["vcpus = 0"]);
}

#[test]
fn regions_stay_in_the_40_bit_space() {
    rejects(
        "[pci.mem64]\nbase = 0xff00000000\nsize = \"8G\"\n",
        Rule::AddressSpace,
        &["PCI 64-bit window", "1 TiB"],
    );
    // A region that wraps past 2^64 (only reachable from code: TOML integers are i64).
    let mut d = Description::default_vm();
    d.pci.mem64 = Some(layout::desc::Window {
        base: u64::MAX - 0xfff,
        size: layout::ByteSize(1 << 20),
    });
    assert!(check(&d)
        .iter()
        .any(|p| p.rule == Rule::AddressSpace && p.message.contains("PCI 64-bit window")));
}

#[test]
fn device_fields_are_checked_per_kind() {
    rejects(
        "[[device]]\nkind = \"virtio-blk\"\n",
        Rule::Device,
        &["has no image"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-blk\"\nimage = \"d\"\nmac = \"52:54:00:00:00:01\"\n",
        Rule::Device,
        &["`mac` is not a field of a virtio-blk device"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-gpu\"\n",
        Rule::Device,
        &["unknown kind `virtio-gpu`"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-net\"\nbackend = \"t\"\nmac = \"01:00:00:00:00:01\"\n",
        Rule::Device,
        &["multicast"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-net\"\nbackend = \"t\"\nmac = \"52:54:00\"\n",
        Rule::Device,
        &["not six hex bytes"],
    );
    rejects(
        "[[device]]\nkind = \"connector\"\nname = \"a\"\ndataport_size = \"12K\"\n",
        Rule::Device,
        &["12 KiB", "power of two"],
    );
    rejects(
        "[[device]]\nkind = \"connector\"\nname = \"a\"\ndataport_size = \"4K\"\n[[device]]\nkind = \"connector\"\nname = \"a\"\ndataport_size = \"4K\"\n",
        Rule::Device,
        &["both connectors named `a`"],
    );
    let long = "x".repeat(50);
    rejects(
        &format!("[[device]]\nkind = \"connector\"\nname = \"{long}\"\ndataport_size = \"4K\"\n"),
        Rule::Device,
        &["1 to 49 bytes"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-console\"\nintx_pin = \"E\"\n",
        Rule::Device,
        &["intx_pin `E`"],
    );
}

#[test]
fn halt_poll_is_bounded_and_reaches_the_layout() {
    let l = |text: &str| layout_of(text).halt_poll;
    assert_eq!(l("halt_poll_us = 2000"), Some(Duration::from_millis(2)));
    assert_eq!(
        l("halt_poll_us = 0"),
        Some(Duration::ZERO),
        "no polling at all"
    );
    assert_eq!(l(""), None, "the host's default");
    rejects(
        "halt_poll_us = 20000",
        Rule::Vcpus,
        &["halt_poll_us = 20000", "10000"],
    );
}

#[test]
fn backend_table_is_bounded_and_reaches_the_layout() {
    let l = layout_of("[backend]\npoll_us = 50");
    assert_eq!(l.rpc_poll, Some(std::time::Duration::from_micros(50)));
    let l = layout_of("[backend]\npoll_us = 0");
    assert_eq!(l.rpc_poll, None);
    assert_eq!(
        resolve(&Description::default_vm()).unwrap().layout.rpc_poll,
        None
    );
    rejects(
        "[backend]\npoll_us = 20000",
        Rule::Backend,
        &["backend.poll_us = 20000", "10000"],
    );
    let ps = problems(
        "[backend]\npoll_us = 50\n[[device]]\nkind = \"virtio-console\"\nbackend = \"pty\"\n\
         placement = \"in-process\"",
    );
    assert!(
        ps.iter()
            .any(|p| p.rule == Rule::Backend && p.severity == Severity::Warning),
        "{ps:?}"
    );
    assert!(Description::parse("[backend]\npoll = 50", "t").is_err());
    let l = resolve(
        &Description::parse("[backend]\nrestarts = 0\nconnect = \"/run/b.sock\"", "t").unwrap(),
    )
    .unwrap()
    .layout;
    assert_eq!(l.rpc_restarts, 0);
    assert_eq!(
        l.rpc_connect.as_deref(),
        Some(std::path::Path::new("/run/b.sock"))
    );
    let l = resolve(&Description::default_vm()).unwrap().layout;
    assert_eq!((l.rpc_restarts, l.rpc_connect), (3, None));
}

#[test]
fn backends_and_disk_formats_are_parsed_or_named() {
    use layout::{ConsoleBackend, DeviceKind, DiskFormat, NetBackend};
    let kinds = |toml: &str| {
        let d = Description::parse(toml, "test.toml").unwrap();
        resolve(&d)
            .unwrap_or_else(|e| panic!("{e}"))
            .layout
            .devices
            .into_iter()
            .map(|d| d.kind)
            .collect::<Vec<_>>()
    };
    let k = kinds(
        "[[device]]\nkind = \"virtio-blk\"\nimage = \"a.qcow2\"\nformat = \"qcow2\"\n\
         [[device]]\nkind = \"virtio-net\"\nbackend = \"socket:/run/link.sock\"\n\
         [[device]]\nkind = \"virtio-net\"\nbackend = \"tap:tap3\"\n\
         [[device]]\nkind = \"virtio-console\"\nbackend = \"socket:/run/hvc.sock\"\n\
         [[device]]\nkind = \"virtio-console\"\nbackend = \"pty\"\n\
         [[device]]\nkind = \"virtio-console\"\n",
    );
    assert!(matches!(
        &k[0],
        DeviceKind::VirtioBlk {
            format: Some(DiskFormat::Qcow2),
            ..
        }
    ));
    assert!(
        matches!(&k[1], DeviceKind::VirtioNet { backend: NetBackend::Socket(p), .. } if p.to_str() == Some("/run/link.sock"))
    );
    assert!(
        matches!(&k[2], DeviceKind::VirtioNet { backend: NetBackend::Tap(t), .. } if t == "tap3")
    );
    assert!(matches!(
        &k[3],
        DeviceKind::VirtioConsole {
            backend: ConsoleBackend::Socket(_)
        }
    ));
    assert!(matches!(
        &k[4],
        DeviceKind::VirtioConsole {
            backend: ConsoleBackend::Pty
        }
    ));
    assert!(matches!(
        &k[5],
        DeviceKind::VirtioConsole {
            backend: ConsoleBackend::Stdio
        }
    ));
    rejects(
        "[[device]]\nkind = \"virtio-blk\"\nimage = \"d\"\nformat = \"vmdk\"\n",
        Rule::Device,
        &["format `vmdk`"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-console\"\nbackend = \"tcp:1234\"\n",
        Rule::Device,
        &["backend `tcp:1234`", "stdio, pty or socket"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-net\"\nbackend = \"socket:\"\n",
        Rule::Device,
        &["names no socket path"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-net\"\nbackend = \"a-very-long-interface-name\"\n",
        Rule::Device,
        &["not a TAP interface name"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-net\"\nbackend = \"t\"\nformat = \"raw\"\n",
        Rule::Device,
        &["`format` is not a field of a virtio-net device"],
    );
}

#[test]
fn bar_placement_is_derived_and_overridable() {
    let d = Description::parse(
        "[[device]]\nkind = \"virtio-console\"\n[[device]]\nkind = \"virtio-console\"\nbar_base = 0x8000000000\n\
         [[device]]\nkind = \"connector\"\nname = \"c\"\ndataport_size = \"1M\"\n",
        "t",
    )
    .unwrap();
    let l = resolve(&d).unwrap().layout;
    // The fixed BAR keeps its place; the free one goes around it.
    assert_eq!(l.devices[1].bars[0].base, 0x80_0000_0000);
    assert_eq!(l.devices[0].bars[0].base, 0x80_0000_8000);
    let c = &l.devices[2];
    assert_eq!((c.bars[0].index, c.bars[0].is_64bit), (0, false));
    assert_eq!((c.bars[1].index, c.bars[1].size), (1, 1 << 20));
    assert_eq!(c.bars[1].base % (1 << 20), 0);
    // Its one MSI-X vector's table is BAR 2 (4 KiB, not prefetchable); without MSIs, no BAR 2.
    assert_eq!(c.msi_vectors, 1);
    assert_eq!(
        (c.bars[2].index, c.bars[2].size, c.bars[2].prefetchable),
        (2, 4096, false)
    );
    let intx_only = Description::parse(
        "[[device]]\nkind = \"connector\"\nname = \"c\"\ndataport_size = \"1M\"\nmsi_vectors = 0\n",
        "t",
    )
    .unwrap();
    let c = resolve(&intx_only).unwrap().layout.devices.remove(0);
    assert_eq!((c.msi_vectors, c.bars.len()), (0, 2));
    rejects(
        "[[device]]\nkind = \"connector\"\nname = \"c\"\ndataport_size = \"4K\"\nmsi_vectors = 2\n",
        Rule::MsiBudget,
        &["one MSI-X vector"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-console\"\nbar_base = 0x8000001000\n",
        Rule::BarPlacement,
        &["not aligned"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-console\"\nbar_base = 0x20000000\n",
        Rule::BarPlacement,
        &["not inside the PCI 64-bit window"],
    );
    rejects(
        "[[device]]\nkind = \"connector\"\nname = \"big\"\ndataport_size = \"1G\"\n",
        Rule::BarPlacement,
        &["does not fit in the PCI 32-bit window"],
    );
}

#[test]
fn intx_follows_the_swizzle_and_msi_ranges_are_disjoint() {
    let l = resolve(&seed_vm()).unwrap().layout;
    for d in &l.devices {
        assert_eq!(
            d.intx_spi,
            l.pci.intx_spis[((d.slot + d.intx_pin - 1) % 4) as usize]
        );
    }
    let ranges: Vec<(u32, u32)> = l.devices.iter().filter_map(|d| d.msi_intids).collect();
    assert_eq!(ranges, vec![(64, 2), (66, 3), (69, 3)]);
    assert_eq!(l.gic_irqs, 128);
}

#[test]
fn all_problems_are_reported_at_once() {
    let ps = problems("vcpus = 12\n[memory]\nsize = \"513M\"\n[uart]\nspi = 3\n");
    let rules: Vec<Rule> = ps.iter().map(|p| p.rule).collect();
    for r in [Rule::Vcpus, Rule::RamSize, Rule::IrqCollision] {
        assert!(rules.contains(&r), "{rules:?}");
    }
}

/// A backend device and an in-process one do not share an INTx line: an in-process device
/// with no pin given takes a free line; one pinned onto a backend device's line is warned
/// about, with the pin that would be free.
#[test]
fn no_intx_line_is_shared_between_the_backend_and_splitvirt() {
    let two = |pin: &str| {
        format!(
            "[[device]]\nkind = \"virtio-blk\"\nimage = \"a.img\"\nslot = 1\n\
             [[device]]\nkind = \"connector\"\nname = \"c\"\ndataport_size = \"1M\"\nslot = 5\n{pin}"
        )
    };
    // Slot 5 pin A swizzles onto slot 1 pin A's line.
    finds(
        &two("intx_pin = \"A\"\n"),
        Rule::IntxShared,
        Severity::Warning,
        &[
            "connector at slot 5",
            "virtio-blk at slot 1",
            "share INTx line",
        ],
    );
    let ps = problems(&two("intx_pin = \"A\"\n"));
    let fix = &ps.iter().find(|p| p.rule == Rule::IntxShared).unwrap().fix;
    assert!(fix.contains("intx_pin = \"B\""), "{fix}");
    accepts(&two("intx_pin = \"B\"\n"), Rule::IntxShared);
    accepts(&two(""), Rule::IntxShared);
    let l = layout_of(&two(""));
    let (blk, conn) = (&l.devices[0], &l.devices[1]);
    assert_ne!(blk.intx_spi, conn.intx_spi);
    assert_eq!(conn.intx_pin, 2, "pin B, the first free line");
}

#[test]
fn a_device_vms_port_and_a_driver_vm_that_names_it() {
    let port = "[[device]]\nkind = \"rpc-port\"\nsocket = \"/run/p.sock\"\npool_size = \"48M\"\n";
    let l = layout_of(port);
    let d = &l.devices[0];
    assert_eq!(d.kind.pci_id(), (0x1af4, 0xa112));
    assert_eq!(d.placement, layout::Placement::InProcess);
    assert_eq!(d.msi_vectors, 1);
    let bars: Vec<(u8, u64, bool)> = d
        .bars
        .iter()
        .map(|b| (b.index, b.size, b.prefetchable))
        .collect();
    assert_eq!(
        bars,
        [(0, 0x1000, false), (2, 0x10000, true), (4, 64 << 20, true)],
        "registers, the control region, the pool (48 MiB in a 64 MiB BAR)"
    );
    rejects(
        "[[device]]\nkind = \"rpc-port\"\npool_size = \"64M\"\n",
        Rule::Device,
        &["rpc-port", "socket"],
    );
    rejects(
        "[[device]]\nkind = \"rpc-port\"\nsocket = \"p.sock\"\npool_size = \"1000\"\n",
        Rule::Device,
        &["pool_size 1000", "multiple of 4 KiB"],
    );
    rejects(
        "[[device]]\nkind = \"rpc-port\"\nsocket = \"p.sock\"\npool_size = \"1M\"\nimage = \"d.img\"\n",
        Rule::Device,
        &["`image` is not a field of a rpc-port device"],
    );
    rejects(
        "[[device]]\nkind = \"rpc-port\"\nsocket = \"p.sock\"\npool_size = \"1M\"\nmsi_vectors = 2\n",
        Rule::MsiBudget,
        &["rpc-port", "msi_vectors = 2"],
    );
    rejects(
        "[gic]\nv2m = false\n[[device]]\nkind = \"rpc-port\"\nsocket = \"p.sock\"\npool_size = \"1M\"\n",
        Rule::MsiBudget,
        &["rpc-port", "v2m off"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-blk\"\nimage = \"d.img\"\nsocket = \"p.sock\"\n",
        Rule::Device,
        &["`socket` is not a field of a virtio-blk device"],
    );
    // The driver VM's side.
    let l = layout_of("[backend]\ndevice_vm = \"/run/p.sock\"");
    assert!(l.rpc_device_vm);
    assert_eq!(
        l.rpc_connect.as_deref(),
        Some(std::path::Path::new("/run/p.sock"))
    );
    rejects(
        "[backend]\ndevice_vm = \"/run/p.sock\"\nconnect = \"/run/b.sock\"",
        Rule::Backend,
        &["connect", "device_vm"],
    );
    finds(
        "[backend]\ndevice_vm = \"/run/p.sock\"\njail = false",
        Rule::Backend,
        Severity::Warning,
        &["jail", "device VM"],
    );
    let mut d = Description::parse("[backend]\ndevice_vm = \"/run/p.sock\"", "t").unwrap();
    d.pool = None;
    let ps = check(&d);
    assert!(
        ps.iter().any(|p| p.rule == Rule::Backend
            && p.severity == Severity::Error
            && p.message.contains("device_vm")
            && p.message.contains("pool")),
        "{}",
        layout::problem::render(&ps)
    );
}

#[test]
fn a_vhost_user_device_and_what_it_must_name() {
    let blk =
        "[[device]]\nkind = \"vhost-user\"\nsocket = \"/run/vhost/disk.sock\"\ndevice = \"blk\"\n";
    let l = layout_of(blk);
    let d = &l.devices[0];
    assert_eq!(
        d.kind.pci_id(),
        (0x1af4, 0x1042),
        "a virtio-blk to the guest"
    );
    assert_eq!(
        d.placement,
        layout::Placement::InProcess,
        "splitvirt is the frontend"
    );
    assert_eq!(d.msi_vectors, 2, "its queue and the configuration");
    assert_eq!(
        d.kind,
        layout::DeviceKind::VhostUser {
            socket: "/run/vhost/disk.sock".into(),
            device_type: 2,
            queues: 1,
            queue_size: 128,
        }
    );
    let fs = "[[device]]\nkind = \"vhost-user\"\nsocket = \"fs.sock\"\ndevice = \"fs\"\n";
    let l = layout_of(fs);
    assert_eq!(l.devices[0].kind.pci_id(), (0x1af4, 0x105a));
    assert_eq!(l.devices[0].msi_vectors, 3);
    let vsock = "[[device]]\nkind = \"vhost-user\"\nsocket = \"v.sock\"\ndevice = \"vsock\"\n";
    let l = layout_of(vsock);
    assert_eq!(l.devices[0].kind.pci_id(), (0x1af4, 0x1053));
    assert_eq!(
        l.devices[0].msi_vectors, 4,
        "receive, transmit, events, configuration"
    );
    rejects(
        "[[device]]\nkind = \"vhost-user\"\ndevice = \"blk\"\n",
        Rule::Device,
        &["vhost-user", "socket"],
    );
    rejects(
        "[[device]]\nkind = \"vhost-user\"\nsocket = \"s\"\ndevice = \"gpu\"\n",
        Rule::Device,
        &["device `gpu`"],
    );
    rejects(
        "[[device]]\nkind = \"vhost-user\"\nsocket = \"s\"\ndevice = \"blk\"\nqueue_size = 100\n",
        Rule::Device,
        &["queue_size = 100"],
    );
    let console4 = "[[device]]\nkind = \"vhost-user\"\nsocket = \"c.sock\"\ndevice = \"console\"\nqueues = 4\n";
    let l = layout_of(console4);
    assert_eq!(
        l.devices[0].msi_vectors, 5,
        "multiport: two data and two control queues"
    );
    rejects(
        "[[device]]\nkind = \"vhost-user\"\nsocket = \"s\"\ndevice = \"console\"\nqueues = 3\n",
        Rule::Device,
        &["queues = 3"],
    );
    rejects(
        "[[device]]\nkind = \"vhost-user\"\nsocket = \"s\"\ndevice = \"fs\"\nqueues = 5\n",
        Rule::Device,
        &["queues = 5"],
    );
    rejects(
        "[[device]]\nkind = \"vhost-user\"\nsocket = \"s\"\ndevice = \"blk\"\nplacement = \"backend\"\n",
        Rule::Device,
        &["`placement` is not a field of a vhost-user device"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-blk\"\nimage = \"d.img\"\nqueues = 2\n",
        Rule::Device,
        &["`queues` is not a field of a virtio-blk device"],
    );
}

#[test]
fn virtio_pmem_devices_get_windows_of_their_own_above_the_pci_windows() {
    let two = "[[device]]\nkind = \"virtio-pmem\"\nimage = \"a.img\"\n\
               [[device]]\nkind = \"virtio-pmem\"\nimage = \"b.img\"\n";
    let l = layout_of(two);
    let windows: Vec<u64> = l
        .devices
        .iter()
        .map(|d| match d.kind {
            layout::DeviceKind::VirtioPmem { window, .. } => window,
            _ => panic!("{:?}", d.kind),
        })
        .collect();
    let (base, size) = (layout::layout::PMEM_BASE, layout::layout::PMEM_WINDOW);
    assert_eq!(windows, [base, base + size]);
    let d = &l.devices[0];
    assert_eq!(d.kind.pci_id(), (0x1af4, 0x105b));
    assert_eq!(d.placement, layout::Placement::InProcess);
    assert_eq!(d.msi_vectors, 2);
    for r in l.regions() {
        assert!(r.end().unwrap() <= base, "{r} reaches the pmem windows");
    }
    rejects(
        "[[device]]\nkind = \"virtio-pmem\"\n",
        Rule::Device,
        &["virtio-pmem", "has no image"],
    );
    rejects(
        "[[device]]\nkind = \"virtio-pmem\"\nimage = \"a.img\"\nplacement = \"backend\"\n",
        Rule::Device,
        &["`placement` is not a field of a virtio-pmem device"],
    );
    let five = "[[device]]\nkind = \"virtio-pmem\"\nimage = \"a.img\"\n".repeat(5);
    rejects(&five, Rule::Device, &["more than 4 virtio-pmem devices"]);
}

#[test]
fn vcpu_affinity_gives_each_vcpu_its_cpus() {
    let l = |text: &str| layout_of(text).vcpu_affinity;
    assert_eq!(l(""), None, "the scheduler's choice");
    assert_eq!(
        l("vcpus = 2\nvcpu_affinity = \"0-2,5\""),
        Some(vec![vec![0, 1, 2, 5], vec![0, 1, 2, 5]]),
        "one list for every vCPU"
    );
    assert_eq!(
        l("vcpus = 2\nvcpu_affinity = [\"3\", \"1,0\"]"),
        Some(vec![vec![3], vec![0, 1]]),
        "one list per vCPU"
    );
    rejects(
        "vcpus = 2\nvcpu_affinity = [\"1\"]",
        Rule::Vcpus,
        &["gives 1 CPU list for 2 vCPUs"],
    );
    rejects(
        "vcpu_affinity = \"3-1\"",
        Rule::Vcpus,
        &["vCPU 0, \"3-1\"", "runs backwards"],
    );
    rejects(
        "vcpu_affinity = \"one\"",
        Rule::Vcpus,
        &["`one` is not a CPU number"],
    );
    rejects("vcpu_affinity = \"4096\"", Rule::Vcpus, &["below 1024"]);
    rejects(
        "vcpu_affinity = \"\"",
        Rule::Vcpus,
        &["`` is not a CPU number"],
    );
}
