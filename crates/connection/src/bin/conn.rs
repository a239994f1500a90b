//! `conn`: the cross-VM connector from a guest's shell (static aarch64 in the guest).
//!   conn emit NAME                      send an event
//!   conn wait NAME [SECONDS]            wait for an event; prints the count (exit 1 on timeout)
//!   conn send NAME a|b MESSAGE          put a message in side a's or b's ring and emit
//!   conn recv NAME a|b [SECONDS]        print the other side's next message (exit 1 on timeout)
//!   conn ping NAME ROUNDS [SECONDS]     side a of checked round trips (a round unanswered for
//!                                       SECONDS, default 3, is sent again; 300 s in all ends it)
//!   conn pong NAME [SECONDS]            side b: answer until side a ends (or SECONDS idle)
//!   conn stream NAME MIB [CHUNK_KIB]    side a: copy MIB through the bulk area to `sink`
//!   conn sink NAME [SECONDS]            side b: receive one stream
//!   conn memcpy MIB [CHUNK_KIB]         the same copy inside this guest, for comparison (also
//!                                       into two alternating chunks, as `stream` writes)
//! `CONN_SPIN_US` sets how long a receiver polls before it sleeps (default 50; 0: always
//! sleep at once).
//! Results are `key value` lines. The channel's position is kept in the dataport, so one
//! `send` or `recv` per call carries on a running exchange.

use connection::{exchange, Connection, Side};
use std::process::ExitCode;
use std::time::Duration;

/// The connector named `name`, polling as `CONN_SPIN_US` says.
fn open(name: &str, side: Side) -> Result<Connection, connection::Error> {
    let mut c = Connection::open(name, side)?;
    if let Some(us) = std::env::var("CONN_SPIN_US")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        c.set_spin(Duration::from_micros(us));
    }
    Ok(c)
}

fn mib_per_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64().max(1e-9)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: f64| -> f64 {
        args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
    };
    let secs = |i: usize, default: f64| Duration::from_secs_f64(num(i, default));
    let side = |s: Option<&String>| match s.map(String::as_str) {
        Some("a") => Some(Side::A),
        Some("b") => Some(Side::B),
        _ => None,
    };
    let run = || -> Result<bool, connection::Error> {
        match (args.first().map(String::as_str), args.get(1)) {
            (Some("emit"), Some(name)) => {
                open(name, Side::A)?.emit();
                Ok(true)
            }
            (Some("wait"), Some(name)) => {
                let got = open(name, Side::A)?.wait(secs(2, 10.0))?;
                if let Some(n) = got {
                    println!("{n}");
                }
                Ok(got.is_some())
            }
            (Some("send"), Some(name)) if side(args.get(2)).is_some() => {
                let msg = args.get(3).map(String::as_bytes).unwrap_or_default();
                let mut c = open(name, side(args.get(2)).expect("checked"))?;
                c.send(msg, secs(4, 10.0))?;
                Ok(true)
            }
            (Some("recv"), Some(name)) if side(args.get(2)).is_some() => {
                let mut c = open(name, side(args.get(2)).expect("checked"))?;
                let got = c.recv(secs(3, 10.0))?;
                if let Some(m) = &got {
                    println!("{}", String::from_utf8_lossy(m));
                }
                Ok(got.is_some())
            }
            (Some("ping"), Some(name)) => {
                let mut c = open(name, Side::A)?;
                let rounds = num(2, 1000.0) as u64;
                let p = exchange::ping(&mut c, rounds, secs(3, 3.0), Duration::from_secs(300))?;
                let us = |q| p.quantile(q).map_or(0, |d| d.as_micros());
                println!("spin_us {}", c.spin().as_micros());
                println!("rounds {}", p.rounds);
                println!("timeouts {}", p.timeouts);
                println!("rtt_median_us {}", us(0.5));
                println!("rtt_p99_us {}", us(0.99));
                Ok(true)
            }
            (Some("pong"), Some(name)) => {
                let mut c = open(name, Side::B)?;
                println!("answered {}", exchange::pong(&mut c, secs(2, 600.0))?);
                Ok(true)
            }
            (Some("stream"), Some(name)) => {
                let mut c = open(name, Side::A)?;
                let data = exchange::pattern((num(2, 16.0) * (1 << 20) as f64) as usize);
                let chunk = (num(3, 256.0) as usize) << 10;
                let (took, copying) =
                    exchange::stream(&mut c, &data, chunk, Duration::from_secs(30))?;
                println!("bytes {}", data.len());
                println!("fnv {:016x}", exchange::fnv(&data));
                println!("mib_per_s {:.1}", mib_per_s(data.len(), took));
                println!("copy_in_mib_per_s {:.1}", mib_per_s(data.len(), copying));
                Ok(true)
            }
            (Some("sink"), Some(name)) => {
                let mut c = open(name, Side::B)?;
                let (got, copying) = exchange::sink(&mut c, secs(2, 600.0))?;
                println!("bytes {}", got.len());
                println!("fnv {:016x}", exchange::fnv(&got));
                println!("copy_out_mib_per_s {:.1}", mib_per_s(got.len(), copying));
                Ok(true)
            }
            (Some("alone"), Some(name)) => {
                let c = open(name, Side::A)?;
                let data = exchange::pattern((num(2, 16.0) * (1 << 20) as f64) as usize);
                let chunk = (num(3, 256.0) as usize) << 10;
                let (into, out_of, faults) = exchange::copies_alone(&c, &data, chunk)?;
                println!("copy_in_faults {faults}");
                println!("copy_in_mib_per_s {:.1}", mib_per_s(data.len(), into));
                println!("copy_out_mib_per_s {:.1}", mib_per_s(data.len(), out_of));
                Ok(true)
            }
            (Some("memcpy"), _) => {
                let data = exchange::pattern((num(1, 16.0) * (1 << 20) as f64) as usize);
                let chunk = (num(2, 256.0) as usize) << 10;
                let took = exchange::local_copy(&data, chunk);
                println!("mib_per_s {:.1}", mib_per_s(data.len(), took));
                let took = exchange::local_copy_window(&data, chunk);
                println!("window_mib_per_s {:.1}", mib_per_s(data.len(), took));
                Ok(true)
            }
            _ => {
                eprintln!(
                    "usage: conn emit NAME | wait NAME [S] | send NAME a|b MSG | recv NAME a|b [S]\n\
                     \x20      | ping NAME ROUNDS [S] | pong NAME [S] | stream NAME MIB [CHUNK_KIB]\n\
                     \x20      | sink NAME [S] | memcpy MIB [CHUNK_KIB] | alone NAME MIB [CHUNK_KIB]"
                );
                Ok(false)
            }
        }
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("conn: {e}");
            ExitCode::from(2)
        }
    }
}
