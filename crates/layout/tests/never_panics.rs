//! Whatever a user writes, validation answers with problems, never a panic or an overflow.

use layout::desc::{DeviceDesc, PoolDesc, Window};
use layout::{check, ByteSize, Description};
use proptest::prelude::*;

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![any::<u64>(), 0u64..0x1_0000_0000, Just(u64::MAX), Just(0)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_descriptions_never_panic(
        a in proptest::collection::vec(addr(), 12),
        n in proptest::collection::vec(any::<u32>(), 12),
        kinds in proptest::collection::vec((0u8..5, any::<Option<u32>>(), any::<Option<u64>>(), any::<Option<u32>>()), 0..40),
        cmd in "[a-z= ,0-9x]{0,40}",
    ) {
        let mut d = Description::default_vm();
        d.vcpus = n[0];
        d.memory.base = a[0];
        d.memory.size = ByteSize(a[1]);
        d.pool = Some(PoolDesc { base: a[2], size: ByteSize(a[3]) });
        d.pci.ecam_base = a[4];
        d.pci.ecam_size = ByteSize(a[5]);
        d.pci.bus_range = [n[1], n[2]];
        d.pci.mem32 = Window { base: a[6], size: ByteSize(a[7]) };
        d.pci.mem64 = Some(Window { base: a[8], size: ByteSize(a[9]) });
        d.pci.intx_spis = [n[3], n[4], n[5], n[6]];
        d.uart.spi = n[7];
        d.timer.ppis = [n[8], n[9], n[10], n[11]];
        if let Some(v) = d.gic.v2m.as_mut() {
            v.spi_base = n[1];
            v.spi_count = n[2];
        }
        d.kernel.cmdline = format!("swiotlb={cmd} earlycon=pl011,{cmd}");
        d.devices = kinds.iter().enumerate().map(|(i, (k, slot, bar, msi))| DeviceDesc {
            kind: ["virtio-blk", "virtio-net", "virtio-console", "connector", "bogus"][*k as usize].into(),
            slot: *slot,
            bar_base: *bar,
            msi_vectors: *msi,
            image: Some("x".into()),
            backend: Some("t".into()),
            name: Some(format!("c{i}")),
            dataport_size: Some(ByteSize(a[10] | 0x1000)),
            ..Default::default()
        }).collect();
        let _ = check(&d);
    }
}
