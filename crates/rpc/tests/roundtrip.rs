//! The proxy and a backend loop on two mappings of one control region, with a function whose
//! BAR is a register file: what the guest would see through the proxy.

use pci::{BarKind, ConfigSpace, PciFunction};
use rpc::backend::{serve, Inbox, Kick, Outbox, Wait};
use rpc::{Doorbell, Event, Link, Msg, Op, Proxy, Region, Registration, RemoteFunction};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Each replay's `polling` flag, in order.
type Replays = Arc<Mutex<Vec<bool>>>;

struct Regs {
    cfg: ConfigSpace,
    regs: [u8; 64],
}

impl PciFunction for Regs {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.cfg.read(off, data)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.cfg.write(off, data)
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.cfg.bar_address(bar)
    }
    fn bar_read(&mut self, _: usize, off: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = *self.regs.get(off as usize + i).unwrap_or(&0xff);
        }
    }
    fn bar_write(&mut self, _: usize, off: u64, data: &[u8]) {
        for (i, d) in data.iter().enumerate() {
            if let Some(r) = self.regs.get_mut(off as usize + i) {
                *r = *d;
            }
        }
    }
    /// Seen in the last register.
    fn resume(&mut self) {
        self.regs[63] = 0xaa;
    }
}

fn reg(dev: u8) -> Registration {
    Registration {
        dev,
        vendor: 0x1af4,
        device: 0x1042,
        class: 0x01_00_00,
        revision: 1,
        bar0_size: 0x1000,
        bar0_64bit: true,
        bar0_prefetchable: true,
        intx_pin: 1,
    }
}

fn function() -> Box<dyn PciFunction> {
    let mut cfg = ConfigSpace::new(0x1af4, 0x1042, 0x01_00_00, 1);
    cfg.set_bar(
        0,
        0x1000,
        BarKind::Mem64 { prefetchable: true },
        0x80_0000_0000,
    );
    Box::new(Regs { cfg, regs: [0; 64] })
}

struct Pair {
    proxy: Arc<Proxy>,
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
    outbox: Arc<Outbox>,
    backend: std::thread::JoinHandle<()>,
    view: Arc<Region>,
    wake: Arc<Doorbell>,
}

/// A backend loop on its own thread, serving devices 1 and 2 until `stop`.
fn backend(
    view: Arc<Region>,
    wake: Arc<Doorbell>,
    o: Arc<Outbox>,
    stop: Arc<AtomicBool>,
    wait: Wait,
    kicks: Vec<Kick>,
    replays: Replays,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut devs = vec![(reg(1), function()), (reg(2), function())];
        let mut input =
            |dev: u8, b: &[u8]| o.log(&format!("input {dev} {}", String::from_utf8_lossy(b)));
        let inbox = Inbox {
            region: &view,
            bell: &wake,
            kicks: &kicks,
            replay: &|polling, f| {
                replays.lock().unwrap().push(polling);
                f()
            },
        };
        let _ = serve(inbox, &o, &mut devs, &mut input, &stop, wait);
    })
}

fn pair(wait: Wait) -> Pair {
    pair_with(wait, None)
}

/// `pair`, whose proxy spins up to `poll` for a reply before it sleeps.
fn pair_with(wait: Wait, poll: Option<Duration>) -> Pair {
    pair_events(wait, poll, false)
}

/// `pair_with`; with `echo`, every interrupt the VMM takes makes the backend side send
/// another one: an endless stream, however fast the VMM drains it.
fn pair_events(wait: Wait, poll: Option<Duration>, echo: bool) -> Pair {
    let region = Arc::new(Region::create().unwrap());
    let backend_view = Arc::new(Region::open(region.fd().try_clone().unwrap()).unwrap());
    let (to_backend, to_proxy, replies) = (
        Doorbell::new().unwrap(),
        Doorbell::new().unwrap(),
        Doorbell::new().unwrap(),
    );
    let backend_wake = Arc::new(Doorbell::from_fd(to_backend.fd().try_clone().unwrap()));
    let proxy_wake = Doorbell::from_fd(to_proxy.fd().try_clone().unwrap());
    let replies_wake = Doorbell::from_fd(replies.fd().try_clone().unwrap());
    let outbox = Outbox::new(backend_view.clone(), to_proxy, replies);
    let stop = Arc::new(AtomicBool::new(false));
    let backend = backend(
        backend_view.clone(),
        backend_wake.clone(),
        outbox.clone(),
        stop.clone(),
        wait,
        Vec::new(),
        Default::default(),
    );
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let echo_to = outbox.clone();
    let proxy = Proxy::start_with(
        region,
        to_backend,
        proxy_wake,
        replies_wake,
        Box::new(move |ev| {
            if let (true, Event::Intx { dev, level }) = (echo, &ev) {
                echo_to.intx(*dev, !*level);
            } else {
                e.lock().unwrap().push(ev)
            }
        }),
        Duration::from_millis(500),
        poll,
    );
    Pair {
        proxy,
        events,
        stop,
        outbox,
        backend,
        view: backend_view,
        wake: backend_wake,
    }
}

