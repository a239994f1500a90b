//! The setup message (docs/RPC.md, "Setup"): one SOCK_SEQPACKET message from the VMM to the
//! backend with eleven words and five descriptors (SCM_RIGHTS): the pool memfd, the control
//! region memfd, and three doorbell eventfds; then, when the hypervisor offers them, one
//! interrupt eventfd per MSI-X vector of each of the backend's devices (routed by the VMM to
//! whatever the guest programmed that vector with, so a device can raise its own vectors and
//! no others) and one notify eventfd per device whose queue notifications the hypervisor
//! catches itself; last, one descriptor per device for its host
//! end, opened by splitvirt (a disk image, a TAP, a listening console socket, a pty, a network
//! link), since the backend opens no path. Nothing else of the VMM crosses.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub const SETUP_MAGIC: u64 = u64::from_le_bytes(*b"svSETUP1");

#[derive(Debug)]
pub struct Setup {
    /// The message's words as they came (a device VM's rpc-port shows them to its guest).
    pub words: [u64; WORDS],
    pub pool_base: u64,
    pub pool_size: u64,
    pub pool: OwnedFd,
    pub control: OwnedFd,
    pub to_backend: OwnedFd,
    /// Rung for interrupts and log lines.
    pub to_proxy: OwnedFd,
    /// Rung for replies (a vCPU waiting for its answer sleeps on it).
    pub to_proxy_replies: OwnedFd,
    /// MSIs the backend's devices raise themselves, without a message.
    pub msi: Option<MsiFds>,
    /// (device, eventfd): the hypervisor signals the eventfd when the guest notifies one of
    /// the device's queues (instead of a Write on the ring).
    pub notify: Vec<(u8, OwnedFd)>,
    /// (device, descriptor): the device's host end, which splitvirt opened.
    pub hosts: Vec<(u8, OwnedFd)>,
}

/// Per device, one eventfd per MSI-X vector: a write of 1 to a device's `fds[v]` raises the
/// interrupt the guest programmed into that device's vector `v` (the VMM routes each eventfd
/// in the hypervisor, and moves it when the guest reprograms the vector). A device has no
/// eventfd of any other device's vectors.
#[derive(Debug, Default)]
pub struct MsiFds {
    pub devices: Vec<(u8, Vec<OwnedFd>)>,
}

impl MsiFds {
    /// The eventfd of device `dev`'s vector `vector`, if there is one.
    pub fn fd_for(&self, dev: u8, vector: u16) -> Option<&OwnedFd> {
        let (_, fds) = self.devices.iter().find(|(d, _)| *d == dev)?;
        fds.get(usize::from(vector))
    }

