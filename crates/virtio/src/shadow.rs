//! What a driver has told a virtio-pci function, kept outside the process that serves it: the
//! VMM feeds a `Shadow` every config-space and BAR 0 write the guest makes to a device in the
//! backend, and when that backend dies and a new one starts, `replay` gives the writes that
//! bring the new instance to the state the driver believes its device is in.
//!
//! The shadow is the transport itself (`VirtioPci`) over a device that does nothing, so that
//! every write takes effect by exactly the rules the real transport applies (a queue address
//! after DRIVER_OK, say, is ignored by both). Its device offers every feature: the new real
//! instance checks the replayed features against its own offer, as the first one did. Its
//! size is fixed by the device's queue count, whatever the guest writes.

use crate::transport::{
    Route, VirtioPci, MSIX_TABLE, NO_VECTOR, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};
use crate::{DeviceError, Interrupt, Memory, VirtioDevice};
use pci::msix::Message;
use pci::PciFunction;
use std::sync::Arc;
use virtio_queue::Queue;

/// A queue's layout, as the driver programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueRegs {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub ready: bool,
}

/// One step of a replay, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A 4-byte config-space write.
    Config { off: u64, value: u32 },
    /// A BAR 0 write of `len` bytes.
    Bar { off: u64, len: u8, value: u64 },
    /// `PciFunction::resume`: the activation that follows continues the queues.
    Resume,
}

/// Stands in for the device: offers everything, does nothing.
struct Absent {
    device_type: u32,
    queue_sizes: Vec<u16>,
}

impl VirtioDevice for Absent {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn features(&self) -> u64 {
        u64::MAX
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn activate(
        &mut self,
        _: Memory,
        _: Vec<Queue>,
        _: Arc<dyn Interrupt>,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
    fn notify(&mut self, _: u16) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reset(&mut self) {}
}

struct Quiet;
impl crate::transport::Signal for Quiet {
    fn msi(&self, _: Message) {}
    fn intx(&self, _: bool) {}
}

pub struct Shadow {
    t: VirtioPci<Absent>,
    queues: u16,
}

impl Shadow {
    /// The shadow of a device of `device_type` with these queue sizes, whose rings must lie in
    /// `mem` (as the device's must), with BAR 0 at `bar_addr` until the guest moves it and
    /// `intx_pin` as its interrupt pin: its config space is the device's, byte for byte.
    pub fn new(
        device_type: u32,
        queue_sizes: &[u16],
        mem: Memory,
        bar_addr: u64,
        intx_pin: u8,
    ) -> Shadow {
        let device = Absent {
            device_type,
            queue_sizes: queue_sizes.to_vec(),
        };
        Shadow {
            t: VirtioPci::new(device, mem, bar_addr, intx_pin, Arc::new(Quiet)),
            queues: queue_sizes.len() as u16,
        }
    }

    /// The status the driver last set (0: reset).
    pub fn status(&mut self) -> u8 {
        self.read(0x14, 1) as u8
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.t.driver_features()
    }

    /// Queue `q`'s registers as the driver set them.
    pub fn queue(&mut self, q: u16) -> Option<QueueRegs> {
        if q >= self.queues {
            return None;
        }
        let select = self.read(0x16, 2) as u16;
        self.t.bar_write(0, 0x16, &q.to_le_bytes());
        let regs = QueueRegs {
            size: self.read(0x18, 2) as u16,
            desc: self.read(0x20, 8),
            avail: self.read(0x28, 8),
            used: self.read(0x30, 8),
            ready: self.read(0x1c, 2) & 1 == 1,
        };
        self.t.bar_write(0, 0x16, &select.to_le_bytes());
        Some(regs)
    }

    /// Whether the driver enabled MSI-X.
    pub fn msix_enabled(&self) -> bool {
        self.t.msix_enabled()
    }

    /// The MSI-X vectors the device has (one per queue and one for configuration changes).
    pub fn vectors(&self) -> u16 {
        self.queues + 1
    }

    /// The message the driver programmed into MSI-X vector `v` (address, data), sendable now
    /// or not; None past the table.
    pub fn msix_entry(&mut self, v: u16) -> Option<Message> {
        if v >= self.vectors() {
            return None;
        }
        let at = MSIX_TABLE + 16 * u64::from(v);
        Some((self.read(at, 8), self.read(at + 8, 4) as u32))
    }

    /// How the device would interrupt for queue `q` now.
    pub fn queue_route(&self, q: u16) -> Route {
        self.t.queue_route(q)
    }

    pub fn config_write(&mut self, off: u64, data: &[u8]) {
        self.t.config_write(off, data)
    }

