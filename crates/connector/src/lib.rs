//! The cross-VM connector (seed, "Cross-VM Connector"; facts.md): PCI function 1af4:a111,
//! revision 1, class memory controller / RAM, INTA, and (where the platform has MSIs) one MSI-X
//! vector whose table is BAR 2. BAR 0 is the event page (below); BAR 1 the dataport, memory
//! shared with the peer VM and mapped straight into the guest by the VMM (an access that still
//! traps lands in `Dataport`). Written by hand: no crate models this device.
//!
//! Event page (BAR 0, 4 KiB):
//! - 0x0 (write, any value): send an event to the peer.
//! - 0x4: events received and not yet acknowledged (modulo 2^32). Writing N (not 0)
//!   acknowledges N of them, so that one that arrives between the guest's read and its write
//!   stays counted; writing 0 acknowledges all (the seed's guests). With MSI-X off, the
//!   interrupt is a level that stays up while this is not 0 (the shared handler's "mine?"), so
//!   the driver must acknowledge; with MSI-X on, vector 0 fires for each event that arrives (and
//!   when the guest unmasks it with events waiting), and a driver may instead keep its own
//!   position in the count and never write it (no exit per event).
//! - 0x8..0x3a: the connection's name, NUL-terminated (read-only).
//! - 0x10 (write, any value): ring the peer: wake it without counting an event, for programs
//!   that keep their own counts (the guest library's channel does, in the dataport). The VMM
//!   has the hypervisor catch it (no exit); the peer's interrupt fires as for an event where
//!   the peer takes them by MSI-X, and where it takes them by INTx (or has MSI-X masked) the
//!   ring is counted there as one event, since a level needs a count.
//!
//! The page is memory (`PageMemory`) that the VMM maps into the guest read-only, so that reads
//! of any width and any instruction work at memory speed and only writes trap; the count lives
//! in it, where a peer's VMM may add events itself (the page shared with it): every change of
//! the count is an atomic operation on that word, bounded against a peer that writes it
//! without pause.
//!
//! Nothing here knows how events travel or how memory is shared: `Peer`, `Dataport`,
//! `PageMemory` and `Interrupt` are the VMM's.

use pci::msix::{Message, MsixTable};
use pci::{BarKind, ConfigSpace, PciFunction};
use platform::le_value;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

pub const VENDOR: u16 = 0x1af4;
pub const DEVICE: u16 = 0xa111;
/// Base class 05 (memory controller), subclass 00 (RAM).
pub const CLASS: u32 = 0x05_00_00;
pub const EVENT_PAGE: u64 = 0x1000;
pub const REG_EMIT: u64 = 0x0;
pub const REG_EVENTS: u64 = 0x4;
pub const REG_NAME: u64 = 0x8;
pub const REG_RING: u64 = 0x10;
/// The name field: 49 bytes and the NUL.
pub const NAME_FIELD: usize = 50;
/// BAR 2, the MSI-X table (one vector) and its pending bits.
pub const MSIX_BAR: u64 = 0x1000;
const MSIX_TABLE: u64 = 0;
const MSIX_PBA: u64 = 0x800;

/// Where this side's events go.
pub trait Peer: Send + Sync {
    /// An event: counted in the peer's page, then its interrupt.
    fn emit(&self);
    /// A wake-up without a count (`REG_RING`, when the hypervisor did not catch it).
    fn ring(&self);
}

/// The dataport's memory as the VMM holds it (for accesses that trap).
pub trait Dataport: Send + Sync {
    fn size(&self) -> u64;
    fn read(&self, off: u64, data: &mut [u8]);
    fn write(&self, off: u64, data: &[u8]);
}

/// The event page: memory the guest reads directly, and the peer's VMM may count events in.
pub trait PageMemory: Send + Sync {
    /// Reads `data` at `off` (out of the page: zeros).
    fn read(&self, off: u64, data: &mut [u8]);
    /// Stores `data` at `off` (the name, once).
    fn write(&self, off: u64, data: &[u8]);
    /// The event count (the word at REG_EVENTS).
    fn count(&self) -> &AtomicU32;
}

/// How the connector's interrupt reaches the guest (the VMM's).
pub trait Interrupt: Send + Sync {
    /// The INTx level (while MSI-X is off).
    fn set_level(&self, high: bool);
    /// Where vector 0 may go now: its message while MSI-X is on and it is unmasked, None
    /// otherwise (INTx, or events held until the guest unmasks it).
    fn route(&self, msi: Option<Message>);
    /// Raises vector 0 (routed).
    fn fire(&self);
}

