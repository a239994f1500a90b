//! virtio-blk on a real image file, driven through the transport over a pool-only memory.

mod common;

use common::*;
use pci::PciFunction;
use virtio::blk::*;
use virtio::transport::STATUS_NEEDS_RESET;
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = BUF;
const DATA: u64 = BUF + 0x1000;
const STATUS: u64 = BUF + 0x3000;

fn disk(dir: &tempfile::TempDir, sectors: u64) -> std::path::PathBuf {
    let p = dir.path().join("disk.img");
    let bytes: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
    std::fs::write(&p, bytes).unwrap();
    p
}

fn header(d: &Driver<Block>, kind: u32, sector: u64) {
    d.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    d.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    d.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn status(d: &Driver<Block>) -> u8 {
    d.mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn read_write_flush_and_get_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(&dir, 64);
    let mut d = Driver::new(Block::open(&path, false).unwrap());
    let mut cap = [0u8; 8];
    d.dev.bar_read(0, virtio::transport::DEVICE_CFG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
    d.start(0, F_FLUSH);
    // Read sector 5.
    header(&d, T_IN, 5);
    post(
        &mut d,
        0,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    assert_eq!(status(&d), S_OK);
    let mut got = vec![0u8; 512];
    d.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().all(|&b| b == 5));
    assert_eq!(d.used_len(0), 513);
    // Write sector 7, then flush: the bytes are in the file.
    d.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();
    header(&d, T_OUT, 7);
    post(
        &mut d,
        0,
        &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
    );
    assert_eq!(status(&d), S_OK);
    header(&d, T_FLUSH, 0);
    post(&mut d, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(status(&d), S_OK);
    let file = std::fs::read(&path).unwrap();
    assert!(file[7 * 512..9 * 512].iter().all(|&b| b == 0xab));
    assert!(file[9 * 512..10 * 512].iter().all(|&b| b == 9));
    // GET_ID: the image's name.
    header(&d, T_GET_ID, 0);
    post(
        &mut d,
        0,
        &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
    );
    let mut id = [0u8; 8];
    d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"disk.img");
    assert_eq!(d.used_idx(), 4);
}

#[test]
fn out_of_range_read_only_and_unknown_requests_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(&dir, 8);
    let mut d = Driver::new(Block::open(&path, true).unwrap());
    d.start(0, 0);
    header(&d, T_IN, 8);
    post(
        &mut d,
        0,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    assert_eq!(status(&d), S_IOERR, "past the end");
    header(&d, T_IN, u64::MAX / 2);
    post(
        &mut d,
        0,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    assert_eq!(status(&d), S_IOERR, "overflowing sector");
    header(&d, T_OUT, 0);
    post(
        &mut d,
        0,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    assert_eq!(status(&d), S_IOERR, "read-only disk");
    assert!(std::fs::read(&path).unwrap()[..512].iter().all(|&b| b == 0));
    header(&d, 99, 0);
    post(&mut d, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(status(&d), S_UNSUPP);
    assert_eq!(d.status() & STATUS_NEEDS_RESET, 0);
}

#[test]
fn buffers_outside_the_pool_need_reset_and_touch_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(&dir, 8);
    let mut d = Driver::new(Block::open(&path, false).unwrap());
    d.start(0, 0);
    header(&d, T_OUT, 0);
    // The data buffer is guest RAM outside the pool.
    post(
        &mut d,
        0,
        &[
            (HDR, 16, false),
            (0x4000_0000, 512, false),
            (STATUS, 1, true),
        ],
    );
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
    assert!(std::fs::read(&path).unwrap()[..512].iter().all(|&b| b == 0));
}

#[test]
fn malformed_chains_need_reset() {
    let dir = tempfile::tempdir().unwrap();
    for chain in [
        vec![(HDR, 8u32, false), (STATUS, 1, true)], // short header
        vec![(HDR, 16, true), (STATUS, 1, true)],    // writable header
        vec![(HDR, 16, false), (STATUS, 1, false)],  // read-only status
        vec![(HDR, 16, false)],                      // no status
    ] {
        let mut d = Driver::new(Block::open(&disk(&dir, 8), false).unwrap());
        d.start(0, 0);
        header(&d, T_IN, 0);
        post(&mut d, 0, &chain);
        assert_ne!(d.status() & STATUS_NEEDS_RESET, 0, "{chain:?}");
    }
}

#[test]
fn images_that_cannot_be_disks_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    let e = Block::open(&odd, false).err().unwrap().to_string();
    assert!(
        e.contains("odd.img") && e.contains("multiple of 512"),
        "{e}"
    );
    let e = Block::open(&dir.path().join("missing.img"), true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("missing.img") && e.contains("cannot open"),
        "{e}"
    );
}

#[test]
fn write_zeroes_and_discard() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(&dir, 64);
    let mut d = Driver::new(Block::open(&path, false).unwrap());
    d.start(0, F_WRITE_ZEROES | F_DISCARD);
    let seg = |start: u64, count: u32| {
        let mut s = start.to_le_bytes().to_vec();
        s.extend_from_slice(&count.to_le_bytes());
        s.extend_from_slice(&0u32.to_le_bytes());
        s
    };
    d.mem.write_slice(&seg(10, 4), GuestAddress(DATA)).unwrap();
    header(&d, T_WRITE_ZEROES, 0);
    post(
        &mut d,
        0,
        &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
    );
    assert_eq!(status(&d), S_OK);
    let f = std::fs::read(&path).unwrap();
    assert!(f[10 * 512..14 * 512].iter().all(|&b| b == 0));
    assert!(
        f[14 * 512..15 * 512].iter().all(|&b| b == 14),
        "only the range"
    );
    assert_eq!(f.len(), 64 * 512, "size kept");
    d.mem.write_slice(&seg(60, 8), GuestAddress(DATA)).unwrap();
    header(&d, T_DISCARD, 0);
    post(
        &mut d,
        0,
        &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
    );
    assert_eq!(status(&d), S_IOERR, "range past the end");
    d.mem.write_slice(&seg(20, 2), GuestAddress(DATA)).unwrap();
    header(&d, T_DISCARD, 0);
    post(
        &mut d,
        0,
        &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
    );
    assert_eq!(status(&d), S_OK);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 512);
}

/// Posts a chain and waits for the device to finish with it (its workers run apart).
fn post(d: &mut Driver<Block>, q: u16, chain: &[(u64, u32, bool)]) {
    d.post(q, chain);
    d.settle();
}

/// A disk whose reads wait at a gate the test opens; it counts reads waiting at once and
/// notes the thread each read ran on.
struct Gated {
    state: std::sync::Mutex<(bool, usize, usize)>, // open, waiting now, most waiting at once
    cv: std::sync::Condvar,
    threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
}
impl Gated {
    fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.cv.notify_all();
    }
}
impl virtio::disk::Disk for Gated {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&self, buf: &mut [u8], _: u64) -> std::io::Result<()> {
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        let mut s = self.state.lock().unwrap();
        s.1 += 1;
        s.2 = s.2.max(s.1);
        self.cv.notify_all();
        let (mut s, _) = self
            .cv
            .wait_timeout_while(s, std::time::Duration::from_secs(10), |s| !s.0)
            .unwrap();
        s.1 -= 1;
        buf.fill(0x5a);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

fn gated() -> std::sync::Arc<Gated> {
    std::sync::Arc::new(Gated {
        state: std::sync::Mutex::new((false, 0, 0)),
        cv: std::sync::Condvar::new(),
        threads: std::sync::Mutex::default(),
    })
}

/// Waits until `n` reads are at the gate at once (false after 10 s).
fn reads_waiting(g: &Gated, n: usize) -> bool {
    let s = g.state.lock().unwrap();
    let (s, _) =
        g.cv.wait_timeout_while(s, std::time::Duration::from_secs(10), |s| s.1 < n)
            .unwrap();
    s.1 >= n
}

fn read_request(d: &Driver<Block>, n: u64) -> [(u64, u32, bool); 3] {
    let (hdr, data, status) = (BUF + 0x100 * n, DATA + 0x400 * n, STATUS + n);
    d.mem.write_obj(T_IN, GuestAddress(hdr)).unwrap();
    d.mem.write_obj(n, GuestAddress(hdr + 8)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    [(hdr, 16, false), (data, 512, true), (status, 1, true)]
}

#[test]
fn a_slow_disk_does_not_stall_the_notifier_and_requests_overlap() {
    let g = gated();
    let mut d = Driver::new(Block::with_disk(g.clone(), "slow", true));
    d.start(0, 0);
    for n in 0..3 {
        let chain = read_request(&d, n);
        // The notify returns while the read waits at the disk.
        d.post(0, &chain);
    }
    assert!(
        reads_waiting(&g, 3),
        "three reads should be at the disk at once"
    );
    assert_eq!(d.used_idx(), 0, "nothing completes before the disk answers");
    g.open();
    d.settle();
    assert_eq!(d.used_idx(), 3);
    for n in 0..3 {
        let st: u8 = d.mem.read_obj(GuestAddress(STATUS + n)).unwrap();
        assert_eq!(st, S_OK);
        let b: u8 = d.mem.read_obj(GuestAddress(DATA + 0x400 * n)).unwrap();
        assert_eq!(b, 0x5a);
    }
    assert_eq!(g.state.lock().unwrap().2, 3);
}

#[test]
fn reset_waits_for_requests_at_the_disk_and_they_never_complete_after_it() {
    let g = gated();
    let mut d = Driver::new(Block::with_disk(g.clone(), "slow", true));
    d.start(0, 0);
    let chain = read_request(&d, 0);
    d.post(0, &chain);
    assert!(reads_waiting(&g, 1));
    // The disk finishes a while later; whether reset had returned by then is what the opener
    // saw (a flag only the reset's return sets), not a duration.
    let returned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (g2, r2) = (g.clone(), returned.clone());
    let opener = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let early = r2.load(std::sync::atomic::Ordering::SeqCst);
        g2.open();
        early
    });
    d.w(0x14, 0, 1); // device reset
    returned.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        !opener.join().unwrap(),
        "reset returned before the disk finished"
    );
    assert_eq!(d.used_idx(), 0, "a request completed into a reset queue");
    let st: u8 = d.mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(st, 0xff, "a reset device wrote guest memory");
}