    /// Raises device `dev`'s vector `vector`; false if it has no eventfd for it.
    pub fn raise(&self, dev: u8, vector: u16) -> bool {
        let Some(fd) = self.fd_for(dev, vector) else {
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
/// Magic, version, pool base and size, MSI eventfds in all, the notify and host-end bitmaps,
/// then the MSI eventfds per device slot (one byte each, four words).
pub const WORDS: usize = 11;
/// At most this many MSI-X vectors per device (a byte counts them).
pub const MAX_VECTORS: usize = 255;
/// Devices are PCI slots 0..32: the notify eventfds' devices are a bitmap in one word.
const MAX_DEVICES: u8 = 32;
const MAX_FDS: usize = FDS + MAX_MSI_FDS + 2 * MAX_DEVICES as usize;

/// Has `cmd`'s process get `fd` as its descriptor 3 (where the backend takes its setup
/// socket), open across exec. dup2 onto itself would leave close-on-exec set: it is cleared
/// by hand then.
pub fn pass_as_fd3(cmd: &mut std::process::Command, fd: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 and fcntl.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

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

/// Sends the setup: the pool, the five descriptors, the MSI eventfds as (device, one per
/// vector), the notify eventfds as (device, descriptor) and the devices' host ends as
/// (device, descriptor).
pub fn send(
    sock: &OwnedFd,
    pool_base: u64,
    pool_size: u64,
    fds: [RawFd; FDS],
    msi: &[(u8, Vec<RawFd>)],
    notify: &[(u8, RawFd)],
    hosts: &[(u8, RawFd)],
) -> io::Result<()> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    let mut counts = [0u8; MAX_DEVICES as usize];
    let mut msi = msi.to_vec();
    msi.sort_by_key(|(dev, _)| *dev);
    for (dev, v) in &msi {
        let c = counts.get_mut(usize::from(*dev)).filter(|c| **c == 0);
        match c {
            Some(c) if !v.is_empty() && v.len() <= MAX_VECTORS => *c = v.len() as u8,
            _ => {
                return Err(invalid(format!(
                    "MSI eventfds for device {dev}: {} of them, twice or out of range",
                    v.len()
                )))
            }
        }
    }
    let msi_fds: Vec<RawFd> = msi.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    if msi_fds.len() > MAX_MSI_FDS {
        return Err(invalid(format!(
            "{} MSI eventfds; at most {MAX_MSI_FDS}",
            msi_fds.len()
        )));
    }
    let (devices, notify) = by_device("notify eventfd", notify)?;
    let (host_devices, hosts) = by_device("host end", hosts)?;
    let count_word = |i: usize| u64::from_le_bytes(counts[8 * i..8 * i + 8].try_into().unwrap());
    let words: [u64; WORDS] = [
        SETUP_MAGIC,
        crate::shm::VERSION.into(),
        pool_base,
        pool_size,
        msi_fds.len() as u64,
        devices,
        host_devices,
        count_word(0),
        count_word(1),
        count_word(2),
        count_word(3),
    ];
    let fds: Vec<RawFd> = fds
        .iter()
        .chain(&msi_fds)
        .copied()
        .chain(notify)
        .chain(hosts)
        .collect();
    send_with_fds(sock, words_bytes(&words), &fds)
}

fn words_bytes(words: &[u64; WORDS]) -> &[u8] {
    // SAFETY: u64s viewed as their bytes, for as long as the words live.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), std::mem::size_of_val(words)) }
}

/// Sends `bytes` as one packet with `fds` attached (SCM_RIGHTS).
pub fn send_with_fds(sock: &impl AsRawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let (n, fd_bytes) = (fds.len(), std::mem::size_of_val(fds) as u32);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer in it refers to locals that outlive sendmsg.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if n > 0 {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), n);
        }
        if libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives one packet into `buf` with up to `max_fds` descriptors (close-on-exec, owned at
/// once; more than that are closed by the kernel): (bytes, descriptors).
pub fn recv_with_fds(
    sock: &impl AsRawFd,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in `send_with_fds`.
    let space =
        unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<RawFd>()) as u32) } as usize;
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
    Ok((n, got))
}