/// Tries of an update of a count another process may write at any time: a peer that writes
/// it without pause must not hold a vCPU.
const TRIES: usize = 64;

/// `f` applied atomically to `c` (bounded: after TRIES lost races, stored as computed from the
/// last value seen). Returns the value stored.
fn update(c: &AtomicU32, f: impl Fn(u32) -> u32) -> u32 {
    let mut seen = c.load(Ordering::Acquire);
    for _ in 0..TRIES {
        let new = f(seen);
        match c.compare_exchange_weak(seen, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return new,
            Err(now) => seen = now,
        }
    }
    let new = f(seen);
    c.store(new, Ordering::Release);
    new
}

/// One more event in a count: what a peer does to this side's page. It wraps at 2^32, so that
/// a driver that never acknowledges (MSI-X: it may keep its own position in the count) can
/// take the count as a running total, modulo 2^32.
pub fn count_event(c: &AtomicU32) {
    c.fetch_add(1, Ordering::AcqRel);
}

/// The event page's state, shared with whatever delivers the peer's events.
pub struct Events {
    page: Arc<dyn PageMemory>,
    irq: Arc<dyn Interrupt>,
    /// Held while the count is read and the interrupt set from it, so that a raise and an
    /// acknowledgement on two threads leave the level as the count is.
    level: Mutex<Mode>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    /// MSI-X off: the INTx level follows the count.
    Intx,
    /// MSI-X on; vector 0 deliverable or not.
    Msi { routed: bool },
}

impl Events {
    fn lock(&self) -> std::sync::MutexGuard<'_, Mode> {
        self.level.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An event from a peer in this process: counted here, then delivered.
    pub fn arrive(&self) {
        count_event(self.page.count());
        self.deliver();
    }

    /// The peer rang (REG_RING): its interrupt, uncounted where MSI-X delivers it; counted as
    /// one event otherwise (a level, or a masked vector's pending state, needs a count).
    pub fn ring(&self) {
        if *self.lock() == (Mode::Msi { routed: true }) {
            self.irq.fire();
        } else {
            self.arrive();
        }
    }

    /// The peer counted events in the page (or one arrived): the interrupt for them, if any
    /// are waiting.
    pub fn deliver(&self) {
        let mode = self.lock();
        if self.pending() == 0 {
            return;
        }
        match *mode {
            Mode::Intx => self.irq.set_level(true),
            Mode::Msi { routed: true } => self.irq.fire(),
            Mode::Msi { routed: false } => {}
        }
    }

    pub fn pending(&self) -> u32 {
        self.page.count().load(Ordering::Acquire)
    }

    /// `n` events handled (0: all of them); the INTx line goes down when none is left.
    fn acknowledge(&self, n: u32) {
        let mode = self.lock();
        update(self.page.count(), |p| {
            if n == 0 {
                0
            } else {
                p.saturating_sub(n)
            }
        });
        if *mode == Mode::Intx && self.pending() == 0 {
            self.irq.set_level(false);
        }
    }

    /// MSI-X turned on or off, or vector 0 routed anew: INTx drops under MSI-X, and events
    /// waiting when the vector becomes deliverable fire it (as a pending bit would).
    fn switch(&self, to: Mode) {
        let mut mode = self.lock();
        let waiting = self.pending() > 0;
        match (*mode, to) {
            (Mode::Intx, Mode::Msi { .. }) => self.irq.set_level(false),
            (Mode::Msi { .. }, Mode::Intx) => self.irq.set_level(waiting),
            _ => {}
        }
        if to == (Mode::Msi { routed: true }) && waiting {
            self.irq.fire();
        }
        *mode = to;
    }
}

/// Where the connector's BARs start (32-bit, as the layout places them); `msix`: BAR 2, for a
/// platform with MSIs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bars {
    pub event_page: u64,
    pub dataport: u64,
    pub msix: Option<u64>,
}

pub struct Connector {
    cfg: ConfigSpace,
    events: Arc<Events>,
    peer: Arc<dyn Peer>,
    dataport: Arc<dyn Dataport>,
    msix: Option<MsixTable>,
    /// What `Interrupt::route` was last told.
    routed: Option<Message>,
}

