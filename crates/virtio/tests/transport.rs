//! The transport and the console driven the way Linux's virtio-pci driver drives them, over a
//! guest memory that holds only the restricted pool.

mod common;

use common::*;
use pci::PciFunction;
use virtio::console::Console;
use virtio::transport::*;
use virtio::{F_ACCESS_PLATFORM, F_VERSION_1};
use vm_memory::{Bytes, GuestAddress};

fn console() -> (Driver<Console>, Out) {
    let out = Out::default();
    (Driver::new(Console::new(Box::new(out.clone()))), out)
}

#[test]
fn device_offers_version_1_and_access_platform() {
    let (mut g, _) = console();
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
    let (mut g, _) = console();
    assert_eq!(
        g.negotiate(F_VERSION_1) & STATUS_FEATURES_OK,
        0,
        "FEATURES_OK must not stick"
    );
    let (mut g, _) = console();
    assert_ne!(
        g.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM) & STATUS_FEATURES_OK,
        0
    );
}

#[test]
fn transmit_reaches_the_host_through_the_pool() {
    let (mut g, out) = console();
    g.start(1, 0);
    assert_ne!(g.status() & STATUS_DRIVER_OK, 0);
    g.mem
        .write_slice(b"hello, hvc0\n", GuestAddress(BUF))
        .unwrap();
    g.post(1, &[(BUF, 12, false)]);
    assert_eq!(&*out.0.lock().unwrap(), b"hello, hvc0\n");
    assert_eq!(g.used_idx(), 1);
    // No MSI-X enabled: INTx with the ISR bit, which a read acknowledges.
    assert_eq!(g.sig.intx.lock().unwrap().last(), Some(&true));
    assert_eq!(g.r(ISR, 1), 1);
    assert_eq!(g.r(ISR, 1), 0);
}

/// VIRTIO_F_EVENT_IDX: the device tells the driver where to kick (avail_event) and honours
/// where the driver wants an interrupt (used_event).
#[test]
fn event_index_moves_the_avail_event_and_suppresses_interrupts() {
    let (mut g, out) = console();
    g.w(0x00, 0, 4);
    assert_ne!(g.r(0x04, 4) & virtio::F_EVENT_IDX, 0, "offered");
    g.start(1, virtio::F_EVENT_IDX);
    let avail_event = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
    let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
    g.mem.write_obj(0u16, used_event).unwrap();
    g.mem.write_slice(b"one", GuestAddress(BUF)).unwrap();
    g.post(1, &[(BUF, 3, false)]);
    let ev: u16 = g.mem.read_obj(avail_event).unwrap();
    assert_eq!(ev, 1, "kick me when chain 1 is added");
    let raised = g.sig.intx.lock().unwrap().iter().filter(|&&l| l).count();
    assert_eq!(raised, 1, "used_event 0 asks for this interrupt");
    g.r(ISR, 1);
    // The driver wants no interrupt before its 10th used entry.
    g.mem.write_obj(10u16, used_event).unwrap();
    g.post(1, &[(BUF, 3, false)]);
    assert_eq!(g.used_idx(), 2);
    let raised = g.sig.intx.lock().unwrap().iter().filter(|&&l| l).count();
    assert_eq!(raised, 1, "suppressed by used_event");
    assert_eq!(&*out.0.lock().unwrap(), b"oneone");
}

/// A thread that polls its queues (`virtio::polling`) leaves a queue it finds empty unarmed:
/// the avail event stays behind, so the driver's next chains need no notification; once it
/// stops polling, its next look moves the avail event to where it stands.
#[test]
fn a_polling_thread_leaves_the_avail_event_behind_until_it_stops() {
    let (mut g, out) = console();
    g.start(1, virtio::F_EVENT_IDX);
    let avail_event = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
    let event = |g: &common::Driver<_>| g.mem.read_obj::<u16>(avail_event).unwrap();
    g.mem.write_slice(b"one", GuestAddress(BUF)).unwrap();
    g.post(1, &[(BUF, 3, false)]);
    assert_eq!(event(&g), 1, "armed for chain 1");
    virtio::polling(true, || {
        g.post(1, &[(BUF, 3, false)]);
        g.post(1, &[(BUF, 3, false)]);
    });
    assert_eq!(g.used_idx(), 3, "served all the same");
    assert_eq!(event(&g), 1, "left behind while polling");
    g.post(1, &[(BUF, 3, false)]);
    assert_eq!(event(&g), 4, "armed again once the thread stops polling");
    assert_eq!(&*out.0.lock().unwrap(), b"oneoneoneone");
}

#[test]
fn receive_fills_posted_buffers_with_host_input() {
    let (mut g, _) = console();
    g.start(0, 0);
    g.post(0, &[(BUF, 64, true)]);
    g.dev.with_device(|c| c.queue_input(b"typed\n"));
    let mut got = [0u8; 6];
    g.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(&got, b"typed\n");
    assert_eq!(g.used_len(0), 6);
}

