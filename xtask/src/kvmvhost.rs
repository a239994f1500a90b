//! `cargo xtask kvmvhost`: vhost-user devices on KVM in the board, served by third-party
//! backends: Debian's arm64 qemu-storage-daemon (unpacked with its libraries) exports the
//! guest's root file system (a qcow2 image) and a second disk, whose device is then given
//! rings outside the pool by a hostile driver; Debian trixie's virtiofsd shares a directory
//! (the guest reads a file of the board's and writes one the board finds); vhost-device-vsock,
//! built from crates.io, carries a 4 MiB echo between the board and the guest, and
//! vhost-device-console (crates.io too) a line from the guest's /dev/hvc0 to a TCP
//! connection in the board; a disk's own
//! qemu-storage-daemon is killed and started again while the guest writes to it. Each
//! backend's memory maps, read from outside while the VM runs, hold the pool and nothing else
//! of the guest.

use crate::env::{self, cmd, root, run};
use crate::guest::AptSource;
use crate::{arm64pkg, board, cross, guest, kernel, realboot};
use anyhow::{ensure, Result};
use std::time::Duration;

/// The package holding /usr/bin/qemu-storage-daemon.
const QSD_PACKAGE: &str = "qemu-system-common:arm64";

/// Debian's arm64 qemu-storage-daemon for the board, with every library it needs.
pub fn qsd_files() -> Result<board::Files> {
    arm64pkg::program_files(QSD_PACKAGE, "usr/bin/qemu-storage-daemon")
}

/// virtiofsd is not in Debian 12: trixie's, with trixie's C library, under /opt/trixie.
pub fn virtiofsd_files() -> Result<board::Files> {
    arm64pkg::program_files_from(
        AptSource::Release("trixie"),
        "opt/trixie/",
        "virtiofsd:arm64",
        "usr/libexec/virtiofsd",
    )
}

/// The vsock backend of rust-vmm's vhost-device family, at a version whose published lock
/// file builds with Debian's rustc.
pub fn vsock_backend() -> Result<std::path::PathBuf> {
    cross::crates_io_program("vhost-device-vsock", "0.3.0")
}

/// The console backend of the same family (multiport, one port; its network backend).
pub fn console_backend() -> Result<std::path::PathBuf> {
    cross::crates_io_program("vhost-device-console", "0.1.0")
}