pub fn recv(sock: &OwnedFd) -> io::Result<Setup> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut words = [0u64; WORDS];
    // SAFETY: the words viewed as their bytes while recv_with_fds fills them.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            words.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(&words),
        )
    };
    let (n, got) = recv_with_fds(sock, bytes, MAX_FDS)?;
    if n != std::mem::size_of_val(&words) || words[0] != SETUP_MAGIC {
        return Err(bad("not a splitvirt setup message"));
    }
    if words[1] != u64::from(crate::shm::VERSION) {
        return Err(bad("setup message of another protocol version"));
    }
    let (msi_count, devices, host_devices) = (words[4], words[5], words[6]);
    let counts: Vec<u8> = words[7..11].iter().flat_map(|w| w.to_le_bytes()).collect();
    if msi_count > MAX_MSI_FDS as u64
        || counts.iter().map(|&c| u64::from(c)).sum::<u64>() != msi_count
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
    let mut it = got.into_iter();
    let mut next = || it.next().expect("counted");
    let (pool, control, to_backend, to_proxy, to_proxy_replies) =
        (next(), next(), next(), next(), next());
    let msi_devices: Vec<(u8, Vec<OwnedFd>)> = (0..MAX_DEVICES)
        .zip(&counts)
        .filter(|(_, &c)| c > 0)
        .map(|(d, &c)| (d, it.by_ref().take(usize::from(c)).collect()))
        .collect();
    let notify = (0..MAX_DEVICES)
        .filter(|d| devices & 1 << d != 0)
        .zip(it.by_ref())
        .collect();
    let hosts = (0..MAX_DEVICES)
        .filter(|d| host_devices & 1 << d != 0)
        .zip(it)
        .collect();
    Ok(Setup {
        words,
        pool_base: words[2],
        pool_size: words[3],
        pool,
        control,
        to_backend,
        to_proxy,
        to_proxy_replies,
        msi: (!msi_devices.is_empty()).then_some(MsiFds {
            devices: msi_devices,
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
            &[],
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
    fn each_device_gets_eventfds_for_its_own_vectors_only() {
        let (a, b) = socketpair().unwrap();
        let r = Region::create().unwrap();
        let bells: Vec<_> = (0..9).map(|_| Doorbell::new().unwrap()).collect();
        let fd = |i: usize| bells[i].fd().as_raw_fd();
        let base = [fd(0), r.fd().as_raw_fd(), fd(1), fd(2), fd(3)];
        // Device 5 has two vectors, device 2 three.
        let msi = [(5, vec![fd(4), fd(5)]), (2, vec![fd(6), fd(7), fd(8)])];
        let notify = [(5, fd(4)), (2, fd(5))];
        let hosts = [(7, fd(6))];
        send(&a, 0, 1 << 20, base, &msi, &notify, &hosts).unwrap();
        let s = recv(&b).unwrap();
        // Notify eventfds come back by device, in device order; host ends after them.
        let devs: Vec<u8> = s.notify.iter().map(|(d, _)| *d).collect();
        assert_eq!(devs, [2, 5]);
        assert_eq!(s.hosts.len(), 1);
        assert_eq!(s.hosts[0].0, 7);
        let m = s.msi.unwrap();
        let shape: Vec<(u8, usize)> = m.devices.iter().map(|(d, v)| (*d, v.len())).collect();
        assert_eq!(shape, [(2, 3), (5, 2)]);
        let now = Some(std::time::Duration::ZERO);
        assert!(m.raise(5, 1));
        assert!(bells[5].wait(now), "device 5's vector 1");
        assert!(m.raise(2, 2));
        assert!(bells[8].wait(now), "device 2's vector 2");
        assert!(!bells[4].wait(now) && !bells[6].wait(now) && !bells[7].wait(now));
        // Another device's vector, or one past a device's table, is not a device's to raise.
        assert!(!m.raise(5, 2));
        assert!(!m.raise(3, 0));
        assert!(!m.raise(2, u16::MAX));
        // A count that does not match the descriptors is refused.
        let too_many: Vec<RawFd> = (0..MAX_MSI_FDS + 1).map(|_| fd(4)).collect();
        assert!(send(&a, 0, 1 << 20, base, &[(1, too_many)], &[], &[]).is_err());
        assert!(send(&a, 0, 1 << 20, base, &[(1, vec![])], &[], &[]).is_err());
        assert!(send(&a, 0, 1 << 20, base, &[(32, vec![fd(4)])], &[], &[]).is_err());
        let twice = [(1, vec![fd(4)]), (1, vec![fd(5)])];
        assert!(send(&a, 0, 1 << 20, base, &twice, &[], &[]).is_err());
        assert!(send(&a, 0, 1 << 20, base, &[], &[(32, fd(4))], &[]).is_err());
        assert!(send(&a, 0, 1 << 20, base, &[], &[(3, fd(4)), (3, fd(5))], &[]).is_err());
        assert!(send(&a, 0, 1 << 20, base, &[], &[], &[(3, fd(4)), (3, fd(5))]).is_err());
    }
}
