//! The description's virtio devices as PCI functions over their host ends: built by splitvirt
//! for the devices it runs itself (opening their host ends by name), and by the backend for
//! its own (from the descriptors splitvirt handed it, `hostends`). Where their interrupts go
//! is the caller's `Signal`.

use layout::{ConsoleBackend, DeviceKind, Layout, NetBackend};
use pci::ecam::{devfn, DevFn};
use pci::PciFunction;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use virtio::transport::{Signal, VirtioPci};

/// A console device shared with the input thread.
pub type SharedConsole = Arc<Mutex<VirtioPci<virtio::console::Console>>>;

/// Wraps a shared function so that the ECAM can own a handle while the VMM keeps another.
pub struct SharedFunction<F: PciFunction>(pub Arc<Mutex<F>>);

impl<F: PciFunction> SharedFunction<F> {
    fn with<R>(&self, f: impl FnOnce(&mut F) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<F: PciFunction> PciFunction for SharedFunction<F> {
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_address(bar)
    }
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.with(|f| f.config_read(off, data))
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.with(|f| f.config_write(off, data))
    }
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        self.with(|f| f.bar_read(bar, off, data))
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        self.with(|f| f.bar_write(bar, off, data))
    }
    fn resume(&mut self) {
        self.with(|f| f.resume())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Disk(#[from] virtio::blk::OpenError),
    #[error(transparent)]
    Tap(#[from] crate::tap::TapError),
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointError),
    #[error(transparent)]
    VhostUser(#[from] vhost_frontend::VhostUserError),
    #[error(transparent)]
    Pmem(#[from] virtio::pmem::OpenError),
    #[error(
        "the host end of the device at slot {slot}: cannot duplicate descriptor {fd}: {source}"
    )]
    Dup {
        slot: u8,
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the device at slot {0} runs in the backend, but splitvirt handed it no host end (a \
         splitvirt of another version?)"
    )]
    NoHostEnd(u8),
}

/// Something to start once the VM's bus exists (a thread feeding a device).
pub type Starter = Box<dyn FnOnce() + Send>;

pub struct Built {
    pub functions: Vec<(DevFn, Box<dyn PciFunction>)>,
    /// The console on splitvirt's stdio, which stdin feeds when the guest's console is hvc0.
    pub console: Option<SharedConsole>,
    /// Threads that feed devices from their backends.
    pub starters: Vec<Starter>,
    /// Devices the description names that this build cannot serve yet, with why.
    pub skipped: Vec<String>,
}

/// Input for a shared virtio device, as a backend thread delivers it.
fn feed<D: virtio::VirtioDevice + 'static>(
    f: &Arc<Mutex<VirtioPci<D>>>,
    mut deliver: impl FnMut(&mut D, &[u8]) -> Result<(), virtio::DeviceError> + Send + 'static,
) -> crate::endpoint::Deliver {
    let f = f.clone();
    Box::new(move |b: &[u8]| {
        let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
        f.with_device(|d| deliver(d, b));
    })
}

fn disk_format(f: Option<layout::DiskFormat>) -> Option<virtio::disk::Format> {
    f.map(|f| match f {
        layout::DiskFormat::Raw => virtio::disk::Format::Raw,
        layout::DiskFormat::Qcow2 => virtio::disk::Format::Qcow2,
    })
}

/// Opens a description's disk image as its device would (also used to report errors early).
pub fn open_disk(kind: &DeviceKind) -> Result<Option<virtio::blk::Block>, OpenError> {
    match kind {
        DeviceKind::VirtioBlk {
            image,
            read_only,
            format,
        } => Ok(Some(virtio::blk::Block::open_as(
            image,
            disk_format(*format),
            *read_only,
        )?)),
        _ => Ok(None),
    }
}

/// Checks a description's disk image without parsing its metadata (see [`virtio::disk::check`]).
pub fn check_disk(kind: &DeviceKind) -> Result<(), OpenError> {
    match kind {
        DeviceKind::VirtioBlk {
            image,
            read_only,
            format,
        } => Ok(virtio::disk::check(
            image,
            disk_format(*format),
            *read_only,
        )?),
        _ => Ok(()),
    }
}

/// A virtio device's type and queue sizes. None for a device that is not virtio.
pub fn virtio_shape(kind: &DeviceKind) -> Option<(u32, Vec<u16>)> {
    use virtio::{blk, console, net};
    let (ty, queues, size) = match kind {
        DeviceKind::VirtioBlk { .. } => (2, blk::QUEUES, blk::QUEUE_SIZE),
        DeviceKind::VirtioNet { .. } => (1, net::QUEUES, net::QUEUE_SIZE),
        DeviceKind::VirtioConsole { .. } => (3, console::QUEUES, console::QUEUE_SIZE),
        DeviceKind::VhostUser {
            device_type,
            queues,
            queue_size,
            ..
        } => (*device_type, usize::from(*queues), *queue_size),
        DeviceKind::VirtioPmem { .. } => (virtio::pmem::DEVICE_TYPE, 1, virtio::pmem::QUEUE_SIZE),
        DeviceKind::Connector { .. } | DeviceKind::RpcPort { .. } => return None,
    };
    Some((ty, vec![size; queues]))
}

