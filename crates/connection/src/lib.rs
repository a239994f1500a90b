//! The guest's side of a cross-VM connector, over the `connection` kernel module's UIO device
//! (guest/modules/connection): find it by its name, map the event page (map 0, at offset 0) and
//! the dataport (map 1, at one page), send and wait for events, and pass messages through the
//! dataport.
//!
//! The channel: the dataport's first half carries side A's messages to B, the second half B's
//! to A. Each half is a ring of fixed-size slots with two counters, `sent` (written only by its
//! producer) and `taken` (written only by its consumer), on separate cache lines, so that both
//! sides write at once without a lock. A slot holds its sequence number (written last, with
//! release ordering), a length and the bytes.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const REG_EMIT: usize = 0x0;
const SLOT: usize = 256;
const HEADER: usize = 128;
/// Bytes a message may carry (a slot less its sequence number and length).
pub const MAX_MESSAGE: usize = SLOT - 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no connector named `{0}` under {1} (is the connection module loaded?)")]
    NotFound(String, PathBuf),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("message of {0} bytes; at most {MAX_MESSAGE} fit a slot")]
    TooLong(usize),
    #[error("the peer has not taken earlier messages (ring full) within {0:?}")]
    Full(Duration),
    #[error("the dataport ({0} bytes) is too small for a channel")]
    Small(usize),
}

/// Which half of the dataport this side sends in; the two VMs must choose differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

