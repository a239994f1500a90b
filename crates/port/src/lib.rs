//! A device VM's rpc-port (docs/ARCHITECTURE.md, "The device VM"): PCI function 1af4:a112,
//! revision 1, class memory controller / other, no INTx, one MSI-X vector (table in BAR 0).
//! Through it a program in the device VM serves a driver VM's backend devices: BAR 2 is the
//! driver VM's RPC control region and BAR 4 its restricted DMA pool, both the driver's own
//! memory mapped by the VMM straight into this guest (no copies, no exits), and only while a
//! driver VM is connected. Written by hand: no crate models this device.
//!
//! BAR 0 (4 KiB), registers (little-endian):
//! - 0x00 (u32, read): `MAGIC`, "svPT"; 0x04: `VERSION`.
//! - 0x08 (u32, read): status, bit 0: a driver VM is connected and BARs 2 and 4 are its memory.
//! - 0x0c (u32, read): connections so far (a new one: the driver VM's splitvirt connected
//!   again, after a restart of this side or of the backend).
//! - 0x10..0x68 (u64 x 11, read): the driver VM's setup message as it sent it (docs/RPC.md,
//!   "Setup"): pool base and size, MSI eventfds per device, the notify devices. Zeros while
//!   no driver VM is connected.
//! - 0x100 + 4 i (write, any value): doorbell i toward the driver VM: 0 its events doorbell,
//!   1 its replies doorbell, 2 + n the n-th MSI eventfd of the setup (per device in slot order,
//!   each device's vectors in order). The VMM has the hypervisor catch these writes and signal
//!   the driver VM's eventfd, which its KVM turns into the interrupt (no exit, no thread).
//! - 0x800: the MSI-X table (one vector), 0xc00: its pending bits.
//!
//! The driver VM's doorbells toward the backend (its to-backend doorbell and every queue
//! notification it catches) all raise the one vector: the program looks at every ring.
//!
//! Nothing here knows how the driver VM is reached: `Driver` and `Interrupt` are the VMM's.

use pci::msix::{Message, MsixTable};
use pci::{BarKind, ConfigSpace, PciFunction};

pub const VENDOR: u16 = 0x1af4;
pub const DEVICE: u16 = 0xa112;
/// Base class 05 (memory controller), subclass 80 (other).
pub const CLASS: u32 = 0x05_80_00;
pub const MAGIC: u32 = u32::from_le_bytes(*b"svPT");
pub const VERSION: u32 = 1;
pub const REGS: u64 = 0x1000;
pub const REG_MAGIC: u64 = 0x00;
pub const REG_VERSION: u64 = 0x04;
pub const REG_STATUS: u64 = 0x08;
pub const REG_CONNECTIONS: u64 = 0x0c;
pub const REG_SETUP: u64 = 0x10;
/// Words of the setup message.
pub const SETUP_WORDS: usize = 11;
pub const REG_DOORBELLS: u64 = 0x100;
/// Doorbells toward the driver VM: its two and up to 128 MSI eventfds (docs/RPC.md).
pub const MAX_DOORBELLS: u64 = 2 + 128;
pub const STATUS_CONNECTED: u32 = 1;
const MSIX_TABLE: u64 = 0x800;
const MSIX_PBA: u64 = 0xc00;

/// The driver VM of the moment, as the VMM holds it.
pub trait Driver: Send + Sync {
    /// (connections so far, the setup words while one is connected).
    fn state(&self) -> (u32, Option<[u64; SETUP_WORDS]>);
    /// A guest write to doorbell `i` that the hypervisor did not catch.
    fn ring(&self, i: u32);
}

/// Where the port's vector goes (the VMM routes the driver VM's doorbells there).
pub trait Interrupt: Send + Sync {
    /// Its message while MSI-X is on and the vector unmasked, None otherwise.
    fn route(&self, msi: Option<Message>);
}

/// Where the port's BARs start; `wide`: BARs 2 and 4 are 64-bit.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bars {
    pub regs: u64,
    pub control: u64,
    pub control_size: u64,
    pub pool: u64,
    pub pool_size: u64,
    pub wide: bool,
}

pub struct Port {
    cfg: ConfigSpace,
    msix: MsixTable,
    driver: std::sync::Arc<dyn Driver>,
    irq: std::sync::Arc<dyn Interrupt>,
    routed: Option<Message>,
}

