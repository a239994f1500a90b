//! The frontend against a real third-party backend: Debian's qemu-storage-daemon exporting a
//! raw image as vhost-user-blk. The test is the driver: it lays a virtqueue out in a sealed
//! pool memfd, activates the device as the transport would, and reads and writes the image
//! through the daemon. The daemon is handed the pool and nothing else.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vhost_frontend::VhostUserDevice;
use virtio::{Interrupt, Memory, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

const POOL_BASE: u64 = 0x5000_0000;
const POOL_SIZE: usize = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = POOL_BASE;
const AVAIL: u64 = POOL_BASE + 0x1000;
const USED: u64 = POOL_BASE + 0x2000;
const HEADER: u64 = POOL_BASE + 0x3000;
const DATA: u64 = POOL_BASE + 0x4000;
const STATUS: u64 = POOL_BASE + 0x5000;
const IMAGE_SIZE: u64 = 1 << 20;

struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    image: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// qemu-storage-daemon serving a 1 MiB raw image whose first sector is 0xa5 bytes, once its
/// pid file says its export is listening.
fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut f = File::create(&image).unwrap();
    f.write_all(&[0xa5; 512]).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    let socket = dir.path().join("vhost.sock");
    let child = spawn(&image, &socket, &dir.path().join("qsd.pid"));
    Daemon {
        child,
        socket,
        _dir: dir,
        image,
    }
}

/// qemu-storage-daemon exporting `image` at `socket`, once it says it listens (its pid file).
fn spawn(image: &Path, socket: &Path, pidfile: &Path) -> Child {
    let _ = std::fs::remove_file(pidfile);
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            image.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=d,file=f"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ))
        .arg("--pidfile")
        .arg(pidfile)
        .spawn()
        .expect("qemu-storage-daemon (Debian's qemu-system-common; cargo xtask deps installs it)");
    // The daemon writes its pid file once its exports are set up.
    for _ in 0..600 {
        if pidfile.exists() {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("qemu-storage-daemon ended: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("qemu-storage-daemon wrote no pid file in 30 s");
}

/// A sealed memfd mapped as the pool, as splitvirt gives devices.
fn pool() -> Memory {
    // SAFETY: memfd_create, ftruncate and fcntl on a descriptor we own.
    let file = unsafe {
        let fd = libc::memfd_create(
            c"splitvirt-pool".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, POOL_SIZE as i64), 0);
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(libc::fcntl(fd, libc::F_ADD_SEALS, seals), 0);
        File::from_raw_fd(fd)
    };
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(POOL_BASE),
        POOL_SIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

struct Irq(Mutex<Sender<u16>>);
/// What the device raised, on a channel: queue indices, and `FAILED`.
impl Interrupt for Irq {
    fn queue(&self, index: u16) {
        let _ = self.0.lock().unwrap().send(index);
    }
    fn config(&self) {}
    fn failed(&self) {
        let _ = self.0.lock().unwrap().send(FAILED);
    }
}

const FAILED: u16 = u16::MAX;

fn queue(desc: u64) -> Queue {
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some(AVAIL as u32), Some((AVAIL >> 32) as u32));
    q.set_used_ring_address(Some(USED as u32), Some((USED >> 32) as u32));
    q.set_ready(true);
    q
}

fn started(mem: &Memory, dev: &mut VhostUserDevice) -> Receiver<u16> {
    let (tx, rx) = channel();
    dev.ack_features(virtio::F_VERSION_1 | virtio::F_ACCESS_PLATFORM);
    dev.activate(
        mem.clone(),
        vec![queue(DESC)],
        Arc::new(Irq(Mutex::new(tx))),
    )
    .expect("activates");
    rx
}

/// Lays request `n` (the driver's n-th, 0-based) on the ring: a header for `kind` at
/// `sector`, 512 bytes of data (device-writable for reads), the status byte.
fn put_request(mem: &Memory, n: u16, kind: u32, sector: u64) {
    let d = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let at = GuestAddress(DESC + 16 * i);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    };
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
    mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    if kind == 4 {
        // FLUSH: header and status only.
        d(0, HEADER, 16, NEXT, 2);
    } else {
        d(0, HEADER, 16, NEXT, 1);
        d(1, DATA, 512, NEXT | if kind == 0 { WRITE } else { 0 }, 2);
    }
    d(2, STATUS, 1, WRITE, 0);
    mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(n % QSIZE)))
        .unwrap();
    mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
}

