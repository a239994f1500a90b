//! `cargo xtask fresh`: `.ci/run` from a clean clone inside a fresh Debian 12 root, so that an
//! install step the suite forgot fails here first instead of on a new CI machine.
//!
//! The root comes from debootstrap (cached as a tarball keyed by what goes in) with the host's
//! apt sources; inside it only `/proc`, `/sys`, a minimal `/dev` (with `/dev/kvm` when the host
//! has it) and the Rust toolchain (read-only) come from the host. Everything else, apt
//! packages, crates, the splitvirt cache, is fetched and built anew, as on a new machine. The
//! mounts live in a private mount namespace and go away with it.

use crate::env::{self, cache, cmd, root, run};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

const SUITE: &str = "bookworm";
/// What a new machine of ours has besides a minimal Debian (and the Rust toolchain): a C
/// compiler for crates that build C, git, Python.
const INCLUDE: &str = "ca-certificates,git,gcc,libc6-dev,python3";

/// Runs `.ci/run` in a fresh root; `warm` keeps the splitvirt cache (kernels, schema, ...)
/// of the last fresh run, to measure a warm run. Packages and crates are fetched anew either
/// way.
pub fn run_ci(warm: bool) -> Result<()> {
    env::ensure_apt(&["debootstrap", "util-linux"])?;
    let tarball = root_tarball()?;
    let dir = root().join("target/fresh");
    let sysroot = dir.join("root");
    if sysroot.exists() {
        // Mounts were private to the namespace of the last run, so this is plain files.
        std::fs::remove_dir_all(&sysroot)
            .with_context(|| format!("cannot remove the last fresh root {}", sysroot.display()))?;
    }
    std::fs::create_dir_all(&sysroot)?;
    println!("==> unpacking the fresh root into {}", sysroot.display());
    run(cmd("tar").arg("-xf").arg(&tarball).arg("-C").arg(&sysroot))?;
    std::fs::copy("/etc/resolv.conf", sysroot.join("etc/resolv.conf"))
        .context("cannot copy /etc/resolv.conf into the fresh root")?;
    // The machine's own certificate authorities (its registries may be reached through a
    // proxy that signs with them): part of how every machine of ours reaches a registry.
    let local_ca = Path::new("/usr/local/share/ca-certificates");
    if local_ca.is_dir() {
        let to = sysroot.join("usr/local/share/ca-certificates");
        std::fs::create_dir_all(&to)?;
        for e in std::fs::read_dir(local_ca)?.flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name()))?;
            }
        }
    }
    // A clean clone: what is committed, nothing of this work tree's build or cache.
    let src = sysroot.join("work/splitvirt");
    println!("==> cloning the committed HEAD into the fresh root");
    run(cmd("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(root())
        .arg(&src))?;
    let head = env::output(
        cmd("git")
            .arg("-C")
            .arg(&src)
            .args(["log", "-1", "--oneline"]),
    )?;
    println!("    at {}", head.trim());

    let toolchain = toolchain()?;
    // The root's splitvirt cache lives outside it, so that a warm run can find what the last
    // run built; a cold run starts it empty.
    let fresh_cache = cache().join("fresh/cache");
    if !warm && fresh_cache.exists() {
        std::fs::remove_dir_all(&fresh_cache)?;
    }
    std::fs::create_dir_all(&fresh_cache)?;
    let kvm = Path::new("/dev/kvm").exists();
    let script = mount_script(&sysroot, &toolchain, &fresh_cache, kvm);
    println!(
        "==> .ci/run inside the fresh root ({}; the log is this output)",
        if warm {
            "warm: the splitvirt cache of the last fresh run"
        } else {
            "cold: nothing cached"
        }
    );
    let t = Instant::now();
    let st = cmd("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-euc"])
        .arg(&script)
        .status()
        .context("cannot start unshare")?;
    let secs = t.elapsed().as_secs();
    println!(
        "fresh: .ci/run {} in {}m{:02}s ({})",
        if st.success() { "passed" } else { "FAILED" },
        secs / 60,
        secs % 60,
        if warm { "warm" } else { "cold" }
    );
    if !st.success() {
        bail!(".ci/run failed in the fresh root ({st})");
    }
    Ok(())
}

