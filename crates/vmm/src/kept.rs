//! A device in the backend process as the VMM keeps it, across the backend's deaths and
//! restarts: the function the guest reaches (over a `rpc::Link` to whichever backend serves it
//! now), the shadow of everything the driver wrote to it, and for virtio-blk the reaper that
//! fails its requests while no backend serves it. A new backend's instance of the device gets
//! the shadow's replay, so the driver finds its device as it left it.

use crate::msiroute::MsiRoutes;
use crate::reaper::Reaper;
use pci::PciFunction;
use rpc::{Link, Proxy, RemoteFunction};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio::shadow::{Shadow, Step};
use virtio::transport::{MSIX_TABLE, NOTIFY};

pub struct Kept {
    dev: u8,
    link: Arc<Link>,
    shadow: Mutex<Shadow>,
    reaper: Option<Reaper>,
    /// BAR 0 writes that notify each of the device's queues.
    notify: Vec<(u64, u16)>,
    /// Where the device's MSI-X vectors' eventfds go, kept in step with its table.
    routes: Option<Arc<MsiRoutes>>,
    /// The driver enabled MSI-X (read without the shadow's lock, from the proxy's events).
    msix_on: Arc<MsixFlags>,
}

/// Per device slot, whether its driver enabled MSI-X: a device with MSI-X never asserts INTx,
/// so an INTx from its backend then is dropped (it could share the line with another device).
#[derive(Default)]
pub struct MsixFlags([std::sync::atomic::AtomicBool; 32]);

impl MsixFlags {
    pub fn get(&self, dev: u8) -> bool {
        self.0
            .get(usize::from(dev))
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Acquire))
    }
    fn set(&self, dev: u8, on: bool) {
        if let Some(f) = self.0.get(usize::from(dev)) {
            f.store(on, std::sync::atomic::Ordering::Release);
        }
    }
}

impl Kept {
    pub fn new(
        dev: u8,
        link: Arc<Link>,
        shadow: Shadow,
        reaper: Option<Reaper>,
        notify: Vec<(u64, u16)>,
        routes: Option<Arc<MsiRoutes>>,
        msix_on: Arc<MsixFlags>,
    ) -> Arc<Kept> {
        Arc::new(Kept {
            dev,
            link,
            shadow: Mutex::new(shadow),
            reaper,
            notify,
            routes,
            msix_on,
        })
    }

    fn shadow(&self) -> MutexGuard<'_, Shadow> {
        self.shadow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backend died: fail what it held of this device (virtio-blk).
    pub fn reap(&self) {
        if let Some(r) = &self.reaper {
            r.fail_all(&mut self.shadow(), self.link.get().region());
        }
    }

    /// `proxy`'s backend, just started, takes the device over: the replay of the driver's
    /// writes, then every queue notified (the driver may have added buffers meanwhile), then
    /// the guest's accesses go there. The shadow stays locked throughout, so no guest write
    /// falls between the replay and the switch.
    pub fn reattach(&self, proxy: &Arc<Proxy>) {
        let mut shadow = self.shadow();
        for step in shadow.replay() {
            match step {
                Step::Config { off, value } => proxy.write(self.dev, 0, off, 4, u64::from(value)),
                Step::Bar { off, len, value } => proxy.write(self.dev, 1, off, len, value),
                Step::Resume => proxy.resume(self.dev),
            }
        }
        for &(off, q) in &self.notify {
            proxy.write(self.dev, 1, off, 2, u64::from(q));
        }
        if let Some(r) = &self.reaper {
            r.revive();
        }
        self.link.set(proxy.clone());
    }
}

/// The guest's view of a kept device: accesses go to the backend; writes update the shadow
/// first; a notification while the backend is dead goes to the reaper.
pub struct Watched {
    pub inner: RemoteFunction,
    pub kept: Arc<Kept>,
}

