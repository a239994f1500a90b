//! The VMM's side: it stands in for every remote PCI function. A vCPU's read becomes a Read
//! message and waits for its Reply (bounded by a timeout); writes are posted. One thread drains
//! the backend's ring: replies go to the thread that waits for them, interrupts and log lines
//! to the VMM. No lock is held while a vCPU waits: the request lock covers only the copy into
//! the ring, so one slow access never blocks another vCPU's (the original system's deadlock).

use crate::shm::{Doorbell, Region, RingError};
use crate::wire::{LogLines, Msg, Op};
use pci::{BarKind, ConfigSpace, PciFunction};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// What the backend asks of the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Intx {
        dev: u8,
        level: bool,
    },
    Msi {
        dev: u8,
        addr: u64,
        data: u32,
    },
    /// The backend is gone or broke the protocol: every access now fails at once.
    Dead(String),
}

/// A device the backend registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registration {
    pub dev: u8,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub revision: u8,
    pub bar0_size: u64,
    pub bar0_64bit: bool,
    pub bar0_prefetchable: bool,
    pub intx_pin: u8,
}

impl Registration {
    pub fn to_msg(&self) -> Msg {
        Msg {
            dev: self.dev,
            w1: u64::from(self.vendor)
                | u64::from(self.device) << 16
                | u64::from(self.class & 0xff_ffff) << 32
                | u64::from(self.revision) << 56,
            w2: self.bar0_size,
            w3: u64::from(self.bar0_64bit)
                | u64::from(self.bar0_prefetchable) << 1
                | u64::from(self.intx_pin) << 8,
            ..Msg::new(Op::Register)
        }
    }

    fn from_msg(m: &Msg) -> Registration {
        Registration {
            dev: m.dev,
            vendor: m.w1 as u16,
            device: (m.w1 >> 16) as u16,
            class: (m.w1 >> 32) as u32 & 0xff_ffff,
            revision: (m.w1 >> 56) as u8,
            bar0_size: m.w2,
            bar0_64bit: m.w3 & 1 != 0,
            bar0_prefetchable: m.w3 & 2 != 0,
            intx_pin: (m.w3 >> 8) as u8,
        }
    }
}

/// Where a vCPU's reply lands. `asleep` says whether it waits on `cv`: most replies are
/// taken by the waiting thread itself, and a notify is a system call.
struct Waiter {
    value: Mutex<Slot>,
    cv: Condvar,
}

#[derive(Default)]
struct Slot {
    reply: Option<u64>,
    asleep: bool,
}

impl Waiter {
    fn answer(&self, v: u64) {
        let mut s = lock(&self.value);
        s.reply = Some(v);
        if s.asleep {
            self.cv.notify_all();
        }
    }
}

#[derive(Default)]
struct Startup {
    registered: Vec<Registration>,
    ready: bool,
}

pub struct Proxy {
    region: Arc<Region>,
    to_backend: Doorbell,
    send: Mutex<()>,
    /// Reads waiting for their reply: one per waiting vCPU, so a short list beats a map.
    pending: Mutex<Vec<(u16, Arc<Waiter>)>>,
    next_id: AtomicU16,
    dead: AtomicBool,
    startup: Mutex<Startup>,
    startup_cv: Condvar,
    events: Mutex<Box<dyn FnMut(Event) + Send>>,
    from_backend: Doorbell,
    /// What a vCPU waiting for its reply sleeps on.
    replies: Doorbell,
    /// Held by whoever drains the backend's ring (with its partial log line).
    consumer: Mutex<LogLines>,
    /// Spin this long for a reply before sleeping on the doorbell.
    poll: Option<Duration>,
    /// How long a read waits for its reply.
    pub timeout: Duration,
    /// Messages so far that broke the protocol (undecodable, or ops only the proxy sends).
    violations: AtomicU32,
}

/// Protocol violations a backend gets away with (each logged, rate-limited) before it is
/// failed: past a few, it is broken or hostile, and its replacement is the way on.
pub const VIOLATION_LIMIT: u32 = 64;
/// Messages one drain takes before it lets its caller look at the clock again, so that a
/// backend that streams messages cannot hold a waiting vCPU past its deadline.
const DRAIN_BUDGET: u32 = 2 * crate::shm::SLOTS;

