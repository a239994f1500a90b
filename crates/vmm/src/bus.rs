//! The MMIO bus: guest physical address -> device model. Accesses that hit nothing read as
//! zeros and are ignored on write, logged once per address, never fatal.

use layout::Region;
use platform::MmioDevice;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Unknown addresses remembered for the log-once rule; past this many, no more are logged.
const UNKNOWN_LOG_MAX: usize = 256;

/// What the bus calls. A device model behind a `Mutex` is one (its accesses take turns); a
/// device that must not make other vCPUs wait while one of its accesses does (the PCI windows,
/// whose functions may be served by another process) locks inside, as narrowly as it can.
pub trait BusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

impl<T: MmioDevice> BusDevice for Mutex<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data)
    }
}

pub type Shared = Arc<dyn BusDevice>;

#[derive(Default)]
pub struct Bus {
    devices: Vec<(Region, Shared)>,
    unknown: Mutex<HashSet<u64>>,
}

impl Bus {
    pub fn add(&mut self, region: Region, dev: Shared) {
        self.devices.push((region, dev));
    }

    fn find(&self, addr: u64) -> Option<(u64, &Shared)> {
        self.devices
            .iter()
            .find(|(r, _)| r.contains_addr(addr))
            .map(|(r, d)| (addr - r.base, d))
    }

    fn unknown(&self, addr: u64, what: &str, len: usize) {
        let mut seen = self.unknown.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() < UNKNOWN_LOG_MAX && seen.insert(addr) {
            log::warn!("guest {what} of {len} byte(s) at {addr:#x} hits no device (logged once)");
        }
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((off, d)) => d.read(off, data),
            None => {
                data.fill(0);
                self.unknown(addr, "read", data.len());
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some((off, d)) => d.write(off, data),
            None => self.unknown(addr, "write", data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl MmioDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_address_with_offsets() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = Bus::default();
        bus.add(Region::new("uart", 0x900_0000, 0x1000), dev.clone());
        let mut d = [0u8; 4];
        bus.read(0x900_0018, &mut d);
        assert_eq!(d, [0x18; 4]);
        bus.write(0x900_0000, b"A");
        assert_eq!(dev.lock().unwrap().0, vec![(0, b"A".to_vec())]);
    }

    #[test]
    fn unknown_addresses_read_zero_and_are_remembered_boundedly() {
        let bus = Bus::default();
        let mut d = [0xffu8; 8];
        bus.read(0x1234, &mut d);
        assert_eq!(d, [0; 8]);
        for a in 0..1000u64 {
            bus.write(a * 8, &[1]);
        }
        assert!(bus.unknown.lock().unwrap().len() <= UNKNOWN_LOG_MAX);
    }
}