/// qemu-img makes the image and reads it back: the bytes the guest wrote are in the qcow2.
#[test]
fn qcow2_images_made_and_checked_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let qemu_img = |args: &[&str]| {
        let o = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img (Debian package qemu-utils) must be installed");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    let mut d = Driver::new(Block::open(&img, false).unwrap());
    let mut cap = [0u8; 8];
    d.dev.bar_read(0, 0x2000, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8192);
    d.start(0, F_FLUSH | F_WRITE_ZEROES);
    d.mem
        .write_slice(&[0xc3; 4096], GuestAddress(DATA))
        .unwrap();
    header(&d, T_OUT, 2048);
    post(
        &mut d,
        0,
        &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
    );
    assert_eq!(status(&d), S_OK);
    header(&d, T_FLUSH, 0);
    post(&mut d, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(status(&d), S_OK);
    // Read it back through the device, from a sector never written (zeros) and the written one.
    d.mem
        .write_slice(&[0x11; 1024], GuestAddress(DATA))
        .unwrap();
    header(&d, T_IN, 2047);
    post(
        &mut d,
        0,
        &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
    );
    let mut got = [0u8; 1024];
    d.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..512].iter().all(|&b| b == 0) && got[512..].iter().all(|&b| b == 0xc3));
    drop(d);
    assert!(qemu_img(&["check", img.to_str().unwrap()]).contains("No errors"));
    let raw = dir.path().join("out.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&raw).unwrap();
    assert!(bytes[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0xc3));
    assert!(bytes[..1 << 20].iter().all(|&b| b == 0));
}

