//! The generated tree against the real dtc, and the lint against real DTBs.

mod common;

use common::{dtc, tmp};
use devicetree::{generate, lint, to_dts, BootInfo, Level, Tree};
use layout::{resolve, Description, PoolReference};

fn blob(d: &Description, boot: &BootInfo) -> Vec<u8> {
    generate(&resolve(d).unwrap().layout, boot).unwrap()
}

fn variants() -> Vec<(&'static str, Description)> {
    let mut host = Description::default_vm();
    host.pci.pool_reference = PoolReference::HostBridge;
    let mut no_v2m = Description::default_vm();
    no_v2m.gic.v2m = None;
    let qemu = Description::parse("profile = \"qemu-virt\"", "t").unwrap();
    vec![
        ("default", Description::default_vm()),
        ("host-bridge", host),
        ("no-v2m", no_v2m),
        ("qemu-virt", qemu),
    ]
}

#[test]
fn dtc_decompiles_every_variant_without_warnings() {
    for (name, d) in variants() {
        let f = tmp(&format!("{name}.dtb"));
        std::fs::write(
            &f,
            blob(
                &d,
                &BootInfo {
                    initrd: Some((0x4800_0000, 0x4900_0000)),
                },
            ),
        )
        .unwrap();
        let (_, warnings) = dtc(&["-I", "dtb", "-O", "dts"], &f);
        assert!(
            warnings.trim().is_empty(),
            "{name}: dtc warned:\n{warnings}"
        );
    }
}

#[test]
fn our_dts_compiles_back_to_the_same_tree() {
    for (name, d) in variants() {
        let original = blob(&d, &BootInfo::default());
        let src = tmp(&format!("{name}.dts"));
        std::fs::write(&src, to_dts(&Tree::parse(&original).unwrap())).unwrap();
        let (compiled, warnings) = dtc(&["-I", "dts", "-O", "dtb"], &src);
        assert!(warnings.trim().is_empty(), "{name}: {warnings}");
        assert_eq!(
            Tree::parse(&compiled).unwrap(),
            Tree::parse(&original).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn the_seeds_example_tree_has_the_findings_facts_predict() {
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/seed-example.dts"
    );
    let (compiled, _) = dtc(&["-I", "dts", "-O", "dtb"], std::path::Path::new(src));
    let f = lint(&Tree::parse(&compiled).unwrap());
    let has = |level: Level, path: &str, needles: &[&str]| {
        f.iter().any(|x| {
            x.level == level && x.path == path && needles.iter().all(|n| x.message.contains(n))
        })
    };
    let dump = f
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        has(
            Level::Error,
            "/reserved-memory/swiotlb@50000000",
            &["reusable"]
        ),
        "{dump}"
    );
    assert!(
        has(
            Level::Error,
            "/pci@70000000",
            &["PCI 32-bit window [0x50000000-0x6fffffff]", "RAM"]
        ),
        "{dump}"
    );
    assert!(
        has(
            Level::Error,
            "/pci@70000000",
            &["PCI 32-bit window", "DMA pool"]
        ),
        "{dump}"
    );
    assert!(
        has(
            Level::Warning,
            "/pci@70000000",
            &["memory-region on the host bridge"]
        ),
        "{dump}"
    );
    // Each finding says how to fix it.
    assert!(f.iter().all(|x| !x.fix.is_empty()));
}

/// Edits our default tree with dtc in the loop: decompile, change the source, recompile.
fn lint_edited(edit: impl Fn(String) -> String) -> Vec<devicetree::Finding> {
    let dts = edit(to_dts(
        &Tree::parse(&blob(&Description::default_vm(), &BootInfo::default())).unwrap(),
    ));
    let src = tmp(&format!(
        "edit-{:x}.dts",
        dts.len() ^ dts.bytes().map(u64::from).sum::<u64>() as usize
    ));
    std::fs::write(&src, &dts).unwrap();
    let (compiled, _) = dtc(&["-I", "dts", "-O", "dtb"], &src);
    lint(&Tree::parse(&compiled).unwrap())
}

#[test]
fn lint_catches_each_broken_requirement() {
    let errors = |f: &[devicetree::Finding], needle: &str| {
        f.iter().any(|x| {
            x.level == Level::Error && (x.message.contains(needle) || x.path.contains(needle))
        })
    };
    // Pool marked reusable or no-map.
    let f = lint_edited(|s| {
        s.replace(
            "compatible = \"restricted-dma-pool\";",
            "compatible = \"restricted-dma-pool\";\n\t\t\tno-map;",
        )
    });
    assert!(errors(&f, "no-map"));
    // No PCI host at all.
    let f = lint_edited(|s| {
        s.replace(
            "compatible = \"pci-host-ecam-generic\";",
            "compatible = \"vendor,other-pci\";",
        )
    });
    assert!(errors(&f, "not pci-host-ecam-generic"), "{f:?}");
    // Bus range larger than the ECAM.
    let f = lint_edited(|s| s.replace("bus-range = <0x00 0x00>;", "bus-range = <0x00 0x1f>;"));
    assert!(errors(&f, "needs 32 MiB of ECAM"), "{f:?}");
    // msi-parent dangling (facts #9), and pointing at the wrong kind of node.
    let f = lint_edited(|s| s.replace("msi-parent = <&v2m>;", "msi-parent = <0x63>;"));
    assert!(errors(&f, "dangling"), "{f:?}");
    let f = lint_edited(|s| s.replace("msi-parent = <&v2m>;", "msi-parent = <&swiotlb>;"));
    assert!(errors(&f, "not an msi-controller"), "{f:?}");
    // memory-region pointing at the GIC.
    let f = lint_edited(|s| {
        s.replacen(
            "memory-region = <&swiotlb>;",
            "memory-region = <&interrupt_controller>;",
            1,
        )
    });
    assert!(errors(&f, "not a /reserved-memory node"), "{f:?}");
    // Pool outside RAM.
    let f = lint_edited(|s| {
        s.replace(
            "reg = <0x00 0x50000000 0x00 0x4000000>;",
            "reg = <0x00 0x70000000 0x00 0x4000000>;",
        )
    });
    assert!(errors(&f, "not inside any memory node"), "{f:?}");
    // v2m range over the UART's SPI 1 (interrupt ID 33) and the INTx lines.
    let f = lint_edited(|s| s.replace("arm,msi-base-spi = <0x40>;", "arm,msi-base-spi = <0x20>;"));
    assert!(errors(&f, "UART"), "{f:?}");
    assert!(errors(&f, "INTx line SPI 3"), "{f:?}");
    // Overlapping windows.
    let f = lint_edited(|s| {
        s.replace(
            "0x43000000 0x80 0x00 0x80 0x00 0x10 0x00",
            "0x43000000 0x00 0x10000000 0x00 0x10000000 0x00 0x1000000",
        )
    });
    assert!(errors(&f, "PCI 64-bit window"), "{f:?}");
    // No pool at all.
    let f = lint_edited(|s| {
        s.replace(
            "compatible = \"restricted-dma-pool\";",
            "compatible = \"shared-dma-pool\";",
        )
    });
    assert!(errors(&f, "restricted-dma-pool"), "{f:?}");
}
