//! The virtio-pci modern transport (VIRTIO 1.2, 4.1): one 64-bit BAR holding the common,
//! ISR, device-specific and notify structures and the MSI-X table and PBA, each on its own
//! 4 KiB page; the capabilities that point at them; feature negotiation that insists on
//! VERSION_1 and ACCESS_PLATFORM; queue setup; and interrupts by MSI-X or INTx.

use crate::{DeviceError, Interrupt, Memory, VirtioDevice, F_ACCESS_PLATFORM, F_VERSION_1};
use pci::config::{BarKind, ConfigSpace};
use pci::msix::{Message, MsixTable};
use pci::PciFunction;
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};

pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON: u64 = 0x0000;
pub const ISR: u64 = 0x1000;
pub const DEVICE_CFG: u64 = 0x2000;
pub const NOTIFY: u64 = 0x3000;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x5000;
/// Each queue's notify address is NOTIFY + index * this.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const PAGE: u32 = 0x1000;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;
pub const NO_VECTOR: u16 = 0xffff;

const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// Where interrupts go: MSI-X messages to the MSI controller, INTx to a level line.
pub trait Signal: Send + Sync {
    fn msi(&self, message: Message);
    /// MSI-X vector `vector` sends `message` (what the table holds for it). Where a vector has
    /// a path of its own (the backend's per-vector irqfds) it takes that, else the message.
    fn msi_vector(&self, vector: u16, message: Message) {
        let _ = vector;
        self.msi(message)
    }
    fn intx(&self, level: bool);
}

/// Transport state shared with the device's interrupt handle.
struct Shared {
    msix: MsixTable,
    isr: u8,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    signal: Arc<dyn Signal>,
    /// The device said it cannot go on (`Interrupt::failed`), from a thread of its own.
    failed: bool,
}

impl Shared {
    fn raise(&mut self, vector: u16, isr_bit: u8) {
        if self.msix.enabled() {
            if vector != NO_VECTOR {
                if let Some(m) = self.msix.signal(vector) {
                    self.signal.msi_vector(vector, m);
                }
            }
        } else {
            self.isr |= isr_bit;
            self.signal.intx(true);
        }
    }
}

struct Irq(Arc<Mutex<Shared>>);

impl Interrupt for Irq {
    fn queue(&self, index: u16) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let v = s
            .queue_vectors
            .get(usize::from(index))
            .copied()
            .unwrap_or(NO_VECTOR);
        s.raise(v, 1);
    }
    fn config(&self) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let v = s.config_vector;
        s.raise(v, 2);
    }
    fn queue_vector(&self, index: u16) -> Option<u16> {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let v = *s.queue_vectors.get(usize::from(index))?;
        (s.msix.enabled() && v != NO_VECTOR).then_some(v)
    }
    fn failed(&self) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !s.failed {
            s.failed = true;
            let v = s.config_vector;
            s.raise(v, 2);
        }
    }
}

/// See `VirtioPci::queue_route`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Msi(Message),
    Held,
    Intx,
}

