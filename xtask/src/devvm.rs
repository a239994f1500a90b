//! The device VM on KVM in the board (issue 17): a device VM with rpc-ports and disks of its
//! own, and driver VMs whose `[backend] device_vm` names a port. Inside the device VM,
//! `splitvirt backend --port` (the static aarch64 binary) serves a driver VM's virtio-blk from
//! the device VM's own disk, its virtio-net from a TAP inside the device VM and its
//! virtio-console on a Unix socket there.
//! `cargo xtask kvmdevvm` checks that the driver VM boots with its root file system on the
//! device VM's disk, that what it writes reads back and lands in that disk image (read on the
//! host after both VMs are off), that 4 MiB over TCP reach the device VM whole, that a line
//! typed into its console on the device VM's side is answered by the driver VM, what the device
//! VM maps of the driver VM (its port's BARs: the control region and the pool, nothing else),
//! and that a second driver VM served by the same device VM at the same time sees its own disk
//! only. With `--kill`, the device VM's splitvirt is also killed under the driver VM's writes:
//! the driver VM stays up with I/O errors, and a second device VM takes over.

use crate::env::root;
use crate::{board, guest, kernel, realboot};
use anyhow::{ensure, Result};
use std::time::Duration;

/// The driver VM: the default profile's pool (64 MiB), its disk, network and a console in the
/// device VM (the console on a socket of the device VM's).
const DRIVER: &str = "vcpus = 1\nvcpu_affinity = \"0\"\n\
                      [backend]\ndevice_vm = \"/tmp/port.sock\"\n\
                      [[device]]\nkind = \"virtio-blk\"\nimage = \"/dev/vda\"\n\
                      [[device]]\nkind = \"virtio-net\"\nbackend = \"tap0\"\n\
                      [[device]]\nkind = \"virtio-console\"\nbackend = \"socket:/tmp/dvm-console.sock\"\n";
/// A second driver VM, served by the same device VM from its second disk, a virtio-pmem
/// region (/dev/pmem0 in it).
const DRIVER2: &str = "vcpus = 1\n\
                       [backend]\ndevice_vm = \"/tmp/port2.sock\"\n\
                       [[device]]\nkind = \"virtio-blk\"\nimage = \"/dev/pmem0\"\n";
/// The device VM: a port for each driver VM's pool, and two disks of its own, which its
/// splitvirt serves: a virtio-blk (vda in it) and a virtio-pmem image mapped into its memory
/// (pmem0). Its vCPU on the board's CPU 1, the first driver VM's on CPU 0.
const DEVICE: &str = "vcpus = 1\nvcpu_affinity = \"1\"\n\
                      [[device]]\nkind = \"virtio-blk\"\nimage = \"/tmp/dvm-disk.img\"\n\
                      placement = \"in-process\"\nslot = 1\n\
                      [[device]]\nkind = \"rpc-port\"\nsocket = \"/tmp/port.sock\"\n\
                      pool_size = \"64M\"\nslot = 2\n\
                      [[device]]\nkind = \"rpc-port\"\nsocket = \"/tmp/port2.sock\"\n\
                      pool_size = \"64M\"\nslot = 3\n\
                      [[device]]\nkind = \"virtio-pmem\"\nimage = \"/tmp/dvm-disk2.img\"\n\
                      slot = 4\n";

/// The device VM's initramfs: the `connection` module for its kernel `dk`, the static
/// splitvirt, and the descriptions of the driver VMs it serves, each under its name
/// (`driver.toml` for the port at 00:02.0, `driver2.toml` for 00:03.0).
fn device_initramfs_for(
    dk: &kernel::Kernel,
    drivers: &[(&str, &str)],
) -> Result<std::path::PathBuf> {
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let sv = std::fs::read(crate::cross::splitvirt()?)?;
    let initrd = dir.join("dvm-device.cpio");
    guest::initramfs_with(
        "dvm-device",
        &[],
        &[
            ("connection.ko", guest::kernel_module(dk, "connection")?),
            ("splitvirt", sv),
        ]
        .into_iter()
        .chain(drivers.iter().map(|(n, d)| (*n, d.as_bytes().to_vec())))
        .collect::<Vec<_>>(),
        &initrd,
    )?;
    Ok(initrd)
}

/// `cargo xtask kvmdevvm`, part of `cargo xtask test`.
pub fn driver_served_by_a_device_vm() -> Result<()> {
    run(false)
}

