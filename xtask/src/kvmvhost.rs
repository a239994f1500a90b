//! `cargo xtask kvmvhost`: vhost-user devices on KVM in the board, served by a third-party
//! backend (Debian's arm64 qemu-storage-daemon, unpacked with its libraries): the guest's root
//! file system on a qcow2 image the daemon exports, a second disk read, then that disk's
//! device given rings outside the pool by a hostile driver; the daemon's memory maps, read
//! from outside while the VM runs, hold the pool and nothing else of the guest.

use crate::env::{self, cmd, root, run};
use crate::{arm64pkg, board, guest, kernel, realboot};
use anyhow::{ensure, Result};
use std::time::Duration;

/// The package holding /usr/bin/qemu-storage-daemon.
const QSD_PACKAGE: &str = "qemu-system-common:arm64";

/// Debian's arm64 qemu-storage-daemon for the board, with every library it needs.
pub fn qsd_files() -> Result<board::Files> {
    arm64pkg::program_files(QSD_PACKAGE, "usr/bin/qemu-storage-daemon")
}

pub fn vhost_user_devices() -> Result<()> {
    let k = kernel::build(kernel::Role::Driver)?;
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let (root_token, host_token, two_token) = (
        realboot::token("vhost-root"),
        realboot::token("vhost-host"),
        realboot::token("vhost-two"),
    );
    let raw = dir.join("vhost-root.raw");
    guest::root_disk(
        "vhost-root",
        &[
            ("from-host.txt", host_token.as_bytes().to_vec()),
            ("vqpoke", guest::tool("vqpoke")?),
        ],
        &raw,
        16384,
    )?;
    let qcow2 = dir.join("vhost-root.qcow2");
    env::ensure_apt(&["qemu-utils"])?;
    run(cmd("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2))?;
    let mut two = two_token.as_bytes().to_vec();
    two.resize(1 << 20, 0);
    // Two vhost-user disks and nothing else: the console is the UART.
    let vm = "[[device]]\nkind = \"vhost-user\"\nsocket = \"/tmp/vhost-root.sock\"\ndevice = \"blk\"\n\
              [[device]]\nkind = \"vhost-user\"\nsocket = \"/tmp/vhost-two.sock\"\ndevice = \"blk\"\n";
    let mut files: board::Files = vec![
        ("guest/Image".to_owned(), std::fs::read(&k.image)?),
        ("guest/vhost-root.qcow2".to_owned(), std::fs::read(&qcow2)?),
        ("guest/vhost-two.img".to_owned(), two),
        ("guest/vhost.toml".to_owned(), vm.as_bytes().to_vec()),
    ];
    files.extend(qsd_files()?);
    let outbox = dir.join("board-vhost.outbox");
    let r = board::run_with(
        "board-vhost",
        &[("ROOT_TOKEN", &root_token)],
        files,
        Duration::from_secs(1200),
        Some(&outbox),
    )?;
    let log = r.log_path.display();
    ensure!(!r.timed_out, "the board did not finish (log: {log})");
    let o = r.outer();
    ensure!(o.passed("kvm_device"), "no /dev/kvm in the board");
    ensure!(
        o.passed("qsd_started"),
        "qemu-storage-daemon did not start (log: {log})"
    );
    let g = r.part("vhost");
    ensure!(
        g.value("splitvirt_exit") == Some("0") && g.log.contains("@@ DONE"),
        "the vhost-user VM did not power off by itself: splitvirt exited {:?} (log: {log})",
        g.value("splitvirt_exit")
    );
    ensure!(
        g.root_is_vda2() && g.value("root_type") == Some("ext4"),
        "root=/dev/vda2 over vhost-user: root is device {:?} ({:?}), vda2 is {:?} (log: {log})",
        g.value("root_dev"),
        g.value("root_type"),
        g.value("vda2_dev")
    );
    ensure!(
        g.value("host_file") == Some(host_token.as_str()),
        "the root's file from the host read {:?}",
        g.value("host_file")
    );
    ensure!(
        g.value("vdb_text") == Some(two_token.as_str()),
        "the second vhost-user disk read {:?}, it holds {two_token}",
        g.value("vdb_text")
    );
    // What the daemon was handed: the pool's memfd alone, within the pool's size.
    let names = o.value("qsd_memfd_names").unwrap_or_default().trim();
    ensure!(
        names == "/memfd:splitvirt-pool",
        "qemu-storage-daemon maps memfds {names:?}, want the pool's alone (log: {log})"
    );
    // The default VM's pool (64 MiB at 0x5000_0000, as kvmboot reads it in the guest's DT).
    let pool = 64u64 << 20;
    for range in o
        .value("qsd_memfd_ranges")
        .unwrap_or_default()
        .split_whitespace()
    {
        let size = range
            .split_once('-')
            .and_then(|(a, b)| {
                Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
            })
            .unwrap_or(u64::MAX);
        ensure!(
            size <= pool,
            "qemu-storage-daemon maps {range} of a memfd, more than the {pool:#x}-byte pool"
        );
    }
    // The hostile driver's rings: the device needs a reset, splitvirt said so once, the root
    // disk carried on (the file below).
    let status = g
        .value("vq_status")
        .and_then(|s| u8::from_str_radix(s.trim_start_matches("0x"), 16).ok());
    ensure!(
        status.is_some_and(|s| s & 0x40 != 0),
        "rings outside the pool: device status {:?}, want DEVICE_NEEDS_RESET (0x40) (log: {log})",
        g.value("vq_status")
    );
    ensure!(
        o.value("needs_reset_lines") == Some("1"),
        "splitvirt logged {:?} 'needs reset' lines, want 1 (log: {log})",
        o.value("needs_reset_lines")
    );
    let back = dir.join("vhost-outbox");
    board::unpack_outbox(&r, &outbox, &back)?;
    let found = guest::read_from_qcow2_p2(&back.join("vhost-root.qcow2"), "from-guest.txt")?;
    ensure!(
        found.trim() == root_token,
        "the qcow2 root image holds {found:?}, the guest wrote {root_token}"
    );
    println!(
        "vhost-user: root file system over qemu-storage-daemon, its maps hold the pool alone, \
         a hostile ring address failed only its device"
    );
    Ok(())
}