#[test]
fn a_request_that_finds_the_device_idle_is_done_by_the_thread_that_accepts_work() {
    let disk = gated();
    disk.open();
    let mut d = Driver::new(Block::with_disk(disk.clone(), "here", true));
    d.start(0, 0);
    let chain = read_request(&d, 0);
    virtio::defer::accept(|| d.post(0, &chain));
    // Done when the accepting call returns: no worker, no waiting.
    assert_eq!(d.used_idx(), 1);
    assert_eq!(*disk.threads.lock().unwrap(), [std::thread::current().id()]);
    let b: u8 = d.mem.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(b, 0x5a);
    // A thread that does not accept work hands it to a worker.
    let chain = read_request(&d, 1);
    post(&mut d, 0, &chain);
    assert_eq!(d.used_idx(), 2);
    assert_ne!(disk.threads.lock().unwrap()[1], std::thread::current().id());
}

#[test]
fn a_request_behind_one_at_the_disk_goes_to_a_worker_even_where_work_is_accepted() {
    let g = gated();
    let mut d = Driver::new(Block::with_disk(g.clone(), "slow", true));
    d.start(0, 0);
    let first = read_request(&d, 0);
    d.post(0, &first);
    assert!(reads_waiting(&g, 1));
    // The device is busy: the accepting thread is not held up by the second read's disk.
    let second = read_request(&d, 1);
    virtio::defer::accept(|| d.post(0, &second));
    assert!(
        reads_waiting(&g, 2),
        "both reads should be at the disk at once"
    );
    g.open();
    d.settle();
    assert_eq!(d.used_idx(), 2);
}

