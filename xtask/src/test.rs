//! `cargo xtask test`: every check, each a step; a summary line at the end.

use crate::env::{self, cargo, cmd, root, run};
use crate::{board, kernel, kvmboot, realboot, schema};
use anyhow::{bail, Context, Result};
use std::time::Instant;

/// What `cargo test` needs from Debian: dtc for the device tree tests, cpio to list archives,
/// qemu-img to make and check qcow2 images, qemu-storage-daemon (in qemu-system-common) as a
/// third-party vhost-user-blk backend.
pub const APT_PACKAGES: &[&str] = &[
    "device-tree-compiler",
    "cpio",
    "qemu-utils",
    "qemu-system-common",
];

struct Steps {
    passed: Vec<String>,
    /// Each failed step with its error and the log lines it names (`failure_summary`, taken
    /// when it failed: a later run may write the same log), repeated in the summary: CI may
    /// keep only the end of the output, and a board's log is gone with the machine.
    failed: Vec<(String, String)>,
    /// Board steps that failed once and passed when run again, with the first run's summary:
    /// reported as such, never silently (a rare failure still says something to look into).
    flaky: Vec<(String, String)>,
}

impl Steps {
    fn step(&mut self, name: &str, f: impl FnOnce() -> Result<()>) {
        println!("\n==> {name}");
        let t = Instant::now();
        self.record(name, t, f());
    }

    /// A step in the emulated board: run a second time if the first fails, and both told.
    fn board_step(&mut self, name: &str, f: impl Fn() -> Result<()>) {
        println!("\n==> {name}");
        let t = Instant::now();
        match f() {
            Ok(()) => self.record(name, t, Ok(())),
            Err(e) => {
                let first = format!("{e:#}");
                println!("<== {name}: FAILED once, running it again: {first}");
                let first = failure_summary(&first);
                let t = Instant::now();
                let again = f();
                if again.is_ok() {
                    self.flaky.push((name.into(), first));
                }
                self.record(name, t, again);
            }
        }
    }

    fn record(&mut self, name: &str, t: Instant, result: Result<()>) {
        match result {
            Ok(()) => {
                println!("<== {name}: ok ({:.1}s)", t.elapsed().as_secs_f64());
                self.passed.push(name.into());
            }
            Err(e) => {
                let why = format!("{e:#}");
                println!("<== {name}: FAILED: {why}");
                self.failed.push((name.into(), failure_summary(&why)));
            }
        }
    }
}

pub fn all() -> Result<()> {
    // Tools first: without them the later steps cannot mean anything.
    env::ensure_apt(APT_PACKAGES)?;
    let schema = schema::ensure()?;

    let mut s = Steps {
        passed: Vec::new(),
        failed: Vec::new(),
        flaky: Vec::new(),
    };
    s.step("cargo fmt --check", || {
        run(cargo().args(["fmt", "--all", "--", "--check"]))
    });
    s.step("cargo clippy -D warnings", || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ]))
    });
    s.step("cargo clippy -D warnings, aarch64", crate::cross::clippy);
    s.step("cargo test", || run(cargo().args(["test", "--workspace"])));
    s.step("cargo fuzz: 20 s per target", || crate::fuzz::run_all(20));
    s.step("dt-validate on generated device trees", || {
        dt_validate(&schema)
    });
    s.step("guest kernel, driver role (kconfig-checked)", || {
        kernel::build(kernel::Role::Driver).map(|_| ())
    });
    s.step("guest kernel, device role (kconfig-checked)", || {
        kernel::build(kernel::Role::Device).map(|_| ())
    });
    s.step(
        "real boot: our DTB, QEMU's virtio devices, the pool in use",
        realboot::good_boot,
    );
    s.step("negative boot: reusable pool", realboot::reusable_pool_boot);
    s.step("negative boot: no PCI node", realboot::no_pci_boot);
    s.step(
        "negative boot: dangling msi-parent",
        realboot::dangling_msi_boot,
    );
    s.step("doctor on this run's boot logs", doctor_on_boots);
    s.board_step(
        "board: KVM smoke test inside the emulated arm64 machine",
        board::smoke,
    );
    s.board_step(
        "demo: the driver VM with its devices in the backend process",
        || crate::demo::run(false),
    );
    s.board_step(
        "board: splitvirt boots our kernel and Debian's on KVM",
        kvmboot::boot_on_kvm,
    );
    s.board_step(
        "board: two VMs joined by a cross-VM connector",
        crate::kvmconn::connect_two_vms,
    );
    s.board_step(
        "board: a driver VM's root file system served by a device VM",
        crate::devvm::driver_served_by_a_device_vm,
    );
    s.board_step(
        "board: the device VM killed under a driver VM's I/O, another takes over",
        crate::devvm::with_the_device_vm_killed,
    );
    s.board_step(
        "board: vhost-user devices (qemu-storage-daemon, virtiofsd, vhost-device-vsock/-console) handed the pool alone",
        crate::kvmvhost::vhost_user_devices,
    );

    println!("\nxtask test steps:");
    for p in &s.passed {
        println!("  ok      {p}");
    }
    for (f, why) in &s.flaky {
        println!("  FLAKY   {f}: failed once, then passed; the first run:");
        println!("{why}");
    }
    for (f, why) in &s.failed {
        println!("  FAILED  {f}");
        println!("{why}");
    }
    println!(
        "xtask: {} passed, {} failed",
        s.passed.len(),
        s.failed.len()
    );
    if !s.failed.is_empty() {
        bail!("{} step(s) failed", s.failed.len());
    }
    Ok(())
}

