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
    let init = find(&lines, "Run /init as init process")
        .or_else(|| find(&lines, "as init process"))
        .or_else(|| find(&lines, "@@ INIT started"));
    // 7. Each virtio function taken by its class driver (a disk, an interface, a console).
    let mut notes = Vec::new();
    if !virtio.is_empty() && virtio.iter().all(|f| f.failure.is_none()) {
        let bindings = drivers(&lines, &virtio);
        // A log that ends before init may end before a probe, too: then only the guest's own
        // complaint proves a driver missing.
        let unbound: Vec<&Binding> = bindings
            .iter()
            .filter(|b| match &b.evidence {
                Evidence::Unbound(complaint) => init.is_some() || complaint.is_some(),
                _ => false,
            })
            .collect();
        let silent: Vec<String> = bindings
            .iter()
            .filter(|b| matches!(b.evidence, Evidence::Unconfirmed))
            .map(Binding::label)
            .collect();
        if !silent.is_empty() {
            notes.push(format!(
                "{}: their drivers print nothing when they bind; in the guest, \
                 /sys/bus/virtio/devices/virtioN/driver shows whether one did",
                silent.join(", ")
            ));
        }
        if let Some(first) = unbound.first() {
            let list = unbound
                .iter()
                .map(|b| b.label())
                .collect::<Vec<_>>()
                .join(", ");
            push(
                &mut steps,
                "virtio drivers bound",
                Status::Failed(format!("no driver took {list}")),
            );
            let seen = match &first.evidence {
                Evidence::Unbound(Some(l)) => format!("; the guest then reported `{l}`"),
                _ => String::new(),
            };
            diag(
                &mut diagnosis,
                "virtio drivers bound",
                format!(
                    "{} was enumerated and set up by virtio-pci, but no {} ever appeared{seen}",
                    list,
                    first.class.shows()
                ),
                &format!(
                    "build the guest kernel with {} (splitvirt kconfig check --role driver .config names what is missing)",
                    unbound
                        .iter()
                        .map(|b| b.class.config())
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            );
        } else {
            let bound = bindings
                .iter()
                .filter_map(|b| match &b.evidence {
                    Evidence::Bound(what) => Some(format!("{} -> {what}", b.bdf)),
                    _ => None,
                })
                .collect::<Vec<_>>();
            push(
                &mut steps,
                "virtio drivers bound",
                Status::Found(if bound.is_empty() {
                    "no driver line expected".into()
                } else {
                    bound.join(", ")
                }),
            );
        }
    }
    // 8. Userspace.
    match init {
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

/// The virtio device classes whose drivers doctor can see at work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Block,
    Net,
    Console,
    Other,
}

impl Class {
    fn of(f: &PciFunction) -> Class {
        // Modern ids are 0x1040 + virtio type; transitional ones 0x1000.. (facts: 1af4).
        match f.device {
            0x1042 | 0x1001 => Class::Block,
            0x1041 | 0x1000 => Class::Net,
            0x1043 | 0x1003 => Class::Console,
            _ => Class::Other,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Class::Block => "virtio-blk",
            Class::Net => "virtio-net",
            Class::Console => "virtio-console",
            Class::Other => "virtio device",
        }
    }
    fn shows(self) -> &'static str {
        match self {
            Class::Block => "vdX disk",
            Class::Net => "network interface",
            Class::Console => "hvc console",
            Class::Other => "driver line",
        }
    }
    /// The Kconfig symbols its driver needs (facts #4: VIRTIO_BLK depends on BLK_DEV).
    fn config(self) -> &'static str {
        match self {
            Class::Block => "CONFIG_VIRTIO_BLK=y (it depends on CONFIG_BLK_DEV=y)",
            Class::Net => "CONFIG_VIRTIO_NET=y (it depends on CONFIG_NETDEVICES=y)",
            Class::Console => "CONFIG_VIRTIO_CONSOLE=y",
            Class::Other => "the driver for its virtio type",
        }
    }
}

#[derive(Debug)]
enum Evidence {
    /// The driver's own line: what it made (`vda`, `eth0`, `hvc0`).
    Bound(String),
    /// No line of its driver where one is printed; with the guest's own complaint if it made one.
    Unbound(Option<String>),
    /// Its driver prints nothing when it binds, and nothing says it is missing.
    Unconfirmed,
}

#[derive(Debug)]
struct Binding {
    bdf: String,
    class: Class,
    evidence: Evidence,
}

impl Binding {
    /// `0000:00:01.0 (virtio-blk)`.
    fn label(&self) -> String {
        format!("{} ({})", self.bdf, self.class.name())
    }
}

