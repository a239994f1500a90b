//! Checks any guest DTB against what a splitvirt guest needs: an ECAM PCI host, a usable
//! restricted DMA pool that the devices reference, resolvable phandles, disjoint windows and
//! interrupt ranges. Each finding names the node, what is wrong and the fix.

use crate::tree::{join_cells, Node, Tree};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Warning,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub path: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
        };
        write!(
            f,
            "{tag}: {}: {} (fix: {})",
            self.path, self.message, self.fix
        )
    }
}

struct Lint<'t> {
    t: &'t Tree,
    out: Vec<Finding>,
}

impl Lint<'_> {
    fn err(&mut self, path: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Error, path, message, fix);
    }
    fn warn(&mut self, path: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Warning, path, message, fix);
    }
    fn push(
        &mut self,
        level: Level,
        path: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.out.push(Finding {
            level,
            path: path.to_owned(),
            message: message.into(),
            fix: fix.into(),
        });
    }
}

/// A range with the node that owns it, for overlap messages.
#[derive(Clone, Debug)]
struct Span {
    what: String,
    base: u64,
    size: u64,
}

impl Span {
    fn last(&self) -> u64 {
        self.base.saturating_add(self.size.saturating_sub(1))
    }
    fn overlaps(&self, o: &Span) -> bool {
        self.size > 0 && o.size > 0 && self.base <= o.last() && o.base <= self.last()
    }
    fn contains(&self, o: &Span) -> bool {
        o.base >= self.base && o.last() <= self.last()
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{:#x}-{:#x}]", self.what, self.base, self.last())
    }
}

pub fn lint(t: &Tree) -> Vec<Finding> {
    let mut l = Lint { t, out: Vec::new() };
    let root_ac = t.root.prop_u32("#address-cells").unwrap_or(2);
    let root_sc = t.root.prop_u32("#size-cells").unwrap_or(1);

    let ram = memory_spans(t, root_ac, root_sc);
    if ram.is_empty() {
        l.err(
            "/",
            "no memory node (device_type = \"memory\") with a reg",
            "add a memory@ADDR node describing RAM",
        );
    }
    let pools = check_pools(&mut l, &ram);
    let host = check_pci_host(&mut l, root_ac, root_sc);
    if let Some((path, node)) = &host {
        let windows = pci_windows(&mut l, path, node);
        for (i, a) in windows.iter().enumerate() {
            for r in &ram {
                if a.overlaps(r) {
                    l.err(
                        path,
                        format!("{a} overlaps {r}"),
                        "move the PCI window out of RAM",
                    );
                }
            }
            for p in &pools {
                if a.overlaps(p) {
                    l.err(
                        path,
                        format!("{a} overlaps {p}"),
                        "move the PCI window off the DMA pool",
                    );
                }
            }
            for b in &windows[i + 1..] {
                if a.overlaps(b) {
                    l.err(
                        path,
                        format!("{a} overlaps {b}"),
                        "make the PCI windows disjoint",
                    );
                }
            }
        }
        check_pool_use(&mut l, path, node);
    }
    check_phandles(&mut l);
    check_interrupts(&mut l, host.as_ref().map(|(_, n)| *n));
    l.out.sort_by_key(|f| std::cmp::Reverse(f.level));
    l.out
}

fn memory_spans(t: &Tree, ac: u32, sc: u32) -> Vec<Span> {
    t.root
        .children
        .iter()
        .filter(|n| n.strings("device_type") == ["memory"])
        .flat_map(|n| {
            n.reg(ac, sc)
                .unwrap_or_default()
                .into_iter()
                .map(|(base, size)| Span {
                    what: format!("RAM (/{})", n.name),
                    base,
                    size,
                })
        })
        .collect()
}

/// The restricted pools, after checking each one.
fn check_pools(l: &mut Lint, ram: &[Span]) -> Vec<Span> {
    let Some(rm) = l.t.root.child("reserved-memory") else {
        l.err(
            "/",
            "no /reserved-memory node, so no restricted DMA pool: devices can reach all of RAM",
            "add /reserved-memory with a compatible = \"restricted-dma-pool\" child",
        );
        return Vec::new();
    };
    let ac = rm.prop_u32("#address-cells").unwrap_or(2);
    let sc = rm.prop_u32("#size-cells").unwrap_or(2);
    let mut pools = Vec::new();
    for n in rm
        .children
        .iter()
        .filter(|n| n.is_compatible("restricted-dma-pool"))
    {
        let path = format!("/reserved-memory/{}", n.name);
        // Linux's rmem_swiotlb_setup refuses these (facts #1).
        for bad in [
            "reusable",
            "no-map",
            "linux,cma-default",
            "linux,dma-default",
        ] {
            if n.has(bad) {
                l.err(
                    &path,
                    format!("restricted-dma-pool has `{bad}`: Linux refuses the pool (\"compatible matching fail\") and every device fails to initialise it"),
                    format!("remove `{bad};` from the pool node"),
                );
            }
        }
        match n.reg(ac, sc).as_deref() {
            Some([(base, size)]) => {
                let s = Span {
                    what: format!("DMA pool ({path})"),
                    base: *base,
                    size: *size,
                };
                if !ram.iter().any(|r| r.contains(&s)) {
                    l.err(
                        &path,
                        format!("{s} is not inside any memory node"),
                        "place the pool inside RAM",
                    );
                }
                pools.push(s);
            }
            _ => l.err(
                &path,
                format!("reg must be one (address, size) pair of {ac}+{sc} cells"),
                "write reg = <ADDR_HI ADDR_LO SIZE_HI SIZE_LO>",
            ),
        }
    }
    if pools.is_empty() {
        l.err(
            "/reserved-memory",
            "no child with compatible = \"restricted-dma-pool\"",
            "add a restricted-dma-pool node and point the PCI devices at it with memory-region",
        );
    }
    pools
}

fn check_pci_host<'t>(l: &mut Lint<'t>, ac: u32, sc: u32) -> Option<(String, &'t Node)> {
    let all = l.t.walk();
    let host = all
        .iter()
        .find(|(_, n)| n.is_compatible("pci-host-ecam-generic"));
    let Some((path, node)) = host else {
        match all
            .iter()
            .find(|(_, n)| n.strings("device_type") == ["pci"])
        {
            Some((p, n)) => l.err(
                p,
                format!(
                    "PCI host is {:?}, not pci-host-ecam-generic",
                    n.strings("compatible")
                ),
                "describe the host bridge with compatible = \"pci-host-ecam-generic\"",
            ),
            None => l.err(
                "/",
                "no PCI host bridge node: the guest will find no PCI (virtio) devices",
                "add a pcie@ADDR node with compatible = \"pci-host-ecam-generic\"",
            ),
        }
        return None;
    };
    let (path, node) = (path.clone(), *node);
    let ecam = node.reg(ac, sc).and_then(|r| r.first().copied());
    let bus = node.cells("bus-range").unwrap_or_else(|| vec![0, 255]);
    match (ecam, bus.as_slice()) {
        (None, _) => l.err(
            &path,
            "no usable reg (the ECAM window)",
            "give the host bridge reg = <ECAM base and size>",
        ),
        (Some((_, size)), [first, last]) if last >= first => {
            let need = (u64::from(*last) - u64::from(*first) + 1) << 20;
            if size < need {
                l.err(
                    &path,
                    format!(
                        "bus-range <{first} {last}> needs {} MiB of ECAM, reg gives {size:#x}",
                        need >> 20
                    ),
                    "grow the ECAM reg or narrow bus-range",
                );
            }
        }
        _ => l.err(
            &path,
            format!("bus-range {bus:?} is not <first last>"),
            "write bus-range = <0 0>",
        ),
    }
    Some((path, node))
}

