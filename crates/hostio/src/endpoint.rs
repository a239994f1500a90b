//! Host ends of the guest's consoles and network links other than stdio and TAP: a Unix socket
//! console, a pseudo-terminal console, and a Unix socket that links the virtio-net devices of
//! two VMs. Each hands the device a writer and feeds the device from a thread of its own. Writes
//! never block a vCPU: with no reader, or a slow one, bytes and frames are dropped, as a serial
//! line or a cable with nothing at the other end would drop them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {why}")]
pub struct EndpointError {
    pub what: &'static str,
    pub path: String,
    pub why: String,
}

/// What a thread hands the device it feeds.
pub type Deliver = Box<dyn FnMut(&[u8]) + Send>;

/// Output kept for a console client that connects late (the boot messages, say).
const BACKLOG: usize = 64 << 10;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `send` without waiting and without SIGPIPE; false when the bytes did not all go.
fn send_now(fd: RawFd, bytes: &[u8]) -> bool {
    // SAFETY: a send on a descriptor we own, from a valid buffer.
    let n = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    n == bytes.len() as isize
}

/// Binds a Unix socket at `path`, replacing a stale one (a file nobody listens on) but never
/// one in use.
fn bind_unix(path: &Path, what: &'static str) -> Result<UnixListener, EndpointError> {
    let err = |why: String| EndpointError {
        what,
        path: path.display().to_string(),
        why,
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(err(
                "something already listens there (another splitvirt?); choose another path".into(),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
    }
    UnixListener::bind(path).map_err(|e| err(format!("cannot listen there: {e}")))
}

struct ConsoleState {
    client: Option<UnixStream>,
    backlog: VecDeque<u8>,
}

/// hvc0 on a Unix socket that splitvirt listens on (`splitvirt console PATH` attaches to it).
/// One client at a time; a new one replaces the old and first gets the recent output.
pub struct SocketConsole {
    listener: UnixListener,
    state: Arc<Mutex<ConsoleState>>,
}

impl SocketConsole {
    pub fn bind(path: &Path) -> Result<SocketConsole, EndpointError> {
        Ok(Self::from_listener(Self::bind_listener(path)?))
    }

    /// The listening socket alone, for a console served elsewhere (the backend).
    pub fn bind_listener(path: &Path) -> Result<OwnedFd, EndpointError> {
        Ok(bind_unix(path, "console socket")?.into())
    }

    /// A console on a socket that splitvirt listens on and handed over.
    pub fn from_listener(listener: OwnedFd) -> SocketConsole {
        SocketConsole {
            listener: UnixListener::from(listener),
            state: Arc::new(Mutex::new(ConsoleState {
                client: None,
                backlog: VecDeque::new(),
            })),
        }
    }

    pub fn writer(&self) -> Box<dyn Write + Send> {
        Box::new(SocketConsoleWriter(self.state.clone()))
    }

    /// Accepts clients and hands what they type to `deliver`.
    pub fn serve(self, deliver: Deliver) {
        let deliver = Arc::new(Mutex::new(deliver));
        std::thread::spawn(move || {
            for conn in self.listener.incoming() {
                let Ok(conn) = conn else { continue };
                let Ok(reader) = conn.try_clone() else {
                    continue;
                };
                {
                    let mut s = lock(&self.state);
                    let (a, b) = s.backlog.as_slices();
                    let _ = send_now(conn.as_raw_fd(), a) && send_now(conn.as_raw_fd(), b);
                    s.client = Some(conn);
                }
                let (deliver, state) = (deliver.clone(), self.state.clone());
                std::thread::spawn(move || {
                    let mut reader = reader;
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = reader.read(&mut buf) {
                        (lock(&deliver))(&buf[..n]);
                    }
                    let mut s = lock(&state);
                    let same = s.client.as_ref().is_some_and(|c| same_socket(c, &reader));
                    if same {
                        s.client = None;
                    }
                });
            }
        });
    }
}

fn same_socket(a: &UnixStream, b: &UnixStream) -> bool {
    let ino = |s: &UnixStream| {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: fstat through a File view that is forgotten, never closed.
        let f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(s.as_raw_fd()) });
        f.metadata().map(|m| m.ino()).ok()
    };
    ino(a).is_some() && ino(a) == ino(b)
}

struct SocketConsoleWriter(Arc<Mutex<ConsoleState>>);

