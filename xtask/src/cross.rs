//! The aarch64 build of splitvirt: static, with Debian's rustc-web and its arm64 standard
//! library (rustup cannot add targets here), in its own target directory.

use crate::env::{self, cargo, root};
use anyhow::Result;
use std::path::PathBuf;

pub const TARGET: &str = "aarch64-unknown-linux-gnu";
pub const APT: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev:arm64",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
];

pub fn splitvirt() -> Result<PathBuf> {
    println!("==> building splitvirt for {TARGET} (static)");
    build("splitvirt", &[], "release/splitvirt")
}

/// A workspace example built the same way (for benchmarks in the board).
pub fn example(package: &str, name: &str) -> Result<PathBuf> {
    build(
        package,
        &["--example", name],
        &format!("release/examples/{name}"),
    )
}

/// A binary of a workspace package built the same way (guest programs in Rust).
pub fn binary(package: &str, name: &str) -> Result<PathBuf> {
    build(package, &["--bin", name], &format!("release/{name}"))
}

/// Clippy with `-D warnings` on the whole workspace built for the target, so that the code
/// behind `cfg(target_arch = "aarch64")` (the KVM binding) is linted too. Debian's clippy
/// matches Debian's rustc-web, which has the arm64 standard library.
pub fn clippy() -> Result<()> {
    crate::guest::ensure_arm64_arch()?;
    env::ensure_apt(APT)?;
    env::ensure_apt(&["rust-web-clippy"])?;
    env::run(
        env::cmd("/usr/bin/cargo-clippy")
            .current_dir(root())
            .env("RUSTC", "/usr/bin/rustc")
            .args([
                "clippy",
                "--quiet",
                "--workspace",
                "--all-targets",
                "--target",
                TARGET,
            ])
            .arg("--target-dir")
            .arg(root().join("target/aarch64-clippy"))
            .args(["--", "-D", "warnings"]),
    )
}

/// `cargo build --release -p PACKAGE WHAT` for the target; returns `release/...` under it.
fn build(package: &str, what: &[&str], output: &str) -> Result<PathBuf> {
    crate::guest::ensure_arm64_arch()?;
    env::ensure_apt(APT)?;
    // Linker and +crt-static for this target come from .cargo/config.toml.
    env::run_with_progress(
        cargo()
            .env("RUSTC", "/usr/bin/rustc")
            .args(["build", "--quiet", "--release", "-p", package])
            .args(what)
            .args(["--target", TARGET, "--target-dir"])
            .arg(root().join("target/aarch64")),
        &|| format!("cargo build --release -p {package} for {TARGET}"),
    )?;
    Ok(root().join("target/aarch64").join(TARGET).join(output))
}

/// A program published on crates.io, built for the target (static) at `version` with the
/// lock file it was published with, and cached by name and version: third-party vhost-user
/// backends for the board (none of their code is ours).
pub fn crates_io_program(krate: &str, version: &str) -> Result<PathBuf> {
    let dir = env::cache()
        .join("crates")
        .join(format!("{krate}-{version}-{TARGET}"));
    let exe = dir.join("bin").join(krate);
    if exe.exists() {
        println!(
            "==> {krate} {version} for {TARGET} cached: {}",
            exe.display()
        );
        return Ok(exe);
    }
    crate::guest::ensure_arm64_arch()?;
    env::ensure_apt(APT)?;
    println!("==> building {krate} {version} from crates.io for {TARGET} (static)");
    let flags = "-C target-feature=+crt-static";
    env::run_with_progress(
        cargo()
            .env("RUSTC", "/usr/bin/rustc")
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                "aarch64-linux-gnu-gcc",
            )
            .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS", flags)
            .args([
                "install",
                "--quiet",
                "--locked",
                krate,
                "--version",
                version,
            ])
            .args(["--target", TARGET, "--root"])
            .arg(&dir)
            .arg("--target-dir")
            .arg(env::cache().join("crates").join("target")),
        &|| format!("cargo install {krate} {version} for {TARGET}"),
    )?;
    // The build's intermediate files are hundreds of MiB the cached program no longer needs.
    let _ = std::fs::remove_dir_all(env::cache().join("crates").join("target"));
    Ok(exe)
}
