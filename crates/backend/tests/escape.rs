//! The jail against a backend that tries to get out (docs/SECURITY.md): a process enters the
//! same jail (`backend::jail::enter`) and the same system call policy as `splitvirt backend`,
//! holding a sealed pool memfd as the backend does, and tries one way out per run. With the
//! policy each attempt ends it by SIGSYS (or an error where the call is allowed); without the
//! policy the jail alone still refuses each one with the error shown.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

const POOL: i64 = 1 << 20;

/// A pool memfd sealed at its size, as splitvirt hands it over.
fn sealed_pool() -> OwnedFd {
    // SAFETY: memfd_create, ftruncate and fcntl on a descriptor we own.
    unsafe {
        let fd = libc::memfd_create(
            c"pool".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, POOL), 0);
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(libc::fcntl(fd, libc::F_ADD_SEALS, seals), 0);
        OwnedFd::from_raw_fd(fd)
    }
}

/// A pseudo-terminal's terminal side (stdin for the TIOCSTI attempt).
fn terminal() -> std::fs::File {
    // SAFETY: posix_openpt and friends on descriptors we own; ptsname_r into a local.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(m >= 0 && libc::grantpt(m) == 0 && libc::unlockpt(m) == 0);
        let mut name = [0 as libc::c_char; 64];
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
        let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_str().unwrap();
        // The master stays open for the test's life: leak it on purpose.
        std::mem::forget(OwnedFd::from_raw_fd(m));
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }
}

/// What one attempt ended with: `Err(signal)` or `Ok(printed line)`.
fn attempt(what: &str, policy: bool) -> Result<String, i32> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("host.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let pool = sealed_pool();
    let fd = pool.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jail-probe"));
    if !policy {
        cmd.arg("--no-policy");
    }
    cmd.arg(what)
        .arg(std::process::id().to_string())
        .arg(&sock)
        .stdin(Stdio::from(terminal()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    rpc::setup::pass_as_fd3(&mut cmd, fd);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.signal() {
        Some(sig) => {
            if sig == libc::SIGSYS {
                assert!(
                    stderr.contains("is outside this backend's policy"),
                    "{what}: the handler says which call: {stderr}"
                );
            }
            Err(sig)
        }
        None => {
            assert!(out.status.success(), "{what}: {stdout} {stderr}");
            Ok(stdout)
        }
    }
}

fn errno(e: i32) -> Result<String, i32> {
    Ok(format!("errno {e}"))
}

#[test]
fn the_jailed_process_is_nobody_with_nothing() {
    let line = attempt("status", true).unwrap();
    // SAFETY: geteuid cannot fail.
    let uid = if unsafe { libc::geteuid() } == 0 {
        backend::jail::ROOT_DEFAULT.uid
    } else {
        // SAFETY: as above.
        unsafe { libc::geteuid() }
    };
    assert!(
        line.starts_with(&format!("uid={uid} ")),
        "runs as {uid}: {line}"
    );
    assert!(
        line.contains(" pid=1 "),
        "PID 1 of its own namespace: {line}"
    );
    assert!(line.contains(" caps=00 "), "no capability: {line}");
    assert!(line.contains(" nnp=1 "), "no_new_privs: {line}");
    assert!(line.ends_with(" sid=true"), "a session of its own: {line}");
}

#[test]
fn every_way_out_ends_the_backend_under_its_policy() {
    let sigsys = Err(libc::SIGSYS);
    for (what, expect) in [
        // Opening is answered with EACCES (the C library opens files of its own).
        ("reopen-ram", errno(libc::EACCES)),
        ("proc-mem", errno(libc::EACCES)),
        ("open", errno(libc::EACCES)),
        ("inet", sigsys.clone()),
        ("unix", sigsys.clone()),
        ("ptrace", sigsys.clone()),
        ("kill", sigsys.clone()),
        ("execve", sigsys.clone()),
        ("fork", sigsys.clone()),
        ("setuid", sigsys.clone()),
        ("map-more", sigsys.clone()),
        ("tiocsti", sigsys.clone()),
        ("unshare", sigsys.clone()),
        // From inside the allocator, as glibc's malloc makes calls with its arena locked: the
        // SIGSYS handler must end the process without allocating (it deadlocked once).
        ("trap-in-alloc", sigsys.clone()),
        // Allowed for disks (qcow2 images grow), refused by the pool's seals.
        ("grow", errno(libc::EPERM)),
        ("truncate", errno(libc::EPERM)),
    ] {
        assert_eq!(attempt(what, true), expect, "{what}");
    }
}

#[test]
fn without_its_policy_the_jail_alone_still_holds() {
    for (what, expect) in [
        // No /proc, no host file: the root is an empty tmpfs.
        ("reopen-ram", errno(libc::ENOENT)),
        ("proc-mem", errno(libc::ENOENT)),
        ("open", errno(libc::ENOENT)),
        ("unix", errno(libc::ENOENT)),
        ("execve", errno(libc::ENOENT)),
        // A network namespace of its own, with no route anywhere.
        ("inet", errno(libc::ENETUNREACH)),
        // splitvirt is outside its PID namespace.
        ("ptrace", errno(libc::ESRCH)),
        ("kill", errno(libc::ESRCH)),
        // Root is not even an id in its user namespace.
        ("setuid", errno(libc::EINVAL)),
        // Not its controlling terminal (it has none), and no CAP_SYS_ADMIN.
        ("tiocsti", errno(libc::EPERM)),
        // The seals.
        ("truncate", errno(libc::EPERM)),
        ("grow", errno(libc::EPERM)),
    ] {
        assert_eq!(attempt(what, false), expect, "{what}");
    }
}

/// A host where this user may not create user namespaces (here: a user namespace whose own
/// limit allows no nested one) gets no unconfined backend, but an error that names the fix.
#[test]
fn a_host_without_user_namespaces_gets_the_fix() {
    let pool = sealed_pool();
    let fd = pool.as_raw_fd();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--user",
        "--map-root-user",
        "sh",
        "-c",
        "echo 0 >/proc/sys/user/max_user_namespaces && exec \"$0\" status 1 /none",
        env!("CARGO_BIN_EXE_jail-probe"),
    ]);
    rpc::setup::pass_as_fd3(&mut cmd, fd);
    let out = cmd.output().expect("unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout} {out:?}");
    assert!(
        stdout.contains("cannot create the backend's namespaces")
            && stdout.contains("user.max_user_namespaces")
            && stdout.contains("jail = false"),
        "{stdout}"
    );
}
