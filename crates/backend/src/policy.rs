//! The backend's system call policy (seccomp-bpf, built with rust-vmm's `seccompiler`): the
//! calls its serving loop, its device models and the Rust runtime make, for the device set it
//! serves, and nothing else. A call outside it ends the process: a SIGSYS handler writes which
//! call it was to stderr (splitvirt logs it) and exits with `jail::EXIT_SIGSYS`. Opening a
//! path is answered with EACCES instead (`REFUSED`: the C library opens files of its own).
//!
//! No call opens a path, creates a socket or a process, maps a descriptor, makes memory
//! executable, or changes ids, namespaces or limits: what the backend reaches is what it held
//! when the policy went on.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// What the served devices need beyond the serving loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// A virtio-blk device: positioned I/O, flushes, hole punching on its image.
    pub disk: bool,
    /// A console on a listening Unix socket: accepting clients.
    pub socket_console: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot build the backend's system call filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("cannot install the backend's system call filter: {0}")]
    Install(#[from] seccompiler::Error),
    #[error("cannot prepare for the system call filter (SIGSYS handler, no_new_privs): {0}")]
    Handler(std::io::Error),
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// (name, number) of every call allowed whatever the devices: memory, threads, time, the
/// doorbells (eventfd reads and writes, poll), the setup socket, logging. Constant tables, not
/// built at run time: the SIGSYS handler looks names up in them and must not allocate.
const BASE: &[(&str, i64)] = &[
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("close", libc::SYS_close),
    ("ppoll", libc::SYS_ppoll),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendto", libc::SYS_sendto),
    ("munmap", libc::SYS_munmap),
    ("madvise", libc::SYS_madvise),
    ("mremap", libc::SYS_mremap),
    ("brk", libc::SYS_brk),
    ("futex", libc::SYS_futex),
    ("sched_yield", libc::SYS_sched_yield),
    ("nanosleep", libc::SYS_nanosleep),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("gettid", libc::SYS_gettid),
    ("getpid", libc::SYS_getpid),
    ("getrandom", libc::SYS_getrandom),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    // The C library installs its thread-cancellation handler at the first new thread.
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("rseq", libc::SYS_rseq),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
];

#[cfg(target_arch = "x86_64")]
const BASE_ARCH: &[(&str, i64)] = &[("poll", libc::SYS_poll)];
#[cfg(target_arch = "aarch64")]
const BASE_ARCH: &[(&str, i64)] = &[];

const DISK: &[(&str, i64)] = &[
    ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64),
    ("preadv", libc::SYS_preadv),
    ("pwritev", libc::SYS_pwritev),
    ("lseek", libc::SYS_lseek),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
    ("fallocate", libc::SYS_fallocate),
    // A qcow2 image grows as clusters are allocated. The pool and the control region
    // are sealed at their size: this cannot change them.
    ("ftruncate", libc::SYS_ftruncate),
    ("statx", libc::SYS_statx),
    ("fstat", libc::SYS_fstat),
    ("newfstatat", libc::SYS_newfstatat),
    // imago asks the image's file system for its block size.
    ("fstatfs", libc::SYS_fstatfs),
];

const SOCKET_CONSOLE: &[(&str, i64)] = &[
    ("accept4", libc::SYS_accept4),
    ("shutdown", libc::SYS_shutdown),
];

/// Calls answered with EACCES rather than SIGSYS. The C library opens files of its own from
/// deep inside other calls, holding its locks: glibc's malloc reads
/// /proc/sys/vm/overcommit_memory the first time a thread's heap shrinks, inside `free`. It
/// copes with a failed open; a SIGSYS there ended a backend in the middle of a request. No
/// path opens either way (the jail's root is empty besides).
#[cfg(target_arch = "x86_64")]
const REFUSED: &[(&str, i64)] = &[("openat", libc::SYS_openat), ("open", libc::SYS_open)];
#[cfg(target_arch = "aarch64")]
const REFUSED: &[(&str, i64)] = &[("openat", libc::SYS_openat)];

