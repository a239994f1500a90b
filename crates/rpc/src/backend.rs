//! The backend's side: it serves the requests of the proxy to its PCI functions, in ring order
//! and on one thread (so that a read sees every write posted before it), and sends interrupts
//! and log lines from any thread.

use crate::proxy::Registration;
use crate::shm::{Bell, Doorbell, Region, RingError};
use crate::wire::{Msg, Op};
use pci::PciFunction;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The backend's way out: the reply ring and the proxy's doorbell, shared by the serving
/// thread and the devices' interrupt paths.
pub struct Outbox {
    region: Arc<Region>,
    to_proxy: Box<dyn Bell>,
    to_proxy_replies: Box<dyn Bell>,
    lock: Mutex<()>,
    /// How long a send waits for room before the ring counts as broken.
    wait: Duration,
}

impl Outbox {
    pub fn new(
        region: Arc<Region>,
        to_proxy: impl Bell + 'static,
        to_proxy_replies: impl Bell + 'static,
    ) -> Arc<Outbox> {
        Self::with_wait(region, to_proxy, to_proxy_replies, Duration::from_secs(1))
    }

    pub fn with_wait(
        region: Arc<Region>,
        to_proxy: impl Bell + 'static,
        to_proxy_replies: impl Bell + 'static,
        wait: Duration,
    ) -> Arc<Outbox> {
        Arc::new(Outbox {
            region,
            to_proxy: Box::new(to_proxy),
            to_proxy_replies: Box::new(to_proxy_replies),
            lock: Mutex::new(()),
            wait,
        })
    }

    pub fn send(&self, m: &Msg) -> Result<(), RingError> {
        {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.region.replies().push(m, self.wait)?;
        }
        // A reply wakes the vCPU that waits for it, if it sleeps; anything else wakes the
        // proxy's event thread.
        if m.op == Op::Reply {
            self.region.replies().wake(&*self.to_proxy_replies);
        } else {
            self.to_proxy.ring();
        }
        Ok(())
    }

    pub fn intx(&self, dev: u8, level: bool) {
        let _ = self.send(&Msg {
            dev,
            w1: u64::from(level),
            ..Msg::new(Op::Intx)
        });
    }

    pub fn msi(&self, dev: u8, addr: u64, data: u32) {
        let _ = self.send(&Msg {
            dev,
            w1: addr,
            w2: u64::from(data),
            ..Msg::new(Op::Msi)
        });
    }

    pub fn log(&self, text: &str) {
        for m in Msg::log(text) {
            let _ = self.send(&m);
        }
    }
}

/// How the serving loop waits for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Sleep on the doorbell.
    Block,
    /// Look at the ring, and at every kicked queue, for this long after the last work before
    /// sleeping: a request made meanwhile is served with no notification awaited (lower
    /// latency, a busy core).
    Poll(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("request ring: {0}")]
    Ring(RingError),
    #[error("the proxy went away")]
    Gone,
}

/// A doorbell the hypervisor rings instead of sending a Write: the guest wrote to one of
/// device `dev`'s queue notify addresses (KVM's ioeventfd). Serving it replays `writes`
/// (offset in BAR 0, 16-bit value) on the device: notifying a queue with nothing new is
/// harmless, so one doorbell can stand for all of a device's queues.
pub struct Kick {
    pub dev: u8,
    pub bell: Doorbell,
    pub writes: Vec<(u64, u16)>,
}

/// How long a sleep lasts before the loop looks at `stop` again.
const SLEEP: Duration = Duration::from_millis(100);
/// A polling loop with kicks looks at its queues, and at their doorbells, this often.
const QUEUE_LOOK: Duration = Duration::from_micros(20);

/// The backend's way in: the request ring, its doorbell, and the kicks.
pub struct Inbox<'a> {
    pub region: &'a Region,
    pub bell: &'a Doorbell,
    pub kicks: &'a [Kick],
    /// Runs a kick's replay: a device may leave the work of the request it took to the loop
    /// itself, done once the replay has returned (the backend passes `virtio::defer::accept`;
    /// `|_, f| f()` leaves all of it to the devices). The flag says whether the loop will look
    /// at the queues again itself before it sleeps (it polls): the queues need not be re-armed
    /// for notifications then (the backend passes it to `virtio::polling`).
    pub replay: &'a dyn Fn(bool, &mut dyn FnMut()),
}

