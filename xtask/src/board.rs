//! The board: an emulated arm64 machine with virtualization (QEMU virt, GICv2) whose Linux has
//! /dev/kvm, running Debian's arm64 kernel and an initramfs that carries the aarch64 splitvirt
//! and one scenario. The harness every KVM test uses.

use crate::cpio::{Archive, Entry};
use crate::env::{self, cmd, root};
use crate::{cross, guest, qemu};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Duration;

/// Debian's arm64 kernel: KVM and virtio-pci built in.
pub const HOST_KERNEL_META: &str = "linux-image-6.12-arm64";

pub fn host_kernel() -> Result<PathBuf> {
    guest::ensure_arm64_arch()?;
    // The meta package names the versioned one; its /boot/vmlinuz-* is the kernel.
    let deps =
        env::output(cmd("apt-cache").args(["depends", &format!("{HOST_KERNEL_META}:arm64")]))?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|p| p.trim_end_matches(":arm64"))
        .find(|p| p.starts_with("linux-image-6.12"))
        .with_context(|| {
            format!("apt-cache depends {HOST_KERNEL_META}:arm64 names no linux-image package")
        })?
        .to_owned();
    let unpacked = guest::deb(&format!("{pkg}:arm64"))?;
    let boot = unpacked.join("boot");
    std::fs::read_dir(&boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", boot.display()))
}

/// Extra files for a scenario: (path in the board, contents).
pub type Files = Vec<(String, Vec<u8>)>;

pub fn run(
    scenario: &str,
    vars: &[(&str, &str)],
    extra: Files,
    timeout: Duration,
) -> Result<qemu::Run> {
    run_with(scenario, vars, extra, timeout, None)
}

/// Size of the outbox: a raw disk the board sees as /dev/vda (with /virtio_blk.ko to load)
/// and writes a tar archive to, for the host to read after the board is gone.
pub const OUTBOX_SIZE: u64 = 128 << 20;

/// What the board of run `r` wrote to its outbox at `outbox` (a tar archive, after the
/// scenario's `check outbox`), unpacked into `into` (emptied first).
pub fn unpack_outbox(
    r: &qemu::Run,
    outbox: &std::path::Path,
    into: &std::path::Path,
) -> Result<()> {
    anyhow::ensure!(
        r.outer().passed("outbox"),
        "the board could not write the outbox (log: {})",
        r.log_path.display()
    );
    let _ = std::fs::remove_dir_all(into);
    std::fs::create_dir_all(into)?;
    env::run(cmd("tar").arg("-xf").arg(outbox).arg("-C").arg(into))
}

/// `run` with an outbox disk at `outbox` (made empty here).
pub fn run_with(
    scenario: &str,
    vars: &[(&str, &str)],
    extra: Files,
    timeout: Duration,
    outbox: Option<&std::path::Path>,
) -> Result<qemu::Run> {
    run_as(
        scenario,
        vars,
        extra,
        timeout,
        outbox,
        Console::Logged(None),
    )
}

/// Where the board's console goes: to its log (each line also to a callback, for a live view),
/// or to this terminal both ways (interactive; no log).
pub enum Console<'a> {
    Logged(Option<&'a mut dyn FnMut(&str)>),
    Terminal,
}

