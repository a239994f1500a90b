//! Issue 7 on KVM in the board: two guests joined by two cross-VM connectors, `chan` (64 KiB)
//! and `bulk` (2 MiB). Each loads the project's `connection` module (built out of tree against
//! the guest kernel) and runs the guest library's `conn` CLI. `cargo xtask kvmconn` checks:
//! the seed's userspace snippet, 10 000 checked round trips, a 16 MiB stream through the bulk
//! area with matching hashes, and the pong VM killed mid-exchange and replaced. `cargo xtask
//! bench conn` measures event round trips and guest-to-guest bandwidth against memcpy.

use crate::env::root;
use crate::qemu::Run;
use crate::{board, guest, kernel};
use anyhow::{ensure, Context, Result};
use std::time::Duration;

pub const ROUNDS: &str = "10000";
/// Round trips in the restart phase; the peer is killed a few seconds into it.
const RESTART_ROUNDS: &str = "3000";
const STREAM_BYTES: &str = "16777216";
/// Events emitted back to back on `bulk`, each of which the peer must count.
const STORM: &str = "10000";

fn run(mode: &str, rounds: &str) -> Result<Run> {
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
    let conn = "vcpus = 1\n\
                [[device]]\nkind = \"connector\"\nname = \"chan\"\n\
                dataport_size = \"64K\"\npeer = \"/tmp/conn.sock\"\n\
                [[device]]\nkind = \"connector\"\nname = \"bulk\"\n\
                dataport_size = \"BULK\"\npeer = \"/tmp/bulk.sock\"\n";
    // The bench streams in chunks large enough that copying, not the event round trip, sets
    // the pace.
    let mut conn = conn.replace("BULK", if mode == "bench" { "32M" } else { "2M" });
    // HALT_POLL_US=N: both VMs' `halt_poll_us` (unset: the host's default), to see what the
    // round trip owes to KVM's halt polling.
    if let Some(us) = crate::bench::halt_poll_us()? {
        conn = format!("halt_poll_us = {us}\n{conn}");
    }
    let mut files = vec![
        ("guest/conn.toml".to_owned(), conn.as_bytes().to_vec()),
        ("guest/Image".to_owned(), std::fs::read(&k.image)?),
        ("guest/conn.cpio".to_owned(), std::fs::read(&initrd)?),
    ];
    if mode == "bench" {
        let exe = crate::cross::example("rpc", "roundtrip")?;
        files.push(("roundtrip".to_owned(), std::fs::read(exe)?));
    }
    let r = board::run(
        "board-conn",
        &[
            ("ROUNDS", rounds),
            ("MODE", mode),
            ("STORM", STORM),
            // TRACE=faults (bench conn): each VM's stage-2 faults and exits, by address.
            ("TRACE", &std::env::var("TRACE").unwrap_or_default()),
        ],
        files,
        Duration::from_secs(1500),
    )?;
    ensure!(
        !r.timed_out,
        "the board did not finish (log: {})",
        r.log_path.display()
    );
    Ok(r)
}