/// A disk in memory that notes each read and write call (write?, offset, length).
#[derive(Default)]
struct Recorder {
    bytes: std::sync::Mutex<Vec<u8>>,
    calls: std::sync::Mutex<Vec<(bool, u64, usize)>>,
}
impl virtio::disk::Disk for Recorder {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.calls.lock().unwrap().push((false, off, buf.len()));
        let b = self.bytes.lock().unwrap();
        buf.copy_from_slice(&b[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.calls.lock().unwrap().push((true, off, buf.len()));
        self.bytes.lock().unwrap()[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_request_of_many_buffers_reaches_the_disk_in_256_kib_calls() {
    let rec = std::sync::Arc::new(Recorder {
        bytes: std::sync::Mutex::new(vec![0; 1 << 20]),
        ..Default::default()
    });
    let mut d = Driver::new(Block::with_disk(rec.clone(), "rec", false));
    d.start(0, 0);
    // Three buffers, apart in memory and of odd sizes, 266 752 bytes in all.
    let parts = [
        (POOL + 0x4_0000, 0x3_0000u32, 0x11u8),
        (POOL + 0x8_0000, 0x200, 0x22),
        (POOL + 0xa_0000, 0x1_1000, 0x33),
    ];
    let chain = |write: bool| {
        let mut c = vec![(HDR, 16, false)];
        c.extend(parts.iter().map(|&(a, l, _)| (a, l, !write)));
        c.push((STATUS, 1, true));
        c
    };
    for &(a, l, v) in &parts {
        d.mem
            .write_slice(&vec![v; l as usize], GuestAddress(a))
            .unwrap();
    }
    header(&d, T_OUT, 8);
    post(&mut d, 0, &chain(true));
    assert_eq!(status(&d), S_OK);
    assert_eq!(
        *rec.calls.lock().unwrap(),
        [(true, 4096, 256 << 10), (true, 4096 + (256 << 10), 4608)]
    );
    let mut want = Vec::new();
    for &(_, l, v) in &parts {
        want.extend(std::iter::repeat_n(v, l as usize));
    }
    assert!(rec.bytes.lock().unwrap()[4096..4096 + want.len()] == want[..]);
    // Read it back into the same buffers, cleared first: two calls, each byte in its place.
    for &(a, l, _) in &parts {
        d.mem
            .write_slice(&vec![0; l as usize], GuestAddress(a))
            .unwrap();
    }
    rec.calls.lock().unwrap().clear();
    header(&d, T_IN, 8);
    post(&mut d, 0, &chain(false));
    assert_eq!(status(&d), S_OK);
    assert_eq!(
        *rec.calls.lock().unwrap(),
        [(false, 4096, 256 << 10), (false, 4096 + (256 << 10), 4608)]
    );
    for &(a, l, v) in &parts {
        let mut got = vec![0; l as usize];
        d.mem.read_slice(&mut got, GuestAddress(a)).unwrap();
        assert!(got.iter().all(|&b| b == v), "buffer at {a:#x}");
    }
    assert_eq!(
        d.used_len(1),
        0x4_1200 + 1,
        "bytes written into the read's buffers"
    );
}
