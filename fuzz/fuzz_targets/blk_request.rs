//! The virtio-blk request parser and its descriptor walk: a queue over memory the fuzzer wrote
//! (descriptor table, avail ring and request headers all hostile), notified like a guest would.
//! The device must answer with a status or DEVICE_NEEDS_RESET, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use virtio::disk::Disk;
use virtio::{Interrupt, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const POOL: u64 = 0x5000_0000;
const POOL_SIZE: usize = 64 << 10;

/// An in-memory disk, so that runs are fast and leave nothing behind.
struct Mem(std::sync::Mutex<Vec<u8>>);
impl Disk for Mem {
    fn size(&self) -> u64 {
        64 << 10
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let d = self.0.lock().unwrap();
        let s = d
            .get(off as usize..off as usize + buf.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(s);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let s = d
            .get_mut(off as usize..off as usize + buf.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        s.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.write_at(&vec![0; len as usize], off)
    }
}

struct NoIrq;
impl Interrupt for NoIrq {
    fn queue(&self, _: u16) {}
    fn config(&self) {}
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (ctl, image) = data.split_at(8);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(POOL), POOL_SIZE)]).unwrap();
    mem.write_slice(&image[..image.len().min(POOL_SIZE)], GuestAddress(POOL))
        .unwrap();
    let mut q = Queue::new(256).unwrap();
    // Ring addresses and size chosen by the fuzzer, anywhere (in or out of the pool).
    q.set_size(1 << (ctl[0] % 9));
    // Close together, so that short inputs reach them; overlaps are hostile and allowed.
    q.set_desc_table_address(Some(POOL as u32 + u32::from(ctl[1] % 64) * 16), Some(0));
    q.set_avail_ring_address(Some(POOL as u32 + 0x200 + u32::from(ctl[2]) * 2), Some(0));
    q.set_used_ring_address(Some(POOL as u32 + 0x600 + u32::from(ctl[3]) * 4), Some(0));
    q.set_event_idx(ctl[4] & 1 != 0);
    q.set_ready(true);
    let disk = Arc::new(Mem(std::sync::Mutex::new(vec![0u8; 64 << 10])));
    let mut blk = virtio::blk::Block::with_disk(disk, "fuzz", ctl[5] & 1 != 0);
    blk.activate(mem, vec![q], Arc::new(NoIrq));
    for _ in 0..=(ctl[6] % 4) {
        if blk.notify(0).is_err() {
            break;
        }
    }
    // Reset waits for the workers: every request finishes inside this run.
    blk.reset();
});