/// Registers `devices`, then serves requests and kicks until `stop` is set or the ring
/// breaks. A kick is served after every request already in the ring: the guest posted those
/// before the notification that rang it.
pub fn serve(
    inbox: Inbox,
    out: &Outbox,
    devices: &mut [(Registration, Box<dyn PciFunction>)],
    input: &mut dyn FnMut(u8, &[u8]),
    stop: &AtomicBool,
    wait: Wait,
) -> Result<(), ServeError> {
    let Inbox {
        region,
        bell: from_proxy,
        kicks,
        replay,
    } = inbox;
    let kicks = Kicks { kicks, replay };
    // Whether the loop looks at the kicked queues itself before it sleeps.
    let polls = matches!(wait, Wait::Poll(_)) && !kicks.kicks.is_empty();
    for (r, _) in devices.iter() {
        out.send(&r.to_msg()).map_err(ServeError::Ring)?;
    }
    out.send(&Msg::new(Op::Ready)).map_err(ServeError::Ring)?;
    let bells: Vec<&Doorbell> = kicks.kicks.iter().map(|k| &k.bell).collect();
    let mut refused = 0u64;
    let mut lost = Lost::new();
    let mut idle = Duration::ZERO;
    while !stop.load(Ordering::Acquire) {
        if drain(region, out, devices, input, &mut refused)? {
            // A busy ring must not starve the kicks.
            if !bells.is_empty() {
                let rang = Doorbell::wait_any(&bells, Some(Duration::ZERO));
                lost.run_kicks(region, out, &kicks, rang, polls, devices);
            }
            idle = Duration::ZERO;
            continue;
        }
        if let Wait::Poll(d) = wait {
            if idle < d {
                let chunk = if polls { QUEUE_LOOK } else { d }.min(d - idle);
                if crate::proxy::spin_until(chunk, &mut None, || region.requests().ready()) {
                    idle = Duration::ZERO;
                    continue; // without touching `sleepers`, which the proxy reads on every push
                }
                idle += chunk;
                if polls {
                    let rang = Doorbell::wait_any(&bells, Some(Duration::ZERO));
                    lost.run_kicks(region, out, &kicks, rang, true, devices);
                    // The queues themselves: a request found there is served with no
                    // notification (the queues are left unarmed while the loop polls).
                    if rang != 0 || look(region, &kicks, devices, true) != 0 {
                        idle = Duration::ZERO;
                    }
                }
                if idle < d {
                    continue;
                }
                // Before sleeping, every queue re-armed and looked at once more: a request
                // from now on notifies.
                if polls && look(region, &kicks, devices, false) != 0 {
                    idle = Duration::ZERO;
                    continue;
                }
            }
        }
        let rang = region.requests().sleep_any(from_proxy, &bells, SLEEP);
        if rang != 0 {
            idle = Duration::ZERO;
            drain(region, out, devices, input, &mut refused)?;
            lost.run_kicks(region, out, &kicks, rang, polls, devices);
        } else if !bells.is_empty() && !region.requests().ready() {
            // A whole sleep with nothing rung (a request in the ring ends `sleep_any` at
            // once, unrung: then a kick may well be on its way still).
            idle_look(region, out, &kicks, devices, &mut lost);
        }
    }
    Ok(())
}

/// After a whole sleep with no notification, every kicked queue is looked at anyway: a kick
/// the hypervisors lost (a device VM's port interrupt, say) would leave the driver waiting
/// for ever; this way it waits `SLEEP` at most. Looking at a queue with nothing new is cheap.
/// A virtio-blk queue whose journal moved had requests no notification had announced yet:
/// its next kick says whether that one was late or lost (`Lost`).
fn idle_look(
    region: &Region,
    out: &Outbox,
    kicks: &Kicks,
    devices: &mut [(Registration, Box<dyn PciFunction>)],
    lost: &mut Lost,
) {
    // Still watched after a whole sleep: no kick came at all.
    for (dev, _, _) in std::mem::take(&mut lost.watch) {
        lost.say(out, dev, "none came in the sleep after");
    }
    let moved = look(region, kicks, devices, false);
    for (i, k) in kicks.kicks.iter().enumerate() {
        if moved & 1 << i != 0 {
            lost.watch.push((k.dev, Instant::now(), k.bell.last_read()));
        }
    }
}