/// Puts request `n` on the ring (`put_request`), kicks, and waits for the used ring to hold
/// it. Returns the status.
fn request(
    mem: &Memory,
    dev: &mut VhostUserDevice,
    irq: &Receiver<u16>,
    n: u16,
    kind: u32,
    sector: u64,
) -> u8 {
    put_request(mem, n, kind, sector);
    dev.notify(0).unwrap();
    // The backend's call reaches us through the device's interrupt thread.
    loop {
        assert_eq!(
            irq.recv_timeout(Duration::from_secs(30)),
            Ok(0),
            "an interrupt"
        );
        if mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() == n + 1 {
            return mem.read_obj(GuestAddress(STATUS)).unwrap();
        }
    }
}

fn mapped_memfds(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("/memfd:"))
        .map(str::to_owned)
        .collect()
}

fn image_bytes(path: &Path, at: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
    b
}

#[test]
fn a_disk_served_by_qemu_storage_daemon_that_sees_only_the_pool() {
    let qsd = daemon();
    let mem = pool();
    let mut dev = VhostUserDevice::connect(&qsd.socket, 2, 1, QSIZE).unwrap();
    let mut capacity = [0u8; 8];
    dev.read_config(0, &mut capacity);
    assert_eq!(
        u64::from_le_bytes(capacity),
        IMAGE_SIZE / 512,
        "config space"
    );
    assert_eq!(
        dev.features() & virtio::F_ACCESS_PLATFORM,
        0,
        "the transport adds it"
    );
    let irq = started(&mem, &mut dev);

    assert_eq!(request(&mem, &mut dev, &irq, 0, 0, 0), 0, "read status");
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [0xa5; 512], "sector 0 as the image holds it");

    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(request(&mem, &mut dev, &irq, 1, 1, 1), 0, "write status");
    assert_eq!(request(&mem, &mut dev, &irq, 2, 4, 0), 0, "flush status");
    assert_eq!(
        image_bytes(&qsd.image, 512),
        vec![0x5a; 512],
        "in the image"
    );

    // The daemon's memory table: the pool, and no other memory of ours.
    let maps = mapped_memfds(qsd.child.id());
    assert!(
        !maps.is_empty() && maps.iter().all(|l| l.contains("/memfd:splitvirt-pool")),
        "the daemon maps the pool alone: {maps:#?}"
    );
}

/// A ring outside the pool fails the device before the backend hears of it; after a reset
/// the same device and backend serve a driver that behaves.
#[test]
fn a_ring_outside_the_pool_fails_the_device_and_the_backend_is_told_nothing() {
    let qsd = daemon();
    let mem = pool();
    let mut dev = VhostUserDevice::connect(&qsd.socket, 2, 1, QSIZE).unwrap();
    let (tx, _rx) = channel();
    dev.ack_features(virtio::F_VERSION_1 | virtio::F_ACCESS_PLATFORM);
    let outside = POOL_BASE - 0x10_0000;
    let err = dev
        .activate(
            mem.clone(),
            vec![queue(outside)],
            Arc::new(Irq(Mutex::new(tx))),
        )
        .expect_err("refused");
    assert!(err.to_string().contains("outside the pool"), "{err}");
    assert!(
        mapped_memfds(qsd.child.id()).is_empty(),
        "no memory table was sent"
    );
    dev.reset();
    let irq = started(&mem, &mut dev);
    assert_eq!(request(&mem, &mut dev, &irq, 0, 0, 0), 0, "read status");
}

/// The daemon dies under a running device and no other comes (here: none is waited for):
/// the device fails (the transport then answers DEVICE_NEEDS_RESET) rather than leave the
/// driver waiting on a queue no one serves.
#[test]
fn a_backend_that_hangs_up_for_good_fails_its_device() {
    let mut qsd = daemon();
    let mem = pool();
    let mut dev = VhostUserDevice::connect(&qsd.socket, 2, 1, QSIZE).unwrap();
    dev.set_reconnect_window(Duration::ZERO);
    let irq = started(&mem, &mut dev);
    assert_eq!(request(&mem, &mut dev, &irq, 0, 0, 0), 0, "read status");
    qsd.child.kill().unwrap();
    qsd.child.wait().unwrap();
    // Queue interrupts the daemon raised before it died may come first.
    loop {
        match irq.recv_timeout(Duration::from_secs(30)) {
            Ok(FAILED) => break,
            Ok(_) => continue,
            Err(e) => panic!("the device did not say it failed: {e}"),
        }
    }
    // Its reset does not wait on the dead connection for long, and the device stays usable
    // as an object (a new driver start fails cleanly).
    dev.reset();
    let (tx, _rx) = channel();
    assert!(dev
        .activate(
            mem.clone(),
            vec![queue(DESC)],
            Arc::new(Irq(Mutex::new(tx)))
        )
        .is_err());
}

