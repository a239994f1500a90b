//! Guest artifacts besides the kernel: a busybox initramfs that runs one scenario script, and
//! a partitioned raw disk whose partition 2 is ext4 (the seed boots `root=/dev/vda2`), built
//! without loop devices or root-only mounts.

use crate::cpio::{Archive, Entry};
use crate::env::{self, cache, cmd, root, run};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const APT: &[&str] = &["e2fsprogs", "fdisk", "cpio"];

/// Debian's arm64 architecture is needed to download arm64 packages (busybox, the board kernel).
pub fn ensure_arm64_arch() -> Result<()> {
    let archs = env::output(cmd("dpkg").arg("--print-foreign-architectures"))?;
    if !archs.lines().any(|a| a == "arm64") {
        println!("==> adding Debian's arm64 architecture");
        run(cmd("dpkg").args(["--add-architecture", "arm64"]))?;
        run(cmd("apt-get").args(["update", "-qq"]))?;
    }
    Ok(())
}

/// Where Debian packages come from: this machine's apt sources, or another Debian release's
/// arm64 archive (for a program the machine's release does not have, virtiofsd say), read by
/// an apt of its own whose lists and downloads live in the cache. apt checks the release's
/// signature with the machine's Debian keyring either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AptSource {
    System,
    Release(&'static str),
}

impl AptSource {
    /// `apt-get` or `apt-cache` reading this archive.
    pub fn apt(self, program: &str) -> Result<std::process::Command> {
        let mut c = cmd(program);
        // Downloads land in the cache, which apt's sandbox user cannot write (and warns).
        c.args(["-o", "APT::Sandbox::User=root"]);
        if let AptSource::Release(release) = self {
            let dir = cache().join(format!("apt-{release}"));
            let (lists, archives) = (dir.join("lists"), dir.join("cache"));
            std::fs::create_dir_all(lists.join("partial"))?;
            std::fs::create_dir_all(archives.join("archives/partial"))?;
            let sources = dir.join("sources.list");
            std::fs::write(
                &sources,
                format!("deb [arch=arm64] http://deb.debian.org/debian {release} main\n"),
            )?;
            let opt = |k: &str, v: &Path| format!("{k}={}", v.display());
            for o in [
                opt("Dir::Etc::SourceList", &sources),
                opt("Dir::Etc::SourceParts", &dir.join("none")),
                opt("Dir::State::Lists", &lists),
                opt("Dir::Cache", &archives),
            ] {
                c.args(["-o", &o]);
            }
        }
        Ok(c)
    }

    /// Where its packages are kept (apart: two releases have files of the same names).
    fn debs(self) -> PathBuf {
        match self {
            AptSource::System => cache().join("debs"),
            AptSource::Release(r) => cache().join(format!("debs-{r}")),
        }
    }

    /// Reads the archive's index anew.
    fn update(self) -> Result<()> {
        run(self.apt("apt-get")?.args(["update", "-qq"]))
    }
}

/// Downloads a Debian package (any architecture) into the cache and unpacks it; returns the
/// unpacked root. Keyed by the package file name, which carries the version.
pub fn deb(pkg: &str) -> Result<PathBuf> {
    deb_from(AptSource::System, pkg)
}

/// `deb` from the archive given.
pub fn deb_from(archive: AptSource, pkg: &str) -> Result<PathBuf> {
    ensure_arm64_arch()?;
    let dir = archive.debs();
    std::fs::create_dir_all(&dir)?;
    let stem = pkg.split(':').next().unwrap_or(pkg);
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                let n = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                n.starts_with(&format!("{stem}_")) && n.ends_with(".deb")
            })
    };
    let file = match find() {
        Some(f) => f,
        None => {
            println!("==> downloading {pkg} ({archive:?})");
            let download = || -> Result<()> {
                run(archive
                    .apt("apt-get")?
                    .args(["download", "-q", pkg])
                    .current_dir(&dir))
            };
            if download().is_err() {
                archive.update()?;
                download()?;
            }
            find().with_context(|| {
                format!("apt-get download {pkg} left no .deb in {}", dir.display())
            })?
        }
    };
    let out = file.with_extension("unpacked");
    if !out.join(".done").exists() {
        let _ = std::fs::remove_dir_all(&out);
        run(cmd("dpkg-deb").arg("-x").arg(&file).arg(&out))?;
        std::fs::write(out.join(".done"), "")?;
    }
    Ok(out)
}