/// The shell that mounts what the root may see and runs CI in it, as CI runs it: CI=true, no
/// standard input, an environment of its own.
fn mount_script(sysroot: &Path, toolchain: &Path, splitvirt_cache: &Path, kvm: bool) -> String {
    let r = sysroot.display();
    let tc = toolchain.display();
    let mut s = format!(
        "R='{r}'\n\
         mount --bind \"$R\" \"$R\"\n\
         mount -t proc proc \"$R/proc\"\n\
         mount -t sysfs sys \"$R/sys\"\n\
         mount -t tmpfs -o mode=755 dev \"$R/dev\"\n\
         for n in null zero full random urandom tty; do touch \"$R/dev/$n\"; mount --bind /dev/$n \"$R/dev/$n\"; done\n\
         mkdir -p \"$R/dev/pts\" \"$R/dev/shm\" \"$R/dev/net\"\n\
         mount -t devpts -o newinstance,ptmxmode=0666 devpts \"$R/dev/pts\"\n\
         ln -s pts/ptmx \"$R/dev/ptmx\"\n\
         mount -t tmpfs shm \"$R/dev/shm\"\n\
         mkdir -p \"$R/opt/rust\"\n\
         mount --bind -o ro '{tc}' \"$R/opt/rust\"\n"
    );
    if kvm {
        s.push_str("touch \"$R/dev/kvm\"; mount --bind /dev/kvm \"$R/dev/kvm\"\n");
    }
    s.push_str(&format!(
        "mkdir -p \"$R/root/.cache/splitvirt\"\nmount --bind '{}' \"$R/root/.cache/splitvirt\"\n",
        splitvirt_cache.display()
    ));
    // The machine's environment for reaching registries (certificate bundles, proxies),
    // nothing else of this shell's.
    let mut pass = String::new();
    for (k, v) in std::env::vars() {
        let k_up = k.to_ascii_uppercase();
        let keep = k_up.ends_with("_PROXY")
            || matches!(
                k_up.as_str(),
                "SSL_CERT_FILE"
                    | "SSL_CERT_DIR"
                    | "CURL_CA_BUNDLE"
                    | "GIT_SSL_CAINFO"
                    | "REQUESTS_CA_BUNDLE"
                    | "PIP_CERT"
                    | "PIP_DEFAULT_TIMEOUT"
                    | "PIP_DISABLE_PIP_VERSION_CHECK"
                    | "CARGO_HTTP_CAINFO"
            );
        if keep && !v.contains('\'') {
            pass.push_str(&format!("{k}='{v}' "));
        }
    }
    // pivot_root, not chroot: a chrooted process may not create user namespaces, which the
    // backend's jail does (and its tests with it).
    s.push_str(
        "mkdir -p \"$R/.oldroot\"\ncd \"$R\"\npivot_root . .oldroot\numount -l /.oldroot\ncd /\n",
    );
    s.push_str(&format!(
        "exec /usr/bin/env -i HOME=/root CI=true TERM=dumb LANG=C.UTF-8 {pass}\
         PATH=/opt/rust/bin:/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
         /bin/bash -c 'update-ca-certificates >/dev/null && cd /work/splitvirt && exec bash .ci/run' </dev/null\n",
    ));
    s
}

/// The toolchain `cargo` runs here (its own directory, with rustc, rustfmt and clippy beside
/// it), mounted read-only: the one thing a new machine has that no registry gives.
fn toolchain() -> Result<PathBuf> {
    let sysroot = env::output(cmd("rustc").args(["--print", "sysroot"]))?;
    let p = PathBuf::from(sysroot.trim());
    for tool in [
        "bin/cargo",
        "bin/rustc",
        "bin/cargo-fmt",
        "bin/cargo-clippy",
    ] {
        if !p.join(tool).exists() {
            bail!(
                "the Rust toolchain at {} has no {tool}: install it with rustup (rustfmt, clippy)",
                p.display()
            );
        }
    }
    Ok(p)
}

