//! virtio-net (VIRTIO 1.2, 5.1) with one queue pair and a MAC, over a frame backend (TAP, or a
//! channel in tests). With VERSION_1 every buffer starts with the 12-byte virtio_net_hdr. A
//! backend that takes packets with that header (a TAP with IFF_VNET_HDR: the host kernel
//! finishes checksums and cuts segments) gets the transmit offloads, checksum and TSO: the
//! guest sends up to 64 KiB in one packet instead of one frame per 1.5 KiB, each a
//! notification. Received frames come whole and checksummed; their header is all zeros.

use crate::{DeviceError, Interrupt, Memory, VirtioDevice};
use std::collections::VecDeque;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

pub const F_CSUM: u64 = 1 << 0;
pub const F_MAC: u64 = 1 << 5;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
/// What a backend with offloads lets the guest leave to the host.
pub const F_TX_OFFLOADS: u64 = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN;
/// The virtio_net_hdr (with num_buffers, as VERSION_1 has it).
pub const HDR: usize = 12;
pub const QUEUE_SIZE: u16 = 256;
/// Virtqueues of this device (the notify addresses a hypervisor may catch itself).
pub const QUEUES: usize = 2;
const RX: u16 = 0;
const TX: u16 = 1;
/// Largest frame we pass: Ethernet with a VLAN tag.
pub const MAX_FRAME: usize = 1522;
/// Largest packet a guest may send with TSO: 64 KiB of IP packet and its Ethernet header.
pub const MAX_GSO_PACKET: usize = 65536 + 18;
/// Frames waiting for guest buffers; more are dropped, as a full NIC ring would.
const RX_BACKLOG: usize = 256;
const MAX_CHAIN: usize = QUEUE_SIZE as usize;

/// Where frames go and come from.
pub trait NetBackend: Send {
    /// A frame, or with `offloads`, a packet with its virtio_net_hdr in front.
    fn send(&mut self, frame: &[u8]);
    /// Takes packets with their header and finishes checksums and segmentation itself.
    fn offloads(&self) -> bool {
        false
    }
}

pub struct Net {
    mac: [u8; 6],
    backend: Box<dyn NetBackend>,
    /// The backend's `offloads`, fixed at creation (the features must not change).
    offloads: bool,
    /// One transmit packet at a time, reused.
    tx: Vec<u8>,
    backlog: VecDeque<Vec<u8>>,
    active: Option<(Memory, Vec<Queue>, Arc<dyn Interrupt>)>,
    pub dropped: u64,
}

impl Net {
    pub fn new(mac: [u8; 6], backend: Box<dyn NetBackend>) -> Self {
        Net {
            mac,
            offloads: backend.offloads(),
            backend,
            tx: Vec::new(),
            backlog: VecDeque::new(),
            active: None,
            dropped: 0,
        }
    }

    /// A frame from the backend for the guest.
    pub fn receive(&mut self, frame: &[u8]) -> Result<(), DeviceError> {
        if frame.len() > MAX_FRAME || self.backlog.len() >= RX_BACKLOG {
            self.dropped += 1;
            return Ok(());
        }
        self.backlog.push_back(frame.to_vec());
        self.fill_rx()
    }

    fn fill_rx(&mut self) -> Result<(), DeviceError> {
        let Some((mem, queues, irq)) = self.active.as_mut() else {
            return Ok(());
        };
        let q = &mut queues[usize::from(RX)];
        let err = |what: String| DeviceError::Queue { queue: RX, what };
        let mut used = false;
        while let Some(frame) = self.backlog.front() {
            let Some(chain) = crate::next_chain(q, &*mem) else {
                break;
            };
            let head = chain.head_index();
            let mut packet = vec![0u8; HDR];
            // num_buffers = 1: the whole frame in this one chain.
            packet[10] = 1;
            packet.extend_from_slice(frame);
            let mut off = 0usize;
            for (n, d) in chain.enumerate() {
                if n >= MAX_CHAIN {
                    return Err(err("descriptor chain too long (a loop?)".into()));
                }
                if !d.is_write_only() {
                    return Err(err("a receive buffer the device may not write".into()));
                }
                let take = (d.len() as usize).min(packet.len() - off);
                mem.write_slice(&packet[off..off + take], d.addr())
                    .map_err(|e| err(format!("buffer at {:#x}: {e}", d.addr().0)))?;
                off += take;
                if off == packet.len() {
                    break;
                }
            }
            if off < packet.len() {
                // The guest's buffer is smaller than the frame: drop the frame, hand back the
                // buffer empty (as a NIC drops what does not fit).
                self.dropped += 1;
            }
            q.add_used(&*mem, head, off as u32)
                .map_err(|e| err(e.to_string()))?;
            self.backlog.pop_front();
            used = true;
        }
        if used && q.needs_notification(&*mem).unwrap_or(true) {
            irq.queue(RX);
        }
        Ok(())
    }

    fn drain_tx(&mut self) -> Result<(), DeviceError> {
        let Some((mem, queues, irq)) = self.active.as_mut() else {
            return Ok(());
        };
        let q = &mut queues[usize::from(TX)];
        let err = |what: String| DeviceError::Queue { queue: TX, what };
        let max = HDR
            + if self.offloads {
                MAX_GSO_PACKET
            } else {
                MAX_FRAME
            };
        let packet = &mut self.tx;
        let mut used = false;
        while let Some(chain) = crate::next_chain(q, &*mem) {
            let head = chain.head_index();
            packet.clear();
            for (n, d) in chain.enumerate() {
                if n >= MAX_CHAIN {
                    return Err(err("descriptor chain too long (a loop?)".into()));
                }
                if d.is_write_only() || packet.len() + d.len() as usize > max {
                    return Err(err(format!(
                        "a transmit chain that is writable or larger than {max} bytes"
                    )));
                }
                let start = packet.len();
                packet.resize(start + d.len() as usize, 0);
                mem.read_slice(&mut packet[start..], d.addr())
                    .map_err(|e| err(format!("buffer at {:#x}: {e}", d.addr().0)))?;
            }
            if packet.len() > HDR {
                // With offloads the header tells the host what is left to do.
                let from = if self.offloads { 0 } else { HDR };
                self.backend.send(&packet[from..]);
            }
            q.add_used(&*mem, head, 0).map_err(|e| err(e.to_string()))?;
            used = true;
        }
        if used && q.needs_notification(&*mem).unwrap_or(true) {
            irq.queue(TX);
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        1
    }
    fn features(&self) -> u64 {
        if self.offloads {
            F_MAC | F_TX_OFFLOADS
        } else {
            F_MAC
        }
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 10];
        cfg[..6].copy_from_slice(&self.mac);
        // max_virtqueue_pairs = 1 (offset 8), status unused without F_STATUS.
        cfg[8] = 1;
        crate::read_config_bytes(&cfg, offset, data);
    }
    fn activate(
        &mut self,
        mem: Memory,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), DeviceError> {
        self.active = Some((mem, queues, interrupt));
        Ok(())
    }
    fn notify(&mut self, index: u16) -> Result<(), DeviceError> {
        match index {
            RX => self.fill_rx(),
            TX => self.drain_tx(),
            _ => Ok(()),
        }
    }
    fn reset(&mut self) {
        self.active = None;
        self.backlog.clear();
    }
}
