//! virtio-pmem on a real file, driven through the transport over a pool-only memory.

mod common;

use common::*;
use virtio::pmem::*;
use virtio::transport::{DEVICE_CFG, STATUS_NEEDS_RESET};
use vm_memory::{Bytes, GuestAddress};

const REQ: u64 = BUF;
const RESP: u64 = BUF + 0x100;
const START: u64 = 0xc0_0000_0000;

fn image(dir: &tempfile::TempDir, size: u64) -> std::path::PathBuf {
    let p = dir.path().join("pmem.img");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn device(dir: &tempfile::TempDir) -> Driver<Pmem> {
    let (file, size) = open(&image(dir, 4 << 20), 1 << 36).unwrap();
    let mut d = Driver::new(Pmem::new(file, START, size));
    d.start(0, 0);
    d
}

fn request(d: &mut Driver<Pmem>, kind: u32) -> u32 {
    d.mem.write_obj(kind, GuestAddress(REQ)).unwrap();
    d.mem.write_obj(0xffff_ffffu32, GuestAddress(RESP)).unwrap();
    d.post(0, &[(REQ, 4, false), (RESP, 4, true)]);
    d.settle();
    d.mem.read_obj(GuestAddress(RESP)).unwrap()
}

#[test]
fn the_config_says_where_the_region_is_and_a_flush_completes() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    assert_eq!(d.r(DEVICE_CFG, 8), START);
    assert_eq!(d.r(DEVICE_CFG + 8, 8), 4 << 20);
    assert_eq!(request(&mut d, REQ_FLUSH), RESP_OK);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used_len(0), 4);
    // A request type the device does not know is answered, not ignored.
    assert_eq!(request(&mut d, 7), RESP_EIO);
    assert_eq!(d.status() & STATUS_NEEDS_RESET, 0);
}

#[test]
fn a_flush_is_done_by_the_thread_that_accepts_work_after_the_notify() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    d.mem.write_obj(REQ_FLUSH, GuestAddress(REQ)).unwrap();
    let used_during = virtio::defer::accept(|| {
        d.post(0, &[(REQ, 4, false), (RESP, 4, true)]);
        d.used_idx()
    });
    assert_eq!(used_during, 0, "the flush ran inside the notify");
    assert_eq!(d.used_idx(), 1, "the accepting thread did not run it after");
}

#[test]
fn malformed_requests_need_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    for chain in [
        &[(REQ, 4, false)][..],
        &[(REQ, 4, true), (RESP, 4, true)],
        &[(REQ, 4, false), (RESP, 2, true)],
        &[(REQ, 4, false), (RESP, 4, true), (RESP, 4, true)],
        &[(0x1000, 4, false), (RESP, 4, true)],
    ] {
        let mut d = device(&dir);
        d.post(0, chain);
        assert_ne!(d.status() & STATUS_NEEDS_RESET, 0, "{chain:?}");
    }
}

#[test]
fn images_that_cannot_be_regions_are_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(&image(&dir, 3 << 20), 1 << 36)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pmem.img") && e.contains("3145728") && e.contains("truncate"),
        "{e}"
    );
    let e = open(&image(&dir, 0), 1 << 36).unwrap_err().to_string();
    assert!(e.contains("multiple of 2 MiB"), "{e}");
    let e = open(&image(&dir, 8 << 20), 4 << 20)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit"), "{e}");
    let e = open(&dir.path().join("absent"), 1 << 36)
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent"), "{e}");
}