pub fn vhost_user_devices() -> Result<()> {
    let k = kernel::build(kernel::Role::Driver)?;
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let (root_token, host_token, two_token, fs_token, console_token) = (
        realboot::token("vhost-root"),
        realboot::token("vhost-host"),
        realboot::token("vhost-two"),
        realboot::token("vhost-fs"),
        realboot::token("vhost-console"),
    );
    let vsockecho = guest::tool("vsockecho")?;
    let raw = dir.join("vhost-root.raw");
    guest::root_disk(
        "vhost-root",
        &[
            ("from-host.txt", host_token.as_bytes().to_vec()),
            ("vqpoke", guest::tool("vqpoke")?),
            ("vsockecho", vsockecho.clone()),
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
    // vhost-user devices and nothing else: the console is the UART.
    let vm = "[[device]]\nkind = \"vhost-user\"\nsocket = \"/tmp/vhost-root.sock\"\ndevice = \"blk\"\n\
              [[device]]\nkind = \"vhost-user\"\nsocket = \"/tmp/vhost-two.sock\"\ndevice = \"blk\"\n\
              [[device]]\nkind = \"vhost-user\"\nsocket = \"/tmp/vhost-fs.sock\"\ndevice = \"fs\"\n\
              [[device]]\nkind = \"vhost-user\"\nsocket = \"/tmp/vhost-vsock.sock\"\ndevice = \"vsock\"\n\
              [[device]]\nkind = \"vhost-user\"\nsocket = \"/tmp/vhost-re.sock\"\ndevice = \"blk\"\n\
              [[device]]\nkind = \"vhost-user\"\nsocket = \"/tmp/vhost-console.sock0\"\ndevice = \"console\"\nqueues = 4\n";
    let mut files: board::Files = vec![
        ("guest/Image".to_owned(), std::fs::read(&k.image)?),
        ("guest/vhost-root.qcow2".to_owned(), std::fs::read(&qcow2)?),
        ("guest/vhost-two.img".to_owned(), two),
        ("guest/vhost.toml".to_owned(), vm.as_bytes().to_vec()),
        ("guest/vsockecho".to_owned(), vsockecho),
        (
            "usr/local/bin/vhost-device-vsock".to_owned(),
            std::fs::read(vsock_backend()?)?,
        ),
        (
            "usr/local/bin/vhost-device-console".to_owned(),
            std::fs::read(console_backend()?)?,
        ),
    ];
    files.extend(qsd_files()?);
    files.extend(virtiofsd_files()?);
    let outbox = dir.join("board-vhost.outbox");
    let r = board::run_with(
        "board-vhost",
        &[
            ("ROOT_TOKEN", &root_token),
            ("FS_TOKEN", &fs_token),
            ("CONSOLE_TOKEN", &console_token),
        ],
        files,
        Duration::from_secs(1200),
        Some(&outbox),
    )?;
    let log = r.log_path.display();
    ensure!(!r.timed_out, "the board did not finish (log: {log})");
    let o = r.outer();
    ensure!(o.passed("kvm_device"), "no /dev/kvm in the board");
    ensure!(
        o.passed("qsd_started")
            && o.passed("virtiofsd_started")
            && o.passed("vsock_backend_started"),
        "a backend did not start: qemu-storage-daemon {}, virtiofsd {}, vhost-device-vsock {} \
         (log: {log})",
        o.passed("qsd_started"),
        o.passed("virtiofsd_started"),
        o.passed("vsock_backend_started")
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
    // What each backend was handed: the pool's memfd alone, within the pool's size.
    for (name, who) in [
        ("qsd", "qemu-storage-daemon"),
        ("virtiofsd", "virtiofsd"),
        ("vsock", "vhost-device-vsock"),
        ("console", "vhost-device-console"),
    ] {
        pool_alone(&o, name, who)?;
    }
    ensure!(
        g.passed("fs_mount") && g.value("fs_host_file") == Some(fs_token.as_str()),
        "virtio-fs from virtiofsd: mounted {}, the board's file read {:?}, want {fs_token} \
         (log: {log})",
        g.passed("fs_mount"),
        g.value("fs_host_file")
    );
    let want = format!("{fs_token}-from-guest");
    ensure!(
        o.value("fs_from_guest") == Some(want.as_str()),
        "the file the guest wrote over virtio-fs reads {:?} on the board, want {want} (log: {log})",
        o.value("fs_from_guest")
    );
    ensure!(
        o.value("vsock_echo") == Some("ok 4194304") && g.value("vsock_echoed") == Some("4194304"),
        "4 MiB over vsock through vhost-device-vsock: the board's end says {:?}, the guest \
         echoed {:?} bytes (log: {log})",
        o.value("vsock_echo"),
        g.value("vsock_echoed")
    );
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
    // virtio-console over vhost-device-console: the guest's line on the board's connection.
    let out = format!("{console_token}-from-guest");
    ensure!(
        o.passed("console_backend_started")
            && g.passed("console_hvc0")
            && o.value("console_out") == Some(out.as_str()),
        "virtio-console over vhost-device-console: the guest has /dev/hvc0: {}; the board read \
         {:?}, want {out} (log: {log})",
        g.passed("console_hvc0"),
        o.value("console_out")
    );
    // Each queue's kick an ioeventfd of KVM's: no thread of splitvirt's replays them.
    ensure!(
        o.value("notify_threads") == Some("0")
            && o.value("sv_threads").is_some_and(|t| t.contains("vcpu"))
            && o.value("uncaught_lines") == Some("0"),
        "splitvirt's threads ({:?}) include {:?} that replay notifications, or KVM caught not \
         every queue's ({:?} lines say so); each vhost-user queue's kick should be KVM's \
         (log: {log})",
        o.value("sv_threads"),
        o.value("notify_threads"),
        o.value("uncaught_lines")
    );
    // vdc's daemon killed and started again under the guest's writes.
    ensure!(
        o.passed("qsd2_started") && o.passed("qsd2_killed") && o.passed("qsd2_restarted"),
        "vdc's daemon was not started, killed and started again (log: {log})"
    );
    ensure!(
        o.value("reconnected_lines") == Some("1")
            && g.value("re_failed") == Some("0")
            && g.value("re_writes").is_some_and(|n| n != "0")
            && g.value("re_sha").is_some()
            && g.value("re_read_sha") == g.value("re_sha"),
        "vdc across its daemon's restart: splitvirt connected again {:?} times, the guest's \
         writes {:?} of which {:?} failed, read back {:?} for {:?} (log: {log})",
        o.value("reconnected_lines"),
        g.value("re_writes"),
        g.value("re_failed"),
        g.value("re_read_sha"),
        g.value("re_sha")
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
        "vhost-user: root file system over qemu-storage-daemon, a directory over virtiofsd, an \
         echo over vhost-device-vsock, a line over vhost-device-console; each backend's maps \
         hold the pool alone; a disk's daemon restarted under the guest's writes, none failed; \
         a hostile ring address failed only its device"
    );
    Ok(())
}

/// The backend `who` (values `NAME_memfd_names` and `NAME_memfd_ranges`, read from its
/// /proc/PID/maps while the VM ran) maps the pool's memfd and no other, none of it past the
/// pool's size.
fn pool_alone(o: &crate::qemu::Run, name: &str, who: &str) -> Result<()> {
    let log = o.log_path.display();
    let names = o
        .value(&format!("{name}_memfd_names"))
        .unwrap_or_default()
        .trim();
    ensure!(
        names == "/memfd:splitvirt-pool",
        "{who} maps memfds {names:?}, want the pool's alone (log: {log})"
    );
    // The default VM's pool (64 MiB at 0x5000_0000, as kvmboot reads it in the guest's DT).
    let pool = 64u64 << 20;
    for range in o
        .value(&format!("{name}_memfd_ranges"))
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
            "{who} maps {range} of a memfd, more than the {pool:#x}-byte pool (log: {log})"
        );
    }
    Ok(())
}
