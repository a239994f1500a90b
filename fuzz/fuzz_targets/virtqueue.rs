//! The virtio-pci transport and a device's virtqueue walk: the fuzzer is a guest that writes
//! any register of the BAR in any order, with memory (rings, descriptors, buffers) it also
//! wrote. virtio-console and virtio-net both walk chains, by different rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pci::PciFunction;
use std::sync::Arc;
use virtio::transport::{Signal, VirtioPci};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const POOL: u64 = 0x5000_0000;
const POOL_SIZE: usize = 64 << 10;

struct Quiet;
impl Signal for Quiet {
    fn msi(&self, _: (u64, u32)) {}
    fn intx(&self, _: bool) {}
}
struct Drop;
impl virtio::net::NetBackend for Drop {
    fn send(&mut self, _: &[u8]) {}
}

/// Each op: kind, offset (2 bytes), value (8 bytes), length selector.
fn drive<F: PciFunction>(f: &mut F, ops: &[u8]) {
    for op in ops.chunks_exact(12) {
        let off = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x6000;
        let len = [1usize, 2, 4, 8][usize::from(op[11] % 4)];
        let value = &op[3..3 + len];
        match op[0] % 4 {
            0 => {
                let mut b = [0u8; 8];
                f.bar_read(0, off, &mut b[..len]);
            }
            1 | 2 => f.bar_write(0, off, value),
            _ => f.config_write(u64::from(op[1]), &value[..len.min(4)]),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (usize::from(data[1]) * 64).min(data.len() - 2);
    let (image, ops) = data[2..].split_at(split);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(POOL), POOL_SIZE)]).unwrap();
    mem.write_slice(&image[..image.len().min(POOL_SIZE)], GuestAddress(POOL))
        .unwrap();
    if data[0] & 1 == 0 {
        let dev = virtio::console::Console::new(Box::new(std::io::sink()));
        let mut f = VirtioPci::new(dev, mem, 0x80_0000_0000, 1, Arc::new(Quiet));
        drive(&mut f, ops);
        f.with_device(|d| d.queue_input(b"input from the host"));
    } else {
        let dev = virtio::net::Net::new([2, 0, 0, 0, 0, 1], Box::new(Drop));
        let mut f = VirtioPci::new(dev, mem, 0x80_0000_0000, 1, Arc::new(Quiet));
        drive(&mut f, ops);
        f.with_device(|d| d.receive(&[0xffu8; 60]));
    }
});