#[test]
fn a_link_moves_a_function_to_another_backend_and_resume_reaches_the_device() {
    let (first, second) = (pair(Wait::Block), pair(Wait::Block));
    let regs = first.proxy.registrations(Duration::from_secs(5)).unwrap();
    second.proxy.registrations(Duration::from_secs(5)).unwrap();
    let link = Link::new(first.proxy.clone());
    let mut f = RemoteFunction::new(link.clone(), &regs[0], 0x80_0000_0000);
    let r8 = |f: &mut RemoteFunction, off| {
        let mut b = [0u8];
        f.bar_read(0, off, &mut b);
        b[0]
    };
    f.bar_write(0, 5, &[1]);
    assert_eq!(r8(&mut f, 5), 1);
    link.set(second.proxy.clone());
    assert_eq!(r8(&mut f, 5), 0, "the second backend's device");
    assert_eq!(r8(&mut f, 63), 0);
    second.proxy.resume(1);
    assert_eq!(r8(&mut f, 63), 0xaa, "Resume called the device's resume");
    link.set(first.proxy.clone());
    assert_eq!(r8(&mut f, 5), 1, "and back");
    // Resume of a device the backend does not have: logged, nothing else.
    first.proxy.resume(9);
    assert_eq!(first.proxy.ping(3), 3);
    assert!(first
        .events
        .lock()
        .unwrap()
        .iter()
        .all(|e| !matches!(e, Event::Dead(_))));
    for p in [first, second] {
        p.stop.store(true, Ordering::Release);
        p.backend.join().unwrap();
    }
}

#[test]
fn registration_config_and_bar_accesses_in_order() {
    let p = pair(Wait::Block);
    let regs = p.proxy.registrations(Duration::from_secs(5)).unwrap();
    assert_eq!(regs, vec![reg(1), reg(2)]);
    let mut f = RemoteFunction::new(Link::new(p.proxy.clone()), &regs[0], 0x80_0000_0000);
    let mut id = [0u8; 4];
    f.config_read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
    // Memory decoding on: the proxy's own copy routes the BAR without a round trip.
    assert_eq!(f.bar_address(0), None);
    f.config_write(4, &[2, 0]);
    assert_eq!(f.bar_address(0), Some((0x80_0000_0000, 0x1000)));
    // A posted write is seen by the next read; odd sizes are split.
    f.bar_write(0, 8, &[1, 2, 3, 4, 5, 6, 7]);
    let mut back = [0u8; 7];
    f.bar_read(0, 8, &mut back);
    assert_eq!(back, [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(p.proxy.ping(77), 77);
    p.stop.store(true, Ordering::Release);
    p.backend.join().unwrap();
}

#[test]
fn many_vcpus_at_once_each_get_their_own_answers() {
    let p = pair(Wait::Poll(Duration::from_micros(200)));
    p.proxy.registrations(Duration::from_secs(5)).unwrap();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let proxy = p.proxy.clone();
            std::thread::spawn(move || {
                for i in 0..2000u64 {
                    let v = t << 32 | i;
                    assert_eq!(proxy.ping(v), v);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    p.stop.store(true, Ordering::Release);
    p.backend.join().unwrap();
}

#[test]
fn interrupts_and_logs_reach_the_vmm_and_bad_messages_are_dropped() {
    let p = pair(Wait::Block);
    p.proxy.registrations(Duration::from_secs(5)).unwrap();
    p.outbox.intx(2, true);
    // A message the backend may not send, and words that do not decode at all.
    p.outbox.send(&Msg::new(Op::Read)).unwrap();
    p.outbox.msi(2, 0x0802_0040, 70);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while p.events.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        *p.events.lock().unwrap(),
        vec![
            Event::Intx {
                dev: 2,
                level: true
            },
            Event::Msi {
                dev: 2,
                addr: 0x0802_0040,
                data: 70
            }
        ]
    );
    assert!(!p.proxy.is_dead());
    p.stop.store(true, Ordering::Release);
    p.backend.join().unwrap();
}

#[test]
fn a_silent_backend_costs_a_timeout_not_a_hang_and_a_dead_one_nothing() {
    let p = pair(Wait::Block);
    p.proxy.registrations(Duration::from_secs(5)).unwrap();
    p.stop.store(true, Ordering::Release);
    p.backend.join().unwrap();
    let t = std::time::Instant::now();
    assert_eq!(p.proxy.read(1, 0, 0, 4), u64::MAX);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "waited for the timeout"
    );
    p.proxy.fail("test: backend killed");
    let t = std::time::Instant::now();
    assert_eq!(p.proxy.read(1, 0, 0, 4), u64::MAX);
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "no wait once dead"
    );
    assert!(matches!(
        p.events.lock().unwrap().last(),
        Some(Event::Dead(_))
    ));
}

#[test]
fn a_polling_vcpu_gets_its_answers_and_still_times_out() {
    let p = pair_with(
        Wait::Poll(Duration::from_millis(20)),
        Some(Duration::from_millis(100)),
    );
    p.proxy.registrations(Duration::from_secs(5)).unwrap();
    for i in 0..1000u64 {
        assert_eq!(p.proxy.ping(i), i);
    }
    p.stop.store(true, Ordering::Release);
    p.backend.join().unwrap();
    let t = std::time::Instant::now();
    assert_eq!(p.proxy.read(1, 0, 0, 4), u64::MAX);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(2),
        "waited {waited:?} for a 500 ms timeout"
    );
}

#[test]
fn a_read_behind_a_full_request_ring_waits_for_room() {
    let p = pair(Wait::Block);
    p.proxy.registrations(Duration::from_secs(5)).unwrap();
    p.stop.store(true, Ordering::Release);
    p.backend.join().unwrap();
    // The backend stalls while the guest posts a ring's worth of writes.
    for i in 0..rpc::shm::SLOTS {
        p.proxy.write(1, 1, 0, 1, u64::from(i));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (view, wake, out, s) = (
        p.view.clone(),
        p.wake.clone(),
        p.outbox.clone(),
        stop.clone(),
    );
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        backend(
            view,
            wake,
            out,
            s,
            Wait::Block,
            Vec::new(),
            Default::default(),
        )
        .join()
        .unwrap();
    });
    // The read finds no room, waits for it (not holding the reply ring), and sees the last
    // write before it.
    assert_eq!(
        p.proxy.read(1, 1, 0, 1),
        u64::from(rpc::shm::SLOTS - 1) & 0xff
    );
    assert!(!p.proxy.is_dead());
    stop.store(true, Ordering::Release);
    late.join().unwrap();
}

