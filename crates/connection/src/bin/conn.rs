//! `conn`: the cross-VM connector from a guest's shell (static aarch64 in the guest).
//!   conn emit NAME                      send an event
//!   conn wait NAME [SECONDS]            wait for an event; prints the count (exit 1 on timeout)
//!   conn send NAME a|b MESSAGE          put a message in side a's or b's ring and emit
//!   conn recv NAME a|b [SECONDS]        print the other side's next message (exit 1 on timeout)
//! Channel positions are per process: `send`/`recv` here suit one message per call from a
//! fresh channel; programs use the library for a running exchange.

use connection::{Connection, Side};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs = |i: usize| {
        Duration::from_secs_f64(args.get(i).and_then(|s| s.parse().ok()).unwrap_or(10.0))
    };
    let side = |s: Option<&String>| match s.map(String::as_str) {
        Some("a") => Some(Side::A),
        Some("b") => Some(Side::B),
        _ => None,
    };
    let run = || -> Result<bool, connection::Error> {
        match (args.first().map(String::as_str), args.get(1)) {
            (Some("emit"), Some(name)) => {
                Connection::open(name, Side::A)?.emit();
                Ok(true)
            }
            (Some("wait"), Some(name)) => {
                let got = Connection::open(name, Side::A)?.wait(secs(2))?;
                if let Some(n) = got {
                    println!("{n}");
                }
                Ok(got.is_some())
            }
            (Some("send"), Some(name)) if side(args.get(2)).is_some() => {
                let msg = args.get(3).map(String::as_bytes).unwrap_or_default();
                let mut c = Connection::open(name, side(args.get(2)).expect("checked"))?;
                c.send(msg, secs(4))?;
                Ok(true)
            }
            (Some("recv"), Some(name)) if side(args.get(2)).is_some() => {
                let mut c = Connection::open(name, side(args.get(2)).expect("checked"))?;
                let got = c.recv(secs(3))?;
                if let Some(m) = &got {
                    println!("{}", String::from_utf8_lossy(m));
                }
                Ok(got.is_some())
            }
            _ => {
                eprintln!(
                    "usage: conn emit NAME | wait NAME [S] | send NAME a|b MSG | recv NAME a|b [S]"
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
