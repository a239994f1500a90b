//! `cargo xtask bench rpc`: a proxy → backend → proxy round trip between two processes, beside
//! the floors under it measured in the same run: an eventfd ping-pong and a shared-memory spin
//! ping-pong between two processes. Prints median and p99 per mode.
//!
//! The child side is this same program, started with `child MODE` and its descriptors at 3..
//!
//! This machine's two CPUs are sometimes close (shared caches) and sometimes not, which moves
//! every number by up to 3x from one second to the next. So each measure runs in 10 batches,
//! interleaved with its floor's batches, and the ratio to the floor is the median of the
//! batches' ratios (each batch pair saw the same placement).

use rpc::backend::{drain, serve, Inbox, Outbox, Wait};
use rpc::{Doorbell, Proxy, Region, Registration};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUNDS: usize = 20_000;
const BATCHES: usize = 10;

fn spawn(mode: &str, fds: &[RawFd]) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child", mode]);
    let fds = fds.to_vec();
    // SAFETY: only dup2 between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            // Out of the way first: a source may sit where another one goes.
            let mut high = [0; 8];
            for (i, &fd) in fds.iter().enumerate() {
                high[i] = libc::fcntl(fd, libc::F_DUPFD, 64);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high[..fds.len()].iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn take(fd: RawFd) -> OwnedFd {
    // SAFETY: the parent put this descriptor there for us.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn eventfd() -> OwnedFd {
    // SAFETY: a new eventfd (blocking), owned at once.
    take(unsafe { libc::eventfd(0, 0) })
}

fn ev_write(fd: RawFd) {
    let one = 1u64;
    // SAFETY: an 8-byte write to an eventfd.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

fn ev_read(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: an 8-byte read from an eventfd.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// A shared page for the spin floor.
fn shared_page(fd: &OwnedFd) -> &'static [AtomicU64; 2] {
    // SAFETY: ftruncate and a shared mapping of one page, leaked for the program's life.
    unsafe {
        libc::ftruncate(fd.as_raw_fd(), 4096);
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        );
        &*(p as *const [AtomicU64; 2])
    }
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(v[v.len() / 2]), us(v[v.len() * 99 / 100]))
}