/// `pair`'s backend replaced by one whose device 2 has a kick: a notification the hypervisor
/// caught, standing for writes of 0x0201 at 8 and 0x0403 at 10. Returns the proxy, the kick's
/// bell (to ring it), the new backend's stop flag and thread, and the replays its loop ran
/// through `Inbox::replay`. The new backend waits as `wait` says.
fn pair_with_a_kick(
    wait: Wait,
) -> (
    Arc<Proxy>,
    Doorbell,
    Arc<AtomicBool>,
    std::thread::JoinHandle<()>,
    Replays,
) {
    let p = pair(Wait::Block);
    p.proxy.registrations(Duration::from_secs(5)).unwrap();
    p.stop.store(true, Ordering::Release);
    p.backend.join().unwrap();
    let bell = Doorbell::new().unwrap();
    let ring_it = Doorbell::from_fd(bell.fd().try_clone().unwrap());
    let kicks = vec![Kick {
        dev: 2,
        bell,
        writes: vec![(8, 0x0201), (10, 0x0403)],
    }];
    let stop = Arc::new(AtomicBool::new(false));
    let replays = Replays::default();
    let b = backend(
        p.view.clone(),
        p.wake.clone(),
        p.outbox.clone(),
        stop.clone(),
        wait,
        kicks,
        replays.clone(),
    );
    (p.proxy, ring_it, stop, b, replays)
}