thread_local! {
    static WAITER: Arc<Waiter> = Arc::new(Waiter { value: Mutex::default(), cv: Condvar::new() });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const ALL_ONES: u64 = u64::MAX;

/// The reply a draining thread waits for itself.
#[derive(Clone, Copy)]
enum Mine {
    /// Not in `pending`: only this thread can see it.
    Unlisted(u16),
    /// In `pending`: taken out of it by whoever finds it first.
    Pending(u16),
}

impl Proxy {
    /// Starts the thread that drains the backend's ring (woken by `from_backend`).
    pub fn start(
        region: Arc<Region>,
        to_backend: Doorbell,
        from_backend: Doorbell,
        replies: Doorbell,
        events: Box<dyn FnMut(Event) + Send>,
        timeout: Duration,
    ) -> Arc<Proxy> {
        Self::start_with(
            region,
            to_backend,
            from_backend,
            replies,
            events,
            timeout,
            None,
        )
    }

    /// `start`, where a thread waiting for a reply spins for up to `poll` before it sleeps on
    /// the doorbell (lower latency for a busy core).
    pub fn start_with(
        region: Arc<Region>,
        to_backend: Doorbell,
        from_backend: Doorbell,
        replies: Doorbell,
        events: Box<dyn FnMut(Event) + Send>,
        timeout: Duration,
        poll: Option<Duration>,
    ) -> Arc<Proxy> {
        let p = Arc::new(Proxy {
            region,
            to_backend,
            send: Mutex::new(()),
            pending: Mutex::new(Vec::new()),
            next_id: AtomicU16::new(1),
            dead: AtomicBool::new(false),
            startup: Mutex::default(),
            startup_cv: Condvar::new(),
            events: Mutex::new(events),
            from_backend,
            replies,
            consumer: Mutex::default(),
            poll,
            timeout,
            violations: AtomicU32::new(0),
        });
        let q = p.clone();
        let _ = std::thread::Builder::new()
            .name("rpc-replies".into())
            .spawn(move || q.drain_loop());
        p
    }

    /// The background consumer: interrupts and log lines while no vCPU waits (a waiting vCPU
    /// drains the ring itself, below).
    fn drain_loop(&self) {
        while !self.dead.load(Ordering::Acquire) {
            self.from_backend.wait(Some(Duration::from_millis(100)));
            if let Ok(mut log) = self.consumer.try_lock() {
                self.drain(&mut log);
            }
        }
    }

    /// Takes every message waiting in the backend's ring.
    fn drain(&self, log: &mut LogLines) {
        self.drain_for(log, None);
    }

    /// `drain`, but stops at the reply to `mine` and returns it: the caller is its waiter
    /// (registered in `pending` or not, as `Mine` says).
    fn drain_for(&self, log: &mut LogLines, mine: Option<Mine>) -> Option<u64> {
        for _ in 0..DRAIN_BUDGET {
            let m = match self.region.replies().pop() {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(RingError::Wire(e)) => {
                    self.violation(&format!("a message that does not decode ({e})"));
                    continue;
                }
                Err(e) => {
                    self.fail(&format!("backend's ring: {e}"));
                    return None;
                }
            };
            match mine {
                Some(Mine::Unlisted(id)) if m.op == Op::Reply && m.id == id => return Some(m.w2),
                Some(Mine::Pending(id))
                    if m.op == Op::Reply && m.id == id && self.take_pending(id).is_some() =>
                {
                    return Some(m.w2)
                }
                _ => {}
            }
            self.dispatch(m, log);
        }
        None
    }

    /// A message that breaks the protocol: ignored and logged; past `VIOLATION_LIMIT` the
    /// backend is failed.
    fn violation(&self, what: &str) {
        let n = self.violations.fetch_add(1, Ordering::Relaxed) + 1;
        ratelog::warn!("backend sent {what}; ignored");
        if n == VIOLATION_LIMIT {
            self.fail(&format!(
                "it broke the protocol {n} times (the last: {what})"
            ));
        }
    }

    fn dispatch(&self, m: Msg, log: &mut LogLines) {
        match m.op {
            Op::Reply => {
                if let Some(w) = self.take_pending(m.id) {
                    w.answer(m.w2);
                }
                // A reply nobody waits for (it timed out, or a forged id) is dropped.
            }
            Op::Intx => (lock(&self.events))(Event::Intx {
                dev: m.dev,
                level: m.w1 == 1,
            }),
            Op::Msi => (lock(&self.events))(Event::Msi {
                dev: m.dev,
                addr: m.w1,
                data: m.w2 as u32,
            }),
            Op::Log => {
                if let Some(line) = log.push(&m) {
                    ratelog::info!("backend: {}", line.trim_end());
                }
            }
            Op::Register => {
                let mut s = lock(&self.startup);
                if !s.ready && s.registered.len() < 32 {
                    s.registered.push(Registration::from_msg(&m));
                }
            }
            Op::Ready => {
                lock(&self.startup).ready = true;
                self.startup_cv.notify_all();
            }
            op => self.violation(&format!("{op:?}, which only the proxy sends")),
        }
    }

    /// The devices the backend registered, once it says Ready (None on timeout or death).
    pub fn registrations(&self, timeout: Duration) -> Option<Vec<Registration>> {
        let s = lock(&self.startup);
        let (s, _) = self
            .startup_cv
            .wait_timeout_while(s, timeout, |s| {
                !s.ready && !self.dead.load(Ordering::Acquire)
            })
            .unwrap_or_else(|e| e.into_inner());
        s.ready.then(|| s.registered.clone())
    }

    /// Marks the backend dead: waiting reads return all ones now, later ones at once.
    pub fn fail(&self, why: &str) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        log::error!("backend lost: {why}");
        for (_, w) in lock(&self.pending).drain(..) {
            w.answer(ALL_ONES);
        }
        self.startup_cv.notify_all();
        (lock(&self.events))(Event::Dead(why.to_owned()));
    }

    fn take_pending(&self, id: u16) -> Option<Arc<Waiter>> {
        let mut p = lock(&self.pending);
        let at = p.iter().position(|(i, _)| *i == id)?;
        Some(p.swap_remove(at).1)
    }

    /// The control region (the backend's journals are there).
    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    fn push(&self, m: &Msg) -> bool {
        self.push_within(m, self.timeout).unwrap_or(false)
    }

    /// `push`, waiting up to `wait` for room: None when the ring stayed full (and `wait` is
    /// shorter than the timeout after which a full ring counts as broken).
    fn push_within(&self, m: &Msg, wait: Duration) -> Option<bool> {
        let r = {
            let _g = lock(&self.send);
            self.region.requests().push(m, wait)
        };
        match r {
            Ok(()) => {
                self.region.requests().wake(&self.to_backend);
                Some(true)
            }
            Err(RingError::Full(_)) if wait < self.timeout => None,
            Err(e) => {
                self.fail(&format!("request ring: {e}"));
                Some(false)
            }
        }
    }

    /// Sends Resume for device `dev`: the writes that follow restore its state.
    pub fn resume(&self, dev: u8) {
        if !self.is_dead() {
            self.push(&Msg {
                dev,
                ..Msg::new(Op::Resume)
            });
        }
    }

    /// Sends Start: the guest runs from now on.
    pub fn start_devices(&self) {
        self.push(&Msg::new(Op::Start));
    }

    /// A read of `len` (1, 2, 4 or 8) bytes; all ones when the backend fails or is too slow.
    pub fn read(&self, dev: u8, space: u8, off: u64, len: u8) -> u64 {
        self.round_trip(Msg {
            dev,
            space,
            len,
            w1: off,
            ..Msg::new(Op::Read)
        })
    }

    /// A round trip with no device work (for measurement): returns `v` back.
    pub fn ping(&self, v: u64) -> u64 {
        self.round_trip(Msg {
            w2: v,
            ..Msg::new(Op::Ping)
        })
    }

    fn round_trip(&self, mut m: Msg) -> u64 {
        if self.is_dead() {
            return ALL_ONES;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        m.id = id;
        // The fast path: this thread consumes the reply ring for the whole round trip, so its
        // reply can reach no other thread and needs no entry in `pending`.
        // A full request ring sends it to the slow path: waiting there for room while holding
        // the reply ring could stall a backend that waits for room in the reply ring.
        // Push only while holding the reply ring (not `zip`, which would push either way).
        let fast = match self.consumer.try_lock() {
            Ok(log) => self
                .push_within(&m, Duration::ZERO)
                .map(|pushed| (log, pushed)),
            Err(_) => None,
        };
        if let Some((mut log, pushed)) = fast {
            if !pushed {
                return ALL_ONES;
            }
            // Polling starts with no clock read: a reply found by then needs none at all.
            let mut started = None;
            let ready = || self.region.replies().ready();
            if self
                .poll
                .is_some_and(|p| spin_until(p.min(self.timeout), &mut started, ready))
            {
                if let Some(v) = self.drain_for(&mut log, Some(Mine::Unlisted(id))) {
                    return v;
                }
            }
            let deadline = started.unwrap_or_else(Instant::now) + self.timeout;
            loop {
                if let Some(v) = self.drain_for(&mut log, Some(Mine::Unlisted(id))) {
                    return v;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return self.timed_out(&m);
                }
                self.await_replies(left);
            }
        }
        // Another thread consumes: it hands this one its reply through `pending`, unless it
        // stops consuming first and this thread takes over.
        let w = WAITER.with(|w| w.clone());
        lock(&w.value).reply = None;
        lock(&self.pending).push((id, w.clone()));
        if !self.push(&m) {
            self.take_pending(id);
            return ALL_ONES;
        }
        // The waiting thread drains the ring itself when no other does (it then hands other
        // threads their replies): no extra thread between the backend's answer and the vCPU.
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(v) = lock(&w.value).reply.take() {
                return v;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.take_pending(id);
                return self.timed_out(&m);
            }
            match self.consumer.try_lock() {
                Ok(mut log) => {
                    if let Some(v) = self.drain_for(&mut log, Some(Mine::Pending(id))) {
                        return v;
                    }
                    if lock(&w.value).reply.is_some() {
                        continue;
                    }
                    self.await_replies(left);
                }
                Err(_) => {
                    let mut v = lock(&w.value);
                    if v.reply.is_none() {
                        v.asleep = true;
                        let (mut v, _) =
                            w.cv.wait_timeout(v, left.min(Duration::from_millis(1)))
                                .unwrap_or_else(|e| e.into_inner());
                        v.asleep = false;
                    }
                }
            }
        }
    }

    /// Waits (at most `left`, and 10 ms at a time) for the reply ring to hold something: spins
    /// first in polling mode. A reply found by spinning skips the sleep, so `sleepers` (a line
    /// the backend reads on every reply) is not written.
    fn await_replies(&self, left: Duration) {
        let ready = || self.region.replies().ready();
        if self
            .poll
            .is_some_and(|p| spin_until(p.min(left), &mut None, ready))
        {
            return;
        }
        self.region
            .replies()
            .sleep(&self.replies, left.min(Duration::from_millis(10)));
    }

    fn timed_out(&self, m: &Msg) -> u64 {
        ratelog::warn!(
            "backend did not answer {:?} of device {} within {:?}",
            m.op,
            m.dev,
            self.timeout
        );
        ALL_ONES
    }

    /// Host input for console device `dev`.
    pub fn input(&self, dev: u8, bytes: &[u8]) {
        if !self.is_dead() {
            for m in Msg::input(dev, bytes) {
                self.push(&m);
            }
        }
    }

    /// A posted write of `len` bytes of `value`.
    pub fn write(&self, dev: u8, space: u8, off: u64, len: u8, value: u64) {
        if !self.is_dead() {
            self.push(&Msg {
                dev,
                space,
                len,
                w1: off,
                w2: value,
                ..Msg::new(Op::Write)
            });
        }
    }
}

