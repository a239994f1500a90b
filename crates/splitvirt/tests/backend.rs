//! The backend process for real: `splitvirt backend` started by `vmm::backend::start` with a
//! pool memfd, serving a virtio-blk device that a driver reaches through the proxy, the ECAM
//! and the PCI windows, as a guest would. Its memory map holds the pool and nothing of RAM.

use std::sync::{Arc, Mutex};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm::bus::Bus;

/// Every line this process logs (the proxy logs what a backend sends), kept for the tests
/// that check what was said.
struct Said(Mutex<Vec<String>>);
static SAID: Said = Said(Mutex::new(Vec::new()));
impl log::Log for Said {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        self.0.lock().unwrap().push(r.args().to_string());
    }
    fn flush(&self) {}
}
fn said(what: &str) -> Option<String> {
    let _ = log::set_logger(&SAID).map(|()| log::set_max_level(log::LevelFilter::Info));
    SAID.0
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains(what))
        .cloned()
}

/// What the VMM's own interrupt path (the reaper) raises.
#[derive(Default)]
struct Intx(Mutex<Vec<bool>>);
impl virtio::transport::Signal for Intx {
    fn msi(&self, _: (u64, u32)) {}
    fn intx(&self, level: bool) {
        self.0.lock().unwrap().push(level);
    }
}

struct Vm {
    bus: Bus,
    mem: GuestMemoryMmap<()>,
    bar: u64,
}

impl Vm {
    fn w(&self, off: u64, v: u64, len: usize) {
        self.bus.write(self.bar + off, &v.to_le_bytes()[..len]);
    }
    fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.bus.read(self.bar + off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn start(&self, rings: u64) {
        self.w(0x14, 3, 1);
        self.w(0x08, 1, 4);
        self.w(0x0c, 3, 4); // VERSION_1 | ACCESS_PLATFORM
        self.w(0x14, 0xb, 1);
        self.w(0x16, 0, 2);
        self.w(0x18, 16, 2);
        self.w(0x20, rings, 8);
        self.w(0x28, rings + 0x1000, 8);
        self.w(0x30, rings + 0x2000, 8);
        self.w(0x1c, 1, 2);
        self.w(0x14, 0xf, 1);
    }
    /// Posts request `n` (a fresh descriptor triple and avail slot each time, n < 16): a
    /// header of `kind` at `sector`, `len` bytes at `data` (device-writable if `writable`), a
    /// status byte, whose address it returns; then notifies the queue.
    #[allow(clippy::too_many_arguments)]
    fn post(
        &self,
        rings: u64,
        n: u16,
        kind: u32,
        sector: u64,
        data: u64,
        len: u32,
        writable: bool,
    ) -> GuestAddress {
        let hdr = rings + 0x3000 + 0x100 * u64::from(n % 16);
        let status = hdr + 0x80;
        self.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let chain = [
            (hdr, 16u32, false),
            (data, len, writable),
            (status, 1, true),
        ];
        let base = (n * 3) % 16;
        for (i, &(addr, len, w)) in chain.iter().enumerate() {
            let d = GuestAddress(rings + 16 * u64::from((base + i as u16) % 16));
            self.mem.write_obj(addr, d).unwrap();
            self.mem.write_obj(len, d.unchecked_add(8)).unwrap();
            let flags = u16::from(i < 2) | if w { 2 } else { 0 };
            self.mem.write_obj(flags, d.unchecked_add(12)).unwrap();
            self.mem
                .write_obj((base + i as u16 + 1) % 16, d.unchecked_add(14))
                .unwrap();
        }
        self.mem
            .write_obj(base, GuestAddress(rings + 0x1004 + 2 * u64::from(n % 16)))
            .unwrap();
        self.mem
            .write_obj(n.wrapping_add(1), GuestAddress(rings + 0x1002))
            .unwrap();
        self.w(0x3000, 0, 2);
        GuestAddress(status)
    }
    /// Request `n` reads `sector` into `data`, cleared first: its status and the bytes.
    fn read_back(&self, rings: u64, n: u16, sector: u64, data: u64) -> (u8, [u8; 512]) {
        self.mem.write_slice(&[0; 512], GuestAddress(data)).unwrap();
        let status = self.request(rings, n, 0, sector, data, true);
        let mut got = [0u8; 512];
        self.mem.read_slice(&mut got, GuestAddress(data)).unwrap();
        (status, got)
    }
    /// Request `n` of 512 bytes and its completion.
    fn request(&self, rings: u64, n: u16, kind: u32, sector: u64, data: u64, writable: bool) -> u8 {
        let status = self.post(rings, n, kind, sector, data, 512, writable);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let used: u16 = self.mem.read_obj(GuestAddress(rings + 0x2002)).unwrap();
            if used > n || self.r(0x14, 1) & 0x40 != 0 || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.mem.read_obj(status).unwrap()
    }
}

/// A VM's PCI side with one virtio-blk disk of 1 MiB in `splitvirt backend`, whose
/// description also holds `backend` (a `[backend]` table).
struct Setup {
    _dir: tempfile::TempDir,
    disk: std::path::PathBuf,
    l: layout::Layout,
    remote: vmm::backend::Remote,
    events: Arc<Mutex<Vec<rpc::Event>>>,
    intx: Arc<Intx>,
    vm: Vm,
    ecam_fn: u64,
}

fn setup(backend: &str) -> Setup {
    let (dir, disk, config) = describe(backend);
    attach(dir, disk, &config, env!("CARGO_BIN_EXE_splitvirt"))
}

/// A directory with the disk and the description (whose `[backend]` table is `backend`).
fn describe(backend: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    describe_disk(backend, "disk.img")
}

/// The same with the disk named `name`: a raw 1 MiB file, or for `.qcow2` an empty qcow2
/// image of 1 MiB made by qemu-img.
fn describe_disk(
    backend: &str,
    name: &str,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join(name);
    if name.ends_with(".qcow2") {
        qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "1M"]);
    } else {
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    }
    let config = dir.path().join("vm.toml");
    std::fs::write(
        &config,
        format!(
            "[gic]\nv2m = false\n{backend}\n[[device]]\nkind = \"virtio-blk\"\nimage = \"{}\"\nplacement = \"backend\"\n",
            disk.display()
        ),
    )
    .unwrap();
    (dir, disk, config)
}