/// A failed step's error for the summary, cut to a few lines, then from the log it names
/// (`(log: PATH)`) the last lines that say what went wrong and, after `...`, its last lines
/// (where a run that hung stopped).
fn failure_summary(why: &str) -> String {
    const MAX_CHARS: usize = 1200;
    const MAX_LOG_LINES: usize = 12;
    const TAIL_LINES: usize = 4;
    let mut out: String = why.chars().take(MAX_CHARS).collect();
    if why.chars().count() > MAX_CHARS {
        out.push_str(" [...]");
    }
    let mut lines: Vec<String> = out.lines().map(|l| format!("          {l}")).collect();
    let log = why
        .rsplit_once("(log: ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .and_then(|(path, _)| std::fs::read(path).ok());
    if let Some(log) = log {
        let log = String::from_utf8_lossy(&log);
        let all: Vec<&str> = log.lines().collect();
        let telling: Vec<&str> = all.iter().copied().filter(|l| telling_line(l)).collect();
        let quote = |l: &&str| format!("          | {}", l.chars().take(200).collect::<String>());
        lines.extend(
            telling[telling.len().saturating_sub(MAX_LOG_LINES)..]
                .iter()
                .map(quote),
        );
        lines.push("          | ...".into());
        lines.extend(
            all[all.len().saturating_sub(TAIL_LINES)..]
                .iter()
                .map(quote),
        );
    }
    lines.join("\n")
}

/// A log line that says something failed: a failed check, an error, a guest's oops, a hang.
fn telling_line(l: &str) -> bool {
    const MARKS: &[&str] = &[
        " FAIL",
        "error:",
        "I/O error",
        "panic",
        "Oops",
        "BUG:",
        "stopped",
        "HANG",
        "timed out",
        "Killed",
        "LOCKUP",
        "rcu: INFO",
    ];
    MARKS.iter().any(|m| l.contains(m))
}

/// Every description in tests/dt-validate gives a DTB that the kernel's bindings accept with
/// zero findings; an `expect-*` file must produce the finding its first line names.
fn dt_validate(schema: &schema::Schema) -> Result<()> {
    let sv = env::splitvirt()?;
    let dir = root().join("tests/dt-validate");
    let out = root().join("target/dt-validate");
    std::fs::create_dir_all(&out)?;
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no descriptions in {}", dir.display());
    let mut problems = Vec::new();
    for f in &files {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        let dtb = out.join(format!("{name}.dtb"));
        run(cmd(&sv)
            .arg("dtb")
            .arg("--config")
            .arg(f)
            .arg("-o")
            .arg(&dtb))?;
        let o = cmd(&schema.dt_validate)
            .arg("-m")
            .arg("-s")
            .arg(&schema.schema)
            .arg(&dtb)
            .output()
            .context("cannot run dt-validate")?;
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let expect = std::fs::read_to_string(f)?
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .map(str::to_owned);
        match (name.starts_with("expect-"), expect) {
            (true, Some(e)) if report.contains(&e) => {
                println!("  {name}: reports `{e}` as expected")
            }
            (true, e) => problems.push(format!(
                "{name}: expected dt-validate to report {e:?}, got:\n{report}"
            )),
            (false, _) if report.trim().is_empty() && o.status.success() => {
                println!("  {name}: clean")
            }
            (false, _) => problems.push(format!("{name}: dt-validate findings:\n{report}")),
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

/// `splitvirt doctor` on the logs the boots above just wrote: the good one passes, each broken
/// one stops at the step the seed predicts.
fn doctor_on_boots() -> Result<()> {
    let sv = env::splitvirt()?;
    let dir = root().join("target/boots");
    for (log, want) in [
        ("qemu-virt", None),
        ("dangling-msi", None),
        (
            "reusable-pool",
            Some("first step not reached: restricted DMA pool"),
        ),
        ("no-pci", Some("first step not reached: PCI enumerated")),
    ] {
        let o = cmd(&sv)
            .arg("doctor")
            .arg(dir.join(format!("{log}.log")))
            .output()?;
        let out = String::from_utf8_lossy(&o.stdout);
        match want {
            None if o.status.success() => {}
            Some(w) if !o.status.success() && out.contains(w) => {}
            _ => bail!(
                "doctor on {log}.log: expected {want:?}, got (exit {}):\n{out}",
                o.status
            ),
        }
        println!("  {log}: {}", out.lines().last().unwrap_or(""));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_summary_quotes_the_error_and_the_telling_lines_of_its_log() {
        let dir = std::env::temp_dir().join(format!("xtask-summary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("board.log");
        std::fs::write(
            &log,
            "driver| @@ VALUE root_dev 254:2\ndriver| @@ RESULT root_write FAIL \n\
             device| splitvirt-backend: error: queue 0 refused\nall fine here\n",
        )
        .unwrap();
        let s = failure_summary(&format!("the root is wrong (log: {})", log.display()));
        std::fs::remove_dir_all(&dir).unwrap();
        let lines: Vec<&str> = s.lines().map(str::trim).collect();
        assert_eq!(
            lines,
            [
                format!("the root is wrong (log: {})", log.display()).as_str(),
                "| driver| @@ RESULT root_write FAIL",
                "| device| splitvirt-backend: error: queue 0 refused",
                "| ...",
                "| driver| @@ VALUE root_dev 254:2",
                "| driver| @@ RESULT root_write FAIL",
                "| device| splitvirt-backend: error: queue 0 refused",
                "| all fine here",
            ]
        );
    }

    #[test]
    fn a_long_error_is_cut() {
        let s = failure_summary(&"x".repeat(5000));
        assert!(s.len() < 1300 && s.ends_with("[...]"), "{s}");
    }
}