/// Looks at every kicked queue as its notification would (replaying every kick; `polling` as
/// in `Inbox::replay`); bit i of the result says that kick i's virtio-blk journal moved:
/// requests were there that no notification had announced yet.
fn look(
    region: &Region,
    kicks: &Kicks,
    devices: &mut [(Registration, Box<dyn PciFunction>)],
    polling: bool,
) -> u64 {
    // Bits above 63 cannot be rung either (`Doorbell::poll_all`).
    let mut before = [None; 64];
    for (b, k) in before.iter_mut().zip(kicks.kicks) {
        *b = next_avail(region, k.dev);
    }
    kicks.run(u64::MAX, polling, devices);
    let mut moved = 0;
    for (i, (k, was)) in kicks.kicks.iter().zip(before).enumerate() {
        if was.is_some() && next_avail(region, k.dev) != was {
            moved |= 1 << i;
        }
    }
    moved
}

/// A virtio-blk queue's next avail index, from its journal (None for other devices).
fn next_avail(region: &Region, dev: u8) -> Option<u16> {
    region.journal(dev).map(|(next_avail, _)| next_avail)
}

/// Requests the idle look found, each judged by the device's next kick: one that finds
/// nothing new, or whose doorbell counts two rings since (it and the next request's), was
/// late (a notification still on its way when the sleep ended); any other was lost, and is
/// said (the first few times).
struct Lost {
    count: u64,
    since: Instant,
    /// (device, when the look found its requests, its doorbell's last read then).
    watch: Vec<(u8, Instant, u64)>,
}

impl Lost {
    fn new() -> Lost {
        Lost {
            count: 0,
            since: Instant::now(),
            watch: Vec::new(),
        }
    }

    fn say(&mut self, out: &Outbox, dev: u8, why: &str) {
        self.count += 1;
        if self.count <= 8 {
            out.log(&format!(
                "device {dev}: requests waited {SLEEP:?} with no notification, which was lost \
                 ({why}), {:.1} s into serving; {} time(s) so far",
                self.since.elapsed().as_secs_f64(),
                self.count
            ));
        }
    }

    /// Serves the kicks that rang, judging the watched devices among them.
    fn run_kicks(
        &mut self,
        region: &Region,
        out: &Outbox,
        all: &Kicks,
        rang: u64,
        polling: bool,
        devices: &mut [(Registration, Box<dyn PciFunction>)],
    ) {
        if self.watch.is_empty() {
            return all.run(rang, polling, devices);
        }
        let kicks = all.kicks;
        let before: Vec<Option<u16>> = self
            .watch
            .iter()
            .map(|(d, ..)| next_avail(region, *d))
            .collect();
        all.run(rang, polling, devices);
        for ((dev, at, read), was) in std::mem::take(&mut self.watch).into_iter().zip(before) {
            let rung = kicks
                .iter()
                .enumerate()
                .find(|(i, k)| k.dev == dev && rang & 1 << i != 0);
            let Some((_, k)) = rung else {
                self.watch.push((dev, at, read));
                continue;
            };
            let new = next_avail(region, dev)
                .zip(was)
                .map_or(0, |(n, b)| n.wrapping_sub(b));
            // An eventfd's read counts its rings since the one before; a UIO device's gives
            // its running total.
            let rings = if k.bell.is_uio() {
                k.bell.last_read().wrapping_sub(read)
            } else {
                k.bell.last_read()
            };
            if new != 0 && rings < 2 {
                let why = format!(
                    "the next one came {:.1} ms later, for a request of its own",
                    at.elapsed().as_secs_f64() * 1e3
                );
                self.say(out, dev, &why);
            }
        }
    }
}