/// The daemon is killed under a running device and a new one starts on the same socket: the
/// device connects to it again, tells it everything anew, and a request the driver made while
/// no backend was there completes (its kick was not lost), its write in the image.
#[test]
fn a_backend_restarted_on_its_socket_takes_the_queue_over() {
    let mut qsd = daemon();
    let mem = pool();
    let mut dev = VhostUserDevice::connect(&qsd.socket, 2, 1, QSIZE).unwrap();
    let irq = started(&mem, &mut dev);
    assert_eq!(request(&mem, &mut dev, &irq, 0, 0, 0), 0, "read status");
    qsd.child.kill().unwrap();
    qsd.child.wait().unwrap();
    // A write while no backend serves the queue: kicked, not yet done.
    mem.write_slice(&[0x3c; 512], GuestAddress(DATA)).unwrap();
    put_request(&mem, 1, 1, 2);
    dev.notify(0).unwrap();
    let pidfile = qsd.socket.with_file_name("qsd2.pid");
    qsd.child = spawn(&qsd.image, &qsd.socket, &pidfile);
    loop {
        match irq.recv_timeout(Duration::from_secs(60)) {
            Ok(0) if mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() == 2 => break,
            Ok(FAILED) => panic!("the device failed instead of connecting again"),
            Ok(_) => continue,
            Err(e) => panic!("the write made while the backend was away did not complete: {e}"),
        }
    }
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(
        image_bytes(&qsd.image, 1024),
        vec![0x3c; 512],
        "in the image"
    );
    // And the queue goes on with the new daemon.
    assert_eq!(request(&mem, &mut dev, &irq, 2, 0, 0), 0, "read status");
    let maps = mapped_memfds(qsd.child.id());
    assert!(
        !maps.is_empty() && maps.iter().all(|l| l.contains("/memfd:splitvirt-pool")),
        "the new daemon maps the pool alone: {maps:#?}"
    );
}

/// Queue interrupts through the vector's own route: the driver gave queue 0 vector 1, whose
/// eventfd (an irqfd under KVM) the device hands the daemon as the queue's call; the daemon's
/// completion signals it directly and nothing comes through the device's interrupt thread.
#[test]
fn completions_signal_the_queues_vector_directly() {
    struct Vectored(Mutex<Sender<u16>>);
    impl Interrupt for Vectored {
        fn queue(&self, index: u16) {
            let _ = self.0.lock().unwrap().send(index);
        }
        fn config(&self) {}
        fn queue_vector(&self, index: u16) -> Option<u16> {
            (index == 0).then_some(1)
        }
    }
    let qsd = daemon();
    let mem = pool();
    let mut dev = VhostUserDevice::connect(&qsd.socket, 2, 1, QSIZE).unwrap();
    let vectors: Vec<std::os::fd::OwnedFd> = (0..2)
        .map(|_| {
            // SAFETY: eventfd returns a new descriptor, which we own.
            unsafe { std::os::fd::OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) }
        })
        .collect();
    let vector1 = vectors[1].try_clone().unwrap();
    dev.use_vector_calls(vectors);
    let (tx, rx) = channel();
    dev.ack_features(virtio::F_VERSION_1 | virtio::F_ACCESS_PLATFORM);
    dev.activate(
        mem.clone(),
        vec![queue(DESC)],
        Arc::new(Vectored(Mutex::new(tx))),
    )
    .unwrap();
    // A read of sector 0, waited for on vector 1's eventfd.
    put_request(&mem, 0, 0, 0);
    dev.notify(0).unwrap();
    // The daemon also signals a call eventfd when it is handed one (libvhost-user does, in
    // case a reconnected driver waits): read signals until the request is used.
    while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != 1 {
        let mut p = libc::pollfd {
            fd: vector1.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one descriptor we hold, then an 8-byte read into a local; 30 s
        // only guards against a hang.
        unsafe {
            assert_eq!(libc::poll(&mut p, 1, 30_000), 1, "vector 1 signalled");
            let mut n = 0u64;
            libc::read(vector1.as_raw_fd(), (&mut n as *mut u64).cast(), 8);
        }
    }
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [0xa5; 512]);
    assert!(
        rx.try_recv().is_err(),
        "nothing through the interrupt thread"
    );
}

