//! `splitvirt doctor`: the seed's boot sequence read back from a guest console log. Each step
//! is found (with the line that shows it), failed (with the line that says why) or missing; the
//! first step that is not found gets its likely cause and fix, from the seed's "Common Issues"
//! table and the failure lines listed in facts.md (#1, #6, #9).

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Found(String),
    Failed(String),
    Missing,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub status: Status,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnosis {
    pub step: &'static str,
    pub cause: String,
    pub fix: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub steps: Vec<Step>,
    pub devices: Vec<PciFunction>,
    pub diagnosis: Option<Diagnosis>,
    /// Lines worth knowing even when every step is present.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciFunction {
    pub bdf: String,
    pub vendor: u16,
    pub device: u16,
    pub pool_assigned: bool,
    pub failure: Option<String>,
}

impl PciFunction {
    pub fn is_virtio(&self) -> bool {
        self.vendor == 0x1af4 && (0x1000..=0x107f).contains(&self.device)
    }
    pub fn is_connector(&self) -> bool {
        self.vendor == 0x1af4 && self.device == 0xa111
    }
}

/// The message of a console line, without the printk timestamp and carriage return.
fn message(line: &str) -> &str {
    let l = line.trim_end_matches('\r');
    match l.strip_prefix('[').and_then(|r| r.split_once("] ")) {
        Some((ts, rest)) if ts.trim().chars().all(|c| c.is_ascii_digit() || c == '.') => rest,
        _ => l,
    }
}

fn find<'a>(lines: &[&'a str], pat: &str) -> Option<&'a str> {
    lines.iter().copied().find(|l| l.contains(pat))
}

/// `pci 0000:00:01.0: [1af4:1042] type 00 class 0x010000 ...`
fn pci_functions(lines: &[&str]) -> Vec<PciFunction> {
    let mut out: Vec<PciFunction> = Vec::new();
    for l in lines {
        let Some(rest) = l.strip_prefix("pci ") else {
            continue;
        };
        let Some((bdf, tail)) = rest.split_once(": [") else {
            continue;
        };
        let Some((id, _)) = tail.split_once(']') else {
            continue;
        };
        let Some((v, d)) = id.split_once(':') else {
            continue;
        };
        let (Ok(vendor), Ok(device)) = (u16::from_str_radix(v, 16), u16::from_str_radix(d, 16))
        else {
            continue;
        };
        if out.iter().any(|f| f.bdf == bdf) {
            continue;
        }
        let mine = |pat: &str| {
            lines
                .iter()
                .find(|x| x.contains(bdf) && x.contains(pat))
                .map(|x| x.to_string())
        };
        out.push(PciFunction {
            bdf: bdf.to_owned(),
            vendor,
            device,
            pool_assigned: mine("assigned reserved memory node").is_some(),
            failure: mine("failed to initialise")
                .or_else(|| mine("probe with driver"))
                .or_else(|| mine("failed with error")),
        });
    }
    out
}

