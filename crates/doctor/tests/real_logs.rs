//! Console logs captured from real boots of the project's guest kernel (`cargo xtask
//! realboot`, QEMU virt with a splitvirt DTB): one good, and the failures the seed predicts;
//! `no-virtio-blk.log` is the good boot's setup with that kernel rebuilt without VIRTIO_BLK.

use doctor::{read, Status};

fn log(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}.log",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn status<'a>(r: &'a doctor::Report, step: &str) -> &'a Status {
    &r.steps
        .iter()
        .find(|s| s.name == step)
        .unwrap_or_else(|| panic!("no step {step}"))
        .status
}

#[test]
fn a_good_boot_has_every_step() {
    let r = read(&log("qemu-virt"));
    assert!(r.ok(), "{r}");
    assert_eq!(r.steps.len(), 8);
    assert!(
        r.steps.iter().all(|s| matches!(s.status, Status::Found(_))),
        "{r}"
    );
    match status(&r, "restricted DMA pool") {
        Status::Found(l) => assert!(l.contains("0x0000000050000000, size 64 MiB")),
        other => panic!("{other:?}"),
    }
    let virtio: Vec<_> = r.devices.iter().filter(|d| d.is_virtio()).collect();
    assert_eq!(virtio.len(), 3);
    assert!(virtio
        .iter()
        .all(|d| d.pool_assigned && d.failure.is_none()));
}

#[test]
fn a_reusable_pool_is_the_first_failure_with_its_cause() {
    let r = read(&log("reusable-pool"));
    let d = r.diagnosis.as_ref().expect("diagnosed");
    assert_eq!(d.step, "restricted DMA pool");
    assert!(d.cause.contains("compatible matching fail") && d.cause.contains("reusable"));
    assert!(d.fix.contains("remove `reusable;`"));
    assert!(
        matches!(status(&r, "virtio devices bound"), Status::Failed(l) if l.contains("failed to initialise"))
    );
}

#[test]
fn no_pci_node_points_at_the_device_tree() {
    let r = read(&log("no-pci"));
    let d = r.diagnosis.as_ref().expect("diagnosed");
    assert_eq!(d.step, "PCI enumerated");
    assert!(
        d.cause.contains("no PCI devices") && d.fix.contains("FDT"),
        "{d:?}"
    );
    assert_eq!(status(&r, "PCI enumerated"), &Status::Missing);
    assert!(matches!(status(&r, "init started"), Status::Found(_)));
}

#[test]
fn a_dangling_msi_parent_is_noted() {
    let r = read(&log("dangling-msi"));
    assert!(r.ok(), "Linux 6.12 falls back to INTx: {r}");
    assert!(r
        .notes
        .iter()
        .any(|n| n.contains("could not find phandle 99") && n.contains("msi-parent")));
}

#[test]
fn an_empty_log_is_a_kernel_that_never_ran() {
    let r = read("");
    assert_eq!(r.diagnosis.unwrap().step, "kernel started");
}

#[test]
fn a_truncated_good_log_stops_at_the_missing_step() {
    let full = log("qemu-virt");
    let cut = &full[..full.find("pci-host-generic").expect("bridge line")];
    let r = read(cut);
    assert_eq!(r.diagnosis.unwrap().step, "PCI enumerated");
}

/// The project's kernel rebuilt without CONFIG_VIRTIO_BLK, booted with QEMU's virtio-blk:
/// the function is enumerated and given the pool, no disk appears. Every earlier step is
/// there; the disk's missing driver is named with its Kconfig symbol.
#[test]
fn an_enumerated_disk_without_its_driver_is_named() {
    let r = read(&log("no-virtio-blk"));
    let d = r.diagnosis.as_ref().expect("diagnosed");
    assert_eq!(d.step, "virtio drivers bound", "{r}");
    assert!(d.cause.contains("0000:00:01.0 (virtio-blk)"), "{d:?}");
    assert!(d.cause.contains("mounting /dev/vda2"), "{d:?}");
    assert!(d.fix.contains("CONFIG_VIRTIO_BLK=y"), "{d:?}");
    for step in [
        "restricted DMA pool",
        "PCI enumerated",
        "virtio devices bound",
        "init started",
    ] {
        assert!(matches!(status(&r, step), Status::Found(_)), "{step}: {r}");
    }
}
