//! `cargo xtask demo`: the main job. The default driver VM's memory map and device tree, then
//! splitvirt boots it on KVM (in the board on hosts that are not arm64 with /dev/kvm) with its
//! disk (the project's ext4 root on vda2) and console served by the backend process; the guest
//! writes, syncs and reads back a file, shows the pool and its interrupts, and powers off; a
//! summary table follows.

use crate::env::{self, root};
use crate::{board, guest, kernel};
use anyhow::{bail, ensure, Result};
use std::time::{Duration, Instant};

/// The demo's VM: the built-in default (a console in the backend) plus the root disk.
const VM: &str = "[[device]]\nkind = \"virtio-blk\"\nimage = \"root.img\"\n\
                  [[device]]\nkind = \"virtio-console\"\n";

pub fn run(shell: bool) -> Result<()> {
    let t = Instant::now();
    describe()?;
    let direct = cfg!(target_arch = "aarch64") && std::path::Path::new("/dev/kvm").exists();
    if direct {
        println!("\n==> the driver VM on this host's KVM");
        println!("    first run: the guest kernel (3-6 min) and busybox (a download)");
    } else {
        println!("\n==> the driver VM on KVM, inside the board (an emulated arm64 machine)");
        println!("    first run: the guest kernel (3-6 min), Debian's board kernel and busybox (downloads)");
    }
    let k = kernel::build(kernel::Role::Driver)?;
    let dir = root().join("target/demo");
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("root.img");
    // 32 MiB of ext4: the board carries the image in its initramfs.
    guest::root_disk::<&str>("demo-guest", &[], &disk, 65536)?;
    let files = vec![
        ("guest/Image".to_owned(), std::fs::read(&k.image)?),
        ("guest/root.img".to_owned(), std::fs::read(&disk)?),
        ("guest/demo.toml".to_owned(), VM.as_bytes().to_vec()),
    ];
    let vars: Vec<(&str, &str)> = if shell {
        vec![("DEMO_SHELL", "1")]
    } else {
        Vec::new()
    };
    if shell {
        println!("==> a shell in the guest follows; `exit` powers it off, Ctrl-A x ends splitvirt");
    }
    let mut live = |l: &str| {
        let l = l.trim_end_matches('\r');
        if let Some(vm) = l.strip_prefix("vm| ") {
            if !vm.starts_with("@@ ") {
                println!("  | {vm}");
            }
        } else if l.starts_with("demo: ") {
            println!("{l}");
        }
    };
    let r = if direct {
        on_this_host(files, &vars, shell, &mut live)?
    } else if shell {
        board::run_as(
            "demo-board",
            &vars,
            files,
            Duration::from_secs(3600),
            None,
            board::Console::Terminal,
        )?
    } else {
        board::run_as(
            "demo-board",
            &vars,
            files,
            Duration::from_secs(900),
            None,
            board::Console::Logged(Some(&mut live)),
        )?
    };
    if shell {
        return Ok(());
    }
    ensure!(
        !r.timed_out,
        "the board did not finish within 900 s (log: {})",
        r.log_path.display()
    );
    ensure!(
        r.outer().passed("kvm_device"),
        "the board has no /dev/kvm (log: {})",
        r.log_path.display()
    );
    let vm = r.part("vm");
    let o = r.outer();
    if vm.value("splitvirt_exit") != Some("0") || !vm.passed("readback") {
        let log: Vec<&str> = r
            .log
            .lines()
            .filter_map(|l| l.strip_prefix("svlog| "))
            .collect();
        bail!(
            "the demo VM did not finish its workload (splitvirt exit {:?}, read-back {}); splitvirt said:\n{}\n(log: {})",
            vm.value("splitvirt_exit"),
            vm.passed("readback"),
            log.join("\n"),
            r.log_path.display()
        );
    }
    // The backend holds the pool and nothing else of guest RAM (the RAM memfd never crosses),
    // and it is jailed.
    crate::kvmboot::backend_confined(&o, &r.log_path)?;
    let num = |v: Option<&str>| v.and_then(|x| x.parse::<f64>().ok());
    let rate = |ms: Option<f64>| match (num(vm.value("demo_mib")), ms) {
        (Some(mib), Some(ms)) if ms > 0.0 => format!("{:.1} MB/s", mib * 1.048576 * 1000.0 / ms),
        _ => "?".into(),
    };
    let v = |x: Option<&str>| x.unwrap_or("?").to_owned();
    let rows = [
        (
            "start to guest init (board clock)",
            num(o.value("init_ms")).map_or("?".into(), |ms| format!("{:.2} s", ms / 1000.0)),
        ),
        (
            "disk write + fsync (16 MiB, vda2 ext4)",
            rate(num(vm.value("write_ms"))),
        ),
        (
            "disk read, page cache dropped",
            rate(num(vm.value("read_ms"))),
        ),
        (
            "restricted pool slabs in use (2 KiB)",
            format!(
                "{} of {}",
                v(vm.value("pool_used")),
                v(vm.value("pool_slabs"))
            ),
        ),
        ("virtio interrupts in the guest", v(vm.value("virtio_irqs"))),
        (
            "backend mappings: pool / other shared memory / all",
            format!(
                "{} / {} / {}",
                v(o.value("backend_pool_maps")),
                v(o.value("backend_other_memory")),
                v(o.value("backend_maps"))
            ),
        ),
        (
            "backend confinement",
            format!(
                "uid {}, CapEff {}, seccomp {}, no_new_privs {}, own PID and net namespaces {}/{}, \
                 {} entries in its root, {} fds",
                v(o.value("backend_uid")),
                v(o.value("backend_capeff")),
                v(o.value("backend_seccomp")),
                v(o.value("backend_nonewprivs")),
                v(o.value("backend_own_pidns")),
                v(o.value("backend_own_netns")),
                v(o.value("backend_root_entries")),
                v(o.value("backend_fds"))
            ),
        ),
    ];
    println!("\nsplitvirt demo: the driver VM with its devices in the backend process");
    println!("| measure | value |\n|---|---|");
    for (k, val) in rows {
        println!("| {k} | {val} |");
    }
    println!(
        "\nboard log: {} ({:.0} s in all)",
        r.log_path.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The board's scenario run by this host's shell: the same script, with the files in a
/// directory of ours and the host's splitvirt.
fn on_this_host(
    files: board::Files,
    vars: &[(&str, &str)],
    shell: bool,
    live: &mut dyn FnMut(&str),
) -> Result<crate::qemu::Run> {
    use std::io::BufRead;
    let dir = root().join("target/demo/host");
    let _ = std::fs::remove_dir_all(&dir);
    for (path, data) in files {
        let to = dir.join(path);
        std::fs::create_dir_all(to.parent().unwrap_or(&dir))?;
        std::fs::write(to, data)?;
    }
    let sv = env::splitvirt()?;
    let script = format!(
        "{}\n{}",
        std::fs::read_to_string(root().join("guest/board/lib.sh"))?,
        std::fs::read_to_string(root().join("guest/scenarios/demo-board.sh"))?
    );
    let mut c = env::cmd("sh");
    c.arg("-c")
        .arg(script)
        .env("SV", &sv)
        .env("G", dir.join("guest"))
        .env("LOG", dir.join("splitvirt.log"));
    for (k, v) in vars {
        c.env(k, v);
    }
    let t = Instant::now();
    if shell {
        env::run(&mut c)?;
        return Ok(crate::qemu::Run {
            log: String::new(),
            log_path: Default::default(),
            timed_out: false,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    let mut child = c
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let mut log = String::new();
    if let Some(out) = child.stdout.take() {
        for l in std::io::BufReader::new(out).lines() {
            let l = l?;
            live(&l);
            log.push_str(&l);
            log.push('\n');
        }
    }
    child.wait()?;
    let log_path = dir.join("demo.log");
    std::fs::write(&log_path, &log)?;
    Ok(crate::qemu::Run {
        log,
        log_path,
        timed_out: false,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// The default VM's memory map, device tree (DTB and DTS) and lint.
fn describe() -> Result<()> {
    let sv = env::splitvirt()?;
    let out = root().join("out/demo");
    std::fs::create_dir_all(&out)?;
    let dtb = out.join("driver-vm.dtb");
    let dts = out.join("driver-vm.dts");
    env::run(env::cmd(&sv).args(["config", "show"]))?;
    env::run(env::cmd(&sv).arg("dtb").arg("-o").arg(&dtb))?;
    let text = env::output(env::cmd(&sv).args(["dtb", "--dts"]))?;
    std::fs::write(&dts, text)?;
    env::run(env::cmd(&sv).arg("lint-dtb").arg(&dtb))?;
    println!("\nwrote {} and {}", dtb.display(), dts.display());
    Ok(())
}
