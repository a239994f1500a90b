//! Runs a guest under qemu-system-aarch64 and collects its console, bounded in time.

use crate::env;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const APT: &[&str] = &["qemu-system-arm"];

pub struct Run {
    pub log: String,
    pub log_path: PathBuf,
    pub timed_out: bool,
    pub seconds: f64,
}

impl Run {
    pub fn results(&self) -> Vec<(&str, &str, &str)> {
        self.log
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').split_once("@@ RESULT "))
            .map(|(_, r)| {
                let mut p = r.splitn(3, ' ');
                (
                    p.next().unwrap_or(""),
                    p.next().unwrap_or(""),
                    p.next().unwrap_or(""),
                )
            })
            .collect()
    }

    pub fn value(&self, name: &str) -> Option<&str> {
        let key = format!("@@ VALUE {name} ");
        self.log.lines().find_map(|l| {
            l.trim_end_matches('\r')
                .split_once(key.as_str())
                .map(|(_, v)| v.trim())
        })
    }

    /// Every value of `name`, in order (a value printed once per round).
    pub fn values(&self, name: &str) -> Vec<&str> {
        let key = format!("@@ VALUE {name} ");
        self.log
            .lines()
            .filter_map(|l| {
                l.trim_end_matches('\r')
                    .split_once(key.as_str())
                    .map(|(_, v)| v.trim())
            })
            .collect()
    }

    /// The lines of one inner console (`prefix| ...`), as a run of their own.
    pub fn part(&self, prefix: &str) -> Run {
        let tag = format!("{prefix}| ");
        let log = self
            .log
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(tag.as_str()))
            .collect::<Vec<_>>()
            .join("\n");
        self.with_log(log)
    }

    /// The board's own lines, without the inner consoles.
    pub fn outer(&self) -> Run {
        let log = self
            .log
            .lines()
            .filter(|l| !l.contains("| "))
            .collect::<Vec<_>>()
            .join("\n");
        self.with_log(log)
    }

    /// The same run seen through a subset of its console.
    fn with_log(&self, log: String) -> Run {
        Run {
            log,
            log_path: self.log_path.clone(),
            timed_out: self.timed_out,
            seconds: self.seconds,
        }
    }

    /// The guest's root file system is /dev/vda2 (the device numbers it printed match).
    pub fn root_is_vda2(&self) -> bool {
        self.value("vda2_dev").is_some_and(|v| !v.is_empty())
            && self.value("root_dev") == self.value("vda2_dev")
    }

    pub fn passed(&self, name: &str) -> bool {
        self.results()
            .iter()
            .any(|(n, r, _)| *n == name && *r == "PASS")
    }
}

/// Runs `qemu` with the args; the console goes to `log` (and is returned). The guest ends by
/// powering off; past `timeout` it is killed and the run says so.
pub fn run(args: &[String], log: &Path, timeout: Duration) -> Result<Run> {
    env::ensure_apt(APT)?;
    let file = std::fs::File::create(log)?;
    let t = Instant::now();
    let mut child = Command::new("qemu-system-aarch64")
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("cannot start qemu-system-aarch64")?;
    let mut timed_out = false;
    let mut watch = Lockup::default();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if t.elapsed() > timeout || watch.seen(log) {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    finished(log, timed_out, t)
}

/// What the emulated machine's kernel prints when one of its CPUs stopped taking interrupts
/// (seen once in a board whose CPU 0 then never came back, RCU stalls every minute after):
/// such a run can only time out, so it ends at once, as timed out.
const LOCKUP: &str = "Watchdog detected hard LOCKUP";

fn said_lockup() {
    println!("  the board's kernel reports a hard lockup of a CPU: ending it now");
}

/// Reads a growing console log for `LOCKUP`, a few times a second at most.
#[derive(Default)]
struct Lockup {
    read: u64,
    checks: u32,
}

impl Lockup {
    fn seen(&mut self, log: &Path) -> bool {
        use std::io::{Read, Seek};
        self.checks += 1;
        if !self.checks.is_multiple_of(20) {
            return false;
        }
        let Ok(mut f) = std::fs::File::open(log) else {
            return false;
        };
        // Back a little, so that a line split between two reads is still found.
        let from = self.read.saturating_sub(LOCKUP.len() as u64);
        let mut new = Vec::new();
        if f.seek(std::io::SeekFrom::Start(from)).is_err() || f.read_to_end(&mut new).is_err() {
            return false;
        }
        self.read = from + new.len() as u64;
        let found = String::from_utf8_lossy(&new).contains(LOCKUP);
        if found {
            said_lockup();
        }
        found
    }
}

/// The run whose console is in `log`, started at `t`.
fn finished(log: &Path, timed_out: bool, t: Instant) -> Result<Run> {
    let bytes = std::fs::read(log)?;
    Ok(Run {
        log: String::from_utf8_lossy(&bytes).into_owned(),
        log_path: log.to_owned(),
        timed_out,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// `run`, handing each console line to `on_line` as it arrives (a live view of a long boot).
pub fn run_streaming(
    args: &[String],
    log: &Path,
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> Result<Run> {
    use std::io::{BufRead, Write};
    env::ensure_apt(APT)?;
    let mut file = std::fs::File::create(log)?;
    let t = Instant::now();
    let mut child = Command::new("qemu-system-aarch64")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-aarch64")?;
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(pipe);
            let mut line = Vec::new();
            while r.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                if tx.send(std::mem::take(&mut line)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                file.write_all(&line)?;
                let text = String::from_utf8_lossy(&line);
                on_line(text.trim_end());
                if text.contains(LOCKUP) {
                    said_lockup();
                    let _ = child.kill();
                    timed_out = true;
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            timed_out = true;
            break;
        }
    }
    let _ = child.wait();
    drop(file);
    finished(log, timed_out, t)
}

/// The board on this terminal, both ways: for a shell in a guest. No log, no time limit.
pub fn run_interactive(args: &[String]) -> Result<Run> {
    env::ensure_apt(APT)?;
    let t = Instant::now();
    let st = Command::new("qemu-system-aarch64")
        .args(args)
        .status()
        .context("cannot start qemu-system-aarch64")?;
    anyhow::ensure!(st.success(), "qemu-system-aarch64 ended with {st}");
    Ok(Run {
        log: String::new(),
        log_path: PathBuf::new(),
        timed_out: false,
        seconds: t.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hard_lockup_in_a_growing_log_is_seen_even_split_between_reads() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("xtask-lockup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let mut f = std::fs::File::create(&log).unwrap();
        let mut w = Lockup::default();
        let seen_after = |f: &mut std::fs::File, text: &str, w: &mut Lockup| {
            f.write_all(text.as_bytes()).unwrap();
            (0..20).any(|_| w.seen(&log))
        };
        assert!(!seen_after(
            &mut f,
            "[ 31.5] rcu: INFO: rcu_sched detected stalls\n",
            &mut w
        ));
        assert!(!seen_after(
            &mut f,
            "[ 44.3] watchdog: Watchdog detec",
            &mut w
        ));
        assert!(seen_after(&mut f, "ted hard LOCKUP on cpu 0\n", &mut w));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