/// The first `bookworm` mirror of the host's apt sources (deb822 or one-line format): the
/// fresh root reaches Debian the way this machine does.
fn mirror() -> Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let name = f.to_string_lossy();
        if name.ends_with(".sources") {
            for block in text.split("\n\n") {
                let field = |k: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(k))
                        .map(|v| v.trim().to_owned())
                };
                let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) else {
                    continue;
                };
                if suites.split_whitespace().any(|s| s == SUITE) {
                    if let Some(u) = uris.split_whitespace().next() {
                        return Ok(u.to_owned());
                    }
                }
            }
        } else if name.ends_with(".list") {
            for l in text.lines() {
                let w: Vec<&str> = l.split_whitespace().collect();
                if w.len() >= 3 && w[0] == "deb" && w[2] == SUITE {
                    return Ok(w[1].to_owned());
                }
            }
        }
    }
    bail!("no {SUITE} source in /etc/apt/sources.list(.d): add Debian 12's main repository")
}

/// The debootstrapped root as a tarball, made once per mirror, package list and debootstrap
/// version. The host's apt sources go in with it (bookworm-security holds linux-source-6.12).
fn root_tarball() -> Result<PathBuf> {
    let mirror = mirror()?;
    let version = env::deb_version("debootstrap")?;
    let mut sources = Vec::new();
    for f in apt_source_files() {
        sources.push(std::fs::read(&f)?);
    }
    let mut parts: Vec<&[u8]> = vec![
        SUITE.as_bytes(),
        INCLUDE.as_bytes(),
        mirror.as_bytes(),
        version.as_bytes(),
    ];
    parts.extend(sources.iter().map(Vec::as_slice));
    let key = crate::kernel::hash_inputs(&parts);
    let tarball = cache()
        .join("fresh")
        .join(format!("debian-{SUITE}-{key}.tar"));
    if tarball.exists() {
        println!("==> fresh root: {} (cached)", tarball.display());
        return Ok(tarball);
    }
    let build = root().join("target/fresh/debootstrap");
    let _ = std::fs::remove_dir_all(&build);
    std::fs::create_dir_all(&build)?;
    println!(
        "==> debootstrap {SUITE} (minbase + {INCLUDE}) into {} (a few minutes)",
        build.display()
    );
    run(cmd("debootstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&build)
        .arg(&mirror))?;
    // The host's apt sources replace debootstrap's one line, so that updates and security
    // packages are the ones this machine sees.
    let _ = std::fs::remove_file(build.join("etc/apt/sources.list"));
    for f in apt_source_files() {
        let rel = f.strip_prefix("/").unwrap_or(&f);
        let to = build.join(rel);
        std::fs::create_dir_all(to.parent().unwrap_or(&build))?;
        std::fs::copy(&f, &to)?;
    }
    std::fs::create_dir_all(tarball.parent().unwrap_or(Path::new("/")))?;
    let part = tarball.with_extension("tar.part");
    run(cmd("tar")
        .arg("-cf")
        .arg(&part)
        .arg("-C")
        .arg(&build)
        .arg("."))?;
    std::fs::rename(&part, &tarball)?;
    std::fs::remove_dir_all(&build)?;
    Ok(tarball)
}

/// The host's active apt source files.
fn apt_source_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if Path::new("/etc/apt/sources.list").exists() {
        out.push(PathBuf::from("/etc/apt/sources.list"));
    }
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.to_string_lossy();
                n.ends_with(".sources") || n.ends_with(".list")
            })
            .collect();
        more.sort();
        out.extend(more);
    }
    out
}
