//! The hypervisor boundary. `prepare` (any host) reads and checks everything a boot needs and
//! decides where it goes; `run` hands that to the hypervisor. Everything that knows KVM is in
//! `kvm`, compiled only for aarch64 hosts.

/// The environment variable that names splitvirt's log file (`--log-file`).
pub const LOG_FILE_ENV: &str = "SPLITVIRT_LOG_FILE";

pub mod affinity;
pub mod backend;
pub mod bus;
pub mod connect;
pub mod devices;
pub mod kept;
#[cfg(target_arch = "aarch64")]
mod kvm;
pub mod machine;
pub mod memory;
pub mod msiroute;
pub mod pci_bus;
pub mod port;
pub mod reaper;
pub mod stats;
pub mod terminal;
pub mod undecoded;

use layout::Layout;
use std::path::{Path, PathBuf};

/// What a host check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    pub api_version: i32,
    /// Address and value of the guest's first MMIO write.
    pub mmio_exit: (u64, Vec<u8>),
    pub gic_irqs: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("splitvirt runs VMs on aarch64 Linux hosts with /dev/kvm; this host is {0}. Run it inside the emulated arm64 board: `cargo xtask board`")]
    WrongArch(&'static str),
    #[error("cannot open /dev/kvm: {0} (is KVM enabled in the host kernel, and may this user open /dev/kvm?)")]
    NoKvm(String),
    #[error("KVM refused to {what}: {detail}")]
    Kvm { what: &'static str, detail: String },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("the guest stopped with {0} before its MMIO write")]
    UnexpectedExit(String),
    #[error("no kernel to boot: pass --kernel IMAGE or set kernel.image in the VM description")]
    NoKernel,
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] boot::ImageError),
    #[error("cannot place the boot files: {0}")]
    Place(#[from] boot::PlaceError),
    #[error(transparent)]
    Dtb(#[from] devicetree::GenError),
    #[error("vCPU {vcpu} stopped: {why}\n{regs}")]
    GuestFault {
        vcpu: usize,
        why: String,
        regs: String,
    },
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Device(#[from] crate::devices::OpenError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Port(#[from] crate::port::PortError),
    #[error(transparent)]
    Affinity(#[from] crate::affinity::AffinityError),
}

/// How the guest ended, when it ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    PowerOff,
    Reset,
    /// The operator typed Ctrl-A x.
    Quit,
}

pub struct RunSpec {
    pub layout: Layout,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Print boot timings and splitvirt's own memory at the end.
    pub stats: bool,
    /// The description file (None: the built-in default), which the backend process reads too.
    pub config: Option<PathBuf>,
}

/// Everything read, checked and placed: what remains is the hypervisor's part.
#[derive(Debug)]
pub struct Prepared {
    pub kernel: boot::Kernel,
    /// The Image's bytes, as they go into guest memory.
    pub image: Payload,
    pub placement: boot::Placement,
    pub dtb: Vec<u8>,
    pub initrd: Option<BootFile>,
}

/// A boot file, open and measured, to be read later straight into guest memory: no copy in
/// splitvirt's own memory, which under nested virtualization costs a page fault per 4 KiB.
#[derive(Debug)]
pub struct BootFile {
    pub(crate) file: std::fs::File,
    pub len: u64,
    pub(crate) what: &'static str,
    pub(crate) path: PathBuf,
}

/// The Image: its file, or in memory when it was an Image.gz (inflated).
#[derive(Debug)]
pub enum Payload {
    File(BootFile),
    Bytes(Vec<u8>),
}

impl BootFile {
    fn open(what: &'static str, path: &Path) -> Result<BootFile, Error> {
        let err = |source| Error::Read {
            what,
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        Ok(BootFile {
            file,
            len,
            what,
            path: path.to_owned(),
        })
    }

    pub(crate) fn err(&self, source: std::io::Error) -> Error {
        Error::Read {
            what: self.what,
            path: self.path.clone(),
            source,
        }
    }

    /// Its first bytes, up to `n` (the read position is left at 0).
    fn head(&mut self, n: usize) -> Result<Vec<u8>, Error> {
        use std::io::{Read, Seek};
        let mut head = Vec::new();
        let file = &mut self.file;
        let r = file
            .by_ref()
            .take(n as u64)
            .read_to_end(&mut head)
            .and_then(|_| file.rewind());
        r.map_err(|e| self.err(e))?;
        Ok(head)
    }

    /// The whole of it, in memory.
    fn into_bytes(mut self) -> Result<Vec<u8>, Error> {
        use std::io::Read;
        let mut b = Vec::new();
        self.file.read_to_end(&mut b).map_err(|e| self.err(e))?;
        Ok(b)
    }
}

/// Reads the kernel and initrd, validates the Image, places everything and generates the DTB.
/// Every user error shows up here, before any VM exists.
pub fn prepare(spec: &RunSpec) -> Result<Prepared, Error> {
    let path = spec
        .kernel
        .as_ref()
        .or(spec.layout.kernel.as_ref())
        .ok_or(Error::NoKernel)?;
    // A raw Image is checked by its header and read into guest memory later, straight from
    // its file; an Image.gz is inflated here.
    let mut image = BootFile::open("kernel", path)?;
    let head = image.head(4096)?;
    let name = path.display().to_string();
    let (kernel, image) = if boot::Kernel::is_gzip(&head) {
        let (k, bytes) = boot::Kernel::parse(&image.into_bytes()?, &name)?;
        (k, Payload::Bytes(bytes))
    } else {
        let k = boot::Kernel::from_header(&head, image.len, &name)?;
        (k, Payload::File(image))
    };
    let initrd_path = spec.initrd.as_ref().or(spec.layout.initrd.as_ref());
    // The size decides the placement; the file is read straight into guest memory, later.
    let initrd = match initrd_path {
        Some(p) => Some(BootFile::open("initrd", p)?),
        None => None,
    };
    let initrd_size = initrd.as_ref().map(|f| f.len);
    let l = &spec.layout;
    // Disk images are opened again when the VM starts; a bad one is reported now. One the
    // jailed backend serves is only checked: its metadata is the backend's to parse.
    for d in &l.devices {
        let backend = d.placement == layout::Placement::Backend;
        if backend && l.rpc_device_vm {
            // A device VM's file, which it opens itself.
            continue;
        }
        if backend && l.rpc_jail.is_some() {
            hostio::devices::check_disk(&d.kind)?;
        } else {
            crate::devices::open_disk(&d.kind)?;
        }
    }
    let placement = boot::place(
        &l.ram,
        l.pool.as_ref(),
        kernel.text_offset,
        kernel.image_size,
        boot::DTB_MAX,
        initrd_size,
    )?;
    let dtb = devicetree::generate(
        l,
        &devicetree::BootInfo {
            initrd: placement.initrd,
        },
    )?;
    if dtb.len() as u64 > boot::DTB_MAX {
        return Err(boot::PlaceError::DtbTooBig {
            size: dtb.len() as u64,
        }
        .into());
    }
    Ok(Prepared {
        kernel,
        image,
        placement,
        dtb,
        initrd,
    })
}

/// Boots the prepared guest and returns when it powers off or resets.
pub fn run(spec: &RunSpec) -> Result<Exit, Error> {
    stats::phase("described");
    let prepared = prepare(spec)?;
    stats::phase("prepared");
    #[cfg(target_arch = "aarch64")]
    {
        kvm::run(spec, prepared)
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        let _ = prepared;
        Err(Error::WrongArch(std::env::consts::ARCH))
    }
}

/// Proves this host can run splitvirt guests: opens /dev/kvm, creates a VM with an in-kernel
/// vgic-v2, runs a few guest instructions and sees their MMIO write as an exit.
pub fn host_check() -> Result<HostReport, Error> {
    #[cfg(target_arch = "aarch64")]
    {
        kvm::smoke()
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        Err(Error::WrongArch(std::env::consts::ARCH))
    }
}
