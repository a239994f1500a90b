//! Programs from Debian's arm64 packages for the board (QEMU for `bench qemu`,
//! qemu-storage-daemon for the vhost-user test), unpacked with every shared library they need
//! (resolved from the binaries' DT_NEEDED), at the paths a Debian system has them.

use crate::env::{self, cmd};
use crate::guest::AptSource;
use crate::{board, guest};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// Where the multiarch libraries of an arm64 Debian system live (in a package and in the board).
const LIB_DIRS: [&str; 2] = ["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu"];

/// The shared libraries an ELF file names (DT_NEEDED).
fn needed(file: &Path) -> Result<Vec<String>> {
    let out = env::output(cmd("aarch64-linux-gnu-readelf").arg("-dW").arg(file))?;
    Ok(out
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.split(']').next()?.to_owned()))
        .collect())
}

/// `rel` inside the unpacked package `root`, following symbolic links inside the package
/// (absolute ones too: they mean the package's root, not this machine's).
fn inside(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut path = root.join(rel);
    for _ in 0..8 {
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !meta.file_type().is_symlink() {
            return Some(path);
        }
        let to = std::fs::read_link(&path).ok()?;
        path = match to.strip_prefix("/") {
            Ok(abs) => root.join(abs),
            Err(_) => path.parent()?.join(to),
        };
    }
    None
}

/// The arm64 library packages a package depends on (its direct Depends).
fn lib_depends(source: AptSource, pkg: &str) -> Result<Vec<String>> {
    let out = env::output(source.apt("apt-cache")?.args(["depends", pkg]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("lib") || p.starts_with("zlib"))
        .map(|p| {
            let p = p.trim_end_matches(":arm64");
            format!("{p}:arm64")
        })
        .collect())
}

/// A program of a Debian arm64 package for the board: `exe` (a path inside the package), the
/// dynamic loader and every shared library they need, at the paths a Debian system has them.
/// Packages are fetched as they are needed: first the program's own, then the libraries its
/// packages depend on, level by level, until every DT_NEEDED is found.
pub fn program_files(package: &str, exe: &str) -> Result<board::Files> {
    program_files_from(AptSource::System, "", package, exe)
}

/// `program_files` from another source, every path under `prefix` (`opt/trixie/`, say: a
/// program of another release brings its own C library, which must not take the place of the
/// board's). Such a program is run through its own loader:
/// `/PREFIX/lib/ld-linux-aarch64.so.1 --library-path /PREFIX/lib/aarch64-linux-gnu /PREFIX/EXE`.
pub fn program_files_from(
    source: AptSource,
    prefix: &str,
    package: &str,
    exe: &str,
) -> Result<board::Files> {
    env::ensure_apt(&["binutils-aarch64-linux-gnu"])?;
    let mut roots = vec![guest::deb_from(source, package)?];
    let mut fetched: BTreeSet<String> = [package.to_owned()].into();
    let mut frontier = vec![package.to_owned()];
    let exe_path = inside(&roots[0], exe).with_context(|| format!("{package} has no /{exe}"))?;
    let mut files: board::Files = vec![(format!("{prefix}{exe}"), std::fs::read(&exe_path)?)];
    let mut want: VecDeque<String> = needed(&exe_path)?.into();
    let mut placed: BTreeSet<String> = BTreeSet::new();
    while let Some(soname) = want.pop_front() {
        if placed.contains(&soname) {
            continue;
        }
        let found = roots
            .iter()
            .flat_map(|r| LIB_DIRS.iter().map(move |d| (r, d)))
            .find_map(|(r, d)| inside(r, &format!("{d}/{soname}")));
        let Some(path) = found else {
            // Not in what is unpacked: take the next level of library packages.
            let mut next = Vec::new();
            for pkg in std::mem::take(&mut frontier) {
                for dep in lib_depends(source, &pkg)? {
                    if fetched.insert(dep.clone()) {
                        roots.push(guest::deb_from(source, &dep)?);
                        next.push(dep);
                    }
                }
            }
            if next.is_empty() {
                bail!(
                    "{soname}, which /{exe} needs, is in none of the {} packages of its \
                     dependency closure ({})",
                    fetched.len(),
                    fetched.iter().cloned().collect::<Vec<_>>().join(" ")
                );
            }
            frontier = next;
            want.push_front(soname);
            continue;
        };
        want.extend(needed(&path)?);
        let data =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if soname == "ld-linux-aarch64.so.1" {
            // The loader also where the programs' PT_INTERP names it.
            files.push((format!("{prefix}lib/ld-linux-aarch64.so.1"), data.clone()));
        }
        files.push((format!("{prefix}{}/{soname}", LIB_DIRS[0]), data));
        placed.insert(soname);
    }
    Ok(files)
}
