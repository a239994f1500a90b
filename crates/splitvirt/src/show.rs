//! `config show`: the resolved layout as tables a person can read.

use layout::{ByteSize, Layout};
use std::fmt::Write;

pub fn render(l: &Layout) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "VM {} (profile {}), {} vCPU(s)",
        l.name, l.profile, l.vcpus
    );
    if let Some(a) = &l.vcpu_affinity {
        let on: Vec<String> = a
            .iter()
            .enumerate()
            .map(|(i, cpus)| format!("vCPU {i} on {}", layout::resolve::cpu_list(cpus)))
            .collect();
        let _ = write!(o, "; host CPUs: {}", on.join(", "));
    }
    let _ = writeln!(o, "\n");
    let _ = writeln!(
        o,
        "{:<22} {:>18} {:>18} {:>10}",
        "region", "start", "end", "size"
    );
    for r in l.regions() {
        let _ = writeln!(
            o,
            "{:<22} {:>#18x} {:>#18x} {:>10}",
            r.name,
            r.base,
            r.last(),
            ByteSize(r.size).to_string()
        );
    }
    let _ = writeln!(
        o,
        "\n{:<8} {:<16} {:<11} {:<36} {:<10} MSI",
        "slot", "device", "pci id", "BARs", "INTx"
    );
    for d in &l.devices {
        let (v, id) = d.kind.pci_id();
        let bars: Vec<String> = d
            .bars
            .iter()
            .map(|b| format!("{}:{:#x}+{}", b.index, b.base, ByteSize(b.size)))
            .collect();
        let msi = d
            .msi_intids
            .map_or("-".into(), |(f, n)| format!("{n} (IDs {f}..{})", f + n - 1));
        let intx = format!(
            "INT{} SPI {}",
            (b'A' + d.intx_pin as u8 - 1) as char,
            d.intx_spi
        );
        let _ = writeln!(
            o,
            "00:{:02x}.0  {:<16} {v:04x}:{id:04x}  {:<36} {:<10} {msi}",
            d.slot,
            d.kind.label(),
            bars.join(" "),
            intx
        );
    }
    let _ = writeln!(
        o,
        "\ninterrupts: UART SPI {}, INTx SPIs {:?}, timer PPIs {:?}, GIC lines {}",
        l.uart.spi, l.pci.intx_spis, l.timer_ppis, l.gic_irqs
    );
    if let Some(v) = &l.v2m {
        let _ = writeln!(
            o,
            "GICv2m: interrupt IDs {}..{} ({} SPIs)",
            v.spi_base,
            v.spi_base + v.spi_count - 1,
            v.spi_count
        );
    }
    let _ = writeln!(o, "cmdline: {}", l.cmdline);
    o
}
