//! Issue 4's end-to-end test: splitvirt boots guests on KVM inside the board.

use crate::env::root;
use crate::{board, guest, kernel, realboot};
use anyhow::{ensure, Result};
use std::time::Duration;

pub fn boot_on_kvm() -> Result<()> {
    let k = kernel::build(kernel::Role::Driver)?;
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("kvm-guest.cpio");
    let (hvc, host, written) = (
        realboot::token("hvc"),
        realboot::token("host"),
        realboot::token("guest"),
    );
    guest::initramfs(
        "kvm-guest",
        &[("HVC_TOKEN", &hvc), ("GUEST_TOKEN", &written)],
        &initrd,
    )?;
    let disk_initrd = dir.join("kvm-disk.cpio");
    guest::initramfs("kvm-disk", &[], &disk_initrd)?;
    // A small disk: the board carries it in its initramfs.
    let disk = dir.join("kvm-disk.img");
    guest::disk(&[("from-host.txt", &host)], &disk, 16384)?;
    let vm = "[[device]]\nkind = \"virtio-blk\"\nimage = \"/guest/disk.img\"\n\
              [[device]]\nkind = \"virtio-net\"\nbackend = \"tap0\"\n\
              [[device]]\nkind = \"virtio-console\"\n";
    let stock_initrd = dir.join("kvm-stock.cpio");
    guest::initramfs("kvm-stock", &[], &stock_initrd)?;
    let typed = realboot::token("typed");
    let tun = board::module("drivers/net/tun.ko")?;
    let root_img = dir.join("kvm-root.img");
    guest::root_disk("kvm-root", &root_img, 16384)?;
    let files = vec![
        ("guest/root.img".to_owned(), std::fs::read(&root_img)?),
        (
            "guest/root.toml".to_owned(),
            b"[[device]]\nkind = \"virtio-blk\"\nimage = \"/guest/root.img\"\n[[device]]\nkind = \"virtio-console\"\n".to_vec(),
        ),
        ("tun.ko".to_owned(), tun),
        ("guest/vm.toml".to_owned(), vm.as_bytes().to_vec()),
        (
            "guest/nodisk.toml".to_owned(),
            b"[[device]]\nkind = \"virtio-console\"\n".to_vec(),
        ),
        ("guest/disk.img".to_owned(), std::fs::read(&disk)?),
        ("guest/disk.cpio".to_owned(), std::fs::read(&disk_initrd)?),
        ("guest/fault-Image".to_owned(), fault_image()),
        ("guest/Image".to_owned(), std::fs::read(&k.image)?),
        ("guest/initrd.cpio".to_owned(), std::fs::read(&initrd)?),
        (
            "guest/stock-Image".to_owned(),
            std::fs::read(board::host_kernel()?)?,
        ),
        ("guest/stock.cpio".to_owned(), std::fs::read(&stock_initrd)?),
    ];
    let r = board::run(
        "board-boot",
        &[("TYPED", &typed)],
        files,
        Duration::from_secs(900),
    )?;
    ensure!(
        !r.timed_out,
        "the board did not finish within 900 s (log: {})",
        r.log_path.display()
    );
    ensure!(r.outer().passed("kvm_device"), "no /dev/kvm in the board");

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
    ensure!(
        g.log.contains("splitvirt: the guest powered off"),
        "no power-off report (log: {log})"
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
    ensure!(
        g.log.contains(&format!("hvc0-says-{hvc}")),
        "what the guest wrote to /dev/hvc0 never reached splitvirt's stdout (log: {log})"
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
            && d.log
                .contains("splitvirt: the guest reset; starting it again")
            && d.value("rebooted") == Some("yes"),
        "the guest's reset did not restart it (log: {log})"
    );
    ensure!(
        d.value("splitvirt_exit") == Some("0"),
        "second VM: splitvirt exited {:?}",
        d.value("splitvirt_exit")
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
        rt.value("vda2_dev").is_some_and(|v| !v.is_empty())
            && rt.value("root_dev") == rt.value("vda2_dev")
            && rt.value("root_type") == Some("ext4"),
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
    let f = r.part("fault");
    ensure!(
        f.value("splitvirt_exit") == Some("1"),
        "a faulting guest made splitvirt exit {:?}",
        f.value("splitvirt_exit")
    );
    ensure!(
        f.log.contains("vCPU 0 stopped") && f.log.contains("pc     0x0000000040000004"),
        "no register dump for the faulting guest:\n{}",
        f.log
    );
    println!(
        "  guest on KVM: 2 CPUs, device tree as described, typed line received; stock kernel {}",
        s.value("kernel").unwrap_or("?")
    );
    Ok(())
}

/// A valid Image header whose first two instructions do an MMIO access KVM cannot decode:
/// `movz x2, #0x900, lsl #16; ldp x0, x1, [x2]` (a load pair from the UART).
fn fault_image() -> Vec<u8> {
    let mut b = vec![0u8; 0x4000];
    b[0..4].copy_from_slice(&0xd2a1_2002u32.to_le_bytes());
    b[4..8].copy_from_slice(&0xa940_0440u32.to_le_bytes());
    b[16..24].copy_from_slice(&0x1_0000u64.to_le_bytes());
    b[24..32].copy_from_slice(&0b1010u64.to_le_bytes());
    b[0x38..0x3c].copy_from_slice(b"ARM\x64");
    b
}
