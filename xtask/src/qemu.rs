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
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let bytes = std::fs::read(log)?;
    Ok(Run {
        log: String::from_utf8_lossy(&bytes).into_owned(),
        log_path: log.to_owned(),
        timed_out,
        seconds: t.elapsed().as_secs_f64(),
    })
}