/// The VM's side, with its backend started from `exe`.
fn attach(
    dir: tempfile::TempDir,
    disk: std::path::PathBuf,
    config: &std::path::Path,
    exe: &str,
) -> Setup {
    let d = layout::Description::load(config).unwrap();
    let l = layout::resolve(&d).unwrap().layout;
    let ram = vmm::memory::guest_ram(&l).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let intx = Arc::new(Intx::default());
    let sig: Arc<dyn virtio::transport::Signal> = intx.clone();
    let ev = events.clone();
    let mut remote = vmm::backend::start(
        &l,
        std::path::Path::new(exe),
        Some(config),
        ram.pool_fd.as_ref(),
        Arc::new(move |e| ev.lock().unwrap().push(e)),
        &|_| sig.clone(),
        vmm::backend::Bypass::default(),
    )
    .unwrap()
    .expect("a backend for the disk");
    let (ecam, regions) = vmm::pci_bus::host(&l);
    for (df, f) in std::mem::take(&mut remote.functions) {
        ecam.add(df, f);
    }
    let mut bus = Bus::default();
    for (r, dev) in regions {
        bus.add(r, dev);
    }
    let dev = &l.devices[0];
    let ecam_fn = l.pci.ecam.base + (u64::from(dev.slot) << 15);
    bus.write(ecam_fn + 4, &2u16.to_le_bytes());
    let vm = Vm {
        bus,
        mem: ram.mem.clone(),
        bar: dev.bars[0].base,
    };
    Setup {
        _dir: dir,
        disk,
        l,
        remote,
        events,
        intx,
        vm,
        ecam_fn,
    }
}