pub struct VirtioPci<D: VirtioDevice> {
    device: D,
    cfg: ConfigSpace,
    shared: Arc<Mutex<Shared>>,
    mem: Memory,
    queues: Vec<Queue>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    config_generation: u8,
    /// Set by `resume`: the next activation continues each queue where its used ring stands.
    resume: bool,
    /// Errors seen (logged once): a hostile or broken driver.
    pub errors: u64,
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// `mem` is all the device may reach (the restricted pool, when there is one).
    pub fn new(
        device: D,
        mem: Memory,
        bar_addr: u64,
        intx_pin: u8,
        signal: Arc<dyn Signal>,
    ) -> Self {
        let id = 0x1040 + device.device_type() as u16;
        let mut cfg = ConfigSpace::new(0x1af4, id, class_of(device.device_type()), 1);
        cfg.set_subsystem(0x1af4, 0x40);
        cfg.set_interrupt_pin(intx_pin);
        cfg.set_bar(0, BAR_SIZE, BarKind::Mem64 { prefetchable: true }, bar_addr);
        for (ty, off) in [
            (CFG_COMMON, COMMON),
            (CFG_ISR, ISR),
            (CFG_DEVICE, DEVICE_CFG),
        ] {
            cfg.add_capability(CAP_VENDOR, &vendor_cap(ty, off as u32, PAGE, None), &[]);
        }
        cfg.add_capability(
            CAP_VENDOR,
            &vendor_cap(CFG_NOTIFY, NOTIFY as u32, PAGE, Some(NOTIFY_MULTIPLIER)),
            &[],
        );
        let vectors = device.queue_max_sizes().len() as u16 + 1;
        let msix = MsixTable::new(&mut cfg, vectors, 0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m).expect("device queue sizes are valid powers of two"))
            .collect::<Vec<_>>();
        let shared = Shared {
            msix,
            isr: 0,
            config_vector: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; queues.len()],
            signal,
            failed: false,
        };
        VirtioPci {
            device,
            cfg,
            shared: Arc::new(Mutex::new(shared)),
            mem,
            queues,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            resume: false,
            errors: 0,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// Runs host-side work on the device (input arriving, say); an error it reports puts the
    /// device in DEVICE_NEEDS_RESET as a guest-caused one would.
    pub fn with_device<R>(
        &mut self,
        f: impl FnOnce(&mut D) -> Result<R, DeviceError>,
    ) -> Option<R> {
        match f(&mut self.device) {
            Ok(r) => Some(r),
            Err(e) => {
                self.needs_reset(&e);
                None
            }
        }
    }

    pub fn config(&self) -> &ConfigSpace {
        &self.cfg
    }

    /// How an interrupt for queue `q` goes out now (for whoever signals on the device's
    /// behalf): the MSI-X message, nothing (no vector, or masked: left pending), or INTx.
    pub fn queue_route(&self, q: u16) -> Route {
        let mut s = self.shared();
        if !s.msix.enabled() {
            return Route::Intx;
        }
        let v = s
            .queue_vectors
            .get(usize::from(q))
            .copied()
            .unwrap_or(NO_VECTOR);
        match s.msix.signal(v) {
            Some(m) => Route::Msi(m),
            None => Route::Held,
        }
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The device status as the driver reads it: NEEDS_RESET too once the device failed.
    pub fn status(&self) -> u8 {
        self.status_with(&self.shared())
    }

    fn status_with(&self, s: &Shared) -> u8 {
        if self.status & STATUS_DRIVER_OK != 0 && s.failed {
            self.status | STATUS_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn offered(&self) -> u64 {
        self.device.features() | F_VERSION_1 | F_ACCESS_PLATFORM | crate::F_EVENT_IDX
    }

    /// Whether the driver enabled MSI-X (the device then never asserts INTx).
    pub fn msix_enabled(&self) -> bool {
        self.shared().msix.enabled()
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reset(&mut self) {
        self.device.reset();
        self.shared().failed = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.resume = false;
        for q in &mut self.queues {
            q.reset();
        }
        let mut s = self.shared();
        s.isr = 0;
        s.config_vector = NO_VECTOR;
        s.queue_vectors.iter_mut().for_each(|v| *v = NO_VECTOR);
        s.signal.intx(false);
    }

    /// The device cannot go on with what the driver gave it: DEVICE_NEEDS_RESET, and tell it.
    fn needs_reset(&mut self, e: &DeviceError) {
        if self.errors == 0 {
            ratelog::warn!(
                "virtio: device {} needs reset: {e}",
                self.device.device_type()
            );
        }
        self.errors += 1;
        if self.status & STATUS_DRIVER_OK != 0 {
            self.status |= STATUS_NEEDS_RESET;
            Irq(self.shared.clone()).config();
        }
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        self.status = self.status();
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Only what we offered, and the two features isolation depends on.
            let ok = self.driver_features & !self.offered() == 0
                && self.driver_features & F_VERSION_1 != 0
                && self.driver_features & F_ACCESS_PLATFORM != 0;
            if !ok {
                v &= !STATUS_FEATURES_OK;
            }
        }
        if v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
            if self.status & STATUS_FEATURES_OK == 0 && v & STATUS_FEATURES_OK == 0 {
                v &= !STATUS_DRIVER_OK;
                v |= STATUS_FAILED;
            } else if let Err(e) = self.activate() {
                self.status = v;
                self.needs_reset(&e);
                return;
            }
        }
        // The device keeps NEEDS_RESET until the driver resets it.
        self.status = v | (self.status & STATUS_NEEDS_RESET);
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        let event_idx = self.driver_features & crate::F_EVENT_IDX != 0;
        let mut ready = Vec::new();
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(DeviceError::Queue {
                    queue: i as u16,
                    what: "its rings lie outside the memory the device may reach".into(),
                });
            }
            if self.resume && q.ready() {
                // A previous instance of the device used everything before this index (a
                // request it held when it died was completed by the VMM).
                let used = q
                    .used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                    .map_err(|e| DeviceError::Queue {
                        queue: i as u16,
                        what: format!("cannot read its used index to resume: {e}"),
                    })?;
                q.set_next_avail(used.0);
                q.set_next_used(used.0);
                let avail = q.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire);
                log::info!(
                    "queue {i} resumes at used index {} (the driver's avail index: {})",
                    used.0,
                    avail.map_or_else(|e| format!("unreadable: {e}"), |a| a.0.to_string())
                );
            }
            // The device gets its own copy; ours keeps answering the driver's register reads.
            let copy = Queue::try_from(q.state()).map_err(|e| DeviceError::Queue {
                queue: i as u16,
                what: e.to_string(),
            })?;
            ready.push(copy);
        }
        self.resume = false;
        self.device.ack_features(self.driver_features);
        self.device
            .activate(self.mem.clone(), ready, Arc::new(Irq(self.shared.clone())))
    }

    fn common_read(&self, off: u64) -> u64 {
        let q = self.queues.get(usize::from(self.queue_select));
        let s = self.shared();
        match off {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.offered() & 0xffff_ffff,
                1 => self.offered() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(s.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status_with(&s)),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size())),
            0x1a => s
                .queue_vectors
                .get(usize::from(self.queue_select))
                .map_or(u64::from(NO_VECTOR), |v| u64::from(*v)),
            0x1c => q.map_or(0, |q| u64::from(q.ready())),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.desc_table()),
            0x28 => q.map_or(0, |q| q.avail_ring()),
            0x30 => q.map_or(0, |q| q.used_ring()),
            _ => 0,
        }
    }

    fn common_write(&mut self, off: u64, len: usize, v: u64) {
        let qs = usize::from(self.queue_select);
        // Queue layout may change only before DRIVER_OK (4.1.4.3.2).
        let configurable = self.status & STATUS_DRIVER_OK == 0;
        let (lo, hi) = (Some(v as u32), Some((v >> 32) as u32));
        let v32 = v as u32;
        match off {
            0x00 => self.device_feature_select = v32,
            0x08 => self.driver_feature_select = v32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v32),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                }
                _ => {}
            },
            0x10 => self.shared().config_vector = self.vector_or_none(v as u16),
            0x14 => self.set_status(v as u8),
            0x16 => self.queue_select = v as u16,
            0x1a => {
                let vec = self.vector_or_none(v as u16);
                if let Some(x) = self.shared().queue_vectors.get_mut(qs) {
                    *x = vec;
                }
            }
            _ if !configurable => {}
            0x18 => {
                if let Some(q) = self.queues.get_mut(qs) {
                    // Not a power of two or above the maximum: keep the old size (the queue
                    // then fails validation at enable).
                    let _ = q.try_set_size(v as u16);
                }
            }
            0x1c => {
                if let Some(q) = self.queues.get_mut(qs) {
                    q.set_ready(v & 1 == 1);
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 => {
                let Some(q) = self.queues.get_mut(qs) else {
                    return;
                };
                let high = off % 8 == 4;
                let (l, h) = if len == 8 {
                    (lo, hi)
                } else if high {
                    (None, Some(v32))
                } else {
                    (Some(v32), None)
                };
                match off & !7 {
                    0x20 => q.set_desc_table_address(l, h),
                    0x28 => q.set_avail_ring_address(l, h),
                    _ => q.set_used_ring_address(l, h),
                }
            }
            _ => {}
        }
    }

    /// A vector the table has, or NO_VECTOR (the driver reads back what took effect).
    fn vector_or_none(&self, v: u16) -> u16 {
        if usize::from(v) < self.shared().msix.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn deliver(&self, due: Vec<(u16, Message)>) {
        let s = self.shared();
        for (v, m) in due {
            s.signal.msi_vector(v, m);
        }
    }
}