/// `cargo xtask kvmdevvm --kill`, part of `cargo xtask test`: the same with the device VM
/// killed under the driver VM's writes and a second one taking over.
pub fn with_the_device_vm_killed() -> Result<()> {
    run(true)
}

fn run(kill: bool) -> Result<()> {
    let k = kernel::build(kernel::Role::Driver)?;
    // The device VM's kernel has TUN, for the TAP it serves the driver VM's network from.
    let dk = kernel::build(kernel::Role::Device)?;
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let device_initrd =
        device_initramfs_for(&dk, &[("driver.toml", DRIVER), ("driver2.toml", DRIVER2)])?;
    // The driver VM's root file system: the device VM's first disk (its /dev/vda), an MBR disk
    // whose partition 2 is the root (busybox, our init, dvm-driver.sh) and partition 1 8 MiB
    // for raw writes.
    let root_img = dir.join("dvm-root.img");
    let from_board = realboot::token("from-board");
    guest::root_disk(
        "dvm-driver",
        &[("from-board.txt", &from_board)],
        &root_img,
        32768,
    )?;
    // With --kill the driver VM must outlive its disk's server: it runs from an initramfs then
    // and mounts the disk's file system only before the kill.
    let driver_initrd = dir.join("dvm-driver.cpio");
    guest::initramfs("dvm-driver", &[], &driver_initrd)?;
    let driver2_initrd = dir.join("dvm-driver2.cpio");
    guest::initramfs("dvm-driver2", &[], &driver2_initrd)?;
    let token = format!("{:016x}", std::process::id() as u64 * 0x9e37_79b9);
    let token2 = format!("{:016x}", std::process::id() as u64 * 0x7f4a_7c15);
    let files = vec![
        ("guest/driver.toml".to_owned(), DRIVER.as_bytes().to_vec()),
        ("guest/driver2.toml".to_owned(), DRIVER2.as_bytes().to_vec()),
        (
            "guest/dvm-driver2.cpio".to_owned(),
            std::fs::read(&driver2_initrd)?,
        ),
        ("guest/device.toml".to_owned(), DEVICE.as_bytes().to_vec()),
        ("guest/Image".to_owned(), std::fs::read(&k.image)?),
        ("guest/device-Image".to_owned(), std::fs::read(&dk.image)?),
        (
            "guest/dvm-device.cpio".to_owned(),
            std::fs::read(&device_initrd)?,
        ),
        ("guest/dvm-root.img".to_owned(), std::fs::read(&root_img)?),
        (
            "guest/dvm-driver.cpio".to_owned(),
            std::fs::read(&driver_initrd)?,
        ),
    ];
    let outbox = dir.join("board-devvm.outbox");
    let r = board::run_with(
        "board-devvm",
        &[
            ("TOKEN", &token),
            ("TOKEN2", &token2),
            ("KILL", if kill { "1" } else { "0" }),
            // The run that kills the device VM has its backend poll its queues, as
            // examples/device-vm.toml says: it dies leaving them unarmed, and the driver VM's
            // splitvirt re-arms them as it fails their requests. The other run does not poll,
            // so that both ways of waiting are run.
            ("POLL_US", if kill { "2000" } else { "0" }),
        ],
        files,
        Duration::from_secs(900),
        Some(&outbox),
    )?;
    let log = r.log_path.display();
    ensure!(!r.timed_out, "the board did not finish (log: {log})");
    let (device, driver, outer) = (r.part("device"), r.part("driver"), r.outer());
    ensure!(
        device.passed("insmod") && device.value("ports").is_some_and(|f| !f.is_empty()),
        "the device VM found no rpc-port (log: {log})"
    );
    // What the device VM sees of the driver VM: its control region (0xb000 bytes in a 64 KiB
    // BAR) and its pool (64 MiB), and nothing else.
    ensure!(
        device.value("port_maps")
            == Some("0x0000000000001000 0x0000000000010000 0x0000000004000000"),
        "the port's maps (registers, control region, pool): {:?} (log: {log})",
        device.value("port_maps")
    );
    let device_sv = r.part("device-sv");
    let connected = device_sv
        .log
        .lines()
        .find(|l| l.contains("a driver VM connected"));
    ensure!(
        connected.is_some_and(|l| l.contains("control region 45056 bytes") && l.contains("pool 67108864 bytes")),
        "the device VM's splitvirt did not map the driver VM's control region and pool: {connected:?} (log: {log})"
    );
    ensure!(
        driver.value("tcp_tx_sha").is_some()
            && device.value("tcp_rx_sha") == driver.value("tcp_tx_sha"),
        "4 MiB over TCP through the device VM's network: sent {:?}, received {:?} (log: {log})",
        driver.value("tcp_tx_sha"),
        device.value("tcp_rx_sha")
    );
    // Its console, served by the device VM on a socket there: a line from the device VM's side
    // came in, and the driver VM's answer went out.
    let pong = format!("pong-ping-console-{token}");
    ensure!(
        device.value("console_rx") == Some(pong.as_str()),
        "the driver VM's console through the device VM: the device VM read {:?}, want {pong:?}; \
         the driver VM read {:?} (log: {log})",
        device.value("console_rx"),
        driver.value("console_line")
    );
    // Its root file system is the device VM's disk: partition 2 is the root, with the file the
    // board put there; what the driver VM wrote into it is in the disk image once both VMs are
    // off.
    ensure!(
        kill || driver.root_is_vda2(),
        "the driver VM's root is {:?}, not /dev/vda2 ({:?}) (log: {log})",
        driver.value("root_dev"),
        driver.value("vda2_dev")
    );
    ensure!(
        driver.value("from_board") == Some(from_board.as_str()) && driver.passed("root_write"),
        "the driver VM's root file system: the board's file read {:?}, want {from_board}; \
         writing a file there {} (log: {log})",
        driver.value("from_board"),
        if driver.passed("root_write") {
            "worked"
        } else {
            "failed"
        }
    );
    let back = dir.join("devvm-outbox");
    board::unpack_outbox(&r, &outbox, &back)?;
    let found = guest::read_from_p2(&back.join("dvm-disk.img"), "from-driver.txt")?;
    ensure!(
        found.trim() == token,
        "the device VM's disk image holds {found:?} in the driver VM's root file system, the \
         driver VM wrote {token} (log: {log})"
    );
    let want = format!("splitvirt-device-vm {token}");
    ensure!(
        driver.passed("token_write") && driver.passed("bulk_write"),
        "the driver VM's writes failed (log: {log})"
    );
    ensure!(
        driver.value("token_read") == Some(want.as_str()),
        "the driver VM read back {:?}, not {want:?} (log: {log})",
        driver.value("token_read")
    );
    ensure!(
        driver.value("read_sha").is_some()
            && driver.value("read_sha") == driver.value("written_sha"),
        "8 MiB written to a file of the root file system came back changed: {:?} vs {:?} (log: {log})",
        driver.value("read_sha"),
        driver.value("written_sha")
    );
    ensure!(
        outer.value("disk_token") == Some(want.as_str()),
        "the device VM's disk image holds {:?}, not {want:?} (log: {log})",
        outer.value("disk_token")
    );
    // The VM that served to the end: the second device VM after a kill, else the first.
    let last = if kill {
        r.part("device2")
    } else {
        r.part("device")
    };
    if kill {
        kill_checks(&r, &device, &driver, &outer)?;
    }
    for port in ["a", "b"] {
        let k = format!("backend_exit_{port}_0");
        ensure!(
            last.value(&k) == Some("0"),
            "the device VM's backend {port} did not end cleanly with its connection: {:?} (log: {log})",
            last.value(&k)
        );
    }
    // vcpu_affinity: the device VM's one vCPU on the board's CPU 1, its splitvirt's other
    // threads anywhere.
    ensure!(
        outer.value("device_vcpu_cpus") == Some("1")
            && outer.value("device_main_cpus") == Some("0-1"),
        "the device VM's vCPU may run on the board's CPUs {:?} (its description says 1), its \
         other threads on {:?} (want 0-1) (log: {log})",
        outer.value("device_vcpu_cpus"),
        outer.value("device_main_cpus")
    );
    // Its second disk is a virtio-pmem image: its whole 64 MiB a block device in the device
    // VM, read and written as memory (what the second driver VM writes is in the file).
    ensure!(
        device.value("pmem0_bytes") == Some("67108864"),
        "the device VM's /dev/pmem0 holds {:?} bytes, its virtio-pmem image 67108864 (log: {log})",
        device.value("pmem0_bytes")
    );
    // Two driver VMs, one device VM: the second sees its own disk, not the first's token.
    let (driver2, want2) = (r.part("driver2"), format!("splitvirt-device-vm-2 {token2}"));
    ensure!(
        device.value("ports") == Some("0000:00:02.0 0000:00:03.0"),
        "the device VM's ports: {:?} (log: {log})",
        device.value("ports")
    );
    ensure!(
        driver2.value("before") == Some("x")
            && driver2.value("token_read") == Some(want2.as_str())
            && outer.value("disk2_token") == Some(want2.as_str()),
        "the second driver VM found {:?} on its disk before writing and read back {:?}; its \
         disk image holds {:?} (log: {log})",
        driver2.value("before"),
        driver2.value("token_read"),
        outer.value("disk2_token")
    );
    // Both at once: each wrote and read back 2 MiB of its own while the other did (both waited
    // for the same line).
    for (p, who) in [(&driver, "first"), (&driver2, "second")] {
        ensure!(
            p.passed("both_write")
                && p.value("both_sha").is_some()
                && p.value("both_read_sha") == p.value("both_sha"),
            "the {who} driver VM, with both served at once: write {}, 2 MiB read back {:?}, \
             written {:?} (log: {log})",
            if p.passed("both_write") {
                "ok"
            } else {
                "failed"
            },
            p.value("both_read_sha"),
            p.value("both_sha")
        );
    }
    for (p, who) in [
        (&last, "device"),
        (&driver, "driver"),
        (&driver2, "second driver"),
    ] {
        ensure!(
            p.value("splitvirt_exit") == Some("0"),
            "the {who} VM's splitvirt exited {:?} (log: {log})",
            p.value("splitvirt_exit")
        );
    }
    println!(
        "device VM: the driver VM's root file system, TCP and console served from the device \
         VM's own disk, TAP and a socket there; a second driver VM served by the same device VM \
         at once sees its own disk{} (log: {log})",
        if kill {
            "; the device VM killed under the driver VM's writes, a second one took over"
        } else {
            ""
        }
    );
    Ok(())
}

