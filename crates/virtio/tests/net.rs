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
    d.w(0x00, 0, 4);
    assert_eq!(
        d.r(0x04, 4) & F_TX_OFFLOADS,
        0,
        "no offloads over a frame wire"
    );
    d.start(1, F_MAC);
    let mut pkt = vec![0u8; 12];
    pkt.extend_from_slice(b"an ethernet frame");
    d.mem.write_slice(&pkt, GuestAddress(BUF)).unwrap();
    // Header and frame in two descriptors, as Linux may send them.
    d.post(1, &[(BUF, 12, false), (BUF + 12, 17, false)]);
    assert_eq!(*wire.0.lock().unwrap(), vec![b"an ethernet frame".to_vec()]);
}

/// A wire that takes packets with their header, as a TAP with IFF_VNET_HDR does.
#[derive(Clone, Default)]
struct OffloadWire(Arc<Mutex<Vec<Vec<u8>>>>);
impl NetBackend for OffloadWire {
    fn send(&mut self, packet: &[u8]) {
        self.0.lock().unwrap().push(packet.to_vec());
    }
    fn offloads(&self) -> bool {
        true
    }
}

/// Over a backend with offloads the device offers checksum and TSO, and a 60 KiB packet (as a
/// guest sends with TSO) reaches the backend whole with its header; past 64 KiB a chain is
/// refused. Without offloads none is offered (the frame test above).
#[test]
fn a_backend_with_offloads_gets_tso_packets_with_their_header() {
    let wire = OffloadWire::default();
    let mut d = Driver::new(Net::new([0x52, 0x54, 0, 0, 0, 1], Box::new(wire.clone())));
    d.w(0x00, 0, 4);
    assert_eq!(d.r(0x04, 4) & F_TX_OFFLOADS, F_TX_OFFLOADS);
    d.start(1, F_MAC | F_TX_OFFLOADS);
    let len = 60 << 10;
    let mut pkt = vec![0x5au8; HDR + len];
    // flags NEEDS_CSUM, gso_type TCPV4, as the guest writes them.
    pkt[0] = 1;
    pkt[1] = 1;
    d.mem.write_slice(&pkt, GuestAddress(BUF)).unwrap();
    d.post(1, &[(BUF, 12, false), (BUF + 12, len as u32, false)]);
    assert_eq!(*wire.0.lock().unwrap(), vec![pkt]);
    d.post(1, &[(BUF, 12, false), (BUF + 12, 70_000, false)]);
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
    assert_eq!(wire.0.lock().unwrap().len(), 1);
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