/// The kicks, and how their replays run (`Inbox::replay`).
struct Kicks<'a> {
    kicks: &'a [Kick],
    replay: &'a dyn Fn(bool, &mut dyn FnMut()),
}

impl Kicks<'_> {
    /// Serves the kicks whose bits are set in `rang` (`polling` as in `Inbox::replay`).
    fn run(&self, rang: u64, polling: bool, devices: &mut [(Registration, Box<dyn PciFunction>)]) {
        for (_, k) in self
            .kicks
            .iter()
            .enumerate()
            .filter(|(i, _)| rang & 1 << i != 0)
        {
            if let Some((_, f)) = devices.iter_mut().find(|(r, _)| r.dev == k.dev) {
                (self.replay)(polling, &mut || {
                    for (off, value) in &k.writes {
                        f.bar_write(0, *off, &value.to_le_bytes());
                    }
                });
            }
        }
    }
}

/// Serves every request waiting in the ring; true if there was any. `refused` counts
/// malformed requests (the first few are logged).
pub fn drain(
    region: &Region,
    out: &Outbox,
    devices: &mut [(Registration, Box<dyn PciFunction>)],
    input: &mut dyn FnMut(u8, &[u8]),
    refused: &mut u64,
) -> Result<bool, ServeError> {
    let mut worked = false;
    loop {
        let m = match region.requests().pop() {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(worked),
            Err(RingError::Wire(e)) => {
                *refused += 1;
                if *refused <= 8 {
                    out.log(&format!("refused a malformed request: {e}"));
                }
                continue;
            }
            Err(e) => return Err(ServeError::Ring(e)),
        };
        worked = true;
        if m.op == Op::Input {
            input(m.dev, &m.input_bytes());
            continue;
        }
        if let Some(reply) = handle(&m, devices, out) {
            out.send(&reply).map_err(ServeError::Ring)?;
        }
    }
}

