//! Guest kernel configuration: the fragments this project builds its guest kernels from, and a
//! checker that reads a *resulting* `.config` (facts #4: a fragment alone proves nothing,
//! because `olddefconfig` silently drops options whose dependencies are missing).

use std::collections::HashMap;
use std::fmt;

/// Which guest a kernel is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Runs the virtio drivers; its devices are served by the device VM.
    Driver,
    /// Serves the driver VM's devices: additionally KVM and vhost.
    Device,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "driver" => Some(Role::Driver),
            "device" => Some(Role::Device),
            _ => None,
        }
    }
}

const DRIVER_FRAGMENT: &str = include_str!("../../../guest/kconfig/driver-vm.config");
const DEVICE_FRAGMENT: &str = include_str!("../../../guest/kconfig/device-vm.config");

/// The fragment files to merge for a role, in order.
pub fn fragments(role: Role) -> Vec<(&'static str, &'static str)> {
    let mut f = vec![("driver-vm.config", DRIVER_FRAGMENT)];
    if role == Role::Device {
        f.push(("device-vm.config", DEVICE_FRAGMENT));
    }
    f
}

/// The role's whole fragment as one text.
pub fn fragment(role: Role) -> String {
    fragments(role)
        .into_iter()
        .map(|(_, t)| t)
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// Built in; `=m` is accepted with a note that an initramfs must load it.
    YesOrModule,
    /// Must be built in (a bool option, or needed before any module can load).
    Yes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    Required,
    Recommended,
}

struct Req {
    sym: &'static str,
    want: Want,
    need: Need,
    device_only: bool,
    why: &'static str,
}

const fn req(sym: &'static str, want: Want, why: &'static str) -> Req {
    Req {
        sym,
        want,
        need: Need::Required,
        device_only: false,
        why,
    }
}

const fn rec(sym: &'static str, why: &'static str) -> Req {
    Req {
        sym,
        want: Want::Yes,
        need: Need::Recommended,
        device_only: false,
        why,
    }
}

const fn dev(sym: &'static str, want: Want, why: &'static str) -> Req {
    Req {
        sym,
        want,
        need: Need::Required,
        device_only: true,
        why,
    }
}

use Want::*;

