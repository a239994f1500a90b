//! The host side of a cross-VM connector (`connector` crate): its dataport and its peer.
//! Two VMs whose connectors name the same `peer` socket path are connected: events travel as
//! packets over a `Link` at that path (whichever VM starts first listens), after a greeting that
//! carries the connection's name and dataport size, so that a peer whose name or size differs
//! is refused. The dataport is a file beside the socket (`PATH.dataport`) that both VMs map:
//! the first VM creates it, later ones (and a peer that returns) map the same bytes, so nothing
//! has to be handed over or remapped when a peer comes and goes.

use connector::{Connector, Dataport, Peer};
use hostio::endpoint::{EndpointError, Link, LinkHandle};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The dataport file, mapped shared.
pub struct FileDataport {
    ptr: *mut u8,
    size: u64,
    _file: File,
}

// SAFETY: the mapping is only read and written with bounds-checked volatile copies.
unsafe impl Send for FileDataport {}
// SAFETY: as above; concurrent guest access to shared memory is the guest's business.
unsafe impl Sync for FileDataport {}

impl FileDataport {
    /// A dataport no other VM shares (no peer): a memfd, so that it maps into the guest too.
    pub fn anonymous(size: u64) -> Result<FileDataport, EndpointError> {
        let file =
            crate::memory::memfd(c"splitvirt-dataport", size).map_err(|e| EndpointError {
                what: "connector dataport",
                path: "memfd".into(),
                why: e.0,
            })?;
        Self::map(file, size, Path::new("memfd"))
    }

    pub fn open(path: &Path, size: u64) -> Result<FileDataport, EndpointError> {
        let err = |why: String| EndpointError {
            what: "connector dataport",
            path: path.display().to_string(),
            why,
        };
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        // Made here (O_EXCL, mode 0600) or the peer's, never through a symlink, and only a
        // regular file of this user: anything else at the path is someone else's doing.
        let open = |create: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(create)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
        };
        let file = match open(true) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => open(false),
            r => r,
        }
        .map_err(|e| {
            err(format!(
                "cannot open it: {e} (a symlink there is refused; remove whatever is at the \
                 path when no VM runs)"
            ))
        })?;
        let meta = file.metadata().map_err(|e| err(e.to_string()))?;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if !meta.file_type().is_file() || meta.uid() != me {
            return Err(err(format!(
                "it is not a regular file of this user (uid {}, owner {}): remove it when no \
                 VM runs",
                me,
                meta.uid()
            )));
        }
        let len = meta.len();
        if len == 0 {
            file.set_len(size).map_err(|e| err(e.to_string()))?;
        } else if len != size {
            return Err(err(format!(
                "it holds {len} bytes and this connector's dataport_size is {size}: the peer \
                 uses another size (make them equal, or remove the file when no VM runs)"
            )));
        }
        Self::map(file, size, path)
    }

    fn map(file: File, size: u64, path: &Path) -> Result<FileDataport, EndpointError> {
        let err = |why: String| EndpointError {
            what: "connector dataport",
            path: path.display().to_string(),
            why,
        };
        // SAFETY: a new shared mapping of the whole file.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(err(format!("mmap: {}", std::io::Error::last_os_error())));
        }
        Ok(FileDataport {
            ptr: ptr.cast(),
            size,
            _file: file,
        })
    }

    /// Where the dataport is in this process (for mapping it into the guest).
    pub fn host_address(&self) -> u64 {
        self.ptr as u64
    }

    fn range(&self, off: u64, len: usize) -> Option<usize> {
        let end = off.checked_add(len as u64)?;
        (end <= self.size).then_some(off as usize)
    }
}

impl Drop for FileDataport {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.size as usize) };
    }
}

impl Dataport for FileDataport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, off: u64, data: &mut [u8]) {
        match self.range(off, data.len()) {
            Some(at) => {
                for (i, d) in data.iter_mut().enumerate() {
                    // SAFETY: in bounds (checked above).
                    *d = unsafe { self.ptr.add(at + i).read_volatile() };
                }
            }
            None => data.fill(0),
        }
    }
    fn write(&self, off: u64, data: &[u8]) {
        if let Some(at) = self.range(off, data.len()) {
            for (i, d) in data.iter().enumerate() {
                // SAFETY: in bounds (checked above).
                unsafe { self.ptr.add(at + i).write_volatile(*d) };
            }
        }
    }
}