#[test]
fn a_kick_replays_its_writes_after_the_requests_before_it() {
    let (proxy, ring_it, stop, b, replays) = pair_with_a_kick(Wait::Block);
    for round in 0..50u64 {
        // A write posted before the notification lands first, whatever wakes the backend.
        proxy.write(2, 1, 8, 4, 0xaaaa_aaaa ^ round);
        ring_it.ring();
        // A bound against a hang only: a loaded machine may take its time.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while proxy.read(2, 1, 8, 4) != 0x0403_0201 {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: kick not served"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Device 1 has no kick: its registers are untouched.
    assert_eq!(proxy.read(1, 1, 8, 4), 0);
    // Every replay ran inside the inbox's `replay` (where the backend accepts a device's
    // work): at least one a round, each round's writes having undone the last one's. A loop
    // that does not poll re-arms every queue it looks at.
    let replays = replays.lock().unwrap().clone();
    assert!(replays.len() >= 50);
    assert!(replays.iter().all(|polling| !polling));
    stop.store(true, Ordering::Release);
    b.join().unwrap();
}

/// Device 2's kick, never rung, is replayed all the same by a backend waiting as `wait` says:
/// the test reads its register (each read a request) every `pause` until the replay's writes
/// are there. The deadline only bounds a hang.
fn replayed_without_a_kick(wait: Wait, pause: Duration) {
    let (proxy, _never_rung, stop, b, _) = pair_with_a_kick(wait);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while proxy.read(2, 1, 8, 4) != 0x0403_0201 {
        assert!(std::time::Instant::now() < deadline, "never looked at");
        std::thread::sleep(pause);
    }
    assert_eq!(proxy.read(1, 1, 8, 4), 0, "device 1 has no kick");
    stop.store(true, Ordering::Release);
    b.join().unwrap();
}

/// A notification that never arrives (a kick the hypervisors lost) does not leave the queue
/// waiting for ever: after a whole sleep with nothing (no request either), the backend looks at
/// every kicked queue. Each read ends the backend's sleep: they leave it longer ones between.
#[test]
fn a_queue_whose_kick_was_lost_is_looked_at_anyway() {
    replayed_without_a_kick(Wait::Block, Duration::from_millis(250));
}

/// A polling backend looks at its kicked queues itself: a request made while it polls is
/// served with no notification at all. Each read is a request, after which it polls anew, for
/// longer than the test runs: the look after a whole quiet sleep (above) never comes.
#[test]
fn a_polling_backend_serves_a_queue_no_notification_announced() {
    replayed_without_a_kick(
        Wait::Poll(Duration::from_secs(3600)),
        Duration::from_millis(1),
    );
}

/// While it polls, the loop leaves the queues unarmed (its replays say `polling`); before it
/// sleeps, it looks at every queue once more re-arming it, so that the next request notifies.
#[test]
fn a_polling_backend_rearms_its_queues_before_it_sleeps() {
    let (proxy, _bell, stop, b, replays) = pair_with_a_kick(Wait::Poll(Duration::from_millis(2)));
    proxy.read(2, 1, 8, 4);
    // Only the loop writes the replays; the deadline bounds a hang.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = replays.lock().unwrap().clone();
        if let Some(first) = r.iter().position(|&p| p) {
            if r[first..].contains(&false) {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never re-armed: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Release);
    b.join().unwrap();
}

/// A backend that sends only what the proxy may send, over and over, is failed after
/// `VIOLATION_LIMIT` of them, and says why.
#[test]
fn a_backend_that_keeps_breaking_the_protocol_is_failed() {
    let p = pair(Wait::Block);
    p.proxy.registrations(Duration::from_secs(5)).unwrap();
    p.stop.store(true, Ordering::Release);
    p.backend.join().unwrap();
    for _ in 0..rpc::proxy::VIOLATION_LIMIT - 1 {
        while p.outbox.send(&Msg::new(Op::Read)).is_err() {
            p.proxy.ping(0);
        }
    }
    // Draining them all (a read times out on the stopped backend) leaves it alive...
    assert_eq!(p.proxy.read(1, 0, 0, 4), u64::MAX);
    assert!(!p.proxy.is_dead());
    // ...and the next one fails it.
    p.outbox.send(&Msg::new(Op::Read)).unwrap();
    assert_eq!(p.proxy.read(1, 0, 0, 4), u64::MAX);
    assert!(p.proxy.is_dead());
    assert!(matches!(
        p.events.lock().unwrap().last(),
        Some(Event::Dead(why)) if why.contains("broke the protocol 64 times")
    ));
}

/// A backend that streams messages without end cannot hold a vCPU that waits for a reply
/// past its deadline: each drain takes a bounded batch, then the vCPU looks at its clock.
#[test]
fn a_flooding_backend_costs_a_timeout_not_a_hang() {
    let p = pair_events(Wait::Block, None, true);
    p.proxy.registrations(Duration::from_secs(5)).unwrap();
    p.stop.store(true, Ordering::Release);
    p.backend.join().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let proxy = p.proxy.clone();
    std::thread::spawn(move || {
        let _ = tx.send(proxy.read(1, 0, 0, 4));
    });
    // Once the read is in the request ring, its vCPU consumes the reply ring (it took that
    // before sending): start the stream, which each interrupt taken renews.
    loop {
        match p.view.requests().pop() {
            Ok(Some(m)) if m.op == Op::Read => break,
            _ => std::thread::yield_now(),
        }
    }
    p.outbox.intx(1, true);
    // The read's own timeout is 500 ms; 30 s is far past anything but a hang.
    let got = rx.recv_timeout(Duration::from_secs(30));
    p.proxy.fail("test: the stream ends with the backend");
    assert_eq!(got, Ok(u64::MAX), "the vCPU's read never came back");
}
