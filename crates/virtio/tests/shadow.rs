//! A device's second instance, brought up by replaying the shadow of the driver's writes to
//! the first, carries on where the first stopped: what the VMM does for a device whose backend
//! process died and was started again.

mod common;

use common::*;
use pci::PciFunction;
use virtio::console::{self, Console};
use virtio::shadow::{Shadow, Step};
use virtio::transport::*;
use virtio::{F_ACCESS_PLATFORM, F_EVENT_IDX, F_VERSION_1};
use vm_memory::{Bytes, GuestAddress};

const MSI_ADDR: u64 = 0x0802_0040;

fn console_with_shadow() -> (Driver<Console>, Out) {
    let out = Out::default();
    let mut d = Driver::new(Console::new(Box::new(out.clone())));
    d.tap = Some(Shadow::new(
        3,
        &[console::QUEUE_SIZE; console::QUEUES],
        d.mem.clone(),
        BAR_ADDR,
        1,
    ));
    (d, out)
}

/// A second console over the same memory, given the first one's replay.
fn replayed(first: &mut Driver<Console>) -> (Driver<Console>, Out, Vec<Step>) {
    let out = Out::default();
    let mut d = Driver::on(Console::new(Box::new(out.clone())), first.mem.clone());
    let steps = first.tap.as_mut().unwrap().replay();
    for s in &steps {
        match *s {
            Step::Config { off, value } => d.dev.config_write(off, &value.to_le_bytes()),
            Step::Bar { off, len, value } => {
                d.dev
                    .bar_write(0, off, &value.to_le_bytes()[..usize::from(len)])
            }
            Step::Resume => d.dev.resume(),
        }
    }
    d.next = first.next;
    (d, out, steps)
}

/// Every register a driver can read back, except the ISR (read-to-clear) and device config.
fn registers(d: &mut Driver<Console>) -> Vec<u64> {
    let mut v = Vec::new();
    for off in (0..0x100).step_by(4) {
        let mut b = [0u8; 4];
        d.dev.config_read(off, &mut b);
        v.push(u64::from(u32::from_le_bytes(b)));
    }
    for off in [0x00, 0x08, 0x10, 0x12, 0x14, 0x16] {
        v.push(d.r(off, 2));
    }
    for sel in 0..2 {
        d.dev.bar_write(0, 0x08, &u32::to_le_bytes(sel));
        v.push(d.r(0x0c, 4));
    }
    d.dev.bar_write(0, 0x08, &0u32.to_le_bytes());
    for q in 0..console::QUEUES as u16 {
        d.dev.bar_write(0, 0x16, &q.to_le_bytes());
        for (off, len) in [
            (0x18, 2),
            (0x1a, 2),
            (0x1c, 2),
            (0x20, 8),
            (0x28, 8),
            (0x30, 8),
        ] {
            v.push(d.r(off, len));
        }
    }
    for off in (MSIX_TABLE..MSIX_TABLE + 48).step_by(4) {
        v.push(d.r(off, 4));
    }
    v
}

#[test]
fn a_replayed_console_has_the_same_registers_and_carries_on_after_the_last_used_buffer() {
    let (mut a, out_a) = console_with_shadow();
    // As Linux does it: the BAR moved, memory and bus mastering on, MSI-X on with vectors for
    // the config change and the transmit queue, event index negotiated.
    a.cfg_w(0x10, 0x4000_000c, 4);
    a.cfg_w(0x14, 0x80, 4);
    a.cfg_w(0x04, 0x6, 2);
    let cap = a.msix_cap();
    a.cfg_w(cap + 2, 0x8000, 2);
    for (v, spi) in [(0u64, 70u64), (1, 71)] {
        a.w(MSIX_TABLE + 16 * v, MSI_ADDR, 4);
        a.w(MSIX_TABLE + 16 * v + 8, spi, 4);
        a.w(MSIX_TABLE + 16 * v + 12, 0, 4);
    }
    a.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM | F_EVENT_IDX);
    a.w(0x10, 0, 2);
    a.w(0x16, 1, 2);
    a.w(0x1a, 1, 2);
    a.enable_on_fixed_rings();
    // Queue layout written after DRIVER_OK is ignored by the device, and so by its shadow.
    a.w(0x20, DESC + 0x100, 8);
    for (i, m) in [b"one\n", b"two\n", b"six\n"].iter().enumerate() {
        let at = BUF + 16 * i as u64;
        a.mem.write_slice(*m, GuestAddress(at)).unwrap();
        a.post(1, &[(at, 4, false)]);
    }
    assert_eq!(&*out_a.0.lock().unwrap(), b"one\ntwo\nsix\n");
    assert_eq!(a.used_idx(), 3);

    let (mut b, out_b, steps) = replayed(&mut a);
    assert!(steps.contains(&Step::Resume));
    assert_eq!(registers(&mut a), registers(&mut b));
    assert_eq!(b.status(), 0xf);
    // The new instance takes the next buffer, not the ones the first one already used, and
    // signals through the replayed MSI-X entry.
    b.mem.write_slice(b"ten\n", GuestAddress(BUF + 64)).unwrap();
    // used_event (after the avail ring): an interrupt when the fourth buffer is used.
    b.mem
        .write_obj(3u16, GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)))
        .unwrap();
    b.post(1, &[(BUF + 64, 4, false)]);
    assert_eq!(&*out_b.0.lock().unwrap(), b"ten\n");
    assert_eq!(b.used_idx(), 4);
    assert_eq!(b.sig.msis.lock().unwrap().last(), Some(&(MSI_ADDR, 71)));
}

