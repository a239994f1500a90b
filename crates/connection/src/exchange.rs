//! Checked exchanges between two guests over a connection, for the board's tests and
//! benchmarks (the `conn` CLI's `ping`, `pong`, `stream` and `sink`).
//!
//! Ping-pong: side A sends round N with a payload derived from N, B checks it and answers with
//! another payload derived from N, A checks that. A round whose answer does not come within the
//! timeout is sent again (a peer that died and came back finds it, or the first copy, and
//! answers); answers to earlier rounds are stale and dropped. An empty message ends the
//! exchange.
//!
//! Stream: A copies a buffer through the bulk area in chunks, two in flight (one being filled
//! while the peer empties the other), each announced by a message and acknowledged by one.

use crate::{Connection, Error};
use std::time::{Duration, Instant};

const PAYLOAD: usize = 200;
const PING: u8 = 1;
const PONG: u8 = 2;

/// Round N's message from the side that `salt` names.
fn message(round: u64, salt: u8) -> Vec<u8> {
    let mut m = round.to_le_bytes().to_vec();
    m.extend((0..PAYLOAD).map(|i| (round as usize * 31 + i * 7 + salt as usize) as u8));
    m
}

/// The round a message carries, when its payload is the one that round and `salt` give.
fn check(m: &[u8], salt: u8) -> Result<u64, Error> {
    let round = m
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| Error::Protocol(format!("a message of {} bytes, not a round", m.len())))?;
    if m != message(round, salt) {
        return Err(Error::Protocol(format!(
            "round {round}: the payload differs from what was sent"
        )));
    }
    Ok(round)
}

/// What one ping run measured.
#[derive(Debug, Default)]
pub struct Pings {
    /// Rounds answered with a correct payload.
    pub rounds: u64,
    /// Times an answer did not come within the timeout (the round was sent again).
    pub timeouts: u64,
    /// Round-trip times of the rounds answered at the first try, sorted.
    pub rtt: Vec<Duration>,
}

impl Pings {
    /// The `q` quantile (0..=1) of the round-trip times.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let last = self.rtt.len().checked_sub(1)?;
        self.rtt.get((last as f64 * q).round() as usize).copied()
    }
}

/// Runs `rounds` checked round trips, then ends the exchange. `give_up` bounds how long one
/// round may go unanswered in all (a peer that never comes back).
pub fn ping(
    c: &mut Connection,
    rounds: u64,
    timeout: Duration,
    give_up: Duration,
) -> Result<Pings, Error> {
    let mut out = Pings::default();
    for round in 1..=rounds {
        let start = Instant::now();
        let mut first_try = true;
        'round: loop {
            if start.elapsed() > give_up {
                return Err(Error::Protocol(format!(
                    "round {round}: no answer for {give_up:?}"
                )));
            }
            match c.send(&message(round, PING), timeout) {
                Ok(()) => {}
                Err(Error::Full(_)) => {
                    out.timeouts += 1;
                    first_try = false;
                    continue;
                }
                Err(e) => return Err(e),
            }
            let sent = Instant::now();
            while let Some(left) = timeout.checked_sub(sent.elapsed()) {
                let Some(answer) = c.recv(left)? else { break };
                match check(&answer, PONG)? {
                    r if r == round => break 'round,
                    r if r < round => continue, // an answer to a round sent again
                    r => {
                        return Err(Error::Protocol(format!(
                            "an answer to round {r} while round {round} runs"
                        )))
                    }
                }
            }
            out.timeouts += 1;
            first_try = false;
        }
        out.rounds += 1;
        if first_try {
            out.rtt.push(start.elapsed());
        }
    }
    c.send(&[], timeout)?;
    out.rtt.sort();
    Ok(out)
}

