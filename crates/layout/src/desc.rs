//! The VM description as a user writes it (TOML). A file names a profile and overrides any part
//! of it; tables merge key by key, and a `[[device]]` list in the file replaces the profile's.

use crate::profiles::Profile;
use crate::size::ByteSize;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Description {
    /// The profile this description starts from (`driver-vm` or `qemu-virt`).
    pub profile: String,
    pub name: String,
    pub vcpus: u32,
    /// Microseconds the hypervisor keeps polling a vCPU that waits for an interrupt (WFI)
    /// before it sleeps (absent: the host's default, KVM's `halt_poll_ns`). Longer catches
    /// wake-ups that come later without a trip through the host's scheduler (a VM that
    /// answers another's events), for a host CPU kept busy that long per wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_poll_us: Option<u32>,
    /// The host CPUs the vCPU threads may run on, as `taskset -c` lists them: one list for
    /// every vCPU (`"2-3"`), or one per vCPU (`["2", "3"]`). Absent: wherever the host's
    /// scheduler puts them. VMs that answer each other (a device VM and its driver VMs) keep
    /// out of each other's way on CPUs of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_affinity: Option<AffinityDesc>,
    pub memory: MemoryDesc,
    pub gic: GicDesc,
    pub uart: UartDesc,
    pub timer: TimerDesc,
    pub pci: PciDesc,
    /// The restricted DMA pool: all device DMA goes through it. Absent: no pool (not isolated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolDesc>,
    pub kernel: KernelDesc,
    /// How splitvirt talks to its backend process. Absent: the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendDesc>,
    #[serde(default, rename = "device", skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceDesc>,
}

