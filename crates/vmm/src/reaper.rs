//! What the VMM does for a virtio-blk device when its backend dies: every request the guest
//! handed it (those the backend's journal says it held, and those it never took from the avail
//! ring) completes with VIRTIO_BLK_S_IOERR, and so does every later one until a new backend
//! takes the device over. The guest sees I/O errors, not a hang. The queue's registers and
//! MSI-X entries come from the device's shadow (`virtio::shadow`), which the guest's writes
//! update on their way to the backend.
//!
//! Guest memory is reached only through the pool mapping, like the devices themselves; every
//! index and address read from the rings is bounded.

use rpc::Region;
use std::sync::{Arc, Mutex};
use virtio::shadow::{QueueRegs, Shadow};
use virtio::transport::{Route, Signal};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const S_IOERR: u8 = 1;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

pub struct Reaper {
    dev: u8,
    mem: GuestMemoryMmap<()>,
    signal: Arc<dyn Signal>,
    /// Since the backend died: where the VMM itself has got to in the avail ring.
    reaped_to: Mutex<Option<u16>>,
}

impl Reaper {
    pub fn new(dev: u8, mem: GuestMemoryMmap<()>, signal: Arc<dyn Signal>) -> Reaper {
        Reaper {
            dev,
            mem,
            signal,
            reaped_to: Mutex::default(),
        }
    }

    /// A new backend serves the device: when it dies, reaping starts from its journal.
    pub fn revive(&self) {
        *self.reaped_to.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Fails every request the guest has made available to queue 0, once the backend whose
    /// control region is `region` is dead: those its journal says it held, then those after
    /// them. `shadow` is the device's registers as the guest set them.
    pub fn fail_all(&self, shadow: &mut Shadow, region: &Region) {
        let driver_ok = shadow.status() & virtio::transport::STATUS_DRIVER_OK != 0;
        let Some(q) = shadow.queue(0) else { return };
        if !driver_ok || !q.ready || q.size == 0 || !q.size.is_power_of_two() {
            return;
        }
        let mut reaped_to = self.reaped_to.lock().unwrap_or_else(|e| e.into_inner());
        let (mut next, mut heads) = match *reaped_to {
            Some(n) => (n, Vec::new()),
            None => match region.journal(self.dev) {
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
        *reaped_to = Some(next);
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
                && self
                    .mem
                    .write_obj(1u32, GuestAddress(elem.wrapping_add(4)))
                    .is_ok();
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
        ratelog::warn!(
            "virtio-blk at slot {}: {done} request(s) failed with an I/O error (backend gone)",
            self.dev
        );
        match shadow.queue_route(0) {
            Route::Msi(m) => self.signal.msi(m),
            Route::Held => {}
            Route::Intx => {
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

    /// Writes IOERR into the chain's status byte (its last descriptor, device-writable). Every
    /// address here is the guest's: sums wrap (and then miss the pool) instead of overflowing.
    fn fail_chain(&self, q: &QueueRegs, head: u16) {
        let mut i = head;
        for _ in 0..q.size {
            let d = q.desc.wrapping_add(16 * u64::from(i));
            let (Ok(addr), Ok(len), Ok(flags), Ok(next)) = (
                self.mem.read_obj::<u64>(GuestAddress(d)),
                self.mem.read_obj::<u32>(GuestAddress(d.wrapping_add(8))),
                self.mem.read_obj::<u16>(GuestAddress(d.wrapping_add(12))),
                self.mem.read_obj::<u16>(GuestAddress(d.wrapping_add(14))),
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;
    impl Signal for Quiet {
        fn msi(&self, _: (u64, u32)) {}
        fn intx(&self, _: bool) {}
    }

    /// The rings' addresses are the guest's: a descriptor table at the top of the address
    /// space makes the sums wrap (and miss the pool), never overflow.
    #[test]
    fn a_descriptor_table_at_the_end_of_the_address_space_is_no_overflow() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x5000_0000), 0x10000)]).unwrap();
        let r = Reaper::new(1, mem, Arc::new(Quiet));
        for desc in [u64::MAX - 4, u64::MAX - 13, u64::MAX] {
            let q = QueueRegs {
                size: 16,
                desc,
                avail: 0x5000_1000,
                used: 0x5000_2000,
                ready: true,
            };
            r.fail_chain(&q, 15);
        }
    }
}