/// Where a virtio device's queue notifications land in its BAR 0: (offset, the value Linux
/// writes there, 16 bits) per queue. None for a device that is not virtio.
pub fn notify_writes(kind: &DeviceKind) -> Option<Vec<(u64, u16)>> {
    let (_, queues) = virtio_shape(kind)?;
    Some(
        (0..queues.len() as u16)
            .map(|q| {
                let off = u64::from(q) * u64::from(virtio::transport::NOTIFY_MULTIPLIER);
                (virtio::transport::NOTIFY + off, q)
            })
            .collect(),
    )
}

fn virtio_pci<D: virtio::VirtioDevice>(
    d: &layout::Device,
    mem: &virtio::Memory,
    signal: &dyn Fn(&layout::Device) -> Arc<dyn Signal>,
    dev: D,
) -> VirtioPci<D> {
    let bar = d.bars.first().map_or(0, |b| b.base);
    VirtioPci::new(dev, mem.clone(), bar, d.intx_pin as u8, signal(d))
}

/// What the caller of [`build`] adds to each device it builds.
pub struct Extras<'a> {
    /// A virtio-blk device's journal (the backend's, for the VMM to reap from).
    pub journal: &'a dyn Fn(&layout::Device) -> Option<Arc<dyn virtio::blk::Journal>>,
    /// The hypervisor's eventfds a vhost-user device hands its backend program.
    pub vhost: &'a dyn Fn(&layout::Device) -> VhostFds,
}

/// The hypervisor's eventfds for a vhost-user device, which its backend program gets so that
/// splitvirt stays out of its data path.
#[derive(Default)]
pub struct VhostFds {
    /// One per queue, each caught at that queue's notify address (an ioeventfd): its kick.
    pub kicks: Vec<OwnedFd>,
    /// One per MSI-X vector, each routed to what the driver programs into it (irqfds).
    pub calls: Vec<OwnedFd>,
}

