//! The guest's side of a cross-VM connector, over the `connection` kernel module's UIO device
//! (guest/modules/connection): find it by its name, map the event page (map 0, at offset 0) and
//! the dataport (map 1, at one page), send and wait for events, and pass messages through the
//! dataport.
//!
//! The channel: the dataport's first 64 KiB (or all of it, when smaller) are two rings, the
//! first carrying side A's messages to B, the second B's to A. Each ring is fixed-size slots
//! with two counters, `sent` (written only by its producer) and `taken` (written only by its
//! consumer), on separate cache lines, so that both sides write at once without a lock. A slot
//! holds its sequence number (written last, with release ordering), a length and the bytes. The
//! rest of the dataport is the bulk area, which programs use as they agree (`exchange` streams
//! through it).
//!
//! Waking the peer costs an interrupt in its VM (and a scheduler wake-up of the waiting
//! program), far more than a look at shared memory. So a receiver first polls its ring for a
//! bounded time (`set_spin`, [`DEFAULT_SPIN`]) and only then says in the ring's header that it
//! sleeps (`waiting`, written by the consumer beside `taken`) and waits for an event; a sender
//! rings only a peer that says it sleeps. Both sides fence between their store and their look
//! at the other's, so one of them always sees the other: no message waits for a ring that
//! nobody sent. A peer that lies about sleeping only delays or floods itself.
//!
//! The channel's position lives in the dataport, not in the process: opening a connection
//! resumes where the last user of that side left off, so a restarted program or a rebooted peer
//! VM (the dataport outlives it) carries on. A message taken by a consumer that died before it
//! counted it is delivered again.

pub mod exchange;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const REG_EMIT: usize = 0x0;
const REG_RING: usize = 0x10;
const SLOT: usize = 256;
const HEADER: usize = 128;
/// In a ring's header: `sent` (its producer's), `taken` and `waiting` (its consumer's).
const SENT: usize = 0;
const TAKEN: usize = 64;
const WAITING: usize = 72;
/// How long `recv` polls before it sleeps: the median wake-up through an interrupt in the
/// board is hundreds of microseconds, a look at the ring well under one.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);
/// Bytes of the dataport the two rings take (less when the dataport is smaller).
pub const RINGS: usize = 64 << 10;
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
    #[error("{len} bytes at {off:#x} of the bulk area: it holds {size} (a larger dataport_size?)")]
    Bulk { off: usize, len: usize, size: usize },
    #[error("{0}")]
    Protocol(String),
}

