//! The setup message (docs/RPC.md, "Setup"): one SOCK_SEQPACKET message from the VMM to the
//! backend with eight words and five descriptors (SCM_RIGHTS): the pool memfd, the control
//! region memfd, and three doorbell eventfds; then, when the hypervisor offers them, one
//! interrupt eventfd per MSI the guest may use and one notify eventfd per device whose queue
//! notifications the hypervisor catches itself; last, one descriptor per device for its host
//! end, opened by splitvirt (a disk image, a TAP, a listening console socket, a pty, a network
//! link), since the backend opens no path. Nothing else of the VMM crosses.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub const SETUP_MAGIC: u64 = u64::from_le_bytes(*b"svSETUP1");

#[derive(Debug)]
pub struct Setup {
    pub pool_base: u64,
    pub pool_size: u64,
    pub pool: OwnedFd,
    pub control: OwnedFd,
    pub to_backend: OwnedFd,
    /// Rung for interrupts and log lines.
    pub to_proxy: OwnedFd,
    /// Rung for replies (a vCPU waiting for its answer sleeps on it).
    pub to_proxy_replies: OwnedFd,
    /// MSIs the backend raises itself, without a message.
    pub msi: Option<MsiFds>,
    /// (device, eventfd): the hypervisor signals the eventfd when the guest notifies one of
    /// the device's queues (instead of a Write on the ring).
    pub notify: Vec<(u8, OwnedFd)>,
    /// (device, descriptor): the device's host end, which splitvirt opened.
    pub hosts: Vec<(u8, OwnedFd)>,
}

/// One eventfd per MSI target: a write of 1 to `fds[i]` raises interrupt `first + i`, which is
/// what an MSI write of `first + i` to `doorbell` (the MSI frame's set-SPI register) does.
#[derive(Debug)]
pub struct MsiFds {
    pub doorbell: u64,
    pub first: u32,
    pub fds: Vec<OwnedFd>,
}

impl MsiFds {
    /// The eventfd for an MSI write of `data` to `addr`, if it is one of ours.
    pub fn fd_for(&self, addr: u64, data: u32) -> Option<&OwnedFd> {
        if addr != self.doorbell {
            return None;
        }
        self.fds.get(data.checked_sub(self.first)? as usize)
    }

    /// Raises the interrupt an MSI write of `data` to `addr` asks for; false if it is not ours.
    pub fn raise(&self, addr: u64, data: u32) -> bool {
        let Some(fd) = self.fd_for(addr, data) else {
            return false;
        };
        let one = 1u64;
        // SAFETY: an 8-byte write from a local to an eventfd we own.
        unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) == 8 }
    }
}

const FDS: usize = 5;
/// At most this many MSI eventfds (SCM_RIGHTS carries up to 253 descriptors).
pub const MAX_MSI_FDS: usize = 128;
const WORDS: usize = 9;
/// Devices are PCI slots 0..32: the notify eventfds' devices are a bitmap in one word.
const MAX_DEVICES: u8 = 32;
const MAX_FDS: usize = FDS + MAX_MSI_FDS + 2 * MAX_DEVICES as usize;

/// A SOCK_SEQPACKET pair (close-on-exec): (VMM end, backend end).
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A `SOCK_SEQPACKET` socket (close-on-exec) with `path` as a Unix address.
fn seqpacket_at(path: &Path) -> io::Result<(OwnedFd, libc::sockaddr_un)> {
    // SAFETY: a new socket we own at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is new and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: a Unix socket path must be under {} bytes",
                path.display(),
                addr.sun_path.len()
            ),
        ));
    }
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    Ok((fd, addr))
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;