/// Builds the description's devices placed `here`: the VMM builds the in-process ones, the
/// backend process those placed in the backend. `mem` is what devices may reach (the pool).
/// A disk image, TAP or socket that cannot be opened is an error here, before any vCPU runs.
/// `handed` holds the host ends splitvirt opened for the backend (`hostends`), by slot: the
/// backend's devices take theirs from there and open nothing by name; in-process devices open
/// their own. `extras`: what the caller adds to each device.
pub fn build(
    l: &Layout,
    mem: virtio::Memory,
    signal: &dyn Fn(&layout::Device) -> Arc<dyn Signal>,
    stdout: Box<dyn Write + Send>,
    here: layout::Placement,
    extras: Extras<'_>,
    mut handed: Vec<(u8, OwnedFd)>,
) -> Result<Built, OpenError> {
    let Extras { journal, vhost } = extras;
    let mut out = Built {
        functions: Vec::new(),
        console: None,
        starters: Vec::new(),
        skipped: Vec::new(),
    };
    let mut stdout = Some(stdout);
    let remote = here == layout::Placement::Backend;
    for d in l.devices.iter().filter(|d| d.placement == here) {
        let at = devfn(d.slot as u8, 0);
        let slot = d.slot as u8;
        // The backend's host end for this device (every device but a stdio console has one).
        let mut end = || -> Result<Option<OwnedFd>, OpenError> {
            if !remote {
                return Ok(None);
            }
            match handed.iter().position(|(s, _)| *s == slot) {
                Some(i) => Ok(Some(handed.swap_remove(i).1)),
                None => Err(OpenError::NoHostEnd(slot)),
            }
        };
        match &d.kind {
            DeviceKind::VirtioBlk {
                image,
                read_only,
                format,
            } => {
                let mut dev = match end()? {
                    Some(fd) => {
                        let name = image
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let disk = virtio::disk::from_file(
                            fd.into(),
                            &image.display().to_string(),
                            virtio::disk::format_of(image, disk_format(*format)),
                            *read_only,
                            virtio::disk::Backing::Refuse,
                        )?;
                        virtio::blk::Block::with_disk(disk.into(), &name, *read_only)
                    }
                    None => open_disk(&d.kind)?.expect("a virtio-blk device"),
                };
                if let Some(j) = journal(d) {
                    dev.set_journal(j);
                }
                out.functions
                    .push((at, Box::new(virtio_pci(d, &mem, signal, dev))));
            }
            DeviceKind::VirtioNet { backend, mac } => {
                // The wire: what the device sends frames to, and what feeds it those that
                // arrive (on a thread of its own, once started).
                type Feed = Box<dyn FnOnce(crate::endpoint::Deliver) + Send>;
                let (wire, serve): (Box<dyn virtio::net::NetBackend>, Feed) = match backend {
                    NetBackend::Tap(name) => {
                        let tap = match end()? {
                            Some(fd) => crate::tap::Tap::from_fd(fd),
                            None => crate::tap::Tap::open(name)?,
                        };
                        let reader = tap.try_clone().map_err(|e| crate::tap::TapError {
                            name: name.clone(),
                            why: e.to_string(),
                        })?;
                        (
                            Box::new(tap),
                            Box::new(move |deliver| crate::tap::serve(reader, deliver)),
                        )
                    }
                    NetBackend::Socket(_) if remote => {
                        let fd = end()?.ok_or(OpenError::NoHostEnd(slot))?;
                        let link = crate::endpoint::Packets::new(fd);
                        (link.sender(), Box::new(move |deliver| link.serve(deliver)))
                    }
                    NetBackend::Socket(path) => {
                        let link = crate::endpoint::Link::new(path)?;
                        (link.sender(), Box::new(move |deliver| link.serve(deliver)))
                    }
                };
                let f = Arc::new(Mutex::new(virtio_pci(
                    d,
                    &mem,
                    signal,
                    virtio::net::Net::new(*mac, wire),
                )));
                let deliver = feed(&f, virtio::net::Net::receive);
                out.starters.push(Box::new(move || serve(deliver)));
                out.functions.push((at, Box::new(SharedFunction(f))));
            }
            DeviceKind::VirtioConsole { backend } => {
                let f = match backend {
                    ConsoleBackend::Stdio => {
                        let Some(w) = stdout.take() else {
                            out.skipped.push(format!(
                                "a second virtio-console on stdio (slot {}): only one can have it; give it backend = \"pty\" or a socket",
                                d.slot
                            ));
                            continue;
                        };
                        let f = Arc::new(Mutex::new(virtio_pci(
                            d,
                            &mem,
                            signal,
                            virtio::console::Console::new(w),
                        )));
                        out.console = Some(f.clone());
                        f
                    }
                    ConsoleBackend::Socket(path) => {
                        let s = match end()? {
                            Some(fd) => crate::endpoint::SocketConsole::from_listener(fd),
                            None => crate::endpoint::SocketConsole::bind(path)?,
                        };
                        let f = Arc::new(Mutex::new(virtio_pci(
                            d,
                            &mem,
                            signal,
                            virtio::console::Console::new(s.writer()),
                        )));
                        let deliver = feed(&f, virtio::console::Console::queue_input);
                        out.starters.push(Box::new(move || s.serve(deliver)));
                        if !remote {
                            log::info!(
                                "virtio-console (slot {}) on socket {}",
                                d.slot,
                                path.display()
                            );
                        }
                        f
                    }
                    ConsoleBackend::Pty => {
                        let p = match end()? {
                            Some(fd) => crate::endpoint::Pty::from_master(fd),
                            None => {
                                let p = crate::endpoint::Pty::open()?;
                                log::info!("virtio-console (slot {}) on {}", d.slot, p.name);
                                p
                            }
                        };
                        let f = Arc::new(Mutex::new(virtio_pci(
                            d,
                            &mem,
                            signal,
                            virtio::console::Console::new(p.writer()),
                        )));
                        let deliver = feed(&f, virtio::console::Console::queue_input);
                        out.starters.push(Box::new(move || p.serve(deliver)));
                        f
                    }
                };
                out.functions.push((at, Box::new(SharedFunction(f))));
            }
            // Served by another program; splitvirt is its vhost-user frontend (never placed
            // in the backend process: the program is already apart, and sees the pool alone).
            DeviceKind::VhostUser {
                socket,
                device_type,
                queues,
                queue_size,
            } => {
                let mut dev = vhost_frontend::VhostUserDevice::connect(
                    socket,
                    *device_type,
                    *queues,
                    *queue_size,
                )?;
                let fds = vhost(d);
                for (queue, kick) in fds.kicks.into_iter().enumerate() {
                    dev.use_kick(queue, kick);
                }
                dev.use_vector_calls(fds.calls);
                out.functions
                    .push((at, Box::new(virtio_pci(d, &mem, signal, dev))));
            }
            // splitvirt's own (the VMM builds them: vmm::connect, vmm::port, and
            // vmm::devices for virtio-pmem, whose region is a memslot).
            DeviceKind::Connector { .. }
            | DeviceKind::RpcPort { .. }
            | DeviceKind::VirtioPmem { .. } => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Resumed(bool);
    impl PciFunction for Resumed {
        fn config_read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0)
        }
        fn config_write(&mut self, _: u64, _: &[u8]) {}
        fn bar_address(&self, _: usize) -> Option<(u64, u64)> {
            None
        }
        fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
            data.fill(0)
        }
        fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
        fn resume(&mut self) {
            self.0 = true;
        }
    }

    /// A shared device taken over by a new backend resumes where its queues stood: the wrapper
    /// passes the resume on (it once dropped it, and virtio-net started its queues from 0).
    #[test]
    fn a_shared_function_passes_resume_on() {
        let inner = Arc::new(Mutex::new(Resumed::default()));
        let mut shared: Box<dyn PciFunction> = Box::new(SharedFunction(inner.clone()));
        shared.resume();
        assert!(inner.lock().unwrap().0);
    }
}