/// An initramfs with busybox, our /init and the scenario (with `vars` exported before it).
pub fn initramfs(scenario: &str, vars: &[(&str, &str)], out: &Path) -> Result<()> {
    initramfs_with(scenario, vars, &[], out)
}

/// A guest program from guest/tools (C), built static for arm64 with Debian's cross gcc.
pub fn tool(name: &str) -> Result<Vec<u8>> {
    env::ensure_apt(&["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"])?;
    let src = root().join("guest/tools").join(format!("{name}.c"));
    let out = root().join("target/board").join(name);
    std::fs::create_dir_all(root().join("target/board"))?;
    run(cmd("aarch64-linux-gnu-gcc")
        .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src))?;
    Ok(std::fs::read(&out)?)
}

/// A bare guest Image from `guest/tools/NAME.S`: assembled and its text taken as it is.
pub fn bare_image(name: &str) -> Result<Vec<u8>> {
    env::ensure_apt(&["gcc-aarch64-linux-gnu", "binutils-aarch64-linux-gnu"])?;
    let src = root().join("guest/tools").join(format!("{name}.S"));
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let (obj, out) = (
        dir.join(format!("{name}.o")),
        dir.join(format!("{name}.bin")),
    );
    run(cmd("aarch64-linux-gnu-as").arg("-o").arg(&obj).arg(&src))?;
    run(cmd("aarch64-linux-gnu-objcopy")
        .args(["-O", "binary"])
        .arg(&obj)
        .arg(&out))?;
    Ok(std::fs::read(&out)?)
}

/// `initramfs` with extra executables: (path in the guest, contents).
pub fn initramfs_with(
    scenario: &str,
    vars: &[(&str, &str)],
    programs: &[(&str, Vec<u8>)],
    out: &Path,
) -> Result<()> {
    let bb = deb("busybox-static:arm64")?.join("bin/busybox");
    let busybox = std::fs::read(&bb).with_context(|| format!("cannot read {}", bb.display()))?;
    let init = std::fs::read(root().join("guest/initramfs/init"))?;
    let path = root()
        .join("guest/scenarios")
        .join(format!("{scenario}.sh"));
    let body = std::fs::read_to_string(&path)
        .with_context(|| format!("no scenario {}", path.display()))?;
    let mut script = String::new();
    for (k, v) in vars {
        script.push_str(&format!("export {k}='{v}'\n"));
    }
    script.push_str(&body);
    let mut a = Archive::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "mnt"] {
        a.add(d, Entry::Dir);
    }
    a.add("dev/console", Entry::CharDev { major: 5, minor: 1 })
        .add(
            "bin/busybox",
            Entry::File {
                data: busybox,
                mode: 0o755,
            },
        )
        .add("bin/sh", Entry::Symlink("busybox".into()))
        .add(
            "init",
            Entry::File {
                data: init,
                mode: 0o755,
            },
        )
        .add(
            "scenario.sh",
            Entry::File {
                data: script.into_bytes(),
                mode: 0o644,
            },
        );
    for (path, data) in programs {
        a.add(
            path,
            Entry::File {
                data: data.clone(),
                mode: 0o755,
            },
        );
    }
    let f =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    a.write(std::io::BufWriter::new(f))?;
    Ok(())
}

/// Where partition 2 sits in the disk image, in 512-byte sectors.
pub const P2_START: u64 = 18432;
pub const P2_SECTORS: u64 = 98304;

/// An MBR disk: partition 1 (8 MiB, empty) and partition 2 (`p2_sectors` of ext4 holding
/// `files`); 60 MiB in all with the default P2_SECTORS.
pub fn disk<B: AsRef<[u8]>>(files: &[(&str, B)], out: &Path, p2_sectors: u64) -> Result<()> {
    disk_with(files, None, out, p2_sectors)
}

/// A disk whose partition 2 is a bootable root file system: busybox, our init as /sbin/init,
/// the scenario and `files` (text or programs, which the scenario makes executable), for
/// `root=/dev/vda2` boots.
pub fn root_disk<B: AsRef<[u8]>>(
    scenario: &str,
    files: &[(&str, B)],
    out: &Path,
    p2_sectors: u64,
) -> Result<()> {
    disk_with(files, Some(scenario), out, p2_sectors)
}

