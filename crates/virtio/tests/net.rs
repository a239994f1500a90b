//! virtio-net through the transport over a pool-only memory, with a channel as the wire.

mod common;

use common::*;
use std::sync::{Arc, Mutex};
use virtio::net::*;
use virtio::transport::STATUS_NEEDS_RESET;
use vm_memory::{Bytes, GuestAddress};

#[derive(Clone, Default)]
struct Wire(Arc<Mutex<Vec<Vec<u8>>>>);
impl NetBackend for Wire {
    fn send(&mut self, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.to_vec());
    }
}

fn net() -> (Driver<Net>, Wire) {
    let wire = Wire::default();
    (
        Driver::new(Net::new(
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            Box::new(wire.clone()),
        )),
        wire,
    )
}

#[test]
fn mac_in_config_and_transmit_strips_the_header() {
    let (mut d, wire) = net();
    let mut mac = [0u8; 6];
    pci::PciFunction::bar_read(&mut d.dev, 0, virtio::transport::DEVICE_CFG, &mut mac);
    assert_eq!(mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    d.start(1, F_MAC);
    let mut pkt = vec![0u8; 12];
    pkt.extend_from_slice(b"an ethernet frame");
    d.mem.write_slice(&pkt, GuestAddress(BUF)).unwrap();
    // Header and frame in two descriptors, as Linux may send them.
    d.post(1, &[(BUF, 12, false), (BUF + 12, 17, false)]);
    assert_eq!(*wire.0.lock().unwrap(), vec![b"an ethernet frame".to_vec()]);
}

#[test]
fn receive_prepends_the_header_and_waits_for_buffers() {
    let (mut d, _) = net();
    d.start(0, F_MAC);
    // A frame before any buffer is posted waits in the backlog.
    d.dev.with_device(|n| n.receive(b"hello guest"));
    d.post(0, &[(BUF, 1526, true)]);
    let mut got = vec![0u8; 23];
    d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(&got[..10], &[0; 10]);
    assert_eq!(got[10], 1, "num_buffers");
    assert_eq!(&got[12..], b"hello guest");
    assert_eq!(d.used_len(0), 23);
}

#[test]
fn oversized_frames_and_bad_chains() {
    let (mut d, wire) = net();
    d.start(1, F_MAC);
    // A transmit chain larger than any frame: the driver is broken or hostile.
    d.post(1, &[(BUF, 4000, false)]);
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
    assert!(wire.0.lock().unwrap().is_empty());
    let (mut d, _) = net();
    d.start(0, F_MAC);
    d.dev.with_device(|n| n.receive(&[0u8; 9000]));
    assert_eq!(d.dev.device().dropped, 1);
    // A receive buffer outside the pool.
    d.dev.with_device(|n| n.receive(b"x"));
    d.post(0, &[(0x4000_0000, 64, true)]);
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
}
