//! The backend's jail (docs/SECURITY.md): the process that serves a VM's devices gets new user,
//! mount, PID, network, IPC and UTS namespaces, an empty read-only root, one unprivileged id,
//! no capabilities, `no_new_privs`, a session of its own and small limits. Nothing here opens
//! a path after the root is changed: what the backend serves it is handed as descriptors.
//!
//! `enter` clones the calling process into the namespaces (a PID namespace takes effect only
//! for a new process). The caller's process stays outside as the jailed one's *keeper*: it
//! writes the id maps (only a process outside the user namespace may map an id other than its
//! own), lets the jailed process go on, then waits for it and ends the way it ended, so that
//! whoever started the backend sees one process with one exit status.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The exit status by which the jailed process says "a system call outside my policy"
/// (its SIGSYS handler cannot re-raise SIGSYS: PID 1 of a namespace ignores its own signals);
/// the keeper turns it back into death by SIGSYS.
pub const EXIT_SIGSYS: i32 = 128 + libc::SIGSYS;

/// Who the jailed process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// The id a backend started by root runs as, unless the description names another:
/// the traditional `nobody`. Give each VM's backend an id of its own where several run.
pub const ROOT_DEFAULT: Ids = Ids {
    uid: 65534,
    gid: 65534,
};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "cannot create the backend's namespaces: {0}; this host does not let this user create \
         user namespaces (see sysctl user.max_user_namespaces, \
         kernel.unprivileged_userns_clone, or an AppArmor userns restriction); allow them, run \
         as root, or set `jail = false` under [backend] to run the backend unconfined"
    )]
    Namespaces(#[source] io::Error),
    #[error("cannot map the backend's id into its namespace ({what}): {source}")]
    IdMap {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot build the backend's jail: {what}: {source}")]
    Step {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn step(what: &'static str) -> impl Fn(io::Error) -> JailError {
    move |source| JailError::Step { what, source }
}

fn check(rc: libc::c_long, what: &'static str) -> Result<libc::c_long, JailError> {
    if rc < 0 {
        return Err(step(what)(io::Error::last_os_error()));
    }
    Ok(rc)
}

/// The ids the backend runs as: root's choice (`as_root`), or an unprivileged caller's own.
pub fn ids_for(as_root: Ids) -> Ids {
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid == 0 {
        as_root
    } else {
        Ids { uid, gid }
    }
}

/// Enters the jail as `ids`. Returns in the jailed process only; the caller's process becomes
/// its keeper and never returns from here. Must be called while the process has one thread.
/// Descriptors stay open across it (the setup socket, the log pipe); stdin should already be
/// /dev/null and stdout/stderr pipes, since the jailed process keeps them.
pub fn enter(ids: Ids) -> Result<(), JailError> {
    let (ready_r, ready_w) = pipe()?;
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    // SAFETY: a fork-like clone (no new stack: the child runs on a copy of ours) of a process
    // with one thread, so the child's copy of every lock is unlocked.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(JailError::Namespaces(io::Error::last_os_error()));
    }
    if pid > 0 {
        drop(ready_r);
        let pid = pid as libc::pid_t;
        if let Err(e) = write_id_maps(pid, ids) {
            // SAFETY: our own child, which waits for us.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Err(e);
        }
        let go = [1u8];
        // SAFETY: a one-byte write to our pipe.
        unsafe { libc::write(ready_w.as_raw_fd(), go.as_ptr().cast(), 1) };
        // Held open until the keeper dies: the jailed process sees it hang up.
        keep(pid, ready_w.as_raw_fd());
    }
    // The jailed process. The keeper's death (its parent's SIGKILL) is ours too.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    drop(ready_w);
    let mut go = [0u8];
    // SAFETY: a one-byte read into a local; EOF means the keeper died before mapping us.
    if unsafe { libc::read(ready_r.as_raw_fd(), go.as_mut_ptr().cast(), 1) } != 1 {
        // SAFETY: ending the process at once.
        unsafe { libc::_exit(1) };
    }
    inside(ids)?;
    // Changing ids cleared the parent-death signal: set it again, then make sure the keeper
    // did not die before (its end of the pipe would have hung up).
    // SAFETY: prctl with integer arguments; poll on our own pipe.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        let mut p = libc::pollfd {
            fd: ready_r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut p, 1, 0) != 0 && p.revents & libc::POLLHUP != 0 {
            libc::_exit(1);
        }
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the array with two new descriptors.
    check(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }.into(),
        "pipe2",
    )?;
    // SAFETY: two new descriptors that we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Maps `ids` (the same numbers inside and out) into the child's user namespace.
fn write_id_maps(pid: libc::pid_t, ids: Ids) -> Result<(), JailError> {
    let write = |file: &str, what: &'static str, text: String| {
        std::fs::write(format!("/proc/{pid}/{file}"), text)
            .map_err(|source| JailError::IdMap { what, source })
    };
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        // An unprivileged process may map its gid only once setgroups is denied.
        write("setgroups", "setgroups", "deny".into())?;
    }
    write("uid_map", "uid_map", format!("{0} {0} 1\n", ids.uid))?;
    write("gid_map", "gid_map", format!("{0} {0} 1\n", ids.gid))
}

