//! The backend's MSIs (and vhost-user devices': `Routed`), scoped to its own devices' vectors. Each MSI-X vector of each backend
//! device gets an eventfd of its own, which only that device's backend holds; the hypervisor
//! turns a write to it into the interrupt the guest programmed into that vector (an irqfd on
//! that SPI), and splitvirt, which sees every write the guest makes to the device's MSI-X
//! table (`kept::Watched`), moves it when the guest reprograms the vector. A vector whose
//! message is not an SPI of the GICv2m frame is routed nowhere. So a backend can raise its
//! own devices' interrupts and no one else's, and the vCPUs and splitvirt stay out of the
//! path of a completion.

use layout::layout::{V2m, SPI_BASE_INTID};
use layout::Layout;
use pci::msix::Message;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// What the hypervisor offers for routing: an eventfd bound to, or unbound from, an
/// interrupt line (KVM: KVM_IRQFD with a GSI, which is SPI index here).
pub trait Irqfds: Send + Sync {
    fn attach(&self, fd: RawFd, gsi: u32) -> io::Result<()>;
    fn detach(&self, fd: RawFd, gsi: u32) -> io::Result<()>;
}

/// Writes the hypervisor catches itself: an eventfd signalled by any guest write at an MMIO
/// address, with no exit (KVM: KVM_IOEVENTFD, any length, no data match).
pub trait Ioeventfds: Send + Sync {
    fn attach(&self, fd: RawFd, addr: u64) -> io::Result<()>;
    fn detach(&self, fd: RawFd, addr: u64) -> io::Result<()>;
}

struct Vector {
    fd: OwnedFd,
    /// The GSI it is attached to now.
    gsi: Option<u32>,
    /// Its device is the backend's (its eventfds go there); otherwise a vhost-user device's,
    /// whose backend program gets them as calls.
    backend: bool,
}

pub struct MsiRoutes {
    frame: V2m,
    hv: Box<dyn Irqfds>,
    vectors: Mutex<HashMap<(u8, u16), Vector>>,
}

/// The GSI (SPI index) an MSI `message` raises: an SPI of `frame`, or none.
pub(crate) fn gsi_of(frame: Option<&V2m>, (addr, data): Message) -> Option<u32> {
    crate::devices::msi_to_frame(frame, addr, data).then(|| data - SPI_BASE_INTID)
}

/// Moves the irqfds `fds` (one interrupt's) from GSI `from` to `to` (None: nowhere) and
/// returns where they are bound now: all of them or, if one cannot be bound, none. `what`
/// names the interrupt in the log.
pub(crate) fn reroute(
    hv: &dyn Irqfds,
    fds: &[RawFd],
    from: Option<u32>,
    to: Option<u32>,
    what: std::fmt::Arguments<'_>,
) -> Option<u32> {
    if from == to {
        return from;
    }
    if let Some(old) = from {
        for &fd in fds {
            if let Err(e) = hv.detach(fd, old) {
                ratelog::warn!("cannot unroute {what}: {e}");
            }
        }
    }
    let gsi = to?;
    match fds.iter().try_for_each(|&fd| hv.attach(fd, gsi)) {
        Ok(()) => Some(gsi),
        Err(e) => {
            for &fd in fds {
                let _ = hv.detach(fd, gsi);
            }
            ratelog::warn!("cannot route {what} to SPI {}: {e}", gsi + SPI_BASE_INTID);
            None
        }
    }
}

