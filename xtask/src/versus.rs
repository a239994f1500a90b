//! `cargo xtask bench qemu`: splitvirt and Debian's QEMU/KVM side by side in one board run.
//! Both boot the same guest kernel and initramfs with the same devices on KVM inside the board,
//! in alternation, several rounds; the tables give each round's splitvirt/QEMU ratio and their
//! median. QEMU is Debian's arm64 build, unpacked from its packages into the board with every
//! shared library it needs (its own dependencies, resolved from the binaries' DT_NEEDED).

use crate::bench::{median, paired_row, IO_MIB, IO_SECONDS};
use crate::env::{self, cmd, root};
use crate::{arm64pkg, board, cross, guest};
use anyhow::{ensure, Context, Result};
use std::time::Duration;

/// Rounds of the side-by-side run unless `ROUNDS` says: each boots every VM of every test once.
const ROUNDS: usize = 3;

/// Debian's arm64 QEMU: the package whose /usr/bin/qemu-system-aarch64 the board runs.
const QEMU_PACKAGE: &str = "qemu-system-arm:arm64";

/// Debian's arm64 QEMU for the board, with every library it needs.
pub fn qemu_files() -> Result<board::Files> {
    arm64pkg::program_files(QEMU_PACKAGE, "usr/bin/qemu-system-aarch64")
}

/// splitvirt's placements in the I/O tests: (name in the board, what the table calls it).
const PLACEMENTS: [(&str, &str); 2] = [
    ("svin", "splitvirt, devices in-process"),
    ("svbe", "splitvirt, devices in the backend"),
];

/// The splitvirt descriptions the board's VMs boot.
fn descriptions() -> board::Files {
    let blk = |image: &str, placement: &str| {
        format!(
            "[[device]]\nkind = \"virtio-blk\"\nimage = \"{image}\"\nplacement = \"{placement}\"\n"
        )
    };
    let io = |image: &str, placement: &str| {
        format!(
            "{}[[device]]\nkind = \"virtio-net\"\nbackend = \"tap0\"\nplacement = \"{placement}\"\n\
             [[device]]\nkind = \"virtio-console\"\nplacement = \"{placement}\"\n",
            blk(image, placement)
        )
    };
    [
        ("bare", "device = []\n".to_owned()),
        ("disk", blk("/tmp/boot.raw", "backend")),
        ("io-svin", io("/tmp/io.raw", "in-process")),
        ("io-svbe", io("/tmp/io.raw", "backend")),
        ("ioq-svin", io("/tmp/io.qcow2", "in-process")),
        ("ioq-svbe", io("/tmp/io.qcow2", "backend")),
    ]
    .into_iter()
    .map(|(n, t)| (format!("guest/{n}.toml"), t.into_bytes()))
    .collect()
}

/// QEMU's device tree: splitvirt's description of QEMU's virt machine (tests/boot/qemu-virt.toml,
/// the devices at the slots QEMU is given), so that QEMU's devices bounce through a restricted
/// DMA pool as splitvirt's do.
fn qemu_dtb() -> Result<Vec<u8>> {
    let out = root().join("target/board/qemu-virt.dtb");
    env::run(
        cmd(env::splitvirt()?)
            .args(["dtb", "--config"])
            .arg(root().join("tests/boot/qemu-virt.toml"))
            .arg("-o")
            .arg(&out),
    )?;
    Ok(std::fs::read(&out)?)
}

/// The tests `bench qemu` can run, in the order it runs them (`TESTS` chooses some).
const TESTS: [&str; 4] = ["quiet", "verbose", "io", "ioq"];