/// The keeper: waits for the jailed process and ends as it ended.
fn keep(pid: libc::pid_t, life: RawFd) -> ! {
    // Only the jailed process holds the VM's descriptors: when it dies, they close. The
    // keeper keeps `life`, whose other end tells the jailed process the keeper is alive.
    let life = life as u32;
    // SAFETY: close_range on our own descriptor table.
    unsafe {
        if life > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, life - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, life + 1, u32::MAX, 0u32);
    }
    // SAFETY: prctl and setrlimit with plain arguments.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0);
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: ending the process.
            unsafe { libc::_exit(1) };
        }
    }
    let sig = if libc::WIFSIGNALED(status) {
        Some(libc::WTERMSIG(status))
    } else if libc::WEXITSTATUS(status) == EXIT_SIGSYS {
        Some(libc::SIGSYS)
    } else {
        None
    };
    if let Some(sig) = sig {
        // SAFETY: the default action for `sig`, then `sig` to ourselves.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
        }
    }
    // SAFETY: ending the process with the jailed one's status.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

/// Inside the namespaces, with every capability of the new user namespace (and none
/// outside): the empty root, then the id, then no privileges at all.
fn inside(ids: Ids) -> Result<(), JailError> {
    empty_root()?;
    // SAFETY: setsid, setgroups, setres[ug]id with plain arguments.
    unsafe {
        // No controlling terminal: nothing to inject input into.
        check(libc::setsid().into(), "setsid")?;
        // Supplementary groups can be dropped where setgroups is allowed (started by root);
        // elsewhere they stay and show as the overflow group.
        libc::setgroups(0, std::ptr::null());
        check(
            libc::setresgid(ids.gid, ids.gid, ids.gid).into(),
            "setresgid",
        )?;
        check(
            libc::setresuid(ids.uid, ids.uid, ids.uid).into(),
            "setresuid",
        )?;
    }
    drop_capabilities()?;
    // SAFETY: prctl with integer arguments.
    unsafe {
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into(),
            "no_new_privs",
        )?;
        libc::prctl(libc::PR_SET_DUMPABLE, 0);
    }
    limit(libc::RLIMIT_CORE, 0)?;
    limit(libc::RLIMIT_MEMLOCK, 0)?;
    // Threads count as processes: room for the devices' threads, none for a fork bomb (new
    // processes are also outside every system call policy).
    limit(libc::RLIMIT_NPROC, 512)?;
    Ok(())
}

/// Sets a resource limit (soft and hard).
pub fn limit(resource: libc::__rlimit_resource_t, n: u64) -> Result<(), JailError> {
    let r = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit reads our struct.
    check(unsafe { libc::setrlimit(resource, &r) }.into(), "setrlimit")?;
    Ok(())
}

/// Limits descriptors to those below the highest open one plus `spare` (accepted console
/// clients, a duplicated TAP): call once the devices hold what they need.
pub fn limit_files(spare: u64) -> Result<(), JailError> {
    let mut highest = 2;
    for fd in 3..4096 {
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            highest = fd;
        }
    }
    limit(libc::RLIMIT_NOFILE, highest as u64 + 1 + spare)
}

/// A fresh tmpfs becomes `/`, the old root is detached, and the new one is made read-only:
/// the process reaches no file by name.
fn empty_root() -> Result<(), JailError> {
    use std::ffi::CString;
    let c = |s: &str| CString::new(s).expect("no NUL");
    // Any directory will do to mount on: the mount is private to this namespace.
    let dir = ["/tmp", "/mnt", "/proc", "/"]
        .into_iter()
        .find(|d| std::path::Path::new(d).is_dir())
        .unwrap_or("/");
    let (none, root, here, tmpfs, dirc) = (c("none"), c("/"), c("."), c("tmpfs"), c(dir));
    let opts = c("size=4k,nr_inodes=4,mode=0555");
    let quiet = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: mount/chdir/pivot_root/umount2 with C strings that outlive the calls.
    unsafe {
        check(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
            .into(),
            "making mounts private",
        )?;
        check(
            libc::mount(
                none.as_ptr(),
                dirc.as_ptr(),
                tmpfs.as_ptr(),
                quiet,
                opts.as_ptr().cast(),
            )
            .into(),
            "mounting the empty root",
        )?;
        check(libc::chdir(dirc.as_ptr()).into(), "chdir")?;
        // The old root ends up under the new one, at the same place, and is detached there.
        if libc::syscall(libc::SYS_pivot_root, here.as_ptr(), here.as_ptr()) == 0 {
            check(
                libc::umount2(here.as_ptr(), libc::MNT_DETACH).into(),
                "detaching the old root",
            )?;
        } else {
            // An initramfs root cannot be pivoted away from: the tmpfs is moved over it and
            // becomes the root by chroot, as switch_root does (no capability or directory
            // descriptor is left to climb out with).
            check(
                libc::mount(
                    here.as_ptr(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_MOVE,
                    std::ptr::null(),
                )
                .into(),
                "moving the empty root over /",
            )?;
            check(libc::chroot(here.as_ptr()).into(), "chroot")?;
        }
        check(libc::chdir(root.as_ptr()).into(), "chdir /")?;
        check(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY | quiet,
                std::ptr::null(),
            )
            .into(),
            "making the root read-only",
        )?;
    }
    Ok(())
}

/// Every capability out of every set (bounding, ambient, effective, permitted, inheritable).
fn drop_capabilities() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments; EINVAL past the last capability ends the loop.
    unsafe {
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                break;
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads our header and two data words (version 3).
    check(
        unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) },
        "capset",
    )?;
    Ok(())
}