impl Write for SocketConsoleWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut s = lock(&self.0);
        s.backlog.extend(bytes);
        let excess = s.backlog.len().saturating_sub(BACKLOG);
        s.backlog.drain(..excess);
        if let Some(c) = &s.client {
            let _ = send_now(c.as_raw_fd(), bytes);
        }
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// hvc0 on a new pseudo-terminal (`screen /dev/pts/N`). splitvirt keeps the terminal side open
/// itself, so nothing fails while no one has it open.
pub struct Pty {
    master: Arc<File>,
    /// None where splitvirt keeps it (the pty of a backend device).
    _terminal: Option<File>,
    pub name: String,
}

impl Pty {
    pub fn open() -> Result<Pty, EndpointError> {
        let (master, terminal, name) = Self::open_parts()?;
        Ok(Pty {
            master: Arc::new(File::from(master)),
            _terminal: Some(terminal),
            name,
        })
    }

    /// A pty whose master side splitvirt opened and handed over.
    pub fn from_master(master: OwnedFd) -> Pty {
        Pty {
            master: Arc::new(File::from(master)),
            _terminal: None,
            name: String::new(),
        }
    }

    /// A new pty in raw mode: (master side, terminal side, the terminal's name).
    pub fn open_parts() -> Result<(OwnedFd, File, String), EndpointError> {
        let err = |why: String| EndpointError {
            what: "pseudo-terminal",
            path: "/dev/ptmx".into(),
            why,
        };
        let last = |what: &str| err(format!("{what}: {}", io::Error::last_os_error()));
        // SAFETY: plain libc calls on a descriptor we own; ptsname_r writes into `name`.
        unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(last("posix_openpt"));
            }
            let master = File::from(OwnedFd::from_raw_fd(fd));
            if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
                return Err(last("grantpt/unlockpt"));
            }
            let mut name = [0 as libc::c_char; 128];
            if libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) != 0 {
                return Err(last("ptsname_r"));
            }
            let name = std::ffi::CStr::from_ptr(name.as_ptr())
                .to_string_lossy()
                .into_owned();
            let terminal = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags_noctty()
                .open(&name)
                .map_err(|e| err(format!("cannot open {name}: {e}")))?;
            // Raw: bytes pass as the guest wrote them, no echo, no line editing.
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(terminal.as_raw_fd(), &mut t) == 0 {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(terminal.as_raw_fd(), libc::TCSANOW, &t);
            }
            Ok((master.into(), terminal, name))
        }
    }

    pub fn writer(&self) -> Box<dyn Write + Send> {
        Box::new(PtyWriter(self.master.clone()))
    }

    pub fn serve(self, mut deliver: Deliver) {
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            let mut master = &*self.master;
            loop {
                match master.read(&mut buf) {
                    Ok(n @ 1..) => deliver(&buf[..n]),
                    // Only while nobody holds the terminal side: we do, so this is rare.
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
    }
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}
impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOCTTY)
    }
}

struct PtyWriter(Arc<File>);

impl Write for PtyWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        // A full terminal buffer (nobody reading) drops the rest rather than stall the guest.
        let mut p = [libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        }];
        // SAFETY: poll on one descriptor we own.
        if unsafe { libc::poll(p.as_mut_ptr(), 1, 0) } == 1 {
            let _ = (&*self.0).write(bytes);
        }
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A virtio-net link between two VMs over a Unix SOCK_SEQPACKET socket (one packet, one
/// frame). Whoever finds nobody listening at `path` listens there; the other connects. When the
/// peer goes away frames are dropped and the link waits for it (or another) to come back.
pub struct Link {
    path: PathBuf,
    peer: Arc<Mutex<Option<Arc<OwnedFd>>>>,
    /// What the link carries, for its log lines.
    what: &'static str,
    /// The first packet each side sends; a peer whose differs is refused.
    hello: Vec<u8>,
    offer: Option<Offer>,
}

/// Descriptors a link hands each peer right after the greeting, and what becomes of the
/// peer's (the same number of them, in one packet).
pub struct Offer {
    /// Ours, sent to every peer that attaches.
    pub fds: Vec<OwnedFd>,
    /// Takes the peer's descriptors when it attaches (an error refuses the peer) and None when
    /// it goes away.
    pub on_peer: PeerFds,
}

pub type PeerFds = Box<dyn FnMut(Option<Vec<OwnedFd>>) -> Result<(), String> + Send>;

/// The packet an offer's descriptors travel with.
const OFFER: &[u8] = b"splitvirt link fds";

// The SOCK_SEQPACKET helpers are the RPC setup's (one packet, one frame, there too).
use rpc::setup::{accept, connect as connect_seqpacket};

/// Listens at `path`, replacing whatever socket was there.
fn listen_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    rpc::setup::listen(path)
}