/// Rounds of `bench devvm`, the order of the three placements rotating.
const BENCH_ROUNDS: usize = 3;

/// `cargo xtask bench devvm`: a driver VM's virtio-blk served in splitvirt's process, in the
/// backend process and by a device VM from its own disk (the same raw file), side by side in
/// one board run: 1 MiB sequential writes and reads, 4 KiB random reads at queue depth 1.
pub fn bench() -> Result<()> {
    let dk = kernel::build(kernel::Role::Device)?;
    // HALT_POLL_US=N: every VM's `halt_poll_us` (unset: the host's default).
    let halt_poll = crate::bench::halt_poll_us()?
        .map_or_else(String::new, |us| format!("halt_poll_us = {us}\n"));
    // Every driver VM's vCPU on the board's CPU 0, the device VM's on CPU 1 (`vcpu_affinity`;
    // PIN=0: wherever the board's scheduler puts them).
    let pin = std::env::var("PIN").as_deref() != Ok("0");
    let on = |cpu: u32| {
        if pin {
            format!("vcpu_affinity = \"{cpu}\"\n")
        } else {
            String::new()
        }
    };
    let (driver_cpu, device_cpu) = (on(0), on(1));
    // The driver VM as the device VM serves it, from its disk `disk` (its own virtio-blk's
    // /dev/vda, or its virtio-pmem image's /dev/pmem0).
    let bench_driver = |disk: &str| {
        format!(
            "{halt_poll}{driver_cpu}vcpus = 1\n[backend]\ndevice_vm = \"/tmp/port.sock\"\n\
             [[device]]\nkind = \"virtio-blk\"\nimage = \"{disk}\"\n\
             [[device]]\nkind = \"virtio-net\"\nbackend = \"tap0\"\n"
        )
    };
    let device_initrd = device_initramfs_for(
        &dk,
        &[
            ("driver.toml", &bench_driver("/dev/vda")),
            ("driver-pmem.toml", &bench_driver("/dev/pmem0")),
        ],
    )?;
    // BE_POLL_US=N: the backend process polls its queues for N µs too (`[backend] poll_us`),
    // as the device VM's backend does (unset: it sleeps at once).
    let be_poll = crate::bench::env_us("BE_POLL_US")?
        .map_or_else(String::new, |us| format!("[backend]\npoll_us = {us}\n"));
    let blk = |placement: &str| {
        let be_poll = if placement == "backend" { &be_poll } else { "" };
        format!(
            "{halt_poll}{driver_cpu}vcpus = 1\n{be_poll}[[device]]\nkind = \"virtio-blk\"\nimage = \"/disk/bench.raw\"\nplacement = \"{placement}\"\n\
             [[device]]\nkind = \"virtio-net\"\nbackend = \"tap0\"\nplacement = \"{placement}\"\n"
        )
        .into_bytes()
    };
    // One port, and the bench file as the device VM's disk: `disk`'s kind and fields. The
    // device VM polled as examples/device-vm.toml has it (unless HALT_POLL_US says for all).
    let device_poll = if halt_poll.is_empty() {
        "halt_poll_us = 2000\n"
    } else {
        &halt_poll
    };
    let device = |disk: &str| {
        format!(
            "{device_poll}{device_cpu}vcpus = 1\n\
             [[device]]\n{disk}image = \"/disk/bench.raw\"\nslot = 1\n\
             [[device]]\nkind = \"rpc-port\"\nsocket = \"/tmp/port.sock\"\n\
             pool_size = \"64M\"\nslot = 2\n"
        )
        .into_bytes()
    };
    let mut files = crate::bench::io_files()?;
    files.extend([
        ("guest/in.toml".to_owned(), blk("in-process")),
        ("guest/be.toml".to_owned(), blk("backend")),
        (
            "guest/driver.toml".to_owned(),
            bench_driver("/dev/vda").into_bytes(),
        ),
        (
            "guest/device.toml".to_owned(),
            device("kind = \"virtio-blk\"\nplacement = \"in-process\"\n"),
        ),
        (
            "guest/device-pmem.toml".to_owned(),
            device("kind = \"virtio-pmem\"\n"),
        ),
        ("guest/device-Image".to_owned(), std::fs::read(&dk.image)?),
        (
            "guest/dvm-device.cpio".to_owned(),
            std::fs::read(&device_initrd)?,
        ),
    ]);
    // TRACE=1: the board's KVM traces every MMIO write and injection around each device VM
    // run, and pairs each write with what it injected (a lost notification's diagnosis).
    // TRACE=timeline: where each random read's time goes, from KVM's entries, exits and
    // injections (guest/board/lib.sh, kvm_timeline_report).
    let trace = std::env::var("TRACE").unwrap_or_default();
    ensure!(
        ["", "0", "1", "timeline"].contains(&trace.as_str()),
        "TRACE={trace}: 1 (KVM's account of notifications) or timeline (where a read's time goes)"
    );
    // DVM_POLL_US=N: how long the device VM's backend polls its queues (`--poll-us`; unset:
    // 2000, as examples/device-vm.toml says; 0: not at all).
    let dvm_poll = crate::bench::env_us("DVM_POLL_US")?
        .unwrap_or(2000)
        .to_string();
    // PLACES="be pmem": some of the placements only; ROUNDS=N: rounds other than 3.
    let places = Places::from_env()?;
    let r = board::run(
        "bench-devvm",
        &[
            ("ROUNDS", &places.rounds.to_string()),
            ("PLACES", &places.names.join(" ")),
            ("TRACE", &trace),
            ("POLL_US", &dvm_poll),
        ],
        files,
        Duration::from_secs(3600),
    )?;
    let log = r.log_path.display();
    ensure!(!r.timed_out, "the board timed out (log: {log})");
    let keys = [
        ("seq_write_mbps", "seq write MB/s"),
        ("seq_read_mbps", "seq read MB/s"),
        ("rand_read_iops", "4K rand read IOPS"),
        ("tcp_mbps", "TCP MB/s"),
    ];
    println!(
        "\na driver VM's virtio-blk in up to four places, on KVM inside the board ({} MiB sequential, {} s random, QD1; {} rounds): in splitvirt's process (in), in the backend process (be), served by a device VM from its own virtio-blk (dvm) or from its own virtio-pmem image (pmem)",
        crate::bench::IO_MIB,
        crate::bench::IO_SECONDS,
        places.rounds
    );
    // Each device VM against the backend process, where both ran.
    let against: Vec<&str> = if places.names.contains(&"be") {
        places
            .names
            .iter()
            .copied()
            .filter(|p| *p == "dvm" || *p == "pmem")
            .collect()
    } else {
        Vec::new()
    };
    let head: Vec<String> = places.names.iter().map(|p| p.to_string()).collect();
    let ratio_head: Vec<String> = against.iter().map(|p| format!("{p} / be")).collect();
    println!(
        "| round | measure | {} |{}",
        head.join(" | "),
        ratio_head
            .iter()
            .map(|h| format!(" {h} |"))
            .collect::<String>()
    );
    println!(
        "|---|---|{}{}",
        "---:|".repeat(head.len()),
        "---:|".repeat(ratio_head.len())
    );
    let mut ratios: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); against.len()]; keys.len()];
    for round in 1..=places.rounds {
        let get = |p: &str, k: &str| -> Result<f64> {
            r.part(&format!("{p}-{round}"))
                .value(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("no {k} for {p} in round {round} (log: {log})"))
        };
        for (i, (k, what)) in keys.iter().enumerate() {
            let values = places
                .names
                .iter()
                .map(|p| get(p, k))
                .collect::<Result<Vec<f64>>>()?;
            let mut cells: Vec<String> = values.iter().map(|v| format!("{v:.1}")).collect();
            let of = |p: &str| {
                let at = places.names.iter().position(|n| *n == p);
                at.map_or(f64::NAN, |i| values[i])
            };
            for (j, p) in against.iter().enumerate() {
                let x = of(p) / of("be");
                ratios[i][j].push(x);
                cells.push(format!("{x:.2}x"));
            }
            println!("| {round} | {what} | {} |", cells.join(" | "));
        }
    }
    if !against.is_empty() {
        for (i, (_, what)) in keys.iter().enumerate() {
            let medians: Vec<String> = ratios[i]
                .iter()
                .map(|v| format!("**{:.2}x**", crate::bench::median(v.clone())))
                .collect();
            println!(
                "| median | {what} |{} {} |",
                " |".repeat(places.names.len()),
                medians.join(" | ")
            );
        }
    }
    for line in r.outer().log.lines().filter(|l| l.contains("@@ TIMELINE")) {
        println!("{line}");
    }
    wakes_table(&r, &places)
}