/// Every call allowed whatever its arguments, for `needs`.
fn plain(needs: Needs) -> impl Iterator<Item = (&'static str, i64)> {
    let disk: &[(&str, i64)] = if needs.disk { DISK } else { &[] };
    let console: &[(&str, i64)] = if needs.socket_console {
        SOCKET_CONSOLE
    } else {
        &[]
    };
    BASE.iter()
        .chain(BASE_ARCH)
        .chain(disk)
        .chain(console)
        .copied()
}

fn cond(arg: u8, op: Op, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, Len::Qword, op, value).expect("argument index below 6")
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).expect("at least one condition")
}

/// Calls allowed only with certain arguments (name, number, rules: any one rule matching
/// allows the call).
fn conditional() -> Vec<(&'static str, i64, Vec<SeccompRule>)> {
    let anon = libc::MAP_ANONYMOUS as u64;
    let exec = libc::PROT_EXEC as u64;
    vec![
        // Memory of its own only: no descriptor mapped (the pool and the control region are
        // mapped before the policy goes on, at their sealed sizes), nothing executable.
        (
            "mmap",
            libc::SYS_mmap,
            vec![rule(vec![
                cond(3, Op::MaskedEq(anon), anon),
                cond(2, Op::MaskedEq(exec), 0),
            ])],
        ),
        (
            "mprotect",
            libc::SYS_mprotect,
            vec![rule(vec![cond(2, Op::MaskedEq(exec), 0)])],
        ),
        // Threads, never processes.
        (
            "clone",
            libc::SYS_clone,
            vec![rule(vec![cond(
                0,
                Op::MaskedEq(libc::CLONE_THREAD as u64),
                libc::CLONE_THREAD as u64,
            )])],
        ),
        // Its own limits, which without a capability it can only lower.
        (
            "prlimit64",
            libc::SYS_prlimit64,
            vec![rule(vec![cond(0, Op::Eq, 0)])],
        ),
        // Thread names only.
        (
            "prctl",
            libc::SYS_prctl,
            vec![rule(vec![cond(0, Op::Eq, libc::PR_SET_NAME as u64)])],
        ),
        // Duplicating a descriptor it holds and reading its flags.
        (
            "fcntl",
            libc::SYS_fcntl,
            [libc::F_GETFD, libc::F_GETFL, libc::F_DUPFD_CLOEXEC]
                .into_iter()
                .map(|c| rule(vec![cond(1, Op::Eq, c as u64)]))
                .collect(),
        ),
    ]
}

/// The calls the policy allows for `needs`, by name, sorted (docs/SECURITY.md counts them).
pub fn allowed(needs: Needs) -> Vec<&'static str> {
    let mut v: Vec<&str> = plain(needs).map(|(n, _)| n).collect();
    v.extend(conditional().into_iter().map(|(n, _, _)| n));
    v.push("clone3");
    v.sort_unstable();
    v.dedup();
    v
}

/// The filters: the allowlist (anything else traps), clone3 answered with ENOSYS so that the
/// C library falls back to clone, whose flags a filter can see, and the `REFUSED` calls
/// answered with EACCES. Where filters disagree the kernel takes the strictest answer, so the
/// last two pass everything else and the allowlist lets their calls through to them.
fn filters(needs: Needs) -> Result<[BpfProgram; 3], PolicyError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, nr) in plain(needs).chain(REFUSED.iter().copied()) {
        rules.insert(nr, Vec::new());
    }
    for (_, nr, r) in conditional() {
        rules.insert(nr, r);
    }
    rules.insert(libc::SYS_clone3, Vec::new());
    let allow = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, ARCH)?;
    let answer = |calls: BTreeMap<i64, Vec<SeccompRule>>, errno: i32| {
        SeccompFilter::new(
            calls,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            ARCH,
        )
    };
    let clone3 = answer(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        libc::ENOSYS,
    )?;
    let refused = answer(
        REFUSED.iter().map(|&(_, nr)| (nr, Vec::new())).collect(),
        libc::EACCES,
    )?;
    Ok([allow.try_into()?, clone3.try_into()?, refused.try_into()?])
}

/// Installs the policy for `needs` on the calling thread, which must be the process's only
/// one (threads started later inherit it). Needs `no_new_privs` (the jail sets it).
pub fn install(needs: Needs) -> Result<(), PolicyError> {
    let filters = filters(needs)?;
    install_sigsys_handler()?;
    // SAFETY: prctl with integer arguments; a process may always give up privileges.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PolicyError::Handler(std::io::Error::last_os_error()));
    }
    // The allowlist goes on last: it allows no seccomp call after it.
    for f in filters.iter().rev() {
        apply(f)?;
    }
    Ok(())
}

