//! `cargo xtask fuzz`: the cargo-fuzz targets in fuzz/ (virtqueue walk, blk requests, ECAM,
//! RPC rings and messages),
//! each for a while. Installs cargo-fuzz from crates.io when missing. libFuzzer's coverage
//! instrumentation works on the stable toolchain; sanitizers need nightly, which this machine
//! cannot fetch, so the targets run without them (Rust's own bounds checks still abort).

use crate::env::{self, cargo, root, run};
use anyhow::{Context, Result};

pub const TARGETS: &[&str] = &["virtqueue", "blk_request", "ecam", "rpc_ring"];
const CARGO_FUZZ: &str = "0.13.2";

fn ensure_cargo_fuzz() -> Result<()> {
    let have = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        println!("==> installing cargo-fuzz {CARGO_FUZZ}");
        env::run_with_progress(
            cargo().args([
                "install",
                "--locked",
                "--quiet",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ,
            ]),
            &|| format!("cargo install cargo-fuzz {CARGO_FUZZ}"),
        )?;
    }
    Ok(())
}

/// Runs every target for `seconds`; a crash fails with the input saved under fuzz/artifacts.
pub fn run_all(seconds: u64) -> Result<()> {
    // libfuzzer-sys builds libFuzzer itself, which is C++.
    env::ensure_apt(&["g++"])?;
    ensure_cargo_fuzz()?;
    for t in TARGETS {
        println!("==> building fuzz target {t}");
        run(cargo().current_dir(root().join("fuzz")).args([
            "fuzz",
            "build",
            "--sanitizer",
            "none",
            t,
        ]))
        .with_context(|| format!("fuzz target {t} does not build"))?;
        println!("==> fuzzing {t} for {seconds} s");
        run(cargo()
            .current_dir(root().join("fuzz"))
            .args(["fuzz", "run", "--sanitizer", "none", t, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1"))
        .with_context(|| format!("fuzz target {t} found a failure (see fuzz/artifacts/{t})"))?;
    }
    Ok(())
}
