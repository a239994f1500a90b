//! `cargo xtask bench boot`: boot timings and splitvirt's own memory; `cargo xtask bench io`:
//! virtio-blk throughput and IOPS (raw and qcow2) and TCP over virtio-net. Both measured on KVM
//! inside the board and printed as a table (benchmarks, never pass/fail tests).

use crate::env::root;
use crate::{board, guest, kernel};
use anyhow::{ensure, Context, Result};
use std::time::Duration;

/// Rounds of `bench boot` (six boots each; one round per order of the three kinds).
const RUNS: usize = 3;

fn field(line: &str, key: &str) -> Option<u64> {
    word(line, key)?.parse().ok()
}

/// The value of `key=VALUE` among `line`'s words (a `splitvirt-stats:` line's).
pub(crate) fn word<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// `HALT_POLL_US=N` of a bench's environment: its VMs' `halt_poll_us` (None: unset, the
/// host's default).
pub(crate) fn halt_poll_us() -> Result<Option<u32>> {
    env_us("HALT_POLL_US")
}

/// A bench's environment variable `name` that gives microseconds (None: unset).
pub(crate) fn env_us(name: &str) -> Result<Option<u32>> {
    std::env::var(name)
        .ok()
        .map(|us| {
            us.parse()
                .with_context(|| format!("{name}={us}: microseconds, a number"))
        })
        .transpose()
}

/// The middle value (the mean of the middle two for an even count; NaN for none).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The guest kernel's own clock (seconds) at "Freeing unused kernel memory", the end of its
/// boot before init, from its console.
fn kernel_boot_s(log: &str) -> Option<f64> {
    let l = log
        .lines()
        .find(|l| l.contains("Freeing unused kernel memory"))?;
    let stamp = l.split('[').nth(1)?.split(']').next()?;
    stamp.trim().parse().ok()
}

pub fn boot() -> Result<()> {
    let k = kernel::build(kernel::Role::Driver)?;
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("quick.cpio");
    guest::initramfs("quick", &[], &initrd)?;
    let console = "[[device]]\nkind = \"virtio-console\"\n";
    let files = vec![
        ("guest/huge.toml".to_owned(), console.as_bytes().to_vec()),
        (
            "guest/small.toml".to_owned(),
            format!("[memory]\nhuge_pages = false\n{console}").into_bytes(),
        ),
        ("guest/Image".to_owned(), std::fs::read(&k.image)?),
        ("guest/initrd.cpio".to_owned(), std::fs::read(&initrd)?),
    ];
    let runs = RUNS.to_string();
    let r = board::run(
        "bench-boot",
        &[("RUNS", &runs)],
        files,
        Duration::from_secs(1800),
    )?;
    ensure!(
        !r.timed_out,
        "the board timed out (log: {})",
        r.log_path.display()
    );
    println!(
        "\nsplitvirt boot on KVM inside the board ({RUNS} rounds; the board is TCG-emulated arm64; \
         guest RAM on transparent huge pages and on 4 KiB pages, and huge pages with 40 hugetlb \
         pages reserved for the pool; in rotation; a verbose console and `quiet`)"
    );
    println!(
        "{:>5} {:>6} {:>8} {:>14} {:>13} {:>9} {:>13} {:>14} {:>15} {:>12}",
        "round",
        "pages",
        "console",
        "1st KVM_RUN ms",
        "1st output ms",
        "init ms",
        "power-off ms",
        "kernel boot s",
        "uptime @init s",
        "own RSS KiB"
    );
    // (pages, console) -> per round: (init ms, power-off ms, kernel boot s, uptime s).
    let mut got: std::collections::HashMap<(&str, &str), Vec<[f64; 4]>> = Default::default();
    let num = |v: Option<u64>| v.map_or(f64::NAN, |v| v as f64);
    for i in 1..=RUNS {
        for kind in ["huge", "small", "hugetlb"] {
            for talk in ["verbose", "quiet"] {
                let p = r.part(&format!("{kind}-{talk}{i}"));
                let stats = p
                    .log
                    .lines()
                    .find(|l| l.contains("splitvirt-stats:"))
                    .unwrap_or_default()
                    .to_owned();
                ensure!(
                    field(&stats, "end_ms").is_some(),
                    "{kind} {talk} round {i} printed no stats line (log: {})",
                    r.log_path.display()
                );
                let f = |k: &str| field(&stats, k);
                let up: f64 = p
                    .value("up")
                    .and_then(|u| u.parse().ok())
                    .unwrap_or(f64::NAN);
                let kb = kernel_boot_s(&p.log).unwrap_or(f64::NAN);
                let row = [num(f("init_ms")), num(f("end_ms")), kb, up];
                got.entry((kind, talk)).or_default().push(row);
                let pages = match kind {
                    "huge" => "2 MiB",
                    "small" => "4 KiB",
                    _ => "+pool",
                };
                let show = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
                println!(
                    "{i:>5} {pages:>6} {talk:>8} {:>14} {:>13} {:>9} {:>13} {kb:>14.2} {up:>15.2} {:>12}",
                    show(f("first_run_ms")),
                    show(f("first_console_ms")),
                    show(f("init_ms")),
                    show(f("end_ms")),
                    show(f("own_rss_kib"))
                );
            }
        }
    }
    for (a, b, title) in [
        ("huge", "small", "huge pages / 4 KiB pages"),
        (
            "hugetlb",
            "huge",
            "pool on hugetlb pages / pool on 4 KiB pages",
        ),
    ] {
        for (talk, what, col) in [
            ("verbose", "time to init (splitvirt's clock)", 0usize),
            ("verbose", "guest kernel's own boot", 2),
            ("verbose", "guest uptime at init", 3),
            ("quiet", "start to power-off", 1),
            ("quiet", "guest uptime at init", 3),
        ] {
            let get =
                |kind: &str| -> Vec<f64> { got[&(kind, talk)].iter().map(|r| r[col]).collect() };
            let ratios: Vec<f64> = get(a).iter().zip(get(b)).map(|(h, s)| h / s).collect();
            println!(
                "{talk}, {what}: {title} per round {}; median {:.2}x",
                ratios
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                median(ratios.clone())
            );
        }
    }
    Ok(())
}