/// `vcpu_affinity`: host CPU lists (`"0-3,6"`), one for all vCPUs or one per vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AffinityDesc {
    All(String),
    PerVcpu(Vec<String>),
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryDesc {
    pub base: u64,
    pub size: ByteSize,
    /// Back RAM outside the pool with transparent huge pages where the host allows them
    /// (absent: true). `false` keeps 4 KiB pages (for comparison, or a host short of memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GicDesc {
    pub distributor: u64,
    pub distributor_size: ByteSize,
    pub cpu_interface: u64,
    pub cpu_interface_size: ByteSize,
    /// The GICv2m MSI frame; absent: no MSI, devices use INTx only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v2m: Option<V2mDesc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct V2mDesc {
    pub base: u64,
    pub size: ByteSize,
    /// First interrupt ID (not SPI number) the frame raises: `arm,msi-base-spi`.
    pub spi_base: u32,
    /// How many interrupt IDs from `spi_base`: `arm,msi-num-spis`.
    pub spi_count: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UartDesc {
    pub base: u64,
    pub size: ByteSize,
    /// SPI number as written in the device tree (interrupt ID = 32 + spi).
    pub spi: u32,
    /// Frequency of the `apb_pclk` fixed clock.
    pub clock_hz: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimerDesc {
    /// PPI numbers (interrupt ID = 16 + ppi) of the secure physical, non-secure physical,
    /// virtual and hypervisor timers, in the order the `arm,armv8-timer` binding lists them.
    pub ppis: [u32; 4],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolReference {
    /// `memory-region` in a child node per PCI device: dt-validate clean.
    PerDevice,
    /// `memory-region` on the host bridge, as the seed document does it.
    HostBridge,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub base: u64,
    pub size: ByteSize,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciDesc {
    pub ecam_base: u64,
    pub ecam_size: ByteSize,
    pub bus_range: [u32; 2],
    pub io: Window,
    pub mem32: Window,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem64: Option<Window>,
    /// SPI numbers of INTA..INTD after the swizzle, as in the device tree.
    pub intx_spis: [u32; 4],
    pub pool_reference: PoolReference,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolDesc {
    pub base: u64,
    pub size: ByteSize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendDesc {
    /// Microseconds each side of the RPC spins for the next message before it sleeps on its
    /// doorbell (0: sleep at once). Spinning trades a host CPU for latency.
    #[serde(default)]
    pub poll_us: u32,
    /// How many times a backend process that dies is replaced by a new one, which takes its
    /// devices over where they stood (absent: 3; 0: its devices fail from then on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u32>,
    /// Reach a backend already listening on this Unix socket (`splitvirt backend --listen`)
    /// instead of starting one: it may run as another user, or in a container of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<PathBuf>,
    /// The backend is a device VM (docs/ARCHITECTURE.md, "The device VM"): the Unix socket of
    /// its `rpc-port`, which its splitvirt listens on. Like `connect`, but the devices' host
    /// ends (disk images, TAPs) are the device VM's own: their paths name files inside it, and
    /// splitvirt opens none of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_vm: Option<PathBuf>,
    /// Confine the backend process (docs/SECURITY.md; absent: true). `false` runs it with
    /// splitvirt's user, file system and network, and is logged as a warning at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<bool>,
    /// The user and group id the jailed backend runs as when splitvirt runs as root (absent:
    /// 65534, `nobody`); an unprivileged splitvirt's backend keeps its user's ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_gid: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelDesc {
    pub cmdline: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
}

/// One `[[device]]` entry. Its fields are those of every kind; which ones a kind takes is
/// checked by validation, so that a misplaced key gets a message naming the kind.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceDesc {
    pub kind: String,
    // Placement overrides, for every kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bar_base: Option<u64>,
    /// `A`..`D`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intx_pin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msi_vectors: Option<u32>,
    /// `backend` (the default) or `in-process`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    // virtio-blk
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// `raw` or `qcow2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    // virtio-net (and virtio-console)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    // connector
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataport_size: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    // rpc-port (in a device VM)
    /// The Unix socket this VM's splitvirt listens on for the driver VM's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// The driver VM's restricted DMA pool size, which the port's BAR 4 holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<ByteSize>,
    // vhost-user (and `socket`: where its backend listens)
    /// The virtio device its backend serves: `blk`, `fs` or `console`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read VM description {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: `{key}`: {message}")]
    Field {
        origin: String,
        key: String,
        message: String,
    },
    #[error("{origin}: unknown profile `{name}`; known profiles: {known}")]
    UnknownProfile {
        origin: String,
        name: String,
        known: String,
    },
}

impl Description {
    /// The built-in default: the seed's driver VM.
    pub fn default_vm() -> Self {
        Profile::DriverVm.description()
    }

    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut d = Self::parse(&text, &path.display().to_string())?;
        d.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(d)
    }

    /// Parses TOML text over the profile it names (default `driver-vm`). `origin` names the
    /// text in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, LoadError> {
        let user: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| LoadError::Syntax {
                origin: origin.to_owned(),
                message: e.to_string().trim_end().to_owned(),
            })?;
        let profile_name = match user.get("profile") {
            None => Profile::DriverVm.name().to_owned(),
            Some(toml::Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(LoadError::Field {
                    origin: origin.to_owned(),
                    key: "profile".into(),
                    message: format!("expected a profile name string, found {}", other.type_str()),
                })
            }
        };
        let profile =
            Profile::from_name(&profile_name).ok_or_else(|| LoadError::UnknownProfile {
                origin: origin.to_owned(),
                name: profile_name.clone(),
                known: Profile::ALL.map(|p| p.name()).join(", "),
            })?;
        let mut merged = toml::Table::try_from(profile.description())
            .expect("a built-in profile always serialises");
        merge(&mut merged, user);
        let de = toml::Value::Table(merged);
        serde_path_to_error::deserialize(de).map_err(|e| LoadError::Field {
            origin: origin.to_owned(),
            key: e.path().to_string(),
            message: e.inner().to_string().trim_end().to_owned(),
        })
    }

    /// Relative file names in a description are relative to the file, not to the caller's cwd.
    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        self.kernel.image.as_mut().map(fix);
        self.kernel.initrd.as_mut().map(fix);
        if let Some(b) = &mut self.backend {
            b.connect.as_mut().map(fix);
            b.device_vm.as_mut().map(fix);
        }
        // Socket paths too: two VMs whose files sit side by side name the same socket.
        let fix_str = |p: &mut String| {
            if Path::new(p.as_str()).is_relative() {
                *p = dir.join(&*p).display().to_string();
            }
        };
        for d in &mut self.devices {
            d.socket.as_mut().map(fix);
            d.image.as_mut().map(fix);
            d.peer.as_mut().map(fix_str);
            if let Some(b) = &mut d.backend {
                if let Some(path) = b.strip_prefix("socket:") {
                    let mut path = path.to_owned();
                    fix_str(&mut path);
                    *b = format!("socket:{path}");
                }
            }
        }
    }
}

/// Tables merge key by key; anything else (arrays included) is replaced by the user's value.
/// `false` in place of a profile's table removes it (`v2m = false`, `pool = false`).
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (Some(toml::Value::Table(_)), toml::Value::Boolean(false)) => {
                base.remove(&k);
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::size::MIB;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(
            Description::parse("", "t").unwrap(),
            Description::default_vm()
        );
    }

    #[test]
    fn partial_tables_override_only_their_keys() {
        let d = Description::parse("[memory]\nsize = \"256M\"\n", "t").unwrap();
        assert_eq!(d.memory.size.0, 256 * MIB);
        assert_eq!(d.memory.base, Description::default_vm().memory.base);
    }

    #[test]
    fn false_removes_an_optional_section() {
        let d = Description::parse(
            "pool = false\n[gic]\nv2m = false\n[pci]\nmem64 = false\n",
            "t",
        )
        .unwrap();
        assert!(d.pool.is_none() && d.gic.v2m.is_none() && d.pci.mem64.is_none());
        // On a section that is not optional it is a type error naming the key.
        let e = Description::parse("memory = false\n", "t").unwrap_err();
        assert!(e.to_string().contains("memory"), "{e}");
    }

    #[test]
    fn unknown_key_names_its_path() {
        let e = Description::parse("[memory]\nsise = 5\n", "vm.toml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("vm.toml"), "{msg}");
        assert!(msg.contains("memory"), "{msg}");
        assert!(msg.contains("sise"), "{msg}");
    }

    #[test]
    fn socket_paths_are_relative_to_the_file_like_images() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("vm.toml");
        std::fs::write(
            &f,
            "[backend]\nconnect = \"be.sock\"\n\
             [[device]]\nkind = \"connector\"\nname = \"c\"\ndataport_size = \"1M\"\npeer = \"c.sock\"\n\
             [[device]]\nkind = \"virtio-net\"\nbackend = \"socket:link.sock\"\n\
             [[device]]\nkind = \"virtio-console\"\nbackend = \"socket:/run/abs.sock\"\n",
        )
        .unwrap();
        let d = Description::load(&f).unwrap();
        let at = |n: &str| dir.path().join(n).display().to_string();
        assert_eq!(d.backend.unwrap().connect, Some(dir.path().join("be.sock")));
        assert_eq!(d.devices[0].peer.as_deref(), Some(at("c.sock").as_str()));
        assert_eq!(
            d.devices[1].backend.as_deref(),
            Some(format!("socket:{}", at("link.sock")).as_str())
        );
        assert_eq!(
            d.devices[2].backend.as_deref(),
            Some("socket:/run/abs.sock")
        );
    }

    #[test]
    fn unknown_device_key_is_rejected() {
        let e = Description::parse("[[device]]\nkind = \"virtio-blk\"\nimgae = \"x\"\n", "t")
            .unwrap_err();
        assert!(e.to_string().contains("imgae"), "{e}");
    }

    #[test]
    fn unknown_top_level_key_and_profile() {
        let e = Description::parse("vcpu = 2\n", "t").unwrap_err();
        assert!(e.to_string().contains("vcpu"), "{e}");
        let e = Description::parse("profile = \"raspi\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("qemu-virt"), "{e}");
    }

    #[test]
    fn syntax_error_names_the_file() {
        let e = Description::parse("[memory\n", "bad.toml").unwrap_err();
        assert!(matches!(e, LoadError::Syntax { .. }));
        assert!(e.to_string().contains("bad.toml"));
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = Description::parse("vcpus = \"two\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("vcpus"), "{e}");
    }

    #[test]
    fn relative_image_paths_follow_the_file() {
        let dir = std::env::temp_dir().join(format!("svdesc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.toml");
        std::fs::write(
            &f,
            "[[device]]\nkind = \"virtio-blk\"\nimage = \"disk.img\"\n",
        )
        .unwrap();
        let d = Description::load(&f).unwrap();
        assert_eq!(
            d.devices[0].image.as_deref(),
            Some(dir.join("disk.img").as_path())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