/// Looks at `done` every 5 ms until it holds or `seconds` pass (the caller's asserts say
/// which).
fn wait_until(seconds: u64, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !done() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The process that serves the devices: the jailed child of the process started as the
/// backend (its keeper, outside the jail).
fn jailed(keeper: u32) -> u32 {
    let c = children(keeper);
    assert_eq!(
        c.len(),
        1,
        "the keeper {keeper} has one child, the jailed backend"
    );
    c[0]
}

/// Whether a process's memory map holds the pool and no other memory of splitvirt's: its
/// only shared mappings are the pool and the RPC control region (guest RAM outside the pool is
/// anonymous memory of splitvirt's, which no other process can map).
fn maps_only_the_pool(maps: &str) -> bool {
    let shared: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|path| path.starts_with("/memfd:"))
        .collect();
    shared
        .iter()
        .any(|p| p.starts_with("/memfd:splitvirt-pool"))
        && shared.iter().all(|p| {
            p.starts_with("/memfd:splitvirt-pool") || p.starts_with("/memfd:splitvirt-rpc")
        })
}

/// The jailed backend seen from outside: it maps the pool memfd, no other guest memory; it has
/// a system call filter, no_new_privs and no capability; its namespaces and root are not
/// ours; its descriptors are memfds, eventfds, the setup socket, its stdio pipes and the
/// disk image, nothing else.
fn assert_confined(keeper: u32) {
    let pid = jailed(keeper);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps_only_the_pool(&maps), "{maps}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for line in ["Seccomp:\t2", "NoNewPrivs:\t1", "CapEff:\t0000000000000000"] {
        assert!(status.contains(line), "{line} in {status}");
    }
    for ns in ["user", "mnt", "pid", "net", "ipc", "uts"] {
        let link = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).unwrap();
        assert_ne!(link(&pid.to_string()), link("self"), "{ns} namespace");
    }
    let root = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .count();
    assert_eq!(root, 0, "its root is empty");
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap();
        let t = target.to_string_lossy();
        assert!(
            t.starts_with("/memfd:splitvirt-")
                || t == "anon_inode:[eventfd]"
                || t.starts_with("socket:")
                || t.starts_with("pipe:")
                || t == "/dev/null"
                || t.ends_with("disk.img"),
            "the backend holds {t}"
        );
    }
}

#[test]
fn a_killed_backend_is_replaced_and_the_disk_carries_on_where_it_stood() {
    let s = setup("[backend]\nrestarts = 1");
    let vm = &s.vm;
    let rings = s.l.pool.as_ref().unwrap().base;
    let data = rings + 0x8000;
    vm.start(rings);
    vm.mem
        .write_slice(&[0x5a; 512], GuestAddress(data))
        .unwrap();
    assert_eq!(vm.request(rings, 0, 1, 3, data, false), 0, "write");
    let first = s.remote.pid();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    wait_until(5, || s.remote.proxy().is_dead());
    // No backend for the moment: the reaper answers.
    assert_eq!(
        vm.request(rings, 1, 1, 4, data, false),
        1,
        "IOERR while dead"
    );
    wait_until(20, || s.remote.pid() != 0 && s.remote.pid() != first);
    let second = s.remote.pid();
    assert!(second != 0 && second != first, "a new backend ({second})");
    assert_confined(second);
    // The new backend's device is the one the driver set up, and it takes the next request,
    // not the two already used.
    let (status, got) = vm.read_back(rings, 2, 3, data);
    assert_eq!(status, 0, "read after the restart");
    assert!(got.iter().all(|&b| b == 0x5a));
    let used: u16 = vm.mem.read_obj(GuestAddress(rings + 0x2002)).unwrap();
    assert_eq!(used, 3);
    assert_eq!(vm.r(0x14, 1), 0xf, "DRIVER_OK, as the driver left it");
    assert_eq!(vm.r(0x18, 2), 16, "the queue size the driver set");
    assert!(
        std::fs::read(&s.disk).unwrap()[4 * 512..5 * 512]
            .iter()
            .all(|&b| b == 0),
        "the write made while no backend served reached no disk"
    );
}

