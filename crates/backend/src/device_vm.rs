//! `splitvirt backend --port PORT`: the backend inside a device VM (docs/ARCHITECTURE.md,
//! "The device VM"), serving a driver VM's devices through the device VM's rpc-port (its UIO
//! device, from the guest's `connection` module): the driver's control region and pool are the
//! port's maps 1 and 2 (mapped by the device VM's KVM, no copies), its setup the port's
//! registers (map 0). The serving loop is `serve`'s; only the doorbells differ, with no thread
//! between them and the loop: the port's one interrupt (every doorbell of the driver VM's) is
//! what the loop waits on for its requests and for every queue's kick, and its own doorbells
//! and MSIs are stores to the port's doorbell registers, which the device VM's KVM turns into
//! the driver VM's eventfds. The devices' host ends are the device VM's own, opened here by
//! the paths the driver VM's description gives. The VM boundary confines it: no jail.
//!
//! It serves one connection of the port: when the driver VM goes (or connects anew), it ends,
//! and whoever started it starts it again for the next.

use crate::serve::{check_pool, serve_parts, Parts, ServeError, Vectors};
use layout::Layout;
use rpc::{Bell, Doorbell, Region};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The UIO name the `connection` module gives a port.
const UIO_NAME: &str = "rpc-port";

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

fn setup_err(why: String) -> ServeError {
    ServeError::Setup(why)
}

/// The port's UIO device: `/dev/uioN` as given, or the one whose PCI function is `port`
/// (`0000:00:03.0`).
fn find(port: &str) -> Result<PathBuf, ServeError> {
    if port.starts_with("/dev/") {
        return Ok(PathBuf::from(port));
    }
    let sys = Path::new("/sys/class/uio");
    for e in std::fs::read_dir(sys)?.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        let function = std::fs::read_link(e.path().join("device")).unwrap_or_default();
        if name.trim_end() == UIO_NAME && function.file_name().is_some_and(|f| f == port) {
            return Ok(Path::new("/dev").join(e.file_name()));
        }
    }
    Err(setup_err(format!(
        "no rpc-port at PCI function {port} (is the connection module loaded? `lspci -d \
         1af4:a112` lists the ports)"
    )))
}

/// The port's registers (map 0): device memory, reached by single loads and stores.
struct Regs(*mut u8);

// SAFETY: only volatile accesses of one register each.
unsafe impl Send for Regs {}
// SAFETY: as above.
unsafe impl Sync for Regs {}