pub(crate) fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl MsiRoutes {
    /// Eventfds for every vector of `l`'s backend devices and vhost-user devices, none routed
    /// yet (the guest has programmed nothing). None without a GICv2m frame: there are no MSIs
    /// then.
    pub fn new(l: &Layout, hv: Box<dyn Irqfds>) -> io::Result<Option<MsiRoutes>> {
        let Some(frame) = l.v2m.clone() else {
            return Ok(None);
        };
        let mut vectors = HashMap::new();
        for d in &l.devices {
            let backend = d.placement == layout::Placement::Backend;
            if !backend && !matches!(d.kind, layout::DeviceKind::VhostUser { .. }) {
                continue;
            }
            let Some((_, queues)) = crate::devices::virtio_shape(&d.kind) else {
                continue;
            };
            for v in 0..=queues.len() as u16 {
                let fd = new_eventfd()?;
                vectors.insert(
                    (d.slot as u8, v),
                    Vector {
                        fd,
                        gsi: None,
                        backend,
                    },
                );
            }
        }
        Ok(Some(MsiRoutes {
            frame,
            hv,
            vectors: Mutex::new(vectors),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u8, u16), Vector>> {
        self.vectors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The eventfds for a backend's setup: per device of the backend's, one per vector in
    /// order.
    pub fn fds(&self) -> Vec<(u8, Vec<RawFd>)> {
        let v = self.lock();
        let mut keys: Vec<(u8, u16)> = v
            .iter()
            .filter(|(_, vector)| vector.backend)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        let mut out: Vec<(u8, Vec<RawFd>)> = Vec::new();
        for (dev, vector) in keys {
            let fd = v[&(dev, vector)].fd.as_raw_fd();
            match out.last_mut() {
                Some((d, fds)) if *d == dev => fds.push(fd),
                _ => out.push((dev, vec![fd])),
            }
        }
        out
    }

    /// Copies of a vhost-user device's vector eventfds, one per vector in order (none for a
    /// device of the backend's, or if one cannot be copied).
    pub fn vhost_fds(&self, dev: u8) -> Vec<OwnedFd> {
        let v = self.lock();
        (0..=u16::MAX)
            .map_while(|n| v.get(&(dev, n)).filter(|vector| !vector.backend))
            .map(|vector| vector.fd.try_clone())
            .collect::<io::Result<Vec<_>>>()
            .unwrap_or_default()
    }

    /// The guest programmed device `dev`'s vector `vector` with `message`: its eventfd now
    /// raises that SPI, or nothing if the message is not an SPI of the frame.
    pub fn program(&self, dev: u8, vector: u16, message: Message) {
        let want = gsi_of(Some(&self.frame), message);
        let mut v = self.lock();
        let Some(entry) = v.get_mut(&(dev, vector)) else {
            return;
        };
        entry.gsi = reroute(
            &*self.hv,
            &[entry.fd.as_raw_fd()],
            entry.gsi,
            want,
            format_args!("device {dev}'s MSI-X vector {vector}"),
        );
    }

    /// Where device `dev`'s vector `vector` goes now (GSI), for tests and the demo.
    pub fn route(&self, dev: u8, vector: u16) -> Option<u32> {
        self.lock().get(&(dev, vector)).and_then(|v| v.gsi)
    }
}

/// The MSI-X vectors (of `vectors`) a BAR 0 write of `len` bytes at `off` touches in a
/// virtio-pci function's table.
pub(crate) fn touched_vectors(off: u64, len: usize, vectors: u16) -> std::ops::Range<u16> {
    use virtio::transport::MSIX_TABLE;
    let table = MSIX_TABLE..MSIX_TABLE + 16 * u64::from(vectors);
    let last = off.saturating_add(len.max(1) as u64 - 1);
    if off >= table.end || last < table.start {
        return 0..0;
    }
    let first = (off.max(table.start) - table.start) / 16;
    let end = (last.min(table.end - 1) - table.start) / 16;
    first as u16..end as u16 + 1
}

/// An in-process virtio function whose vectors `MsiRoutes` routes (a vhost-user device's,
/// whose backend program raises them through their eventfds): each write to its MSI-X table
/// moves the vectors it touched, as `kept::Watched` does for the backend's devices.
pub struct Routed {
    pub inner: Box<dyn pci::PciFunction>,
    pub routes: std::sync::Arc<MsiRoutes>,
    pub dev: u8,
    pub vectors: u16,
}

impl pci::PciFunction for Routed {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.inner.config_read(off, data)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.inner.config_write(off, data)
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.inner.bar_address(bar)
    }
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        self.inner.bar_read(bar, off, data)
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        self.inner.bar_write(bar, off, data);
        if bar != 0 {
            return;
        }
        for v in touched_vectors(off, data.len(), self.vectors) {
            let at = virtio::transport::MSIX_TABLE + 16 * u64::from(v);
            let (mut addr, mut msg) = ([0u8; 8], [0u8; 4]);
            self.inner.bar_read(0, at, &mut addr);
            self.inner.bar_read(0, at + 8, &mut msg);
            let m = (u64::from_le_bytes(addr), u32::from_le_bytes(msg));
            self.routes.program(self.dev, v, m);
        }
    }
    fn resume(&mut self) {
        self.inner.resume()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Records attach and detach calls as (fd, gsi, attached).
    #[derive(Default, Clone)]
    struct Fake(Arc<Mutex<Vec<(RawFd, u32, bool)>>>);
    impl Irqfds for Fake {
        fn attach(&self, fd: RawFd, gsi: u32) -> io::Result<()> {
            self.0.lock().unwrap().push((fd, gsi, true));
            Ok(())
        }
        fn detach(&self, fd: RawFd, gsi: u32) -> io::Result<()> {
            self.0.lock().unwrap().push((fd, gsi, false));
            Ok(())
        }
    }

    /// A vector's eventfd follows what the guest programs, only into the frame's SPIs; each
    /// device's eventfds are its own.
    #[test]
    fn each_vector_follows_its_table_entry_into_the_frame_only() {
        let desc = layout::Description::parse(
            "[[device]]\nkind = \"virtio-blk\"\nimage = \"a.img\"\n\
             [[device]]\nkind = \"virtio-console\"\n",
            "t.toml",
        )
        .unwrap();
        let l = layout::resolve(&desc).unwrap().layout;
        let fake = Fake::default();
        let r = MsiRoutes::new(&l, Box::new(fake.clone())).unwrap().unwrap();
        let (blk, con) = (l.devices[0].slot as u8, l.devices[1].slot as u8);
        let fds = r.fds();
        let shape: Vec<(u8, usize)> = fds.iter().map(|(d, v)| (*d, v.len())).collect();
        let console_vectors = virtio::console::QUEUES + 1;
        assert_eq!(shape, [(blk, 2), (con, console_vectors)]);
        let v2m = l.v2m.clone().unwrap();
        let doorbell = v2m.region.base + platform::gicv2m::MSI_SETSPI_NS;
        let spi = v2m.spi_base;
        r.program(blk, 1, (doorbell, spi + 3));
        assert_eq!(r.route(blk, 1), Some(spi + 3 - SPI_BASE_INTID));
        assert_eq!(
            r.route(con, 1),
            None,
            "another device's vector is untouched"
        );
        // Reprogrammed: moved. Pointed elsewhere (RAM, a BAR, outside the frame's SPIs):
        // routed nowhere.
        r.program(blk, 1, (doorbell, spi + 4));
        assert_eq!(r.route(blk, 1), Some(spi + 4 - SPI_BASE_INTID));
        for bad in [
            (l.pci.mem32.base, spi),
            (doorbell, spi + v2m.spi_count),
            (doorbell, spi - 1),
        ] {
            r.program(blk, 1, bad);
            assert_eq!(r.route(blk, 1), None, "{bad:?}");
            r.program(blk, 1, (doorbell, spi + 4));
        }
        // No vector past the device's table, and no device that is not in the backend.
        r.program(blk, 2, (doorbell, spi));
        r.program(31, 0, (doorbell, spi));
        assert_eq!((r.route(blk, 2), r.route(31, 0)), (None, None));
        let blk_fd = fds[0].1[1];
        let calls = fake.0.lock().unwrap().clone();
        let g = |n: u32| spi + n - SPI_BASE_INTID;
        assert_eq!(
            calls[..3],
            [
                (blk_fd, g(3), true),
                (blk_fd, g(3), false),
                (blk_fd, g(4), true)
            ]
        );
        assert!(calls.iter().all(|(fd, _, _)| *fd == blk_fd));
    }

    /// A vhost-user device's vectors get eventfds too, handed to its device and never to the
    /// backend process; a write to its MSI-X table moves the vector it touched.
    #[test]
    fn a_vhost_user_devices_vectors_are_its_own_and_follow_its_table() {
        let desc = layout::Description::parse(
            "[[device]]\nkind = \"virtio-blk\"\nimage = \"a.img\"\n\
             [[device]]\nkind = \"vhost-user\"\nsocket = \"v.sock\"\ndevice = \"blk\"\n",
            "t.toml",
        )
        .unwrap();
        let l = layout::resolve(&desc).unwrap().layout;
        let fake = Fake::default();
        let r = Arc::new(MsiRoutes::new(&l, Box::new(fake.clone())).unwrap().unwrap());
        let (blk, vhost) = (l.devices[0].slot as u8, l.devices[1].slot as u8);
        let to_backend: Vec<u8> = r.fds().iter().map(|(d, _)| *d).collect();
        assert_eq!(
            to_backend,
            [blk],
            "the backend gets its own device's vectors only"
        );
        assert_eq!(
            r.vhost_fds(vhost).len(),
            2,
            "its queue's and the configuration's"
        );
        assert!(r.vhost_fds(blk).is_empty());

        let out: Box<dyn std::io::Write + Send> = Box::new(std::io::sink());
        struct NoSignal;
        impl virtio::transport::Signal for NoSignal {
            fn msi(&self, _: Message) {}
            fn intx(&self, _: bool) {}
        }
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(
            vm_memory::GuestAddress(0x5000_0000),
            0x10000,
        )])
        .unwrap();
        let function = virtio::transport::VirtioPci::new(
            virtio::console::Console::new(out),
            mem,
            0,
            1,
            Arc::new(NoSignal),
        );
        let mut f = Routed {
            inner: Box::new(function),
            routes: r.clone(),
            dev: vhost,
            vectors: 2,
        };
        let v2m = l.v2m.clone().unwrap();
        let doorbell = v2m.region.base + platform::gicv2m::MSI_SETSPI_NS;
        use pci::PciFunction;
        use virtio::transport::MSIX_TABLE;
        // Vector 1: address, then data (the route follows once the data names an SPI).
        f.bar_write(0, MSIX_TABLE + 16, &doorbell.to_le_bytes());
        f.bar_write(0, MSIX_TABLE + 24, &(v2m.spi_base + 2).to_le_bytes());
        assert_eq!(r.route(vhost, 1), Some(v2m.spi_base + 2 - SPI_BASE_INTID));
        assert_eq!(r.route(vhost, 0), None, "vector 0 untouched");
        assert_eq!(r.route(blk, 1), None, "the other device's untouched");
    }

    #[test]
    fn a_write_touches_the_vectors_it_overlaps() {
        use virtio::transport::MSIX_TABLE;
        assert_eq!(touched_vectors(MSIX_TABLE, 4, 3), 0..1);
        assert_eq!(touched_vectors(MSIX_TABLE + 12, 8, 3), 0..2);
        assert_eq!(touched_vectors(MSIX_TABLE + 40, 4, 3), 2..3);
        assert_eq!(
            touched_vectors(MSIX_TABLE + 48, 4, 3),
            0..0,
            "past the table"
        );
        assert_eq!(touched_vectors(MSIX_TABLE - 4, 4, 3), 0..0, "before it");
        assert_eq!(touched_vectors(MSIX_TABLE - 4, 8, 3), 0..1);
    }
}