/// Spins until `ready` (true) or `limit` passed (false). The clock is read only after every 64
/// looks, the first time included (a clock read costs about as much as a message's trip
/// between two CPUs), and `started` keeps that first reading for the caller.
pub(crate) fn spin_until(
    limit: Duration,
    started: &mut Option<Instant>,
    ready: impl Fn() -> bool,
) -> bool {
    loop {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        let now = Instant::now();
        if now.duration_since(*started.get_or_insert(now)) >= limit {
            return false;
        }
    }
}

/// The proxy of the backend that serves a function now: a backend that died and was started
/// again has a new one.
pub struct Link(RwLock<Arc<Proxy>>);

impl Link {
    pub fn new(proxy: Arc<Proxy>) -> Arc<Link> {
        Arc::new(Link(RwLock::new(proxy)))
    }

    pub fn get(&self) -> Arc<Proxy> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// From now on accesses go to `proxy`. An access under way finishes with the old one.
    pub fn set(&self, proxy: Arc<Proxy>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = proxy;
    }

    fn with<R>(&self, f: impl FnOnce(&Proxy) -> R) -> R {
        f(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A PCI function served by the backend. BAR decoding needs no round trip: the proxy keeps its
/// own copy of the function's BAR and command registers, updated by the same config writes.
pub struct RemoteFunction {
    link: Arc<Link>,
    dev: u8,
    mirror: ConfigSpace,
}

impl RemoteFunction {
    pub fn new(link: Arc<Link>, r: &Registration, bar0_addr: u64) -> RemoteFunction {
        let mut mirror = ConfigSpace::new(r.vendor, r.device, r.class, r.revision);
        let kind = if r.bar0_64bit {
            BarKind::Mem64 {
                prefetchable: r.bar0_prefetchable,
            }
        } else {
            BarKind::Mem32 {
                prefetchable: r.bar0_prefetchable,
            }
        };
        mirror.set_bar(0, r.bar0_size, kind, bar0_addr);
        RemoteFunction {
            link,
            dev: r.dev,
            mirror,
        }
    }

    /// Splits an access into naturally sized pieces the wire carries.
    fn each_piece(data_len: usize, mut f: impl FnMut(usize, u8)) {
        let mut at = 0;
        while at < data_len {
            let n = match data_len - at {
                8.. => 8,
                4..=7 => 4,
                2..=3 => 2,
                _ => 1,
            };
            f(at, n as u8);
            at += n;
        }
    }

    fn read(&self, space: u8, off: u64, data: &mut [u8]) {
        // A dead backend's BARs read as zeros: a driver resetting the device waits for its
        // status to read 0 (Linux's virtio-pci does, for ever), and nothing reads as pending.
        // Its config space reads as all ones, as a vanished PCI function does.
        self.link.with(|proxy| {
            if space != 0 && proxy.is_dead() {
                data.fill(0);
                return;
            }
            Self::each_piece(data.len(), |at, n| {
                let v = proxy.read(self.dev, space, off.wrapping_add(at as u64), n);
                data[at..at + usize::from(n)].copy_from_slice(&v.to_le_bytes()[..usize::from(n)]);
            });
        })
    }

    fn write(&self, space: u8, off: u64, data: &[u8]) {
        self.link.with(|proxy| {
            Self::each_piece(data.len(), |at, n| {
                let mut b = [0u8; 8];
                b[..usize::from(n)].copy_from_slice(&data[at..at + usize::from(n)]);
                proxy.write(
                    self.dev,
                    space,
                    off.wrapping_add(at as u64),
                    n,
                    u64::from_le_bytes(b),
                );
            })
        })
    }
}

impl PciFunction for RemoteFunction {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.read(0, off, data);
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.mirror.write(off, data);
        self.write(0, off, data);
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.mirror.bar_address(bar)
    }
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        self.read(bar as u8 + 1, off, data);
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        self.write(bar as u8 + 1, off, data);
    }
    fn resume(&mut self) {
        self.link.get().resume(self.dev);
    }
}