/// `cargo xtask bench qemu`: every test, or those `TESTS` names. `boot_only` (`bench
/// qemu-boot`): the quiet and verbose boots alone, a fraction of the time.
pub fn run(boot_only: bool) -> Result<()> {
    let chosen = if boot_only {
        vec!["quiet", "verbose"]
    } else {
        crate::bench::env_subset("TESTS", &TESTS)?
    };
    let n_rounds = crate::bench::env_rounds(ROUNDS)?;
    let tests = chosen.join(" ");
    let has = |t: &str| chosen.contains(&t);
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let boot = dir.join("vs-boot.cpio");
    guest::initramfs("boot-times", &[], &boot)?;
    // The I/O VMs' kernel, iobench initramfs (guest/initrd.cpio) and TAP module: bench io's.
    let mut files = crate::bench::io_files()?;
    files.extend(descriptions());
    files.extend([
        ("guest/boot.cpio".to_owned(), std::fs::read(&boot)?),
        ("guest/qemu-virt.dtb".to_owned(), qemu_dtb()?),
        ("stamp".to_owned(), guest::tool("stamp")?),
        ("guest/empty.qcow2".to_owned(), empty_qcow2()?),
    ]);
    for m in [
        "drivers/net/tap",
        "drivers/vhost/vhost_iotlb",
        "drivers/vhost/vhost",
        "drivers/vhost/vhost_net",
    ] {
        let name = m.rsplit('/').next().unwrap_or(m);
        files.push((format!("{name}.ko"), board::module(&format!("{m}.ko"))?));
    }
    files.extend(qemu_files()?);
    // Build the aarch64 splitvirt before the board's clock starts (run_as builds it too).
    cross::splitvirt()?;
    let r = board::run(
        "bench-qemu",
        &[
            ("ROUNDS", &n_rounds.to_string()),
            ("TESTS", &tests),
            // TRACE=faults: each boot's stage-2 faults and exits (guest/board/lib.sh).
            ("TRACE", &std::env::var("TRACE").unwrap_or_default()),
        ],
        files,
        Duration::from_secs(5400),
    )?;
    let log = r.log_path.display();
    ensure!(!r.timed_out, "the board timed out (log: {log})");
    let value = |part: &str, key: &str| -> Result<f64> {
        r.part(part)
            .value(key)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("the board's {part} printed no {key} (log: {log})"))
    };
    let rounds = |test: &str, vmm: &str, key: &str| -> Result<Vec<f64>> {
        (1..=n_rounds)
            .map(|i| value(&format!("{test}-{vmm}{i}"), key))
            .collect()
    };
    println!(
        "\nsplitvirt vs QEMU/KVM ({}) in one board run: the same kernel, initramfs and devices, \
         {n_rounds} rounds in rotation; ratios are splitvirt/QEMU per round (times: below 1 is \
         faster; rates: above 1 is faster)",
        qemu_version(&r.log)
    );
    let width = 24;
    let header = |what: &str| {
        println!(
            "\n{what}\n{:>22} {:>width$} {:>width$} {:>width$} {:>8}",
            "", "splitvirt rounds", "QEMU rounds", "splitvirt/QEMU", "median"
        )
    };
    let compare_with = |test: &str, sv: &str, qemu: &str, rows: &[(&str, &str)]| -> Result<()> {
        for (what, key) in rows {
            let (a, b) = (rounds(test, sv, key)?, rounds(test, qemu, key)?);
            let ratios: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x / y).collect();
            paired_row(what, width, &a, &b, ratios);
        }
        Ok(())
    };
    let compare =
        |test: &str, sv: &str, rows: &[(&str, &str)]| compare_with(test, sv, "qemu", rows);
    if has("quiet") {
        header("`quiet`, no PCI devices (splitvirt: huge-page RAM, hugetlb pool; QEMU: THP RAM)");
        compare(
            "quiet",
            "svbe",
            &[
                ("start→init ms", "marker_ms"),
                ("start→off ms", "exit_ms"),
                ("kernel boot s", "kernel_boot_s"),
                ("uptime@init s", "up"),
                ("VMM RSS KiB", "vmm_rss_kib"),
            ],
        )?;
        start_phases(&r, n_rounds)?;
    }
    if has("verbose") {
        header("verbose console, one virtio-blk (splitvirt: in the backend)");
        compare(
            "verbose",
            "svbe",
            &[
                ("start→init ms", "marker_ms"),
                ("kernel boot s", "kernel_boot_s"),
                ("blk probe ms", "probe_ms"),
                ("uptime@init s", "up"),
            ],
        )?;
    }
    let io_rows = [
        ("seq write MB/s", "seq_write_mbps"),
        ("seq read MB/s", "seq_read_mbps"),
        ("4K rand rd IOPS", "rand_read_iops"),
        ("4K rand wr IOPS", "rand_write_iops"),
        ("TCP MB/s", "tcp_mbps"),
        ("TCP RR µs", "tcp_rr_us"),
    ];
    if has("io") {
        for (vmm, title) in PLACEMENTS {
            header(&format!(
                "I/O: raw virtio-blk, TAP virtio-net, virtio-console; {title} (QEMU: aio=threads, \
                 cache=none, no vhost-net; {IO_MIB} MiB sequential, {IO_SECONDS} s random)"
            ));
            compare("io", vmm, &io_rows)?;
        }
        for (vmm, title) in PLACEMENTS {
            header(&format!(
                "TCP against QEMU with vhost-net (the same runs of {title})"
            ));
            compare_with("io", vmm, "qemuvh", &io_rows[4..])?;
        }
    }
    if has("ioq") {
        for (vmm, title) in PLACEMENTS {
            header(&format!("I/O: qcow2 virtio-blk; {title}"));
            compare("ioq", vmm, &io_rows[..4])?;
        }
    }
    if has("quiet") {
        let rss = rounds("quiet", "svbe", "vmm_rss_kib")?;
        println!(
            "\nsplitvirt's RSS outside guest RAM, median {:.0} KiB (the issue's goal: ≤ 5120 KiB)",
            median(rss)
        );
    }
    Ok(())
}