/// A listening setup socket at `path` (message boundaries kept, as with `socketpair`).
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    let (fd, addr) = seqpacket_at(path)?;
    // SAFETY: bind and listen on our socket with a filled address.
    let ok = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            ADDR_LEN,
        ) == 0
            && libc::listen(fd.as_raw_fd(), 8) == 0
    };
    if !ok {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The next connection on a socket from `listen`.
pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: accept4 returns a new descriptor we own, or -1.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The user id of the process at the other end of a connected Unix socket (as the kernel
/// recorded it when it connected: `SO_PEERCRED`, not anything the peer says).
pub fn peer_uid(sock: &OwnedFd) -> io::Result<u32> {
    // SAFETY: a zeroed ucred is valid; getsockopt fills at most `len` bytes of it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether something arrives on `sock` (or it closes) within `timeout`.
pub fn readable_within(sock: &OwnedFd, timeout: std::time::Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll on one pollfd of ours.
    match unsafe { libc::poll(&mut p, 1, ms) } {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// A setup socket connected to the listener at `path`.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let (fd, addr) = seqpacket_at(path)?;
    // SAFETY: connect our socket to a filled address.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            ADDR_LEN,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Per-device descriptors, one at most per device: (their devices as a bitmap, the
/// descriptors in device order).
fn by_device(what: &str, list: &[(u8, RawFd)]) -> io::Result<(u64, Vec<RawFd>)> {
    let mut list = list.to_vec();
    list.sort_by_key(|(dev, _)| *dev);
    let mut devices = 0u64;
    for (dev, _) in &list {
        if *dev >= MAX_DEVICES || devices & 1 << dev != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} for device {dev}, twice or out of range"),
            ));
        }
        devices |= 1 << dev;
    }
    Ok((devices, list.into_iter().map(|(_, fd)| fd).collect()))
}

/// Sends the setup: the pool, the five descriptors, optionally the MSI eventfds as
/// (doorbell address, first interrupt, descriptors), the notify eventfds as (device,
/// descriptor) and the devices' host ends as (device, descriptor).
pub fn send(
    sock: &OwnedFd,
    pool_base: u64,
    pool_size: u64,
    fds: [RawFd; FDS],
    msi: Option<(u64, u32, &[RawFd])>,
    notify: &[(u8, RawFd)],
    hosts: &[(u8, RawFd)],
) -> io::Result<()> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    let (doorbell, first, msi_fds) = msi.unwrap_or((0, 0, &[]));
    if msi_fds.len() > MAX_MSI_FDS {
        return Err(invalid(format!(
            "{} MSI eventfds; at most {MAX_MSI_FDS}",
            msi_fds.len()
        )));
    }
    let (devices, notify) = by_device("notify eventfd", notify)?;
    let (host_devices, hosts) = by_device("host end", hosts)?;
    let words: [u64; WORDS] = [
        SETUP_MAGIC,
        crate::shm::VERSION.into(),
        pool_base,
        pool_size,
        doorbell,
        u64::from(first),
        msi_fds.len() as u64,
        devices,
        host_devices,
    ];
    let fds: Vec<RawFd> = fds
        .iter()
        .chain(msi_fds)
        .copied()
        .chain(notify)
        .chain(hosts)
        .collect();
    let n = fds.len();
    let mut iov = libc::iovec {
        iov_base: words.as_ptr() as *mut libc::c_void,
        iov_len: std::mem::size_of_val(&words),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer in it refers to locals that outlive sendmsg.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN((n * std::mem::size_of::<RawFd>()) as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), n);
        if libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn recv(sock: &OwnedFd) -> io::Result<Setup> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut words = [0u64; WORDS];
    let mut iov = libc::iovec {
        iov_base: words.as_mut_ptr().cast(),
        iov_len: std::mem::size_of_val(&words),
    };
    // SAFETY: as in `send`.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut got = Vec::new();
    // SAFETY: recvmsg into locals; received descriptors are taken into OwnedFds at once.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    got.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        n as usize
    };
    if n != std::mem::size_of_val(&words) || words[0] != SETUP_MAGIC {
        return Err(bad("not a splitvirt setup message"));
    }
    if words[1] != u64::from(crate::shm::VERSION) {
        return Err(bad("setup message of another protocol version"));
    }
    let msi_count = words[6];
    let (devices, host_devices) = (words[7], words[8]);
    if msi_count > MAX_MSI_FDS as u64
        || devices >> MAX_DEVICES != 0
        || host_devices >> MAX_DEVICES != 0
        || got.len() as u64
            != FDS as u64
                + msi_count
                + u64::from(devices.count_ones())
                + u64::from(host_devices.count_ones())
    {
        return Err(bad(
            "setup message whose descriptors are not five and the eventfds it counts",
        ));
    }
    let first = u32::try_from(words[5]).map_err(|_| bad("MSI interrupt out of range"))?;
    let mut it = got.into_iter();
    let mut next = || it.next().expect("counted");
    let (pool, control, to_backend, to_proxy, to_proxy_replies) =
        (next(), next(), next(), next(), next());
    let msi_fds: Vec<OwnedFd> = it.by_ref().take(msi_count as usize).collect();
    let notify = (0..MAX_DEVICES)
        .filter(|d| devices & 1 << d != 0)
        .zip(it.by_ref())
        .collect();
    let hosts = (0..MAX_DEVICES)
        .filter(|d| host_devices & 1 << d != 0)
        .zip(it)
        .collect();
    Ok(Setup {
        pool_base: words[2],
        pool_size: words[3],
        pool,
        control,
        to_backend,
        to_proxy,
        to_proxy_replies,
        msi: (!msi_fds.is_empty()).then_some(MsiFds {
            doorbell: words[4],
            first,
            fds: msi_fds,
        }),
        notify,
        hosts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_cross_and_garbage_is_refused() {
        let (a, b) = socketpair().unwrap();
        let r = crate::shm::Region::create().unwrap();
        let bells: Vec<_> = (0..4)
            .map(|_| crate::shm::Doorbell::new().unwrap())
            .collect();
        send(
            &a,
            0x5000_0000,
            64 << 20,
            [
                bells[0].fd().as_raw_fd(),
                r.fd().as_raw_fd(),
                bells[1].fd().as_raw_fd(),
                bells[2].fd().as_raw_fd(),
                bells[3].fd().as_raw_fd(),
            ],
            None,
            &[],
            &[],
        )
        .unwrap();
        let s = recv(&b).unwrap();
        assert_eq!((s.pool_base, s.pool_size), (0x5000_0000, 64 << 20));
        assert!(s.msi.is_none());
        crate::shm::Region::open(s.control).unwrap();
        // SAFETY: a plain write of garbage on our socket.
        unsafe { libc::send(a.as_raw_fd(), b"hello".as_ptr().cast(), 5, 0) };
        assert!(recv(&b).is_err());
    }
}

#[cfg(test)]
mod msi_tests {
    use super::*;
    use crate::shm::{Doorbell, Region};

    #[test]
    fn msi_eventfds_cross_and_only_their_own_writes_raise_them() {
        let (a, b) = socketpair().unwrap();
        let r = Region::create().unwrap();
        let bells: Vec<_> = (0..7).map(|_| Doorbell::new().unwrap()).collect();
        let base = [
            bells[0].fd().as_raw_fd(),
            r.fd().as_raw_fd(),
            bells[1].fd().as_raw_fd(),
            bells[2].fd().as_raw_fd(),
            bells[3].fd().as_raw_fd(),
        ];
        let msi = [
            bells[4].fd().as_raw_fd(),
            bells[5].fd().as_raw_fd(),
            bells[6].fd().as_raw_fd(),
        ];
        let notify = [
            (5, bells[4].fd().as_raw_fd()),
            (2, bells[5].fd().as_raw_fd()),
        ];
        let hosts = [(7, bells[6].fd().as_raw_fd())];
        send(
            &a,
            0,
            1 << 20,
            base,
            Some((0x0802_0040, 80, &msi)),
            &notify,
            &hosts,
        )
        .unwrap();
        let s = recv(&b).unwrap();
        // Notify eventfds come back by device, in device order; host ends after them.
        let devs: Vec<u8> = s.notify.iter().map(|(d, _)| *d).collect();
        assert_eq!(devs, [2, 5]);
        assert_eq!(s.hosts.len(), 1);
        assert_eq!(s.hosts[0].0, 7);
        bells[5].ring();
        let slot2 = Doorbell::from_fd(s.notify[0].1.try_clone().unwrap());
        assert!(slot2.wait(Some(std::time::Duration::ZERO)));
        let m = s.msi.unwrap();
        assert_eq!((m.doorbell, m.first, m.fds.len()), (0x0802_0040, 80, 3));
        assert!(m.raise(0x0802_0040, 81));
        assert!(
            bells[5].wait(Some(std::time::Duration::ZERO)),
            "interrupt 81's eventfd"
        );
        assert!(!bells[4].wait(Some(std::time::Duration::ZERO)));
        // Another address, or an interrupt outside the range, is not ours to raise.
        for (addr, data) in [
            (0x0802_0044, 81),
            (0x0802_0040, 79),
            (0x0802_0040, 83),
            (0x0802_0040, u32::MAX),
        ] {
            assert!(!m.raise(addr, data), "{addr:#x} {data}");
        }
        // A count that does not match the descriptors is refused.
        let too_many: Vec<RawFd> = (0..MAX_MSI_FDS + 1).map(|_| msi[0]).collect();
        assert!(send(&a, 0, 1 << 20, base, Some((0, 80, &too_many)), &[], &[]).is_err());
        assert!(send(&a, 0, 1 << 20, base, None, &[(32, msi[0])], &[]).is_err());
        assert!(send(&a, 0, 1 << 20, base, None, &[(3, msi[0]), (3, msi[1])], &[]).is_err());
        assert!(send(&a, 0, 1 << 20, base, None, &[], &[(3, msi[0]), (3, msi[1])]).is_err());
    }
}