impl PciFunction for Watched {
    /// From the shadow, without a round trip: the backend's own config space is the same
    /// bytes (registrations are checked whole), and cannot be made to say otherwise.
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.kept.shadow().config_read(off, data)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        let mut shadow = self.kept.shadow();
        shadow.config_write(off, data);
        self.kept.msix_on.set(self.kept.dev, shadow.msix_enabled());
        self.inner.config_write(off, data)
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.inner.bar_address(bar)
    }
    /// What the shadow knows as the device does (the driver's own writes, the device's shape)
    /// without a round trip; the rest from the backend.
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        if bar == 0 && self.kept.shadow().known_read(off, data) {
            return;
        }
        self.inner.bar_read(bar, off, data)
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        if bar != 0 {
            return self.inner.bar_write(bar, off, data);
        }
        let mut shadow = self.kept.shadow();
        shadow.bar_write(0, off, data);
        if let Some(routes) = &self.kept.routes {
            // The vectors this write touched follow their entries.
            let vectors = shadow.vectors();
            for v in crate::msiroute::touched_vectors(off, data.len(), vectors) {
                if let Some(m) = shadow.msix_entry(v) {
                    routes.program(self.kept.dev, v, m);
                }
            }
        }
        if let Some(r) = &self.kept.reaper {
            let proxy = self.kept.link.get();
            if proxy.is_dead() && (NOTIFY..MSIX_TABLE).contains(&off) {
                r.fail_all(&mut shadow, proxy.region());
                return;
            }
        }
        self.inner.bar_write(0, off, data)
    }
    fn resume(&mut self) {
        self.inner.resume()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc::{Doorbell, Op, Region, Registration};
    use std::time::Duration;
    use virtio::transport::MSIX_TABLE;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const POOL: u64 = 0x5000_0000;

    /// A kept virtio-blk over a backend that never answers, and the region its requests go to.
    fn kept_blk() -> (Watched, Arc<Region>) {
        let region = Arc::new(Region::create().unwrap());
        let proxy = Proxy::start(
            region.clone(),
            Doorbell::new().unwrap(),
            Doorbell::new().unwrap(),
            Doorbell::new().unwrap(),
            Box::new(|_| {}),
            Duration::from_millis(20),
        );
        let r = Registration {
            dev: 1,
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x01_80_00,
            revision: 1,
            bar0_size: virtio::transport::BAR_SIZE,
            bar0_64bit: true,
            bar0_prefetchable: false,
            intx_pin: 1,
        };
        let link = rpc::Link::new(proxy);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(POOL), 0x10000)]).unwrap();
        let bar = 0x80_0000_0000;
        let shadow = Shadow::new(2, &[256], mem, bar, 1);
        let kept = Kept::new(
            1,
            link.clone(),
            shadow,
            None,
            Vec::new(),
            None,
            Arc::default(),
        );
        let inner = RemoteFunction::new(link, &r, bar);
        (Watched { inner, kept }, region)
    }

    fn read(w: &mut Watched, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        w.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Reads sent to the backend so far.
    fn reads_sent(region: &Region) -> usize {
        std::iter::from_fn(|| region.requests().pop().ok().flatten())
            .filter(|m| m.op == Op::Read)
            .count()
    }

    #[test]
    fn registers_the_driver_set_read_back_without_a_round_trip() {
        let (mut w, region) = kept_blk();
        w.bar_write(0, 0x16, &0u16.to_le_bytes());
        w.bar_write(0, 0x18, &128u16.to_le_bytes());
        w.bar_write(0, 0x20, &(POOL + 0x1000).to_le_bytes());
        w.bar_write(0, 0x1a, &1u16.to_le_bytes());
        w.bar_write(0, MSIX_TABLE + 16, &0x0802_0040u32.to_le_bytes());
        assert_eq!(reads_sent(&region), 0);
        // A backend that never answers would make each of these all ones.
        assert_eq!(read(&mut w, 0x12, 2), 1, "queue count");
        assert_eq!(read(&mut w, 0x18, 2), 128, "queue size");
        assert_eq!(read(&mut w, 0x20, 8), POOL + 0x1000, "descriptor table");
        assert_eq!(read(&mut w, 0x1a, 2), 1, "queue vector");
        assert_eq!(read(&mut w, 0x1e, 2), 0, "notify offset");
        assert_eq!(read(&mut w, MSIX_TABLE + 16, 4), 0x0802_0040, "MSI-X entry");
        assert_eq!(reads_sent(&region), 0);
        // The device's status is its own (it may need a reset): that read goes to the backend.
        let status = read(&mut w, 0x14, 1);
        assert_eq!(status, 0xff, "no answer: all ones");
        assert_eq!(reads_sent(&region), 1);
    }
}