impl Port {
    pub fn new(
        bars: Bars,
        driver: std::sync::Arc<dyn Driver>,
        irq: std::sync::Arc<dyn Interrupt>,
    ) -> Port {
        let mut cfg = ConfigSpace::new(VENDOR, DEVICE, CLASS, 1);
        cfg.set_interrupt_pin(0);
        let regs = BarKind::Mem32 {
            prefetchable: false,
        };
        cfg.set_bar(0, REGS, regs, bars.regs);
        let memory = if bars.wide {
            BarKind::Mem64 { prefetchable: true }
        } else {
            BarKind::Mem32 { prefetchable: true }
        };
        cfg.set_bar(2, bars.control_size, memory, bars.control);
        cfg.set_bar(4, bars.pool_size, memory, bars.pool);
        let msix = MsixTable::new(&mut cfg, 1, 0, MSIX_TABLE as u32, MSIX_PBA as u32);
        Port {
            cfg,
            msix,
            driver,
            irq,
            routed: None,
        }
    }

    /// Reads the registers at any width and alignment (what lies past them reads as zeros).
    fn read_regs(&self, off: u64, data: &mut [u8]) {
        let (connections, setup) = self.driver.state();
        let mut regs = [0u8; REG_SETUP as usize + 8 * SETUP_WORDS];
        let status = if setup.is_some() { STATUS_CONNECTED } else { 0 };
        for (at, v) in [
            (REG_MAGIC, MAGIC),
            (REG_VERSION, VERSION),
            (REG_STATUS, status),
            (REG_CONNECTIONS, connections),
        ] {
            regs[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
        }
        for (i, w) in setup.unwrap_or_default().iter().enumerate() {
            let at = REG_SETUP as usize + 8 * i;
            regs[at..at + 8].copy_from_slice(&w.to_le_bytes());
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(off + i as u64)
                .ok()
                .and_then(|at| regs.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn msix_changed(&mut self) {
        let to = self.msix.deliverable(0);
        if to != self.routed {
            self.routed = to;
            self.irq.route(to);
        }
    }
}

impl PciFunction for Port {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.cfg.read(off, data)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.cfg.write(off, data);
        // The hypervisor delivers the doorbells (irqfds): nothing pends here.
        let _ = self.msix.sync(&self.cfg);
        self.msix_changed();
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.cfg.bar_address(bar)
    }
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        match bar {
            0 if off >= MSIX_PBA => self.msix.read_pba(off - MSIX_PBA, data),
            0 if off >= MSIX_TABLE => self.msix.read_table(off - MSIX_TABLE, data),
            0 => self.read_regs(off, data),
            // BARs 2 and 4 exit only where no driver's memory is mapped: nothing there.
            _ => data.fill(0xff),
        }
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        match (bar, off) {
            (0, o) if o >= MSIX_PBA => {}
            (0, o) if o >= MSIX_TABLE => {
                let _ = self.msix.write_table(o - MSIX_TABLE, data);
                self.msix_changed();
            }
            (0, o) if (REG_DOORBELLS..REG_DOORBELLS + 4 * MAX_DOORBELLS).contains(&o) => {
                self.driver.ring(((o - REG_DOORBELLS) / 4) as u32)
            }
            _ => {}
        }
    }
    /// Its state is the device VM's own splitvirt's, never taken over.
    fn resume(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Fake {
        setup: Mutex<Option<[u64; SETUP_WORDS]>>,
        rung: Mutex<Vec<u32>>,
        routes: Mutex<Vec<Option<Message>>>,
    }
    impl Driver for Fake {
        fn state(&self) -> (u32, Option<[u64; SETUP_WORDS]>) {
            let s = *self.setup.lock().unwrap();
            (u32::from(s.is_some()), s)
        }
        fn ring(&self, i: u32) {
            self.rung.lock().unwrap().push(i);
        }
    }
    impl Interrupt for Fake {
        fn route(&self, msi: Option<Message>) {
            self.routes.lock().unwrap().push(msi);
        }
    }

    fn port() -> (Port, Arc<Fake>) {
        let f = Arc::new(Fake::default());
        let bars = Bars {
            regs: 0x1000_0000,
            control: 0x80_0000_0000,
            control_size: 0x10000,
            pool: 0x80_0400_0000,
            pool_size: 0x400_0000,
            wide: true,
        };
        (Port::new(bars, f.clone(), f.clone()), f)
    }

    fn r64(p: &mut Port, bar: usize, off: u64) -> u64 {
        let mut b = [0u8; 8];
        p.bar_read(bar, off, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn identity_bars_and_no_intx() {
        let (mut p, _) = port();
        let mut id = [0u8; 4];
        p.config_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0xa112_1af4);
        let mut pin = [0u8];
        p.config_read(0x3d, &mut pin);
        assert_eq!(pin[0], 0, "no INTx: MSI-X only");
        assert_eq!(p.bar_address(0), None, "memory decoding off");
        p.config_write(4, &2u16.to_le_bytes());
        assert_eq!(p.bar_address(0), Some((0x1000_0000, REGS)));
        assert_eq!(p.bar_address(2), Some((0x80_0000_0000, 0x10000)));
        assert_eq!(p.bar_address(4), Some((0x80_0400_0000, 0x400_0000)));
    }

    /// The registers say who is connected and what it sent, at any width; doorbell writes
    /// that reach the model go to the driver by index, and writes past them go nowhere.
    #[test]
    fn registers_show_the_driver_and_doorbells_ring_it() {
        let (mut p, f) = port();
        assert_eq!(r64(&mut p, 0, REG_MAGIC), u64::from(MAGIC) | 1 << 32);
        assert_eq!(r64(&mut p, 0, REG_STATUS), 0, "nobody yet");
        assert_eq!(r64(&mut p, 0, REG_SETUP + 24), 0);
        let mut words = [0u64; SETUP_WORDS];
        words[2] = 0x5000_0000;
        words[3] = 0x400_0000;
        *f.setup.lock().unwrap() = Some(words);
        assert_eq!(
            r64(&mut p, 0, REG_STATUS),
            u64::from(STATUS_CONNECTED) | 1 << 32
        );
        assert_eq!(r64(&mut p, 0, REG_SETUP + 16), 0x5000_0000);
        assert_eq!(r64(&mut p, 0, REG_SETUP + 24), 0x400_0000);
        let mut b = [0u8; 2];
        p.bar_read(0, REG_SETUP + 27, &mut b);
        assert_eq!(b, [0x04, 0], "bytes at any offset");
        p.bar_write(0, REG_DOORBELLS, &1u32.to_le_bytes());
        p.bar_write(0, REG_DOORBELLS + 4 * 7, &1u32.to_le_bytes());
        p.bar_write(0, REG_DOORBELLS + 4 * MAX_DOORBELLS, &1u32.to_le_bytes());
        p.bar_write(0, REG_STATUS, &0u32.to_le_bytes());
        assert_eq!(*f.rung.lock().unwrap(), [0, 7]);
        assert_eq!(r64(&mut p, 0, REG_STATUS) & 1, 1, "read-only");
        assert_eq!(
            r64(&mut p, 2, 0),
            u64::MAX,
            "no memory behind an unmapped BAR"
        );
    }

    /// The vector is routed once MSI-X is on and it is unmasked, and unrouted when masked.
    #[test]
    fn the_vector_is_routed_while_enabled_and_unmasked() {
        let (mut p, f) = port();
        let mut cap = [0u8];
        p.config_read(0x34, &mut cap);
        let cap = u64::from(cap[0]);
        let msg = (0x0802_0040u64, 70u32);
        p.bar_write(0, MSIX_TABLE, &(msg.0 as u32).to_le_bytes());
        p.bar_write(0, MSIX_TABLE + 4, &0u32.to_le_bytes());
        p.bar_write(0, MSIX_TABLE + 8, &msg.1.to_le_bytes());
        p.config_write(cap + 2, &0x8000u16.to_le_bytes());
        assert!(f.routes.lock().unwrap().is_empty(), "still masked");
        p.bar_write(0, MSIX_TABLE + 12, &0u32.to_le_bytes());
        assert_eq!(*f.routes.lock().unwrap(), [Some(msg)]);
        p.bar_write(0, MSIX_TABLE + 12, &1u32.to_le_bytes());
        assert_eq!(*f.routes.lock().unwrap(), [Some(msg), None]);
        let mut b = [0u8; 4];
        p.bar_read(0, MSIX_TABLE + 8, &mut b);
        assert_eq!(u32::from_le_bytes(b), msg.1);
    }
}
