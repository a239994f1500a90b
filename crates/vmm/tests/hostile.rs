//! A hostile guest on the VM's real device set, without KVM: the devices `vmm::devices::build`
//! makes from a description, on the ECAM and MMIO bus the VM uses, with memory that holds only
//! the pool. One device is broken on purpose, another has its BAR moved over RAM; the third
//! still works.

use std::io::Write;
use std::sync::{Arc, Mutex};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm::bus::Bus;

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

struct NoSignal;
impl virtio::transport::Signal for NoSignal {
    fn msi(&self, _: (u64, u32)) {}
    fn intx(&self, _: bool) {}
}

struct Vm {
    bus: Bus,
    mem: GuestMemoryMmap<()>,
    l: layout::Layout,
}

impl Vm {
    fn cfg_write(&self, slot: u32, off: u64, v: u32) {
        let a = self.l.pci.ecam.base + (u64::from(slot) << 15) + off;
        self.bus.write(a, &v.to_le_bytes());
    }
    fn bar(&self, slot: u32) -> u64 {
        let d = self.l.devices.iter().find(|d| d.slot == slot).unwrap();
        d.bars[0].base
    }
    fn w(&self, slot: u32, off: u64, v: u64, len: usize) {
        self.bus
            .write(self.bar(slot) + off, &v.to_le_bytes()[..len]);
    }
    fn r8(&self, slot: u32, off: u64) -> u8 {
        let mut b = [0u8];
        self.bus.read(self.bar(slot) + off, &mut b);
        b[0]
    }
    /// Features, one queue on rings at `rings` (in the pool), DRIVER_OK.
    fn start(&self, slot: u32, q: u16, rings: u64) {
        self.w(slot, 0x14, 1 | 2, 1);
        self.w(slot, 0x08, 1, 4);
        self.w(slot, 0x0c, 3, 4); // VERSION_1 | ACCESS_PLATFORM
        self.w(slot, 0x14, 1 | 2 | 8, 1);
        self.w(slot, 0x16, u64::from(q), 2);
        self.w(slot, 0x18, 16, 2);
        self.w(slot, 0x20, rings, 8);
        self.w(slot, 0x28, rings + 0x1000, 8);
        self.w(slot, 0x30, rings + 0x2000, 8);
        self.w(slot, 0x1c, 1, 2);
        self.w(slot, 0x14, 1 | 2 | 8 | 4, 1);
    }
    /// One chain of (addr, len, writable) at descriptor 0, made available and notified.
    fn post(&self, slot: u32, q: u16, rings: u64, chain: &[(u64, u32, bool)]) {
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let d = GuestAddress(rings + 16 * i as u64);
            let flags = u16::from(i + 1 < chain.len()) | if write { 2 } else { 0 };
            self.mem.write_obj(addr, d).unwrap();
            self.mem.write_obj(len, d.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, d.unchecked_add(12)).unwrap();
            self.mem
                .write_obj(i as u16 + 1, d.unchecked_add(14))
                .unwrap();
        }
        self.mem
            .write_obj(0u16, GuestAddress(rings + 0x1004))
            .unwrap();
        self.mem
            .write_obj(1u16, GuestAddress(rings + 0x1002))
            .unwrap();
        self.w(slot, 0x3000 + 4 * u64::from(q), u64::from(q), 2);
    }
}

#[test]
fn a_broken_device_and_a_bar_over_ram_leave_the_others_working() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let toml = format!(
        "[[device]]\nkind = \"virtio-blk\"\nimage = \"{}\"\nplacement = \"in-process\"\n\
         [[device]]\nkind = \"virtio-net\"\nbackend = \"socket:{}\"\nplacement = \"in-process\"\n\
         [[device]]\nkind = \"virtio-console\"\nplacement = \"in-process\"\n",
        disk.display(),
        dir.path().join("link.sock").display()
    );
    let d = layout::Description::parse(&toml, "hostile.toml").unwrap();
    let l = layout::resolve(&d).unwrap().layout;
    let pool = l.pool.clone().unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(pool.base), pool.size as usize)])
        .unwrap();
    let out = Out::default();
    let built = vmm::devices::build(
        &l,
        mem.clone(),
        &|_| Arc::new(NoSignal) as Arc<dyn virtio::transport::Signal>,
        Box::new(out.clone()),
        &|_| None,
        &vmm::connect::Hv::none,
        &|_| hostio::devices::VhostFds::default(),
    )
    .unwrap();
    let (ecam, regions) = vmm::pci_bus::host(&l);
    for (df, f) in built.functions {
        ecam.add(df, f);
    }
    let mut bus = Bus::default();
    for (r, dev) in regions {
        bus.add(r, dev);
    }
    let vm = Vm { bus, mem, l };
    for slot in 1..=3 {
        // Memory decoding on: BARs answer at the addresses the description gave.
        vm.cfg_write(slot, 0x04, 0x2);
        assert_ne!(
            vm.r8(slot, 0x12),
            0,
            "slot {slot} shows its queues at its BAR"
        );
    }
    let rings = pool.base;
    // virtio-blk: a request whose data buffer is guest RAM outside the pool.
    vm.start(1, 0, rings);
    vm.mem
        .write_obj(1u32, GuestAddress(rings + 0x3000))
        .unwrap();
    vm.post(
        1,
        0,
        rings,
        &[
            (rings + 0x3000, 16, false),
            (vm.l.ram.base, 512, false),
            (rings + 0x3100, 1, true),
        ],
    );
    assert_ne!(vm.r8(1, 0x14) & 0x40, 0, "blk needs a reset");
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0));
    // virtio-net: a queue size that is not a power of two, then its BAR moved over RAM.
    vm.w(2, 0x16, 1, 2);
    vm.w(2, 0x18, 3, 2);
    vm.w(2, 0x1c, 1, 2);
    let old = vm.bar(2);
    vm.cfg_write(2, 0x10, vm.l.ram.base as u32 | 0xc);
    vm.cfg_write(2, 0x14, 0);
    let mut b = [0xffu8; 4];
    vm.bus.read(old + 0x12, &mut b);
    assert_eq!(
        b, [0; 4],
        "the moved BAR no longer decodes at its old address"
    );
    // virtio-console: transmit still reaches the host, through the pool.
    let rings = pool.base + 0x10_0000;
    vm.start(3, 1, rings);
    vm.mem
        .write_slice(b"still alive\n", GuestAddress(rings + 0x3000))
        .unwrap();
    vm.post(3, 1, rings, &[(rings + 0x3000, 12, false)]);
    assert_eq!(vm.r8(3, 0x14) & 0x40, 0);
    assert_eq!(out.0.lock().unwrap().as_slice(), b"still alive\n");
}
