//! What the VMM does for a virtio-blk device when its backend dies: every request the guest
//! handed it (those the backend's journal says it held, and those it never took from the avail
//! ring) completes with VIRTIO_BLK_S_IOERR, and so does every later one. The guest sees I/O
//! errors, not a hang. To do this the VMM keeps its own copy of the queue's registers and MSI-X
//! entries, taken from the guest's writes on their way to the backend.
//!
//! Guest memory is reached only through the pool mapping, like the devices themselves; every
//! index and address read from the rings is bounded.

use pci::PciFunction;
use rpc::{Proxy, RemoteFunction};
use std::sync::{Arc, Mutex};
use virtio::transport::{Signal, COMMON, MSIX_TABLE, NOTIFY};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const S_IOERR: u8 = 1;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const MSIX_KEPT: usize = 8;

#[derive(Default, Clone, Copy)]
struct Queue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    enabled: bool,
    vector: u16,
}

#[derive(Default)]
struct Snoop {
    status: u8,
    select: u16,
    q0: Queue,
    msix: [(u64, u32); MSIX_KEPT],
    /// After the first reaping: where the VMM itself has got to in the avail ring.
    reaped_to: Option<u16>,
}

pub struct Reaper {
    dev: u8,
    proxy: Arc<Proxy>,
    mem: GuestMemoryMmap<()>,
    signal: Arc<dyn Signal>,
    snoop: Mutex<Snoop>,
}

fn set_part(v: &mut u64, off: u64, data: &[u8]) {
    let mut b = v.to_le_bytes();
    for (i, d) in data.iter().enumerate() {
        if let Some(x) = b.get_mut(off as usize + i) {
            *x = *d;
        }
    }
    *v = u64::from_le_bytes(b);
}

impl Reaper {
    pub fn new(
        dev: u8,
        proxy: Arc<Proxy>,
        mem: GuestMemoryMmap<()>,
        signal: Arc<dyn Signal>,
    ) -> Arc<Reaper> {
        Arc::new(Reaper {
            dev,
            proxy,
            mem,
            signal,
            snoop: Mutex::default(),
        })
    }

    /// A guest write to BAR 0, on its way to the backend.
    fn saw_write(&self, off: u64, data: &[u8]) {
        let mut s = self.snoop.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = 0u64;
        set_part(&mut v, 0, data);
        let q0 = s.select == 0;
        match off.wrapping_sub(COMMON) {
            0x14 => {
                s.status = v as u8;
                if v == 0 {
                    *s = Snoop::default();
                }
            }
            0x16 => s.select = v as u16,
            0x18 if q0 => s.q0.size = v as u16,
            0x1a if q0 => s.q0.vector = v as u16,
            0x1c if q0 => s.q0.enabled = v & 1 != 0,
            o @ 0x20..=0x37 if q0 => {
                let (field, at) = match o {
                    0x20..=0x27 => (&mut s.q0.desc, o - 0x20),
                    0x28..=0x2f => (&mut s.q0.avail, o - 0x28),
                    _ => (&mut s.q0.used, o - 0x30),
                };
                set_part(field, at, data);
            }
            _ => {}
        }
        if (MSIX_TABLE..MSIX_TABLE + 16 * MSIX_KEPT as u64).contains(&off) {
            let e = ((off - MSIX_TABLE) / 16) as usize;
            let within = (off - MSIX_TABLE) % 16;
            let (addr, msg) = &mut s.msix[e];
            match within {
                0..=7 => set_part(addr, within, data),
                8..=11 => {
                    let mut d = u64::from(*msg);
                    set_part(&mut d, within - 8, data);
                    *msg = d as u32;
                }
                _ => {}
            }
        }
    }