/// Which half of the dataport this side sends in; the two VMs must choose differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
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
    spin: Duration,
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
        let mut c = Connection {
            events,
            event_page,
            dataport,
            side,
            next_send: 1,
            next_recv: 1,
            spin: DEFAULT_SPIN,
        };
        c.resume();
        Ok(c)
    }

    /// Takes up the channel where the dataport says it stands: after this side's last counted
    /// message (or one it published but died before counting), before the first message of the
    /// other side that this side has not counted as taken.
    fn resume(&mut self) {
        let (base, slots) = self.half(self.side);
        let mut next = self
            .dataport
            .u64_at(base + SENT)
            .load(Ordering::Acquire)
            .wrapping_add(1);
        if self
            .dataport
            .u64_at(self.slot(base, slots, next))
            .load(Ordering::Acquire)
            == next
        {
            next = next.wrapping_add(1);
        }
        self.next_send = next;
        let (base, _) = self.half(self.side.other());
        self.next_recv = self
            .dataport
            .u64_at(base + TAKEN)
            .load(Ordering::Acquire)
            .wrapping_add(1);
    }

    /// How long `recv` polls the ring before it sleeps until an event (zero: it always
    /// sleeps at once).
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    pub fn spin(&self) -> Duration {
        self.spin
    }

    fn slot(&self, base: usize, slots: usize, seq: u64) -> usize {
        base + HEADER + (seq % slots as u64) as usize * SLOT
    }

    /// Sends an event to the peer, counted in its event page: one plain 32-bit store to the
    /// event page, which the hypervisor emulates (an exit to the VMM).
    pub fn emit(&self) {
        self.store(REG_EMIT);
    }

    /// Wakes the peer without counting an event: a store the hypervisor catches itself (no
    /// exit). What the channel uses, since its counts live in the dataport.
    pub fn ring(&self) {
        self.store(REG_RING);
    }

    fn store(&self, reg: usize) {
        // SAFETY: in bounds of the event page; volatile keeps it a single store.
        unsafe { self.event_page.ptr.add(reg).cast::<u32>().write_volatile(1) };
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

    /// Where `side`'s ring starts, and its slots.
    fn half(&self, side: Side) -> (usize, usize) {
        let half = self.dataport.len.min(RINGS) / 2;
        let base = if side == Side::A { 0 } else { half };
        (base, (half - HEADER) / SLOT)
    }

    /// Bytes in the bulk area (the dataport after the rings).
    pub fn bulk_len(&self) -> usize {
        self.dataport.len.saturating_sub(RINGS)
    }

    fn bulk_range(&self, off: usize, len: usize) -> Result<usize, Error> {
        let size = self.bulk_len();
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(RINGS + off),
            _ => Err(Error::Bulk { off, len, size }),
        }
    }

    /// Copies `data` into the bulk area at `off`.
    pub fn write_bulk(&self, off: usize, data: &[u8]) -> Result<(), Error> {
        let at = self.bulk_range(off, data.len())?;
        // SAFETY: in bounds (checked above); the peer reads it only when told to.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.dataport.ptr.add(at), data.len())
        };
        std::sync::atomic::fence(Ordering::Release);
        Ok(())
    }

    /// Copies the bulk area at `off` into `out`.
    pub fn read_bulk(&self, off: usize, out: &mut [u8]) -> Result<(), Error> {
        let at = self.bulk_range(off, out.len())?;
        std::sync::atomic::fence(Ordering::Acquire);
        // SAFETY: in bounds (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(self.dataport.ptr.add(at), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Puts a message in this side's ring and rings the peer; waits up to `timeout` for room.
    pub fn send(&mut self, msg: &[u8], timeout: Duration) -> Result<(), Error> {
        if msg.len() > MAX_MESSAGE {
            return Err(Error::TooLong(msg.len()));
        }
        let (base, slots) = self.half(self.side);
        let seq = self.next_send;
        let deadline = Instant::now() + timeout;
        // The peer writes `taken`: a value ahead of `seq` is nonsense, never an underflow.
        while seq.saturating_sub(self.dataport.u64_at(base + TAKEN).load(Ordering::Acquire))
            > slots as u64
        {
            if Instant::now() >= deadline {
                return Err(Error::Full(timeout));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let slot = self.slot(base, slots, seq);
        // SAFETY: the slot is in bounds and ours until `seq` is published.
        unsafe {
            let p = self.dataport.ptr.add(slot + 16);
            std::ptr::copy_nonoverlapping(msg.as_ptr(), p, msg.len());
        }
        self.dataport
            .u64_at(slot + 8)
            .store(msg.len() as u64, Ordering::Relaxed);
        self.dataport.u64_at(slot).store(seq, Ordering::Release);
        self.dataport
            .u64_at(base + SENT)
            .store(seq, Ordering::Release);
        self.next_send = self.next_send.wrapping_add(1);
        // Pairs with the fence in `recv`: either the peer sees this message after saying it
        // sleeps, or we see that it sleeps.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.dataport.u64_at(base + WAITING).load(Ordering::Relaxed) != 0 {
            self.ring();
        }
        Ok(())
    }

    /// The next message from the peer, waiting for events up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, Error> {
        let (base, slots) = self.half(self.side.other());
        let seq = self.next_recv;
        let slot = self.slot(base, slots, seq);
        let start = Instant::now();
        let deadline = start + timeout;
        let spin_until = start + self.spin.min(timeout);
        let ready = |c: &Self| c.dataport.u64_at(slot).load(Ordering::Acquire) == seq;
        let waiting = |c: &Self, v| {
            c.dataport
                .u64_at(base + WAITING)
                .store(v, Ordering::Relaxed)
        };
        while !ready(self) {
            let now = Instant::now();
            if now < spin_until {
                std::hint::spin_loop();
                continue;
            }
            if now >= deadline {
                waiting(self, 0);
                return Ok(None);
            }
            waiting(self, 1);
            std::sync::atomic::fence(Ordering::SeqCst);
            if ready(self) {
                break;
            }
            // Re-check at least every 10 ms: an event may have come before we looked.
            self.wait((deadline - now).min(Duration::from_millis(10)))?;
        }
        waiting(self, 0);
        let len =
            (self.dataport.u64_at(slot + 8).load(Ordering::Relaxed) as usize).min(MAX_MESSAGE);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds; the producer published the slot before its sequence number.
        unsafe {
            std::ptr::copy_nonoverlapping(self.dataport.ptr.add(slot + 16), out.as_mut_ptr(), len)
        };
        self.dataport
            .u64_at(base + TAKEN)
            .store(seq, Ordering::Release);
        self.next_recv = self.next_recv.wrapping_add(1);
        Ok(Some(out))
    }
}

