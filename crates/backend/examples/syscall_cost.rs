//! `cargo xtask bench jail`: what the jail costs the backend on its data path. The jail adds
//! nothing to a request but its system call filter (namespaces, ids and limits cost nothing
//! once set), so this measures the system calls a request makes, in a process jailed with the
//! virtio-blk policy and in one that is not, in alternating batches: per op an eventfd write
//! and read (a doorbell rung and taken) and a 4 KiB pread (a disk read). Prints ns per op per
//! batch, the per-batch ratios and their median.
//!
//! The measuring side is this same program, started as `child jailed|plain`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Instant;

const OPS: u32 = 200_000;
const BATCHES: usize = 9;

fn child(jailed: bool) {
    // Made before the policy: it allows no new descriptor.
    // SAFETY: eventfd and memfd_create return new descriptors we own; ftruncate sizes ours.
    let (bell, file) = unsafe {
        let e = libc::eventfd(0, libc::EFD_CLOEXEC);
        let m = libc::memfd_create(c"cost".as_ptr(), libc::MFD_CLOEXEC);
        assert!(e >= 0 && m >= 0 && libc::ftruncate(m, 1 << 20) == 0);
        (OwnedFd::from_raw_fd(e), OwnedFd::from_raw_fd(m))
    };
    if jailed {
        backend::jail::enter(backend::jail::ids_for(backend::jail::ROOT_DEFAULT))
            .expect("the jail");
        backend::policy::install(backend::policy::Needs {
            disk: true,
            socket_console: false,
        })
        .expect("the policy");
    }
    let mut buf = vec![0u8; 4096];
    let one = 1u64;
    let mut got = 0u64;
    let t = Instant::now();
    for i in 0..OPS {
        // SAFETY: plain reads and writes into our own buffers on our own descriptors.
        unsafe {
            libc::write(bell.as_raw_fd(), (&one as *const u64).cast(), 8);
            libc::read(bell.as_raw_fd(), (&mut got as *mut u64).cast(), 8);
            let off = i64::from(i % 256) * 4096;
            libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), 4096, off);
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(OPS);
    println!("{ns:.1}");
}

fn batch(kind: &str) -> f64 {
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["child", kind])
        .output()
        .unwrap();
    assert!(o.status.success(), "{kind}: {o:?}");
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        return child(args.get(2).map(String::as_str) == Some("jailed"));
    }
    let (mut jailed, mut plain) = (Vec::new(), Vec::new());
    for i in 0..BATCHES {
        // Which goes first alternates.
        if i % 2 == 0 {
            jailed.push(batch("jailed"));
            plain.push(batch("plain"));
        } else {
            plain.push(batch("plain"));
            jailed.push(batch("jailed"));
        }
    }
    let mut ratios: Vec<f64> = jailed.iter().zip(&plain).map(|(j, p)| j / p).collect();
    let show = |v: &[f64], d: usize| {
        v.iter()
            .map(|x| format!("{x:.d$}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("system calls of one backend op (eventfd write + read, 4 KiB pread), ns per op, {OPS} ops per batch");
    println!("jailed:          {}", show(&jailed, 0));
    println!("unjailed:        {}", show(&plain, 0));
    println!("jailed/unjailed: {}", show(&ratios, 3));
    ratios.sort_by(f64::total_cmp);
    println!("median jailed/unjailed: {:.3}x", ratios[BATCHES / 2]);
}