pub fn run_as(
    scenario: &str,
    vars: &[(&str, &str)],
    mut extra: Files,
    timeout: Duration,
    outbox: Option<&std::path::Path>,
    console: Console,
) -> Result<qemu::Run> {
    let mut drive = Vec::new();
    if let Some(path) = outbox {
        let f = std::fs::File::create(path)?;
        f.set_len(OUTBOX_SIZE)?;
        extra.push((
            "virtio_blk.ko".into(),
            module("drivers/block/virtio_blk.ko")?,
        ));
        drive = vec![
            "-drive".to_string(),
            format!("file={},format=raw,if=none,id=outbox", path.display()),
            "-device".into(),
            "virtio-blk-pci,drive=outbox".into(),
        ];
    }
    let kernel = host_kernel()?;
    let sv = cross::splitvirt()?;
    let dir = root().join("target/board");
    std::fs::create_dir_all(&dir)?;
    let bb = guest::deb("busybox-static:arm64")?.join("bin/busybox");
    let mut body: String = vars
        .iter()
        .map(|(k, v)| format!("export {k}='{v}'\n"))
        .collect();
    body.push_str(
        &std::fs::read_to_string(
            root()
                .join("guest/scenarios")
                .join(format!("{scenario}.sh")),
        )
        .with_context(|| format!("no scenario {scenario}"))?,
    );
    let mut a = Archive::default();
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        a.add(d, Entry::Dir);
    }
    a.add("dev/console", Entry::CharDev { major: 5, minor: 1 })
        .add(
            "bin/busybox",
            Entry::File {
                data: std::fs::read(&bb)?,
                mode: 0o755,
            },
        )
        .add("bin/sh", Entry::Symlink("busybox".into()))
        .add(
            "init",
            Entry::File {
                data: std::fs::read(root().join("guest/board/init"))?,
                mode: 0o755,
            },
        )
        .add(
            "lib.sh",
            Entry::File {
                data: std::fs::read(root().join("guest/board/lib.sh"))?,
                mode: 0o644,
            },
        )
        .add(
            "splitvirt",
            Entry::File {
                data: std::fs::read(&sv)?,
                mode: 0o755,
            },
        )
        .add(
            "scenario.sh",
            Entry::File {
                data: body.into_bytes(),
                mode: 0o644,
            },
        );
    for (path, data) in extra {
        a.add(&path, Entry::File { data, mode: 0o644 });
    }
    let initrd = dir.join(format!("{scenario}.cpio"));
    a.write(std::io::BufWriter::new(std::fs::File::create(&initrd)?))?;
    let args: Vec<String> = [
        "-M",
        "virt,virtualization=on,gic-version=2",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "2048",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        // No default NIC: its ROM (efi-virtio.rom) comes only with a Recommends of QEMU's
        // package, and the board's networks are all inside it.
        "-nic",
        "none",
        "-append",
        "console=ttyAMA0 rdinit=/init panic=-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
    ])
    .chain(drive)
    .collect();
    let log = dir.join(format!("{scenario}.log"));
    println!("==> booting the board with scenario {scenario}");
    let r = match console {
        Console::Logged(None) => qemu::run(&args, &log, timeout)?,
        Console::Logged(Some(f)) => qemu::run_streaming(&args, &log, timeout, f)?,
        Console::Terminal => qemu::run_interactive(&args)?,
    };
    println!(
        "  board ran {:.1}s, console in {}",
        r.seconds,
        log.display()
    );
    print_crashes(&r.log);
    Ok(r)
}

/// The smoke test: the board opens /dev/kvm, creates a VM with a vgic-v2 and sees an MMIO exit.
pub fn smoke() -> Result<()> {
    let r = run("board-smoke", &[], Vec::new(), Duration::from_secs(300))?;
    anyhow::ensure!(
        !r.timed_out,
        "the board did not finish within 300 s (log: {})",
        r.log_path.display()
    );
    for name in ["kvm_device", "host_check"] {
        anyhow::ensure!(
            r.passed(name),
            "board check {name} failed (log: {})",
            r.log_path.display()
        );
    }
    let line = r
        .log
        .lines()
        .find(|l| l.contains("host-check:"))
        .unwrap_or_default();
    anyhow::ensure!(
        line.contains("[41] at 0x9000000"),
        "host-check did not report the guest's write: {line:?}"
    );
    println!("  {}", line.trim());
    Ok(())
}

/// A module of the board's kernel, decompressed (busybox insmod takes plain .ko files).
pub fn module(rel: &str) -> Result<Vec<u8>> {
    let kernel = host_kernel()?;
    let root = kernel
        .parent()
        .and_then(|b| b.parent())
        .context("unpacked kernel package")?;
    let modules = root.join("lib/modules");
    let version = std::fs::read_dir(&modules)?
        .filter_map(|e| e.ok())
        .next()
        .context("no lib/modules in the kernel package")?
        .file_name();
    let path = modules
        .join(version)
        .join("kernel")
        .join(format!("{rel}.xz"));
    let o = cmd("xz")
        .arg("-dc")
        .arg(&path)
        .output()
        .with_context(|| format!("cannot run xz on {}", path.display()))?;
    anyhow::ensure!(o.status.success(), "xz -dc {} failed", path.display());
    Ok(o.stdout)
}

