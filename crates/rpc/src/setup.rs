//! The setup message (docs/RPC.md, "Setup"): one SOCK_SEQPACKET message from the VMM to the
//! backend with four words and five descriptors (SCM_RIGHTS): the pool memfd, the control
//! region memfd, and three doorbell eventfds. Nothing else of the VMM crosses.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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
}

const FDS: usize = 5;

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

pub fn send(sock: &OwnedFd, pool_base: u64, pool_size: u64, fds: [RawFd; FDS]) -> io::Result<()> {
    let words = [
        SETUP_MAGIC,
        crate::shm::VERSION.into(),
        pool_base,
        pool_size,
    ];
    let mut iov = libc::iovec {
        iov_base: words.as_ptr() as *mut libc::c_void,
        iov_len: std::mem::size_of_val(&words),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
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
        (*c).cmsg_len = libc::CMSG_LEN((FDS * std::mem::size_of::<RawFd>()) as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), FDS);
        if libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn recv(sock: &OwnedFd) -> io::Result<Setup> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut words = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: words.as_mut_ptr().cast(),
        iov_len: std::mem::size_of_val(&words),
    };
    // SAFETY: as in `send`.
    let space = unsafe { libc::CMSG_SPACE((FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
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
    if got.len() != FDS {
        return Err(bad("setup message without its five descriptors"));
    }
    let mut it = got.into_iter();
    let mut next = || it.next().expect("counted");
    Ok(Setup {
        pool_base: words[2],
        pool_size: words[3],
        pool: next(),
        control: next(),
        to_backend: next(),
        to_proxy: next(),
        to_proxy_replies: next(),
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
        )
        .unwrap();
        let s = recv(&b).unwrap();
        assert_eq!((s.pool_base, s.pool_size), (0x5000_0000, 64 << 20));
        crate::shm::Region::open(s.control).unwrap();
        // SAFETY: a plain write of garbage on our socket.
        unsafe { libc::send(a.as_raw_fd(), b"hello".as_ptr().cast(), 5, 0) };
        assert!(recv(&b).is_err());
    }
}