impl Regs {
    fn map(f: &File) -> Result<Regs, ServeError> {
        // SAFETY: a new shared mapping of the port's map 0 (one page of registers).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                port::REGS as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(ServeError::Io(std::io::Error::last_os_error()));
        }
        Ok(Regs(p.cast()))
    }

    fn read32(&self, off: u64) -> u32 {
        // SAFETY: inside the mapped page, aligned.
        unsafe { self.0.add(off as usize).cast::<u32>().read_volatile() }
    }

    fn write32(&self, off: u64, v: u32) {
        // SAFETY: as above.
        unsafe { self.0.add(off as usize).cast::<u32>().write_volatile(v) }
    }

    /// Rings the port's doorbell `i`.
    fn ring(&self, i: u64) {
        self.write32(port::REG_DOORBELLS + 4 * i, 1);
    }

    /// (connections so far, the setup words) once a driver VM is connected.
    fn connected(&self) -> (u32, [u64; port::SETUP_WORDS]) {
        loop {
            let n = self.read32(port::REG_CONNECTIONS);
            if self.read32(port::REG_STATUS) & port::STATUS_CONNECTED != 0 {
                let mut w = [0u64; port::SETUP_WORDS];
                for (i, w) in w.iter_mut().enumerate() {
                    let at = port::REG_SETUP + 8 * i as u64;
                    *w = u64::from(self.read32(at)) | u64::from(self.read32(at + 4)) << 32;
                }
                // The same connection throughout the reads.
                if self.read32(port::REG_CONNECTIONS) == n {
                    return (n, w);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Returns once connection `n` has ended.
    fn until_gone(&self, n: u32) {
        while self.read32(port::REG_CONNECTIONS) == n
            && self.read32(port::REG_STATUS) & port::STATUS_CONNECTED != 0
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The port's registers, for the SIGBUS handler.
static REGS: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

/// SIGBUS: once the driver VM has gone, its memory has left this VM under our accesses (the
/// VMM takes it out at once), and touching it faults. That is the end of this connection, not
/// a crash. Any other SIGBUS is one: the default action, again.
extern "C" fn on_sigbus(_: libc::c_int) {
    let regs = REGS.load(Ordering::Acquire);
    // SAFETY: the registers' mapping lives for the process; a single volatile load.
    let status = unsafe {
        regs.add(port::REG_STATUS as usize)
            .cast::<u32>()
            .read_volatile()
    };
    if status & port::STATUS_CONNECTED == 0 {
        let msg = b"splitvirt-backend: the driver VM went\n";
        // SAFETY: write and _exit are async-signal-safe.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(0);
        }
    }
    // SAFETY: restores the default action; the faulting access runs again and ends us.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// Serves the driver VM connected to `port` (waiting for one), with `l` its description.
pub fn serve_port(l: &Layout, port: &str) -> Result<(), ServeError> {
    let dev = find(port)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .map_err(|e| setup_err(format!("{}: {e}", dev.display())))?;
    let regs = Arc::new(Regs::map(&f)?);
    REGS.store(regs.0, Ordering::Release);
    // SAFETY: a handler that only reads a register, writes and exits.
    unsafe { libc::signal(libc::SIGBUS, on_sigbus as *const () as libc::sighandler_t) };
    log::info!("waiting for a driver VM at {}", dev.display());
    let (n, w) = regs.connected();
    let pool = check_pool(l, w[2], w[3])?;
    let (msi_count, notify_devices, host_devices) = (w[4], w[5], w[6]);
    if host_devices != 0 {
        return Err(setup_err(
            "the driver VM sent host ends; it should not".into(),
        ));
    }
    let page = page_size();
    let mem = hostio::pool_memory(pool.base, pool.size, &f, 2 * page)?;
    let region = Arc::new(Region::open_device(f.try_clone()?.into(), page)?);
    let counts: Vec<u8> = w[7..11].iter().flat_map(|x| x.to_le_bytes()).collect();
    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    if total != msi_count || msi_count > port::MAX_DOORBELLS - 2 {
        return Err(setup_err(format!(
            "the setup counts {msi_count} MSI eventfds, its devices {total}"
        )));
    }
    // In: the port's one interrupt stands for every doorbell of the driver VM's (its requests'
    // and each device's queue notifications): the serving loop waits on the UIO device itself,
    // for each of them.
    let uio = || Doorbell::from_uio(f.try_clone()?.into());
    let from_proxy = uio()?;
    let notify: Vec<(u8, Doorbell)> = (0..32u8)
        .filter(|d| notify_devices & 1 << d != 0)
        .map(|d| uio().map(|b| (d, b)))
        .collect::<Result<_, _>>()?;
    // Out: a store to the port's doorbell register, which the device VM's KVM turns into the
    // driver VM's eventfd: its events, its replies, then each device's vectors in slot order.
    let bell = |i: u64| PortBell {
        regs: regs.clone(),
        i,
    };
    let mut vectors = Vec::new();
    let mut next = 2u64;
    for (dev, &c) in (0u8..).zip(&counts).filter(|(_, c)| **c > 0) {
        vectors.push((dev, next, u16::from(c)));
        next += u64::from(c);
    }
    // The host ends are this VM's own: opened here, by the description's paths.
    let mut local = l.clone();
    local.rpc_device_vm = false;
    let ends = hostio::hostends::HostEnds::open(&local)?;
    let hosts = ends.for_backend()?;
    log::info!("serving a driver VM (connection {n}) at {}", dev.display());
    let parts = Parts {
        mem,
        region,
        to_proxy: Box::new(bell(0)),
        replies: Box::new(bell(1)),
        from_proxy,
        msi: (!vectors.is_empty()).then(|| {
            Arc::new(PortVectors {
                regs: regs.clone(),
                vectors,
            }) as Arc<dyn Vectors>
        }),
        notify,
        hosts,
    };
    let gone = Box::new(move || {
        regs.until_gone(n);
        drop(ends);
    });
    serve_parts(l, parts, false, &|_, f, _| f, gone)
}

/// One of the port's doorbells, rung by a store to its register.
struct PortBell {
    regs: Arc<Regs>,
    i: u64,
}

impl Bell for PortBell {
    fn ring(&self) {
        self.regs.ring(self.i);
    }
}

/// The devices' MSI-X vectors as the port's doorbells: (slot, its first doorbell, vectors).
struct PortVectors {
    regs: Arc<Regs>,
    vectors: Vec<(u8, u64, u16)>,
}

impl Vectors for PortVectors {
    fn raise(&self, dev: u8, vector: u16) -> bool {
        let Some(&(_, first, _)) = self
            .vectors
            .iter()
            .find(|(d, _, n)| *d == dev && vector < *n)
        else {
            return false;
        };
        self.regs.ring(first + u64::from(vector));
        true
    }
}
