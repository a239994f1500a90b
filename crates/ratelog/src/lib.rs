//! Rate-limited logging. A guest or a backend can provoke a message as often as it likes; each
//! call site here lets [`BURST`] messages through per [`WINDOW`], then counts the rest and says
//! how many it dropped when it next speaks. No allocation and no lock: one call site is three
//! atomics. (The `log` ecosystem has no well-kept crate for this; `governor` is a general rate
//! limiter with far more than two counters behind it.)
//!
//! ```
//! ratelog::warn!("guest wrote {:#x} to a read-only register", 0x10);
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Messages a call site may log per window.
pub const BURST: u64 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One call site's budget.
pub struct Limiter {
    window: AtomicU64,
    used: AtomicU64,
    dropped: AtomicU64,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

impl Limiter {
    pub const fn new() -> Self {
        Limiter {
            window: AtomicU64::new(0),
            used: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// `None` when this message is to be dropped; otherwise how many were dropped before it.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(window_now())
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let w = self.window.load(Ordering::Relaxed);
        if now != w
            && self
                .window
                .compare_exchange(w, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The number of the current window since the first log call of the process (0 is never
/// returned, so that a fresh limiter starts its first window on first use).
fn window_now() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    1 + start.elapsed().as_secs() / WINDOW.as_secs()
}

/// `log::log!` through a call site's [`Limiter`].
#[macro_export]
macro_rules! log {
    ($lvl:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::Limiter = $crate::Limiter::new();
        if ::log::log_enabled!($lvl) {
            match LIMIT.admit() {
                Some(0) => ::log::log!($lvl, $($arg)+),
                Some(n) => ::log::log!($lvl, "{} ({n} more like it dropped)", format_args!($($arg)+)),
                None => {}
            }
        }
    }};
}

#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::log!(::log::Level::Error, $($arg)+) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::log!(::log::Level::Warn, $($arg)+) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::log!(::log::Level::Info, $($arg)+) }; }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_the_count() {
        let l = Limiter::new();
        for _ in 0..BURST {
            assert_eq!(l.admit_at(1), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.admit_at(1), None);
        }
        // The next window speaks again and says what it dropped, once.
        assert_eq!(l.admit_at(2), Some(1000));
        assert_eq!(l.admit_at(2), Some(0));
    }

    #[test]
    fn the_macro_compiles_with_arguments_and_without() {
        warn!("plain");
        error!("with {} and {:#x}", 1, 2);
        info!("named {x}", x = 3);
    }
}
