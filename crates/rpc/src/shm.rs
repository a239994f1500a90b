//! The control region: a memfd both processes map, holding a header and two rings of messages
//! (docs/RPC.md, "Control region"), and the eventfd doorbells that wake the other side.
//!
//! Each ring has one producer and one consumer (a side with several producing threads takes a
//! lock around `push`, held only for the copy). Indices are free-running u32s. A slot carries
//! its own sequence number (index + 1), stored last with release ordering: the consumer finds
//! new messages by looking at the next slot alone, and the producer reads the consumer's
//! `tail` only when its remembered copy says the ring is full. So in the common case a message
//! moves one cache line (its slot) from producer to consumer, and nothing moves back; each
//! index lives on a line of its own, written by one side. The peer can write anything anywhere:
//! a `tail` that runs ahead of `head` or more than a ring behind is corrupt, and the producer
//! that sees it stops using the ring; a slot with a wrong sequence number reads as empty.

use crate::wire::{Msg, WireError};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const MAGIC: u64 = u64::from_le_bytes(*b"svRPC\0\0\x01");
pub const VERSION: u32 = 3;
/// Messages per ring.
pub const SLOTS: u32 = 256;
/// A slot: sequence number (u32) at +0, the message's four words from +8; one cache line.
const SLOT: usize = 64;
/// Ring layout, a cache line each: the producer's `head` and its copy of `tail` at +0, the
/// consumer's `tail` at +64, `sleepers` at +128; slots from +256.
const RING_HDR: usize = 256;
const RING_BYTES: usize = RING_HDR + SLOTS as usize * SLOT;
/// Per-device journals of virtio-blk requests in flight, 64 bytes per PCI slot, in the header
/// page: so that the VMM can fail them if the backend dies.
pub const JOURNALS_AT: usize = 0x800;
const JOURNAL_LIVE: u32 = u32::from_le_bytes(*b"jrnl");
/// Set in a journal's completing word while it holds a completion (head, used index).
const COMPLETING: u32 = 1 << 31;
/// Offsets in the region: header page, then the request ring, then the reply ring.
pub const REQUESTS_AT: usize = 0x1000;
pub const REPLIES_AT: usize = REQUESTS_AT + RING_BYTES.next_multiple_of(0x1000);
pub const SIZE: usize = REPLIES_AT + RING_BYTES.next_multiple_of(0x1000);

/// The seals every memfd that crosses to a backend carries: it can neither shrink (splitvirt
/// would take SIGBUS on a page past the new end, or KVM_RUN fail with EFAULT) nor grow, and no
/// seal can be removed or added after these.
pub const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A memfd of `size` bytes, sealed at that size (close-on-exec).
pub fn sealed_memfd(name: &std::ffi::CStr, size: u64) -> io::Result<OwnedFd> {
    sealed_memfd_with(name, size, 0)
}

