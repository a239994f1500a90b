//! Debian's own arm64 kernel config (6.12, from linux-image-6.12.100+deb12-arm64): a real
//! .config that this project did not write. facts #5: it lacks the restricted pool and builds
//! the virtio drivers as modules.

use kconfig::{check, DotConfig, Level, Role};

fn debian() -> DotConfig {
    DotConfig::parse(include_str!("fixtures/debian-6.12.100+deb12-arm64.config"))
}

#[test]
fn reports_the_missing_restricted_pool_as_an_error() {
    let f = check(&debian(), Role::Driver);
    let pool = f
        .iter()
        .find(|x| x.symbol == "DMA_RESTRICTED_POOL")
        .expect("flagged");
    assert_eq!(pool.level, Level::Error);
    assert!(pool.message.contains("not confined"), "{}", pool.message);
}

#[test]
fn virtio_modules_are_warnings_that_mention_the_initramfs() {
    let f = check(&debian(), Role::Driver);
    for sym in ["VIRTIO_BLK", "VIRTIO_NET", "UIO"] {
        let x = f
            .iter()
            .find(|x| x.symbol == sym)
            .unwrap_or_else(|| panic!("{sym}"));
        assert_eq!(x.level, Level::Warning, "{sym}");
        assert!(x.message.contains("initramfs"));
    }
}

#[test]
fn options_debian_has_built_in_pass() {
    let f = check(&debian(), Role::Device);
    for sym in [
        "PCI_HOST_GENERIC",
        "ARM_GIC_V2M",
        "KVM",
        "PCI_MSI",
        "SERIAL_EARLYCON",
    ] {
        assert!(f.iter().all(|x| x.symbol != sym), "{sym} should pass");
    }
    assert!(
        f.iter().all(|x| x.symbol != "(file)"),
        "a generated .config is recognised"
    );
}