/// The placements `bench devvm` runs (`PLACES`) and how many rounds (`ROUNDS`).
struct Places {
    names: Vec<&'static str>,
    rounds: usize,
}

impl Places {
    const ALL: [&'static str; 4] = ["in", "be", "dvm", "pmem"];

    fn from_env() -> Result<Places> {
        Ok(Places {
            names: crate::bench::env_subset("PLACES", &Self::ALL)?,
            rounds: crate::bench::env_rounds(BENCH_ROUNDS)?,
        })
    }
}

/// What a splitvirt process and its VM did between two of the board's `wakes` lines.
#[derive(Default)]
struct Wakes {
    /// The vCPUs' MMIO exits to splitvirt.
    exits: u64,
    /// MMIO writes KVM served itself (ioeventfds).
    in_kvm: u64,
    /// Context switches of each thread that is not a vCPU, by thread name.
    threads: Vec<(String, u64)>,
}

impl Wakes {
    fn parse(line: &str) -> Option<Wakes> {
        let mut w = line.split_whitespace();
        let (exits, in_kvm) = (w.next()?.parse().ok()?, w.next()?.parse().ok()?);
        let mut threads: Vec<(String, u64)> = Vec::new();
        for t in w {
            let (name, n) = t.rsplit_once('=')?;
            let n: u64 = n.parse().ok()?;
            match threads.iter_mut().find(|(m, _)| m == name) {
                Some((_, sum)) => *sum += n,
                None => threads.push((name.to_owned(), n)),
            }
        }
        Some(Wakes {
            exits,
            in_kvm,
            threads,
        })
    }

