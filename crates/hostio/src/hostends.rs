//! The host ends of the backend's devices, opened by splitvirt and handed over as descriptors
//! (the jailed backend opens no path): a disk image (opened anew for each backend, so one
//! that changed the open file's flags passes nothing on), and, held by splitvirt for the VM's
//! life so that a restarted backend finds the same ones, a TAP, a console's listening socket,
//! a pty's master side, and one end of a socket pair for a network link, whose rendezvous and
//! reconnection splitvirt runs itself (the backend could reach no socket path).

use crate::devices::OpenError;
use layout::{ConsoleBackend, DeviceKind, Layout, NetBackend};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

enum End {
    Disk { image: PathBuf, read_only: bool },
    Held(OwnedFd),
}

/// The backend devices' host ends, by device slot.
pub struct HostEnds {
    ends: Vec<(u8, End)>,
    /// A pty's terminal side, kept open so that the master never reads EOF.
    _terminals: Vec<File>,
}

impl HostEnds {
    /// Opens what `l`'s backend devices need on the host, with the same errors an in-process
    /// device gives. Nothing for a device VM, whose devices' host ends are its own.
    pub fn open(l: &Layout) -> Result<HostEnds, OpenError> {
        let mut out = HostEnds {
            ends: Vec::new(),
            _terminals: Vec::new(),
        };
        for d in l.backend_devices().filter(|_| !l.rpc_device_vm) {
            let slot = d.slot as u8;
            let end = match &d.kind {
                DeviceKind::VirtioBlk {
                    image, read_only, ..
                } => End::Disk {
                    // Opened by `for_backend`, in splitvirt, before each backend starts.
                    image: image.clone(),
                    read_only: *read_only,
                },
                DeviceKind::VirtioNet { backend, .. } => match backend {
                    NetBackend::Tap(name) => End::Held(crate::tap::Tap::open(name)?.into()),
                    NetBackend::Socket(path) => {
                        End::Held(crate::endpoint::Link::new(path)?.relay()?)
                    }
                },
                DeviceKind::VirtioConsole { backend } => match backend {
                    ConsoleBackend::Stdio => continue,
                    ConsoleBackend::Socket(path) => {
                        log::info!("virtio-console (slot {slot}) on socket {}", path.display());
                        End::Held(crate::endpoint::SocketConsole::bind_listener(path)?)
                    }
                    ConsoleBackend::Pty => {
                        let (master, terminal, name) = crate::endpoint::Pty::open_parts()?;
                        log::info!("virtio-console (slot {slot}) on {name}");
                        out._terminals.push(terminal);
                        End::Held(master)
                    }
                },
                DeviceKind::Connector { .. }
                | DeviceKind::RpcPort { .. }
                | DeviceKind::VhostUser { .. }
                | DeviceKind::VirtioPmem { .. } => continue,
            };
            out.ends.push((slot, end));
        }
        Ok(out)
    }

    /// Descriptors for a backend about to start: (device slot, descriptor).
    pub fn for_backend(&self) -> Result<Vec<(u8, OwnedFd)>, OpenError> {
        self.ends
            .iter()
            .map(|(slot, end)| {
                let fd = match end {
                    End::Disk { image, read_only } => {
                        virtio::disk::open_file(image, *read_only)?.into()
                    }
                    End::Held(fd) => fd.try_clone().map_err(|e| OpenError::Dup {
                        slot: *slot,
                        fd: fd.as_raw_fd(),
                        source: e,
                    })?,
                };
                Ok((*slot, fd))
            })
            .collect()
    }
}