/// The user stacks a hang report dumped (`@@ STACK TID SP WORD WORD` lines, guest/board/lib.sh
/// `hang_report`), symbolized with the board's splitvirt (the last aarch64 build): the chain of
/// frame records (x29, x30) from the innermost one of the longest chain, which passes through signal frames
/// (the kernel puts a record in each), after the code addresses above that first record (the
/// innermost calls, whose frames may keep no record).
pub fn print_user_stacks(log: &str) {
    let mut stacks: Vec<(String, u64, Vec<u64>)> = Vec::new();
    for l in log.lines() {
        let Some(rest) = l.split("@@ STACK ").nth(1) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (Some(tid), Some(sp)) = (f.next(), f.next()) else {
            continue;
        };
        let Some(sp) = sp
            .strip_prefix("0x")
            .and_then(|s| u64::from_str_radix(s, 16).ok())
        else {
            continue;
        };
        if stacks.last().map(|(t, _, _)| t.as_str()) != Some(tid) {
            stacks.push((tid.to_owned(), sp, Vec::new()));
        }
        let words = &mut stacks.last_mut().expect("pushed above").2;
        words.extend(f.filter_map(|w| u64::from_str_radix(w, 16).ok()));
    }
    // The static binary is linked at 0x400000 and is far smaller than 256 MiB.
    let code = |w: u64| (0x40_0000..0x1000_0000).contains(&w);
    for (tid, sp, words) in stacks {
        let end = sp + 8 * words.len() as u64;
        let word = |a: u64| words[((a - sp) / 8) as usize];
        let record = |a: u64| {
            (a >= sp && a + 16 <= end && a.is_multiple_of(16) && code(word(a + 8)))
                .then(|| (word(a), word(a + 8)))
        };
        let chain_len = |mut a: u64| {
            let mut n = 0;
            while let Some((fp, _)) = record(a) {
                n += 1;
                if fp <= a {
                    break;
                }
                a = fp;
            }
            n
        };
        // Stale records lie about too: the longest chain is the live one.
        let first = (sp..end)
            .step_by(16)
            .filter(|&a| chain_len(a) > 1)
            .max_by_key(|&a| (chain_len(a), std::cmp::Reverse(a)));
        let mut calls: Vec<(u64, u64)> = Vec::new();
        let top = first.unwrap_or(end);
        for a in (sp..top).step_by(8) {
            if code(word(a)) {
                calls.push((a - sp, word(a)));
            }
        }
        let mut at = first;
        while let Some(a) = at {
            let Some((fp, lr)) = record(a) else { break };
            calls.push((a - sp, lr));
            at = (fp > a).then_some(fp);
        }
        println!("user stack of thread {tid} (offset from SP, call site):");
        // The call before each return address.
        let sites: Vec<u64> = calls.iter().map(|(_, r)| r - 4).collect();
        let Some(names) = symbolize(&sites) else {
            println!("  (aarch64-linux-gnu-addr2line did not run)");
            continue;
        };
        for ((off, _), (func, at)) in calls.iter().zip(names) {
            if func != "??" {
                let mark = if first.is_some_and(|f| *off >= f - sp) {
                    ""
                } else {
                    "?"
                };
                println!("  +{off:#06x}{mark} {func} ({at})");
            }
        }
    }
}

/// Code addresses of the board's splitvirt (the last aarch64 build) as (function, file:line),
/// one pair each; None where addr2line does not run.
fn symbolize(addrs: &[u64]) -> Option<Vec<(String, String)>> {
    let bin = root()
        .join("target/aarch64")
        .join(cross::TARGET)
        .join("release/splitvirt");
    let out = std::process::Command::new("aarch64-linux-gnu-addr2line")
        .args(["-f", "-C", "-e"])
        .arg(&bin)
        .args(addrs.iter().map(|a| format!("{a:#x}")))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    Some(
        lines
            .chunks(2)
            .map(|p| (p[0].to_owned(), p.get(1).unwrap_or(&"").to_string()))
            .collect(),
    )
}

/// The pc and lr the kernel's reports of a user fault give (`pc : 0000000000412abc`).
fn crash_registers(lines: &[&str]) -> Vec<(&'static str, u64)> {
    let mut regs = Vec::new();
    for l in lines {
        for r in ["pc", "lr"] {
            let word = l
                .split(&format!("{r} : "))
                .nth(1)
                .and_then(|w| w.split_whitespace().next());
            if let Some(a) =
                word.and_then(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
            {
                regs.push((r, a));
            }
        }
    }
    regs
}

/// A splitvirt that died of a signal in the board (`@@ CRASH` lines, guest/board/lib.sh
/// `exited`): what the board said, and the pc and lr of the kernel's report symbolized.
pub fn print_crashes(log: &str) {
    let crash: Vec<&str> = log.lines().filter(|l| l.contains("@@ CRASH")).collect();
    if crash.is_empty() {
        return;
    }
    println!("  a splitvirt in the board died of a signal:");
    for l in &crash {
        println!("    {l}");
    }
    let regs = crash_registers(&crash);
    let addrs: Vec<u64> = regs.iter().map(|&(_, a)| a).collect();
    for ((r, a), (func, at)) in regs.iter().zip(symbolize(&addrs).unwrap_or_default()) {
        println!("    {r} {a:#x}: {func} ({at})");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_crash_reports_pc_and_lr() {
        let log = "ping| @@ CRASH signal 11\n\
                   ping| @@ CRASH kernel: [   41.5] vcpu0[311]: unhandled level 3 translation fault (11) at 0x0000000000000008, esr 0x0000000092000007, in splitvirt[400000+1f0000]\n\
                   ping| @@ CRASH kernel: [   41.5] pc : 0000000000412abc\n\
                   ping| @@ CRASH kernel: [   41.5] lr : 0000000000401230\n\
                   ping| @@ CRASH kernel: [   41.5] sp : 0000ffff9a7fe6f0";
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(
            super::crash_registers(&lines),
            [("pc", 0x412abc), ("lr", 0x401230)]
        );
    }
}
