//! Issue 4's end-to-end test: splitvirt boots guests on KVM inside the board.

use crate::env::root;
use crate::{board, guest, kernel, realboot};
use anyhow::{ensure, Result};
use std::time::Duration;

pub fn boot_on_kvm() -> Result<()> {
    boot_on_kvm_with(None)
}

/// `cargo xtask kvmboot --root-rounds N`: only the two root-disk VMs (raw, and qcow2 with INTx
/// only), N times in one board run, each round ended with a hang report if it takes over 4
/// minutes: to chase a hang seen about once in five runs.
pub fn root_rounds(n: u32) -> Result<()> {
    boot_on_kvm_with(Some(n))
}

fn boot_on_kvm_with(root_rounds: Option<u32>) -> Result<()> {
    let k = kernel::build(kernel::Role::Driver)?;
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("kvm-guest.cpio");
    let (hvc, host, written) = (
        realboot::token("hvc"),
        realboot::token("host"),
        realboot::token("guest"),
    );
    guest::initramfs_with(
        "kvm-guest",
        &[("HVC_TOKEN", &hvc), ("GUEST_TOKEN", &written)],
        &[("conntest", guest::tool("conntest")?)],
        &initrd,
    )?;
    let disk_initrd = dir.join("kvm-disk.cpio");
    guest::initramfs("kvm-disk", &[], &disk_initrd)?;
    // A small disk: the board carries it in its initramfs.
    let disk = dir.join("kvm-disk.img");
    guest::disk(&[("from-host.txt", &host)], &disk, 16384)?;
    // Its backend polls: the stress below runs both vCPUs' I/O through the spinning RPC.
    let vm = "[backend]\npoll_us = 50\n\
              [[device]]\nkind = \"virtio-blk\"\nimage = \"/guest/disk.img\"\n\
              [[device]]\nkind = \"virtio-net\"\nbackend = \"tap0\"\n\
              [[device]]\nkind = \"virtio-console\"\nbackend = \"socket:/tmp/hvc.sock\"\n";
    let vm_hvc = "[[device]]\nkind = \"virtio-blk\"\nimage = \"/guest/disk.img\"\n\
                  [[device]]\nkind = \"virtio-console\"\n";
    let kill_initrd = dir.join("kvm-kill.cpio");
    guest::initramfs("kvm-kill", &[], &kill_initrd)?;
    let stock_initrd = dir.join("kvm-stock.cpio");
    guest::initramfs("kvm-stock", &[], &stock_initrd)?;
    let (typed, typed_hvc, reply) = (
        realboot::token("typed"),
        realboot::token("typed-hvc"),
        realboot::token("reply"),
    );
    let (root_token, qroot_token, root_host) = (
        realboot::token("root"),
        realboot::token("qroot"),
        realboot::token("root-host"),
    );
    let tun = board::module("drivers/net/tun.ko")?;
    // Two root disks: one raw, one turned into qcow2 by qemu-img.
    let root_img = dir.join("kvm-root.img");
    guest::root_disk(
        "kvm-root",
        &[("from-host.txt", &root_host)],
        &root_img,
        16384,
    )?;
    let qroot_raw = dir.join("kvm-qroot.raw");
    guest::root_disk(
        "kvm-root",
        &[("from-host.txt", &root_host)],
        &qroot_raw,
        16384,
    )?;
    let qroot = dir.join("kvm-qroot.qcow2");
    crate::env::ensure_apt(&["qemu-utils"])?;
    crate::env::run(
        crate::env::cmd("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&qroot_raw)
            .arg(&qroot),
    )?;
    let link = "[[device]]\nkind = \"virtio-net\"\nbackend = \"socket:/tmp/link.sock\"\n";
    let root_toml = format!(
        "[[device]]\nkind = \"virtio-blk\"\nimage = \"/guest/root.img\"\n{link}mac = \"52:54:00:00:03:01\"\n\
         [[device]]\nkind = \"virtio-console\"\n"
    );
    // INTx only: no MSI frame, so every interrupt goes through the swizzled lines.
    let qroot_toml = format!(
        "[gic]\nv2m = false\n\
         [[device]]\nkind = \"virtio-blk\"\nimage = \"/guest/root.qcow2\"\n{link}mac = \"52:54:00:00:03:02\"\n\
         [[device]]\nkind = \"virtio-console\"\n"
    );
    let files = vec![
        ("guest/root.img".to_owned(), std::fs::read(&root_img)?),
        ("guest/root.qcow2".to_owned(), std::fs::read(&qroot)?),
        ("guest/root.toml".to_owned(), root_toml.into_bytes()),
        ("guest/qroot.toml".to_owned(), qroot_toml.into_bytes()),
        ("tun.ko".to_owned(), tun),
        ("guest/vm.toml".to_owned(), vm.as_bytes().to_vec()),
        ("guest/vm-hvc.toml".to_owned(), vm_hvc.as_bytes().to_vec()),
        (
            "guest/nodisk.toml".to_owned(),
            b"[[device]]\nkind = \"virtio-console\"\n".to_vec(),
        ),
        ("guest/disk.img".to_owned(), std::fs::read(&disk)?),
        ("guest/kill.cpio".to_owned(), std::fs::read(&kill_initrd)?),
        (
            "guest/kill.toml".to_owned(),
            b"[[device]]\nkind = \"virtio-blk\"\nimage = \"/tmp/kill.img\"\nplacement = \"backend\"\n".to_vec(),
        ),
        ("guest/disk.cpio".to_owned(), std::fs::read(&disk_initrd)?),
        ("guest/abort-Image".to_owned(), guest::bare_image("abort")?),
        ("guest/Image".to_owned(), std::fs::read(&k.image)?),
        ("guest/initrd.cpio".to_owned(), std::fs::read(&initrd)?),
        (
            "guest/stock-Image".to_owned(),
            std::fs::read(board::host_kernel()?)?,
        ),
        ("guest/stock.cpio".to_owned(), std::fs::read(&stock_initrd)?),
    ];
    let outbox = dir.join("board-boot.outbox");
    let rounds = root_rounds.map(|n| n.to_string());
    let mut vars = vec![
        ("TYPED", typed.as_str()),
        ("TYPED_HVC", &typed_hvc),
        ("HVC_REPLY", &reply),
        ("ROOT_TOKEN", &root_token),
        ("QROOT_TOKEN", &qroot_token),
    ];
    if let Some(n) = &rounds {
        vars.push(("ROOT_ROUNDS", n));
    }
    let timeout = Duration::from_secs(1500 + 300 * u64::from(root_rounds.unwrap_or(0)));
    let r = board::run_with("board-boot", &vars, files, timeout, Some(&outbox))?;
    if let Some(n) = root_rounds {
        return check_root_rounds(&r, n);
    }
    ensure!(
        !r.timed_out,
        "the board did not finish within {timeout:?} (log: {})",
        r.log_path.display()
    );
    ensure!(r.outer().passed("kvm_device"), "no /dev/kvm in the board");

    // The backend process maps the pool and nothing of guest RAM, and is jailed.
    backend_confined(&r.outer(), &r.log_path)?;
    let g = r.part("guest");
    let log = r.log_path.display();
    ensure!(
        g.log.contains("@@ DONE"),
        "the guest on KVM did not finish its scenario (log: {log})"
    );
    ensure!(
        g.value("splitvirt_exit") == Some("0"),
        "splitvirt exited {:?} (log: {log})",
        g.value("splitvirt_exit")
    );
    // What splitvirt says comes from its own log file, counted in the board.
    ensure!(
        r.outer()
            .value("guest_powered_off")
            .is_some_and(|n| n != "0"),
        "no power-off report in splitvirt's log (log: {log})"
    );
    // Loads KVM cannot emulate, on a BAR with no memory behind it: SIGBUS for the program,
    // one line in splitvirt's log for the address, and the VM went on (the rest below).
    for how in ["ldp", "ld1"] {
        ensure!(
            g.value(&format!("loads_virtio_{how}")) == Some("SIGBUS"),
            "a {how} of virtio-blk's BAR 0 gave {:?}, want SIGBUS (log: {log})",
            g.value(&format!("loads_virtio_{how}"))
        );
    }
    ensure!(
        r.outer().value("undecodable_lines") == Some("1"),
        "splitvirt logged {:?} lines for the undecodable loads, want 1 (log: {log})",
        r.outer().value("undecodable_lines")
    );
    ensure!(
        g.value("cpus") == Some("2"),
        "guest saw {:?} CPUs, expected 2",
        g.value("cpus")
    );
    ensure!(
        g.value("model") == Some("splitvirt"),
        "model {:?}",
        g.value("model")
    );
    ensure!(
        g.value("mem_reg") == Some("00000000400000000000000020000000"),
        "memory reg {:?}",
        g.value("mem_reg")
    );
    ensure!(
        g.value("pool_reg") == Some("00000000500000000000000004000000"),
        "pool reg {:?}",
        g.value("pool_reg")
    );
    ensure!(
        g.value("typed") == Some(typed.as_str()),
        "typed line {:?}, sent {typed}",
        g.value("typed")
    );
    ensure!(
        g.log.contains("earlycon: pl11 at MMIO 0x0000000009000000"),
        "no earlycon line (log: {log})"
    );
    // virtio-console over splitvirt's PCI, confined to the pool, with ACCESS_PLATFORM.
    ensure!(g.passed("hvc0"), "no /dev/hvc0 in the guest (log: {log})");
    // hvc0 on a Unix socket: the guest's line reaches `splitvirt console`, its answer comes back.
    ensure!(
        r.part("hvc").log.contains(&format!("hvc0-says-{hvc}")),
        "what the guest wrote to /dev/hvc0 never reached the console socket (log: {log})"
    );
    ensure!(
        g.value("hvc_reply") == Some(format!("hvc-reply-{reply}").as_str()),
        "the answer on the console socket reached hvc0 as {:?} (log: {log})",
        g.value("hvc_reply")
    );
    ensure!(
        g.log
            .contains("0000:00:03.0: assigned reserved memory node swiotlb@50000000"),
        "the console was not assigned the pool (log: {log})"
    );
    let features = g.value("features_virtio0").unwrap_or_default();
    ensure!(
        features.chars().nth(33) == Some('1'),
        "ACCESS_PLATFORM not negotiated: {features:?}"
    );
    let used: u64 = g
        .value("pool_used")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ensure!(
        used > 0,
        "the pool is not in use (io_tlb_used = {:?})",
        g.value("pool_used")
    );
    // virtio-net: the guest pings the board through splitvirt's TAP backend.
    ensure!(
        g.passed("eth0") && g.passed("ping"),
        "virtio-net: no eth0 or no ping to the board (log: {log})"
    );
    let tap_sha = g.value("tap_tx_sha").unwrap_or_default();
    ensure!(
        g.passed("tcp_tap")
            && tap_sha.len() == 64
            && r.outer().value("tap_rx_sha") == Some(tap_sha),
        "TCP over the TAP: the guest sent {tap_sha:?}, the board got {:?} (log: {log})",
        r.outer().value("tap_rx_sha")
    );
    // virtio-blk: the host's file read, the guest's written and found by a second VM.
    ensure!(
        g.passed("vda2") && g.passed("umount"),
        "virtio-blk: /dev/vda2 not usable (log: {log})"
    );
    ensure!(
        g.value("host_file") == Some(host.as_str()),
        "guest read {:?} from /dev/vda2, host wrote {host}",
        g.value("host_file")
    );
    let d = r.part("disk");
    ensure!(
        d.value("previous") == Some(written.as_str()),
        "the second VM found {:?}, the first wrote {written}",
        d.value("previous")
    );
    ensure!(
        d.log.contains("@@ REBOOTING")
            && r.outer().value("disk_reset").is_some_and(|n| n != "0")
            && d.value("rebooted") == Some("yes"),
        "the guest's reset did not restart it (log: {log})"
    );
    ensure!(
        d.value("splitvirt_exit") == Some("0"),
        "second VM: splitvirt exited {:?}",
        d.value("splitvirt_exit")
    );
    // Two vCPUs, disk and network at once: both copies intact.
    ensure!(
        g.passed("stress_disk") && r.outer().value("stress_rx_sha") == Some(tap_sha),
        "parallel disk and TCP: disk copy {}, TCP copy {:?} (want {tap_sha}) (log: {log})",
        if g.passed("stress_disk") {
            "intact"
        } else {
            "damaged or missing"
        },
        r.outer().value("stress_rx_sha")
    );
    // console=hvc0: the second VM's console is the virtio-console on stdio, both ways.
    ensure!(
        d.value("console") == Some("hvc0") && d.value("typed") == Some(typed_hvc.as_str()),
        "console=hvc0: active console {:?}, typed line {:?}, sent {typed_hvc} (log: {log})",
        d.value("console"),
        d.value("typed")
    );
    std::fs::write(dir.join("kvm-guest.log"), &g.log)?;
    // doctor on this boot: every step is there (blk and net are not served yet).
    let sv = crate::env::splitvirt()?;
    // Its exit status is 1 until PCI devices exist; the steps are what matter here.
    let o = crate::env::cmd(&sv)
        .arg("doctor")
        .arg(dir.join("kvm-guest.log"))
        .output()?;
    let report = String::from_utf8_lossy(&o.stdout);
    for step in [
        "kernel started",
        "device tree parsed",
        "memory",
        "restricted DMA pool",
        "PCI enumerated",
        "virtio devices bound",
        "virtio drivers bound",
        "init started",
    ] {
        ensure!(
            report
                .lines()
                .any(|l| l.contains("[ok") && l.contains(step)),
            "doctor does not find `{step}` in the KVM boot:\n{report}"
        );
    }

    let rt = r.part("root");
    ensure!(
        rt.root_is_vda2() && rt.value("root_type") == Some("ext4"),
        "root=/dev/vda2 boot: root is device {:?} ({:?}), vda2 is {:?} (log: {log})",
        rt.value("root_dev"),
        rt.value("root_type"),
        rt.value("vda2_dev")
    );
    ensure!(
        rt.value("splitvirt_exit") == Some("0"),
        "root=/dev/vda2 boot: splitvirt exited {:?}",
        rt.value("splitvirt_exit")
    );
    let q = r.part("qroot");
    ensure!(
        q.root_is_vda2() && q.value("splitvirt_exit") == Some("0"),
        "root=/dev/vda2 from qcow2: root is {:?}, vda2 is {:?}, exit {:?} (log: {log})",
        q.value("root_dev"),
        q.value("vda2_dev"),
        q.value("splitvirt_exit")
    );
    for (part, name) in [(&rt, "raw"), (&q, "qcow2")] {
        ensure!(
            part.value("host_file") == Some(root_host.as_str()),
            "the {name} root's file from the host read {:?}",
            part.value("host_file")
        );
    }
    // INTx only for the qcow2 VM (no MSI frame), MSI-X for the other.
    ensure!(
        q.value("msi_irqs") == Some("0") && rt.value("msi_irqs").is_some_and(|n| n != "0"),
        "interrupts: qcow2 VM has {:?} MSI lines (want 0), raw VM {:?}",
        q.value("msi_irqs"),
        rt.value("msi_irqs")
    );
    // The two VMs' socket link carried 4 MiB of TCP intact.
    let sent = q.value("link_tx_sha").unwrap_or_default();
    ensure!(
        q.passed("link_sent") && sent.len() == 64 && rt.value("link_rx_sha") == Some(sent),
        "VM-to-VM link: sent {sent:?}, received {:?} (log: {log})",
        rt.value("link_rx_sha")
    );
    // The host finds what each root VM wrote, in the raw image and in the qcow2 image.
    let back = dir.join("outbox");
    board::unpack_outbox(&r, &outbox, &back)?;
    let raw_found = guest::read_from_p2(&back.join("root.img"), "from-guest.txt")?;
    ensure!(
        raw_found.trim() == root_token,
        "the raw root image holds {raw_found:?}, the guest wrote {root_token}"
    );
    let q_found = guest::read_from_qcow2_p2(&back.join("root.qcow2"), "from-guest.txt")?;
    ensure!(
        q_found.trim() == qroot_token,
        "the qcow2 root image holds {q_found:?}, the guest wrote {qroot_token}"
    );
    // The backend killed mid-I/O: splitvirt stays up, names what happened, fails the disk's
    // requests (the guest's dd gets an I/O error, not a hang), the guest goes on (its UART
    // works), and a new backend takes the disk over: a pattern written after the restart reads
    // back from the device.
    let kl = r.part("kill");
    // What splitvirt said comes from its own log file (counted in the board), never from the
    // console stream that the guest writes into at the same time.
    let said = |what: &str| {
        r.outer()
            .value(what)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    };
    ensure!(
        said("kill_ioerr") > 0,
        "backend killed: splitvirt failed no disk request with an I/O error (log: {log})"
    );
    ensure!(
        said("kill_lost") > 0
            && kl.value("after_kill") == Some("typed-after-kill")
            && kl.value("alive") == Some("yes")
            && kl.value("splitvirt_exit") == Some("0"),
        "backend killed: lost-lines {}, after_kill {:?}, alive {:?}, exit {:?} (log: {log})",
        said("kill_lost"),
        kl.value("after_kill"),
        kl.value("alive"),
        kl.value("splitvirt_exit")
    );
    ensure!(
        said("kill_restarted") > 0 && kl.value("after_restart") == Some("ok"),
        "backend killed: restarted-lines {}, the disk after the restart {:?} (log: {log})",
        said("kill_restarted"),
        kl.value("after_restart")
    );
    let s = r.part("stock");
    ensure!(
        s.log.contains("@@ DONE"),
        "Debian's stock kernel did not reach init on KVM (log: {log})"
    );
    ensure!(
        s.value("splitvirt_exit") == Some("0"),
        "splitvirt exited {:?} with the stock kernel",
        s.value("splitvirt_exit")
    );
    ensure!(
        s.value("cpus") == Some("2"),
        "stock guest saw {:?} CPUs",
        s.value("cpus")
    );
    std::fs::write(dir.join("kvm-stock.log"), &s.log)?;
    // A bare guest's load pair from the UART, which KVM cannot decode: the guest took an
    // external data abort there (its handler printed D) and powered off; splitvirt said so once.
    let f = r.part("abort");
    ensure!(
        f.value("splitvirt_exit") == Some("0") && f.log.lines().any(|l| l.trim() == "D"),
        "the aborting guest: splitvirt exit {:?}, its handler's mark missing or not D:\n{}",
        f.value("splitvirt_exit"),
        f.log
    );
    ensure!(
        f.log.matches("cannot emulate").count() == 1 && f.log.contains("0x9000000"),
        "splitvirt did not log the undecodable access once:\n{}",
        f.log
    );
    println!(
        "  guest on KVM: 2 CPUs, device tree as described, typed line received; stock kernel {}",
        s.value("kernel").unwrap_or("?")
    );
    Ok(())
}

/// The jailed backend as the board's `backend_values` saw it from outside: the pool mapped
/// and no guest RAM; a seccomp filter, no_new_privs, no capability; PID and network namespaces
/// of its own; an empty root.
pub fn backend_confined(o: &crate::qemu::Run, log: &std::path::Path) -> Result<()> {
    let want = [
        ("backend_other_memory", "0"),
        ("backend_seccomp", "2"),
        ("backend_nonewprivs", "1"),
        ("backend_capeff", "0000000000000000"),
        ("backend_own_pidns", "1"),
        ("backend_own_netns", "1"),
        ("backend_root_entries", "0"),
    ];
    let pool = o.value("backend_pool_maps");
    ensure!(
        pool.is_some_and(|n| n != "0"),
        "the backend maps the pool {pool:?} times (log: {})",
        log.display()
    );
    for (name, value) in want {
        ensure!(
            o.value(name) == Some(value),
            "the jailed backend's {name} is {:?}, not {value} (log: {})",
            o.value(name),
            log.display()
        );
    }
    Ok(())
}

/// Every round of `root_rounds`: both VMs powered off by themselves, no hang report.
fn check_root_rounds(r: &crate::qemu::Run, n: u32) -> Result<()> {
    let log = r.log_path.display();
    ensure!(!r.timed_out, "the board did not finish (log: {log})");
    let hangs = r
        .log
        .lines()
        .filter(|l| l.contains("@@ HANG root-qroot"))
        .count();
    if hangs > 0 {
        board::print_user_stacks(&r.log);
    }
    let mut unclean = 0;
    for who in ["root", "qroot"] {
        let exits = r.part(who).values("splitvirt_exit").len();
        let clean = r
            .part(who)
            .values("splitvirt_exit")
            .iter()
            .filter(|v| **v == "0")
            .count();
        println!("{who}: {clean} of {n} rounds ended cleanly ({exits} ended)");
        unclean += n as usize - clean.min(n as usize);
    }
    ensure!(
        hangs == 0 && unclean == 0,
        "{hangs} of {n} rounds hung, {unclean} VMs did not end cleanly (log: {log})"
    );
    Ok(())
}