/// Matches each virtio function with its driver's lines. virtio-pci numbers the devices it
/// registers in the order it probes them (`virtioN`), which is the order of its first line per
/// function.
fn drivers(lines: &[&str], virtio: &[&PciFunction]) -> Vec<Binding> {
    let first = |f: &PciFunction| {
        let tag = format!("virtio-pci {}", f.bdf);
        lines.iter().position(|l| l.contains(&tag))
    };
    let mut order: Vec<&PciFunction> = virtio.to_vec();
    order.sort_by_key(|f| first(f).unwrap_or(usize::MAX));
    let complaint = |pats: &[&str]| {
        lines
            .iter()
            .find(|l| pats.iter().any(|p| l.contains(p)))
            .map(|l| l.to_string())
    };
    // A driver that prints nothing when it binds: bound if some line shows what it made,
    // unbound on the guest's own complaint, otherwise unknown.
    let quiet = |made: Option<String>, complaints: &[&str]| match (made, complaint(complaints)) {
        (Some(m), _) => Evidence::Bound(m),
        (None, Some(l)) => Evidence::Unbound(Some(l)),
        (None, None) => Evidence::Unconfirmed,
    };
    order
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let class = Class::of(f);
            let own = |driver: &str| {
                let tag = format!("{driver} virtio{i}");
                lines.iter().copied().filter(move |l| l.contains(&tag))
            };
            let evidence = match class {
                Class::Block => match own("virtio_blk").find_map(disk_name) {
                    // virtio_blk prints the disk's capacity at notice level when it binds.
                    Some(vd) => Evidence::Bound(vd),
                    None => Evidence::Unbound(complaint(&[
                        "can't open '/dev/vd",
                        "mounting /dev/vd",
                        "unknown-block(0,0)",
                    ])),
                },
                Class::Net => quiet(
                    own("virtio_net")
                        .next()
                        .or_else(|| find(lines, "virtio_net virtio"))
                        .map(|l| {
                            l.split_whitespace()
                                .nth(2)
                                .unwrap_or("an interface")
                                .trim_end_matches(':')
                                .to_owned()
                        }),
                    &[
                        "SIOCGIFFLAGS: No such device",
                        "can't find device 'eth",
                        "Cannot find device \"eth",
                    ],
                ),
                Class::Console => quiet(
                    own("virtio_console")
                        .next()
                        .or_else(|| find(lines, "console [hvc"))
                        .map(|_| "hvc".to_owned()),
                    &["can't open '/dev/hvc", "/dev/hvc0: No such"],
                ),
                Class::Other => Evidence::Unconfirmed,
            };
            Binding {
                bdf: f.bdf.clone(),
                class,
                evidence,
            }
        })
        .collect()
}

/// `virtio_blk virtio0: [vda] 131072 512-byte logical blocks` -> `vda`.
fn disk_name(line: &str) -> Option<String> {
    let (_, rest) = line.split_once("[vd")?;
    let (name, _) = rest.split_once(']')?;
    Some(format!("vd{name}"))
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
        [    0.7] virtio-pci 0000:00:01.0: assigned reserved memory node swiotlb@50000000\n\
        [    0.8] virtio_blk virtio0: [vda] 131072 512-byte logical blocks\n";

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
    fn an_enumerated_disk_that_no_driver_took_is_named() {
        // What a kernel without VIRTIO_BLK prints: virtio-pci sets the function up, no vda.
        let log = BASE.replace("[    0.8] virtio_blk virtio0: [vda] 131072 512-byte logical blocks\n", "")
            + "[    1.0] Run /init as init process\ndd: can't open '/dev/vda': No such device or address\n";
        let r = read(&log);
        let d = r.diagnosis.as_ref().expect("diagnosed");
        assert_eq!(d.step, "virtio drivers bound", "{r}");
        assert!(d.cause.contains("0000:00:01.0 (virtio-blk)"), "{d:?}");
        assert!(d.cause.contains("can't open '/dev/vda'"), "{d:?}");
        assert!(d.fix.contains("CONFIG_VIRTIO_BLK=y"), "{d:?}");
        // The same log with the driver's line is whole.
        let r = read(&format!("{BASE}Run /init as init process\n"));
        assert!(r.ok(), "{r}");
        assert!(r.to_string().contains("0000:00:01.0 -> vda"), "{r}");
    }

    #[test]
    fn a_log_that_ends_before_init_proves_no_driver_missing() {
        let r = read(&BASE.replace(
            "virtio_blk virtio0: [vda] 131072 512-byte logical blocks",
            "",
        ));
        assert_ne!(r.diagnosis.unwrap().step, "virtio drivers bound");
    }

    #[test]
    fn a_missing_network_driver_is_named_when_the_guest_says_so() {
        let log =
            BASE.replace(
                "[1af4:1042] type 00 class 0x010000",
                "[1af4:1041] type 00 class 0x020000",
            )
            .replace(
                "[    0.8] virtio_blk virtio0: [vda] 131072 512-byte logical blocks\n",
                "",
            ) + "Run /init as init process\nip: SIOCGIFFLAGS: No such device\n";
        let d = read(&log).diagnosis.unwrap();
        assert_eq!(d.step, "virtio drivers bound");
        assert!(d.fix.contains("CONFIG_VIRTIO_NET=y"), "{d:?}");
        // Silence is not proof: the net driver prints nothing when it binds.
        let quiet = log.replace("ip: SIOCGIFFLAGS: No such device\n", "");
        let r = read(&quiet);
        assert!(r.ok(), "{r}");
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains("0000:00:01.0 (virtio-net)") && n.contains("print nothing")),
            "{r}"
        );
    }

    #[test]
    fn a_kernel_panic_before_init_is_quoted() {
        let log = format!("{BASE}[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n");
        let d = read(&log).diagnosis.unwrap();
        assert_eq!(d.step, "init started");
        assert!(d.cause.contains("Unable to mount root fs"));
    }
}