/// The event page the guest reads without trapping (a memfd of one page, mapped read-only at
/// BAR 0 by the hypervisor).
impl connector::PageMemory for FileDataport {
    fn write(&self, off: u64, data: &[u8]) {
        Dataport::write(self, off, data)
    }
    fn store_u32(&self, off: u64, v: u32) {
        if !off.is_multiple_of(4) || self.range(off, 4).is_none() {
            return;
        }
        // SAFETY: in bounds and aligned (checked above) in our own mapping; the guest only
        // reads this memory (its memslot is read-only).
        let word = unsafe {
            &*self
                .ptr
                .add(off as usize)
                .cast::<std::sync::atomic::AtomicU32>()
        };
        word.store(v, Ordering::Release);
    }
}

/// Events to the peer over the link; without one they are dropped, and the log says so.
struct LinkPeer {
    link: Option<LinkHandle>,
    name: String,
    dropped: AtomicU64,
}

impl Peer for LinkPeer {
    fn emit(&self) {
        if self.link.as_ref().is_some_and(|l| l.send(b"E")) {
            return;
        }
        let n = self.dropped.fetch_add(1, Ordering::Relaxed);
        if n < 3 || n.is_power_of_two() {
            ratelog::warn!(
                "connector {}: no peer; event dropped ({} so far)",
                self.name,
                n + 1
            );
        }
    }
}

/// An INTx line as a virtio-style `Signal` gives it.
struct Line(Arc<dyn virtio::transport::Signal>);

impl platform::IrqLine for Line {
    fn set_level(&self, high: bool) {
        self.0.intx(high);
    }
}

/// Memory of this process that the hypervisor maps into the guest (a dataport, an event page).
#[derive(Clone, Copy, Debug)]
pub struct HostMemory {
    pub addr: u64,
    pub size: u64,
    /// The guest reads it; its writes exit to splitvirt.
    pub read_only: bool,
}

/// Where a connector's memory is in this process: the event page (for BAR 0, read-only) and
/// the dataport (BAR 1).
#[derive(Clone, Copy, Debug)]
pub struct ConnectorMemory {
    pub event_page: HostMemory,
    pub dataport: HostMemory,
}

