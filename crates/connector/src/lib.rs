//! The cross-VM connector (seed, "Cross-VM Connector"; facts.md): PCI function 1af4:a111,
//! revision 1, class memory controller / RAM, INTA. BAR 0 is the event page (below); BAR 1 the
//! dataport, memory shared with the peer VM and mapped straight into the guest by the VMM (an
//! access that still traps lands in `Dataport`). Written by hand: no crate models this device.
//!
//! Event page (BAR 0, 4 KiB):
//! - 0x0 (write, any value): send an event to the peer.
//! - 0x4: events received and not yet acknowledged. Writing N (not 0) acknowledges N of them,
//!   so that one that arrives between the guest's read and its write stays counted; writing 0
//!   acknowledges all (the seed's guests). The interrupt is a level that stays up while this
//!   is not 0 (the shared handler's "mine?").
//! - 0x8..0x3a: the connection's name, NUL-terminated (read-only).
//!
//! The VMM may also map the event page into the guest read-only (`PageMemory`), so that reads
//! of any width and any instruction work at memory speed and only writes trap; the connector
//! keeps that memory equal to what a trapped read answers.
//!
//! Nothing here knows how events travel or how memory is shared: `Peer`, `Dataport` and
//! `PageMemory` are the VMM's.

use pci::{BarKind, ConfigSpace, PciFunction};
use platform::{le_value, put_le, IrqLine};
use std::sync::{Arc, Mutex};

pub const VENDOR: u16 = 0x1af4;
pub const DEVICE: u16 = 0xa111;
/// Base class 05 (memory controller), subclass 00 (RAM).
pub const CLASS: u32 = 0x05_00_00;
pub const EVENT_PAGE: u64 = 0x1000;
pub const REG_EMIT: u64 = 0x0;
pub const REG_EVENTS: u64 = 0x4;
pub const REG_NAME: u64 = 0x8;
/// The name field: 49 bytes and the NUL.
pub const NAME_FIELD: usize = 50;

/// Where this side's events go.
pub trait Peer: Send + Sync {
    fn emit(&self);
}

/// The dataport's memory as the VMM holds it (for accesses that trap).
pub trait Dataport: Send + Sync {
    fn size(&self) -> u64;
    fn read(&self, off: u64, data: &mut [u8]);
    fn write(&self, off: u64, data: &[u8]);
}

/// The event page as memory the guest reads directly.
pub trait PageMemory: Send + Sync {
    /// Stores `data` at `off` (the name, once).
    fn write(&self, off: u64, data: &[u8]);
    /// Stores the aligned 32-bit word at `off` in one store, never seen torn.
    fn store_u32(&self, off: u64, v: u32);
}

/// The event page's state, shared with whatever delivers the peer's events.
pub struct Events {
    pending: Mutex<u32>,
    irq: Arc<dyn IrqLine>,
    page: std::sync::OnceLock<Arc<dyn PageMemory>>,
}

impl Events {
    /// An event from the peer: counted, and the line goes (or stays) up.
    pub fn receive(&self) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *p = p.saturating_add(1);
        self.show(*p);
        self.irq.set_level(true);
    }

    pub fn pending(&self) -> u32 {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `n` events handled (0: all of them); the line goes down when none is left.
    fn acknowledge(&self, n: u32) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *p = if n == 0 { 0 } else { p.saturating_sub(n) };
        self.show(*p);
        if *p == 0 {
            self.irq.set_level(false);
        }
    }

    /// The count into the mapped page, under the count's lock (so in the order it changed).
    fn show(&self, pending: u32) {
        if let Some(page) = self.page.get() {
            page.store_u32(REG_EVENTS, pending);
        }
    }
}

pub struct Connector {
    cfg: ConfigSpace,
    name: [u8; NAME_FIELD],
    events: Arc<Events>,
    peer: Arc<dyn Peer>,
    dataport: Arc<dyn Dataport>,
}

impl Connector {
    /// `bars`: where BAR 0 and BAR 1 start (32-bit prefetchable, as the layout places them).
    /// `name` longer than 49 bytes is cut (the layout refuses such names first).
    pub fn new(
        name: &str,
        bars: (u64, u64),
        intx_pin: u8,
        irq: Arc<dyn IrqLine>,
        peer: Arc<dyn Peer>,
        dataport: Arc<dyn Dataport>,
    ) -> Connector {
        let mut cfg = ConfigSpace::new(VENDOR, DEVICE, CLASS, 1);
        cfg.set_interrupt_pin(intx_pin);
        let pref = BarKind::Mem32 { prefetchable: true };
        cfg.set_bar(0, EVENT_PAGE, pref, bars.0);
        cfg.set_bar(1, dataport.size(), pref, bars.1);
        let mut field = [0u8; NAME_FIELD];
        for (d, s) in field.iter_mut().zip(name.bytes().take(NAME_FIELD - 1)) {
            *d = s;
        }
        Connector {
            cfg,
            name: field,
            events: Arc::new(Events {
                pending: Mutex::new(0),
                irq,
                page: std::sync::OnceLock::new(),
            }),
            peer,
            dataport,
        }
    }

