//! virtio over PCI. The transport (`transport`) speaks the virtio-pci modern register layout
//! and knows nothing of what the device does; device models (`console`, ...) implement
//! [`VirtioDevice`] and know nothing of PCI. Guest memory reaches a device only as the
//! `GuestMemoryMmap` it is given: with a restricted pool, that holds the pool alone, so a
//! descriptor pointing anywhere else is an error, not a read of guest RAM.

pub mod blk;
pub mod console;
pub mod defer;
pub mod disk;
pub mod net;
pub mod pmem;
pub mod shadow;
pub mod transport;

use std::sync::Arc;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

pub type Memory = GuestMemoryMmap<()>;

/// A guest read of a device's configuration structure `cfg`; bytes past its end read zero.
pub fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| cfg.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

thread_local! {
    /// Set while this thread will look at the queues it serves again by itself (`polling`).
    static POLLING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, in which the calling thread looks at queues it will look at again by itself,
/// soon, if `on` (a polling backend): a queue it finds empty meanwhile is not re-armed, so the
/// driver's next requests cost it no notification. Such a thread looks at every queue once
/// more with `on` false before it sleeps. Outside `f` every queue is re-armed as always.
pub fn polling<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let was = POLLING.with(|p| p.replace(on));
    let r = f();
    POLLING.with(|p| p.set(was));
    r
}

/// The next available chain of `q`. When there is none, guest notifications are re-armed (with
/// VIRTIO_F_EVENT_IDX: the avail event moves to where the device stands) and the ring is looked
/// at once more, so that a chain the driver added meanwhile, without a kick, is not missed.
/// Inside `polling(true, ..)` a queue with VIRTIO_F_EVENT_IDX is left as it is: its
/// avail event stays behind, and the driver adds requests without notifying.
pub fn next_chain<'a>(
    q: &mut Queue,
    mem: &'a Memory,
) -> Option<virtio_queue::DescriptorChain<&'a Memory>> {
    use virtio_queue::QueueT;
    if let Some(c) = q.pop_descriptor_chain(mem) {
        return Some(c);
    }
    // Without EVENT_IDX, suppressing would mean a flag that a dead backend leaves set (the
    // reaper moves only the avail event): such a queue is re-armed as always.
    if q.event_idx_enabled() && POLLING.with(|p| p.get()) {
        return None;
    }
    match q.enable_notification(mem) {
        Ok(true) => q.pop_descriptor_chain(mem),
        _ => None,
    }
}

/// Feature bits every splitvirt device offers.
pub const F_VERSION_1: u64 = 1 << 32;
/// The device reaches memory through the platform's DMA translation: Linux then sends rings
/// and buffers through the DMA API, and so through the restricted pool.
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
pub const F_EVENT_IDX: u64 = 1 << 29;

/// How a device tells the driver that a queue has work done.
pub trait Interrupt: Send + Sync {
    fn queue(&self, index: u16);
    fn config(&self);
    /// The device cannot go on, whatever the driver does (what serves it went away): the
    /// transport answers DEVICE_NEEDS_RESET until the driver resets it, and tells the driver.
    fn failed(&self) {}
    /// The MSI-X vector the driver gave queue `index`, while MSI-X is on: an interrupt raised
    /// through that vector's own route (an irqfd) needs no call here. None with INTx.
    fn queue_vector(&self, _index: u16) -> Option<u16> {
        None
    }
}

/// Something the device could not do with what the guest gave it: the transport answers with
/// DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("queue {queue}: {what}")]
    Queue { queue: u16, what: String },
}

pub trait VirtioDevice: Send {
    /// Virtio device ID (3 = console, 2 = block, 1 = network).
    fn device_type(&self) -> u32;
    /// Device-specific feature bits (the transport adds VERSION_1 and ACCESS_PLATFORM).
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> &[u16];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The features the driver accepted (FEATURES_OK), before `activate`.
    fn ack_features(&mut self, _features: u64) {}
    /// The driver set DRIVER_OK: the device may now use these queues and memory. An error
    /// sets DEVICE_NEEDS_RESET.
    fn activate(
        &mut self,
        mem: Memory,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), DeviceError>;
    /// The driver notified queue `index`.
    fn notify(&mut self, index: u16) -> Result<(), DeviceError>;
    /// Device reset: drop queues and memory.
    fn reset(&mut self);
}
