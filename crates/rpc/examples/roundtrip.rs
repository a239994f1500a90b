//! `cargo xtask bench rpc`: a proxy → backend → proxy round trip between two processes, beside
//! the floors under it measured in the same run: an eventfd ping-pong and a shared-memory spin
//! ping-pong between two processes. Prints median and p99 per mode.
//!
//! The child side is this same program, started with `child MODE` and its descriptors at 3..

use rpc::backend::{serve, Outbox, Wait};
use rpc::{Doorbell, Proxy, Region, Registration};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUNDS: usize = 20_000;

fn spawn(mode: &str, fds: &[RawFd]) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child", mode]);
    let fds = fds.to_vec();
    // SAFETY: only dup2 between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            for (i, &fd) in fds.iter().enumerate() {
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
            let wait = if mode == "poll" {
                Wait::Poll(Duration::from_millis(50))
            } else {
                Wait::Block
            };
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
            let mut devs: Vec<(Registration, Box<dyn pci::PciFunction>)> =
                vec![(reg, Box::new(Nop))];
            let _ = serve(
                &region,
                &from_proxy,
                &out,
                &mut devs,
                &mut |_, _| {},
                &AtomicBool::new(false),
                wait,
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        child(&args[2]);
        return;
    }
    let mut rows = Vec::new();
    // Floor 1: eventfd ping-pong between two processes.
    let (a, b) = (eventfd(), eventfd());
    let mut c = spawn("eventfd", &[a.as_raw_fd(), b.as_raw_fd()]);
    let mut v = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        ev_write(a.as_raw_fd());
        ev_read(b.as_raw_fd());
        v.push(t.elapsed());
    }
    let _ = c.kill();
    let _ = c.wait();
    rows.push(("eventfd ping-pong (floor)", stats(v)));
    // Floor 2: spinning on shared memory.
    // SAFETY: a new memfd, owned at once.
    let page_fd = take(unsafe { libc::memfd_create(c"spin".as_ptr(), 0) });
    let page = shared_page(&page_fd);
    let mut c = spawn("spin", &[page_fd.as_raw_fd()]);
    let mut v = Vec::with_capacity(ROUNDS);
    for i in 1..=ROUNDS as u64 {
        let t = Instant::now();
        page[0].store(i, Ordering::Release);
        while page[1].load(Ordering::Acquire) != i {
            std::hint::spin_loop();
        }
        v.push(t.elapsed());
    }
    let _ = c.kill();
    let _ = c.wait();
    rows.push(("shared-memory spin (floor)", stats(v)));
    // The RPC: a BAR read through the proxy, answered by the backend loop.
    for (mode, name) in [
        ("block", "RPC read, blocking"),
        ("poll", "RPC read, polling"),
    ] {
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
        let poll = (mode == "poll").then_some(Duration::from_millis(50));
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
        for _ in 0..1000 {
            proxy.read(1, 1, 0, 4);
        }
        let mut v = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let t = Instant::now();
            assert_eq!(proxy.read(1, 1, 0, 4), 0x0707_0707);
            v.push(t.elapsed());
        }
        let _ = c.kill();
        let _ = c.wait();
        rows.push((name, stats(v)));
    }
    println!("\nRPC round trip between two processes ({ROUNDS} rounds each, microseconds)");
    println!("{:<30} {:>10} {:>10}", "", "median", "p99");
    for (name, (med, p99)) in &rows {
        println!("{name:<30} {med:>10.2} {p99:>10.2}");
    }
    let ratio = |i: usize, floor: usize| rows[i].1 .0 / rows[floor].1 .0;
    println!(
        "blocking / eventfd floor: {:.2}x (goal 1.2x); polling / spin floor: {:.2}x (goal 2x)",
        ratio(2, 0),
        ratio(3, 1)
    );
}