struct Nop;
impl pci::PciFunction for Nop {
    fn config_read(&mut self, _: u64, d: &mut [u8]) {
        d.fill(0)
    }
    fn config_write(&mut self, _: u64, _: &[u8]) {}
    fn bar_address(&self, _: usize) -> Option<(u64, u64)> {
        None
    }
    fn bar_read(&mut self, _: usize, _: u64, d: &mut [u8]) {
        d.fill(7)
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
    fn resume(&mut self) {}
}

fn nop_device() -> (Registration, Box<dyn pci::PciFunction>) {
    let reg = Registration {
        dev: 1,
        vendor: 0x1af4,
        device: 0x1042,
        class: 0,
        revision: 1,
        bar0_size: 0x1000,
        bar0_64bit: false,
        bar0_prefetchable: false,
        intx_pin: 1,
    };
    (reg, Box::new(Nop))
}

fn child(mode: &str) {
    match mode {
        "eventfd" => loop {
            ev_read(3);
            ev_write(4);
        },
        "spin" => {
            let page = shared_page(&take(3));
            let mut last = 0;
            loop {
                let v = page[0].load(Ordering::Acquire);
                if v != last {
                    last = v;
                    page[1].store(v, Ordering::Release);
                }
                std::hint::spin_loop();
            }
        }
        _ => {
            let region = Region::open(take(3)).unwrap();
            let from_proxy = Doorbell::from_fd(take(4));
            let out = Outbox::new(
                Arc::new(Region::open(region.fd().try_clone().unwrap()).unwrap()),
                Doorbell::from_fd(take(5)),
                Doorbell::from_fd(take(6)),
            );
            if mode.ends_with("-jailed") {
                // The backend's jail and its system call policy, as `splitvirt backend` has them.
                backend::jail::enter(backend::jail::ids_for(backend::jail::ROOT_DEFAULT)).unwrap();
                backend::policy::install(backend::policy::Needs::default()).unwrap();
            }
            let wait = if mode.starts_with("poll") {
                Wait::Poll(Duration::from_millis(50))
            } else {
                Wait::Block
            };
            let mut devs = vec![nop_device()];
            let inbox = Inbox {
                region: &region,
                bell: &from_proxy,
                kicks: &[],
                replay: &|_, f| f(),
            };
            let _ = serve(
                inbox,
                &out,
                &mut devs,
                &mut |_, _| {},
                &AtomicBool::new(false),
                wait,
            );
        }
    }
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One batch of `n` round trips of `mode`, with a child of its own.
fn batch(mode: &str, n: usize) -> Vec<Duration> {
    let mut v = Vec::with_capacity(n);
    match mode {
        "eventfd" => {
            let (a, b) = (eventfd(), eventfd());
            let mut c = spawn("eventfd", &[a.as_raw_fd(), b.as_raw_fd()]);
            for _ in 0..n {
                let t = Instant::now();
                ev_write(a.as_raw_fd());
                ev_read(b.as_raw_fd());
                v.push(t.elapsed());
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        "spin" => {
            // SAFETY: a new memfd, owned at once.
            let page_fd = take(unsafe { libc::memfd_create(c"spin".as_ptr(), 0) });
            let page = shared_page(&page_fd);
            let mut c = spawn("spin", &[page_fd.as_raw_fd()]);
            for i in 1..=n as u64 {
                let t = Instant::now();
                page[0].store(i, Ordering::Release);
                while page[1].load(Ordering::Acquire) != i {
                    std::hint::spin_loop();
                }
                v.push(t.elapsed());
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        "one-thread" => {
            // Both sides' work for one read, with no message crossing between CPUs: what the
            // software costs, apart from the transfers the spin floor measures.
            let region = Arc::new(Region::create().unwrap());
            let out = Outbox::new(
                region.clone(),
                Doorbell::new().unwrap(),
                Doorbell::new().unwrap(),
            );
            let bell = Doorbell::new().unwrap();
            let mut devs = vec![nop_device()];
            let m = rpc::Msg {
                dev: 1,
                space: 1,
                len: 4,
                ..rpc::Msg::new(rpc::Op::Read)
            };
            for _ in 0..n {
                let t = Instant::now();
                region.requests().push(&m, Duration::ZERO).unwrap();
                region.requests().wake(&bell);
                drain(&region, &out, &mut devs, &mut |_, _| {}, &mut 0).unwrap();
                let r = region.replies().pop().unwrap().unwrap();
                v.push(t.elapsed());
                assert_eq!(r.w2, 0x0707_0707);
            }
        }
        _ => {
            let region = Arc::new(Region::create().unwrap());
            let (to_backend, to_proxy, replies) = (
                Doorbell::new().unwrap(),
                Doorbell::new().unwrap(),
                Doorbell::new().unwrap(),
            );
            let mut c = spawn(
                mode,
                &[
                    region.fd().as_raw_fd(),
                    to_backend.fd().as_raw_fd(),
                    to_proxy.fd().as_raw_fd(),
                    replies.fd().as_raw_fd(),
                ],
            );
            let poll = mode
                .starts_with("poll")
                .then_some(Duration::from_millis(50));
            let proxy = Proxy::start_with(
                region,
                to_backend,
                to_proxy,
                replies,
                Box::new(|_| {}),
                Duration::from_secs(2),
                poll,
            );
            proxy.registrations(Duration::from_secs(5)).unwrap();
            for _ in 0..n / 10 {
                proxy.read(1, 1, 0, 4);
            }
            for _ in 0..n {
                let t = Instant::now();
                assert_eq!(proxy.read(1, 1, 0, 4), 0x0707_0707);
                v.push(t.elapsed());
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    v
}

fn median(v: &[Duration]) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2].as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        pin(1);
        child(&args[2]);
        return;
    }
    pin(0);
    // `roundtrip only MODE [ROUNDS]`: one long batch of one mode, for a profiler (or a floor
    // measured beside another benchmark).
    if args.get(1).map(String::as_str) == Some("only") {
        let rounds = args
            .get(3)
            .and_then(|r| r.parse().ok())
            .unwrap_or(2_000_000);
        let v = batch(&args[2], rounds);
        println!("{} median {:.3} us", args[2], median(&v) * 1e6);
        return;
    }
    // (row name, mode); the floors first, each measure after its floor.
    let modes = [
        ("eventfd ping-pong (floor)", "eventfd"),
        ("shared-memory spin (floor)", "spin"),
        ("RPC read, blocking", "block"),
        ("RPC read, polling", "poll"),
        ("RPC read, blocking, jailed", "block-jailed"),
        ("RPC read, polling, jailed", "poll-jailed"),
    ];
    let mut all: Vec<Vec<Duration>> = vec![Vec::new(); modes.len()];
    // Per batch: measure / floor, for (blocking, eventfd), (polling, spin), and the backend
    // jailed over unjailed, blocking and polling.
    let mut ratios = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..BATCHES {
        for (k, (floor, measure)) in [(0, 2), (1, 3), (2, 4), (3, 5)].into_iter().enumerate() {
            let f = batch(modes[floor].1, ROUNDS / BATCHES);
            let m = batch(modes[measure].1, ROUNDS / BATCHES);
            ratios[k].push(median(&m) / median(&f));
            all[floor].extend(f);
            all[measure].extend(m);
        }
    }
    println!("\nRPC round trip between two processes ({ROUNDS} rounds each, microseconds)");
    println!("{:<30} {:>10} {:>10}", "", "median", "p99");
    for ((name, _), v) in modes.iter().zip(all) {
        let (med, p99) = stats(v);
        println!("{name:<30} {med:>10.2} {p99:>10.2}");
    }
    let (med, p99) = stats(batch("one-thread", ROUNDS));
    println!(
        "{:<30} {med:>10.2} {p99:>10.2}",
        "RPC read's work, one thread"
    );
    let mid = |r: &mut Vec<f64>| {
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    println!(
        "blocking / eventfd floor: {:.2}x (goal 1.2x); polling / spin floor: {:.2}x (goal 2x) \
         (medians of {BATCHES} interleaved batches' ratios)",
        mid(&mut ratios[0]),
        mid(&mut ratios[1])
    );
    println!(
        "jailed / unjailed backend: blocking {:.2}x, polling {:.2}x (goal within 3%; medians of \
         {BATCHES} interleaved batches' ratios)",
        mid(&mut ratios[2]),
        mid(&mut ratios[3])
    );
}