pub fn connect_two_vms() -> Result<()> {
    let r = run("test", ROUNDS)?;
    let log = r.log_path.display();
    let (a, b, b2) = (r.part("ping"), r.part("pong"), r.part("pong2"));
    for (p, side) in [(&a, "ping"), (&b, "pong"), (&b2, "pong2")] {
        ensure!(
            p.passed("insmod") && p.value("uio_names") == Some("chan bulk"),
            "{side}: the connection module did not give UIO devices chan and bulk: {:?} \
             (log: {log})",
            p.value("uio_names")
        );
        ensure!(
            p.value("uio_maps") == Some("map0 map1"),
            "{side}: UIO maps {:?}, want map0 map1",
            p.value("uio_maps")
        );
        ensure!(
            p.value("msix_connectors") == Some("2"),
            "{side}: {:?} of 2 connectors take their events by MSI-X (log: {log})",
            p.value("msix_connectors")
        );
    }
    // A storm of events, counted exactly: every emit is one event in the peer's page, and the
    // peer's driver acknowledges what it reads.
    ensure!(
        a.value("emitted_bulk") == Some(STORM) && b.value("storm_events") == Some(STORM),
        "event storm: A emitted {:?}, B counted {:?}, want {STORM} each (log: {log})",
        a.value("emitted_bulk"),
        b.value("storm_events")
    );
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
    // A plain C program on the seed's mappings: the name through printf, a message each way
    // through strcpy and memcpy.
    ensure!(
        a.value("send_name_bulk") == Some("bulk")
            && b.value("recv_bulk") == Some("plain-from-a")
            && a.value("recv_bulk") == Some("plain-from-b"),
        "plain C on the seed's mappings: name {:?}, B got {:?}, A got {:?} (log: {log})",
        a.value("send_name_bulk"),
        b.value("recv_bulk"),
        a.value("recv_bulk")
    );
    // The event page is memory: a load pair and a vector load read the name.
    for how in ["ldp", "ld1"] {
        let want = "6368616e000000000000000000000000"; // "chan", then NULs
        ensure!(
            a.value(&format!("loads_event_{how}")) == Some(want),
            "a {how} of the event page's name gave {:?}, want {want} (log: {log})",
            a.value(&format!("loads_event_{how}"))
        );
    }
    ensure!(
        a.value("ping_rounds") == Some(ROUNDS),
        "{:?} of {ROUNDS} round trips checked (log: {log})",
        a.value("ping_rounds")
    );
    // A new mapping of the dataport takes no fault on its first stores (one per page, 128
    // here, where the module left its entries clean: 3x slower copies without FEAT_HAFDBS).
    let faults: Option<u64> = a.value("alone_copy_in_faults").and_then(|f| f.parse().ok());
    ensure!(
        faults.is_some_and(|f| f < 32),
        "a first 512 KiB fill of the bulk dataport took {faults:?} page faults, want almost none: the connection module's mmap should map writable memory dirty (log: {log})"
    );
    // The second connector: 16 MiB through the bulk area, the same bytes on the other side.
    let (sent, got) = (a.value("stream_fnv"), b.value("sink_fnv"));
    ensure!(
        sent.is_some()
            && sent == got
            && a.value("stream_bytes") == Some(STREAM_BYTES)
            && b.value("sink_bytes") == Some(STREAM_BYTES),
        "bulk stream: sent {:?} bytes hash {sent:?}, received {:?} bytes hash {got:?} (log: {log})",
        a.value("stream_bytes"),
        b.value("sink_bytes")
    );
    // The peer killed mid-exchange: the survivor timed out, then the channel worked again
    // with the VM that replaced it.
    let timeouts: u64 = a
        .value("restart_timeouts")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ensure!(
        r.outer().passed("pong_killed"),
        "the pong VM was not killed (log: {log})"
    );
    ensure!(
        a.value("restart_rounds") == Some(RESTART_ROUNDS) && timeouts >= 1,
        "restart phase: {:?} of {RESTART_ROUNDS} rounds, {timeouts} timeouts (want at least \
         one) (log: {log})",
        a.value("restart_rounds")
    );
    let answered: u64 = b2
        .value("restart_answered")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ensure!(
        answered > 0,
        "the replacement VM answered no rounds (log: {log})"
    );
    // From the survivor's own log file, counted in the board: never the console stream.
    let o = r.outer();
    ensure!(
        o.value("ping_peer_gone").is_some_and(|n| n != "0"),
        "the survivor's splitvirt did not log the peer going away (log: {log})"
    );
    ensure!(
        o.value("ping_peer_back") == Some("yes"),
        "the survivor's splitvirt did not take the new peer (log: {log})"
    );
    for (p, side, want) in [(&a, "ping", "0"), (&b, "pong", "137"), (&b2, "pong2", "0")] {
        ensure!(
            p.value("splitvirt_exit") == Some(want),
            "{side}: splitvirt exit {:?}, want {want} (log: {log})",
            p.value("splitvirt_exit")
        );
    }
    println!(
        "  connector: {ROUNDS} checked round trips (median {} us, p99 {} us); 16 MiB over a \
         second connector; peer killed: {timeouts} timeouts, then {answered} rounds with its \
         replacement",
        a.value("ping_rtt_median_us").unwrap_or("?"),
        a.value("ping_rtt_p99_us").unwrap_or("?")
    );
    Ok(())
}

