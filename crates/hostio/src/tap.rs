//! A TAP interface as the wire of a virtio-net device: no packet info (IFF_NO_PI) but a
//! virtio_net_hdr in front of every packet (IFF_VNET_HDR, 12 bytes), so that what the guest
//! sends with checksum and segmentation offloads goes to the host kernel as it is, which
//! finishes it. Toward the guest no offload is asked for (TUNSETOFFLOAD 0): frames arrive
//! whole and checksummed, and a thread hands them to the device without their header.
//! splitvirt opens the TAP and sets it up; a backend given its descriptor takes it as it is.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use virtio::net::{NetBackend, HDR, MAX_FRAME};

#[derive(Debug, thiserror::Error)]
#[error("TAP interface {name}: {why}")]
pub struct TapError {
    pub name: String,
    pub why: String,
}

pub struct Tap {
    file: File,
}

impl Tap {
    /// Opens (creating if needed) the TAP interface `name` (at most 15 bytes).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let err = |why: String| TapError {
            name: name.into(),
            why,
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(err(format!(
                "the name must be 1 to {} bytes",
                libc::IFNAMSIZ - 1
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| {
                err(match e.kind() {
                    std::io::ErrorKind::NotFound => format!(
                        "cannot open /dev/net/tun: {e}; load the tun module (`modprobe tun`), or \
                         use backend = \"socket:PATH\" to link this VM to another without a TAP"
                    ),
                    _ => format!(
                        "cannot open /dev/net/tun: {e}; run splitvirt as root or with \
                         CAP_NET_ADMIN, or create the interface beforehand for this user \
                         (`ip tuntap add {name} mode tap user $USER`)"
                    ),
                })
            })?;
        // SAFETY: ifreq is plain data; zeroed is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads the ifreq we own, on the tun fd we own.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &ifr) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            let fix = if e.kind() == std::io::ErrorKind::PermissionDenied {
                format!(
                    "; creating a TAP needs CAP_NET_ADMIN: run splitvirt as root, or create it \
                     beforehand for this user (`ip tuntap add {name} mode tap user $USER`)"
                )
            } else {
                String::new()
            };
            return Err(err(format!("TUNSETIFF: {e}{fix}")));
        }
        let hdr = HDR as libc::c_int;
        // SAFETY: both ioctls read an int (by pointer, by value) on the tun fd we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0
            || unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_uint) } < 0
        {
            let e = std::io::Error::last_os_error();
            return Err(err(format!("setting up its virtio_net_hdr: {e}")));
        }
        Ok(Tap { file })
    }

    /// A TAP that splitvirt opened and handed over.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Tap {
        Tap {
            file: File::from(fd),
        }
    }

    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
        })
    }

    /// Blocks for the next frame; returns where it is in `buf` (after its header).
    pub fn read_frame(
        &mut self,
        buf: &mut [u8; HDR + MAX_FRAME + 64],
    ) -> std::io::Result<std::ops::Range<usize>> {
        let n = self.file.read(buf)?;
        Ok(HDR.min(n)..n)
    }
}

impl From<Tap> for std::os::fd::OwnedFd {
    fn from(t: Tap) -> Self {
        t.file.into()
    }
}

/// Frames from the TAP to the device, on a thread of their own.
pub fn serve(mut tap: Tap, mut deliver: crate::endpoint::Deliver) {
    std::thread::spawn(move || {
        let mut buf = [0u8; HDR + MAX_FRAME + 64];
        while let Ok(frame) = tap.read_frame(&mut buf) {
            if !frame.is_empty() {
                deliver(&buf[frame]);
            }
        }
    });
}

impl NetBackend for Tap {
    fn send(&mut self, packet: &[u8]) {
        // A packet the host cannot take (a header it refuses, say) is lost, as on a real wire.
        let _ = self.file.write(packet);
    }
    fn offloads(&self) -> bool {
        true
    }
}
