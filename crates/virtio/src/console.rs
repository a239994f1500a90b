//! virtio-console with one port (VIRTIO 1.2, 5.3): receiveq 0 carries host input to the guest,
//! transmitq 1 carries guest output to the host. `/dev/hvc0` in the guest.

use crate::{DeviceError, Interrupt, Memory, VirtioDevice};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes};

pub const QUEUE_SIZE: u16 = 256;
/// Virtqueues of this device (the notify addresses a hypervisor may catch itself).
pub const QUEUES: usize = 2;
const RX: u16 = 0;
const TX: u16 = 1;
/// Host input waiting for guest buffers; beyond this it is dropped (a guest that never reads).
const PENDING_MAX: usize = 64 * 1024;
/// A chain longer than this is a loop or an attack.
const MAX_CHAIN: usize = 1024;

pub struct Console {
    out: Box<dyn Write + Send>,
    input: VecDeque<u8>,
    active: Option<(Memory, Vec<Queue>, Arc<dyn Interrupt>)>,
}

impl Console {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console {
            out,
            input: VecDeque::new(),
            active: None,
        }
    }

    /// Host input: delivered as soon as the guest has posted receive buffers.
    pub fn queue_input(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        for &b in bytes {
            if self.input.len() < PENDING_MAX {
                self.input.push_back(b);
            }
        }
        self.fill_rx()
    }

    fn fill_rx(&mut self) -> Result<(), DeviceError> {
        let Some((mem, queues, irq)) = self.active.as_mut() else {
            return Ok(());
        };
        let q = &mut queues[usize::from(RX)];
        let err = |what: String| DeviceError::Queue { queue: RX, what };
        let mut used_any = false;
        while !self.input.is_empty() {
            let Some(chain) = crate::next_chain(q, &*mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for (n, d) in chain.enumerate() {
                if n >= MAX_CHAIN {
                    return Err(err("descriptor chain too long (a loop?)".into()));
                }
                if !d.is_write_only() {
                    return Err(err("a receive buffer the device may not write".into()));
                }
                let take = (d.len() as usize).min(self.input.len());
                let bytes: Vec<u8> = self.input.drain(..take).collect();
                mem.write_slice(&bytes, d.addr())
                    .map_err(|e| err(format!("buffer at {:#x}: {e}", d.addr().0)))?;
                written += take as u32;
                if self.input.is_empty() {
                    break;
                }
            }
            q.add_used(mem, head, written)
                .map_err(|e| err(e.to_string()))?;
            used_any = true;
        }
        if used_any && q.needs_notification(mem).unwrap_or(true) {
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
        let mut used_any = false;
        while let Some(chain) = crate::next_chain(q, &*mem) {
            let head = chain.head_index();
            for (n, d) in chain.enumerate() {
                if n >= MAX_CHAIN {
                    return Err(err("descriptor chain too long (a loop?)".into()));
                }
                if d.is_write_only() {
                    continue;
                }
                // In pieces through a fixed buffer: the guest's length is not an allocation
                // (up to 4 GiB), and a buffer outside memory fails at its first piece.
                let mut buf = [0u8; 4096];
                let mut done = 0u64;
                while done < u64::from(d.len()) {
                    let n = (u64::from(d.len()) - done).min(buf.len() as u64) as usize;
                    let at = d
                        .addr()
                        .checked_add(done)
                        .ok_or_else(|| err(format!("buffer at {:#x} wraps around", d.addr().0)))?;
                    mem.read_slice(&mut buf[..n], at)
                        .map_err(|e| err(format!("buffer at {:#x}: {e}", at.0)))?;
                    let _ = self.out.write_all(&buf[..n]);
                    done += n as u64;
                }
            }
            let _ = self.out.flush();
            q.add_used(mem, head, 0).map_err(|e| err(e.to_string()))?;
            used_any = true;
        }
        if used_any && q.needs_notification(mem).unwrap_or(true) {
            irq.queue(TX);
        }
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        3
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: 80x25, one port.
        let cfg = [80u8, 0, 25, 0, 1, 0, 0, 0, 0, 0, 0, 0];
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
    }
}