fn class_of(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00, // network controller
        2 => 0x01_00_00, // SCSI storage (as QEMU's virtio-blk)
        3 => 0x07_80_00, // simple communication, other
        _ => 0xff_00_00,
    }
}

/// `struct virtio_pci_cap` after cap_vndr and cap_next.
fn vendor_cap(cfg_type: u8, offset: u32, length: u32, notify_multiplier: Option<u32>) -> Vec<u8> {
    let len = if notify_multiplier.is_some() {
        20u8
    } else {
        16
    };
    let mut b = vec![len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    if let Some(m) = notify_multiplier {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b
}

fn value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl<D: VirtioDevice> PciFunction for VirtioPci<D> {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.cfg.read(off, data)
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.cfg.bar_address(bar)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.cfg.write(off, data);
        let due = self
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .msix
            .sync(&self.cfg);
        self.deliver(due);
    }

    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let put = |data: &mut [u8], v: u64| {
            let b = v.to_le_bytes();
            for (i, d) in data.iter_mut().enumerate() {
                *d = b.get(i).copied().unwrap_or(0);
            }
        };
        match off {
            COMMON..0x40 => put(data, self.common_read(off)),
            ISR..0x1001 => {
                let mut s = self.shared();
                put(data, u64::from(s.isr));
                // Reading the ISR acknowledges it (4.1.4.5) and lowers INTx.
                s.isr = 0;
                s.signal.intx(false);
            }
            DEVICE_CFG..NOTIFY => self.device.read_config(off - DEVICE_CFG, data),
            MSIX_TABLE..MSIX_PBA => self.shared().msix.read_table(off - MSIX_TABLE, data),
            MSIX_PBA..BAR_SIZE => self.shared().msix.read_pba(off - MSIX_PBA, data),
            _ => {}
        }
    }

    fn resume(&mut self) {
        self.resume = true;
    }

    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let v = value(data);
        match off {
            COMMON..0x40 => self.common_write(off, data.len(), v),
            DEVICE_CFG..NOTIFY => self.device.write_config(off - DEVICE_CFG, data),
            NOTIFY..MSIX_TABLE => {
                let q = ((off - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as u16;
                let s = self.status();
                if s & STATUS_DRIVER_OK != 0 && s & STATUS_NEEDS_RESET == 0 {
                    if let Err(e) = self.device.notify(q) {
                        self.needs_reset(&e);
                    }
                }
            }
            MSIX_TABLE..MSIX_PBA => {
                let due = self.shared().msix.write_table(off - MSIX_TABLE, data);
                self.deliver(due);
            }
            _ => {}
        }
    }
}