/// The seed's required options with the dependencies it left out, and the reason for each.
const REQS: &[Req] = &[
    req("VIRTIO", YesOrModule, "virtio core: every splitvirt device is virtio or PCI"),
    req("VIRTIO_PCI", YesOrModule, "the devices are virtio-pci functions behind the ECAM host"),
    req("BLK_DEV", Yes, "VIRTIO_BLK depends on it; without it olddefconfig drops VIRTIO_BLK and there is no /dev/vda"),
    req("VIRTIO_BLK", YesOrModule, "the root file system is /dev/vda2 on virtio-blk"),
    req("NETDEVICES", Yes, "VIRTIO_NET depends on it"),
    req("VIRTIO_NET", YesOrModule, "eth0 is virtio-net"),
    req("VIRTIO_CONSOLE", YesOrModule, "/dev/hvc0 is virtio-console"),
    req("PCI", Yes, "virtio devices sit on PCI"),
    req("PCI_HOST_GENERIC", Yes, "the host bridge is pci-host-ecam-generic; without it no PCI device is found"),
    req("PCIEPORTBUS", Yes, "PCIe port services (the seed requires it)"),
    req("PCI_MSI", Yes, "MSI-X through the GICv2m frame; ARM_GIC_V2M depends on it"),
    req("SWIOTLB", Yes, "bounce buffering through the restricted pool is SWIOTLB"),
    req("DMA_RESTRICTED_POOL", Yes, "without it the restricted-dma-pool node is ignored and device DMA is not confined to the pool"),
    req("UIO", YesOrModule, "the cross-VM connector's `connection` driver is a UIO driver"),
    req("UIO_PCI_GENERIC", YesOrModule, "the seed requires it for UIO on PCI functions"),
    req("ARM_GIC", Yes, "the interrupt controller is a GIC-400 (GICv2)"),
    req("ARM_GIC_V2M", Yes, "MSIs go through the GICv2m frame; without it devices fall back to INTx"),
    req("SERIAL_AMBA_PL011", Yes, "the console is a PL011 (console=ttyAMA0)"),
    req("SERIAL_AMBA_PL011_CONSOLE", Yes, "console=ttyAMA0 needs the PL011 console"),
    req("SERIAL_EARLYCON", Yes, "earlycon=pl011,... on arm64 (the seed's EARLY_PRINTK does not exist on arm64)"),
    req("EXT4_FS", YesOrModule, "the root file system is ext4"),
    req("MODULES", Yes, "`modprobe connection` loads the connector driver"),
    dev("KVM", Yes, "the device VM runs nested guests (KVM_ARM_HOST no longer exists; KVM alone enables it)"),
    dev("VHOST_NET", YesOrModule, "QEMU's network backends in the device VM use vhost-net"),
    dev("VHOST", YesOrModule, "VHOST_NET needs it"),
    dev("VIRTIO_PMEM", YesOrModule, "a virtio-pmem image (the device VM's own disk, served as /dev/pmem0) needs its driver"),
    dev("BLK_DEV_PMEM", YesOrModule, "/dev/pmem0, the block device over a virtio-pmem region"),
    dev("LIBNVDIMM", YesOrModule, "VIRTIO_PMEM and BLK_DEV_PMEM need it"),
    rec("DEBUG_FS", "shows the pool at work in /sys/kernel/debug/swiotlb@ADDR/io_tlb_used"),
    rec("PRINTK_TIME", "timestamps on boot messages (the seed recommends it)"),
    rec("NO_HZ_IDLE", "no timer ticks on idle vCPUs (the seed recommends it)"),
    rec("HIGH_RES_TIMERS", "precise timers (the seed recommends it)"),
    rec("PREEMPT_VOLUNTARY", "the seed's preemption model"),
    rec("DEBUG_INFO", "symbols for debugging (the seed recommends it; it slows the build)"),
];

/// Options the seed names that no current arm64 kernel has.
pub const STALE: &[(&str, &str)] = &[
    (
        "KVM_ARM_HOST",
        "removed from Linux; CONFIG_KVM alone enables KVM on arm64",
    ),
    (
        "EARLY_PRINTK",
        "not an arm64 option; arm64 gets earlycon from CONFIG_SERIAL_EARLYCON",
    ),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Note,
    Warning,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub symbol: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Note => "note",
        };
        write!(f, "{tag}: CONFIG_{}: {}", self.symbol, self.message)
    }
}

/// A `.config` read into symbol -> value (`y`, `m`, or a string/number); `# ... is not set`
/// lines are absent values.
#[derive(Debug, Default)]
pub struct DotConfig {
    values: HashMap<String, String>,
    pub looks_generated: bool,
}

impl DotConfig {
    pub fn parse(text: &str) -> DotConfig {
        let mut values = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("CONFIG_") {
                if let Some((k, v)) = rest.split_once('=') {
                    values.insert(k.to_owned(), v.trim_matches('"').to_owned());
                }
            }
        }
        DotConfig {
            values,
            looks_generated: text.contains("# Automatically generated file; DO NOT EDIT."),
        }
    }

    pub fn get(&self, sym: &str) -> Option<&str> {
        self.values.get(sym).map(String::as_str)
    }
}