    /// The handle the VMM gives whatever carries the peer's events.
    pub fn events(&self) -> Arc<Events> {
        self.events.clone()
    }

    /// Keeps `page` (4 KiB) equal to the event page from now on (all of it now, the count
    /// whenever it changes), for a VMM that maps it into the guest. Once: a later page is
    /// ignored.
    pub fn mirror_page(&self, page: Arc<dyn PageMemory>) {
        // What a trapped read of the whole page answers; the count is stored again under its
        // lock, in case it changed in between.
        let mut image = vec![0u8; EVENT_PAGE as usize];
        self.page_read(0, &mut image);
        let p = self
            .events
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.events.page.set(page.clone()).is_ok() {
            page.write(0, &image);
            page.store_u32(REG_EVENTS, *p);
        }
    }

    fn page_read(&self, off: u64, data: &mut [u8]) {
        if off == REG_EVENTS && data.len() == 4 {
            put_le(data, u64::from(self.events.pending()));
            return;
        }
        for (i, d) in data.iter_mut().enumerate() {
            let at = off.saturating_add(i as u64);
            *d = match at.checked_sub(REG_NAME) {
                Some(n) if (n as usize) < NAME_FIELD => self.name[n as usize],
                _ if (REG_EVENTS..REG_EVENTS + 4).contains(&at) => {
                    self.events.pending().to_le_bytes()[(at - REG_EVENTS) as usize]
                }
                _ => 0,
            };
        }
    }

    fn page_write(&self, off: u64, data: &[u8]) {
        match off {
            REG_EMIT => self.peer.emit(),
            REG_EVENTS if data.len() == 4 => self.events.acknowledge(le_value(data) as u32),
            // The name and the rest of the page are read-only.
            _ => {}
        }
    }
}

