//! Paths, the cache, commands, and installing Debian packages.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Expensive artifacts live here, keyed by their inputs: `$SPLITVIRT_CACHE`, else
/// `$XDG_CACHE_HOME/splitvirt`, else `~/.cache/splitvirt`.
pub fn cache() -> PathBuf {
    if let Some(p) = std::env::var_os("SPLITVIRT_CACHE") {
        return p.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or("/root".into())).join(".cache")
        });
    base.join("splitvirt")
}

pub fn cmd(program: impl AsRef<std::ffi::OsStr>) -> Command {
    Command::new(program)
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    c.current_dir(root());
    c
}

fn show(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command with its output shown; fails naming it.
pub fn run(c: &mut Command) -> Result<()> {
    let what = show(c);
    let st = c
        .status()
        .with_context(|| format!("cannot start `{what}`"))?;
    if !st.success() {
        bail!("`{what}` failed ({st})");
    }
    Ok(())
}

/// `run` for a step of minutes: every 30 s a line says it is still going, with `detail()`
/// (what it has done so far), so that a long first build never looks hung.
pub fn run_with_progress(c: &mut Command, detail: &(dyn Fn() -> String + Sync)) -> Result<()> {
    let done = std::sync::atomic::AtomicBool::new(false);
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut next = 30;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let secs = t.elapsed().as_secs();
                if secs >= next {
                    println!(
                        "    ... still going after {}m{:02}s: {}",
                        secs / 60,
                        secs % 60,
                        detail()
                    );
                    next += 30;
                }
            }
        });
        let r = run(c);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    })
}

/// Runs a command and returns its stdout; stderr passes through.
pub fn output(c: &mut Command) -> Result<String> {
    let what = show(c);
    let o = c
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{what}`"))?;
    if !o.status.success() {
        bail!("`{what}` failed ({})", o.status);
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the Debian packages that are missing (apt-get update once, first).
pub fn ensure_apt(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("==> installing Debian packages: {}", missing.join(" "));
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !root {
        bail!(
            "missing packages {}: run `sudo apt-get install -y {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run(cmd("apt-get").args(["update", "-qq"]))?;
    run(cmd("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Builds splitvirt (debug, the build the tests share) and returns its path.
pub fn splitvirt() -> Result<PathBuf> {
    run(cargo().args(["build", "--quiet", "-p", "splitvirt"]))?;
    Ok(root().join("target/debug/splitvirt"))
}

/// Version of an installed Debian package, for cache keys.
pub fn deb_version(pkg: &str) -> Result<String> {
    let v = output(cmd("dpkg-query").args(["-W", "-f=${Version}", pkg]))?;
    if v.is_empty() {
        bail!("package {pkg} is not installed");
    }
    Ok(v)
}
