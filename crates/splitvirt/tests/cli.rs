//! The command line as a user runs it: real files, exit codes and messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_splitvirt"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
}

fn write(dir: &tempfile::TempDir, name: &str, body: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into()
}

#[test]
fn config_check_default_and_example_are_valid() {
    let o = sv(&["config", "check"]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.contains("built-in default VM: valid"));
    let ex = repo("examples/driver-vm.toml");
    let o = sv(&["config", "check", ex.to_str().unwrap()]);
    assert!(o.status.success(), "{:?}", text(&o));
}

#[test]
fn the_example_file_is_the_default_written_out_with_the_seeds_devices() {
    let mut d = layout::Description::load(&repo("examples/driver-vm.toml")).unwrap();
    // The seed's disk (its path relative to the file), TAP and console, booting from the disk.
    assert_eq!(
        d.devices
            .iter()
            .map(|x| x.kind.as_str())
            .collect::<Vec<_>>(),
        ["virtio-blk", "virtio-net", "virtio-console"]
    );
    assert_eq!(d.devices[0].image, Some(repo("examples").join("disk.img")));
    assert!(d.kernel.cmdline.ends_with(" root=/dev/vda2 rw"));
    let default = layout::Description::default_vm();
    d.devices.drain(..2);
    d.kernel.cmdline = default.kernel.cmdline.clone();
    assert_eq!(d, default);
}

#[test]
fn config_check_lists_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "bad.toml",
        "vcpus = 9\n[pci.mem32]\nbase = 0x50000000\nsize = \"512M\"\n",
    );
    let o = sv(&["config", "check", &f]);
    assert_eq!(o.status.code(), Some(1));
    let (_, err) = text(&o);
    assert!(err.contains("vcpus = 9"), "{err}");
    assert!(
        err.contains("PCI 32-bit window [0x50000000-0x6fffffff] (512 MiB) overlaps"),
        "{err}"
    );
    assert!(err.contains("fix:"), "{err}");
    assert!(err.contains("bad.toml: "), "{err}");
}

#[test]
fn typos_and_missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "typo.toml", "[pool]\nbsae = 0x50000000\n");
    let (_, err) = text(&sv(&["config", "check", &f]));
    assert!(
        err.contains("pool") && err.contains("bsae") && err.contains("typo.toml"),
        "{err}"
    );
    let o = sv(&["config", "show", "/nonexistent/vm.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o)
        .1
        .contains("cannot read VM description /nonexistent/vm.toml"));
}

#[test]
fn config_show_is_sorted_by_address() {
    let ex = repo("examples/driver-vm.toml");
    let o = sv(&["config", "show", ex.to_str().unwrap()]);
    assert!(o.status.success());
    let (out, _) = text(&o);
    let starts: Vec<u64> = out
        .lines()
        .skip_while(|l| !l.starts_with("region"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let hex = l.split_whitespace().rev().nth(3).unwrap();
            u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap()
        })
        .collect();
    assert_eq!(starts.len(), 10, "{out}");
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:x?}");
    assert!(out.contains("00:01.0  virtio-blk"));
}

#[test]
fn dtb_writes_a_blob_and_prints_dts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vm.dtb");
    let o = sv(&[
        "dtb",
        "-o",
        out.to_str().unwrap(),
        "--initrd-range",
        "0x48000000,0x48100000",
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let t = devicetree::Tree::parse(&std::fs::read(&out).unwrap()).unwrap();
    assert!(t.find("/chosen").unwrap().has("linux,initrd-start"));
    let (dts, _) = text(&sv(&["dtb", "--dts"]));
    assert!(dts.starts_with("/dts-v1/;"));
    assert!(dts.contains("compatible = \"restricted-dma-pool\";"));
    // Neither an output nor --dts: a usage error.
    assert_eq!(sv(&["dtb"]).status.code(), Some(2));
    let (_, err) = text(&sv(&["dtb", "--dts", "--initrd-range", "5,3"]));
    assert!(err.contains("not above START"), "{err}");
}

#[test]
fn lint_dtb_passes_ours_and_rejects_junk() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vm.dtb");
    assert!(sv(&["dtb", "-o", out.to_str().unwrap()]).status.success());
    let o = sv(&["lint-dtb", out.to_str().unwrap()]);
    assert!(o.status.success(), "{:?}", text(&o));
    let junk = write(&dir, "junk.dtb", "this is not a device tree");
    let o = sv(&["lint-dtb", &junk]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("not a device tree blob"),
        "{:?}",
        text(&o)
    );
}