/// MiB moved by each sequential test and the TCP transfer; seconds of random reads.
pub(crate) const IO_MIB: &str = "64";
pub(crate) const IO_SECONDS: &str = "10";

/// What every I/O benchmark VM boots: the driver kernel, the iobench initramfs, and the TAP
/// module for the board.
pub(crate) fn io_files() -> Result<board::Files> {
    let k = kernel::build(kernel::Role::Driver)?;
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("bench-io.cpio");
    guest::initramfs_with(
        "bench-io-guest",
        &[("IOB_MIB", IO_MIB), ("IOB_SECONDS", IO_SECONDS)],
        &[("iobench", guest::tool("iobench")?)],
        &initrd,
    )?;
    Ok(vec![
        ("tun.ko".to_owned(), board::module("drivers/net/tun.ko")?),
        ("guest/Image".to_owned(), std::fs::read(&k.image)?),
        ("guest/initrd.cpio".to_owned(), std::fs::read(&initrd)?),
    ])
}

/// A benchmark VM: a raw or qcow2 disk, a TAP and a console, all placed `placement`, with
/// `backend` as its `[backend]` table.
fn io_vm(image: &str, placement: &str, backend: &str) -> Vec<u8> {
    format!(
        "{backend}\n[[device]]\nkind = \"virtio-blk\"\nimage = \"{image}\"\nplacement = \"{placement}\"\n\
         [[device]]\nkind = \"virtio-net\"\nbackend = \"tap0\"\nplacement = \"{placement}\"\n\
         [[device]]\nkind = \"virtio-console\"\nplacement = \"{placement}\"\n"
    )
    .into_bytes()
}

