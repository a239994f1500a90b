//! ECAM: the config space of every function on the buses, one 4 KiB page each, in one MMIO
//! window. Absent functions read as all ones (the guest's "no device here"); writes to them
//! vanish. BAR accesses are routed by the addresses the guest programmed, but only inside the
//! PCI windows: a BAR moved over RAM or anything else decodes nothing.

use crate::config::{ConfigSpace, CONFIG_SIZE};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// One PCI function: its config space and its BARs. Device models implement this.
pub trait PciFunction: Send {
    fn config_read(&mut self, off: u64, data: &mut [u8]);
    fn config_write(&mut self, off: u64, data: &[u8]);
    /// Where BAR `bar` decodes now (base, size), if memory decoding is on.
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)>;
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]);
    /// The writes that follow restore the state a previous instance of this function was
    /// left in (its process died): a function that keeps state in guest memory takes it from
    /// there when that state comes to life (a virtio device: each queue's position). No
    /// default: a wrapper that forgot to pass it on made a taken-over virtio-net start its
    /// queues from 0.
    fn resume(&mut self);
}

/// The host bridge at 00:00.0: identity only (Red Hat's generic PCIe host bridge ID, as QEMU's
/// gpex uses, class 06:00:00).
pub struct HostBridge(ConfigSpace);

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge(ConfigSpace::new(0x1b36, 0x0008, 0x06_00_00, 0))
    }
}

impl PciFunction for HostBridge {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.0.read(off, data)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.0.write(off, data)
    }
    fn bar_address(&self, _: usize) -> Option<(u64, u64)> {
        None
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
    /// Identity only: nothing to take over.
    fn resume(&mut self) {}
}

/// Device and function on bus 0 packed as ECAM does: dev << 3 | func.
pub type DevFn = u8;

pub fn devfn(dev: u8, func: u8) -> DevFn {
    ((dev & 31) << 3) | (func & 7)
}

type Function = Arc<Mutex<Box<dyn PciFunction>>>;

struct Slot {
    f: Function,
    /// Where each BAR decodes, as of the function's last config write: routing reads this,
    /// not the function, so it never waits for a function that is busy.
    bars: [Option<(u64, u64)>; 6],
}

