//! Guest kernels from Debian's linux-source-6.12 with the project's fragments, cross-built for
//! arm64 and cached by the hash of everything that goes in. The build fails loudly when the
//! resulting .config misses a required option (facts #4: olddefconfig drops them silently).

use crate::env::{self, cache, cmd, root, run};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const SOURCE_PKG: &str = "linux-source-6.12";
pub const APT: &[&str] = &[
    SOURCE_PKG,
    "gcc-aarch64-linux-gnu",
    "flex",
    "bison",
    "bc",
    "libssl-dev",
    "libelf-dev",
    "make",
    "xz-utils",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Driver,
    Device,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Driver => "driver",
            Role::Device => "device",
        }
    }
    fn fragments(self) -> Vec<PathBuf> {
        let dir = root().join("guest/kconfig");
        let mut f = vec![dir.join("driver-vm.config")];
        if self == Role::Device {
            f.push(dir.join("device-vm.config"));
        }
        f
    }
}

/// A built guest kernel: the Image, its .config, and the build tree (for external modules).
pub struct Kernel {
    pub image: PathBuf,
    pub config: PathBuf,
    pub build: PathBuf,
}

pub fn hash_inputs(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    format!("{:x}", h.finalize())[..16].to_owned()
}

/// The unpacked source tree, shared by both roles (builds go to their own O= directory).
pub(crate) fn source() -> Result<PathBuf> {
    let version = env::deb_version(SOURCE_PKG)?;
    let dir = cache().join("linux").join(&version);
    std::fs::create_dir_all(cache().join("linux"))?;
    let lock = std::fs::File::create(dir.with_extension("lock"))?;
    lock.lock()?;
    let tree = dir.join(SOURCE_PKG);
    if tree.join("Makefile").exists() && dir.join(".unpacked").exists() {
        return Ok(tree);
    }
    println!(
        "==> unpacking {SOURCE_PKG} {version} into {} (about a minute)",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    run(cmd("tar")
        .arg("-xJf")
        .arg(format!("/usr/src/{SOURCE_PKG}.tar.xz"))
        .arg("-C")
        .arg(&dir))?;
    std::fs::write(dir.join(".unpacked"), "")?;
    Ok(tree)
}

pub fn build(role: Role) -> Result<Kernel> {
    env::ensure_apt(APT)?;
    let version = env::deb_version(SOURCE_PKG)?;
    let gcc = env::output(cmd("aarch64-linux-gnu-gcc").arg("--version"))?;
    let frags: Vec<Vec<u8>> = role
        .fragments()
        .iter()
        .map(std::fs::read)
        .collect::<Result<_, _>>()?;
    let mut parts: Vec<&[u8]> = vec![version.as_bytes(), gcc.as_bytes(), role.name().as_bytes()];
    parts.extend(frags.iter().map(Vec::as_slice));
    let key = hash_inputs(&parts);
    let out = cache()
        .join("kernel")
        .join(format!("{}-{key}", role.name()));
    let k = Kernel {
        image: out.join("Image"),
        config: out.join("config"),
        build: out.join("build"),
    };
    std::fs::create_dir_all(&out)?;
    // One build per output at a time: a second xtask waits here, then finds the cache.
    let lock = std::fs::File::create(out.with_extension("lock"))?;
    lock.lock()?;
    if k.image.exists() && k.config.exists() {
        println!(
            "==> guest kernel ({} role) cached: {}",
            role.name(),
            k.image.display()
        );
        return Ok(k);
    }
    let src = source()?;
    let t = Instant::now();
    println!("==> building the {} guest kernel from {SOURCE_PKG} {version} in {} (3-6 minutes on 2 cores)", role.name(), out.display());
    std::fs::create_dir_all(&k.build)?;
    let make = |args: &[&str]| {
        let mut c = cmd("make");
        c.current_dir(&src)
            .arg(format!("O={}", k.build.display()))
            .args(["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"])
            .args(args);
        c
    };
    run(&mut make(&["-s", "allnoconfig"]))?;
    let mut merge = cmd(src.join("scripts/kconfig/merge_config.sh"));
    merge
        .current_dir(&src)
        .env("ARCH", "arm64")
        .env("CROSS_COMPILE", "aarch64-linux-gnu-")
        .args(["-m", "-O"])
        .arg(&k.build)
        .arg(k.build.join(".config"))
        .args(role.fragments())
        .stdout(std::process::Stdio::null());
    run(&mut merge)?;
    run(&mut make(&["-s", "olddefconfig"]))?;
    check_config(&k.build.join(".config"), role)?;
    let jobs = format!(
        "-j{}",
        std::thread::available_parallelism().map_or(2, |n| n.get())
    );
    let build = k.build.clone();
    env::run_with_progress(
        &mut make(&["-s", &jobs, "Image", "modules_prepare"]),
        &move || format!("{} objects compiled", count_objects(&build)),
    )?;
    std::fs::copy(k.build.join("arch/arm64/boot/Image"), &k.image)?;
    std::fs::copy(k.build.join(".config"), &k.config)?;
    println!(
        "==> guest kernel built in {:.0}s: {}",
        t.elapsed().as_secs_f64(),
        k.image.display()
    );
    Ok(k)
}

/// `splitvirt kconfig check` on the resulting .config: a missing required option stops the build.
fn check_config(config: &Path, role: Role) -> Result<()> {
    let sv = env::splitvirt()?;
    let st = cmd(&sv)
        .args(["kconfig", "check", "--role", role.name()])
        .arg(config)
        .status()
        .context("cannot run splitvirt kconfig check")?;
    if !st.success() {
        bail!(
            "the {} kernel's .config ({}) misses required options (listed above): fix guest/kconfig/",
            role.name(),
            config.display()
        );
    }
    Ok(())
}

/// Object files under a build tree so far (a kernel of ours has a few thousand).
fn count_objects(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) if e.file_name().to_string_lossy().ends_with(".o") => n += 1,
                _ => {}
            }
        }
    }
    n
}