fn disk_with<B: AsRef<[u8]>>(
    files: &[(&str, B)],
    root_scenario: Option<&str>,
    out: &Path,
    p2_sectors: u64,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    env::ensure_apt(APT)?;
    let work = out.with_extension("work");
    let _ = std::fs::remove_dir_all(&work);
    let stage = work.join("root");
    std::fs::create_dir_all(&stage)?;
    for (name, body) in files {
        std::fs::write(stage.join(name), body)?;
    }
    if let Some(scenario) = root_scenario {
        for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "mnt"] {
            std::fs::create_dir_all(stage.join(d))?;
        }
        let bb = stage.join("bin/busybox");
        std::fs::copy(deb("busybox-static:arm64")?.join("bin/busybox"), &bb)?;
        std::os::unix::fs::symlink("busybox", stage.join("bin/sh"))?;
        let init = stage.join("sbin/init");
        std::fs::copy(root().join("guest/initramfs/init"), &init)?;
        for f in [&bb, &init] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::copy(
            root()
                .join("guest/scenarios")
                .join(format!("{scenario}.sh")),
            stage.join("scenario.sh"),
        )?;
    }
    let p2 = work.join("p2.img");
    run(cmd("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&stage)
        .arg(&p2)
        .arg(format!("{}k", p2_sectors / 2)))?;
    let f = std::fs::File::create(out)?;
    f.set_len(((P2_START + p2_sectors) * 512).next_multiple_of(1 << 20))?;
    drop(f);
    let mut sf = cmd("sfdisk");
    sf.arg("--quiet")
        .arg(out)
        .stdin(std::process::Stdio::piped());
    let mut child = sf.spawn().context("cannot run sfdisk")?;
    use std::io::Write;
    child.stdin.take().unwrap().write_all(
        format!("label: dos\nstart=2048, size=16384, type=83\nstart={P2_START}, size={p2_sectors}, type=83\n").as_bytes(),
    )?;
    if !child.wait()?.success() {
        bail!("sfdisk failed on {}", out.display());
    }
    run(cmd("dd")
        .arg(format!("if={}", p2.display()))
        .arg(format!("of={}", out.display()))
        .args([
            "bs=512",
            &format!("seek={P2_START}"),
            "conv=notrunc,sparse",
            "status=none",
        ]))?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// Reads a file from partition 2 of a qcow2 image (made from a [`disk`]), after `qemu-img
/// check` finds it sound: converted to a raw image beside it first.
pub fn read_from_qcow2_p2(image: &Path, name: &str) -> Result<String> {
    let check = env::output(cmd("qemu-img").arg("check").arg(image))?;
    anyhow::ensure!(
        check.contains("No errors"),
        "qemu-img check {}: {check}",
        image.display()
    );
    let raw = image.with_extension("raw");
    run(cmd("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&raw))?;
    read_from_p2(&raw, name)
}

/// Reads a file from partition 2 of a disk image made by [`disk`] (after the guest wrote it).
pub fn read_from_p2(disk: &Path, name: &str) -> Result<String> {
    let part = disk.with_extension("p2");
    run(cmd("dd")
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", part.display()))
        .args([
            "bs=512",
            &format!("skip={P2_START}"),
            &format!("count={P2_SECTORS}"),
            "status=none",
        ]))?;
    let o = cmd("debugfs")
        .arg("-R")
        .arg(format!("cat /{name}"))
        .arg(&part)
        .output()?;
    let _ = std::fs::remove_file(&part);
    if !o.status.success() {
        bail!("debugfs could not read /{name} from {}", disk.display());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// An out-of-tree module from guest/modules/NAME, built against a guest kernel's build tree
/// (in a copy under target/, so that the sources stay clean). Returns the .ko.
pub fn kernel_module(k: &crate::kernel::Kernel, name: &str) -> Result<Vec<u8>> {
    env::ensure_apt(&["gcc-aarch64-linux-gnu", "make", "bc", "flex", "bison"])?;
    let src = root().join("guest/modules").join(name);
    let work = root().join("target/guest-modules").join(name);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        std::fs::copy(e.path(), work.join(e.file_name()))?;
    }
    // The build tree's Makefile includes the source tree's: a cached kernel whose source tree
    // is gone (a cache cleaned in part, or seeded with kernels alone) gets it back first.
    crate::kernel::source()?;
    // The kernel was built without `make modules`: vmlinux.symvers has what modpost needs.
    run(cmd("make")
        .arg("-s")
        .arg("-C")
        .arg(&k.build)
        .arg(format!("M={}", work.display()))
        .args(["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"])
        .arg(format!(
            "KBUILD_EXTRA_SYMBOLS={}",
            k.build.join("vmlinux.symvers").display()
        ))
        .arg("modules"))?;
    let ko = work.join(format!("{name}.ko"));
    std::fs::read(&ko).with_context(|| format!("no {} after the module build", ko.display()))
}