/// Kills the process when dropped.
struct Reap(std::process::Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The children of process `pid`, whichever of its threads started them (Linux's
/// /proc/PID/task/TID/children).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        out.extend(
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

#[test]
fn a_listening_backend_serves_a_vm_that_connects_and_again_after_a_kill() {
    let (dir, disk, config) = describe("");
    let sock = dir.path().join("backend.sock");
    let with_connect = format!(
        "[backend]\nconnect = \"{}\"\nrestarts = 1\n{}",
        sock.display(),
        std::fs::read_to_string(&config).unwrap()
    );
    std::fs::write(&config, with_connect).unwrap();
    let listener = Reap(
        std::process::Command::new(env!("CARGO_BIN_EXE_splitvirt"))
            .arg("backend")
            .arg("--listen")
            .arg(&sock)
            .arg("--config")
            .arg(&config)
            .spawn()
            .unwrap(),
    );
    // splitvirt waits for the socket to appear.
    let s = attach(dir, disk, &config, env!("CARGO_BIN_EXE_splitvirt"));
    assert_eq!(s.remote.pid(), 0, "splitvirt started no backend itself");
    let served = children(listener.0.id());
    assert_eq!(
        served.len(),
        1,
        "one backend process for the VM: {served:?}"
    );
    assert_confined(served[0]);
    let vm = &s.vm;
    let rings = s.l.pool.as_ref().unwrap().base;
    let data = rings + 0x8000;
    vm.start(rings);
    vm.mem
        .write_slice(&[0x33; 512], GuestAddress(data))
        .unwrap();
    assert_eq!(vm.request(rings, 0, 1, 7, data, false), 0, "write");
    // SAFETY: a signal to a process of this test.
    unsafe { libc::kill(served[0] as i32, libc::SIGKILL) };
    let mut again = Vec::new();
    wait_until(20, || {
        again = children(listener.0.id());
        again.len() == 1 && again[0] != served[0] && !s.remote.proxy().is_dead()
    });
    assert!(
        again.len() == 1 && again[0] != served[0],
        "a new backend process: {again:?}"
    );
    let (status, got) = vm.read_back(rings, 1, 7, data);
    assert_eq!(status, 0, "read after reconnecting");
    assert!(got.iter().all(|&b| b == 0x33));
    // The VM goes: its backend process ends, the listener stays.
    drop(s);
    wait_until(10, || children(listener.0.id()).is_empty());
    assert!(children(listener.0.id()).is_empty());
}

#[test]
fn a_disk_served_by_the_backend_process_which_maps_only_the_pool() {
    let s = setup("[backend]\nrestarts = 0");
    assert_confined(s.remote.pid());
    let (l, remote, events, sig_events, vm, ecam_fn, disk) = (
        &s.l, &s.remote, &s.events, &s.intx, &s.vm, s.ecam_fn, &s.disk,
    );
    let mut id = [0u8; 4];
    vm.bus.read(ecam_fn, &mut id);
    assert_eq!(
        u32::from_le_bytes(id),
        0x1042_1af4,
        "identity through the proxy"
    );
    assert_eq!(vm.r(0x12, 2), 1, "one queue");
    let pool = l.pool.clone().unwrap();
    let rings = pool.base;
    vm.start(rings);
    let data = rings + 0x8000;
    vm.mem
        .write_slice(&[0x5a; 512], GuestAddress(data))
        .unwrap();
    assert_eq!(vm.request(rings, 0, 1, 3, data, false), 0, "write");
    let (status, got) = vm.read_back(rings, 1, 3, data);
    assert_eq!(status, 0, "read back");
    assert!(got.iter().all(|&b| b == 0x5a));
    assert!(std::fs::read(disk).unwrap()[3 * 512..4 * 512]
        .iter()
        .all(|&b| b == 0x5a));
    // INTx (no MSI frame here): the backend raised the device's line through the proxy (its
    // message may reach the proxy's event thread after the used ring moved).
    let raised = || {
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, rpc::Event::Intx { level: true, .. }))
    };
    wait_until(10, raised);
    assert!(raised());
    // A buffer in RAM outside the pool: the backend cannot even see it.
    assert_eq!(
        vm.request(rings, 2, 1, 0, l.ram.base, false),
        0xff,
        "not completed"
    );
    assert_ne!(vm.r(0x14, 1) & 0x40, 0, "DEVICE_NEEDS_RESET");
    assert!(std::fs::read(disk).unwrap()[..512].iter().all(|&b| b == 0));
    // The backend killed: splitvirt notices at once, says so, and accesses stop waiting.
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(remote.pid() as i32, libc::SIGKILL) };
    wait_until(5, || remote.proxy().is_dead());
    // The death is marked before its event reaches the handler (another thread): wait for the
    // event itself, which only the proxy's death writes.
    let said_dead = || {
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, rpc::Event::Dead(why) if why.contains("ended")))
    };
    wait_until(10, said_dead);
    assert!(said_dead());
    let t = std::time::Instant::now();
    assert_eq!(vm.r(0x14, 1), 0, "a dead backend's device reads as reset");
    let mut id = [0u8; 4];
    vm.bus.read(ecam_fn, &mut id);
    // Config space is splitvirt's own copy (the shadow): the function is still there.
    assert_eq!(
        id,
        [0xf4, 0x1a, 0x42, 0x10],
        "config space still names the device"
    );
    assert!(t.elapsed() < std::time::Duration::from_millis(100));
    // The guest gets I/O errors, not a hang: the request the backend held when it died (the
    // one outside the pool) and a new one both complete with IOERR, from splitvirt itself.
    assert_eq!(vm.request(rings, 3, 1, 0, data, false), 1, "IOERR");
    let used: u16 = vm.mem.read_obj(GuestAddress(rings + 0x2002)).unwrap();
    assert_eq!(used, 4);
    let held: u8 = vm
        .mem
        .read_obj(GuestAddress(rings + 0x3000 + 0x200 + 0x80))
        .unwrap();
    assert_eq!(held, 1, "the request in flight at the kill failed too");
    assert!(
        sig_events.0.lock().unwrap().contains(&true),
        "an interrupt told the guest"
    );
}