/// `cargo xtask bench conn`: event round trip and guest-to-guest bandwidth, in one board run.
pub fn bench() -> Result<()> {
    let r = run("bench", "2000")?;
    let log = r.log_path.display();
    let (a, b) = (r.part("ping"), r.part("pong"));
    let v = |p: &Run, k: &str| -> Result<String> {
        p.value(k)
            .map(str::to_owned)
            .with_context(|| format!("no {k} in the run (log: {log})"))
    };
    ensure!(
        v(&a, "stream_fnv")? == v(&b, "sink_fnv")?,
        "the stream arrived changed (log: {log})"
    );
    let mibs = |p: &Run, k: &str| -> Result<f64> { Ok(v(p, k)?.parse()?) };
    let copy = mibs(&a, "memcpy_mib_per_s")?;
    println!("cross-VM connector, two 1-vCPU guests on KVM in the board (nested, TCG)");
    println!("| measure | value |");
    println!("|---|---|");
    let floor = mibs(&r.outer(), "eventfd_floor_us")?;
    let spin_floor = mibs(&r.outer(), "spin_floor_us")?;
    let rtt = mibs(&a, "ping_rtt_median_us")?;
    let sleeping = mibs(&a, "sleeping_rtt_median_us")?;
    println!(
        "| message round trip (A sends, B answers, A has it; 2000 rounds), receivers polling {} us first (the library's default), median | {rtt:.0} us ({:.2}x the eventfd floor, {:.0}x the spin floor) |",
        v(&a, "ping_spin_us")?,
        rtt / floor,
        rtt / spin_floor,
    );
    println!("| the same, p99 | {} us |", v(&a, "ping_rtt_p99_us")?);
    println!(
        "| message round trip, receivers sleeping at once (each message an interrupt in the peer VM: the event round trip), median | {sleeping:.0} us (**{:.2}x** the eventfd floor) |",
        sleeping / floor
    );
    println!("| the same, p99 | {} us |", v(&a, "sleeping_rtt_p99_us")?);
    let long = mibs(&a, "longspin_rtt_median_us")?;
    println!(
        "| message round trip, receivers polling 5 ms first (longer than a round trip through interrupts here), median | {long:.0} us ({:.2}x the eventfd floor, {:.0}x the spin floor) |",
        long / floor,
        long / spin_floor
    );
    println!(
        "| eventfd ping-pong between two processes of the board (floor), median | {floor:.0} us |"
    );
    println!(
        "| shared-memory spin ping-pong between two processes of the board (floor), median | {spin_floor:.1} us |"
    );
    println!(
        "| one emit on the emitting vCPU (a trapped write; {STORM} back to back, B counted {}) | {} us |",
        v(&b, "storm_events")?,
        v(&a, "emit_us")?
    );
    println!(
        "| a halted vCPU polled for up to | {} |",
        crate::bench::halt_poll_us()?.map_or_else(
            || format!(
                "{} ns (the board's KVM default, halt_poll_ns)",
                r.outer().value("halt_poll_ns").unwrap_or("?")
            ),
            |us| format!("{us} us (halt_poll_us)")
        )
    );
    println!("| memcpy inside one guest, 15 MiB chunks, 128 MiB | {copy:.0} MiB/s |");
    let window = mibs(&a, "memcpy_window_mib_per_s")?;
    println!(
        "| memcpy inside one guest into two alternating 15 MiB buffers (the dataport's pattern) | {window:.0} MiB/s ({:.2}x memcpy) |",
        window / copy
    );
    for (p, k, what) in [
        (
            &a,
            "stream_copy_in_mib_per_s",
            "copy into the dataport (A's copies alone)",
        ),
        (
            &b,
            "sink_copy_out_mib_per_s",
            "copy out of the dataport (B's copies alone)",
        ),
        (
            &a,
            "stream_mib_per_s",
            "guest to guest, A's first copy to B's last acknowledgement (two chunks in flight)",
        ),
    ] {
        let x = mibs(p, k)?;
        println!("| {what} | {x:.0} MiB/s ({:.2}x memcpy) |", x / copy);
    }
    println!(
        "| page faults of A's first copy into the dataport (128 MiB over two 15 MiB windows; one per page where a new mapping is not writable yet) | {} |",
        v(&a, "alone_copy_in_faults")?
    );
    for line in r.outer().log.lines().filter(|l| l.contains("@@ FAULTS")) {
        println!("{line}");
    }
    Ok(())
}