/// `sealed_memfd` with more `memfd_create` flags (MFD_HUGETLB, say).
pub fn sealed_memfd_with(
    name: &std::ffi::CStr,
    size: u64,
    flags: libc::c_uint,
) -> io::Result<OwnedFd> {
    // SAFETY: a valid NUL-terminated name; the fd is checked and then owned.
    let fd = unsafe {
        libc::memfd_create(
            name.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | flags,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is new and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memfd size"))?;
    // SAFETY: ftruncate and fcntl on our own fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Checks a memfd the peer handed over: exactly `size` bytes and sealed so, or an error that
/// names `what`. Mapping anything else could fault when the peer shrinks it later.
pub fn check_sealed(fd: &impl AsRawFd, size: u64, what: &str) -> io::Result<()> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {m}"));
    // SAFETY: fstat into a zeroed buffer, fcntl(F_GET_SEALS) on a descriptor we hold.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if u64::try_from(st.st_size).ok() != Some(size) {
        return Err(bad(format!("{} bytes, not {size}", st.st_size)));
    }
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & SEALS != SEALS {
        return Err(bad(format!(
            "not sealed against shrinking and growing (seals {seals:#x})"
        )));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring corrupt: head {head} tail {tail}")]
    Corrupt { head: u32, tail: u32 },
    #[error("ring full for {0:?}")]
    Full(Duration),
    #[error("bad message: {0}")]
    Wire(#[from] WireError),
}

/// A shared mapping of a memfd; unmapped on drop.
pub struct Region {
    ptr: *mut u8,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is only touched through atomics and volatile copies.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// A new zeroed control region with its header written.
    pub fn create() -> io::Result<Region> {
        let fd = sealed_memfd(c"splitvirt-rpc", SIZE as u64)?;
        let r = Region::map(fd)?;
        r.u64_at(0).store(MAGIC, Ordering::Relaxed);
        r.u32_at(8).store(VERSION, Ordering::Relaxed);
        r.u32_at(12).store(SLOTS, Ordering::Relaxed);
        r.u32_at(16).store(REQUESTS_AT as u32, Ordering::Relaxed);
        r.u32_at(20).store(REPLIES_AT as u32, Ordering::Release);
        Ok(r)
    }

    /// Maps a region made by the peer, checking its size and header.
    pub fn open(fd: OwnedFd) -> io::Result<Region> {
        check_sealed(&fd, SIZE as u64, "control region")?;
        Region::map_at(fd, 0)?.checked()
    }

    /// Maps a region that a device VM's port shows at `offset` of `fd` (its size and seals
    /// were checked by the device VM's VMM, which maps it there), checking its header.
    pub fn open_device(fd: OwnedFd, offset: u64) -> io::Result<Region> {
        Region::map_at(fd, offset)?.checked()
    }

    fn checked(self) -> io::Result<Region> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let r = self;
        let (magic, version) = (
            r.u64_at(0).load(Ordering::Acquire),
            r.u32_at(8).load(Ordering::Acquire),
        );
        if magic != MAGIC || version != VERSION || r.u32_at(12).load(Ordering::Relaxed) != SLOTS {
            return Err(bad(format!(
                "control region header: magic {magic:#x} version {version} (want {MAGIC:#x} {VERSION})"
            )));
        }
        Ok(r)
    }

    fn map(fd: OwnedFd) -> io::Result<Region> {
        Region::map_at(fd, 0)
    }

    fn map_at(fd: OwnedFd, offset: u64) -> io::Result<Region> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        // SAFETY: a fresh shared mapping of SIZE bytes of our fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            ptr: ptr.cast(),
            len: SIZE,
            fd,
        })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    #[inline]
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(off.is_multiple_of(4) && off + 4 <= self.len);
        // SAFETY: in bounds, aligned, and the mapping lives as long as &self.
        unsafe { AtomicU32::from_ptr(self.ptr.add(off).cast()) }
    }

    #[inline]
    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= self.len);
        // SAFETY: in bounds, aligned, and the mapping lives as long as &self.
        unsafe { AtomicU64::from_ptr(self.ptr.add(off).cast()) }
    }

    /// Writes raw bytes into the region, as a hostile peer could (tests and fuzzing).
    pub fn write_raw(&self, offset: usize, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let at = offset.saturating_add(i);
            if at >= self.len {
                return;
            }
            // SAFETY: in bounds of our mapping; the peer's view of racing bytes is its problem.
            unsafe { self.ptr.add(at).write_volatile(b) };
        }
    }

    fn journal_at(dev: u8) -> usize {
        JOURNALS_AT + usize::from(dev % 32) * 64
    }

    /// Journal (docs/RPC.md, "Journal"): a virtio-blk queue was (re)started.
    pub fn journal_reset(&self, dev: u8, next_avail: u16) {
        let at = Self::journal_at(dev);
        for w in 0..9 {
            self.u32_at(at + 8 + 4 * w).store(0, Ordering::Release);
        }
        self.u32_at(at + 4)
            .store(u32::from(next_avail), Ordering::Release);
        self.u32_at(at).store(JOURNAL_LIVE, Ordering::Release);
    }

    /// Journal: the backend took the chain at `head`; its next avail index is `next_avail`.
    pub fn journal_popped(&self, dev: u8, head: u16, next_avail: u16) {
        let at = Self::journal_at(dev);
        let h = usize::from(head % 256);
        self.u32_at(at + 8 + 4 * (h / 32))
            .fetch_or(1 << (h % 32), Ordering::AcqRel);
        self.u32_at(at + 4)
            .store(u32::from(next_avail), Ordering::Release);
    }

    /// Journal: the backend is about to put `head` on the used ring at index `used` (its
    /// next used index): `head` leaves the heads in flight, and is remembered as the one
    /// completing, so that a backend that dies before the used index moves past `used` has
    /// it failed still (completions are serialized, so there is at most one).
    pub fn journal_completed(&self, dev: u8, head: u16, used: u16) {
        let at = Self::journal_at(dev);
        self.u32_at(at + 40).store(
            COMPLETING | u32::from(head) << 16 | u32::from(used),
            Ordering::Release,
        );
        let h = usize::from(head % 256);
        self.u32_at(at + 8 + 4 * (h / 32))
            .fetch_and(!(1 << (h % 32)), Ordering::AcqRel);
    }

    /// Journal: the last completion the backend began, as (head, the used index it goes at).
    pub fn journal_completing(&self, dev: u8) -> Option<(u16, u16)> {
        let at = Self::journal_at(dev);
        if self.u32_at(at).load(Ordering::Acquire) != JOURNAL_LIVE {
            return None;
        }
        let c = self.u32_at(at + 40).load(Ordering::Acquire);
        (c & COMPLETING != 0).then_some((((c >> 16) & 0x7fff) as u16, c as u16))
    }

    /// Journal: (next avail index, heads in flight), if the backend keeps one for `dev`.
    pub fn journal(&self, dev: u8) -> Option<(u16, Vec<u16>)> {
        let at = Self::journal_at(dev);
        if self.u32_at(at).load(Ordering::Acquire) != JOURNAL_LIVE {
            return None;
        }
        let next = self.u32_at(at + 4).load(Ordering::Acquire) as u16;
        let mut heads = Vec::new();
        for w in 0..8u16 {
            let bits = self
                .u32_at(at + 8 + 4 * usize::from(w))
                .load(Ordering::Acquire);
            for b in 0..32u16 {
                if bits & (1 << b) != 0 {
                    heads.push(w * 32 + b);
                }
            }
        }
        Some((next, heads))
    }

    /// The ring the proxy produces into.
    pub fn requests(&self) -> Ring<'_> {
        Ring {
            r: self,
            at: REQUESTS_AT,
        }
    }

    /// The ring the backend produces into.
    pub fn replies(&self) -> Ring<'_> {
        Ring {
            r: self,
            at: REPLIES_AT,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub struct Ring<'a> {
    r: &'a Region,
    at: usize,
}

