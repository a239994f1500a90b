//! The ECAM decoder and BAR routing: config reads and writes of any size at any offset of the
//! bus (host bridge, a real virtio function, absent functions), then BAR accesses anywhere.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pci::ecam::{devfn, Ecam};
use std::sync::Arc;
use virtio::transport::{Signal, VirtioPci};
use vm_memory::{GuestAddress, GuestMemoryMmap};

struct Quiet;
impl Signal for Quiet {
    fn msi(&self, _: (u64, u32)) {}
    fn intx(&self, _: bool) {}
}

const MEM32: (u64, u64) = (0x1000_0000, 0x2eff_0000);
const MEM64: (u64, u64) = (0x80_0000_0000, 0x10_0000_0000);

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x5000_0000), 4096)]).unwrap();
    let ecam = Ecam::new(vec![MEM32, MEM64]);
    let dev = virtio::console::Console::new(Box::new(std::io::sink()));
    ecam.add(
        devfn(1, 0),
        Box::new(VirtioPci::new(dev, mem, MEM64.0, 1, Arc::new(Quiet))),
    );
    // Each op: kind, address (5 bytes), value (4 bytes), size selector.
    for op in data.chunks_exact(11) {
        let mut a = [0u8; 8];
        a[..5].copy_from_slice(&op[1..6]);
        let addr = u64::from_le_bytes(a);
        let len = [1usize, 2, 4, 8, 3][usize::from(op[10] % 5)];
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&op[6..10]);
        let buf = &mut buf[..len];
        match op[0] % 4 {
            0 => ecam.read(addr % (1 << 20), buf),
            1 => ecam.write(addr % (1 << 20), buf),
            2 => {
                ecam.bar_read(addr, buf);
            }
            _ => {
                ecam.bar_write(addr, buf);
            }
        }
    }
});