/// Installs a filter of one instruction that allows every call, as the policy's filters are
/// installed: the floor any filter costs, to measure the policy against
/// (`examples/syscall_cost.rs`). Needs `no_new_privs` (the jail sets it).
pub fn allow_all() -> Result<(), PolicyError> {
    apply(&vec![seccompiler::sock_filter {
        code: 0x06, // BPF_RET | BPF_K
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ALLOW,
    }])
}

/// Installs one filter with SECCOMP_FILTER_FLAG_SPEC_ALLOW, which seccompiler's
/// `apply_filter` cannot pass (it takes no flags): without it the kernel may switch on the
/// Speculative Store Bypass mitigation for the whole process (on arm64 with the firmware
/// workaround, a call to the firmware at every kernel entry), slowing every request. A store
/// bypass would only leak the backend's own memory to itself: the pool, which the guest
/// already has. Container runtimes (runc) pass the same flag.
fn apply(filter: &BpfProgram) -> Result<(), PolicyError> {
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    let install = |flags: libc::c_ulong| {
        // SAFETY: the kernel copies the program in; `filter` outlives the call. seccompiler's
        // sock_filter is the kernel's layout (repr(C): u16, u8, u8, u32), as libc's is.
        unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &prog as *const libc::sock_fprog,
            )
        }
    };
    let mut rc = install(libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW);
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // A kernel older than 4.17 knows no such flag.
        rc = install(0);
    }
    if rc != 0 {
        return Err(PolicyError::Install(seccompiler::Error::Seccomp(
            std::io::Error::last_os_error(),
        )));
    }
    Ok(())
}

/// SIGSYS: which call, then the exit that the keeper turns into death by SIGSYS. Only
/// async-signal-safe work: digits into a stack buffer, one write, exit_group.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The syscall number sits after si_signo, si_errno, si_code and the call address.
    #[repr(C)]
    struct SysInfo {
        signo: i32,
        errno: i32,
        code: i32,
        _pad: i32,
        call_addr: usize,
        syscall: i32,
        arch: u32,
    }
    // SAFETY: the kernel passes a valid siginfo for SIGSYS with SA_SIGINFO.
    let nr = unsafe { (*info.cast::<SysInfo>()).syscall };
    let mut buf = [0u8; 160];
    let mut n = 0;
    let mut put = |b: &[u8]| {
        for &c in b {
            if n < buf.len() {
                buf[n] = c;
                n += 1;
            }
        }
    };
    put(b"splitvirt-backend: error: system call ");
    let mut digits = [0u8; 12];
    let (mut i, mut v) = (digits.len(), nr.unsigned_abs());
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" (");
    put(name_of(nr).as_bytes());
    put(b") is outside this backend's policy; the process is ended\n");
    // SAFETY: write and exit_group are async-signal-safe and allowed by the policy.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::syscall(libc::SYS_exit_group, crate::jail::EXIT_SIGSYS);
    }
}

/// The name of a call the backend has a reason to be refused, for the log line.
fn name_of(nr: i32) -> &'static str {
    let nr = i64::from(nr);
    let known: &[(&str, i64)] = &[
        ("socket", libc::SYS_socket),
        ("connect", libc::SYS_connect),
        ("execve", libc::SYS_execve),
        ("ptrace", libc::SYS_ptrace),
        ("ioctl", libc::SYS_ioctl),
        ("mmap", libc::SYS_mmap),
        ("mprotect", libc::SYS_mprotect),
        ("clone", libc::SYS_clone),
        ("ftruncate", libc::SYS_ftruncate),
        ("kill", libc::SYS_kill),
        ("prctl", libc::SYS_prctl),
        ("fcntl", libc::SYS_fcntl),
        ("unshare", libc::SYS_unshare),
        ("setns", libc::SYS_setns),
        ("mount", libc::SYS_mount),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("memfd_create", libc::SYS_memfd_create),
        ("accept4", libc::SYS_accept4),
        ("rt_sigaction", libc::SYS_rt_sigaction),
    ];
    let all = plain(Needs {
        disk: true,
        socket_console: true,
    });
    known
        .iter()
        .copied()
        .chain(all)
        .find(|(_, n)| *n == nr)
        .map_or("see ausyscall", |(name, _)| name)
}