pub fn io() -> Result<()> {
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let qcow2 = dir.join("bench.qcow2");
    crate::env::ensure_apt(&["qemu-utils"])?;
    crate::env::run(
        crate::env::cmd("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&qcow2)
            .arg("256M"),
    )?;
    // Each disk format with the devices in splitvirt's process and in the backend process.
    let runs = [
        ("raw-inproc", "/tmp/bench.raw", "in-process"),
        ("raw-backend", "/tmp/bench.raw", "backend"),
        ("qcow2-inproc", "/tmp/bench.qcow2", "in-process"),
        ("qcow2-backend", "/tmp/bench.qcow2", "backend"),
    ];
    let mut files: board::Files = runs
        .iter()
        .map(|(name, image, placement)| {
            (
                format!("guest/bench-{name}.toml"),
                io_vm(image, placement, ""),
            )
        })
        .collect();
    // The A/B VM: one disk in each place (`AB_DISKS`).
    files.push((
        "guest/bench-ab.toml".to_owned(),
        format!("{AB_DISKS}[[device]]\nkind = \"virtio-console\"\nplacement = \"in-process\"\n")
            .into_bytes(),
    ));
    files.push(("tmp/bench.qcow2".to_owned(), std::fs::read(&qcow2)?));
    files.extend(io_files()?);
    let mut names: Vec<&str> = runs.iter().map(|r| r.0).collect();
    names.push("ab");
    let r = board::run(
        "bench-io",
        &[("RUNS", &names.join(" "))],
        files,
        Duration::from_secs(3000),
    )?;
    ensure!(
        !r.timed_out,
        "the board timed out (log: {})",
        r.log_path.display()
    );
    println!(
        "\nsplitvirt virtio I/O on KVM inside the board (TCG-emulated arm64; {IO_MIB} MiB sequential, {IO_SECONDS} s random)"
    );
    println!(
        "{:>14} {:>16} {:>16} {:>16} {:>14}",
        "disk, devices", "seq write MB/s", "seq read MB/s", "4K rand IOPS", "TCP MB/s"
    );
    let mut table = Vec::new();
    for name in &names[..runs.len()] {
        let p = r.part(name);
        let v = |k: &str| p.value(k).and_then(|v| v.parse::<f64>().ok());
        ensure!(
            v("seq_read_mbps").is_some(),
            "the {name} run printed no results (log: {})",
            r.log_path.display()
        );
        let row = [
            v("seq_write_mbps"),
            v("seq_read_mbps"),
            v("rand_read_iops"),
            v("tcp_mbps"),
        ];
        let cell = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.1}"));
        println!(
            "{name:>14} {:>16} {:>16} {:>16} {:>14}",
            cell(row[0]),
            cell(row[1]),
            cell(row[2]),
            cell(row[3])
        );
        table.push(row);
    }
    // Backend over in-process, per format: the ratios issue 6 sets goals for.
    for (i, fmt) in ["raw", "qcow2"].iter().enumerate() {
        let (a, b) = (table[2 * i], table[2 * i + 1]);
        let ratio = |k: usize| match (a[k], b[k]) {
            (Some(x), Some(y)) if x > 0.0 => format!("{:.2}x", y / x),
            _ => "-".into(),
        };
        println!(
            "{:>14} {:>16} {:>16} {:>16} {:>14}",
            format!("{fmt} backend/in"),
            ratio(0),
            ratio(1),
            ratio(2),
            ratio(3)
        );
    }
    ab_table(&r.part("ab"), &r.log_path)
}

/// Rounds of the A/B run (guest/scenarios/bench-io-guest.sh runs as many).
const AB_ROUNDS: usize = 5;

/// The A/B VM's disks: one in splitvirt's process, one in the backend, of different sizes
/// (96 and 128 MiB) so that the guest's vda and vdb can be told apart.
const AB_DISKS: &str = "[[device]]\nkind = \"virtio-blk\"\nimage = \"/tmp/ab-in.raw\"\n\
    placement = \"in-process\"\n[[device]]\nkind = \"virtio-blk\"\nimage = \"/tmp/ab-backend.raw\"\n\
    placement = \"backend\"\n";

/// The A/B run: in-process (vda) and backend (vdb) disks of one VM, read in alternation.
fn ab_table(p: &crate::qemu::Run, log: &std::path::Path) -> Result<()> {
    let log = log.display();
    ensure!(
        p.value("vda_sectors") == Some("196608") && p.value("vdb_sectors") == Some("262144"),
        "A/B run: vda {:?} and vdb {:?} sectors, want the 96 MiB in-process disk as vda and the \
         128 MiB backend disk as vdb (log: {log})",
        p.value("vda_sectors"),
        p.value("vdb_sectors")
    );
    println!("\nA/B in one VM: raw disks, in-process (vda) and backend (vdb), read in alternation");
    disk_pair_rows(p, "vda", "vdb", &log)
}

