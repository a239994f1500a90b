//! Every bad input a user can hand `splitvirt run` is caught before any VM exists, with a
//! message that names the file and the fix. Runs on any host.

use layout::{resolve, Description};
use std::io::Write;
use std::path::PathBuf;
use vmm::{prepare, Error, RunSpec};

fn image(text_offset: u64, image_size: u64, flags: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len.max(64)];
    b[8..16].copy_from_slice(&text_offset.to_le_bytes());
    b[16..24].copy_from_slice(&image_size.to_le_bytes());
    b[24..32].copy_from_slice(&flags.to_le_bytes());
    b[0x38..0x3c].copy_from_slice(b"ARM\x64");
    b
}

fn file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn spec(kernel: Option<PathBuf>, initrd: Option<PathBuf>) -> RunSpec {
    // The default VM without its disk (whose image is relative to the cwd).
    let mut d = Description::default_vm();
    d.devices.retain(|x| x.kind != "virtio-blk");
    RunSpec {
        layout: resolve(&d).unwrap().layout,
        kernel,
        initrd,
        stats: false,
        config: None,
    }
}

#[test]
fn a_good_image_is_placed_with_dtb_and_initrd() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(&dir, "Image", &image(0, 16 << 20, 2, 8 << 20));
    let i = file(&dir, "initrd", &vec![7u8; 3 << 20]);
    let p = prepare(&spec(Some(k), Some(i))).unwrap();
    assert_eq!(p.placement.kernel, 0x4000_0000);
    let (s, e) = p.placement.initrd.unwrap();
    assert_eq!(e - s, 3 << 20);
    // The DTB carries the initrd range the loader chose.
    let t = devicetree::Tree::parse(&p.dtb).unwrap();
    let chosen = t.find("/chosen").unwrap();
    assert_eq!(
        chosen.cells("linux,initrd-start"),
        Some(vec![(s >> 32) as u32, s as u32])
    );
    // Nothing lands in the pool.
    let pool = layout::Region::new("pool", 0x5000_0000, 64 << 20);
    assert!(!pool.overlaps(&layout::Region::new("dtb", p.placement.dtb, boot::DTB_MAX)));
    assert!(!pool.overlaps(&layout::Region::new("initrd", s, e - s)));
}

#[test]
fn gzip_images_boot_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&image(0, 4 << 20, 2, 2 << 20)).unwrap();
    let k = file(&dir, "Image.gz", &gz.finish().unwrap());
    assert!(prepare(&spec(Some(k), None)).unwrap().kernel.was_gzip);
}

#[test]
fn bad_inputs_are_named_before_any_vcpu_runs() {
    let dir = tempfile::tempdir().unwrap();
    let msg = |s: RunSpec| prepare(&s).unwrap_err().to_string();
    assert!(matches!(prepare(&spec(None, None)), Err(Error::NoKernel)));
    let m = msg(spec(Some(dir.path().join("nope")), None));
    assert!(
        m.contains("cannot read kernel") && m.contains("nope"),
        "{m}"
    );
    let m = msg(spec(
        Some(file(&dir, "vmlinux", &[0x7f, b'E', b'L', b'F'].repeat(100))),
        None,
    ));
    assert!(m.contains("not an arm64 Linux Image"), "{m}");
    let m = msg(spec(
        Some(file(&dir, "be", &image(0, 4 << 20, 1, 2 << 20))),
        None,
    ));
    assert!(m.contains("big-endian"), "{m}");
    let m = msg(spec(
        Some(file(&dir, "huge", &image(0, 600 << 20, 2, 200 << 20))),
        None,
    ));
    assert!(
        m.contains("does not fit") && m.contains("more memory"),
        "{m}"
    );
    let m = msg(spec(
        Some(file(&dir, "cut", &image(0, 64 << 20, 2, 4096))),
        None,
    ));
    assert!(m.contains("truncated"), "{m}");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&image(0, 4 << 20, 2, 2 << 20)).unwrap();
    let gz = gz.finish().unwrap();
    let m = msg(spec(Some(file(&dir, "cut.gz", &gz[..gz.len() / 3])), None));
    assert!(m.contains("does not inflate"), "{m}");
    let ok = file(&dir, "Image", &image(0, 16 << 20, 2, 8 << 20));
    let m = msg(spec(
        Some(ok.clone()),
        Some(dir.path().join("missing.cpio")),
    ));
    assert!(m.contains("cannot read initrd"), "{m}");
    let big = dir.path().join("big.cpio");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(500 << 20)
        .unwrap();
    let m = msg(spec(Some(ok), Some(big)));
    assert!(m.contains("no room for the initrd"), "{m}");
}

#[test]
fn a_disk_image_that_cannot_be_used_is_named_before_boot() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(&dir, "Image", &image(0, 16 << 20, 2, 8 << 20));
    let mut s = spec(Some(k), None);
    let d = Description::parse(
        &format!(
            "[[device]]\nkind = \"virtio-blk\"\nimage = \"{}\"\n",
            dir.path().join("gone.img").display()
        ),
        "t",
    )
    .unwrap();
    s.layout = resolve(&d).unwrap().layout;
    let m = prepare(&s).unwrap_err().to_string();
    assert!(m.contains("gone.img") && m.contains("cannot open"), "{m}");
    // Served by a device VM, the image is a file of the device VM's: not looked for here.
    let d = Description::parse(
        &format!(
            "[backend]\ndevice_vm = \"{}\"\n[[device]]\nkind = \"virtio-blk\"\nimage = \"{}\"\n",
            dir.path().join("port.sock").display(),
            dir.path().join("gone.img").display()
        ),
        "t",
    )
    .unwrap();
    s.layout = resolve(&d).unwrap().layout;
    prepare(&s).unwrap();
    let ends = hostio::hostends::HostEnds::open(&s.layout).unwrap();
    assert!(ends.for_backend().unwrap().is_empty(), "no host end opened");
}

#[test]
fn a_jailed_backends_qcow2_is_checked_but_not_parsed_by_splitvirt() {
    let dir = tempfile::tempdir().unwrap();
    let k = file(&dir, "Image", &image(0, 16 << 20, 2, 8 << 20));
    // qcow2 magic, then metadata no qcow2 reader accepts (version 0, no size).
    let mut q = vec![0u8; 4096];
    q[..4].copy_from_slice(b"QFI\xfb");
    let q = file(&dir, "guest.qcow2", &q);
    let with = |placement: &str, jail: &str| {
        let mut s = spec(Some(k.clone()), None);
        let d = Description::parse(
            &format!(
                "{jail}[[device]]\nkind = \"virtio-blk\"\nimage = \"{}\"\nplacement = \"{placement}\"\n",
                q.display()
            ),
            "t",
        )
        .unwrap();
        s.layout = resolve(&d).unwrap().layout;
        prepare(&s).map(drop).map_err(|e| e.to_string())
    };
    // Served here or by an unjailed backend: parsed now, the bad metadata named.
    let m = with("in-process", "").unwrap_err();
    assert!(m.contains("guest.qcow2") && m.contains("qcow2"), "{m}");
    assert!(with("backend", "[backend]\njail = false\n").is_err());
    // Served by the jailed backend: the magic is checked, the metadata left to the jail.
    with("backend", "").unwrap();
    std::fs::write(&q, [0u8; 4096]).unwrap();
    let m = with("backend", "").unwrap_err();
    assert!(m.contains("not a qcow2 image"), "{m}");
}
