//! The transport and the console driven the way Linux's virtio-pci driver drives them, over a
//! guest memory that holds only the restricted pool.

use pci::PciFunction;
use std::io::Write;
use std::sync::{Arc, Mutex};
use virtio::console::Console;
use virtio::transport::*;
use virtio::{F_ACCESS_PLATFORM, F_VERSION_1};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const POOL: u64 = 0x5000_0000;
const DESC: u64 = POOL;
const AVAIL: u64 = POOL + 0x1000;
const USED: u64 = POOL + 0x2000;
const BUF: u64 = POOL + 0x3000;

#[derive(Clone, Default)]
struct Out(Arc<Mutex<Vec<u8>>>);
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
struct Sig {
    msis: Mutex<Vec<(u64, u32)>>,
    intx: Mutex<Vec<bool>>,
}
impl Signal for Sig {
    fn msi(&self, m: (u64, u32)) {
        self.msis.lock().unwrap().push(m);
    }
    fn intx(&self, level: bool) {
        self.intx.lock().unwrap().push(level);
    }
}

struct Guest {
    dev: VirtioPci<Console>,
    mem: GuestMemoryMmap<()>,
    out: Out,
    sig: Arc<Sig>,
}

impl Guest {
    fn new() -> Self {
        let pool = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(POOL), 1 << 20)]).unwrap();
        let out = Out::default();
        let sig = Arc::new(Sig::default());
        let dev = VirtioPci::new(
            Console::new(Box::new(out.clone())),
            pool.clone(),
            0x80_0000_0000,
            1,
            sig.clone(),
        );
        Guest {
            dev,
            mem: pool,
            out,
            sig,
        }
    }
    fn w(&mut self, off: u64, v: u64, len: usize) {
        self.dev.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    /// Status handshake with the given driver features; returns the status read back.
    fn negotiate(&mut self, features: u64) -> u8 {
        self.w(0x14, 1, 1);
        self.w(0x14, 3, 1);
        self.w(0x08, 0, 4);
        self.w(0x0c, features & 0xffff_ffff, 4);
        self.w(0x08, 1, 4);
        self.w(0x0c, features >> 32, 4);
        self.w(0x14, 0xb, 1);
        self.r(0x14, 1) as u8
    }
    fn setup_tx(&mut self) {
        self.w(0x16, 1, 2);
        self.w(0x18, 16, 2);
        self.w(0x20, DESC, 8);
        self.w(0x28, AVAIL, 8);
        self.w(0x30, USED, 8);
        self.w(0x1c, 1, 2);
        self.w(0x14, 0xf, 1);
    }
    /// Posts one descriptor at `addr` and notifies the TX queue.
    fn send(&mut self, idx: u16, addr: u64, len: u32) {
        let d = u64::from(idx % 16) * 16;
        self.mem.write_obj(addr, GuestAddress(DESC + d)).unwrap();
        self.mem.write_obj(len, GuestAddress(DESC + d + 8)).unwrap();
        self.mem
            .write_obj(0u16, GuestAddress(DESC + d + 12))
            .unwrap();
        self.mem
            .write_obj(idx % 16, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % 16)))
            .unwrap();
        self.mem
            .write_obj(idx + 1, GuestAddress(AVAIL + 2))
            .unwrap();
        self.w(NOTIFY + u64::from(NOTIFY_MULTIPLIER), 1, 2);
    }
    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }
}

#[test]
fn device_offers_version_1_and_access_platform() {
    let mut g = Guest::new();
    g.w(0x00, 1, 4);
    let hi = g.r(0x04, 4);
    assert_eq!(
        hi << 32 & (F_VERSION_1 | F_ACCESS_PLATFORM),
        F_VERSION_1 | F_ACCESS_PLATFORM
    );
    assert_eq!(g.r(0x12, 2), 2, "two queues");
    let mut id = [0u8; 4];
    g.dev.config_read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1043_1af4);
}