/// A backend handed a pool memfd that is not sealed refuses it before it maps anything: a
/// peer that kept a way to shrink it could fault whoever maps it.
#[test]
fn a_backend_refuses_a_pool_that_is_not_sealed() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let l = layout::resolve(&layout::Description::default_vm())
        .unwrap()
        .layout;
    let pool = l.pool.unwrap();
    let (ours, theirs) = rpc::setup::socketpair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_splitvirt"));
    cmd.args(["backend", "--setup-fd", "3"])
        .stderr(std::process::Stdio::piped());
    // SAFETY: dup2 only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    // SAFETY: a test memfd, owned at once and sized to the pool, but not sealed.
    let plain = unsafe {
        OwnedFd::from_raw_fd(libc::memfd_create(
            c"plain-pool".as_ptr(),
            libc::MFD_CLOEXEC,
        ))
    };
    assert_eq!(
        unsafe { libc::ftruncate(plain.as_raw_fd(), pool.size as libc::off_t) },
        0
    );
    let region = rpc::shm::Region::create().unwrap();
    let bells: Vec<rpc::shm::Doorbell> =
        (0..3).map(|_| rpc::shm::Doorbell::new().unwrap()).collect();
    rpc::setup::send(
        &ours,
        pool.base,
        pool.size,
        [
            plain.as_raw_fd(),
            region.fd().as_raw_fd(),
            bells[0].fd().as_raw_fd(),
            bells[1].fd().as_raw_fd(),
            bells[2].fd().as_raw_fd(),
        ],
        &[],
        &[],
        &[],
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("the pool memfd: not sealed"), "{err}");
}

