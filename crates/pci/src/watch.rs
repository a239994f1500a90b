//! A function whose BAR is known to the hypervisor beyond the MMIO bus (memory mapped into the
//! guest, or addresses whose writes the hypervisor catches itself): when the guest moves the
//! BAR or turns decoding on or off, `moved` is told where it now decodes (None: nowhere).

use crate::PciFunction;

pub struct BarWatch {
    pub inner: Box<dyn PciFunction>,
    bar: usize,
    last: Option<u64>,
    moved: Box<dyn FnMut(Option<u64>) + Send>,
}

impl BarWatch {
    pub fn new(
        inner: Box<dyn PciFunction>,
        bar: usize,
        moved: Box<dyn FnMut(Option<u64>) + Send>,
    ) -> Self {
        BarWatch {
            inner,
            bar,
            last: None,
            moved,
        }
    }
}

impl PciFunction for BarWatch {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.inner.config_read(off, data)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.inner.config_write(off, data);
        let now = self.inner.bar_address(self.bar).map(|(a, _)| a);
        if now != self.last {
            self.last = now;
            (self.moved)(now);
        }
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.inner.bar_address(bar)
    }
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        self.inner.bar_read(bar, off, data)
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        self.inner.bar_write(bar, off, data)
    }
    fn resume(&mut self) {
        self.inner.resume()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BarKind, ConfigSpace};
    use std::sync::{Arc, Mutex};

    struct Cfg(ConfigSpace);
    impl PciFunction for Cfg {
        fn config_read(&mut self, off: u64, data: &mut [u8]) {
            self.0.read(off, data)
        }
        fn config_write(&mut self, off: u64, data: &[u8]) {
            self.0.write(off, data)
        }
        fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
            self.0.bar_address(bar)
        }
        fn bar_read(&mut self, _: usize, _: u64, _: &mut [u8]) {}
        fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
        fn resume(&mut self) {}
    }

    #[test]
    fn moves_of_the_watched_bar_are_reported_once_each() {
        let mut cfg = ConfigSpace::new(0x1af4, 0x1042, 0x01_00_00, 1);
        cfg.set_bar(
            0,
            0x1000,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x1000_0000,
        );
        cfg.set_bar(
            1,
            0x1000,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x1000_1000,
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut w = BarWatch::new(
            Box::new(Cfg(cfg)),
            0,
            Box::new(move |a| s.lock().unwrap().push(a)),
        );
        w.config_write(0x04, &[2, 0]); // memory decoding on
        w.config_write(0x14, &0x2000_0000u32.to_le_bytes()); // BAR 1: not watched
        w.config_write(0x10, &0x3000_0000u32.to_le_bytes()); // BAR 0 moved
        w.config_write(0x3c, &[5]); // nothing moves
        w.config_write(0x04, &[0, 0]); // off
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Some(0x1000_0000), Some(0x3000_0000), None]
        );
    }
}
