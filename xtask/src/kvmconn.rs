//! Issue 7's end-to-end test: two guests on KVM in the board joined by a cross-VM connector.
//! Each loads the project's `connection` module (built out of tree against the guest kernel);
//! one runs the seed's userspace snippet, then both exchange checked messages over the
//! dataport, woken by the connector's events.

use crate::env::root;
use crate::{board, guest, kernel};
use anyhow::{ensure, Result};
use std::time::Duration;

pub const ROUNDS: &str = "10000";

pub fn connect_two_vms() -> Result<()> {
    let k = kernel::build(kernel::Role::Driver)?;
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("kvm-conn.cpio");
    guest::initramfs_with(
        "kvm-conn",
        &[],
        &[
            ("connection.ko", guest::kernel_module(&k, "connection")?),
            ("conntest", guest::tool("conntest")?),
            (
                "conn",
                std::fs::read(crate::cross::binary("connection", "conn")?)?,
            ),
        ],
        &initrd,
    )?;
    // One vCPU each: two guests share the board's two emulated CPUs.
    let conn = "vcpus = 1\n[[device]]\nkind = \"connector\"\nname = \"chan\"\n\
                dataport_size = \"64K\"\npeer = \"/tmp/conn.sock\"\n";
    let files = vec![
        ("guest/conn.toml".to_owned(), conn.as_bytes().to_vec()),
        ("guest/Image".to_owned(), std::fs::read(&k.image)?),
        ("guest/conn.cpio".to_owned(), std::fs::read(&initrd)?),
    ];
    let r = board::run(
        "board-conn",
        &[("ROUNDS", ROUNDS)],
        files,
        Duration::from_secs(1200),
    )?;
    let log = r.log_path.display();
    ensure!(!r.timed_out, "the board did not finish (log: {log})");
    let (a, b) = (r.part("ping"), r.part("pong"));
    for (p, side) in [(&a, "ping"), (&b, "pong")] {
        ensure!(
            p.passed("insmod") && p.value("uio_name") == Some("chan"),
            "{side}: the connection module did not give /dev/uio0 named chan: {:?} (log: {log})",
            p.value("uio_name")
        );
        ensure!(
            p.value("uio_maps") == Some("map0 map1"),
            "{side}: UIO maps {:?}, want map0 map1",
            p.value("uio_maps")
        );
        ensure!(
            p.value("rounds_ok") == Some(ROUNDS) && p.value("splitvirt_exit") == Some("0"),
            "{side}: {:?} of {ROUNDS} round trips checked, splitvirt exit {:?} (log: {log})",
            p.value("rounds_ok"),
            p.value("splitvirt_exit")
        );
    }
    // The guest library's channel, through its CLI, one message each way.
    ensure!(
        a.passed("conn_send")
            && b.passed("conn_send")
            && b.value("conn_message") == Some("hello-from-a")
            && a.value("conn_reply") == Some("hello-from-b"),
        "conn CLI: B got {:?}, A got {:?} (log: {log})",
        b.value("conn_message"),
        a.value("conn_reply")
    );
    ensure!(
        a.passed("seed_snippet") && a.value("seed_name") == Some("chan"),
        "the seed's snippet: {:?} (log: {log})",
        a.value("seed_name")
    );
    println!(
        "  connector: {ROUNDS} checked round trips between two VMs, median {} us, p99 {} us",
        a.value("rtt_median_us").unwrap_or("?"),
        a.value("rtt_p99_us").unwrap_or("?")
    );
    Ok(())
}
