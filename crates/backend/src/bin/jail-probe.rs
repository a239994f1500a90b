//! Test helper (crates/backend/tests/escape.rs): enters the backend's jail, with or without
//! its system call policy, and tries one way out, printing what it got. Not installed anywhere.
//!
//! `jail-probe [--no-policy] WHAT PARENT_PID UNIX_SOCKET`, with the pool memfd (sealed) on fd 3.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};

/// The system allocator, with two tricks for `trap-in-alloc`: when `TRAP` is set, the next
/// allocation makes a call outside the policy from inside the allocator, as the C library's
/// malloc does with its arena locked; and an allocation that starts while another is under
/// way (the SIGSYS handler allocating) ends the process with status 99 instead of the
/// deadlock it would be with the C library's own lock.
struct Guarded;

static TRAP: AtomicBool = AtomicBool::new(false);
static INSIDE: AtomicBool = AtomicBool::new(false);

// SAFETY: forwards to the system allocator; the extra work allocates nothing.
unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if INSIDE.swap(true, Ordering::SeqCst) {
            let msg = b"jail-probe: the allocator was entered again from inside itself\n";
            // SAFETY: a write of a static buffer, then ending the process.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(99);
            }
        }
        if TRAP.swap(false, Ordering::SeqCst) {
            // SAFETY: a system call the policy traps; it returns only without the policy.
            unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
        }
        // SAFETY: the caller's layout, as GlobalAlloc requires.
        let p = unsafe { System.alloc(layout) };
        INSIDE.store(false, Ordering::SeqCst);
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: a pointer this allocator returned, with its layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Guarded = Guarded;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Prints the outcome of a call that returned `rc`: `ok` if it worked, else `errno N`.
fn report(rc: i64) {
    if rc < 0 {
        println!("errno {}", errno());
    } else {
        println!("ok");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (policy, rest) = match args.get(1).map(String::as_str) {
        Some("--no-policy") => (false, &args[2..]),
        _ => (true, &args[1..]),
    };
    let [what, parent, sock] = rest else {
        eprintln!("usage: jail-probe [--no-policy] WHAT PARENT_PID UNIX_SOCKET");
        std::process::exit(2);
    };
    let parent: i32 = parent.parse().expect("a pid");
    let pool = 3;
    // SAFETY: fstat into a local.
    let pool_size = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        assert_eq!(libc::fstat(pool, &mut st), 0, "the pool on fd 3");
        st.st_size as usize
    };
    if let Err(e) = backend::jail::enter(backend::jail::ids_for(backend::jail::ROOT_DEFAULT)) {
        println!("jail failed: {e}");
        std::process::exit(3);
    }
    // SAFETY: mapping the pool the way the backend does, before its policy.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pool_size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            pool,
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // What the jailed process is, and that it still reaches its pool (before the policy,
    // which allows none of these questions).
    if what == "status" {
        // SAFETY: a write into the pool's mapping; capget into locals.
        unsafe {
            *map.cast::<u64>() = 0x5afe;
            let mut data = [0u32; 6];
            let header = [0x2008_0522u32, 0];
            libc::syscall(libc::SYS_capget, header.as_ptr(), data.as_mut_ptr());
            println!(
                "uid={} gid={} pid={} caps={:x}{:x} nnp={} sid={}",
                libc::getuid(),
                libc::getgid(),
                libc::getpid(),
                data[3],
                data[0],
                libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
                libc::getsid(0) == libc::getpid()
            );
        }
        return;
    }
    if policy {
        backend::policy::install(backend::policy::Needs {
            disk: true,
            socket_console: true,
        })
        .expect("policy");
    }
    let c = |s: &str| CString::new(s).unwrap();
    // SAFETY: each arm is one system call with valid arguments; failing is the point.
    unsafe {
        match what.as_str() {
            "reopen-ram" => {
                report(libc::open(c(&format!("/proc/{parent}/fd/3")).as_ptr(), libc::O_RDWR).into())
            }
            "proc-mem" => report(
                libc::open(c(&format!("/proc/{parent}/mem")).as_ptr(), libc::O_RDONLY).into(),
            ),
            "open" => report(libc::open(c("/etc/passwd").as_ptr(), libc::O_RDONLY).into()),
            "inet" => {
                let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if s < 0 {
                    return report(-1);
                }
                let a = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: 53u16.to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_be_bytes([1, 1, 1, 1]).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                report(
                    libc::connect(
                        s,
                        (&a as *const libc::sockaddr_in).cast(),
                        std::mem::size_of_val(&a) as u32,
                    )
                    .into(),
                )
            }
            "unix" => {
                let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if s < 0 {
                    return report(-1);
                }
                let mut a: libc::sockaddr_un = std::mem::zeroed();
                a.sun_family = libc::AF_UNIX as u16;
                for (d, b) in a.sun_path.iter_mut().zip(sock.bytes()) {
                    *d = b as libc::c_char;
                }
                report(
                    libc::connect(
                        s,
                        (&a as *const libc::sockaddr_un).cast(),
                        std::mem::size_of_val(&a) as u32,
                    )
                    .into(),
                )
            }
            "ptrace" => report(libc::ptrace(libc::PTRACE_ATTACH, parent, 0, 0)),
            "kill" => report(libc::kill(parent, libc::SIGKILL).into()),
            "execve" => {
                let sh = c("/bin/sh");
                let argv = [sh.as_ptr(), std::ptr::null()];
                report(libc::execv(sh.as_ptr(), argv.as_ptr()).into())
            }
            "fork" => {
                let pid = libc::fork();
                if pid == 0 {
                    libc::_exit(0);
                }
                report(pid.into())
            }
            "setuid" => report(libc::setuid(0).into()),
            "truncate" => report(libc::ftruncate(pool, 4096).into()),
            "grow" => report(libc::fallocate(pool, 0, 0, (pool_size * 2) as i64).into()),
            "map-more" => report(libc::mmap(
                std::ptr::null_mut(),
                pool_size * 2,
                libc::PROT_READ,
                libc::MAP_SHARED,
                pool,
                0,
            ) as i64),
            "tiocsti" => {
                let ch = b'x';
                report(libc::ioctl(0, libc::TIOCSTI, &ch).into())
            }
            "unshare" => report(libc::unshare(libc::CLONE_NEWUSER).into()),
            "trap-in-alloc" => {
                TRAP.store(true, Ordering::SeqCst);
                let v = std::hint::black_box(vec![0u8; 64]);
                report(v.len() as i64)
            }
            _ => {
                println!("unknown escape {what}");
                std::process::exit(2);
            }
        }
    }
}