/// Answers pings until the exchange ends; the rounds answered. `idle` bounds the wait for
/// the next one.
pub fn pong(c: &mut Connection, idle: Duration) -> Result<u64, Error> {
    let mut answered = 0;
    loop {
        let Some(m) = c.recv(idle)? else {
            return Err(Error::Protocol(format!(
                "no message for {idle:?} after {answered} rounds"
            )));
        };
        if m.is_empty() {
            return Ok(answered);
        }
        let round = check(&m, PING)?;
        c.send(&message(round, PONG), idle)?;
        answered += 1;
    }
}

const START: u8 = b'S';
const CHUNK: u8 = b'C';
const ACK: u8 = b'A';
const READY: u8 = b'R';

fn encode(tag: u8, words: &[u64]) -> Vec<u8> {
    let mut m = vec![tag];
    for w in words {
        m.extend_from_slice(&w.to_le_bytes());
    }
    m
}

fn decode(m: &[u8], tag: u8, n: usize) -> Result<Vec<u64>, Error> {
    if m.len() != 1 + 8 * n || m[0] != tag {
        return Err(Error::Protocol(format!(
            "expected a `{}` message of {} bytes, got {} bytes starting {:?}",
            tag as char,
            1 + 8 * n,
            m.len(),
            m.first().map(|&b| b as char)
        )));
    }
    Ok(m[1..]
        .chunks(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect())
}

/// The peer's next message, or an error naming `what` did not come within `t`.
fn next(c: &mut Connection, t: Duration, what: &str) -> Result<Vec<u8>, Error> {
    c.recv(t)?
        .ok_or_else(|| Error::Protocol(format!("no {what} within {t:?}")))
}

/// Copies `data` to the peer's `sink` through the bulk area in chunks of `chunk` bytes (two in
/// flight): the time from the first chunk to the last acknowledgement, and the part of it
/// spent copying into the dataport.
pub fn stream(
    c: &mut Connection,
    data: &[u8],
    chunk: usize,
    timeout: Duration,
) -> Result<(Duration, Duration), Error> {
    if chunk == 0 || 2 * chunk > c.bulk_len() {
        return Err(Error::Bulk {
            off: 0,
            len: 2 * chunk,
            size: c.bulk_len(),
        });
    }
    let n = data.len().div_ceil(chunk) as u64;
    c.send(&encode(START, &[data.len() as u64]), timeout)?;
    decode(&next(c, timeout, "readiness from the sink")?, READY, 0)?;
    let start = Instant::now();
    let mut copying = Duration::ZERO;
    let mut acked = 0u64; // chunks acknowledged
    let await_ack = |c: &mut Connection, acked: &mut u64| -> Result<(), Error> {
        let i = decode(&next(c, timeout, "acknowledgement")?, ACK, 1)?[0];
        if i != *acked {
            return Err(Error::Protocol(format!(
                "acknowledgement of chunk {i}, expected {acked}"
            )));
        }
        *acked += 1;
        Ok(())
    };
    for (i, piece) in data.chunks(chunk).enumerate() {
        let i = i as u64;
        while i >= acked + 2 {
            await_ack(c, &mut acked)?;
        }
        let off = (i % 2) as usize * chunk;
        let t = Instant::now();
        c.write_bulk(off, piece)?;
        copying += t.elapsed();
        c.send(
            &encode(CHUNK, &[i, off as u64, piece.len() as u64]),
            timeout,
        )?;
    }
    while acked < n {
        await_ack(c, &mut acked)?;
    }
    let took = start.elapsed();
    c.send(&[], timeout)?;
    Ok((took, copying))
}

/// Receives one `stream`: the bytes, in order, and the time spent copying them out of the
/// dataport.
pub fn sink(c: &mut Connection, idle: Duration) -> Result<(Vec<u8>, Duration), Error> {
    let total = decode(&next(c, idle, "stream start")?, START, 1)?[0];
    // The peer names the size: a hint, so the buffer is capped (and grows past it if need be).
    // It is touched before the clock starts (a first touch of a page is a fault, costly in a
    // VM).
    let mut out = vec![1u8; (total as usize).min(256 << 20)];
    let mut filled = 0;
    let mut copying = Duration::ZERO;
    c.send(&[READY], idle)?;
    let mut expect = 0u64;
    loop {
        let m = next(c, idle, "further chunk")?;
        if m.is_empty() {
            out.truncate(filled);
            return Ok((out, copying));
        }
        let w = decode(&m, CHUNK, 3)?;
        let (i, off, len) = (w[0], w[1] as usize, w[2] as usize);
        if i != expect || len > c.bulk_len() {
            return Err(Error::Protocol(format!(
                "chunk {i} of {len} bytes, expected chunk {expect}"
            )));
        }
        if out.len() < filled + len {
            out.resize(filled + len, 0);
        }
        let t = Instant::now();
        c.read_bulk(off, &mut out[filled..filled + len])?;
        copying += t.elapsed();
        filled += len;
        c.send(&encode(ACK, &[i]), idle)?;
        expect += 1;
    }
}

/// `stream`'s copies with the peer idle (no message, no copy of its own at the same time):
/// the time to copy `data` into the bulk area in alternating chunks, and back out of it, and
/// the page faults the copy in took.
pub fn copies_alone(
    c: &Connection,
    data: &[u8],
    chunk: usize,
) -> Result<(Duration, Duration, u64), Error> {
    let mut out = vec![1u8; data.len()]; // touched before the clock starts
    let faults = minor_faults();
    let start = Instant::now();
    for (i, piece) in data.chunks(chunk).enumerate() {
        c.write_bulk((i % 2) * chunk, piece)?;
    }
    let into = start.elapsed();
    let faults = minor_faults().saturating_sub(faults);
    let start = Instant::now();
    for (i, piece) in out.chunks_mut(chunk).enumerate() {
        c.read_bulk((i % 2) * chunk, piece)?;
    }
    let out_of = start.elapsed();
    std::hint::black_box(&out);
    Ok((into, out_of, faults))
}

/// This process's minor page faults so far (a store to a page whose mapping is not yet
/// writable and dirty takes one).
fn minor_faults() -> u64 {
    // SAFETY: getrusage fills the struct we hand it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u64::try_from(u.ru_minflt).unwrap_or(0)
}

/// memcpy inside this guest, the same chunks as `stream`: the time to copy `data` once.
pub fn local_copy(data: &[u8], chunk: usize) -> Duration {
    let mut out = vec![1u8; data.len()]; // touched before the clock starts, as in `sink`
    let start = Instant::now();
    for (src, dst) in data.chunks(chunk).zip(out.chunks_mut(chunk)) {
        dst.copy_from_slice(src);
    }
    let took = start.elapsed();
    std::hint::black_box(&out);
    took
}

/// memcpy inside this guest into two alternating chunk-sized buffers, the pattern `stream`
/// writes the bulk area in, but in the guest's own memory: the time to copy `data` once.
pub fn local_copy_window(data: &[u8], chunk: usize) -> Duration {
    let mut window = vec![1u8; 2 * chunk];
    let start = Instant::now();
    for (i, src) in data.chunks(chunk).enumerate() {
        let at = (i % 2) * chunk;
        window[at..at + src.len()].copy_from_slice(src);
        std::hint::black_box(&window);
    }
    start.elapsed()
}

/// A 64-bit FNV-1a hash, to compare what was sent with what arrived.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// `len` bytes no two chunks of which are alike (xorshift).
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{fake, open};
    use crate::{Side, RINGS};

    #[test]
    fn ping_pong_checks_every_round() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake(dir.path(), "chan", 0x4000);
        let t = Duration::from_secs(2);
        let mut b = open(&dev, 0x4000, Side::B);
        let pong = std::thread::spawn(move || pong(&mut b, t).unwrap());
        let mut a = open(&dev, 0x4000, Side::A);
        let p = ping(&mut a, 30, t, t).unwrap();
        assert_eq!((p.rounds, p.timeouts, p.rtt.len()), (30, 0, 30));
        assert!(p.quantile(0.5) <= p.quantile(0.99));
        assert_eq!(pong.join().unwrap(), 30);
    }

    #[test]
    fn a_corrupt_answer_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake(dir.path(), "chan", 0x4000);
        let mut b = open(&dev, 0x4000, Side::B);
        let liar = std::thread::spawn(move || {
            let m = b.recv(Duration::from_secs(2)).unwrap().unwrap();
            let mut answer = message(check(&m, PING).unwrap(), PONG);
            answer[100] ^= 1;
            b.send(&answer, Duration::from_secs(1)).unwrap();
        });
        let mut a = open(&dev, 0x4000, Side::A);
        let e = ping(&mut a, 3, Duration::from_secs(2), Duration::from_secs(2)).unwrap_err();
        assert!(
            e.to_string().contains("round 1: the payload differs"),
            "{e}"
        );
        liar.join().unwrap();
    }

    #[test]
    fn a_peer_that_dies_mid_round_and_comes_back_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake(dir.path(), "chan", 0x4000);
        let dev2 = dev.clone();
        let peer = std::thread::spawn(move || {
            // The first peer answers 5 rounds, takes the 6th and dies without answering.
            let mut b = open(&dev2, 0x4000, Side::B);
            for _ in 0..5 {
                let m = b.recv(Duration::from_secs(2)).unwrap().unwrap();
                let r = check(&m, PING).unwrap();
                b.send(&message(r, PONG), Duration::from_secs(1)).unwrap();
            }
            b.recv(Duration::from_secs(2)).unwrap().unwrap();
            drop(b);
            std::thread::sleep(Duration::from_millis(300));
            // Its successor resumes from the dataport.
            let mut b = open(&dev2, 0x4000, Side::B);
            pong(&mut b, Duration::from_secs(2)).unwrap()
        });
        let mut a = open(&dev, 0x4000, Side::A);
        let p = ping(
            &mut a,
            20,
            Duration::from_millis(100),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(p.rounds, 20);
        assert!(p.timeouts >= 1, "{p:?}");
        // The interrupted round (and any other that took longer than the timeout on a busy
        // machine) has no round-trip time.
        assert!(p.rtt.len() < 20, "{p:?}");
        assert!(peer.join().unwrap() >= 15);
    }

    #[test]
    fn a_peer_that_never_returns_ends_the_ping() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake(dir.path(), "chan", 0x4000);
        let mut a = open(&dev, 0x4000, Side::A);
        let e = ping(
            &mut a,
            1,
            Duration::from_millis(30),
            Duration::from_millis(200),
        );
        assert!(e.unwrap_err().to_string().contains("no answer"));
    }

    #[test]
    fn a_stream_arrives_whole_through_the_bulk_area() {
        let dir = tempfile::tempdir().unwrap();
        let size = RINGS + (128 << 10);
        let dev = fake(dir.path(), "bulk", size);
        let mut b = open(&dev, size, Side::B);
        let t = Duration::from_secs(5);
        let sink = std::thread::spawn(move || sink(&mut b, t).unwrap());
        let mut a = open(&dev, size, Side::A);
        let data = pattern((1 << 20) + 123);
        stream(&mut a, &data, 64 << 10, t).unwrap();
        let (got, copying) = sink.join().unwrap();
        assert!(copying > Duration::ZERO);
        assert_eq!(got.len(), data.len());
        assert_eq!(fnv(&got), fnv(&data));
        // Chunks that do not fit twice in the bulk area are refused up front.
        assert!(matches!(
            stream(&mut a, &data, 65 << 10, t),
            Err(Error::Bulk { .. })
        ));
        assert!(local_copy(&data, 64 << 10) > Duration::ZERO);
        assert!(local_copy_window(&data, 64 << 10) > Duration::ZERO);
    }
}