impl Ring<'_> {
    #[inline]
    fn head(&self) -> &AtomicU32 {
        self.r.u32_at(self.at)
    }
    /// The producer's last look at `tail` (in shared memory only so that the ring needs no
    /// per-process state; the consumer never reads it).
    #[inline]
    fn seen_tail(&self) -> &AtomicU32 {
        self.r.u32_at(self.at + 4)
    }
    #[inline]
    fn tail(&self) -> &AtomicU32 {
        self.r.u32_at(self.at + 64)
    }
    /// Consumers asleep on the ring's doorbell: the producer rings only when there are any.
    #[inline]
    fn sleepers(&self) -> &AtomicU32 {
        self.r.u32_at(self.at + 128)
    }

    /// Waits on `bell` for this ring (up to `timeout`) unless it already has messages. A
    /// producer that publishes meanwhile sees the sleeper and rings.
    pub fn sleep(&self, bell: &Doorbell, timeout: Duration) {
        self.sleep_any(bell, &[], timeout);
    }

    /// `sleep`, also woken by any of `others`: bit i of the result says `others[i]` rang (and
    /// is cleared).
    pub fn sleep_any(&self, bell: &Doorbell, others: &[&Doorbell], timeout: Duration) -> u64 {
        self.sleepers().fetch_add(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let rang = if self.ready() {
            Doorbell::wait_any(others, Some(Duration::ZERO))
        } else {
            let all = std::iter::once(bell).chain(others.iter().copied());
            Doorbell::poll_all(all, Some(timeout)) >> 1
        };
        self.sleepers().fetch_sub(1, Ordering::SeqCst);
        rang
    }

    /// After `push`: wakes a sleeping consumer through `bell`.
    pub fn wake(&self, bell: &dyn Bell) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleepers().load(Ordering::SeqCst) != 0 {
            bell.ring();
        }
    }

    /// Consumer side: whether the next message is there.
    #[inline]
    pub fn ready(&self) -> bool {
        let tail = self.tail().load(Ordering::Relaxed);
        self.r.u32_at(self.slot(tail)).load(Ordering::Acquire) == tail.wrapping_add(1)
    }

    #[inline]
    fn slot(&self, i: u32) -> usize {
        self.at + RING_HDR + (i % SLOTS) as usize * SLOT
    }

    /// Producer side. Waits up to `wait` for room (the consumer may be slow), then gives up.
    #[inline]
    pub fn push(&self, m: &Msg, wait: Duration) -> Result<(), RingError> {
        let head = self.head().load(Ordering::Relaxed);
        if head.wrapping_sub(self.seen_tail().load(Ordering::Relaxed)) >= SLOTS {
            self.wait_for_room(head, wait)?;
        }
        let s = self.slot(head);
        for (k, w) in m.encode().into_iter().enumerate() {
            self.r.u64_at(s + 8 + 8 * k).store(w, Ordering::Relaxed);
        }
        self.r
            .u32_at(s)
            .store(head.wrapping_add(1), Ordering::Release);
        self.head().store(head.wrapping_add(1), Ordering::Relaxed);
        Ok(())
    }

    /// The remembered `tail` says the ring is full: look at the real one, for up to `wait`.
    fn wait_for_room(&self, head: u32, wait: Duration) -> Result<(), RingError> {
        let deadline = Instant::now() + wait;
        loop {
            let tail = self.tail().load(Ordering::Acquire);
            self.seen_tail().store(tail, Ordering::Relaxed);
            let used = head.wrapping_sub(tail);
            if used > SLOTS {
                return Err(RingError::Corrupt { head, tail });
            }
            if used < SLOTS {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(RingError::Full(wait));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Consumer side: the next message, if any. A message that does not decode is consumed
    /// and returned as the error (the caller logs it and goes on).
    // Inlined, as are `decode` and `push`, so that a message stays in registers: returned
    // through `Result<Option<Msg>>` it was copied via the stack in overlapping pieces that
    // defeat store forwarding (160 ns for a round trip in one thread, 95 ns inlined).
    #[inline]
    pub fn pop(&self) -> Result<Option<Msg>, RingError> {
        let tail = self.tail().load(Ordering::Relaxed);
        let s = self.slot(tail);
        if self.r.u32_at(s).load(Ordering::Acquire) != tail.wrapping_add(1) {
            return Ok(None);
        }
        let mut w = [0u64; 4];
        for (k, x) in w.iter_mut().enumerate() {
            *x = self.r.u64_at(s + 8 + 8 * k).load(Ordering::Relaxed);
        }
        self.tail().store(tail.wrapping_add(1), Ordering::Release);
        Ok(Some(Msg::decode(w)?))
    }
}

/// What wakes the other side of a ring: an eventfd's write ([`Doorbell`]), or a store to a
/// device's doorbell register (the backend inside a device VM).
pub trait Bell: Send + Sync {
    fn ring(&self);
}

impl<B: Bell + ?Sized> Bell for Box<B> {
    fn ring(&self) {
        (**self).ring()
    }
}

/// An eventfd: `ring` wakes whoever waits on the other side. Or, to wait on only, a UIO
/// device, whose reads return its interrupt count.
pub struct Doorbell {
    fd: OwnedFd,
    /// What a read takes: 8 bytes from an eventfd, 4 from a UIO device.
    read_len: usize,
    /// What the last read gave: an eventfd's count of rings, a UIO device's running total.
    last: std::sync::atomic::AtomicU64,
}

impl Bell for Doorbell {
    fn ring(&self) {
        Doorbell::ring(self)
    }
}

impl Doorbell {
    pub fn new() -> io::Result<Doorbell> {
        // SAFETY: eventfd returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is new and ours.
        Ok(Doorbell::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn from_fd(fd: OwnedFd) -> Doorbell {
        Doorbell {
            fd,
            read_len: 8,
            last: Default::default(),
        }
    }

    /// A UIO device's interrupts, to wait on (never to ring). It is made non-blocking: several
    /// doorbells may share its open file, and once one has read an interrupt the others must
    /// not wait for the next.
    pub fn from_uio(fd: OwnedFd) -> io::Result<Doorbell> {
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0
            || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(Doorbell {
            fd,
            read_len: 4,
            last: Default::default(),
        })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// What its last read gave (0 before any): an eventfd's count of rings since the read
    /// before, a UIO device's total of interrupts.
    pub fn last_read(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    /// A UIO device's interrupts, not an eventfd.
    pub fn is_uio(&self) -> bool {
        self.read_len == 4
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    pub fn ring(&self) {
        let one = 1u64;
        // SAFETY: an 8-byte write from a local to our eventfd.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Waits up to `timeout` (None: for ever) for a ring, and clears it. False on timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        Self::wait_any(&[self], timeout) != 0
    }

    /// Waits up to `timeout` for any of `bells` (at most 64), and clears those that rang: bit i
    /// of the result says `bells[i]` rang.
    pub fn wait_any(bells: &[&Doorbell], timeout: Option<Duration>) -> u64 {
        Self::poll_all(bells.iter().copied(), timeout)
    }

    /// `wait_any` over an iterator, with the poll set on the stack: a sleeping vCPU and the
    /// backend's loop call this for every sleep.
    fn poll_all<'a>(bells: impl Iterator<Item = &'a Doorbell>, timeout: Option<Duration>) -> u64 {
        let unused = libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        };
        let mut p = [unused; 64];
        let mut which: [Option<&Doorbell>; 64] = [None; 64];
        let mut n = 0;
        for b in bells.take(64) {
            which[n] = Some(b);
            p[n] = libc::pollfd {
                fd: b.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            n += 1;
        }
        if n == 0 {
            return 0;
        }
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: poll on descriptors we own, the first `n` entries of `p`.
        if unsafe { libc::poll(p.as_mut_ptr(), n as libc::nfds_t, ms) } <= 0 {
            return 0;
        }
        let mut rang = 0;
        let mut uio_total = None;
        for (i, (q, b)) in p[..n].iter().zip(which.iter().flatten()).enumerate() {
            if q.revents & libc::POLLIN != 0 {
                let mut v = 0u64;
                // SAFETY: a read of at most 8 bytes into a local from a descriptor we own.
                let got = unsafe { libc::read(q.fd, (&mut v as *mut u64).cast(), b.read_len) };
                if got > 0 {
                    b.last.store(v, Ordering::Relaxed);
                    if b.is_uio() {
                        uio_total = Some(v);
                    }
                } else if let (true, Some(t)) = (b.is_uio(), uio_total) {
                    // UIO doorbells share one file: the first read took the total, the
                    // others find nothing and keep it too.
                    b.last.store(t, Ordering::Relaxed);
                }
                rang |= 1 << i;
            }
        }
        rang
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Op;

    /// Doorbells on a UIO device's open file (here a pipe, whose reads are what a UIO device
    /// gives: 4-byte counts): one interrupt wakes every doorbell sharing the file, only one of
    /// them takes it, and none blocks on a read the other emptied.
    #[test]
    fn doorbells_sharing_a_uio_file_all_wake_on_one_interrupt() {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two new descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: new descriptors, ours.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let a = Doorbell::from_uio(rx.try_clone().unwrap()).unwrap();
        let b = Doorbell::from_uio(rx).unwrap();
        let interrupt = |count: u32| {
            // SAFETY: a 4-byte write from a local to our pipe.
            let n = unsafe { libc::write(tx.as_raw_fd(), (&count as *const u32).cast(), 4) };
            assert_eq!(n, 4);
        };
        assert_eq!(Doorbell::wait_any(&[&a, &b], Some(Duration::ZERO)), 0);
        interrupt(1);
        assert_eq!(
            Doorbell::wait_any(&[&a, &b], Some(Duration::from_secs(5))),
            0b11
        );
        // Taken: nothing left for either.
        assert_eq!(Doorbell::wait_any(&[&a, &b], Some(Duration::ZERO)), 0);
        // Two counts, two wakes of whichever waits, each taking 4 bytes.
        interrupt(2);
        interrupt(3);
        assert!(b.wait(Some(Duration::from_secs(5))));
        assert!(a.wait(Some(Duration::from_secs(5))));
        assert!(!a.wait(Some(Duration::ZERO)));
    }

    #[test]
    fn messages_cross_in_order_and_a_full_ring_says_so() {
        let r = Region::create().unwrap();
        let q = r.requests();
        for i in 0..SLOTS {
            q.push(
                &Msg {
                    w1: u64::from(i),
                    ..Msg::new(Op::Ping)
                },
                Duration::ZERO,
            )
            .unwrap();
        }
        assert!(matches!(
            q.push(&Msg::new(Op::Ping), Duration::from_millis(1)),
            Err(RingError::Full(_))
        ));
        for i in 0..SLOTS {
            assert_eq!(q.pop().unwrap().unwrap().w1, u64::from(i));
        }
        assert!(q.pop().unwrap().is_none());
    }

    #[test]
    fn a_peer_that_corrupts_the_ring_is_caught_or_ignored() {
        let r = Region::create().unwrap();
        let q = r.replies();
        // A consumer whose tail runs ahead of what was produced: found when the producer
        // next needs room.
        q.tail().store(SLOTS + 5, Ordering::Release);
        let mut got = Ok(());
        for _ in 0..=SLOTS {
            got = q.push(&Msg::new(Op::Ping), Duration::ZERO);
            if got.is_err() {
                break;
            }
        }
        assert!(matches!(got, Err(RingError::Corrupt { .. })), "{got:?}");
        // A slot whose sequence number is not the next one reads as empty, whatever it holds.
        let r = Region::create().unwrap();
        r.write_raw(REPLIES_AT + RING_HDR, &7u32.to_le_bytes());
        assert!(r.replies().pop().unwrap().is_none() && !r.replies().ready());
    }

    #[test]
    fn indices_wrap_around_u32() {
        let r = Region::create().unwrap();
        let q = r.requests();
        // Far enough before the wrap that every slot has been written once when it comes (a
        // zeroed slot would read as the message after u32::MAX, whose sequence number is 0).
        let start = u32::MAX - 300;
        for w in [q.head(), q.seen_tail(), q.tail()] {
            w.store(start, Ordering::Relaxed);
        }
        for i in 0..600u64 {
            q.push(
                &Msg {
                    w1: i,
                    ..Msg::new(Op::Ping)
                },
                Duration::ZERO,
            )
            .unwrap();
            assert!(q.ready());
            assert_eq!(q.pop().unwrap().unwrap().w1, i);
            assert!(!q.ready());
        }
    }

    #[test]
    fn a_second_mapping_sees_the_same_ring_and_checks_the_header() {
        let a = Region::create().unwrap();
        let fd = a.fd().try_clone().unwrap();
        let b = Region::open(fd).unwrap();
        a.requests()
            .push(
                &Msg {
                    w2: 42,
                    ..Msg::new(Op::Ping)
                },
                Duration::ZERO,
            )
            .unwrap();
        assert_eq!(b.requests().pop().unwrap().unwrap().w2, 42);
        a.u64_at(0).store(0, Ordering::Relaxed);
        let e = Region::open(a.fd().try_clone().unwrap()).err().unwrap();
        assert!(e.to_string().contains("magic"), "{e}");
    }

    #[test]
    fn the_region_is_sealed_and_an_unsealed_one_is_refused() {
        let a = Region::create().unwrap();
        // Neither side can change its size: a shrink would fault the other's mapping.
        // SAFETY: ftruncate on a descriptor the test holds.
        for len in [0, 2 * SIZE as libc::off_t] {
            assert_ne!(unsafe { libc::ftruncate(a.fd().as_raw_fd(), len) }, 0);
            assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
        }
        // A region that is not sealed is not mapped, whatever its contents.
        // SAFETY: a test memfd, owned at once.
        let plain = unsafe {
            OwnedFd::from_raw_fd(libc::memfd_create(c"plain".as_ptr(), libc::MFD_CLOEXEC))
        };
        assert_eq!(
            unsafe { libc::ftruncate(plain.as_raw_fd(), SIZE as libc::off_t) },
            0
        );
        let e = Region::open(plain).err().unwrap();
        assert!(e.to_string().contains("control region: not sealed"), "{e}");
    }

    #[test]
    fn the_journal_tracks_heads_in_flight() {
        let r = Region::create().unwrap();
        assert_eq!(r.journal(1), None);
        r.journal_reset(1, 5);
        r.journal_popped(1, 3, 6);
        r.journal_popped(1, 200, 7);
        assert_eq!(r.journal_completing(1), None);
        r.journal_completed(1, 3, 40);
        assert_eq!(r.journal(1), Some((7, vec![200])));
        assert_eq!(r.journal_completing(1), Some((3, 40)));
        assert_eq!(r.journal(2), None);
        r.journal_reset(1, 9);
        assert_eq!(r.journal_completing(1), None);
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        // docs/RPC.md, "Control region".
        assert_eq!((REQUESTS_AT, REPLIES_AT, SIZE), (0x1000, 0x6000, 0xb000));
    }

    #[test]
    fn a_sleeper_says_which_of_the_other_bells_rang() {
        let r = Region::create().unwrap();
        let (own, a, b) = (
            Doorbell::new().unwrap(),
            Doorbell::new().unwrap(),
            Doorbell::new().unwrap(),
        );
        b.ring();
        assert_eq!(
            r.requests()
                .sleep_any(&own, &[&a, &b], Duration::from_secs(1)),
            0b10
        );
        assert_eq!(
            r.requests()
                .sleep_any(&own, &[&a, &b], Duration::from_millis(1)),
            0
        );
        // A ring with a message still reports (and clears) the others without waiting.
        r.requests()
            .push(&Msg::new(Op::Ping), Duration::ZERO)
            .unwrap();
        a.ring();
        assert_eq!(
            r.requests()
                .sleep_any(&own, &[&a, &b], Duration::from_secs(5)),
            0b01
        );
        assert!(!a.wait(Some(Duration::ZERO)));
    }

    #[test]
    fn doorbells_wake_and_time_out() {
        let d = Doorbell::new().unwrap();
        assert!(!d.wait(Some(Duration::from_millis(1))));
        d.ring();
        assert!(d.wait(Some(Duration::ZERO)));
        assert!(!d.wait(Some(Duration::ZERO)), "cleared");
    }
}