#[test]
fn a_driver_without_access_platform_is_refused() {
    let mut g = Guest::new();
    let st = g.negotiate(F_VERSION_1);
    assert_eq!(st & STATUS_FEATURES_OK, 0, "FEATURES_OK must not stick");
    let mut g = Guest::new();
    assert_ne!(
        g.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM) & STATUS_FEATURES_OK,
        0
    );
}

#[test]
fn transmit_reaches_the_host_through_the_pool() {
    let mut g = Guest::new();
    g.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM);
    g.setup_tx();
    assert_ne!(g.r(0x14, 1) as u8 & STATUS_DRIVER_OK, 0);
    g.mem
        .write_slice(b"hello, hvc0\n", GuestAddress(BUF))
        .unwrap();
    g.send(0, BUF, 12);
    assert_eq!(&*g.out.0.lock().unwrap(), b"hello, hvc0\n");
    assert_eq!(g.used_idx(), 1);
    // No MSI-X enabled: INTx with the ISR bit, which a read acknowledges.
    assert_eq!(g.sig.intx.lock().unwrap().last(), Some(&true));
    assert_eq!(g.r(ISR, 1), 1);
    assert_eq!(g.r(ISR, 1), 0);
}

#[test]
fn a_descriptor_outside_the_pool_sets_needs_reset_and_reads_nothing() {
    let mut g = Guest::new();
    g.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM);
    g.setup_tx();
    // Guest RAM outside the pool: the device's memory does not have it.
    g.send(0, 0x4000_0000, 64);
    assert!(g.out.0.lock().unwrap().is_empty());
    assert_ne!(g.r(0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
    assert_eq!(g.dev.errors, 1);
    // Further notifications are ignored until the driver resets the device.
    g.send(1, BUF, 4);
    assert!(g.out.0.lock().unwrap().is_empty());
    g.w(0x14, 0, 1);
    assert_eq!(g.r(0x14, 1), 0);
}

#[test]
fn rings_outside_the_pool_fail_at_driver_ok() {
    let mut g = Guest::new();
    g.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM);
    g.w(0x16, 1, 2);
    g.w(0x20, 0x4000_0000, 8);
    g.w(0x28, AVAIL, 8);
    g.w(0x30, USED, 8);
    g.w(0x1c, 1, 2);
    g.w(0x14, 0xf, 1);
    assert_ne!(g.r(0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
}

#[test]
fn msix_vectors_route_queue_interrupts() {
    let mut g = Guest::new();
    // Enable MSI-X in config space (capability found through the list).
    let mut cap = g.dev.config().bytes()[0x34] as u64;
    while g.dev.config().bytes()[cap as usize] != 0x11 {
        cap = g.dev.config().bytes()[cap as usize + 1] as u64;
    }
    g.dev.config_write(cap + 2, &0x8000u16.to_le_bytes());
    // Vector 2 -> v2m SETSPI with interrupt ID 70, unmasked.
    g.w(MSIX_TABLE + 32, 0x0802_0040, 4);
    g.w(MSIX_TABLE + 40, 70, 4);
    g.w(MSIX_TABLE + 44, 0, 4);
    g.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM);
    g.w(0x16, 1, 2);
    g.w(0x1a, 2, 2);
    assert_eq!(g.r(0x1a, 2), 2);
    g.w(0x1a, 999, 2);
    assert_eq!(
        g.r(0x1a, 2),
        u64::from(NO_VECTOR),
        "a vector the table lacks reads back as NO_VECTOR"
    );
    g.w(0x1a, 2, 2);
    g.setup_tx();
    g.mem.write_slice(b"x", GuestAddress(BUF)).unwrap();
    g.send(0, BUF, 1);
    assert_eq!(*g.sig.msis.lock().unwrap(), vec![(0x0802_0040, 70)]);
}

#[test]
fn hostile_register_traffic_never_panics() {
    let mut g = Guest::new();
    for off in (0..0x8000u64).step_by(2) {
        for len in [1usize, 2, 4, 8] {
            g.w(off, u64::MAX, len);
            let _ = g.r(off, len);
        }
    }
    g.dev.bar_write(3, 0, &[1]);
    let mut b = [0u8; 8];
    g.dev.bar_read(0, u64::MAX, &mut b);
}