/// Where splitvirt's own start goes in the quiet boots: the medians of its `--stats` phases
/// (ms from `main`, each phase's end), and of its first `KVM_RUN`.
fn start_phases(r: &crate::qemu::Run, rounds: usize) -> Result<()> {
    let mut phases: Vec<(String, Vec<f64>)> = Vec::new();
    for i in 1..=rounds {
        let part = r.part(&format!("quiet-svbe{i}"));
        let stats = part
            .log
            .lines()
            .find(|l| l.contains("splitvirt-stats:"))
            .with_context(|| {
                format!(
                    "quiet round {i}: no stats line (log: {})",
                    r.log_path.display()
                )
            })?;
        let word = |key: &str| crate::bench::word(stats, key).unwrap_or_default();
        let listed = word("start_ms")
            .split(',')
            .filter_map(|p| p.split_once(':'));
        for (name, ms) in listed.chain([("first KVM_RUN", word("first_run_ms"))]) {
            let ms: f64 = ms.parse().unwrap_or(f64::NAN);
            match phases.iter_mut().find(|(n, _)| n == name) {
                Some((_, v)) => v.push(ms),
                None => phases.push((name.to_owned(), vec![ms])),
            }
        }
    }
    let cells: Vec<String> = phases
        .into_iter()
        .map(|(n, v)| format!("{n} {:.0}", median(v)))
        .collect();
    println!(
        "\nsplitvirt's own start, quiet boots (ms from main at each step's end, medians): {}",
        cells.join(" · ")
    );
    Ok(())
}

/// An empty 256 MiB qcow2 image (each qcow2 run starts from a copy).
fn empty_qcow2() -> Result<Vec<u8>> {
    env::ensure_apt(&["qemu-utils"])?;
    let path = root().join("target/board/empty.qcow2");
    let _ = std::fs::remove_file(&path);
    env::run(
        cmd("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg("256M"),
    )?;
    Ok(std::fs::read(&path)?)
}

/// QEMU's version as it printed it in the board.
fn qemu_version(log: &str) -> String {
    log.lines()
        .find_map(|l| l.split("QEMU emulator version ").nth(1))
        .map_or("version unknown".to_owned(), |v| v.trim().to_owned())
}