impl Connector {
    /// `name` longer than 49 bytes is cut (the layout refuses such names first); it is
    /// written into `page`, whose count is taken as it stands (a page that outlives a peer
    /// keeps its events).
    pub fn new(
        name: &str,
        bars: Bars,
        intx_pin: u8,
        irq: Arc<dyn Interrupt>,
        peer: Arc<dyn Peer>,
        dataport: Arc<dyn Dataport>,
        page: Arc<dyn PageMemory>,
    ) -> Connector {
        let mut cfg = ConfigSpace::new(VENDOR, DEVICE, CLASS, 1);
        cfg.set_interrupt_pin(intx_pin);
        let pref = BarKind::Mem32 { prefetchable: true };
        cfg.set_bar(0, EVENT_PAGE, pref, bars.event_page);
        cfg.set_bar(1, dataport.size(), pref, bars.dataport);
        let msix = bars.msix.map(|base| {
            let table = BarKind::Mem32 {
                prefetchable: false,
            };
            cfg.set_bar(2, MSIX_BAR, table, base);
            MsixTable::new(&mut cfg, 1, 2, MSIX_TABLE as u32, MSIX_PBA as u32)
        });
        let mut field = [0u8; NAME_FIELD];
        for (d, s) in field.iter_mut().zip(name.bytes().take(NAME_FIELD - 1)) {
            *d = s;
        }
        page.write(REG_NAME, &field);
        Connector {
            cfg,
            events: Arc::new(Events {
                page,
                irq,
                level: Mutex::new(Mode::Intx),
            }),
            peer,
            dataport,
            msix,
            routed: None,
        }
    }

    /// The handle the VMM gives whatever carries the peer's events.
    pub fn events(&self) -> Arc<Events> {
        self.events.clone()
    }

    fn page_write(&self, off: u64, data: &[u8]) {
        match off {
            REG_EMIT => self.peer.emit(),
            REG_RING => self.peer.ring(),
            REG_EVENTS if data.len() == 4 => self.events.acknowledge(le_value(data) as u32),
            // The name and the rest of the page are read-only.
            _ => {}
        }
    }

    /// After the guest touched MSI-X (capability or table): tell the VMM where vector 0 goes
    /// and switch the interrupt's mode.
    fn msix_changed(&mut self) {
        let Some(t) = &self.msix else { return };
        let (on, to) = (t.enabled(), t.deliverable(0));
        if to != self.routed {
            self.routed = to;
            self.events.irq.route(to);
        }
        self.events.switch(if on {
            Mode::Msi {
                routed: to.is_some(),
            }
        } else {
            Mode::Intx
        });
    }
}

