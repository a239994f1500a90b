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
                Some((n, h)) => {
                    log::info!(
                        "virtio-blk at slot {}: the dead backend's journal says it took the \
                         driver's requests up to avail index {n}, {} of them in flight",
                        self.dev,
                        h.len()
                    );
                    (n, h)
                }
                None => return,
            },
        };
        let read16 = |a: u64| self.mem.read_obj::<u16>(GuestAddress(a)).ok();
        // A completion the backend began but whose used index never moved past it did not
        // land: that request is failed too (once: its head left the heads in flight).
        if reaped_to.is_none() {
            if let (Some((head, at)), Some(used)) = (
                region.journal_completing(self.dev),
                read16(q.used.wrapping_add(2)),
            ) {
                if used == at && !heads.contains(&head) {
                    heads.insert(0, head);
                }
            }
        }
        // With VIRTIO_F_EVENT_IDX the driver notifies only when its avail index passes the
        // avail event the device left in the used ring: it moves to where reaping got to, or
        // the driver's next requests would never notify, never be failed, and hang. Then the
        // ring is looked at once more for requests added meanwhile (a few times at most: a
        // driver adding without pause has notified for the first of them).
        let event_idx = shadow.driver_features() & virtio::F_EVENT_IDX != 0;
        let avail_event = q.used.wrapping_add(4 + 8 * u64::from(q.size));
        for _ in 0..4 {
            let Some(avail_idx) = read16(q.avail.wrapping_add(2)) else {
                return;
            };
            let waiting = avail_idx.wrapping_sub(next).min(q.size);
            for _ in 0..waiting {
                let slot = u64::from(next % q.size);
                // A head the journal has in flight is the same request (a driver reuses a
                // head only once it is used): the backend died between marking it taken and
                // storing its next avail index. It is failed once.
                if let Some(h) = read16(q.avail.wrapping_add(4 + 2 * slot)) {
                    if !heads.contains(&h) {
                        heads.push(h);
                    }
                }
                next = next.wrapping_add(1);
            }
            if !event_idx || self.mem.write_obj(next, GuestAddress(avail_event)).is_err() {
                break;
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if read16(q.avail.wrapping_add(2)) == Some(next) {
                break;
            }
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
        log::debug!(
            "virtio-blk at slot {}: reaped to avail index {next}, used index now {used_idx}",
            self.dev
        );
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

    /// A driver's virtio-blk queue 0 of 16 in a 64 KiB pool at 0x5000_0000 (descriptors at
    /// +0, avail at +0x1000, used at +0x2000); descriptor h is a one-byte status at +0x3000+h.
    fn driven() -> (GuestMemoryMmap<()>, Shadow) {
        driven_with(0)
    }

    /// `driven`, the driver also accepting `features` (of the first 32).
    fn driven_with(features: u64) -> (GuestMemoryMmap<()>, Shadow) {
        let base = 0x5000_0000u64;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(base), 0x10000)]).unwrap();
        let mut sh = Shadow::new(2, &[16], mem.clone(), 0x1000_0000, 1);
        let mut w = |off: u64, v: u64, len: usize| sh.bar_write(0, off, &v.to_le_bytes()[..len]);
        for (off, v, len) in [
            (0x14, 3, 1),
            (0x08, 0, 4),
            (0x0c, features, 4),
            (0x08, 1, 4),
            (0x0c, 3, 4),
            (0x14, 0xb, 1),
            (0x16, 0, 2),
            (0x18, 16, 2),
            (0x20, base, 8),
            (0x28, base + 0x1000, 8),
            (0x30, base + 0x2000, 8),
            (0x1c, 1, 2),
            (0x14, 0xf, 1),
        ] {
            w(off, v, len);
        }
        for h in 0..16u64 {
            let d = GuestAddress(base + 16 * h);
            mem.write_obj(base + 0x3000 + h, d).unwrap();
            mem.write_obj(1u32, GuestAddress(d.0 + 8)).unwrap();
            mem.write_obj(VRING_DESC_F_WRITE, GuestAddress(d.0 + 12))
                .unwrap();
        }
        (mem, sh)
    }

    /// The driver makes `heads` available in its avail ring (at 0x5000_1000), from slot 0.
    fn make_available(mem: &GuestMemoryMmap<()>, heads: &[u16]) {
        let ring = 0x5000_1000u64;
        for (slot, h) in (0u64..).zip(heads) {
            mem.write_obj(*h, GuestAddress(ring + 4 + 2 * slot))
                .unwrap();
        }
        mem.write_obj(heads.len() as u16, GuestAddress(ring + 2))
            .unwrap();
    }

    /// A backend that died after it began a completion but before the used index moved past
    /// it: that request is failed with the others, once; one whose completion landed is not.
    #[test]
    fn a_completion_cut_short_is_failed_once() {
        for landed in [false, true] {
            let (mem, mut sh) = driven();
            let base = 0x5000_0000u64;
            // The guest made heads 4 and 9 available; the backend took both and began
            // completing 4 at used index 0.
            make_available(&mem, &[4, 9]);
            let region = Region::create().unwrap();
            region.journal_reset(1, 0);
            region.journal_popped(1, 4, 1);
            region.journal_popped(1, 9, 2);
            region.journal_completed(1, 4, 0);
            if landed {
                mem.write_obj(4u32, GuestAddress(base + 0x2004)).unwrap();
                mem.write_obj(1u16, GuestAddress(base + 0x2002)).unwrap();
            }
            Reaper::new(1, mem.clone(), Arc::new(Quiet)).fail_all(&mut sh, &region);
            let used: u16 = mem.read_obj(GuestAddress(base + 0x2002)).unwrap();
            assert_eq!(used, 2, "landed: {landed}: every request completed once");
            let status = |h: u64| mem.read_obj::<u8>(GuestAddress(base + 0x3000 + h)).unwrap();
            assert_eq!(status(9), S_IOERR);
            assert_eq!(
                status(4),
                if landed { 0 } else { S_IOERR },
                "landed: {landed}"
            );
        }
    }

    /// A backend that died between marking a head taken and storing its next avail index: the
    /// journal has the head in flight and the avail entry after its next index too. One request,
    /// failed once: a second completion would put the used index past the avail index, and the
    /// next backend (which resumes at the used index) would refuse the queue.
    #[test]
    fn a_head_both_in_flight_and_available_is_failed_once() {
        let (mem, mut sh) = driven();
        let base = 0x5000_0000u64;
        make_available(&mem, &[4, 9]);
        let region = Region::create().unwrap();
        region.journal_reset(1, 0);
        // Head 4 marked taken; the next avail index still says 0.
        region.journal_popped(1, 4, 0);
        Reaper::new(1, mem.clone(), Arc::new(Quiet)).fail_all(&mut sh, &region);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(base + 0x2002)).unwrap(), 2);
        let used = |i: u64| {
            mem.read_obj::<u32>(GuestAddress(base + 0x2004 + 8 * i))
                .unwrap()
        };
        assert_eq!([used(0), used(1)], [4, 9]);
    }

    /// With VIRTIO_F_EVENT_IDX the driver notifies only when its avail index passes the
    /// device's avail event: once the backend is dead, that follows the reaping, so the driver's
    /// next request notifies (and is failed) instead of waiting for ever.
    #[test]
    fn a_driver_with_event_idx_notifies_its_next_request() {
        let (mem, mut sh) = driven_with(virtio::F_EVENT_IDX);
        let base = 0x5000_0000u64;
        let avail_event = GuestAddress(base + 0x2000 + 4 + 8 * 16);
        // The dead backend had asked to be notified at 0, and the driver made two requests.
        make_available(&mem, &[3, 7]);
        let region = Region::create().unwrap();
        region.journal_reset(1, 0);
        let r = Reaper::new(1, mem.clone(), Arc::new(Quiet));
        r.fail_all(&mut sh, &region);
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 2);
        // The driver adds request 2: vring_need_event(2, 3, 2) says notify, and it is failed.
        let need_event = |event: u16, new: u16, old: u16| {
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        };
        assert!(need_event(mem.read_obj(avail_event).unwrap(), 3, 2));
        make_available(&mem, &[3, 7, 5]);
        r.fail_all(&mut sh, &region);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(base + 0x2002)).unwrap(), 3);
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 3);
        let status = |h: u64| mem.read_obj::<u8>(GuestAddress(base + 0x3000 + h)).unwrap();
        assert_eq!([status(3), status(7), status(5)], [S_IOERR; 3]);
        // Without the feature the used ring ends at its last element: nothing is written past it.
        let (mem, mut sh) = driven();
        make_available(&mem, &[0]);
        mem.write_obj(0xaaaau16, avail_event).unwrap();
        Reaper::new(1, mem.clone(), Arc::new(Quiet)).fail_all(&mut sh, &region);
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 0xaaaa);
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