fn bars_of(f: &dyn PciFunction) -> [Option<(u64, u64)>; 6] {
    std::array::from_fn(|bar| f.bar_address(bar))
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The first bus of the ECAM window, where all functions sit (offset >> 20 == 0).
///
/// Every function has a lock of its own, and an access holds only that one: a vCPU waiting
/// on a slow function (one served by another process, say) holds up no access to any other
/// function. The table of functions is locked only to find one.
pub struct Ecam {
    slots: Mutex<BTreeMap<DevFn, Slot>>,
    /// CPU-side windows BARs may decode in: (base, size).
    windows: Vec<(u64, u64)>,
}

impl Ecam {
    pub fn new(windows: Vec<(u64, u64)>) -> Self {
        let e = Ecam {
            slots: Mutex::new(BTreeMap::new()),
            windows,
        };
        e.add(devfn(0, 0), Box::new(HostBridge::default()));
        e
    }

    pub fn add(&self, df: DevFn, f: Box<dyn PciFunction>) {
        let bars = bars_of(&*f);
        let f = Arc::new(Mutex::new(f));
        lock(&self.slots).insert(df, Slot { f, bars });
    }

    /// The first bus only: (function, devfn, register) of an ECAM offset, if present.
    fn decode(&self, off: u64) -> Option<(Function, DevFn, u64)> {
        let bus = off >> 20;
        if bus != 0 {
            return None;
        }
        let df = ((off >> 12) & 0xff) as u8;
        let f = lock(&self.slots).get(&df)?.f.clone();
        Some((f, df, off & 0xfff))
    }

    /// A config read of any size; an access that crosses into the next function's page is
    /// split, so each byte comes from the function that owns it.
    pub fn read(&self, off: u64, data: &mut [u8]) {
        let reg = off & 0xfff;
        if reg + data.len() as u64 > CONFIG_SIZE as u64 {
            for (i, d) in data.iter_mut().enumerate() {
                self.read(off.saturating_add(i as u64), std::slice::from_mut(d));
            }
            return;
        }
        match self.decode(off) {
            Some((f, _, reg)) => lock(&f).config_read(reg, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, off: u64, data: &[u8]) {
        let reg = off & 0xfff;
        if reg + data.len() as u64 > CONFIG_SIZE as u64 {
            for (i, d) in data.iter().enumerate() {
                self.write(off.saturating_add(i as u64), std::slice::from_ref(d));
            }
            return;
        }
        if let Some((f, df, reg)) = self.decode(off) {
            let mut g = lock(&f);
            g.config_write(reg, data);
            // Updated under the function's lock, so that two writers store in their order.
            let bars = bars_of(&**g);
            if let Some(s) = lock(&self.slots).get_mut(&df) {
                s.bars = bars;
            }
        }
    }

    /// The function, BAR and offset that decode `addr` now, if any.
    pub fn bar_lookup(&self, addr: u64, len: u64) -> Option<(DevFn, usize, u64)> {
        self.route(addr, len)
            .map(|(_, df, bar, off)| (df, bar, off))
    }

    fn route(&self, addr: u64, len: u64) -> Option<(Function, DevFn, usize, u64)> {
        let slots = lock(&self.slots);
        for (df, s) in slots.iter() {
            for (bar, &(base, size)) in s
                .bars
                .iter()
                .enumerate()
                .filter_map(|(i, b)| Some((i, b.as_ref()?)))
            {
                let Some(end) = base.checked_add(size) else {
                    continue;
                };
                let inside_window = self
                    .windows
                    .iter()
                    .any(|&(w, s)| base >= w && end <= w.saturating_add(s));
                if inside_window && addr >= base && addr.saturating_add(len) <= end {
                    return Some((s.f.clone(), *df, bar, addr - base));
                }
            }
        }
        None
    }

    /// A memory access in a PCI window; false when no BAR decodes it.
    pub fn bar_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.route(addr, data.len() as u64) {
            Some((f, _, bar, off)) => {
                lock(&f).bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    pub fn bar_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.route(addr, data.len() as u64) {
            Some((f, _, bar, off)) => {
                lock(&f).bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BarKind, COMMAND, COMMAND_MEMORY};

    struct Regs {
        cfg: ConfigSpace,
        mem: Vec<u8>,
    }

    impl PciFunction for Regs {
        fn config_read(&mut self, off: u64, data: &mut [u8]) {
            self.cfg.read(off, data)
        }
        fn config_write(&mut self, off: u64, data: &[u8]) {
            self.cfg.write(off, data)
        }
        fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
            self.cfg.bar_address(bar)
        }
        fn bar_read(&mut self, _: usize, off: u64, data: &mut [u8]) {
            for (i, d) in data.iter_mut().enumerate() {
                *d = self.mem.get(off as usize + i).copied().unwrap_or(0);
            }
        }
        fn bar_write(&mut self, _: usize, off: u64, data: &[u8]) {
            for (i, d) in data.iter().enumerate() {
                if let Some(m) = self.mem.get_mut(off as usize + i) {
                    *m = *d;
                }
            }
        }
        fn resume(&mut self) {}
    }

    fn ecam() -> Ecam {
        let e = Ecam::new(vec![(0x1000_0000, 0x1000_0000)]);
        let mut cfg = ConfigSpace::new(0x1af4, 0x1043, 0x07_80_00, 1);
        cfg.set_bar(
            0,
            0x1000,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x1000_0000,
        );
        e.add(
            devfn(3, 0),
            Box::new(Regs {
                cfg,
                mem: vec![0; 0x1000],
            }),
        );
        e
    }

    fn r32(e: &Ecam, off: u64) -> u32 {
        let mut d = [0u8; 4];
        e.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn present_absent_and_other_buses() {
        let e = ecam();
        assert_eq!(r32(&e, 0), 0x0008_1b36, "host bridge");
        assert_eq!(r32(&e, 3 << 15), 0x1043_1af4);
        assert_eq!(r32(&e, 4 << 15), u32::MAX, "absent device");
        assert_eq!(r32(&e, (3 << 15) | (1 << 12)), u32::MAX, "absent function");
        assert_eq!(r32(&e, 1 << 20), u32::MAX, "bus 1");
        e.write(4 << 15, &[0; 4]);
    }

    #[test]
    fn an_access_across_two_functions_is_split() {
        let e = ecam();
        let mut d = [0u8; 4];
        // Last two bytes of 00:02.7 (absent) and first two of 00:03.0.
        e.read((3 << 15) - 2, &mut d);
        assert_eq!(d, [0xff, 0xff, 0xf4, 0x1a]);
    }

    #[test]
    fn bars_route_only_when_enabled_and_inside_a_window() {
        let e = ecam();
        assert!(!e.bar_write(0x1000_0000, &[1]), "memory decoding off");
        e.write((3 << 15) | COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
        assert!(e.bar_write(0x1000_0004, &[7]));
        let mut d = [0u8];
        assert!(e.bar_read(0x1000_0004, &mut d));
        assert_eq!(d, [7]);
        // The guest moves the BAR over RAM: it decodes nothing there.
        e.write((3 << 15) | 0x10, &0x4000_0000u32.to_le_bytes());
        assert!(!e.bar_read(0x4000_0004, &mut d));
        assert!(!e.bar_read(0x1000_0004, &mut d));
        // An access running off the end of a BAR is not routed.
        e.write((3 << 15) | 0x10, &0x1000_0000u32.to_le_bytes());
        assert!(!e.bar_read(0x1000_0ffe, &mut [0u8; 4]));
    }

    proptest::proptest! {
        #[test]
        fn any_guest_access_is_safe(off in 0u64..(1 << 24), len in 1usize..9, val in proptest::collection::vec(proptest::prelude::any::<u8>(), 8)) {
            let e = ecam();
            let mut d = vec![0u8; len];
            e.read(off, &mut d);
            e.write(off, &val[..len]);
            e.bar_read(off << 8, &mut d);
            e.bar_write(off << 8, &val[..len]);
        }
    }
}
