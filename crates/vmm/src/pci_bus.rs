//! The PCI host on the MMIO bus: the ECAM window, and the memory windows in which BARs decode.

use crate::bus::{BusDevice, Shared};
use layout::{Layout, Region};
use pci::Ecam;
use std::sync::Arc;

pub struct EcamWindow(pub Arc<Ecam>);

impl BusDevice for EcamWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.0.write(offset, data)
    }
}

/// A PCI memory window: accesses go to whichever BAR the guest placed there, else read zero.
/// No lock of its own: an access waits only for the function it reaches.
pub struct MemWindow {
    pub ecam: Arc<Ecam>,
    pub base: u64,
}

impl BusDevice for MemWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if !self.ecam.bar_read(self.base.saturating_add(offset), data) {
            data.fill(0);
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.ecam.bar_write(self.base.saturating_add(offset), data);
    }
}

/// The ECAM with its host bridge, and the bus regions that lead to it.
pub fn host(l: &Layout) -> (Arc<Ecam>, Vec<(Region, Shared)>) {
    let mut windows = vec![l.pci.mem32.clone()];
    windows.extend(l.pci.mem64.clone());
    let ecam = Arc::new(Ecam::new(
        windows.iter().map(|w| (w.base, w.size)).collect(),
    ));
    let mut regions: Vec<(Region, Shared)> =
        vec![(l.pci.ecam.clone(), Arc::new(EcamWindow(ecam.clone())))];
    for w in windows {
        let base = w.base;
        regions.push((
            w,
            Arc::new(MemWindow {
                ecam: ecam.clone(),
                base,
            }),
        ));
    }
    (ecam, regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;

    /// The default description's layout, ECAM and bus.
    fn default_bus() -> (Layout, Arc<Ecam>, Bus) {
        let l = layout::resolve(&layout::Description::default_vm())
            .unwrap()
            .layout;
        let (ecam, regions) = host(&l);
        let mut bus = Bus::default();
        for (r, d) in regions {
            bus.add(r, d);
        }
        (l, ecam, bus)
    }

    /// A function served by a backend that never answers: its reads wait out the proxy's
    /// timeout, as they would for a stalled backend process.
    fn unanswered(dev: u8, bar: u64, timeout: std::time::Duration) -> Box<dyn pci::PciFunction> {
        let bell = || rpc::Doorbell::new().unwrap();
        let proxy = rpc::Proxy::start(
            Arc::new(rpc::Region::create().unwrap()),
            bell(),
            bell(),
            bell(),
            Box::new(|_| {}),
            timeout,
        );
        let reg = rpc::Registration {
            dev,
            vendor: 0x1af4,
            device: 0x1042,
            class: 0,
            revision: 1,
            bar0_size: 0x1000,
            bar0_64bit: false,
            bar0_prefetchable: false,
            intx_pin: 1,
        };
        Box::new(rpc::RemoteFunction::new(rpc::Link::new(proxy), &reg, bar))
    }

    #[test]
    fn a_vcpu_waiting_on_one_function_holds_up_no_other() {
        use std::time::Duration;
        let (l, ecam, bus) = default_bus();
        let bus = Arc::new(bus);
        let (mem, cfg) = (l.pci.mem32.base, l.pci.ecam.base);
        // 00:01.0 and 00:02.0 in the 32-bit window, both served by silent backends: a read of
        // the first waits 3 s; the second answers (all ones) after 100 ms.
        ecam.add(
            pci::ecam::devfn(1, 0),
            unanswered(1, mem, Duration::from_secs(3)),
        );
        ecam.add(
            pci::ecam::devfn(2, 0),
            unanswered(2, mem + 0x1000, Duration::from_millis(100)),
        );
        for dev in [1u64, 2] {
            bus.write(cfg + (dev << 15) + 4, &2u16.to_le_bytes());
        }
        let b = bus.clone();
        let waiting = std::thread::spawn(move || {
            let mut d = [0u8; 4];
            b.read(mem, &mut d);
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiting.is_finished());
        // Meanwhile: the other function's BAR (its own wait only) and config space, and the
        // host bridge. (Accesses to the stalled function itself take turns with its read.)
        let mut d = [0u8; 4];
        bus.read(mem + 0x1000, &mut d);
        assert_eq!(d, [0xff; 4]);
        bus.write(cfg + (2 << 15) + 0x3c, &[9]);
        bus.read(cfg, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        assert!(
            !waiting.is_finished(),
            "the other accesses finished before the stalled read: none waited for it"
        );
        waiting.join().unwrap();
    }

    #[test]
    fn the_guest_finds_the_host_bridge_and_nothing_else() {
        let (l, _, bus) = default_bus();
        let mut id = [0u8; 4];
        bus.read(l.pci.ecam.base, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
        bus.read(l.pci.ecam.base + (1 << 15), &mut id);
        assert_eq!(id, [0xff; 4]);
        bus.read(l.pci.mem32.base + 0x100, &mut id);
        assert_eq!(id, [0; 4]);
    }
}