impl PciFunction for Connector {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.cfg.read(off, data)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.cfg.write(off, data)
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.cfg.bar_address(bar)
    }
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        match bar {
            0 => self.page_read(off, data),
            1 => self.dataport.read(off, data),
            _ => data.fill(0xff),
        }
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        match bar {
            0 => self.page_write(off, data),
            1 => self.dataport.write(off, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dataport in plain memory.
    struct LocalDataport(Mutex<Vec<u8>>);

    impl Dataport for LocalDataport {
        fn size(&self) -> u64 {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
        }
        fn read(&self, off: u64, data: &mut [u8]) {
            let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
            for (i, d) in data.iter_mut().enumerate() {
                *d = usize::try_from(off)
                    .ok()
                    .and_then(|o| m.get(o.checked_add(i)?))
                    .copied()
                    .unwrap_or(0);
            }
        }
        fn write(&self, off: u64, data: &[u8]) {
            let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
            for (i, d) in data.iter().enumerate() {
                if let Some(x) = usize::try_from(off)
                    .ok()
                    .and_then(|o| o.checked_add(i))
                    .and_then(|o| m.get_mut(o))
                {
                    *x = *d;
                }
            }
        }
    }

    #[derive(Default)]
    struct Line(Mutex<Vec<bool>>);
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }

    /// Two connectors wired to each other, as two VMs would be.
    struct Wire(Mutex<Option<Arc<Events>>>);
    impl Peer for Wire {
        fn emit(&self) {
            if let Some(e) = &*self.0.lock().unwrap() {
                e.receive();
            }
        }
    }

    fn pair() -> (Connector, Connector, Arc<Line>, Arc<Line>) {
        let port = Arc::new(LocalDataport(Mutex::new(vec![0; 0x2000])));
        let (la, lb) = (Arc::new(Line::default()), Arc::new(Line::default()));
        let (wa, wb) = (
            Arc::new(Wire(Mutex::new(None))),
            Arc::new(Wire(Mutex::new(None))),
        );
        let a = Connector::new(
            "storage",
            (0x1000_0000, 0x1000_2000),
            1,
            la.clone(),
            wa.clone(),
            port.clone(),
        );
        let b = Connector::new(
            "storage",
            (0x1000_0000, 0x1000_2000),
            1,
            lb.clone(),
            wb.clone(),
            port,
        );
        *wa.0.lock().unwrap() = Some(b.events());
        *wb.0.lock().unwrap() = Some(a.events());
        (a, b, la, lb)
    }

    fn r32(c: &mut Connector, bar: usize, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.bar_read(bar, off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_and_bars() {
        let (mut a, ..) = pair();
        let mut id = [0u8; 12];
        a.config_read(0, &mut id);
        assert_eq!(&id[..4], &[0xf4, 0x1a, 0x11, 0xa1]);
        assert_eq!(id[8], 1, "revision");
        assert_eq!(&id[9..12], &[0, 0, 5], "class memory controller / RAM");
        let mut pin = [0u8];
        a.config_read(0x3d, &mut pin);
        assert_eq!(pin[0], 1, "INTA");
        // BAR sizing: 4 KiB event page, 8 KiB dataport, both prefetchable 32-bit.
        for (bar, size) in [(0u64, 0x1000u32), (1, 0x2000)] {
            a.config_write(0x10 + 4 * bar, &u32::MAX.to_le_bytes());
            let mut b = [0u8; 4];
            a.config_read(0x10 + 4 * bar, &mut b);
            assert_eq!(u32::from_le_bytes(b), !(size - 1) | 0x8, "BAR {bar}");
        }
    }

    #[test]
    fn events_count_raise_the_line_until_acknowledged() {
        let (mut a, mut b, la, lb) = pair();
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        a.bar_write(0, REG_EMIT, &0u32.to_le_bytes());
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 2);
        assert_eq!(lb.0.lock().unwrap().last(), Some(&true));
        assert!(
            la.0.lock().unwrap().is_empty(),
            "the sender's line stays down"
        );
        // 0 acknowledges all of them.
        b.bar_write(0, REG_EVENTS, &0u32.to_le_bytes());
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 0);
        assert_eq!(lb.0.lock().unwrap().last(), Some(&false));
    }

    /// The guest reads 2, an event arrives, the guest acknowledges the 2 it read: the third
    /// stays counted and the line stays up. More than are pending acknowledges what there is.
    #[test]
    fn acknowledging_what_was_read_keeps_an_event_that_came_in_between() {
        let (mut a, mut b, _, lb) = pair();
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        let read = r32(&mut b, 0, REG_EVENTS);
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        b.bar_write(0, REG_EVENTS, &read.to_le_bytes());
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 1);
        assert_eq!(lb.0.lock().unwrap().last(), Some(&true), "still up");
        b.bar_write(0, REG_EVENTS, &5u32.to_le_bytes());
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 0);
        assert_eq!(lb.0.lock().unwrap().last(), Some(&false));
        // A write of another width is not an acknowledgement.
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        b.bar_write(0, REG_EVENTS, &[0u8]);
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 1);
    }

    /// A page of plain memory, as the VMM's mapping would be.
    struct Page(Mutex<Vec<u8>>);
    impl PageMemory for Page {
        fn write(&self, off: u64, data: &[u8]) {
            let o = off as usize;
            self.0.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        }
        fn store_u32(&self, off: u64, v: u32) {
            self.write(off, &v.to_le_bytes());
        }
    }

    /// The mapped page reads as a trapped read would, byte for byte, as events come and go.
    #[test]
    fn a_mapped_page_matches_what_trapped_reads_answer() {
        let (mut a, mut b, ..) = pair();
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        let page = Arc::new(Page(Mutex::new(vec![0xaa; EVENT_PAGE as usize])));
        b.mirror_page(page.clone());
        let same = |b: &mut Connector, what: &str| {
            let mut trapped = vec![0u8; EVENT_PAGE as usize];
            b.bar_read(0, 0, &mut trapped);
            let mapped = page.0.lock().unwrap().clone();
            assert_eq!(mapped[..0x40], trapped[..0x40], "{what}");
        };
        same(&mut b, "mirrored with one event waiting");
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        same(&mut b, "a second event");
        assert_eq!(page.0.lock().unwrap()[4], 2);
        b.bar_write(0, REG_EVENTS, &0u32.to_le_bytes());
        same(&mut b, "acknowledged");
    }

    #[test]
    fn the_name_is_read_only_and_nul_terminated() {
        let (mut a, ..) = pair();
        let mut name = [0u8; NAME_FIELD];
        a.bar_read(0, REG_NAME, &mut name);
        assert_eq!(&name[..8], b"storage\0");
        a.bar_write(0, REG_NAME, b"evil");
        a.bar_read(0, REG_NAME, &mut name);
        assert_eq!(&name[..8], b"storage\0");
        let long = "x".repeat(80);
        let port = Arc::new(LocalDataport(Mutex::new(vec![0; 0x1000])));
        let mut c = Connector::new(
            &long,
            (0, 0x1000),
            1,
            Arc::new(Line::default()),
            Arc::new(Wire(Mutex::new(None))),
            port,
        );
        c.bar_read(0, REG_NAME, &mut name);
        assert_eq!(name[NAME_FIELD - 1], 0, "always terminated");
    }

    #[test]
    fn the_dataport_is_shared_and_bounded() {
        let (mut a, mut b, ..) = pair();
        a.bar_write(1, 0x100, b"hello");
        let mut got = [0u8; 5];
        b.bar_read(1, 0x100, &mut got);
        assert_eq!(&got, b"hello");
        a.bar_write(1, u64::MAX - 2, b"past the end");
        a.bar_read(1, 0x1ffe, &mut got);
        assert_eq!(got, [0, 0, 0, 0, 0]);
    }
}
