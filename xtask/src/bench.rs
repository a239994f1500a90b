//! `cargo xtask bench boot`: boot timings and splitvirt's own memory, measured on KVM inside
//! the board, printed as a table (a benchmark, never a pass/fail test).

use crate::env::root;
use crate::{board, guest, kernel};
use anyhow::{ensure, Result};
use std::time::Duration;

const RUNS: usize = 5;

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

pub fn boot() -> Result<()> {
    let k = kernel::build(kernel::Role::Driver)?;
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("quick.cpio");
    guest::initramfs("quick", &[], &initrd)?;
    let files = vec![
        (
            "guest/nodisk.toml".to_owned(),
            b"[[device]]\nkind = \"virtio-console\"\n".to_vec(),
        ),
        ("guest/Image".to_owned(), std::fs::read(&k.image)?),
        ("guest/initrd.cpio".to_owned(), std::fs::read(&initrd)?),
    ];
    let runs = RUNS.to_string();
    let r = board::run(
        "bench-boot",
        &[("RUNS", &runs)],
        files,
        Duration::from_secs(1200),
    )?;
    ensure!(
        !r.timed_out,
        "the board timed out (log: {})",
        r.log_path.display()
    );
    let mut rows = Vec::new();
    for i in 1..=RUNS {
        let p = r.part(&format!("run{i}"));
        let stats = p
            .log
            .lines()
            .find(|l| l.contains("splitvirt-stats:"))
            .unwrap_or_default()
            .to_owned();
        let (Some(first), Some(init), Some(end), Some(rss)) = (
            field(&stats, "first_console_ms"),
            field(&stats, "init_ms"),
            field(&stats, "end_ms"),
            field(&stats, "own_rss_kib"),
        ) else {
            anyhow::bail!(
                "run {i} printed no complete stats line: {stats:?} (log: {})",
                r.log_path.display()
            );
        };
        let up = p.value("up").unwrap_or("-").to_owned();
        rows.push((first, init, end, rss, up));
    }
    println!(
        "\nsplitvirt boot on KVM inside the board ({RUNS} runs; the board is TCG-emulated arm64)"
    );
    println!(
        "{:>4} {:>16} {:>10} {:>12} {:>16} {:>18}",
        "run", "first output ms", "init ms", "power-off ms", "guest uptime s", "own RSS KiB"
    );
    for (i, (f, n, e, r, u)) in rows.iter().enumerate() {
        println!("{:>4} {f:>16} {n:>10} {e:>12} {u:>16} {r:>18}", i + 1);
    }
    let col = |i: usize| median(rows.iter().map(|r| [r.0, r.1, r.2, r.3][i]).collect());
    println!(
        "{:>4} {:>16} {:>10} {:>12} {:>16} {:>18}",
        "med",
        col(0),
        col(1),
        col(2),
        "",
        col(3)
    );
    Ok(())
}