/// The host bridge's CPU-side windows from `ranges` (3 PCI + parent + 2 size cells).
fn pci_windows(l: &mut Lint, path: &str, node: &Node) -> Vec<Span> {
    let pac = l.t.root.prop_u32("#address-cells").unwrap_or(2) as usize;
    let Some(cells) = node.cells("ranges") else {
        l.err(
            path,
            "no ranges: devices get no memory windows",
            "add ranges for the I/O, 32-bit and 64-bit windows",
        );
        return Vec::new();
    };
    let stride = 3 + pac + 2;
    if pac > 2 || cells.len() % stride != 0 {
        l.err(
            path,
            format!(
                "ranges has {} cells, not a multiple of {stride}",
                cells.len()
            ),
            "write 7 cells per window",
        );
        return Vec::new();
    }
    cells
        .chunks_exact(stride)
        .map(|c| {
            let kind = match (c[0] >> 24) & 3 {
                1 => "I/O window",
                2 => "32-bit window",
                3 => "64-bit window",
                _ => "config window",
            };
            Span {
                what: format!("PCI {kind}"),
                base: join_cells(&c[3..3 + pac]),
                size: join_cells(&c[3 + pac..]),
            }
        })
        .collect()
}

/// The devices must find the pool: in their own nodes, or on the bridge as the seed does.
fn check_pool_use(l: &mut Lint, path: &str, node: &Node) {
    let on_bridge = node.has("memory-region");
    let per_device = node.children.iter().any(|c| c.has("memory-region"));
    if on_bridge {
        l.warn(
            path,
            "memory-region on the host bridge works, but dt-validate rejects it (pci-host-ecam-generic allows no memory-region)",
            "put memory-region in one child node per device (reg = <DEVFN<<8 0 0 0 0>) instead",
        );
    }
    if !on_bridge && !per_device {
        l.err(
            path,
            "no memory-region on the host bridge or its device nodes: devices will not use the restricted DMA pool",
            "add memory-region = <&pool> to each PCI device node",
        );
    }
}