/// Holds `path.lock` for the connect-or-listen decision, so two VMs starting together do not
/// both listen.
struct DecisionLock(#[allow(dead_code)] File);

impl DecisionLock {
    fn take(path: &Path) -> io::Result<DecisionLock> {
        let mut p = path.as_os_str().to_owned();
        p.push(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(PathBuf::from(p))?;
        // SAFETY: flock on our own descriptor; released when the file closes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DecisionLock(f))
    }
}

impl Link {
    /// Checks that the link's directory is usable; the connection itself is made by `serve`.
    pub fn new(path: &Path) -> Result<Link, EndpointError> {
        Self::with_hello(path, "network link", b"splitvirt net link 1".to_vec())
    }

    /// A link that carries `what`, whose peers must greet each other with the same `hello`.
    pub fn with_hello(
        path: &Path,
        what: &'static str,
        hello: Vec<u8>,
    ) -> Result<Link, EndpointError> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(EndpointError {
                what,
                path: path.display().to_string(),
                why: format!("its directory {} does not exist", dir.display()),
            });
        }
        Ok(Link {
            path: path.to_owned(),
            peer: Arc::default(),
            what,
            hello,
            offer: None,
        })
    }

    /// The link hands `offer`'s descriptors to every peer and takes the peer's.
    pub fn offering(mut self, offer: Offer) -> Link {
        self.offer = Some(offer);
        self
    }

    /// Swaps descriptors with a greeted peer (5 s at most for its packet) and hands the peer's
    /// to the offer.
    fn swap_fds(offer: &mut Offer, conn: &OwnedFd) -> Result<(), String> {
        let ours: Vec<RawFd> = offer.fds.iter().map(AsRawFd::as_raw_fd).collect();
        rpc::setup::send_with_fds(conn, OFFER, &ours)
            .map_err(|e| format!("could not hand it our descriptors: {e}"))?;
        if !rpc::setup::readable_within(conn, Duration::from_secs(5)).unwrap_or(false) {
            return Err("it sent no descriptors within 5 s".into());
        }
        let mut buf = [0u8; 64];
        let (n, fds) = rpc::setup::recv_with_fds(conn, &mut buf, ours.len())
            .map_err(|e| format!("receiving its descriptors: {e}"))?;
        if buf[..n] != *OFFER || fds.len() != ours.len() {
            return Err(format!(
                "it sent {n} bytes and {} descriptors, not its {} descriptors",
                fds.len(),
                ours.len()
            ));
        }
        (offer.on_peer)(Some(fds))
    }

    /// Sends our greeting and checks the peer's (5 s at most).
    fn greet(&self, conn: &OwnedFd) -> Result<(), String> {
        if !send_now(conn.as_raw_fd(), &self.hello) {
            return Err("could not greet it".into());
        }
        let mut p = libc::pollfd {
            fd: conn.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one descriptor we own.
        if unsafe { libc::poll(&mut p, 1, 5000) } != 1 {
            return Err("it did not greet us within 5 s".into());
        }
        let mut buf = vec![0u8; self.hello.len() + 1];
        // SAFETY: recv into our buffer.
        let n = unsafe { libc::recv(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 || buf[..n as usize] != self.hello[..] {
            return Err(format!(
                "its greeting {:?} differs from ours {:?}",
                String::from_utf8_lossy(&buf[..n.max(0) as usize]),
                String::from_utf8_lossy(&self.hello)
            ));
        }
        Ok(())
    }

    pub fn sender(&self) -> Box<dyn virtio::net::NetBackend> {
        Box::new(self.handle())
    }

    /// A handle that sends like `send`, for use after `serve` took the link.
    pub fn handle(&self) -> LinkHandle {
        LinkHandle(self.peer.clone())
    }

    /// Connects (or listens, then accepts) and hands the peer's frames to `deliver`, again and
    /// again as peers come and go.
    pub fn serve(mut self, mut deliver: Deliver) {
        std::thread::spawn(move || {
            let shown = self.path.display().to_string();
            let mut listener: Option<OwnedFd> = None;
            loop {
                let conn = match &listener {
                    Some(l) => accept(l),
                    None => match self.rendezvous() {
                        Ok((fd, true)) => {
                            listener = Some(fd);
                            continue;
                        }
                        Ok((fd, false)) => Ok(fd),
                        Err(e) => Err(e),
                    },
                };
                let what = self.what;
                let conn = match conn {
                    Ok(c) => Arc::new(c),
                    Err(e) => {
                        ratelog::warn!("{what} {shown}: {e}; trying again");
                        listener = None;
                        std::thread::sleep(Duration::from_millis(500));
                        continue;
                    }
                };
                let swapped = |offer: &mut Option<Offer>| match offer {
                    Some(o) => Self::swap_fds(o, &conn),
                    None => Ok(()),
                };
                if let Err(why) = self.greet(&conn).and_then(|()| swapped(&mut self.offer)) {
                    ratelog::warn!("{what} {shown}: refused a peer: {why}");
                    drop(conn);
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                ratelog::info!("{what} {shown}: peer attached");
                *lock(&self.peer) = Some(conn.clone());
                let mut buf = vec![0u8; virtio::net::MAX_FRAME + 64];
                loop {
                    // SAFETY: recv into our buffer on our socket.
                    let n = unsafe {
                        libc::recv(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    if n <= 0 {
                        break;
                    }
                    deliver(&buf[..n as usize]);
                }
                *lock(&self.peer) = None;
                if let Some(o) = &mut self.offer {
                    let _ = (o.on_peer)(None);
                }
                ratelog::info!("{what} {shown}: peer went away; waiting for it");
            }
        });
    }

    /// Runs the link here and returns one end of a socket pair that carries its frames, one
    /// packet each: for a device served elsewhere (the backend, which could reach no socket
    /// path). The link's rendezvous and its peers' comings and goings stay here.
    pub fn relay(self) -> Result<OwnedFd, EndpointError> {
        let (ours, theirs) = rpc::setup::socketpair().map_err(|e| EndpointError {
            what: self.what,
            path: self.path.display().to_string(),
            why: format!("socketpair: {e}"),
        })?;
        let (ours, handle) = (Arc::new(ours), self.handle());
        let to_device = ours.clone();
        self.serve(Box::new(move |frame: &[u8]| {
            send_now(to_device.as_raw_fd(), frame);
        }));
        std::thread::spawn(move || {
            let mut buf = vec![0u8; virtio::net::MAX_FRAME + 64];
            loop {
                // SAFETY: recv into our buffer on our socket.
                let n =
                    unsafe { libc::recv(ours.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n <= 0 {
                    // splitvirt holds the device's end too: this is not a backend's death.
                    return;
                }
                handle.send(&buf[..n as usize]);
            }
        });
        Ok(theirs)
    }

    /// Connects to a listening peer, or listens when there is none: (socket, is_listener).
    fn rendezvous(&self) -> io::Result<(OwnedFd, bool)> {
        let _held = DecisionLock::take(&self.path)?;
        match connect_seqpacket(&self.path) {
            Ok(fd) => Ok((fd, false)),
            Err(_) => Ok((listen_seqpacket(&self.path)?, true)),
        }
    }
}

/// The device's side of a relayed link (`Link::relay`): one frame per packet each way.
pub struct Packets(Arc<OwnedFd>);

impl Packets {
    pub fn new(fd: OwnedFd) -> Packets {
        Packets(Arc::new(fd))
    }

    pub fn sender(&self) -> Box<dyn virtio::net::NetBackend> {
        Box::new(Packets(self.0.clone()))
    }

    /// Hands the frames that arrive to `deliver`, on a thread of its own.
    pub fn serve(self, mut deliver: Deliver) {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; virtio::net::MAX_FRAME + 64];
            loop {
                // SAFETY: recv into our buffer on our socket.
                let n = unsafe {
                    libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n <= 0 {
                    return;
                }
                deliver(&buf[..n as usize]);
            }
        });
    }
}

impl virtio::net::NetBackend for Packets {
    fn send(&mut self, frame: &[u8]) {
        send_now(self.0.as_raw_fd(), frame);
    }
}

/// Sends packets on a link whose thread runs.
#[derive(Clone)]
pub struct LinkHandle(Arc<Mutex<Option<Arc<OwnedFd>>>>);

impl LinkHandle {
    pub fn send(&self, packet: &[u8]) -> bool {
        lock(&self.0)
            .clone()
            .is_some_and(|fd| send_now(fd.as_raw_fd(), packet))
    }
}

impl virtio::net::NetBackend for LinkHandle {
    fn send(&mut self, frame: &[u8]) {
        LinkHandle::send(self, frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn collector() -> (Deliver, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel();
        (
            Box::new(move |b: &[u8]| {
                let _ = tx.send(b.to_vec());
            }),
            rx,
        )
    }

    fn until<T>(rx: &mpsc::Receiver<T>) -> T {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("nothing arrived within 10 s")
    }

    #[test]
    fn socket_console_replays_output_and_takes_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hvc.sock");
        let c = SocketConsole::bind(&path).unwrap();
        let mut w = c.writer();
        let (deliver, rx) = collector();
        c.serve(deliver);
        w.write_all(b"before anyone listened\n").unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = vec![0u8; 23];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, b"before anyone listened\n");
        client.write_all(b"typed").unwrap();
        assert_eq!(until(&rx), b"typed");
        // A second splitvirt may not take the same path while this one serves it.
        let e = SocketConsole::bind(&path).err().unwrap().to_string();
        assert!(e.contains("already listens"), "{e}");
    }

    #[test]
    fn stale_console_sockets_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hvc.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        SocketConsole::bind(&path).unwrap();
    }

    #[test]
    fn pty_console_carries_bytes_both_ways() {
        let p = Pty::open().unwrap();
        assert!(p.name.starts_with("/dev/pts/"), "{}", p.name);
        let mut term = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p.name)
            .unwrap();
        let mut w = p.writer();
        let (deliver, rx) = collector();
        p.serve(deliver);
        w.write_all(b"out\n").unwrap();
        let mut got = [0u8; 4];
        term.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out\n", "raw mode: no CR added");
        term.write_all(b"in").unwrap();
        let mut all = until(&rx);
        while all.len() < 2 {
            all.extend(until(&rx));
        }
        assert_eq!(all, b"in");
    }

    #[test]
    fn two_links_find_each_other_and_keep_frame_boundaries() {
        // The second end served here, or elsewhere through a relay (a backend's device).
        for relayed in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("net.sock");
            let mut ends = Vec::new();
            for i in 0..2 {
                let l = Link::new(&path).unwrap();
                let (deliver, rx) = collector();
                if relayed && i == 1 {
                    let device = Packets::new(l.relay().unwrap());
                    let tx = device.sender();
                    device.serve(deliver);
                    ends.push((tx, rx));
                } else {
                    let tx = l.sender();
                    l.serve(deliver);
                    ends.push((tx, rx));
                }
            }
            let (mut b, mut a) = (ends.pop().unwrap(), ends.pop().unwrap());
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let got = loop {
                a.0.send(&[1, 2, 3]);
                if let Ok(f) = b.1.recv_timeout(Duration::from_millis(50)) {
                    break f;
                }
                assert!(std::time::Instant::now() < deadline, "link never came up");
            };
            assert_eq!(got, [1, 2, 3]);
            b.0.send(&[9; 1500]);
            assert_eq!(until(&a.1), vec![9; 1500], "relayed: {relayed}");
        }
        let dir = tempfile::tempdir().unwrap();
        let e = Link::new(&dir.path().join("missing/net.sock"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn a_link_takes_back_a_peer_that_went_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.sock");
        let l = Link::new(&path).unwrap();
        let mut tx = l.sender();
        let (deliver, rx) = collector();
        l.serve(deliver);
        for round in 0u8..2 {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let peer = loop {
                if let Ok(p) = connect_seqpacket(&path) {
                    break p;
                }
                assert!(std::time::Instant::now() < deadline, "no listener");
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(send_now(peer.as_raw_fd(), b"splitvirt net link 1"));
            assert!(send_now(peer.as_raw_fd(), &[round; 60]));
            assert_eq!(until(&rx), vec![round; 60]);
            // The link knows the peer once its first frame arrived.
            tx.send(&[7, round]);
            let mut buf = [0u8; 64];
            // SAFETY: recv into a local buffer (the link's greeting first).
            let n = unsafe { libc::recv(peer.as_raw_fd(), buf.as_mut_ptr().cast(), 64, 0) };
            assert_eq!(&buf[..n as usize], b"splitvirt net link 1");
            // SAFETY: as above.
            let n = unsafe { libc::recv(peer.as_raw_fd(), buf.as_mut_ptr().cast(), 64, 0) };
            assert_eq!(&buf[..n as usize], &[7, round]);
            drop(peer);
        }
    }
}
