//! A minimal virtio-pci driver, doing what Linux's does, over a pool-only guest memory.
#![allow(dead_code)]

use pci::PciFunction;
use std::io::Write;
use std::sync::{Arc, Mutex};
use virtio::transport::*;
use virtio::{VirtioDevice, F_ACCESS_PLATFORM, F_VERSION_1};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const POOL: u64 = 0x5000_0000;
pub const DESC: u64 = POOL;
pub const AVAIL: u64 = POOL + 0x1000;
pub const USED: u64 = POOL + 0x2000;
pub const BUF: u64 = POOL + 0x3000;
pub const QSIZE: u16 = 16;

#[derive(Clone, Default)]
pub struct Out(pub Arc<Mutex<Vec<u8>>>);
impl Write for Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
pub struct Sig {
    pub msis: Mutex<Vec<(u64, u32)>>,
    pub intx: Mutex<Vec<bool>>,
}
impl Signal for Sig {
    fn msi(&self, m: (u64, u32)) {
        self.msis.lock().unwrap().push(m);
    }
    fn intx(&self, level: bool) {
        self.intx.lock().unwrap().push(level);
    }
}

pub const BAR_ADDR: u64 = 0x80_0000_0000;

pub struct Driver<D: VirtioDevice> {
    pub dev: VirtioPci<D>,
    pub mem: GuestMemoryMmap<()>,
    pub sig: Arc<Sig>,
    /// Chains posted so far.
    pub next: u16,
    /// Sees every write the driver makes, as the VMM's shadow of a remote device does.
    pub tap: Option<virtio::shadow::Shadow>,
}

impl<D: VirtioDevice> Driver<D> {
    pub fn new(device: D) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(POOL), 1 << 20)]).unwrap();
        Self::on(device, mem)
    }
    /// A driver of `device` over memory `mem` (shared with another driver's device).
    pub fn on(device: D, mem: GuestMemoryMmap<()>) -> Self {
        let sig = Arc::new(Sig::default());
        let dev = VirtioPci::new(device, mem.clone(), BAR_ADDR, 1, sig.clone());
        Driver {
            dev,
            mem,
            sig,
            next: 0,
            tap: None,
        }
    }
    pub fn w(&mut self, off: u64, v: u64, len: usize) {
        let b = &v.to_le_bytes()[..len];
        self.dev.bar_write(0, off, b);
        if let Some(t) = &mut self.tap {
            t.bar_write(0, off, b);
        }
    }
    /// A config-space write.
    pub fn cfg_w(&mut self, off: u64, v: u64, len: usize) {
        let b = &v.to_le_bytes()[..len];
        self.dev.config_write(off, b);
        if let Some(t) = &mut self.tap {
            t.config_write(off, b);
        }
    }
    /// The MSI-X capability's offset, found through the list.
    pub fn msix_cap(&self) -> u64 {
        let bytes = self.dev.config().bytes();
        let mut cap = usize::from(bytes[0x34]);
        while bytes[cap] != 0x11 {
            cap = usize::from(bytes[cap + 1]);
        }
        cap as u64
    }
    pub fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    pub fn status(&mut self) -> u8 {
        self.r(0x14, 1) as u8
    }
    /// Status handshake with the given driver features; returns the status read back.
    pub fn negotiate(&mut self, features: u64) -> u8 {
        self.w(0x14, 1, 1);
        self.w(0x14, 3, 1);
        self.w(0x08, 0, 4);
        self.w(0x0c, features & 0xffff_ffff, 4);
        self.w(0x08, 1, 4);
        self.w(0x0c, features >> 32, 4);
        self.w(0x14, 0xb, 1);
        self.status()
    }
    /// Sets up queue `q` on the fixed rings and sets DRIVER_OK.
    pub fn start(&mut self, q: u16, extra_features: u64) {
        self.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM | extra_features);
        self.w(0x16, u64::from(q), 2);
        self.enable_on_fixed_rings();
    }
    /// The selected queue on the fixed rings, enabled, then DRIVER_OK.
    pub fn enable_on_fixed_rings(&mut self) {
        self.w(0x18, u64::from(QSIZE), 2);
        self.w(0x20, DESC, 8);
        self.w(0x28, AVAIL, 8);
        self.w(0x30, USED, 8);
        self.w(0x1c, 1, 2);
        self.w(0x14, 0xf, 1);
    }
    /// Posts a chain of (addr, len, device-writable) and notifies queue `q`.
    pub fn post(&mut self, q: u16, chain: &[(u64, u32, bool)]) {
        let base = (self.next * 4) % QSIZE;
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let d = u64::from((base + i as u16) % QSIZE) * 16;
            let more = i + 1 < chain.len();
            let flags = u16::from(more) | if write { 2 } else { 0 };
            self.mem.write_obj(addr, GuestAddress(DESC + d)).unwrap();
            self.mem.write_obj(len, GuestAddress(DESC + d + 8)).unwrap();
            self.mem
                .write_obj(flags, GuestAddress(DESC + d + 12))
                .unwrap();
            self.mem
                .write_obj((base + i as u16 + 1) % QSIZE, GuestAddress(DESC + d + 14))
                .unwrap();
        }
        let slot = u64::from(self.next % QSIZE);
        self.mem
            .write_obj(base, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.next += 1;
        self.mem
            .write_obj(self.next, GuestAddress(AVAIL + 2))
            .unwrap();
        self.w(
            NOTIFY + u64::from(NOTIFY_MULTIPLIER) * u64::from(q),
            u64::from(q),
            2,
        );
    }
    /// Waits (up to 10 s) until every posted chain is used or the device needs a reset:
    /// devices may complete requests on threads of their own.
    pub fn settle(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.used_idx() != self.next
            && self.status() & STATUS_NEEDS_RESET == 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }
    pub fn used_len(&self, n: u16) -> u32 {
        self.mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(n % QSIZE) + 4))
            .unwrap()
    }
}