    /// Fails every request the guest has made available (once the backend is dead).
    pub fn fail_all(&self) {
        let mut s = self.snoop.lock().unwrap_or_else(|e| e.into_inner());
        let q = s.q0;
        let driver_ok = s.status & virtio::transport::STATUS_DRIVER_OK != 0;
        if !driver_ok || !q.enabled || q.size == 0 || !q.size.is_power_of_two() {
            return;
        }
        let (mut next, mut heads) = match s.reaped_to {
            Some(n) => (n, Vec::new()),
            None => match self.proxy.region().journal(self.dev) {
                Some((n, h)) => (n, h),
                None => return,
            },
        };
        let read16 = |a: u64| self.mem.read_obj::<u16>(GuestAddress(a)).ok();
        let Some(avail_idx) = read16(q.avail.wrapping_add(2)) else {
            return;
        };
        let waiting = avail_idx.wrapping_sub(next).min(q.size);
        for _ in 0..waiting {
            let slot = u64::from(next % q.size);
            if let Some(h) = read16(q.avail.wrapping_add(4 + 2 * slot)) {
                heads.push(h);
            }
            next = next.wrapping_add(1);
        }
        s.reaped_to = Some(next);
        let Some(mut used_idx) = read16(q.used.wrapping_add(2)) else {
            return;
        };
        let mut done = 0;
        for head in heads.into_iter().filter(|&h| h < q.size) {
            self.fail_chain(&q, head);
            let elem = q.used.wrapping_add(4 + 8 * u64::from(used_idx % q.size));
            let ok = self
                .mem
                .write_obj(u32::from(head), GuestAddress(elem))
                .is_ok()
                && self.mem.write_obj(1u32, GuestAddress(elem + 4)).is_ok();
            if ok {
                used_idx = used_idx.wrapping_add(1);
                done += 1;
            }
        }
        if done == 0 {
            return;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let _ = self
            .mem
            .write_obj(used_idx, GuestAddress(q.used.wrapping_add(2)));
        eprintln!(
            "splitvirt: virtio-blk at slot {}: {done} request(s) failed with an I/O error (backend gone)",
            self.dev
        );
        match s.msix.get(usize::from(q.vector)) {
            Some(&(addr, data)) if addr != 0 => self.signal.msi((addr, data)),
            _ => {
                // A level line no device model will lower: pulse it.
                self.signal.intx(true);
                let sig = self.signal.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    sig.intx(false);
                });
            }
        }
    }

    /// Writes IOERR into the chain's status byte (its last descriptor, device-writable).
    fn fail_chain(&self, q: &Queue, head: u16) {
        let mut i = head;
        for _ in 0..q.size {
            let d = q.desc.wrapping_add(16 * u64::from(i));
            let (Ok(addr), Ok(len), Ok(flags), Ok(next)) = (
                self.mem.read_obj::<u64>(GuestAddress(d)),
                self.mem.read_obj::<u32>(GuestAddress(d + 8)),
                self.mem.read_obj::<u16>(GuestAddress(d + 12)),
                self.mem.read_obj::<u16>(GuestAddress(d + 14)),
            ) else {
                return;
            };
            if flags & VRING_DESC_F_NEXT == 0 {
                if flags & VRING_DESC_F_WRITE != 0 && len >= 1 {
                    let _ = self
                        .mem
                        .write_obj(S_IOERR, GuestAddress(addr.wrapping_add(u64::from(len) - 1)));
                }
                return;
            }
            i = next;
        }
    }
}

/// A remote virtio-blk function with a reaper watching its writes.
pub struct Guarded {
    pub inner: RemoteFunction,
    pub reaper: Arc<Reaper>,
}

impl PciFunction for Guarded {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.inner.config_read(off, data)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.inner.config_write(off, data)
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.inner.bar_address(bar)
    }
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        self.inner.bar_read(bar, off, data)
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        if bar == 0 {
            self.reaper.saw_write(off, data);
            if self.reaper.proxy.is_dead() && (NOTIFY..NOTIFY + 0x1000).contains(&off) {
                self.reaper.fail_all();
                return;
            }
        }
        self.inner.bar_write(bar, off, data)
    }
}