fn handle(
    m: &Msg,
    devices: &mut [(Registration, Box<dyn PciFunction>)],
    out: &Outbox,
) -> Option<Msg> {
    let reply = |w2: u64| Msg {
        id: m.id,
        dev: m.dev,
        len: m.len,
        w2,
        ..Msg::new(Op::Reply)
    };
    let f = devices
        .iter_mut()
        .find(|(r, _)| r.dev == m.dev)
        .map(|(_, f)| f);
    match m.op {
        Op::Ping => Some(reply(m.w2)),
        Op::Start => None,
        Op::Resume => {
            match f {
                Some(f) => f.resume(),
                None => out.log(&format!("resume of unknown device {}", m.dev)),
            }
            None
        }
        Op::Read => {
            let Some(f) = f else {
                out.log(&format!("read of unknown device {}", m.dev));
                return Some(reply(u64::MAX));
            };
            let mut b = [0u8; 8];
            let data = &mut b[..usize::from(m.len)];
            match m.space {
                0 => f.config_read(m.w1, data),
                s => f.bar_read(usize::from(s - 1), m.w1, data),
            }
            Some(reply(u64::from_le_bytes(b)))
        }
        Op::Write => {
            let Some(f) = f else {
                out.log(&format!("write to unknown device {}", m.dev));
                return None;
            };
            let b = m.w2.to_le_bytes();
            let data = &b[..usize::from(m.len)];
            match m.space {
                0 => f.config_write(m.w1, data),
                s => f.bar_write(usize::from(s - 1), m.w1, data),
            }
            None
        }
        op => {
            out.log(&format!("refused {op:?}: only the backend sends it"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU16;

    /// A virtio-blk queue as the journal shows it: a notification takes every request the
    /// driver has made available (`avail`).
    struct Queue {
        region: Arc<Region>,
        avail: Arc<AtomicU16>,
        next: u16,
    }

    impl PciFunction for Queue {
        fn config_read(&mut self, _: u64, _: &mut [u8]) {}
        fn config_write(&mut self, _: u64, _: &[u8]) {}
        fn bar_address(&self, _: usize) -> Option<(u64, u64)> {
            None
        }
        fn bar_read(&mut self, _: usize, _: u64, _: &mut [u8]) {}
        fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {
            while self.next != self.avail.load(Ordering::Acquire) {
                let head = self.next;
                self.next = head.wrapping_add(1);
                self.region.journal_popped(1, head, self.next);
            }
        }
        fn resume(&mut self) {}
    }

    /// The backend's log lines so far.
    fn logged(region: &Region) -> Vec<String> {
        let (mut lines, mut log) = (Vec::new(), crate::wire::LogLines::default());
        while let Ok(Some(m)) = region.replies().pop() {
            if m.op == Op::Log {
                lines.extend(log.push(&m));
            }
        }
        lines
    }

    /// Requests the idle look finds are said to be lost only when the device's next kick
    /// does not account for them: a kick that finds nothing new, or that rang twice (the late
    /// one and the next request's), was late; one that rang once for a new request, or none
    /// in the sleep after, means the notification never came.
    #[test]
    fn a_late_kick_is_told_from_a_lost_one() {
        let region = Arc::new(Region::create().unwrap());
        region.journal_reset(1, 0);
        let out = Outbox::new(
            region.clone(),
            Doorbell::new().unwrap(),
            Doorbell::new().unwrap(),
        );
        let avail = Arc::new(AtomicU16::new(0));
        let mut devices: Vec<(Registration, Box<dyn PciFunction>)> = vec![(
            Registration {
                dev: 1,
                vendor: 0x1af4,
                device: 0x1042,
                class: 0x01_80_00,
                revision: 1,
                bar0_size: 0x4000,
                bar0_64bit: true,
                bar0_prefetchable: false,
                intx_pin: 1,
            },
            Box::new(Queue {
                region: region.clone(),
                avail: avail.clone(),
                next: 0,
            }),
        )];
        let list = [Kick {
            dev: 1,
            bell: Doorbell::new().unwrap(),
            writes: vec![(0x3000, 0)],
        }];
        let kicks = Kicks {
            kicks: &list,
            replay: &|_, f| f(),
        };
        let mut lost = Lost::new();
        // The driver makes `n` requests available and rings `rings` times; the loop wakes.
        let post = |n: u16, rings: usize, lost: &mut Lost, devices: &mut Vec<_>| {
            avail.fetch_add(n, Ordering::AcqRel);
            for _ in 0..rings {
                list[0].bell.ring();
            }
            let rang = Doorbell::wait_any(&[&list[0].bell], Some(Duration::ZERO));
            lost.run_kicks(&region, &out, &kicks, rang, false, devices);
        };
        let look = |lost: &mut Lost, devices: &mut Vec<_>| {
            idle_look(&region, &out, &kicks, devices, lost);
        };

        // A request with its notification still on the way: the look takes it, and the
        // kick that follows finds nothing new.
        avail.store(1, Ordering::Release);
        look(&mut lost, &mut devices);
        assert_eq!(next_avail(&region, 1), Some(1), "the look served it");
        post(0, 1, &mut lost, &mut devices);
        assert!(logged(&region).is_empty(), "late, not lost");
        // The same, the late kick and the next request's read together.
        avail.fetch_add(1, Ordering::AcqRel);
        look(&mut lost, &mut devices);
        post(1, 2, &mut lost, &mut devices);
        assert!(logged(&region).is_empty(), "late, not lost");
        assert_eq!(next_avail(&region, 1), Some(3));
        // A request whose notification never comes: the next kick is the next request's.
        avail.fetch_add(1, Ordering::AcqRel);
        look(&mut lost, &mut devices);
        post(1, 1, &mut lost, &mut devices);
        let l = logged(&region);
        assert_eq!(l.len(), 1, "{l:?}");
        assert!(
            l[0].contains("device 1:") && l[0].contains("was lost"),
            "{l:?}"
        );
        // And one followed by no kick at all within the next sleep.
        avail.fetch_add(1, Ordering::AcqRel);
        look(&mut lost, &mut devices);
        look(&mut lost, &mut devices);
        let l = logged(&region);
        assert_eq!(l.len(), 1, "{l:?}");
        assert!(
            l[0].contains("none came") && l[0].contains("2 time(s)"),
            "{l:?}"
        );
    }
}