/// Every memory-region must reach a reserved-memory node; every msi-parent an MSI controller.
fn check_phandles(l: &mut Lint) {
    let walk = l.t.walk();
    for (path, n) in &walk {
        for (prop, want) in [
            ("memory-region", "a /reserved-memory node"),
            ("msi-parent", "an msi-controller"),
        ] {
            let Some(cells) = n.cells(prop) else {
                if n.has(prop) {
                    l.err(
                        path,
                        format!("{prop} is not a list of cells"),
                        format!("write {prop} = <&label>"),
                    );
                }
                continue;
            };
            // memory-region is a plain list of phandles; msi-parent's first cell is the phandle.
            let phandles: Vec<u32> = if prop == "msi-parent" {
                cells.first().copied().into_iter().collect()
            } else {
                cells
            };
            for ph in phandles {
                match l.t.by_phandle(ph) {
                    None => l.err(
                        path,
                        format!("{prop} = <{ph:#x}> points at no node (dangling phandle)"),
                        if prop == "msi-parent" {
                            "add the v2m@ MSI frame node, or remove msi-parent: a dangling one makes every virtio device fail to probe"
                        } else {
                            "point it at the restricted-dma-pool node's phandle"
                        },
                    ),
                    Some((target, t)) => {
                        let ok = if prop == "msi-parent" {
                            t.has("msi-controller")
                        } else {
                            target.starts_with("/reserved-memory/")
                        };
                        if !ok {
                            l.err(path, format!("{prop} points at {target}, which is not {want}"), format!("point {prop} at {want}"));
                        }
                    }
                }
            }
        }
    }
}

/// SPI ranges: the v2m frame must not share interrupt IDs with INTx lines or the UART.
fn check_interrupts(l: &mut Lint, host: Option<&Node>) {
    let walk = l.t.walk();
    let frames: Vec<(String, u32, u32)> = walk
        .iter()
        .filter(|(_, n)| n.is_compatible("arm,gic-v2m-frame"))
        .filter_map(|(p, n)| {
            Some((
                p.clone(),
                n.prop_u32("arm,msi-base-spi")?,
                n.prop_u32("arm,msi-num-spis")?,
            ))
        })
        .collect();
    let mut users: Vec<(String, u32)> = Vec::new();
    for (p, n) in &walk {
        if n.is_compatible("arm,pl011") {
            if let Some([0, spi, _]) = n.cells("interrupts").as_deref() {
                users.push((format!("UART {p} (SPI {spi})"), 32 + spi));
            }
        }
    }
    if let Some(h) = host {
        for spi in intx_spis(l.t, h) {
            users.push((format!("PCI INTx line SPI {spi}"), 32 + spi));
        }
    }
    for (path, base, count) in frames {
        if base < 32 || u64::from(base) + u64::from(count) > 1020 || count == 0 {
            l.err(
                &path,
                format!(
                    "MSI range {base}..{} is not inside the SPIs 32..1019",
                    u64::from(base) + u64::from(count)
                ),
                "fix arm,msi-base-spi / arm,msi-num-spis",
            );
        }
        users.sort();
        users.dedup();
        for (who, id) in &users {
            if *id >= base && u64::from(*id) < u64::from(base) + u64::from(count) {
                l.err(
                    &path,
                    format!(
                        "MSI range (interrupt IDs {base}..{}) contains {who}, interrupt ID {id}",
                        u64::from(base) + u64::from(count) - 1
                    ),
                    "move arm,msi-base-spi above the wired interrupts",
                );
            }
        }
    }
}

/// Parent SPI numbers of a GIC-routed interrupt-map (bounded by the property's length).
fn intx_spis(t: &Tree, host: &Node) -> Vec<u32> {
    let Some(map) = host.cells("interrupt-map") else {
        return Vec::new();
    };
    let child = 3 + host.prop_u32("#interrupt-cells").unwrap_or(1) as usize;
    let mut out = Vec::new();
    let mut i = 0;
    while i + child < map.len() {
        let ph = map[i + child];
        let Some((_, parent)) = t.by_phandle(ph) else {
            break;
        };
        let pac = parent.prop_u32("#address-cells").unwrap_or(0) as usize;
        let pic = parent.prop_u32("#interrupt-cells").unwrap_or(3) as usize;
        let spec = i + child + 1 + pac;
        if pac > 4 || pic == 0 || pic > 4 || spec + pic > map.len() {
            break;
        }
        if pic == 3 && map[spec] == 0 {
            out.push(map[spec + 1]);
        }
        i = spec + pic;
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::{generate, BootInfo};
    use layout::{resolve, Description};

    fn tree_of(d: &Description) -> Tree {
        let l = resolve(d).unwrap().layout;
        Tree::parse(&generate(&l, &BootInfo::default()).unwrap()).unwrap()
    }

    #[test]
    fn our_default_tree_is_clean() {
        let f = lint(&tree_of(&Description::default_vm()));
        assert!(f.is_empty(), "{f:#?}");
    }

    #[test]
    fn host_bridge_reference_is_a_warning_only() {
        let mut d = Description::default_vm();
        d.pci.pool_reference = layout::PoolReference::HostBridge;
        let f = lint(&tree_of(&d));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].level, Level::Warning);
        assert!(f[0].message.contains("dt-validate"));
    }

    #[test]
    fn intx_lines_are_read_from_the_map() {
        let t = tree_of(&Description::default_vm());
        assert_eq!(
            intx_spis(&t, t.find("/pcie@70000000").unwrap()),
            vec![3, 4, 5, 6]
        );
    }
}