fn install_sigsys_handler() -> Result<(), PolicyError> {
    // SAFETY: sigaction with a zeroed struct naming our handler; SA_SIGINFO for the number.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(PolicyError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device set decides the policy: a disk brings positioned I/O and flushes, a socket
    /// console accept; the serving loop alone has neither, and nothing opens a path.
    #[test]
    fn the_policy_follows_the_devices() {
        let bare = allowed(Needs::default());
        let all = allowed(Needs {
            disk: true,
            socket_console: true,
        });
        for call in ["pwrite64", "fdatasync", "accept4"] {
            assert!(!bare.contains(&call) && all.contains(&call), "{call}");
        }
        for call in ["openat", "socket", "connect", "execve", "ptrace", "ioctl"] {
            assert!(!all.contains(&call), "{call}");
        }
        assert!(filters(Needs::default()).is_ok());
    }

    /// The allowlists stay small (docs/SECURITY.md gives these numbers: update both).
    #[test]
    fn the_allowlists_are_as_small_as_documented() {
        let bare = allowed(Needs::default()).len();
        let disk = allowed(Needs {
            disk: true,
            socket_console: false,
        })
        .len();
        let all = allowed(Needs {
            disk: true,
            socket_console: true,
        })
        .len();
        #[cfg(target_arch = "x86_64")]
        let documented = (37, 50, 52);
        #[cfg(target_arch = "aarch64")]
        let documented = (36, 49, 51);
        assert_eq!((bare, disk, all), documented);
    }

    /// AUDIT_ARCH of this target, what a filter loads at `seccomp_data.arch`.
    #[cfg(target_arch = "x86_64")]
    const ARCH_AUDIT: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const ARCH_AUDIT: u32 = 0xc000_00b7;

    /// The kernel (5.11+) skips a filter for calls it can prove always allowed, by running the
    /// program over the call's number and architecture alone (kernel/seccomp.c,
    /// `seccomp_is_const_allow`). This does the same: every call allowed whatever its
    /// arguments, all of the data path (doorbells, futexes, the disk's I/O), must come out
    /// allowed without the program reading an argument, in both filters; with a filter on,
    /// such a call then costs only the kernel's slower system call entry.
    #[test]
    fn the_data_paths_calls_skip_the_filter() {
        fn const_allow(prog: &BpfProgram, nr: u32) -> Option<bool> {
            let (mut acc, mut pc) = (0u32, 0usize);
            loop {
                let i = prog.get(pc)?;
                pc += 1;
                match i.code {
                    0x20 => match i.k {
                        0 => acc = nr,
                        4 => acc = ARCH_AUDIT,
                        _ => return None, // reads an argument
                    },
                    0x06 => return Some(i.k == libc::SECCOMP_RET_ALLOW),
                    0x05 => pc += i.k as usize,
                    0x15 | 0x35 | 0x25 | 0x45 => {
                        let hit = match i.code {
                            0x15 => acc == i.k,
                            0x35 => acc >= i.k,
                            0x25 => acc > i.k,
                            _ => acc & i.k != 0,
                        };
                        pc += usize::from(if hit { i.jt } else { i.jf });
                    }
                    0x54 => acc &= i.k,
                    _ => return None,
                }
            }
        }
        let needs = Needs {
            disk: true,
            socket_console: true,
        };
        let progs = filters(needs).unwrap();
        for (name, nr) in plain(needs) {
            for p in &progs {
                assert_eq!(const_allow(p, nr as u32), Some(true), "{name}");
            }
        }
        // Calls with argument rules are checked by the program; clone3 is refused.
        assert_eq!(const_allow(&progs[0], libc::SYS_mmap as u32), None);
        assert_eq!(const_allow(&progs[1], libc::SYS_clone3 as u32), Some(false));
        // Opening a path: passed by the allowlist, refused (EACCES) by the last filter.
        assert_eq!(const_allow(&progs[0], libc::SYS_openat as u32), Some(true));
        assert_eq!(const_allow(&progs[2], libc::SYS_openat as u32), Some(false));
    }
}