/// Sequential and random reads of disks `left` and `right` of one VM, round by round: each
/// round's disks ran seconds apart, so they are compared within rounds.
fn disk_pair_rows(
    p: &crate::qemu::Run,
    left: &str,
    right: &str,
    log: &dyn std::fmt::Display,
) -> Result<()> {
    pair_rows(
        p,
        left,
        right,
        &[
            ("seq read MB/s", "seq_read_mbps"),
            ("4K rand IOPS", "rand_read_iops"),
        ],
        log,
    )
}

/// Rows of `measures` (title, value key) for the paired rounds of `left` and `right`.
fn pair_rows(
    p: &crate::qemu::Run,
    left: &str,
    right: &str,
    measures: &[(&str, &str)],
    log: &dyn std::fmt::Display,
) -> Result<()> {
    let nums =
        |k: &str| -> Vec<f64> { p.values(k).iter().filter_map(|v| v.parse().ok()).collect() };
    println!(
        "{:>16} {:>34} {:>34} {:>34} {:>8}",
        "",
        format!("{left} rounds"),
        format!("{right} rounds"),
        format!("{right}/{left} per round"),
        "median"
    );
    for &(what, key) in measures {
        let (a, b) = (
            nums(&format!("{left} {key}")),
            nums(&format!("{right} {key}")),
        );
        ensure!(
            a.len() == AB_ROUNDS && b.len() == AB_ROUNDS && a.iter().all(|x| *x > 0.0),
            "{} and {} rounds of {key}, want {AB_ROUNDS} each (log: {log})",
            a.len(),
            b.len()
        );
        let ratios: Vec<f64> = a.iter().zip(&b).map(|(x, y)| y / x).collect();
        paired_row(what, 34, &a, &b, ratios);
    }
    Ok(())
}