/// A backend of the test's own (qemu-storage-daemon tracks no requests in flight) that offers
/// INFLIGHT_SHMFD: the region the first one gave is handed to the second after the first hangs
/// up, and the second starts the queue where its used ring stands. Each message it receives
/// is sent to the test: (connection, request, its first 8 payload bytes, its fd's inode).
#[test]
fn a_backend_that_tracks_requests_in_flight_hands_its_region_to_the_next() {
    use std::os::unix::net::UnixListener;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    const GET_FEATURES: u32 = 1;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const SET_VRING_BASE: u32 = 10;
    const SET_VRING_ENABLE: u32 = 18;
    const GET_INFLIGHT_FD: u32 = 31;
    const SET_INFLIGHT_FD: u32 = 32;
    const REPLY: u32 = 0x5;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (seen_tx, seen) = channel::<(usize, u32, u64, Option<u64>)>();
    let (hang_up, hang_up_rx) = channel::<()>();
    let inode = |f: &File| {
        // SAFETY: fstat into a zeroed stat of our own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(f.as_raw_fd(), &mut st) }, 0);
        st.st_ino
    };
    let backend = std::thread::spawn(move || {
        for conn in 0..2 {
            let (s, _) = listener.accept().unwrap();
            loop {
                let mut hdr = [0u8; 12];
                let (n, fd) = s.recv_with_fd(&mut hdr).unwrap();
                if n == 0 {
                    break;
                }
                assert_eq!(n, 12, "a whole header");
                let word = |i: usize| u32::from_le_bytes(hdr[4 * i..4 * i + 4].try_into().unwrap());
                let (req, size) = (word(0), word(2) as usize);
                let mut body = vec![0u8; size];
                std::io::Read::read_exact(&mut &s, &mut body).unwrap();
                let first = body
                    .get(..8)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
                seen_tx
                    .send((conn, req, first, fd.as_ref().map(&inode)))
                    .unwrap();
                let reply = |payload: &[u8], fd: Option<&File>| {
                    let mut m = Vec::new();
                    for w in [req, REPLY, payload.len() as u32] {
                        m.extend_from_slice(&w.to_le_bytes());
                    }
                    m.extend_from_slice(payload);
                    match fd {
                        Some(f) => s.send_with_fd(&m[..], f.as_raw_fd()).unwrap(),
                        None => std::io::Write::write(&mut &s, &m).unwrap(),
                    };
                };
                match req {
                    // VERSION_1 and PROTOCOL_FEATURES; INFLIGHT_SHMFD.
                    GET_FEATURES => reply(&(1u64 << 32 | 1 << 30).to_le_bytes(), None),
                    GET_PROTOCOL_FEATURES => reply(&(1u64 << 12).to_le_bytes(), None),
                    GET_INFLIGHT_FD => {
                        let region = memfd(4096);
                        // Size, offset, and the queues and their size as asked.
                        let mut p = 4096u64.to_le_bytes().to_vec();
                        p.extend_from_slice(&[0; 8]);
                        p.extend_from_slice(&body[16..24]);
                        reply(&p, Some(&region));
                        seen_tx
                            .send((conn, u32::MAX, 0, Some(inode(&region))))
                            .unwrap();
                    }
                    SET_VRING_ENABLE => {
                        // The first: the test moves the used ring, then it hangs up.
                        if conn == 0 {
                            hang_up_rx.recv().unwrap();
                        }
                        break;
                    }
                    _ => {}
                }
            }
        }
    });
    let mem = pool();
    let mut dev = VhostUserDevice::connect(&path, 4, 1, QSIZE).unwrap();
    let _irq = started(&mem, &mut dev);
    let mut got = Vec::new();
    let next = |got: &mut Vec<(usize, u32, u64, Option<u64>)>| {
        let m = seen
            .recv_timeout(Duration::from_secs(30))
            .expect("a message");
        got.push(m);
        m
    };
    while next(&mut got).1 != SET_VRING_ENABLE {}
    // Seven requests done meanwhile: the next backend starts there.
    mem.write_obj(7u16, GuestAddress(USED + 2)).unwrap();
    hang_up.send(()).unwrap();
    while !matches!(next(&mut got), (1, SET_VRING_ENABLE, _, _)) {}
    backend.join().unwrap();
    let region = got
        .iter()
        .find(|m| m.0 == 0 && m.1 == u32::MAX)
        .and_then(|m| m.3)
        .expect("the first backend made a region");
    let find = |conn, req| got.iter().find(|m| m.0 == conn && m.1 == req).copied();
    assert_eq!(
        find(1, SET_INFLIGHT_FD).and_then(|m| m.3),
        Some(region),
        "the second backend is handed the first one's region: {got:?}"
    );
    assert!(
        find(1, GET_INFLIGHT_FD).is_none(),
        "and asked for none of its own"
    );
    // SET_VRING_BASE's payload: the queue index (u32), then the base (u32).
    assert_eq!(
        find(0, SET_VRING_BASE).map(|m| m.2 >> 32),
        Some(0),
        "first at avail 0"
    );
    assert_eq!(
        find(1, SET_VRING_BASE).map(|m| m.2 >> 32),
        Some(7),
        "then at used 7"
    );
}

/// A memfd of `size` bytes.
fn memfd(size: i64) -> File {
    // SAFETY: memfd_create and ftruncate on a descriptor we own.
    unsafe {
        let fd = libc::memfd_create(c"inflight".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, size), 0);
        File::from_raw_fd(fd)
    }
}