struct Map {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is reached only through volatile and atomic accesses.
unsafe impl Send for Map {}

impl Map {
    fn new(fd: &File, len: usize, offset: usize) -> Result<Map, Error> {
        // SAFETY: a new shared mapping of our descriptor.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io(
                format!("mmap {len} bytes at offset {offset}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Map {
            ptr: ptr.cast(),
            len,
        })
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= self.len);
        // SAFETY: aligned and in bounds of a mapping that lives as long as &self.
        unsafe { AtomicU64::from_ptr(self.ptr.add(off).cast()) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub struct Connection {
    events: File,
    event_page: Map,
    dataport: Map,
    side: Side,
    next_send: u64,
    next_recv: u64,
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

impl Connection {
    /// The connector named `name`, as the `connection` module registers it.
    pub fn open(name: &str, side: Side) -> Result<Connection, Error> {
        Self::open_in(Path::new("/sys/class/uio"), Path::new("/dev"), name, side)
    }

    /// `open` with other roots for sysfs and /dev (tests use a directory of plain files).
    pub fn open_in(sys: &Path, dev: &Path, name: &str, side: Side) -> Result<Connection, Error> {
        let io = |what: String| move |e| Error::Io(what, e);
        let entries = std::fs::read_dir(sys).map_err(io(sys.display().to_string()))?;
        for e in entries.flatten() {
            let dir = e.path();
            let named = std::fs::read_to_string(dir.join("name")).unwrap_or_default();
            if named.trim_end() != name {
                continue;
            }
            let size = |map: &str| -> Result<usize, Error> {
                let p = dir.join("maps").join(map).join("size");
                let text = std::fs::read_to_string(&p).map_err(io(p.display().to_string()))?;
                let t = text.trim();
                usize::from_str_radix(t.trim_start_matches("0x"), 16).map_err(|_| {
                    Error::Io(
                        p.display().to_string(),
                        std::io::ErrorKind::InvalidData.into(),
                    )
                })
            };
            let (event_size, dataport_size) = (size("map0")?, size("map1")?);
            let node = dev.join(e.file_name());
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&node)
                .map_err(io(node.display().to_string()))?;
            let events = f.try_clone().map_err(io(node.display().to_string()))?;
            return Self::from_parts(f, events, event_size, dataport_size, side);
        }
        Err(Error::NotFound(name.to_owned(), sys.to_owned()))
    }

    /// From a mappable device (map 0 at offset 0, map 1 at one page) and the descriptor whose
    /// `read` returns the event count (the same UIO descriptor, or a pipe in tests).
    pub fn from_parts(
        device: File,
        events: File,
        event_size: usize,
        dataport_size: usize,
        side: Side,
    ) -> Result<Connection, Error> {
        if dataport_size < 2 * (HEADER + SLOT) {
            return Err(Error::Small(dataport_size));
        }
        let event_page = Map::new(&device, event_size.max(8), 0)?;
        let dataport = Map::new(&device, dataport_size, page_size())?;
        Ok(Connection {
            events,
            event_page,
            dataport,
            side,
            next_send: 1,
            next_recv: 1,
        })
    }

    /// Sends an event to the peer: one plain 32-bit store to the event page, which the
    /// hypervisor emulates.
    pub fn emit(&self) {
        // SAFETY: in bounds of the event page; volatile keeps it a single store.
        unsafe {
            self.event_page
                .ptr
                .add(REG_EMIT)
                .cast::<u32>()
                .write_volatile(1)
        };
    }

    /// Waits for the next event; Some(total count) or None after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<u32>, Error> {
        let mut p = libc::pollfd {
            fd: self.events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one descriptor we own.
        if unsafe { libc::poll(&mut p, 1, ms) } != 1 {
            return Ok(None);
        }
        let mut b = [0u8; 4];
        self.events
            .read_exact(&mut b)
            .map_err(|e| Error::Io("reading the event count".into(), e))?;
        Ok(Some(u32::from_le_bytes(b)))
    }

    fn half(&self, side: Side) -> (usize, usize) {
        let half = self.dataport.len / 2;
        let base = if side == Side::A { 0 } else { half };
        (base, (half - HEADER) / SLOT)
    }

    /// Puts a message in this side's ring and emits; waits up to `timeout` for room.
    pub fn send(&mut self, msg: &[u8], timeout: Duration) -> Result<(), Error> {
        if msg.len() > MAX_MESSAGE {
            return Err(Error::TooLong(msg.len()));
        }
        let (base, slots) = self.half(self.side);
        let seq = self.next_send;
        let deadline = Instant::now() + timeout;
        while seq - self.dataport.u64_at(base + 64).load(Ordering::Acquire) > slots as u64 {
            if Instant::now() >= deadline {
                return Err(Error::Full(timeout));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let slot = base + HEADER + (seq as usize % slots) * SLOT;
        // SAFETY: the slot is in bounds and ours until `seq` is published.
        unsafe {
            let p = self.dataport.ptr.add(slot + 16);
            std::ptr::copy_nonoverlapping(msg.as_ptr(), p, msg.len());
        }
        self.dataport
            .u64_at(slot + 8)
            .store(msg.len() as u64, Ordering::Relaxed);
        self.dataport.u64_at(slot).store(seq, Ordering::Release);
        self.dataport.u64_at(base).store(seq, Ordering::Release);
        self.next_send += 1;
        self.emit();
        Ok(())
    }

    /// The next message from the peer, waiting for events up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, Error> {
        let other = if self.side == Side::A {
            Side::B
        } else {
            Side::A
        };
        let (base, slots) = self.half(other);
        let seq = self.next_recv;
        let slot = base + HEADER + (seq as usize % slots) * SLOT;
        let deadline = Instant::now() + timeout;
        while self.dataport.u64_at(slot).load(Ordering::Acquire) != seq {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Re-check at least every 10 ms: an event may have come before we looked.
            self.wait(left.min(Duration::from_millis(10)))?;
        }
        let len =
            (self.dataport.u64_at(slot + 8).load(Ordering::Relaxed) as usize).min(MAX_MESSAGE);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds; the producer published the slot before its sequence number.
        unsafe {
            std::ptr::copy_nonoverlapping(self.dataport.ptr.add(slot + 16), out.as_mut_ptr(), len)
        };
        self.dataport
            .u64_at(base + 64)
            .store(seq, Ordering::Release);
        self.next_recv += 1;
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::FromRawFd;

    /// A fake UIO device: sysfs entries and a device file (both maps in one file, map 1 at one
    /// page), with a pipe standing in for the event count.
    fn fake(dir: &Path, name: &str, dataport: usize) -> PathBuf {
        let uio = dir.join("sys/uio0");
        std::fs::create_dir_all(uio.join("maps/map0")).unwrap();
        std::fs::create_dir_all(uio.join("maps/map1")).unwrap();
        std::fs::write(uio.join("name"), format!("{name}\n")).unwrap();
        std::fs::write(uio.join("maps/map0/size"), "0x1000\n").unwrap();
        std::fs::write(uio.join("maps/map1/size"), format!("{dataport:#x}\n")).unwrap();
        std::fs::create_dir_all(dir.join("dev")).unwrap();
        let dev = dir.join("dev/uio0");
        let f = File::create(&dev).unwrap();
        f.set_len((page_size() + dataport) as u64).unwrap();
        dev
    }

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two new descriptors we own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both are ours.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn opens_by_name_and_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        fake(dir.path(), "chan", 0x4000);
        let (sys, dev) = (dir.path().join("sys"), dir.path().join("dev"));
        Connection::open_in(&sys, &dev, "chan", Side::A).unwrap();
        let e = Connection::open_in(&sys, &dev, "other", Side::A)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("other") && e.contains("connection module"),
            "{e}"
        );
    }

    #[test]
    fn messages_cross_both_ways_in_order_with_events() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake(dir.path(), "chan", 0x4000);
        let open = |side, events| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev)
                .unwrap();
            Connection::from_parts(f, events, 0x1000, 0x4000, side).unwrap()
        };
        let (ra, mut wa) = pipe();
        let (rb, mut wb) = pipe();
        let (mut a, mut b) = (open(Side::A, ra), open(Side::B, rb));
        for i in 0..200u32 {
            let msg = format!("ping {i}").into_bytes();
            a.send(&msg, Duration::from_secs(1)).unwrap();
            wb.write_all(&(i + 1).to_le_bytes()).unwrap(); // the event the peer would get
            assert_eq!(b.recv(Duration::from_secs(1)).unwrap(), Some(msg));
            let reply = format!("pong {i}").into_bytes();
            b.send(&reply, Duration::from_secs(1)).unwrap();
            wa.write_all(&(i + 1).to_le_bytes()).unwrap();
            assert_eq!(a.recv(Duration::from_secs(1)).unwrap(), Some(reply));
        }
        // Both sides wrote the event register (the hypervisor's to emulate).
        let bytes = std::fs::read(&dev).unwrap();
        assert_eq!(&bytes[..4], &1u32.to_le_bytes());
    }

    #[test]
    fn a_full_ring_and_a_silent_peer_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake(dir.path(), "chan", 0x1000);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .unwrap();
        let (r, _w) = pipe();
        let mut a = Connection::from_parts(f, r, 0x1000, 0x1000, Side::A).unwrap();
        let slots = (0x800 - HEADER) / SLOT;
        for _ in 0..slots {
            a.send(b"x", Duration::ZERO).unwrap();
        }
        assert!(matches!(
            a.send(b"x", Duration::from_millis(5)),
            Err(Error::Full(_))
        ));
        assert!(matches!(
            a.send(&[0; 300], Duration::ZERO),
            Err(Error::TooLong(300))
        ));
        assert_eq!(a.recv(Duration::from_millis(20)).unwrap(), None);
    }
}
