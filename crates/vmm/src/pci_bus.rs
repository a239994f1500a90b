//! The PCI host on the MMIO bus: the ECAM window, and the memory windows in which BARs decode.

use crate::bus::Shared;
use layout::{Layout, Region};
use pci::Ecam;
use platform::MmioDevice;
use std::sync::{Arc, Mutex};

pub struct EcamWindow(pub Arc<Mutex<Ecam>>);

impl MmioDevice for EcamWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data)
    }
}

/// A PCI memory window: accesses go to whichever BAR the guest placed there, else read zero.
pub struct MemWindow {
    pub ecam: Arc<Mutex<Ecam>>,
    pub base: u64,
}

impl MmioDevice for MemWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = self.base.saturating_add(offset);
        if !self
            .ecam
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_read(addr, data)
        {
            data.fill(0);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let addr = self.base.saturating_add(offset);
        self.ecam
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_write(addr, data);
    }
}

/// The ECAM with its host bridge, and the bus regions that lead to it.
pub fn host(l: &Layout) -> (Arc<Mutex<Ecam>>, Vec<(Region, Shared)>) {
    let mut windows = vec![l.pci.mem32.clone()];
    windows.extend(l.pci.mem64.clone());
    let ecam = Arc::new(Mutex::new(Ecam::new(
        windows.iter().map(|w| (w.base, w.size)).collect(),
    )));
    let mut regions: Vec<(Region, Shared)> = vec![(
        l.pci.ecam.clone(),
        Arc::new(Mutex::new(EcamWindow(ecam.clone()))),
    )];
    for w in windows {
        let base = w.base;
        regions.push((
            w,
            Arc::new(Mutex::new(MemWindow {
                ecam: ecam.clone(),
                base,
            })),
        ));
    }
    (ecam, regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;

    #[test]
    fn the_guest_finds_the_host_bridge_and_nothing_else() {
        let l = layout::resolve(&layout::Description::default_vm())
            .unwrap()
            .layout;
        let (_, regions) = host(&l);
        let mut bus = Bus::default();
        for (r, d) in regions {
            bus.add(r, d);
        }
        let mut id = [0u8; 4];
        bus.read(l.pci.ecam.base, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
        bus.read(l.pci.ecam.base + (1 << 15), &mut id);
        assert_eq!(id, [0xff; 4]);
        bus.read(l.pci.mem32.base + 0x100, &mut id);
        assert_eq!(id, [0; 4]);
    }
}
