//! Boot timing and memory figures for `splitvirt run --stats`: when the guest's first console
//! byte and a marker line appear, and what splitvirt itself holds in memory.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The line Linux prints as it starts userspace.
pub const INIT_MARKER: &[u8] = b"Run /init as init process";

static PROCESS_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
static FIRST_RUN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// When the process started, as near as it can say: the first call (splitvirt's `main` makes
/// it first thing), so that `--stats` counts splitvirt's own start-up too.
pub fn process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}

/// The first vCPU is about to enter the guest for the first time.
pub fn first_run() {
    FIRST_RUN.get_or_init(|| process_start().elapsed());
}

/// Start-up steps as they end, each with its time since the process's start.
static PHASES: std::sync::Mutex<Vec<(&'static str, Duration)>> = std::sync::Mutex::new(Vec::new());

/// Start-up step `name` just ended (a few per boot: where the time to the first `KVM_RUN`
/// goes).
pub fn phase(name: &'static str) {
    let at = process_start().elapsed();
    PHASES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((name, at));
}

/// The steps so far as `name:ms,name:ms`, in order.
pub fn phases() -> String {
    let p = PHASES.lock().unwrap_or_else(|e| e.into_inner());
    let parts: Vec<String> = p
        .iter()
        .map(|(n, d)| format!("{n}:{}", d.as_millis()))
        .collect();
    parts.join(",")
}

/// From the process's start to the guest's first instruction (None before it).
pub fn until_first_run() -> Option<Duration> {
    FIRST_RUN.get().copied()
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub first_byte: Option<Duration>,
    pub marker: Option<Duration>,
}

/// A console writer that records when output starts and when the marker first goes by.
pub struct TimedConsole<W: Write> {
    out: W,
    start: Instant,
    marker: &'static [u8],
    /// The last marker.len() - 1 bytes, so that a marker split across writes is still seen.
    tail: Vec<u8>,
    pub timings: Arc<Mutex<Timings>>,
}

impl<W: Write> TimedConsole<W> {
    pub fn new(out: W, start: Instant, marker: &'static [u8]) -> Self {
        TimedConsole {
            out,
            start,
            marker,
            tail: Vec::new(),
            timings: Arc::default(),
        }
    }
}

impl<W: Write> Write for TimedConsole<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        let mut t = self.timings.lock().unwrap_or_else(|e| e.into_inner());
        if n > 0 && t.first_byte.is_none() {
            t.first_byte = Some(self.start.elapsed());
        }
        if t.marker.is_none() && !self.marker.is_empty() {
            self.tail.extend_from_slice(&buf[..n]);
            if self
                .tail
                .windows(self.marker.len())
                .any(|w| w == self.marker)
            {
                t.marker = Some(self.start.elapsed());
                self.tail.clear();
            } else {
                let keep = self.marker.len() - 1;
                let cut = self.tail.len().saturating_sub(keep);
                self.tail.drain(..cut);
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// splitvirt's own resident memory in KiB, guest RAM excluded: anonymous and file pages
/// (`status`, /proc/self/status), less what the mappings of guest RAM that start in `guest`
/// (host address, length) hold (`smaps`, /proc/self/smaps); the pool, a memfd, is shared
/// memory and never counted.
pub fn own_rss_kib(status: &str, smaps: &str, guest: &[(u64, u64)]) -> Option<u64> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    let mut in_guest = false;
    let mut guest_kib = 0u64;
    for l in smaps.lines() {
        let range = l.split_whitespace().next().and_then(|r| r.split_once('-'));
        if let Some(start) = range.and_then(|(a, _)| u64::from_str_radix(a, 16).ok()) {
            in_guest = guest.iter().any(|&(g, len)| (g..g + len).contains(&start));
        } else if let Some(kib) = l.strip_prefix("Rss:").filter(|_| in_guest) {
            guest_kib += kib.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    (field("RssAnon:")? + field("RssFile:")?).checked_sub(guest_kib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_first_byte_and_a_marker_split_across_writes() {
        let mut c = TimedConsole::new(Vec::new(), Instant::now(), b"Run /init");
        let t = c.timings.clone();
        assert_eq!(*t.lock().unwrap(), Timings::default());
        c.write_all(b"[0.1] booting\n[0.9] Run /i").unwrap();
        assert!(t.lock().unwrap().first_byte.is_some());
        assert!(t.lock().unwrap().marker.is_none());
        c.write_all(b"nit as init process\n").unwrap();
        assert!(t.lock().unwrap().marker.is_some());
        assert!(c.tail.len() < 9);
    }

    #[test]
    fn phases_come_out_in_order_with_their_times() {
        phase("first-step");
        phase("second-step");
        let p = phases();
        let (a, b) = (
            p.find("first-step:").unwrap(),
            p.find("second-step:").unwrap(),
        );
        assert!(a < b, "{p}");
        let ms = |at: usize| p[at..].split([':', ',']).nth(1).unwrap().parse::<u64>();
        assert!(ms(a).unwrap() <= ms(b).unwrap(), "{p}");
    }

    #[test]
    fn reads_rss_without_guest_ram() {
        let status = "Name:\tsplitvirt\nRssAnon:\t  101200 kB\nRssFile:\t     800 kB\nRssShmem:\t  524288 kB\n";
        let smaps = "40000000-48000000 rw-p 00000000 00:00 0\nSize: 131072 kB\nRss: 100000 kB\n\
                     VmFlags: rd wr mr mw me ac hg\n\
                     55550000-55560000 rw-p 00000000 00:00 0 [heap]\nSize: 64 kB\nRss: 64 kB\n";
        let guest = [(0x4000_0000, 0x0800_0000)];
        assert_eq!(own_rss_kib(status, smaps, &guest), Some(2000));
        assert_eq!(own_rss_kib(status, smaps, &[]), Some(102_000));
        assert_eq!(own_rss_kib("Name: x\n", smaps, &guest), None);
    }
}