impl PciFunction for Connector {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.cfg.read(off, data)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.cfg.write(off, data);
        if let Some(t) = &mut self.msix {
            // Due messages are the events' business: `switch` fires for waiting events.
            let _ = t.sync(&self.cfg);
        }
        self.msix_changed();
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.cfg.bar_address(bar)
    }
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        match (bar, &self.msix) {
            (0, _) => self.events.page.read(off, data),
            (1, _) => self.dataport.read(off, data),
            (2, Some(t)) if off >= MSIX_PBA => t.read_pba(off - MSIX_PBA, data),
            (2, Some(t)) => t.read_table(off, data),
            _ => data.fill(0xff),
        }
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        match bar {
            0 => self.page_write(off, data),
            1 => self.dataport.write(off, data),
            2 if off < MSIX_PBA => {
                if let Some(t) = &mut self.msix {
                    let _ = t.write_table(off, data);
                }
                self.msix_changed();
            }
            _ => {}
        }
    }
    /// Served by splitvirt itself, never taken over: nothing to resume.
    fn resume(&mut self) {}
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

    /// What the connector asked of its interrupt, in order.
    #[derive(Debug, PartialEq, Clone)]
    enum Irq {
        Level(bool),
        Route(Option<Message>),
        Fire,
    }

    #[derive(Default)]
    struct Line(Mutex<Vec<Irq>>);
    impl Line {
        fn last_level(&self) -> Option<bool> {
            self.0.lock().unwrap().iter().rev().find_map(|i| match i {
                Irq::Level(l) => Some(*l),
                _ => None,
            })
        }
        fn fires(&self) -> usize {
            self.0
                .lock()
                .unwrap()
                .iter()
                .filter(|i| **i == Irq::Fire)
                .count()
        }
        fn levels(&self) -> usize {
            self.0
                .lock()
                .unwrap()
                .iter()
                .filter(|i| matches!(i, Irq::Level(_)))
                .count()
        }
    }
    impl Interrupt for Line {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(Irq::Level(high));
        }
        fn route(&self, msi: Option<Message>) {
            self.0.lock().unwrap().push(Irq::Route(msi));
        }
        fn fire(&self) {
            self.0.lock().unwrap().push(Irq::Fire);
        }
    }

    /// A page of plain memory, as the VMM's mapping would be.
    struct Page(Mutex<Vec<u8>>, AtomicU32);
    impl Page {
        fn new() -> Arc<Page> {
            Arc::new(Page(
                Mutex::new(vec![0; EVENT_PAGE as usize]),
                AtomicU32::new(0),
            ))
        }
    }
    impl PageMemory for Page {
        fn read(&self, off: u64, data: &mut [u8]) {
            let mut m = self.0.lock().unwrap().clone();
            m[4..8].copy_from_slice(&self.1.load(Ordering::Acquire).to_le_bytes());
            for (i, d) in data.iter_mut().enumerate() {
                *d = m.get(off as usize + i).copied().unwrap_or(0);
            }
        }
        fn write(&self, off: u64, data: &[u8]) {
            let o = off as usize;
            self.0.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        }
        fn count(&self) -> &AtomicU32 {
            &self.1
        }
    }

    /// Two connectors wired to each other, as two VMs would be.
    struct Wire(Mutex<Option<Arc<Events>>>);
    impl Peer for Wire {
        fn emit(&self) {
            if let Some(e) = &*self.0.lock().unwrap() {
                e.arrive();
            }
        }
        fn ring(&self) {
            if let Some(e) = &*self.0.lock().unwrap() {
                e.ring();
            }
        }
    }

    const BARS: Bars = Bars {
        event_page: 0x1000_0000,
        dataport: 0x1000_2000,
        msix: Some(0x1000_4000),
    };

    fn pair() -> (Connector, Connector, Arc<Line>, Arc<Line>) {
        let port = Arc::new(LocalDataport(Mutex::new(vec![0; 0x2000])));
        let (la, lb) = (Arc::new(Line::default()), Arc::new(Line::default()));
        let (wa, wb) = (
            Arc::new(Wire(Mutex::new(None))),
            Arc::new(Wire(Mutex::new(None))),
        );
        let a = Connector::new(
            "storage",
            BARS,
            1,
            la.clone(),
            wa.clone(),
            port.clone(),
            Page::new(),
        );
        let b = Connector::new(
            "storage",
            BARS,
            1,
            lb.clone(),
            wb.clone(),
            port,
            Page::new(),
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
        // BAR sizing: 4 KiB event page, 8 KiB dataport, both prefetchable 32-bit; the MSI-X
        // table's 4 KiB, not prefetchable.
        for (bar, size, flags) in [(0u64, 0x1000u32, 0x8), (1, 0x2000, 0x8), (2, 0x1000, 0)] {
            a.config_write(0x10 + 4 * bar, &u32::MAX.to_le_bytes());
            let mut b = [0u8; 4];
            a.config_read(0x10 + 4 * bar, &mut b);
            assert_eq!(u32::from_le_bytes(b), !(size - 1) | flags, "BAR {bar}");
        }
    }

    #[test]
    fn events_count_raise_the_line_until_acknowledged() {
        let (mut a, mut b, la, lb) = pair();
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        a.bar_write(0, REG_EMIT, &0u32.to_le_bytes());
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 2);
        assert_eq!(lb.last_level(), Some(true));
        assert!(
            la.0.lock().unwrap().is_empty(),
            "the sender's line stays down"
        );
        // 0 acknowledges all of them.
        b.bar_write(0, REG_EVENTS, &0u32.to_le_bytes());
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 0);
        assert_eq!(lb.last_level(), Some(false));
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
        assert_eq!(lb.last_level(), Some(true), "still up");
        b.bar_write(0, REG_EVENTS, &5u32.to_le_bytes());
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 0);
        assert_eq!(lb.last_level(), Some(false));
        // A write of another width is not an acknowledgement.
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        b.bar_write(0, REG_EVENTS, &[0u8]);
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 1);
    }

    /// The page is the state: what a trapped read answers, byte for byte; a peer's VMM that
    /// counts an event in it and rings (deliver) raises the line.
    #[test]
    fn the_page_holds_the_name_and_the_count_a_peer_adds_to() {
        let port = Arc::new(LocalDataport(Mutex::new(vec![0; 0x1000])));
        let (page, line) = (Page::new(), Arc::new(Line::default()));
        let peer = Arc::new(Wire(Mutex::new(None)));
        let mut c = Connector::new("chan", BARS, 1, line.clone(), peer, port, page.clone());
        count_event(page.count());
        count_event(page.count());
        c.events().deliver();
        assert_eq!(line.last_level(), Some(true));
        let mut trapped = vec![0u8; EVENT_PAGE as usize];
        c.bar_read(0, 0, &mut trapped);
        assert_eq!(&trapped[4..13], &[2, 0, 0, 0, b'c', b'h', b'a', b'n', 0]);
        // A running total for a driver that keeps its own position: it wraps.
        page.count().store(u32::MAX, Ordering::Release);
        count_event(page.count());
        assert_eq!(page.count().load(Ordering::Acquire), 0);
    }

    /// Enable MSI-X with vector 0 unmasked: it is routed, INTx drops, and each event fires it.
    /// Masked: routed nowhere, events wait; unmasked with events waiting: fired at once.
    /// MSI-X off again: INTx comes back at the level the count says.
    #[test]
    fn msix_routes_vector_0_and_holds_events_while_masked() {
        let (mut a, mut b, _, lb) = pair();
        let cap = {
            let mut p = [0u8];
            b.config_read(0x34, &mut p);
            u64::from(p[0])
        };
        let mut id = [0u8; 2];
        b.config_read(cap, &mut id);
        assert_eq!(id[0], pci::msix::CAP_ID);
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        assert_eq!(lb.last_level(), Some(true));
        let msg = (0x0802_0040u64, 70u32);
        b.bar_write(2, 0, &(msg.0 as u32).to_le_bytes());
        b.bar_write(2, 4, &0u32.to_le_bytes());
        b.bar_write(2, 8, &msg.1.to_le_bytes());
        // Enable, vector still masked (as it starts): no route yet, INTx down, event held.
        b.config_write(cap + 2, &0x8000u16.to_le_bytes());
        assert_eq!(lb.last_level(), Some(false));
        assert_eq!(lb.fires(), 0);
        assert!(!lb.0.lock().unwrap().contains(&Irq::Route(Some(msg))));
        // Unmask: routed, and the waiting event fires.
        b.bar_write(2, 12, &0u32.to_le_bytes());
        assert!(lb.0.lock().unwrap().contains(&Irq::Route(Some(msg))));
        assert_eq!(lb.fires(), 1);
        let levels = lb.levels();
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        assert_eq!((lb.fires(), lb.levels()), (2, levels), "MSI, not INTx");
        // Mask: unrouted; events wait.
        b.bar_write(2, 12, &1u32.to_le_bytes());
        assert_eq!(lb.0.lock().unwrap().last(), Some(&Irq::Route(None)));
        a.bar_write(0, REG_EMIT, &1u32.to_le_bytes());
        assert_eq!(lb.fires(), 2);
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 3);
        // A ring while masked waits as an event too.
        a.bar_write(0, REG_RING, &1u32.to_le_bytes());
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 4);
        // Unmasked: rings fire the vector and are not counted.
        b.bar_write(2, 12, &0u32.to_le_bytes());
        let fires = lb.fires();
        a.bar_write(0, REG_RING, &1u32.to_le_bytes());
        assert_eq!((lb.fires(), r32(&mut b, 0, REG_EVENTS)), (fires + 1, 4));
        b.bar_write(0, REG_EVENTS, &1u32.to_le_bytes());
        // MSI-X off: INTx up, as three events wait; a ring under INTx is counted.
        b.config_write(cap + 2, &0u16.to_le_bytes());
        assert_eq!(lb.last_level(), Some(true));
        a.bar_write(0, REG_RING, &1u32.to_le_bytes());
        assert_eq!(r32(&mut b, 0, REG_EVENTS), 4);
        // The table reads back; the PBA is there.
        assert_eq!(r32(&mut b, 2, 8), msg.1);
        let mut pba = [0u8; 8];
        b.bar_read(2, MSIX_PBA, &mut pba);
    }

    /// A peer's VMM that writes the count without pause cannot hold the vCPU that
    /// acknowledges: each update gives up after a bounded number of lost races.
    #[test]
    fn a_peer_hammering_the_count_does_not_hold_an_acknowledgement() {
        let (_, mut b, ..) = pair();
        let page = b.events().page.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hammer = {
            let (page, stop) = (page.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    n = n.wrapping_add(7);
                    page.count().store(n, Ordering::Release);
                }
            })
        };
        for _ in 0..10_000 {
            b.bar_write(0, REG_EVENTS, &3u32.to_le_bytes());
        }
        stop.store(true, Ordering::Relaxed);
        hammer.join().unwrap();
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
            Bars::default(),
            1,
            Arc::new(Line::default()),
            Arc::new(Wire(Mutex::new(None))),
            port,
            Page::new(),
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