/// `cargo xtask bench vhost`: one VM whose three raw disks its guest reads in rotation (five
/// rounds): vda in splitvirt's process, vdb in the backend process, vdc served by Debian's
/// qemu-storage-daemon over vhost-user; per-round ratios and medians of each pair.
pub fn vhost() -> Result<()> {
    let mut files = io_files()?;
    files.push((
        "guest/bench-abc.toml".to_owned(),
        format!(
            "{AB_DISKS}[[device]]\nkind = \"vhost-user\"\nsocket = \"/tmp/vhost-abc.sock\"\n\
             device = \"blk\"\n\
             [[device]]\nkind = \"vhost-user\"\nsocket = \"/tmp/vhost-fsblk.sock\"\n\
             device = \"blk\"\n\
             [[device]]\nkind = \"vhost-user\"\nsocket = \"/tmp/vhost-fs.sock\"\n\
             device = \"fs\"\n"
        )
        .into_bytes(),
    ));
    // One 64 MiB file of random bytes: shared by virtiofsd, and in an ext4 partition.
    let big: Vec<u8> = {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..FILE_MIB << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let img = root().join("target/board/bench-fs.img");
    guest::disk(&[("big.bin", big.as_slice())], &img, 2 * (FILE_MIB << 11))?;
    files.push(("guest/bench-fs.img".to_owned(), std::fs::read(&img)?));
    files.push(("guest/big.bin".to_owned(), big));
    files.extend(crate::kvmvhost::qsd_files()?);
    files.extend(crate::kvmvhost::virtiofsd_files()?);
    let r = board::run("bench-vhost", &[], files, Duration::from_secs(3000))?;
    let log = r.log_path.display();
    ensure!(!r.timed_out, "the board timed out (log: {log})");
    ensure!(
        r.outer().passed("qsd_started"),
        "qemu-storage-daemon did not start (log: {log})"
    );
    let p = r.part("abc");
    // Told apart by their sizes: 96, 128 and 160 MiB.
    for (disk, sectors) in [("vda", "196608"), ("vdb", "262144"), ("vdc", "327680")] {
        ensure!(
            p.value(&format!("{disk}_sectors")) == Some(sectors),
            "{disk} has {:?} sectors, want {sectors} (log: {log})",
            p.value(&format!("{disk}_sectors"))
        );
    }
    for (title, left, right) in [
        ("backend (vdb) / in-process (vda)", "vda", "vdb"),
        (
            "vhost-user, qemu-storage-daemon (vdc) / in-process (vda)",
            "vda",
            "vdc",
        ),
        ("vhost-user (vdc) / backend (vdb)", "vdb", "vdc"),
    ] {
        println!("\n{title}, raw disks of one VM read in rotation");
        disk_pair_rows(&p, left, right, &log)?;
    }
    ensure!(
        p.passed("fs_bench_mounts"),
        "the guest could not mount vdd2 and the virtio-fs share (log: {log})"
    );
    let sums: std::collections::BTreeSet<&str> = ["blk", "fs"]
        .iter()
        .flat_map(|m| p.values(&format!("{m} file_read_sum")))
        .collect();
    ensure!(
        sums.len() == 1 && p.values("fs file_read_sum").len() == AB_ROUNDS,
        "the file read over virtio-fs and from ext4 on virtio-blk differs or is missing: \
         {sums:?} (log: {log})"
    );
    println!(
        "\nvirtio-fs (virtiofsd) / ext4 on vhost-user-blk (qemu-storage-daemon), \
         a {FILE_MIB} MiB file, page cache emptied, in alternation"
    );
    pair_rows(&p, "blk", "fs", &[("file MB/s", "file_read_mbps")], &log)?;
    Ok(())
}

/// The file `bench vhost` reads over virtio-fs and from ext4 on virtio-blk, in MiB.
const FILE_MIB: u64 = 64;

/// Jailed and unjailed rounds of `bench jail`, in alternation.
const JAIL_ROUNDS: usize = 4;

/// `cargo xtask bench jail`: the same VM (raw disk, TAP, console, all in the backend) with the
/// backend jailed and with `[backend] jail = false`, in alternating rounds, as a table of
/// per-round ratios and their medians.
pub fn jail() -> Result<()> {
    syscalls()?;
    println!("==> 64 KiB requests through the real backend process, jailed and not: natively");
    crate::env::run(crate::env::cargo().args([
        "test",
        "--quiet",
        "--release",
        "-p",
        "splitvirt",
        "--test",
        "backend",
        "bench_jailed_and_unjailed_io",
        "--",
        "--ignored",
        "--nocapture",
    ]))?;
    jail_vms()
}

/// `cargo xtask bench syscall`: what the jail adds to the data path, its system call filter,
/// measured alone, natively and in the board.
pub fn syscalls() -> Result<()> {
    println!("==> the system calls of one backend op, jailed and not: natively (x86_64)");
    crate::env::run(crate::env::cargo().args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "backend",
        "--example",
        "syscall_cost",
    ]))?;
    let exe = crate::cross::example("backend", "syscall_cost")?;
    let r = board::run(
        "bench-syscall",
        &[],
        vec![("syscall_cost".to_owned(), std::fs::read(&exe)?)],
        Duration::from_secs(900),
    )?;
    ensure!(
        !r.timed_out && r.log.matches("median floor/plain").count() == 2,
        "the board printed no syscall table (log: {})",
        r.log_path.display()
    );
    println!("==> inside the board (TCG-emulated arm64)");
    let mut tables = 0;
    for l in r
        .log
        .lines()
        .skip_while(|l| !l.contains("system calls of one"))
    {
        println!("{}", l.trim_end());
        tables += usize::from(l.contains("median floor/plain"));
        if tables == 2 {
            break;
        }
    }
    Ok(())
}

