//! `cargo xtask bench qemu`: splitvirt and Debian's QEMU/KVM side by side in one board run.
//! Both boot the same guest kernel and initramfs with the same devices on KVM inside the board,
//! in alternation, several rounds; the tables give each round's splitvirt/QEMU ratio and their
//! median. QEMU is Debian's arm64 build, unpacked from its packages into the board with every
//! shared library it needs (its own dependencies, resolved from the binaries' DT_NEEDED).

use crate::bench::{median, paired_row, IO_MIB, IO_SECONDS};
use crate::env::{self, cmd, root};
use crate::{board, cross, guest};
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Rounds of the side-by-side run: each boots every VM of every test once.
const ROUNDS: usize = 3;

/// Debian's arm64 QEMU: the package whose /usr/bin/qemu-system-aarch64 the board runs.
const QEMU_PACKAGE: &str = "qemu-system-arm:arm64";

/// Where the multiarch libraries of an arm64 Debian system live (in a package and in the board).
const LIB_DIRS: [&str; 2] = ["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu"];

/// The shared libraries an ELF file names (DT_NEEDED).
fn needed(file: &Path) -> Result<Vec<String>> {
    let out = env::output(cmd("aarch64-linux-gnu-readelf").arg("-dW").arg(file))?;
    Ok(out
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.split(']').next()?.to_owned()))
        .collect())
}

/// `rel` inside the unpacked package `root`, following symbolic links inside the package
/// (absolute ones too: they mean the package's root, not this machine's).
fn inside(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut path = root.join(rel);
    for _ in 0..8 {
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !meta.file_type().is_symlink() {
            return Some(path);
        }
        let to = std::fs::read_link(&path).ok()?;
        path = match to.strip_prefix("/") {
            Ok(abs) => root.join(abs),
            Err(_) => path.parent()?.join(to),
        };
    }
    None
}

/// The arm64 library packages a package depends on (its direct Depends).
fn lib_depends(pkg: &str) -> Result<Vec<String>> {
    let out = env::output(cmd("apt-cache").args(["depends", pkg]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("lib") || p.starts_with("zlib"))
        .map(|p| {
            let p = p.trim_end_matches(":arm64");
            format!("{p}:arm64")
        })
        .collect())
}

/// Debian's arm64 QEMU for the board: /usr/bin/qemu-system-aarch64, the dynamic loader and
/// every shared library they need, at the paths a Debian system has them. Packages are
/// fetched as they are needed: first QEMU's own, then the libraries its packages depend on,
/// level by level, until every DT_NEEDED is found.
pub fn qemu_files() -> Result<board::Files> {
    env::ensure_apt(&["binutils-aarch64-linux-gnu"])?;
    let mut roots = vec![guest::deb(QEMU_PACKAGE)?];
    let mut fetched: BTreeSet<String> = [QEMU_PACKAGE.to_owned()].into();
    let mut frontier = vec![QEMU_PACKAGE.to_owned()];
    let exe = "usr/bin/qemu-system-aarch64";
    let exe_path =
        inside(&roots[0], exe).with_context(|| format!("{QEMU_PACKAGE} has no /{exe}"))?;
    let mut files: board::Files = vec![(exe.to_owned(), std::fs::read(&exe_path)?)];
    let mut want: VecDeque<String> = needed(&exe_path)?.into();
    let mut placed: BTreeSet<String> = BTreeSet::new();
    while let Some(soname) = want.pop_front() {
        if placed.contains(&soname) {
            continue;
        }
        let found = roots
            .iter()
            .flat_map(|r| LIB_DIRS.iter().map(move |d| (r, d)))
            .find_map(|(r, d)| inside(r, &format!("{d}/{soname}")));
        let Some(path) = found else {
            // Not in what is unpacked: take the next level of library packages.
            let mut next = Vec::new();
            for pkg in std::mem::take(&mut frontier) {
                for dep in lib_depends(&pkg)? {
                    if fetched.insert(dep.clone()) {
                        roots.push(guest::deb(&dep)?);
                        next.push(dep);
                    }
                }
            }
            if next.is_empty() {
                bail!(
                    "{soname}, which QEMU needs, is in none of the {} packages of its \
                     dependency closure ({})",
                    fetched.len(),
                    fetched.iter().cloned().collect::<Vec<_>>().join(" ")
                );
            }
            frontier = next;
            want.push_front(soname);
            continue;
        };
        want.extend(needed(&path)?);
        let data =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if soname == "ld-linux-aarch64.so.1" {
            // The loader also where the programs' PT_INTERP names it.
            files.push(("lib/ld-linux-aarch64.so.1".to_owned(), data.clone()));
        }
        files.push((format!("{}/{soname}", LIB_DIRS[0]), data));
        placed.insert(soname);
    }
    Ok(files)
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

pub fn run() -> Result<()> {
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
        &[("ROUNDS", &ROUNDS.to_string())],
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
        (1..=ROUNDS)
            .map(|i| value(&format!("{test}-{vmm}{i}"), key))
            .collect()
    };
    println!(
        "\nsplitvirt vs QEMU/KVM ({}) in one board run: the same kernel, initramfs and devices, \
         {ROUNDS} rounds in rotation; ratios are splitvirt/QEMU per round (times: below 1 is \
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
    let io_rows = [
        ("seq write MB/s", "seq_write_mbps"),
        ("seq read MB/s", "seq_read_mbps"),
        ("4K rand rd IOPS", "rand_read_iops"),
        ("4K rand wr IOPS", "rand_write_iops"),
        ("TCP MB/s", "tcp_mbps"),
        ("TCP RR µs", "tcp_rr_us"),
    ];
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
    for (vmm, title) in PLACEMENTS {
        header(&format!("I/O: qcow2 virtio-blk; {title}"));
        compare("ioq", vmm, &io_rows[..4])?;
    }
    let rss = rounds("quiet", "svbe", "vmm_rss_kib")?;
    println!(
        "\nsplitvirt's RSS outside guest RAM, median {:.0} KiB (the issue's goal: ≤ 5120 KiB)",
        median(rss)
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