/// A listener started with `args`, logging to a file of its own; its socket is up.
fn listener_with(
    dir: &std::path::Path,
    args: &[&str],
) -> (Reap, std::path::PathBuf, std::path::PathBuf) {
    let (sock, log) = (dir.join("l.sock"), dir.join("l.log"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_splitvirt"))
        .arg("--log-file")
        .arg(&log)
        .args(["backend", "--listen"])
        .arg(&sock)
        .args(args)
        .spawn()
        .unwrap();
    wait_until(20, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("listening on"))
    });
    (Reap(child), sock, log)
}

/// Whether the listener hangs up on `conn` (EOF) within 30 s.
fn hung_up(conn: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    if !rpc::setup::readable_within(conn, std::time::Duration::from_secs(30)).unwrap() {
        return false;
    }
    let mut b = [0u8; 1];
    // SAFETY: a recv into a local on our socket.
    unsafe { libc::recv(conn.as_raw_fd(), b.as_mut_ptr().cast(), 1, 0) == 0 }
}

/// The listener serves only the users it is told to, as many VMs at once as it is told, and
/// closes a connection that sends no setup in time; none of these gets a backend process.
#[test]
fn a_listener_checks_who_connects_how_many_and_how_fast() {
    let dir = tempfile::tempdir().unwrap();
    let not_me = (unsafe { libc::geteuid() } + 4242).to_string();
    let (l, sock, log) = listener_with(dir.path(), &["--allow-uid", &not_me]);
    let c = rpc::setup::connect(&sock).unwrap();
    assert!(hung_up(&c), "a stranger's connection was kept");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("refused a connection from uid"));
    assert!(children(l.0.id()).is_empty());
    drop(l);

    let dir = tempfile::tempdir().unwrap();
    let (l, sock, log) = listener_with(dir.path(), &["--max-vms", "1", "--setup-timeout", "2"]);
    let first = rpc::setup::connect(&sock).unwrap();
    let second = rpc::setup::connect(&sock).unwrap();
    assert!(hung_up(&second), "a connection past --max-vms was kept");
    // The first sends no setup: closed after the timeout, with no process started for it.
    assert!(hung_up(&first), "a silent connection was kept");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("already serving 1 VMs"), "{said}");
    assert!(said.contains("sent no setup within 2s"), "{said}");
    assert!(children(l.0.id()).is_empty());
}

/// A hostile backend (src/bin/hostile-backend.rs: the real serving loop, jailed, misbehaving
/// when the guest reads BAR 0 at DEVICE_CFG + 0xfc) floods log lines, sends messages no backend sends,
/// raises another device's interrupt, never answers, or cuts the pool and control memfds to
/// nothing (sealed: refused; unsealed, this process would die of SIGBUS on the next access).
/// Each time splitvirt stays up and the disk keeps working: with the same backend, or with the
/// one that replaces it when it has broken the protocol past the limit.
#[test]
fn a_hostile_backend_is_contained() {
    said("");
    // "shrink" first: its log lines must come before "flood" spends the rate limit.
    for mode in ["shrink", "flood", "garbage", "msi-other", "silent"] {
        let (dir, disk, config) = describe("[backend]\nrestarts = 1");
        // Read (and removed) by the first backend only: its successor is honest.
        std::fs::write(config.with_extension("toml.hostile"), mode).unwrap();
        let s = attach(dir, disk, &config, env!("CARGO_BIN_EXE_hostile-backend"));
        let vm = &s.vm;
        let rings = s.l.pool.as_ref().unwrap().base;
        let data = rings + 0x8000;
        vm.start(rings);
        vm.mem.write_slice(&[7; 512], GuestAddress(data)).unwrap();
        assert_eq!(vm.request(rings, 0, 1, 2, data, false), 0, "{mode}: write");
        let first = s.remote.pid();
        let mut b = [0u8; 4];
        s.vm.bus
            .read(vm.bar + virtio::transport::DEVICE_CFG + 0xfc, &mut b);
        if mode == "shrink" {
            // It tried (its log line says what it got), and the seals said no.
            for m in ["pool", "control"] {
                let tried = format!("shrink {m}: ");
                wait_until(20, || said(&tried).is_some());
                let line = said(&tried).unwrap_or_else(|| panic!("no {tried:?} logged"));
                assert!(line.contains("Operation not permitted"), "{line}");
            }
        }
        match mode {
            "garbage" => {
                // Failed and replaced, the device as the driver left it.
                wait_until(20, || {
                    s.remote.pid() != 0 && s.remote.pid() != first && !s.remote.proxy().is_dead()
                });
                assert!(
                    s.events.lock().unwrap().iter().any(
                        |e| matches!(e, rpc::Event::Dead(why) if why.contains("broke the protocol"))
                    ),
                    "garbage: the backend was failed for it"
                );
            }
            "silent" => {
                // The read cost its timeout and read all ones; the backend is still there.
                assert_eq!(b, [0xff; 4], "silent");
                continue;
            }
            _ => assert_eq!(s.remote.pid(), first, "{mode}: the same backend serves"),
        }
        assert!(
            !s.events
                .lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, rpc::Event::Msi { .. })),
            "{mode}: no MSI message reached the hypervisor's side"
        );
        let (status, got) = vm.read_back(rings, 1, 2, data);
        assert_eq!(status, 0, "{mode}: read after it");
        assert!(got.iter().all(|&b| b == 7), "{mode}: the disk's bytes");
    }
}