    /// PCI config space as the device has it: nothing in it changes but by the driver's
    /// writes, which the shadow takes too, so the VMM answers these reads itself.
    pub fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.t.config_read(off, data)
    }

    pub fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        self.t.bar_write(bar, off, data)
    }

    /// Answers a BAR 0 read the shadow knows as the device does, and says whether it did:
    /// registers that hold only what the driver wrote, by the transport's rules, or what the
    /// device's shape fixes (selectors, the driver's features, vectors, the queue count, each
    /// queue's size, layout, enable and notify offset, the MSI-X table). What only the device
    /// knows is left to it: the features it offers, its status (it sets NEEDS_RESET, and a
    /// reset is done only when it says so), the generation, the ISR, its own config, the PBA.
    pub fn known_read(&mut self, off: u64, data: &mut [u8]) -> bool {
        let table = MSIX_TABLE..MSIX_TABLE + 16 * u64::from(self.vectors());
        let known = [0x00..0x04, 0x08..0x14, 0x16..0x38, table];
        let end = off.saturating_add(data.len() as u64);
        if !known.iter().any(|r| r.start <= off && end <= r.end) {
            return false;
        }
        self.t.bar_read(0, off, data);
        true
    }

    fn read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Selects `select` with a write at `at` and reads `len` bytes at `off`.
    fn read_selected(&mut self, at: u64, select: u32, off: u64, len: usize) -> u64 {
        self.t.bar_write(0, at, &select.to_le_bytes());
        self.read(off, len)
    }

    /// The writes that bring a new instance of the device, just reset, to this state: config
    /// space (command, BARs, interrupt line, MSI-X control), then the virtio status handshake
    /// with the driver's features, the MSI-X table, every queue's registers, `Resume`, the
    /// final status, and the selectors as the driver left them. Device-specific config writes
    /// are not replayed: none of splitvirt's devices keeps state there (a console's emergency
    /// write is an action, not state).
    pub fn replay(&mut self) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut cfg = [0u8; 4];
        for off in (0x04..0x100).step_by(4) {
            self.t.config_read(off, &mut cfg);
            steps.push(Step::Config {
                off,
                value: u32::from_le_bytes(cfg),
            });
        }
        let status = self.read(0x14, 1) as u8;
        let selectors = [(0x00, self.read(0x00, 4), 4), (0x08, self.read(0x08, 4), 4)];
        let queue_select = self.read(0x16, 2);
        let mut bar = |off: u64, len: u8, value: u64| steps.push(Step::Bar { off, len, value });
        // A driver may program features and queues before it sets any status bit, so all of
        // it is replayed whatever the status; a status write of 0 would be a reset, so the
        // handshake writes only the bits it has.
        let handshake = status & (STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for step in [status & STATUS_ACKNOWLEDGE, handshake] {
            if step != 0 {
                bar(0x14, 1, u64::from(step));
            }
        }
        let features = [0, 1].map(|i| self.read_selected(0x08, i, 0x0c, 4));
        for (i, f) in features.into_iter().enumerate() {
            bar(0x08, 4, i as u64);
            bar(0x0c, 4, f);
        }
        if status & STATUS_FEATURES_OK != 0 {
            bar(0x14, 1, u64::from(handshake | STATUS_FEATURES_OK));
        }
        for v in 0..u64::from(self.queues) + 1 {
            for word in 0..4 {
                let at = MSIX_TABLE + 16 * v + 4 * word;
                bar(at, 4, self.read(at, 4));
            }
        }
        let config_vector = self.read(0x10, 2);
        if config_vector != u64::from(NO_VECTOR) {
            bar(0x10, 2, config_vector);
        }
        for q in 0..u32::from(self.queues) {
            bar(0x16, 2, u64::from(q));
            for (off, len) in [(0x18, 2), (0x20, 8), (0x28, 8), (0x30, 8), (0x1a, 2)] {
                let v = self.read_selected(0x16, q, off, len);
                if off != 0x1a || v != u64::from(NO_VECTOR) {
                    bar(off, len as u8, v);
                }
            }
            bar(0x1c, 2, self.read(0x1c, 2));
        }
        if status & STATUS_DRIVER_OK != 0 {
            steps.push(Step::Resume);
        }
        if status != 0 {
            steps.push(Step::Bar {
                off: 0x14,
                len: 1,
                value: u64::from(status),
            });
        }
        // The reads above moved the shadow's own selectors: put them back, there and there.
        for (off, v, len) in selectors.into_iter().chain([(0x16, queue_select, 2)]) {
            self.t.bar_write(0, off, &v.to_le_bytes()[..len]);
            steps.push(Step::Bar {
                off,
                len: len as u8,
                value: v,
            });
        }
        steps
    }
}