/// A 4 GiB transmit descriptor is a guest's number, not an allocation: the console copies
/// what lies in the pool piece by piece and stops with NEEDS_RESET where the pool ends.
#[test]
fn a_huge_transmit_descriptor_is_no_allocation() {
    let (mut g, out) = console();
    g.start(1, 0);
    g.mem.write_slice(b"tail", GuestAddress(BUF)).unwrap();
    g.post(1, &[(BUF, u32::MAX, false)]);
    assert_ne!(g.status() & STATUS_NEEDS_RESET, 0);
    let written = out.0.lock().unwrap().len();
    assert!(
        written > 0 && written < (64 << 20),
        "{written} bytes written"
    );
    assert!(out.0.lock().unwrap().starts_with(b"tail"));
}

#[test]
fn a_descriptor_outside_the_pool_sets_needs_reset_and_reads_nothing() {
    let (mut g, out) = console();
    g.start(1, 0);
    // Guest RAM outside the pool: the device's memory does not have it.
    g.post(1, &[(0x4000_0000, 64, false)]);
    assert!(out.0.lock().unwrap().is_empty());
    assert_ne!(g.status() & STATUS_NEEDS_RESET, 0);
    assert_eq!(g.dev.errors, 1);
    // Further notifications are ignored until the driver resets the device.
    g.post(1, &[(BUF, 4, false)]);
    assert!(out.0.lock().unwrap().is_empty());
    g.w(0x14, 0, 1);
    assert_eq!(g.status(), 0);
}

#[test]
fn rings_outside_the_pool_fail_at_driver_ok() {
    let (mut g, _) = console();
    g.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM);
    g.w(0x16, 1, 2);
    g.w(0x20, 0x4000_0000, 8);
    g.w(0x28, AVAIL, 8);
    g.w(0x30, USED, 8);
    g.w(0x1c, 1, 2);
    g.w(0x14, 0xf, 1);
    assert_ne!(g.status() & STATUS_NEEDS_RESET, 0);
}

#[test]
fn msix_vectors_route_queue_interrupts() {
    let (mut g, _) = console();
    // Enable MSI-X in config space.
    let cap = g.msix_cap();
    g.cfg_w(cap + 2, 0x8000, 2);
    // Vector 2 -> v2m SETSPI with interrupt ID 70, unmasked.
    g.w(MSIX_TABLE + 32, 0x0802_0040, 4);
    g.w(MSIX_TABLE + 40, 70, 4);
    g.w(MSIX_TABLE + 44, 0, 4);
    g.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM);
    g.w(0x16, 1, 2);
    g.w(0x1a, 999, 2);
    assert_eq!(
        g.r(0x1a, 2),
        u64::from(NO_VECTOR),
        "a vector the table lacks reads back as NO_VECTOR"
    );
    g.w(0x1a, 2, 2);
    assert_eq!(g.r(0x1a, 2), 2);
    g.enable_on_fixed_rings();
    g.mem.write_slice(b"x", GuestAddress(BUF)).unwrap();
    g.post(1, &[(BUF, 1, false)]);
    assert_eq!(*g.sig.msis.lock().unwrap(), vec![(0x0802_0040, 70)]);
}

#[test]
fn hostile_register_traffic_never_panics() {
    let (mut g, _) = console();
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

/// A device whose interrupt handle the test keeps, to fail it from outside as a device whose
/// backend went away does; it counts the notifications that reach it.
struct Failing {
    irq: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<dyn virtio::Interrupt>>>>,
    notified: u32,
}

impl virtio::VirtioDevice for Failing {
    fn device_type(&self) -> u32 {
        2
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QSIZE, QSIZE]
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn activate(
        &mut self,
        _: virtio::Memory,
        _: Vec<virtio_queue::Queue>,
        interrupt: std::sync::Arc<dyn virtio::Interrupt>,
    ) -> Result<(), virtio::DeviceError> {
        *self.irq.lock().unwrap() = Some(interrupt);
        Ok(())
    }
    fn notify(&mut self, _: u16) -> Result<(), virtio::DeviceError> {
        self.notified += 1;
        Ok(())
    }
    fn reset(&mut self) {}
}

#[test]
fn a_device_that_fails_on_its_own_needs_a_reset_and_says_so() {
    let irq = std::sync::Arc::default();
    let mut g = Driver::new(Failing {
        irq: std::sync::Arc::clone(&irq),
        notified: 0,
    });
    g.start(1, 0);
    g.post(1, &[(BUF, 4, false)]);
    assert_eq!(g.dev.device().notified, 1);
    assert_eq!(g.status() & STATUS_NEEDS_RESET, 0);
    let handle = irq.lock().unwrap().clone().expect("activated");
    std::thread::spawn(move || {
        handle.failed();
        handle.failed();
    })
    .join()
    .unwrap();
    assert_eq!(g.status(), 0xf | STATUS_NEEDS_RESET);
    // Told once, by a configuration interrupt (INTx here: ISR bit 1).
    assert_eq!(*g.sig.intx.lock().unwrap(), vec![true]);
    assert_eq!(g.r(ISR, 1) & 2, 2, "ISR says configuration");
    // What the driver writes meanwhile does not undo it, and notifications stop.
    g.w(0x14, 0xf, 1);
    assert_ne!(g.status() & STATUS_NEEDS_RESET, 0);
    g.post(1, &[(BUF, 4, false)]);
    assert_eq!(g.dev.device().notified, 1);
    // A reset clears it.
    g.w(0x14, 0, 1);
    assert_eq!(g.status(), 0);
}