fn qemu_img(args: &[&str]) {
    let o = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian package qemu-utils) must be installed");
    assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
}

/// The jailed backend serves a qcow2 image that grows as the guest writes (imago extends the
/// file it was handed): the bytes land where qemu-img finds them.
#[test]
fn a_qcow2_disk_grows_under_the_jailed_backend() {
    let (dir, disk, config) = describe_disk("[backend]\nrestarts = 0", "disk.qcow2");
    let raw = dir.path().join("back.raw");
    let s = attach(dir, disk.clone(), &config, env!("CARGO_BIN_EXE_splitvirt"));
    let vm = &s.vm;
    let rings = s.l.pool.as_ref().unwrap().base;
    let data = rings + 0x8000;
    vm.start(rings);
    for (n, sector) in [(0u16, 1u64), (1, 1000), (2, 2047)] {
        vm.mem
            .write_slice(&[n as u8 + 1; 512], GuestAddress(data))
            .unwrap();
        assert_eq!(
            vm.request(rings, n, 1, sector, data, false),
            0,
            "write {sector}"
        );
    }
    assert_eq!(vm.request(rings, 3, 4, 0, data, false), 0, "flush");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        disk.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let back = std::fs::read(&raw).unwrap();
    for (n, sector) in [(0u8, 1usize), (1, 1000), (2, 2047)] {
        let at = sector * 512;
        assert!(
            back[at..at + 512].iter().all(|&b| b == n + 1),
            "sector {sector}"
        );
    }
}

/// `[backend] jail = false`: the process splitvirt started serves the disk itself, unconfined
/// (no keeper, no system call filter); it still maps only the pool.
#[test]
fn an_unjailed_backend_serves_only_when_the_description_says_so() {
    let s = setup("[backend]\njail = false\nrestarts = 0");
    let pid = s.remote.pid();
    assert!(children(pid).is_empty(), "no keeper: it serves itself");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("Seccomp:\t0"), "{status}");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps_only_the_pool(&maps), "{maps}");
    let vm = &s.vm;
    let rings = s.l.pool.as_ref().unwrap().base;
    vm.start(rings);
    assert_eq!(
        vm.request(rings, 0, 1, 3, rings + 0x8000, false),
        0,
        "write"
    );
}

impl Vm {
    /// Request `n` with one data buffer of `len` bytes at `data`, waited for without sleeping
    /// (for the benchmark below; `request` sleeps between looks).
    fn request_spinning(&self, rings: u64, n: u16, kind: u32, sector: u64, data: u64, len: u32) {
        let status = self.post(rings, n, kind, sector, data, len, kind == 0);
        let next = n.wrapping_add(1);
        while self
            .mem
            .read_obj::<u16>(GuestAddress(rings + 0x2002))
            .unwrap()
            != next
        {
            std::thread::yield_now();
        }
        assert_eq!(self.mem.read_obj::<u8>(status).unwrap(), 0);
    }
}

