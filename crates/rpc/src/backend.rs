//! The backend's side: it serves the requests of the proxy to its PCI functions, in ring order
//! and on one thread (so that a read sees every write posted before it), and sends interrupts
//! and log lines from any thread.

use crate::proxy::Registration;
use crate::shm::{Bell, Doorbell, Region, RingError};
use crate::wire::{Msg, Op};
use pci::PciFunction;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// Look at the ring for this long before sleeping (lower latency, a busy core).
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
/// A polling loop with kicks looks at them this often.
const KICK_LOOK: Duration = Duration::from_millis(1);

/// The backend's way in: the request ring, its doorbell, and the kicks.
pub struct Inbox<'a> {
    pub region: &'a Region,
    pub bell: &'a Doorbell,
    pub kicks: &'a [Kick],
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
    } = inbox;
    for (r, _) in devices.iter() {
        out.send(&r.to_msg()).map_err(ServeError::Ring)?;
    }
    out.send(&Msg::new(Op::Ready)).map_err(ServeError::Ring)?;
    let bells: Vec<&Doorbell> = kicks.iter().map(|k| &k.bell).collect();
    let mut refused = 0u64;
    let mut lost = 0u64;
    let mut idle = Duration::ZERO;
    while !stop.load(Ordering::Acquire) {
        if drain(region, out, devices, input, &mut refused)? {
            // A busy ring must not starve the kicks.
            if !bells.is_empty() {
                run_kicks(
                    kicks,
                    Doorbell::wait_any(&bells, Some(Duration::ZERO)),
                    devices,
                );
            }
            idle = Duration::ZERO;
            continue;
        }
        let timeout = match wait {
            Wait::Poll(d) if idle < d => {
                let chunk = if kicks.is_empty() { d } else { KICK_LOOK }.min(d - idle);
                if crate::proxy::spin_until(chunk, &mut None, || region.requests().ready()) {
                    idle = Duration::ZERO;
                    continue; // without touching `sleepers`, which the proxy reads on every push
                }
                idle += chunk;
                if idle < d {
                    Duration::ZERO
                } else {
                    SLEEP
                }
            }
            _ => SLEEP,
        };
        let rang = region.requests().sleep_any(from_proxy, &bells, timeout);
        if rang != 0 {
            idle = Duration::ZERO;
            drain(region, out, devices, input, &mut refused)?;
            run_kicks(kicks, rang, devices);
        } else if timeout == SLEEP && !kicks.is_empty() {
            idle_look(region, out, kicks, devices, &mut lost);
        }
    }
    Ok(())
}

/// After a whole sleep with no notification, every kicked queue is looked at anyway: a kick
/// the hypervisors lost (a device VM's port interrupt, say) would leave the driver waiting
/// for ever; this way it waits `SLEEP` at most. Looking at a queue with nothing new is cheap.
/// A virtio-blk queue whose journal moved found requests no notification announced: said
/// (the first few times), since that is a lost event somewhere.
fn idle_look(
    region: &Region,
    out: &Outbox,
    kicks: &[Kick],
    devices: &mut [(Registration, Box<dyn PciFunction>)],
    lost: &mut u64,
) {
    let next = |dev| region.journal(dev).map(|(next_avail, _)| next_avail);
    let before: Vec<Option<u16>> = kicks.iter().map(|k| next(k.dev)).collect();
    run_kicks(kicks, u64::MAX, devices);
    for (k, was) in kicks.iter().zip(before) {
        if was.is_some() && next(k.dev) != was {
            *lost += 1;
            if *lost <= 8 {
                out.log(&format!(
                    "device {}: found requests that no notification announced (a lost \
                     kick), {} time(s) so far",
                    k.dev, lost
                ));
            }
        }
    }
}

/// Serves the kicks whose bits are set in `rang`.
fn run_kicks(kicks: &[Kick], rang: u64, devices: &mut [(Registration, Box<dyn PciFunction>)]) {
    for (_, k) in kicks.iter().enumerate().filter(|(i, _)| rang & 1 << i != 0) {
        if let Some((_, f)) = devices.iter_mut().find(|(r, _)| r.dev == k.dev) {
            for (off, value) in &k.writes {
                f.bar_write(0, *off, &value.to_le_bytes());
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