    /// `self` minus `before`; threads that did not switch are left out.
    fn since(&self, before: &Wakes) -> Wakes {
        let threads = self
            .threads
            .iter()
            .map(|(name, n)| {
                let was = before.threads.iter().find(|(m, _)| m == name);
                (name.clone(), n.saturating_sub(was.map_or(0, |w| w.1)))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        Wakes {
            exits: self.exits.saturating_sub(before.exits),
            in_kvm: self.in_kvm.saturating_sub(before.in_kvm),
            threads,
        }
    }

    /// "exits, in KVM, thread wakes (the busiest threads)", each per request.
    fn per(&self, requests: f64) -> String {
        let mut t = self.threads.clone();
        t.sort_by_key(|b| std::cmp::Reverse(b.1));
        let total: u64 = t.iter().map(|(_, n)| n).sum();
        let top: Vec<String> = t
            .iter()
            .take(3)
            .map(|(name, n)| format!("{name} {:.2}", *n as f64 / requests))
            .collect();
        format!(
            "{:.2} | {:.2} | {:.2} ({}) |",
            self.exits as f64 / requests,
            self.in_kvm as f64 / requests,
            total as f64 / requests,
            top.join(", ")
        )
    }
}

/// Per random read, for each placement and round: the driver VM's splitvirt and, with a device
/// VM, the device VM's: MMIO exits to splitvirt, MMIO writes KVM served itself, and wake-ups of
/// splitvirt's threads other than vCPUs (from the board's counters read around the reads).
fn wakes_table(r: &crate::qemu::Run, places: &Places) -> Result<()> {
    let outer = r.outer();
    let log = r.log_path.display();
    println!(
        "\nper 4K random read: the VMMs' MMIO exits to splitvirt, MMIO writes KVM served \
         (ioeventfds), wake-ups of splitvirt's threads other than vCPUs"
    );
    println!(
        "| round | placement | reads | driver: exits | driver: in KVM | driver: thread wakes | \
         device VM: exits | device VM: in KVM | device VM: thread wakes |"
    );
    println!("|---|---|---:|---:|---:|---|---:|---:|---|");
    for round in 1..=places.rounds {
        for p in places.names.iter() {
            let name = format!("{p}-{round}");
            let delta = |who: &str| -> Option<Wakes> {
                let at = |m: &str| {
                    outer
                        .value(&format!("wakes_{name}_{m}_{who}"))
                        .and_then(Wakes::parse)
                };
                Some(at("end")?.since(&at("start")?))
            };
            let reads: f64 = r
                .part(&name)
                .value("rand_read_ops")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("no rand_read_ops for {name} (log: {log})"))?;
            let driver = delta("driver")
                .ok_or_else(|| anyhow::anyhow!("no counters for {name}'s VMM (log: {log})"))?;
            let device = match delta("device") {
                Some(d) => d.per(reads),
                None => "| | |".to_owned(),
            };
            println!("| {round} | {p} | {reads} | {} {device}", driver.per(reads));
        }
    }
    Ok(())
}

/// The takeover: the first device VM was killed under the driver VM's writes, the driver VM
/// saw an I/O error, a second device VM took over, and what the driver wrote after that reads
/// back and is in the image.
fn kill_checks(
    r: &crate::qemu::Run,
    device: &crate::qemu::Run,
    driver: &crate::qemu::Run,
    outer: &crate::qemu::Run,
) -> Result<()> {
    let log = r.log_path.display();
    ensure!(
        device.value("splitvirt_exit") == Some("137")
            && driver.value("writes_before_error").is_some(),
        "the first device VM was not killed under the driver VM's writes (exit {:?}) (log: {log})",
        device.value("splitvirt_exit")
    );
    ensure!(
        driver.value("failed_tries").is_some_and(|n| n != "300"),
        "the driver VM's disk never worked again after the device VM died (log: {log})"
    );
    let after = driver.value("after_sha");
    ensure!(
        after.is_some()
            && driver.value("after_read_sha") == after
            && outer.value("disk_after_sha") == after,
        "4 MiB written through the second device VM: read back {:?}, in the image {:?}, written {after:?} (log: {log})",
        driver.value("after_read_sha"),
        outer.value("disk_after_sha")
    );
    ensure!(
        r.part("driver-sv").log.contains("backend reached again"),
        "the driver VM's splitvirt did not reach the second device VM (log: {log})"
    );
    // Every device carried on where the first device VM left it: the network too (its queues
    // resumed, not started from 0), and the second device VM's backends found nothing wrong.
    let device2 = r.part("device2");
    ensure!(
        device2.value("tcp_rx_sha") == driver.value("tcp_tx_sha"),
        "4 MiB over TCP through the second device VM: sent {:?}, received {:?} (log: {log})",
        driver.value("tcp_tx_sha"),
        device2.value("tcp_rx_sha")
    );
    let errors: Vec<&str> = device2
        .log
        .lines()
        .filter(|l| l.contains("splitvirt-backend: error"))
        .collect();
    ensure!(
        errors.is_empty(),
        "the second device VM's backends: {errors:?} (log: {log})"
    );
    Ok(())
}
