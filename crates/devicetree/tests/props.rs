//! Property tests: any valid description gives a tree that matches it; any bytes are safe to read.

use devicetree::{generate, lint, BootInfo, Level, Tree};
use layout::desc::{DeviceDesc, PoolDesc};
use layout::{resolve, ByteSize, Description, PoolReference};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn device(kind: u8, n: usize) -> DeviceDesc {
    match kind % 4 {
        0 => DeviceDesc {
            kind: "virtio-blk".into(),
            image: Some(format!("d{n}.img").into()),
            ..Default::default()
        },
        1 => DeviceDesc {
            kind: "virtio-net".into(),
            backend: Some(format!("tap{n}")),
            ..Default::default()
        },
        2 => DeviceDesc {
            kind: "virtio-console".into(),
            ..Default::default()
        },
        _ => DeviceDesc {
            kind: "connector".into(),
            name: Some(format!("conn{n}")),
            dataport_size: Some(ByteSize(4096 << (n % 8))),
            ..Default::default()
        },
    }
}

prop_compose! {
    /// Valid by construction: RAM from 1 GiB, ECAM right above it, pool inside it.
    fn valid_description()(
        ram_mib in (32u64..=1024).prop_map(|x| x * 2),
        pool_frac in 0u64..100,
        pool_mib in 1u64..=32,
        vcpus in 1u32..=8,
        kinds in proptest::collection::vec(any::<u8>(), 0..10),
        v2m in any::<bool>(),
        host_bridge in any::<bool>(),
    ) -> Description {
        let mut d = Description::default_vm();
        d.vcpus = vcpus;
        d.memory.size = ByteSize(ram_mib * MIB);
        let ram_end = d.memory.base + ram_mib * MIB;
        d.pci.ecam_base = ram_end.next_multiple_of(16 * MIB);
        let pool = (pool_mib * MIB).min(ram_mib * MIB / 2);
        let room = ram_mib * MIB - pool;
        let base = d.memory.base + (room * pool_frac / 100) / 4096 * 4096;
        d.pool = Some(PoolDesc { base, size: ByteSize(pool) });
        if !v2m {
            d.gic.v2m = None;
        }
        d.pci.pool_reference = if host_bridge { PoolReference::HostBridge } else { PoolReference::PerDevice };
        d.devices = kinds.iter().enumerate().map(|(n, k)| device(*k, n)).collect();
        d
    }
}

fn reg(n: &devicetree::Node) -> Vec<(u64, u64)> {
    n.reg(2, 2).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_tree_matches_its_description(d in valid_description()) {
        let r = resolve(&d).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let l = r.layout;
        let t = Tree::parse(&generate(&l, &BootInfo::default()).unwrap()).unwrap();
        prop_assert_eq!(reg(t.find(&format!("/memory@{:x}", l.ram.base)).unwrap()), vec![(l.ram.base, l.ram.size)]);
        let pool = l.pool.as_ref().unwrap();
        let pn = t.find(&format!("/reserved-memory/swiotlb@{:x}", pool.base)).unwrap();
        prop_assert_eq!(reg(pn), vec![(pool.base, pool.size)]);
        prop_assert_eq!(t.find("/cpus").unwrap().children.len() as u32, l.vcpus);
        let host = t.find(&format!("/pcie@{:x}", l.pci.ecam.base)).unwrap();
        let ranges = host.cells("ranges").unwrap();
        prop_assert_eq!(ranges.len(), 21);
        prop_assert_eq!((u64::from(ranges[10]) << 32) | u64::from(ranges[11]), l.pci.mem32.base);
        let per_entry = if l.v2m.is_some() { 10 } else { 8 };
        prop_assert_eq!(host.cells("interrupt-map").unwrap().len(), 16 * per_entry);
        prop_assert_eq!(host.has("msi-parent"), l.v2m.is_some());
        let per_device = host.children.len();
        prop_assert_eq!(per_device, if host.has("memory-region") { 0 } else { l.devices.len() });
        // And our own lint finds no error in it.
        let errors: Vec<_> = lint(&t).into_iter().filter(|f| f.level == Level::Error).collect();
        // A per-device tree with no devices has nothing that references the pool.
        if !l.devices.is_empty() || host.has("memory-region") {
            prop_assert!(errors.is_empty(), "{:?}", errors);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_reader(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Tree::parse(&bytes);
    }

    #[test]
    fn a_valid_header_with_random_body_never_panics(body in proptest::collection::vec(any::<u8>(), 0..400), cut in 0usize..64) {
        // Keep the header sane so that the fuzzing reaches the structure walker.
        let mut blob = vec![0u8; 40];
        let total = (40 + body.len()) as u32;
        for (i, v) in [0xd00d_feedu32, total, 40 + cut as u32, 40, 40, 17, 16, 0, 0, (body.len().saturating_sub(cut)) as u32].iter().enumerate() {
            blob[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
        }
        blob.extend(body);
        let _ = Tree::parse(&blob);
    }
}