#[test]
fn kconfig_fragment_and_check() {
    let (frag, _) = text(&sv(&["kconfig", "fragment", "--role", "device"]));
    assert!(frag.contains("CONFIG_DMA_RESTRICTED_POOL=y") && frag.contains("CONFIG_KVM=y"));
    let (frag, _) = text(&sv(&["kconfig", "fragment", "--role", "driver"]));
    assert!(!frag.contains("CONFIG_KVM=y"));
    let debian = repo("crates/kconfig/tests/fixtures/debian-6.12.100+deb12-arm64.config");
    let o = sv(&[
        "kconfig",
        "check",
        "--role",
        "driver",
        debian.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let (out, err) = text(&o);
    assert!(
        out.contains("error: CONFIG_DMA_RESTRICTED_POOL: is not set"),
        "{out}"
    );
    assert!(err.contains("required option(s) missing"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "notes.txt", "hello\n");
    let (_, err) = text(&sv(&["kconfig", "check", "--role", "driver", &f]));
    assert!(err.contains("no CONFIG_ lines"), "{err}");
}

/// `splitvirt console` against a listening socket, as a VM's socket console would be.
#[test]
fn console_carries_both_ways_and_names_a_missing_socket() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hvc.sock");
    let o = sv(&["console", path.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("hvc.sock") && err.contains("cannot connect"),
        "{err}"
    );

    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_splitvirt"))
        .args(["console", path.to_str().unwrap(), "--linger", "1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut vm, _) = listener.accept().unwrap();
    vm.write_all(b"from the guest\n").unwrap();
    child.stdin.take().unwrap().write_all(b"typed\n").unwrap();
    let mut got = [0u8; 6];
    vm.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    vm.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"typed\n");
    drop(vm);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the guest\n");
}

/// `--log-file` takes splitvirt's log off stderr (where a guest console could share the
/// terminal) into a file of its own, whole lines, levels from RUST_LOG.
#[test]
fn the_log_goes_to_its_own_file_at_the_level_asked() {
    let dir = tempfile::tempdir().unwrap();
    let run = |level: &str| {
        let log = dir.path().join(format!("{level}.log"));
        let sock = dir.path().join(format!("{level}.sock"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_splitvirt"))
            .arg("--log-file")
            .arg(&log)
            .args(["backend", "--listen"])
            .arg(&sock)
            .env("RUST_LOG", level)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Up once the socket exists; with a log, once the log says so. Killed then: the file
        // is final when it is read.
        let mut waited = 0;
        let up = || {
            sock.exists()
                && (level == "off"
                    || std::fs::read_to_string(&log).is_ok_and(|t| t.ends_with('\n')))
        };
        while !up() && waited < 1000 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            waited += 1;
        }
        child.kill().unwrap();
        let o = child.wait_with_output().unwrap();
        (
            std::fs::read_to_string(&log).unwrap_or_default(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (file, stderr) = run("info");
    assert!(
        file.lines()
            .any(|l| l.starts_with("splitvirt-backend: listening on ") && l.contains("info.sock")),
        "{file:?}"
    );
    assert!(stderr.is_empty(), "{stderr:?}");
    let (file, _) = run("off");
    assert!(file.is_empty(), "{file:?}");
}

/// doctor exits non-zero and names the function when a virtio disk got no driver (a real
/// boot log of a kernel built without VIRTIO_BLK).
#[test]
fn doctor_names_a_device_that_no_driver_took() {
    let log = repo("crates/doctor/tests/fixtures/no-virtio-blk.log");
    let o = sv(&["doctor", log.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let (out, _) = text(&o);
    assert!(
        out.contains("no driver took 0000:00:01.0 (virtio-blk)"),
        "{out}"
    );
    assert!(out.contains("CONFIG_VIRTIO_BLK=y"), "{out}");
}

/// splitvirt is not dumpable: another process of the same user cannot read it through
/// /proc/PID (environ here; mem and fd are held to the same check). Both run as an unprivileged
/// user, which takes root to arrange; the same probe on an ordinary process of that user
/// succeeds, so the test can tell.
#[test]
fn another_process_of_the_same_user_cannot_read_splitvirt() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run two processes as another user");
        return;
    }
    const NOBODY: u32 = 65534;
    let as_nobody = |c: &mut Command| {
        c.uid(NOBODY).gid(NOBODY);
    };
    let dir = tempfile::tempdir().unwrap();
    // The socket's directory must be the user's to listen there.
    // SAFETY: chown of a directory of this test.
    let path = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::chown(path.as_ptr(), NOBODY, NOBODY) }, 0);
    let sock = dir.path().join("b.sock");
    // A copy the user can reach, wherever the build tree is.
    let exe = dir.path().join("splitvirt");
    std::fs::copy(env!("CARGO_BIN_EXE_splitvirt"), &exe).unwrap();
    let mut sv = Command::new(&exe);
    sv.args(["backend", "--listen"]).arg(&sock);
    as_nobody(&mut sv);
    // Another test's fork may briefly hold the copy's write descriptor (ETXTBSY until that
    // child execs): try again, boundedly.
    let mut tries = 0;
    let mut sv = loop {
        match sv.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r.unwrap(),
        }
    };
    let mut plain = Command::new("sleep");
    plain.arg("60");
    as_nobody(&mut plain);
    let mut plain = plain.spawn().unwrap();
    let mut waited = 0;
    while !sock.exists() && waited < 2000 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
    }
    let probe = |pid: u32| {
        let mut c = Command::new("cat");
        c.arg(format!("/proc/{pid}/environ"));
        as_nobody(&mut c);
        c.output().unwrap()
    };
    let on_plain = probe(plain.id());
    let on_sv = probe(sv.id());
    let _ = (sv.kill(), plain.kill(), sv.wait(), plain.wait());
    assert!(sock.exists(), "splitvirt did not come up");
    assert!(
        on_plain.status.success(),
        "the probe cannot read even a plain process"
    );
    assert!(
        !on_sv.status.success(),
        "the same user read splitvirt's /proc/PID/environ"
    );
    assert!(
        String::from_utf8_lossy(&on_sv.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&on_sv.stderr)
    );
}

/// A device VM's backend polls for a bounded time, and only where it serves a port.
#[test]
fn backend_poll_us_is_bounded_and_needs_a_port() {
    let o = sv(&["backend", "--port", "/dev/uio0", "--poll-us", "20000"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("--poll-us") && err.contains("0..=10000"),
        "{err}"
    );
    let o = sv(&["backend", "--setup-fd", "3", "--poll-us", "50"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("--poll-us") && err.contains("--port"), "{err}");
}

/// Options of one way to run the backend are refused with another (clap lets them through),
/// and a setup descriptor that is not open is named, not an abort.
#[test]
fn backend_options_stay_with_their_mode() {
    let o = sv(&["backend", "--setup-fd", "3", "--max-vms", "2"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--max-vms") && err.contains("--listen"),
        "{err}"
    );
    // The test's own process has no descriptor 57 open, nor does the child.
    let o = sv(&["backend", "--setup-fd", "57"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--setup-fd 57"), "{err}");
}

/// `config show` says which host CPUs each vCPU may run on, when the description pins them.
#[test]
fn config_show_names_each_vcpus_host_cpus() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "pinned.toml",
        "vcpus = 2\nvcpu_affinity = [\"1\", \"3,2\"]\n",
    );
    let (out, err) = text(&sv(&["config", "show", &f]));
    assert!(
        out.lines()
            .next()
            .is_some_and(|l| l.ends_with("2 vCPU(s); host CPUs: vCPU 0 on 1, vCPU 1 on 2-3")),
        "{out}{err}"
    );
    let (out, _) = text(&sv(&[
        "config",
        "show",
        &write(&dir, "free.toml", "vcpus = 2\n"),
    ]));
    assert!(!out.contains("host CPUs"), "{out}");
}