#[test]
fn a_device_the_driver_reset_replays_as_reset_and_a_failed_one_as_failed() {
    let (mut a, _) = console_with_shadow();
    a.start(1, 0);
    a.w(0x14, 0, 1);
    let (mut b, _, steps) = replayed(&mut a);
    assert!(!steps.contains(&Step::Resume));
    assert_eq!(b.status(), 0);
    assert_eq!(registers(&mut a), registers(&mut b));

    // A driver that never offered ACCESS_PLATFORM: FEATURES_OK did not stick, then FAILED.
    let (mut a, _) = console_with_shadow();
    a.negotiate(F_VERSION_1);
    a.w(0x14, 0x83, 1);
    let (mut b, _, _) = replayed(&mut a);
    assert_eq!(b.status(), 0x83);
    assert_eq!(registers(&mut a), registers(&mut b));
}

/// Where a write of the property test below lands: config space, common config, or the MSI-X
/// table (not the notify area: a kick makes the real console walk its rings, which the
/// stand-in device does not).
fn write_strategy() -> impl proptest::strategy::Strategy<Value = (u8, u64, usize, u64)> {
    use proptest::prelude::*;
    (
        0u8..3,
        0u64..0x100,
        prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
        prop_oneof![
            any::<u64>(),
            0u64..0x100,
            Just(POOL),
            Just(AVAIL),
            Just(USED),
            Just(0xb),
            Just(0xf)
        ],
    )
}

/// The property tests' writes, made by the driver (and so seen by its shadow).
fn drive(a: &mut Driver<Console>, writes: Vec<(u8, u64, usize, u64)>) {
    for (space, off, len, value) in writes {
        match space {
            0 => a.cfg_w(off & !(len as u64 - 1), value, len),
            1 => a.w(off % 0x40, value, len),
            _ => a.w(MSIX_TABLE + off % 48, value, len),
        }
    }
}

proptest::proptest! {
    /// Whatever a driver writes, the replayed instance reads back as the first one does.
    #[test]
    fn any_driver_writes_replay_to_the_same_registers(
        writes in proptest::collection::vec(write_strategy(), 1..60)
    ) {
        let (mut a, _) = console_with_shadow();
        drive(&mut a, writes);
        let (mut b, _, _) = replayed(&mut a);
        proptest::prop_assert_eq!(registers(&mut a), registers(&mut b));
    }

    /// Whatever a driver writes, the shadow's config space reads as the device's, every byte
    /// of it (the VMM answers config-space reads of a backend device from its shadow).
    #[test]
    fn any_driver_writes_leave_the_shadows_config_space_the_devices(
        writes in proptest::collection::vec(write_strategy(), 1..60)
    ) {
        let (mut a, _) = console_with_shadow();
        drive(&mut a, writes);
        for off in (0..0x1000).step_by(4) {
            let (mut dev, mut shadow) = ([0u8; 4], [0u8; 4]);
            a.dev.config_read(off, &mut dev);
            a.tap.as_mut().unwrap().config_read(off, &mut shadow);
            proptest::prop_assert_eq!(dev, shadow, "config space at {:#x}", off);
        }
    }

    /// Whatever a driver writes, every BAR 0 register the shadow answers for reads as the
    /// device's (the VMM answers those reads of a backend device from its shadow).
    #[test]
    fn any_driver_writes_leave_the_registers_the_shadow_answers_the_devices(
        writes in proptest::collection::vec(write_strategy(), 1..60)
    ) {
        let (mut a, _) = console_with_shadow();
        drive(&mut a, writes);
        let common = (0..0x40u64).flat_map(|off| [1usize, 2, 4, 8].map(|len| (off, len)));
        let table = (MSIX_TABLE..MSIX_TABLE + 64).step_by(4).map(|off| (off, 4));
        let mut answered = 0;
        for (off, len) in common.chain(table) {
            let (mut dev, mut shadow) = ([0u8; 8], [0u8; 8]);
            if a.tap.as_mut().unwrap().known_read(off, &mut shadow[..len]) {
                a.dev.bar_read(0, off, &mut dev[..len]);
                proptest::prop_assert_eq!(dev, shadow, "BAR 0 at {:#x}, {} bytes", off, len);
                answered += 1;
            }
        }
        proptest::prop_assert!(answered > 100);
    }
}

#[test]
fn what_only_the_device_knows_is_left_to_it() {
    let (mut a, _) = console_with_shadow();
    a.start(1, 0);
    let shadow = a.tap.as_mut().unwrap();
    let mut b = [0u8; 4];
    for (off, len, what) in [
        (0x04, 4, "the features it offers"),
        (0x14, 1, "its status"),
        (0x12, 4, "status and generation, read with the queue count"),
        (0x15, 1, "the config generation"),
        (ISR, 1, "the ISR"),
        (DEVICE_CFG, 4, "its config"),
        (NOTIFY, 2, "the notify area"),
        (MSIX_TABLE + 48, 4, "past the table"),
        (MSIX_PBA, 4, "the PBA"),
    ] {
        assert!(!shadow.known_read(off, &mut b[..len]), "{what}");
    }
    assert!(shadow.known_read(0x18, &mut b[..2]));
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), QSIZE);
}
