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
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
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