pub fn read(log: &str) -> Report {
    let lines: Vec<&str> = log.lines().map(message).collect();
    let devices = pci_functions(&lines);
    let mut steps = Vec::new();
    let mut diagnosis: Option<Diagnosis> = None;
    let diag = |d: &mut Option<Diagnosis>, step: &'static str, cause: String, fix: &str| {
        if d.is_none() {
            *d = Some(Diagnosis {
                step,
                cause,
                fix: fix.to_owned(),
            });
        }
    };
    let push = |steps: &mut Vec<Step>, name, status| steps.push(Step { name, status });

    // 1. The kernel runs at all.
    match find(&lines, "Booting Linux on physical CPU").or_else(|| find(&lines, "Linux version")) {
        Some(l) => push(&mut steps, "kernel started", Status::Found(l.into())),
        None => {
            push(&mut steps, "kernel started", Status::Missing);
            diag(&mut diagnosis, "kernel started", "no kernel message at all".into(),
                "check the Image (arm64, raw or gzip), the load address and earlycon=pl011,<UART address>");
        }
    }
    // 2. The device tree was found and parsed.
    match find(&lines, "Machine model:") {
        Some(l) => push(&mut steps, "device tree parsed", Status::Found(l.into())),
        None => {
            push(&mut steps, "device tree parsed", Status::Missing);
            diag(&mut diagnosis, "device tree parsed", "the kernel printed no machine model from the device tree".into(),
                "check that the VMM passes the DTB address in x0 and the DTB is valid (splitvirt lint-dtb)");
        }
    }
    // 3. Memory.
    match find(&lines, "Memory: ") {
        Some(l) => push(&mut steps, "memory", Status::Found(l.into())),
        None => {
            push(&mut steps, "memory", Status::Missing);
            diag(
                &mut diagnosis,
                "memory",
                "no `Memory:` line: RAM was not set up".into(),
                "check the memory@ node against the RAM the VMM maps",
            );
        }
    }
    // 4. The restricted pool (facts #1: reusable/no-map make Linux refuse it).
    let pool_fail = find(&lines, "compatible matching fail")
        .filter(|l| l.contains("swiotlb") || l.contains("reserved mem"));
    let pool_ok = find(&lines, "created restricted DMA pool");
    let dev_pool_fail = find(&lines, "failed to initialise \"restricted-dma-pool\"");
    match (pool_ok, pool_fail.or(dev_pool_fail)) {
        (Some(l), None) => push(&mut steps, "restricted DMA pool", Status::Found(l.into())),
        (_, Some(f)) => {
            push(&mut steps, "restricted DMA pool", Status::Failed(f.into()));
            diag(&mut diagnosis, "restricted DMA pool",
                format!("Linux refused the restricted-dma-pool node (`{f}`): it carries reusable, no-map, linux,cma-default or linux,dma-default, which Linux refuses on a restricted pool, or its reg is bad"),
                "remove `reusable;`/`no-map;` from the pool node; splitvirt lint-dtb shows which (the seed's \"SWIOTLB errors\" row)");
        }
        (None, None) => {
            if lines
                .iter()
                .any(|l| l.contains("reserved-memory") || l.contains("Reserved memory"))
            {
                push(&mut steps, "restricted DMA pool", Status::Missing);
                diag(&mut diagnosis, "restricted DMA pool", "no `created restricted DMA pool` line".into(),
                    "the kernel needs CONFIG_DMA_RESTRICTED_POOL=y (splitvirt kconfig check) and a restricted-dma-pool node inside RAM");
            } else {
                push(&mut steps, "restricted DMA pool", Status::Missing);
                diag(&mut diagnosis, "restricted DMA pool", "no restricted DMA pool was set up: device DMA is not confined".into(),
                    "add a restricted-dma-pool under /reserved-memory and build the kernel with CONFIG_DMA_RESTRICTED_POOL=y");
            }
        }
    }
    // 5. PCI enumeration (seed: "No PCI devices -> Missing device tree node").
    let host = find(&lines, "PCI host bridge to bus").or_else(|| find(&lines, "pci-host-generic"));
    match (host, devices.iter().filter(|f| !is_bridge(f)).count()) {
        (Some(_), n) if n > 0 => push(
            &mut steps,
            "PCI enumerated",
            Status::Found(format!(
                "{n} device(s): {}",
                devices
                    .iter()
                    .filter(|f| !is_bridge(f))
                    .map(|f| format!("{} [{:04x}:{:04x}]", f.bdf, f.vendor, f.device))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        ),
        (Some(h), _) => {
            push(
                &mut steps,
                "PCI enumerated",
                Status::Failed(format!("{h} (but no device behind it)")),
            );
            diag(&mut diagnosis, "PCI enumerated", "the host bridge came up but no device answered on the bus".into(),
                "check that the VMM registers the devices at the slots the DTB names, and its ECAM decoding");
        }
        (None, _) => {
            push(&mut steps, "PCI enumerated", Status::Missing);
            diag(&mut diagnosis, "PCI enumerated", "no PCI host bridge was probed: no PCI devices (seed: missing device tree node)".into(),
                "check FDT generation: a pcie@ node with compatible pci-host-ecam-generic (splitvirt lint-dtb), and CONFIG_PCI_HOST_GENERIC=y");
        }
    }
    // 6. Each virtio device probed, bound and given the pool.
    let virtio: Vec<&PciFunction> = devices.iter().filter(|f| f.is_virtio()).collect();
    let pool_exists = pool_ok.is_some();
    let phandle = find(&lines, "could not find phandle");
    let timeout = lines.iter().copied().find(|l| {
        (l.contains("virtio") || l.contains("vd"))
            && (l.contains("timed out") || l.contains("timeout"))
    });
    if virtio.is_empty() {
        push(&mut steps, "virtio devices bound", Status::Missing);
        diag(
            &mut diagnosis,
            "virtio devices bound",
            "no virtio PCI function was found".into(),
            "describe virtio devices in the VM description; check CONFIG_VIRTIO_PCI",
        );
    } else if let Some(bad) = virtio.iter().find(|f| f.failure.is_some()) {
        let f = bad.failure.clone().unwrap_or_default();
        push(
            &mut steps,
            "virtio devices bound",
            Status::Failed(f.clone()),
        );
        let (cause, fix) = if let Some(p) = phandle {
            (
                format!(
                    "`{p}`: msi-parent points at no node, so every virtio device fails to probe"
                ),
                "emit msi-parent only with a v2m@ MSI frame node, or add the frame",
            )
        } else {
            (
                format!("{}: `{f}`", bad.bdf),
                "see the line; splitvirt lint-dtb checks memory-region and msi-parent",
            )
        };
        diag(&mut diagnosis, "virtio devices bound", cause, fix);
    } else if let Some(t) = timeout {
        push(&mut steps, "virtio devices bound", Status::Failed(t.into()));
        diag(&mut diagnosis, "virtio devices bound", format!("virtio timeout: `{t}`"),
            "the device side did not answer: check the RPC connection and the backend process (seed: virtio timeout -> I/O proxy)");
    } else if pool_exists && virtio.iter().any(|f| !f.pool_assigned) {
        let missing: Vec<&str> = virtio
            .iter()
            .filter(|f| !f.pool_assigned)
            .map(|f| f.bdf.as_str())
            .collect();
        push(
            &mut steps,
            "virtio devices bound",
            Status::Failed(format!("no pool assigned to {}", missing.join(", "))),
        );
        diag(&mut diagnosis, "virtio devices bound", format!("{} did not get the restricted pool: their DMA is not confined", missing.join(", ")),
            "give each PCI device node memory-region = <&pool> (or the host bridge), and offer VIRTIO_F_ACCESS_PLATFORM so that the driver sends its DMA through the pool");
    } else {
        let how = if pool_exists {
            ", each assigned the restricted pool"
        } else {
            ""
        };
        push(
            &mut steps,
            "virtio devices bound",
            Status::Found(format!("{} virtio device(s){how}", virtio.len())),
        );
    }
    // 7. Userspace.
    match find(&lines, "Run /init as init process")
        .or_else(|| find(&lines, "as init process"))
        .or_else(|| find(&lines, "@@ INIT started"))
    {
        Some(l) => push(&mut steps, "init started", Status::Found(l.into())),
        None => {
            let panic = find(&lines, "Kernel panic");
            push(
                &mut steps,
                "init started",
                panic.map_or(Status::Missing, |p| Status::Failed(p.into())),
            );
            diag(&mut diagnosis, "init started", panic.map_or("init never ran".into(), |p| format!("`{p}`")),
                "check root= (the seed boots /dev/vda2: needs VIRTIO_BLK=y and EXT4_FS=y) or the initramfs");
        }
    }
    // The connector's guest driver (seed: "UIO not working -> module not loaded").
    if devices.iter().any(PciFunction::is_connector) {
        match find(&lines, "connection").filter(|l| l.contains("uio") || l.contains("registered")) {
            Some(l) => push(&mut steps, "connector driver", Status::Found(l.into())),
            None => {
                push(&mut steps, "connector driver", Status::Missing);
                diag(
                    &mut diagnosis,
                    "connector driver",
                    "a 1af4:a111 connector is present but no `connection` UIO device registered"
                        .into(),
                    "modprobe connection (CONFIG_UIO=y); the seed's \"UIO not working\" row",
                );
            }
        }
    }
    let mut notes = Vec::new();
    if let Some(p) = phandle {
        notes.push(format!(
            "`{p}`: a phandle (usually the host bridge's msi-parent) points at no node; Linux 6.x falls back to INTx, older kernels fail to probe the devices (error -524). Emit msi-parent only with a v2m@ frame node"
        ));
    }
    if let Some(l) = find(&lines, "DT overriding V2M MSI_TYPER") {
        notes.push(format!(
            "`{l}`: the device tree's arm,msi-base-spi/num-spis replace the frame's MSI_TYPER"
        ));
    }
    Report {
        steps,
        devices,
        diagnosis,
        notes,
    }
}

fn is_bridge(f: &PciFunction) -> bool {
    // QEMU's GPEX host bridge (1b36:0008) and splitvirt's own (1af4 host bridge) sit at 00:00.0.
    f.bdf.ends_with(":00:00.0")
}

impl Report {
    pub fn ok(&self) -> bool {
        self.diagnosis.is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.steps {
            let (tag, detail) = match &s.status {
                Status::Found(l) => ("ok", l.as_str()),
                Status::Failed(l) => ("FAILED", l.as_str()),
                Status::Missing => ("missing", ""),
            };
            writeln!(f, "  [{tag:<7}] {:<22} {detail}", s.name)?;
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        match &self.diagnosis {
            None => writeln!(f, "every step of the boot sequence is present"),
            Some(d) => writeln!(
                f,
                "first step not reached: {}\n  likely cause: {}\n  fix: {}",
                d.step, d.cause, d.fix
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Failure lines as the kernel prints them; no real boot of ours produces them yet.
    const BASE: &str = "[    0.0] Booting Linux on physical CPU 0x0\n[    0.0] Machine model: splitvirt\n\
        [    0.0] Memory: 1K/2K available\n[    0.0] software IO TLB: Reserved memory: created restricted DMA pool at 0x0000000050000000, size 64 MiB\n\
        [    0.5] pci-host-generic 70000000.pcie: host bridge /pcie@70000000 ranges:\n\
        [    0.5] pci 0000:00:01.0: [1af4:1042] type 00 class 0x010000 conventional PCI endpoint\n\
        [    0.7] virtio-pci 0000:00:01.0: assigned reserved memory node swiotlb@50000000\n";

    #[test]
    fn a_virtio_timeout_points_at_the_backend() {
        let log = format!("{BASE}[   30.0] virtio_blk virtio0: request timed out\n");
        let d = read(&log).diagnosis.unwrap();
        assert_eq!(d.step, "virtio devices bound");
        assert!(d.fix.contains("backend"), "{d:?}");
    }

    #[test]
    fn a_connector_without_its_driver_points_at_the_module() {
        let log = format!(
            "{BASE}[    0.5] pci 0000:00:04.0: [1af4:a111] type 00 class 0x050000 conventional PCI endpoint\nRun /init as init process\n"
        );
        let d = read(&log).diagnosis.unwrap();
        assert_eq!(d.step, "connector driver");
        assert!(d.fix.contains("modprobe connection"));
    }

    #[test]
    fn a_device_without_the_pool_is_not_confined() {
        let log = BASE.replace("assigned reserved memory node", "enabling device")
            + "Run /init as init process\n";
        let d = read(&log).diagnosis.unwrap();
        assert!(d.cause.contains("did not get the restricted pool"), "{d:?}");
    }

    #[test]
    fn a_kernel_panic_before_init_is_quoted() {
        let log = format!("{BASE}[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n");
        let d = read(&log).diagnosis.unwrap();
        assert_eq!(d.step, "init started");
        assert!(d.cause.contains("Unable to mount root fs"));
    }
}
