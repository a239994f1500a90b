//! `cargo xtask bench jail`: what the jail costs the backend on its data path. The jail adds
//! nothing to a request but its system call filter (namespaces, ids and limits cost nothing
//! once set), so this measures the system calls a request makes, in three kinds of process,
//! in batches whose order rotates: jailed with the virtio-blk policy; jailed with a filter of
//! one instruction that allows everything (the floor: what any filter costs, the kernel's
//! slower system call entry); and neither. Per op an eventfd write and read (a doorbell rung
//! and taken) and a 4 KiB pread (a disk read); apart, a 64 KiB pwrite into a file on the
//! host's file system opened before the jail, as a disk image is. Prints ns per op per batch,
//! the per-batch ratios to the unjailed process and their medians.
//!
//! `syscall_cost [OPS]`: OPS ops per batch (default 200 000) and a tenth as many writes. The
//! measuring side is this same program, started as `child KIND FILE OPS`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Instant;

const OPS: u32 = 200_000;
const BATCHES: usize = 9;
const KINDS: [&str; 3] = ["jailed", "floor", "plain"];

fn child(kind: &str, image: &str, ops: u32) {
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .expect("the image file");
    // Made before the policy: it allows no new descriptor.
    // SAFETY: eventfd and memfd_create return new descriptors we own; ftruncate sizes ours.
    let (bell, file) = unsafe {
        let e = libc::eventfd(0, libc::EFD_CLOEXEC);
        let m = libc::memfd_create(c"cost".as_ptr(), libc::MFD_CLOEXEC);
        assert!(e >= 0 && m >= 0 && libc::ftruncate(m, 1 << 20) == 0);
        (OwnedFd::from_raw_fd(e), OwnedFd::from_raw_fd(m))
    };
    if kind != "plain" {
        backend::jail::enter(backend::jail::ids_for(backend::jail::ROOT_DEFAULT))
            .expect("the jail");
    }
    match kind {
        "jailed" => backend::policy::install(backend::policy::Needs {
            disk: true,
            socket_console: false,
        })
        .expect("the policy"),
        "floor" => backend::policy::allow_all().expect("the floor filter"),
        _ => {}
    }
    let mut buf = vec![0u8; 4096];
    let one = 1u64;
    let mut got = 0u64;
    let t = Instant::now();
    for i in 0..ops {
        // SAFETY: plain reads and writes into our own buffers on our own descriptors.
        unsafe {
            libc::write(bell.as_raw_fd(), (&one as *const u64).cast(), 8);
            libc::read(bell.as_raw_fd(), (&mut got as *mut u64).cast(), 8);
            let off = i64::from(i % 256) * 4096;
            libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), 4096, off);
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(ops);
    let block = vec![7u8; 65536];
    let t = Instant::now();
    for i in 0..ops / 10 {
        // The same 15 blocks over and over, as the whole-path bench writes them.
        std::os::unix::fs::FileExt::write_at(&image, &block, u64::from(i % 15) * 65536)
            .expect("pwrite");
    }
    let write_ns = t.elapsed().as_nanos() as f64 / f64::from(ops / 10);
    println!("{ns:.1} {write_ns:.1}");
}

/// (ns per doorbell + pread op, ns per 64 KiB pwrite) of one child.
fn batch(kind: &str, image: &std::path::Path, ops: u32) -> (f64, f64) {
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["child", kind])
        .arg(image)
        .arg(ops.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{kind}: {o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    let mut v = out.split_whitespace().map(|x| x.parse::<f64>().unwrap());
    (v.next().unwrap(), v.next().unwrap())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        return child(&args[2], &args[3], args[4].parse().expect("OPS"));
    }
    let ops = args
        .get(1)
        .map(|n| n.parse().expect("usage: syscall_cost [OPS]"))
        .unwrap_or(OPS);
    let image = std::env::temp_dir().join(format!("splitvirt-cost-{}.img", std::process::id()));
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("a scratch image in the temporary directory");
    // got[kind][batch]
    let mut got = vec![Vec::new(); KINDS.len()];
    for b in 0..BATCHES {
        // Which goes first rotates.
        for k in (0..KINDS.len()).map(|k| (k + b) % KINDS.len()) {
            got[k].push(batch(KINDS[k], &image, ops));
        }
    }
    let _ = std::fs::remove_file(&image);
    let show = |v: &[f64], d: usize| {
        v.iter()
            .map(|x| format!("{x:.d$}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let table = |title: &str, pick: fn(&(f64, f64)) -> f64| {
        println!("{title}");
        let plain: Vec<f64> = got[2].iter().map(pick).collect();
        for (k, name) in KINDS.iter().enumerate() {
            println!(
                "{name:>7}: {}",
                show(&got[k].iter().map(pick).collect::<Vec<_>>(), 0)
            );
        }
        for (k, name) in KINDS.iter().enumerate().take(2) {
            let mut r: Vec<f64> = got[k]
                .iter()
                .map(pick)
                .zip(&plain)
                .map(|(j, p)| j / p)
                .collect();
            println!("{name:>7}/plain: {}", show(&r, 3));
            r.sort_by(f64::total_cmp);
            println!("median {name}/plain: {:.3}x", r[BATCHES / 2]);
        }
    };
    table(
        &format!("system calls of one backend op (eventfd write + read, 4 KiB pread), ns per op, {ops} ops per batch"),
        |b| b.0,
    );
    table(
        &format!(
            "64 KiB pwrite into a file opened before the jail, ns per write, {} per batch",
            ops / 10
        ),
        |b| b.1,
    );
}