/// A fake UIO device for tests: sysfs entries and a device file.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A fake UIO device: sysfs entries and a device file (both maps in one file, map 1 at one
    /// page), with a pipe standing in for the event count.
    pub fn fake(dir: &Path, name: &str, dataport: usize) -> PathBuf {
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

    pub fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two new descriptors we own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both are ours.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    /// Side `side` of the fake device at `dev`, with its own (never written) event pipe.
    pub fn open(dev: &Path, dataport: usize, side: Side) -> Connection {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .unwrap();
        let (events, never) = pipe();
        std::mem::forget(never); // open, so that a wait times out instead of seeing EOF
        Connection::from_parts(f, events, 0x1000, dataport, side).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use std::io::Write;

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
        // Each message was there before its receiver looked: neither side slept, so neither
        // rang, and no event was counted.
        let bytes = std::fs::read(&dev).unwrap();
        assert_eq!(&bytes[REG_RING..REG_RING + 4], &[0; 4]);
        assert_eq!(&bytes[REG_EMIT..REG_EMIT + 4], &[0; 4]);
    }

    #[test]
    fn a_sleeping_receiver_is_rung_and_a_polling_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake(dir.path(), "chan", 0x4000);
        let f = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev)
                .unwrap()
        };
        let (rb, mut wb) = pipe();
        let mut a = Connection::from_parts(f(), pipe().0, 0x1000, 0x4000, Side::A).unwrap();
        let mut b = Connection::from_parts(f(), rb, 0x1000, 0x4000, Side::B).unwrap();
        b.set_spin(Duration::ZERO);
        let receiver = std::thread::spawn(move || b.recv(Duration::from_secs(60)).unwrap());
        // B says it sleeps in the header of A's ring (the fake device is the dataport at one
        // page: A's ring starts there).
        let waiting_at = page_size() + WAITING;
        let asleep = || std::fs::read(&dev).unwrap()[waiting_at] == 1;
        while !asleep() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let rang = || std::fs::read(&dev).unwrap()[REG_RING] == 1;
        assert!(!rang());
        a.send(b"wake up", Duration::from_secs(1)).unwrap();
        assert!(rang(), "a sleeping receiver is rung");
        wb.write_all(&1u32.to_le_bytes()).unwrap(); // the event the ring raises
        assert_eq!(receiver.join().unwrap(), Some(b"wake up".to_vec()));
        assert!(!asleep(), "awake again");
        // A polling receiver sees the message without a ring.
        let mut dev_bytes = std::fs::read(&dev).unwrap();
        dev_bytes[REG_RING] = 0;
        std::fs::write(&dev, &dev_bytes).unwrap();
        let mut b = Connection::from_parts(f(), pipe().0, 0x1000, 0x4000, Side::B).unwrap();
        b.set_spin(Duration::from_secs(60));
        let receiver = std::thread::spawn(move || b.recv(Duration::from_secs(60)).unwrap());
        a.send(b"no ring", Duration::from_secs(1)).unwrap();
        assert_eq!(receiver.join().unwrap(), Some(b"no ring".to_vec()));
        assert!(!rang(), "nobody slept: nobody rang");
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

    #[test]
    fn a_reopened_side_resumes_where_the_last_left_off() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake(dir.path(), "chan", 0x4000);
        let t = Duration::from_millis(50);
        {
            let (mut a, mut b) = (open(&dev, 0x4000, Side::A), open(&dev, 0x4000, Side::B));
            for m in [b"one", b"two", b"3rd"] {
                a.send(m, t).unwrap();
            }
            assert_eq!(b.recv(t).unwrap().as_deref(), Some(&b"one"[..]));
            assert_eq!(b.recv(t).unwrap().as_deref(), Some(&b"two"[..]));
        }
        // Both processes went away; new ones carry on from the dataport's counters.
        let (mut a, mut b) = (open(&dev, 0x4000, Side::A), open(&dev, 0x4000, Side::B));
        assert_eq!(b.recv(t).unwrap().as_deref(), Some(&b"3rd"[..]));
        assert_eq!(b.recv(t).unwrap(), None);
        a.send(b"four", t).unwrap();
        assert_eq!(b.recv(t).unwrap().as_deref(), Some(&b"four"[..]));
        b.send(b"back", t).unwrap();
        assert_eq!(a.recv(t).unwrap().as_deref(), Some(&b"back"[..]));
    }

    #[test]
    fn a_hostile_peer_counter_is_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake(dir.path(), "chan", 0x4000);
        let mut a = open(&dev, 0x4000, Side::A);
        // The peer claims to have taken far more than was ever sent, and that A sent u64::MAX.
        a.dataport.u64_at(64).store(u64::MAX, Ordering::Relaxed);
        a.dataport.u64_at(0).store(u64::MAX, Ordering::Relaxed);
        a.send(b"still fine", Duration::ZERO).unwrap();
        // Counters at the very end of u64 wrap instead of overflowing.
        a.dataport.u64_at(0).store(u64::MAX - 1, Ordering::Relaxed);
        let (_, slots) = a.half(Side::A);
        let at = a.slot(0, slots, u64::MAX);
        a.dataport.u64_at(at).store(u64::MAX, Ordering::Relaxed);
        let mut a3 = open(&dev, 0x4000, Side::A);
        a3.send(b"wrapped", Duration::ZERO).unwrap();
        let mut b = open(&dev, 0x4000, Side::B);
        b.recv(Duration::ZERO).unwrap();
        let a2 = open(&dev, 0x4000, Side::A);
        drop(a2);
    }

    #[test]
    fn the_bulk_area_follows_the_rings_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let size = RINGS + 0x2000;
        let dev = fake(dir.path(), "bulk", size);
        let (a, b) = (open(&dev, size, Side::A), open(&dev, size, Side::B));
        assert_eq!(a.bulk_len(), 0x2000);
        a.write_bulk(0x1ff0, &[9; 16]).unwrap();
        let mut got = [0u8; 16];
        b.read_bulk(0x1ff0, &mut got).unwrap();
        assert_eq!(got, [9; 16]);
        let e = a.write_bulk(0x1ff1, &[9; 16]).unwrap_err().to_string();
        assert!(e.contains("0x1ff1") && e.contains("8192"), "{e}");
        assert!(b.read_bulk(usize::MAX, &mut got).is_err());
        // The rings are untouched by bulk writes.
        let bytes = std::fs::read(&dev).unwrap();
        assert!(bytes[page_size()..page_size() + RINGS]
            .iter()
            .all(|&x| x == 0));
    }
}