/// Every required option that is missing or misvalued, and notes for recommended ones.
pub fn check(cfg: &DotConfig, role: Role) -> Vec<Finding> {
    let mut out = Vec::new();
    if !cfg.looks_generated {
        out.push(Finding {
            level: Level::Warning,
            symbol: "(file)".into(),
            message: "this does not look like a kernel-generated .config; a fragment proves nothing until olddefconfig has resolved its dependencies (check the .config in the build directory)".into(),
        });
    }
    for r in REQS
        .iter()
        .filter(|r| role == Role::Device || !r.device_only)
    {
        let finding = |level, message: String| Finding {
            level,
            symbol: r.sym.into(),
            message,
        };
        match (cfg.get(r.sym), r.need) {
            (Some("y"), _) => {}
            (Some("m"), Need::Required) if r.want == YesOrModule => out.push(finding(
                Level::Warning,
                format!(
                    "=m: works only if an initramfs loads the module before it is needed ({})",
                    r.why
                ),
            )),
            (Some("m"), Need::Required) => out.push(finding(
                Level::Error,
                format!("=m but must be =y: {}", r.why),
            )),
            (None, Need::Required) => out.push(finding(
                Level::Error,
                format!(
                    "is not set: {} (fix: CONFIG_{}=y, and check that its dependencies are met)",
                    r.why, r.sym
                ),
            )),
            (Some(v), Need::Required) => out.push(finding(
                Level::Error,
                format!("= {v}, expected y: {}", r.why),
            )),
            (_, Need::Recommended) => out.push(finding(
                Level::Note,
                format!("is not =y (recommended): {}", r.why),
            )),
        }
    }
    for (sym, why) in STALE {
        if cfg.get(sym).is_some() {
            out.push(Finding {
                level: Level::Warning,
                symbol: (*sym).into(),
                message: format!("is set but {why}"),
            });
        }
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.level));
    out
}

/// The symbols a role requires (for tests and the build's own check).
pub fn required_symbols(role: Role) -> Vec<&'static str> {
    REQS.iter()
        .filter(|r| r.need == Need::Required && (role == Role::Device || !r.device_only))
        .map(|r| r.sym)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_required_symbol_is_in_the_roles_fragment() {
        for role in [Role::Driver, Role::Device] {
            let frag = DotConfig::parse(&fragment(role));
            for sym in required_symbols(role) {
                assert_eq!(
                    frag.get(sym),
                    Some("y"),
                    "{sym} missing from the {role:?} fragment"
                );
            }
        }
    }

    #[test]
    fn fragments_carry_no_stale_symbols() {
        let frag = DotConfig::parse(&fragment(Role::Device));
        for (sym, _) in STALE {
            assert!(frag.get(sym).is_none(), "{sym}");
        }
    }

    #[test]
    fn missing_module_and_misvalued_options() {
        let cfg = DotConfig::parse(
            "# Automatically generated file; DO NOT EDIT.\nCONFIG_VIRTIO_BLK=m\nCONFIG_PCI_HOST_GENERIC=m\nCONFIG_KVM_ARM_HOST=y\n",
        );
        let f = check(&cfg, Role::Driver);
        let by = |s: &str| f.iter().find(|x| x.symbol == s).unwrap();
        assert_eq!(by("VIRTIO_BLK").level, Level::Warning);
        assert!(by("VIRTIO_BLK").message.contains("initramfs"));
        assert_eq!(by("PCI_HOST_GENERIC").level, Level::Error);
        assert_eq!(by("DMA_RESTRICTED_POOL").level, Level::Error);
        assert!(by("BLK_DEV").message.contains("no /dev/vda"));
        assert_eq!(by("KVM_ARM_HOST").level, Level::Warning);
        assert_eq!(by("DEBUG_FS").level, Level::Note);
        assert!(
            f.iter().all(|x| x.symbol != "KVM"),
            "KVM is for the device role only"
        );
        assert!(check(&cfg, Role::Device).iter().any(|x| x.symbol == "KVM"));
    }

    #[test]
    fn a_fragment_is_flagged_as_not_a_config() {
        let f = check(&DotConfig::parse(&fragment(Role::Driver)), Role::Driver);
        assert!(f.iter().any(|x| x.symbol == "(file)"));
        assert!(f.iter().all(|x| x.level != Level::Error));
    }
}