/// A connector function, the thread that carries its peer's events (None without a peer) and
/// its memory.
pub fn build(
    d: &layout::Device,
    name: &str,
    dataport_size: u64,
    peer: Option<&str>,
    signal: Arc<dyn virtio::transport::Signal>,
) -> Result<(Connector, Option<crate::devices::Starter>, ConnectorMemory), EndpointError> {
    let bars = (
        d.bars.first().map_or(0, |b| b.base),
        d.bars.get(1).map_or(0, |b| b.base),
    );
    let irq = Arc::new(Line(signal));
    let (port, link) = match peer {
        None => (FileDataport::anonymous(dataport_size)?, None),
        Some(path) => {
            let path = Path::new(path);
            let mut dataport_path = path.as_os_str().to_owned();
            dataport_path.push(".dataport");
            let port = FileDataport::open(Path::new(&dataport_path), dataport_size)?;
            let mut hello = b"splitvirt connector 1\0".to_vec();
            hello.extend_from_slice(&dataport_size.to_le_bytes());
            hello.extend_from_slice(name.as_bytes());
            (port, Some(Link::with_hello(path, "connector", hello)?))
        }
    };
    let page = Arc::new(FileDataport::anonymous(connector::EVENT_PAGE)?);
    let host = ConnectorMemory {
        event_page: HostMemory {
            addr: page.host_address(),
            size: connector::EVENT_PAGE,
            read_only: true,
        },
        dataport: HostMemory {
            addr: port.host_address(),
            size: dataport_size,
            read_only: false,
        },
    };
    let p = Arc::new(LinkPeer {
        link: link.as_ref().map(Link::handle),
        name: name.to_owned(),
        dropped: AtomicU64::new(0),
    });
    let c = Connector::new(name, bars, d.intx_pin as u8, irq, p, Arc::new(port));
    c.mirror_page(page);
    let events = c.events();
    let start = link.map(|link| -> crate::devices::Starter {
        Box::new(move || link.serve(Box::new(move |_packet: &[u8]| events.receive())))
    });
    Ok((c, start, host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pci::PciFunction;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct Levels(Mutex<Vec<bool>>);
    impl virtio::transport::Signal for Levels {
        fn msi(&self, _: (u64, u32)) {}
        fn intx(&self, level: bool) {
            self.0.lock().unwrap().push(level);
        }
    }

    fn device() -> layout::Device {
        let toml = "[[device]]\nkind = \"connector\"\nname = \"storage\"\ndataport_size = \"8K\"\n";
        let d = layout::Description::parse(toml, "t.toml").unwrap();
        layout::resolve(&d).unwrap().layout.devices.remove(0)
    }

    fn r32(c: &mut Connector, bar: usize, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.bar_read(bar, off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The dataport file is made 0600 and never opened through a symlink someone put there.
    #[test]
    fn the_dataport_file_is_private_and_no_symlink_is_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock.dataport");
        drop(FileDataport::open(&path, 8192).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The peer's file is taken as it is.
        FileDataport::open(&path, 8192).unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, [0u8; 8192]).unwrap();
        let link = dir.path().join("l.sock.dataport");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = FileDataport::open(&link, 8192).err().unwrap().to_string();
        assert!(e.contains("symlink"), "{e}");
    }

    #[test]
    fn two_vms_share_the_dataport_and_their_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storage.sock");
        let d = device();
        let mut ends = Vec::new();
        for _ in 0..2 {
            let levels = Arc::new(Levels::default());
            let (c, start, _) =
                build(&d, "storage", 0x2000, path.to_str(), levels.clone()).unwrap();
            start.unwrap()();
            ends.push((c, levels));
        }
        let (mut b, lb) = ends.pop().unwrap();
        let (mut a, _la) = ends.pop().unwrap();
        // The dataport is one piece of memory.
        a.bar_write(1, 0x10, b"ping");
        let mut got = [0u8; 4];
        b.bar_read(1, 0x10, &mut got);
        assert_eq!(&got, b"ping");
        // Events: emit until the link is up, then B counts them and its line is up.
        let deadline = Instant::now() + Duration::from_secs(10);
        while r32(&mut b, 0, connector::REG_EVENTS) == 0 {
            assert!(Instant::now() < deadline, "no event crossed");
            a.bar_write(0, connector::REG_EMIT, &[1]);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(lb.0.lock().unwrap().last(), Some(&true));
        b.bar_write(0, connector::REG_EVENTS, &0u32.to_le_bytes());
        assert_eq!(lb.0.lock().unwrap().last(), Some(&false));
    }

    #[test]
    fn bar_1_moves_are_reported_for_mapping() {
        let d = device();
        let (c, _, _) = build(&d, "m", 0x2000, None, Arc::new(Levels::default())).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let mut m = pci::BarWatch::new(
            Box::new(c),
            1,
            Box::new(move |a| s2.lock().unwrap().push(a)),
        );
        m.config_write(0x04, &[2, 0]); // memory decoding on
        m.config_write(0x14, &0x2000_0000u32.to_le_bytes()); // BAR 1 moved
        m.config_write(0x04, &[0, 0]); // off
        let bar1 = d.bars[1].base;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Some(bar1), Some(0x2000_0000), None]
        );
    }

    #[test]
    fn a_peer_with_another_size_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let d = device();
        let sig = || Arc::new(Levels::default()) as Arc<dyn virtio::transport::Signal>;
        build(&d, "storage", 0x2000, path.to_str(), sig()).unwrap();
        let e = build(&d, "storage", 0x4000, path.to_str(), sig())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("8192") && e.contains("16384"), "{e}");
    }

    #[test]
    fn without_a_peer_events_are_dropped_and_the_vm_goes_on() {
        let d = device();
        let (mut c, start, host) =
            build(&d, "alone", 0x1000, None, Arc::new(Levels::default())).unwrap();
        for m in [host.dataport, host.event_page] {
            assert_eq!((m.size, m.addr % 4096), (0x1000, 0), "mappable");
        }
        assert!(host.event_page.read_only && !host.dataport.read_only);
        // The mapped event page holds what the guest reads there: the name at 0x8.
        // SAFETY: the page is mapped for as long as `c` lives.
        let name =
            unsafe { std::slice::from_raw_parts((host.event_page.addr + 8) as *const u8, 6) };
        assert_eq!(name, b"alone\0");
        assert!(start.is_none());
        c.bar_write(0, connector::REG_EMIT, &[1]);
        c.bar_write(1, 0, b"x");
        let mut got = [0u8];
        c.bar_read(1, 0, &mut got);
        assert_eq!(&got, b"x");
    }
}
