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
    d.post(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
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
    d.post(
        0,
        &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
    );
    assert_eq!(status(&d), S_OK);
    header(&d, T_FLUSH, 0);
    d.post(0, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(status(&d), S_OK);
    let file = std::fs::read(&path).unwrap();
    assert!(file[7 * 512..9 * 512].iter().all(|&b| b == 0xab));
    assert!(file[9 * 512..10 * 512].iter().all(|&b| b == 9));
    // GET_ID: the image's name.
    header(&d, T_GET_ID, 0);
    d.post(0, &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
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
    d.post(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(status(&d), S_IOERR, "past the end");
    header(&d, T_IN, u64::MAX / 2);
    d.post(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(status(&d), S_IOERR, "overflowing sector");
    header(&d, T_OUT, 0);
    d.post(
        0,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    assert_eq!(status(&d), S_IOERR, "read-only disk");
    assert!(std::fs::read(&path).unwrap()[..512].iter().all(|&b| b == 0));
    header(&d, 99, 0);
    d.post(0, &[(HDR, 16, false), (STATUS, 1, true)]);
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
    d.post(
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
        d.post(0, &chain);
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
    d.post(0, &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
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
    d.post(0, &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
    assert_eq!(status(&d), S_IOERR, "range past the end");
    d.mem.write_slice(&seg(20, 2), GuestAddress(DATA)).unwrap();
    header(&d, T_DISCARD, 0);
    d.post(0, &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
    assert_eq!(status(&d), S_OK);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 512);
}