/// The whole-VM rounds of `bench jail`.
fn jail_vms() -> Result<()> {
    let mut files = io_files()?;
    let mut names = Vec::new();
    for round in 1..=JAIL_ROUNDS {
        let mut pair = [("jailed", ""), ("unjailed", "[backend]\njail = false")];
        // Which goes first alternates: the first of a pair follows the other kind's VM.
        if round % 2 == 0 {
            pair.reverse();
        }
        for (kind, table) in pair {
            let name = format!("{kind}-{round}");
            files.push((
                format!("guest/bench-{name}.toml"),
                io_vm("/tmp/bench.raw", "backend", table),
            ));
            names.push(name);
        }
    }
    let r = board::run(
        "bench-io",
        &[("RUNS", &names.join(" "))],
        files,
        Duration::from_secs(3000),
    )?;
    let log = r.log_path.display();
    ensure!(!r.timed_out, "the board timed out (log: {log})");
    println!(
        "\nthe backend jailed vs unjailed ([backend] jail = false), one VM at a time, alternating \
         (raw disk, TAP, console in the backend; {IO_MIB} MiB sequential, {IO_SECONDS} s random)"
    );
    println!(
        "{:>16} {:>26} {:>26} {:>26} {:>8}",
        "", "jailed rounds", "unjailed rounds", "jailed/unjailed", "median"
    );
    for (what, key) in [
        ("seq write MB/s", "seq_write_mbps"),
        ("seq read MB/s", "seq_read_mbps"),
        ("4K rand IOPS", "rand_read_iops"),
        ("TCP MB/s", "tcp_mbps"),
    ] {
        let value = |name: &str| -> Result<f64> {
            r.part(name)
                .value(key)
                .and_then(|v| v.parse().ok())
                .filter(|v: &f64| *v > 0.0)
                .ok_or_else(|| anyhow::anyhow!("the {name} run printed no {key} (log: {log})"))
        };
        let (mut jailed, mut free) = (Vec::new(), Vec::new());
        for round in 1..=JAIL_ROUNDS {
            jailed.push(value(&format!("jailed-{round}"))?);
            free.push(value(&format!("unjailed-{round}"))?);
        }
        let ratios: Vec<f64> = jailed.iter().zip(&free).map(|(j, u)| j / u).collect();
        paired_row(what, 26, &jailed, &free, ratios);
    }
    Ok(())
}

/// One row of a table of paired rounds: `what`, each side's rounds, the per-round `ratios`
/// and their median (of the middle two for an even count), columns `width` wide.
pub(crate) fn paired_row(what: &str, width: usize, left: &[f64], right: &[f64], ratios: Vec<f64>) {
    let show = |v: &[f64], d: usize| {
        v.iter()
            .map(|x| format!("{x:.d$}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let per_round = show(&ratios, 2);
    let median = median(ratios);
    println!(
        "{what:>16} {:>width$} {:>width$} {per_round:>width$} {median:>7.2}x",
        show(left, 1),
        show(right, 1)
    );
}

/// `cargo xtask bench rpc`: the round-trip table natively, then inside the board (arm64).
pub fn rpc() -> Result<()> {
    println!("==> natively (x86_64)");
    crate::env::run(crate::env::cargo().args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "rpc",
        "--example",
        "roundtrip",
    ]))?;
    let exe = crate::cross::example("rpc", "roundtrip")?;
    let files = vec![("roundtrip".to_owned(), std::fs::read(&exe)?)];
    let r = board::run("bench-rpc", &[], files, Duration::from_secs(900))?;
    ensure!(
        !r.timed_out && r.log.contains("jailed / unjailed backend"),
        "the board run printed no table (log: {})",
        r.log_path.display()
    );
    println!("==> inside the board (TCG-emulated arm64, 2 vCPUs)");
    for l in r.log.lines().skip_while(|l| !l.contains("RPC round trip")) {
        println!("{}", l.trim_end());
        if l.contains("jailed / unjailed backend") {
            break;
        }
    }
    Ok(())
}

/// The items an environment variable names (`var`, words separated by spaces), each one of
/// `all`, in `all`'s order; `all` where it is unset.
pub fn env_subset(var: &str, all: &[&'static str]) -> Result<Vec<&'static str>> {
    let Ok(asked) = std::env::var(var) else {
        return Ok(all.to_vec());
    };
    let words: Vec<&str> = asked.split_whitespace().collect();
    if let Some(bad) = words.iter().find(|w| !all.contains(w)) {
        anyhow::bail!(
            "{var}={asked:?}: {bad:?} is not one of {}; name some of them, or unset {var} for all",
            all.join(" ")
        );
    }
    anyhow::ensure!(
        !words.is_empty(),
        "{var} is empty; name some of {}, or unset it for all",
        all.join(" ")
    );
    Ok(all.iter().copied().filter(|t| words.contains(t)).collect())
}

/// Rounds of a side-by-side bench: `ROUNDS` from the environment (1 to 10), or `default`.
pub fn env_rounds(default: usize) -> Result<usize> {
    match std::env::var("ROUNDS") {
        Ok(n) => n
            .parse()
            .ok()
            .filter(|n| (1..=10).contains(n))
            .ok_or_else(|| anyhow::anyhow!("ROUNDS={n}: a number from 1 to 10")),
        Err(_) => Ok(default),
    }
}