/// A benchmark, not a check (run by `cargo xtask bench jail`): 3000 writes then 3000 reads of
/// 64 KiB through the real backend process, jailed and with `jail = false`, ten rounds in
/// alternation; prints per round the wall time and the CPU time the serving process spent
/// (all its threads), and the medians of the ratios. Wall time on two cores swings with
/// where the scheduler puts the spinning driver and the backend's threads; CPU time is the
/// jail's own cost.
#[test]
#[ignore]
fn bench_jailed_and_unjailed_io() {
    const ROUNDS: usize = 10;
    // Nanoseconds on a CPU, summed over the process's threads.
    let cpu = |pid: u32| -> f64 {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .sum()
    };
    let pin = |tid: i32, cpu: usize| {
        // SAFETY: a zeroed cpu_set_t with one CPU set, for one thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    };
    let mut ratios: [Vec<f64>; 4] = Default::default();
    println!("64 KiB requests through the backend process, jailed / unjailed:");
    for round in 0..ROUNDS {
        let mut pair = [("jailed", ""), ("unjailed", "jail = false")];
        if round % 2 == 1 {
            pair.reverse();
        }
        let mut got = std::collections::HashMap::new();
        for (kind, table) in pair {
            let s = setup(&format!("[backend]\nrestarts = 0\n{table}"));
            let (vm, rings) = (&s.vm, s.l.pool.as_ref().unwrap().base);
            vm.start(rings);
            let pid = match kind {
                "jailed" => jailed(s.remote.pid()),
                _ => s.remote.pid(),
            };
            // The driver on CPU 0, every thread of the backend on CPU 1 (its I/O threads
            // start at the first request: pinned again after it).
            pin(0, 0);
            let pin_backend = || {
                for t in std::fs::read_dir(format!("/proc/{pid}/task"))
                    .unwrap()
                    .flatten()
                {
                    pin(t.file_name().to_str().unwrap().parse().unwrap(), 1);
                }
            };
            vm.request_spinning(rings, 0, 0, 0, rings + 0x10000, 4096);
            pin_backend();
            let data = rings + 0x10000;
            let sector = |n: u16| u64::from(n % 15) * 128;
            let batch = |from: u16, op: u32| {
                let (t, c) = (std::time::Instant::now(), cpu(pid));
                for n in from..from + 3000 {
                    vm.request_spinning(rings, n, op, sector(n), data, 65536);
                }
                (
                    t.elapsed().as_secs_f64() * 1e3,
                    (cpu(pid) - c) / 3000.0 / 1e3,
                )
            };
            let (w, r) = (batch(1, 1), batch(3001, 0));
            got.insert(kind, [w.0, r.0, w.1, r.1]);
        }
        let (j, u) = (got["jailed"], got["unjailed"]);
        for (k, v) in ratios.iter_mut().enumerate() {
            v.push(j[k] / u[k]);
        }
        println!(
            "round {round}: wall write {:.0}/{:.0} ms, read {:.0}/{:.0} ms; \
             backend CPU per request write {:.1}/{:.1} us, read {:.1}/{:.1} us",
            j[0], u[0], j[1], u[1], j[2], u[2], j[3], u[3]
        );
    }
    for v in &mut ratios {
        v.sort_by(f64::total_cmp);
    }
    let median = |v: &[f64]| (v[ROUNDS / 2 - 1] + v[ROUNDS / 2]) / 2.0;
    println!(
        "median jailed/unjailed over {ROUNDS} rounds: wall write {:.2}x, read {:.2}x; \
         backend CPU write {:.2}x, read {:.2}x",
        median(&ratios[0]),
        median(&ratios[1]),
        median(&ratios[2]),
        median(&ratios[3])
    );
}
