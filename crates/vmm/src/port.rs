//! A device VM's rpc-port on its VMM's side (docs/ARCHITECTURE.md, "The device VM"): the
//! driver VM's splitvirt connects to the port's socket and sends the setup it would send a
//! backend process (docs/RPC.md), with no host ends. This side checks it (the pool the size the
//! port was given, both memfds sealed, every doorbell an eventfd) and wires it into the device
//! VM through the hypervisor, so that nothing of either splitvirt runs on the data path:
//! - the control region and the pool become memslots at BARs 2 and 4 (moved with the BARs);
//! - the driver's to-backend doorbell and queue notify eventfds become irqfds of the port's
//!   MSI-X vector (wherever the guest routes it);
//! - the driver's events, replies and MSI eventfds become ioeventfds at BAR 0's doorbells: a
//!   store there signals the driver VM's eventfd, which its KVM turns into the interrupt.
//!
//! One driver VM at a time: another that connects meanwhile is turned away. When the driver
//! VM's splitvirt hangs up (or dies), everything is taken out of the guest again (memslots
//! first, then this process's mappings) and the port waits for the next one, which may be the
//! same driver VM reconnecting to a restarted device VM, or a new one.

use crate::connect::HostMemory;
use crate::msiroute::{Ioeventfds, Irqfds};
use layout::layout::V2m;
use pci::msix::Message;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a driver VM's splitvirt has to send its setup once connected.
const SETUP_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("rpc-port {socket}: {why}")]
    Setup { socket: PathBuf, why: String },
    #[error("rpc-port: cannot set aside {size} bytes of address space for the driver VM's memory: {source}")]
    Reserve { size: u64, source: io::Error },
}

/// Address space of this process set aside for a driver VM's memory: nothing (PROT_NONE)
/// until its memfd is mapped over it, so that the memslot's host address never changes.
struct Reserved {
    addr: u64,
    size: u64,
}

impl Reserved {
    fn new(size: u64) -> Result<Reserved, PortError> {
        let p = reserve(std::ptr::null_mut(), size, 0);
        if p == libc::MAP_FAILED {
            return Err(PortError::Reserve {
                size,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Reserved {
            addr: p as u64,
            size,
        })
    }

    fn host(&self) -> HostMemory {
        HostMemory {
            addr: self.addr,
            size: self.size,
            read_only: false,
        }
    }

    /// Maps `fd` (sealed at exactly our size: checked before) over the reservation.
    fn map(&self, fd: &OwnedFd) -> io::Result<()> {
        // SAFETY: replaces our own reservation, whose address nothing else uses.
        let p = unsafe {
            libc::mmap(
                self.addr as *mut libc::c_void,
                self.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Lets go of the driver's memory (once no memslot holds it).
    fn clear(&self) {
        let p = reserve(self.addr as *mut libc::c_void, self.size, libc::MAP_FIXED);
        if p == libc::MAP_FAILED {
            ratelog::error!(
                "rpc-port: cannot let go of a driver VM's memory: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Address space with nothing behind it (`flags`: MAP_FIXED to put it over a mapping of ours).
fn reserve(at: *mut libc::c_void, size: u64, flags: libc::c_int) -> *mut libc::c_void {
    // SAFETY: a private anonymous mapping; with MAP_FIXED only over our own reservation.
    unsafe {
        libc::mmap(
            at,
            size as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | flags,
            -1,
            0,
        )
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.size as usize) };
    }
}

/// A connected driver VM: what it sent, split by direction.
struct Driver {
    words: [u64; rpc::setup::WORDS],
    /// To the port's vector: its to-backend doorbell, then its queue notify eventfds.
    incoming: Vec<OwnedFd>,
    /// BAR 0's doorbells, in order: its events and replies doorbells, then its MSI eventfds.
    outgoing: Vec<rpc::Doorbell>,
}

/// Where the guest has put things, who is connected, and what the hypervisor holds now.
struct State {
    bars: [Option<u64>; 3],
    /// The GSI the guest routed the vector to.
    vector: Option<u32>,
    driver: Option<Arc<Driver>>,
    connections: u32,
    control_slot: Box<dyn FnMut(Option<u64>) + Send>,
    pool_slot: Box<dyn FnMut(Option<u64>) + Send>,
    slots_at: [Option<u64>; 2],
    irq_at: Option<(u32, Arc<Driver>)>,
    bells_at: Option<(u64, Arc<Driver>)>,
}

/// What the port takes from the hypervisor.
pub struct PortHv<'a> {
    pub irqfds: Option<Box<dyn Irqfds>>,
    pub ioeventfds: Option<Box<dyn Ioeventfds>>,
    /// A memslot holding the given memory: its mover (`Hypervisor::memslot`).
    pub memslot: &'a dyn Fn(u32, HostMemory) -> Box<dyn FnMut(Option<u64>) + Send>,
}

/// The port's wiring: the model's `Driver` and `Interrupt`, and the listener's state.
pub struct Wiring {
    socket: PathBuf,
    pool_size: u64,
    frame: Option<V2m>,
    irqfds: Option<Box<dyn Irqfds>>,
    ioeventfds: Option<Box<dyn Ioeventfds>>,
    control: Reserved,
    pool: Reserved,
    state: Mutex<State>,
}

/// Memslots of rpc-ports' control regions: this plus the function's devfn; pools follow.
pub const PORT_SLOTS: u32 = crate::machine::EVENT_PAGE_SLOTS + 256;

impl Wiring {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// BAR `index` (0, 2 or 4) now decodes at `at`.
    pub fn bar_at(&self, index: usize, at: Option<u64>) {
        let mut s = self.lock();
        s.bars[index / 2] = at;
        self.sync(&mut s);
    }

    /// Brings the hypervisor in line with the state: memslots, irqfds and ioeventfds.
    fn sync(&self, s: &mut State) {
        let driver = s.driver.clone();
        let want = [s.bars[1], s.bars[2]].map(|at| at.filter(|_| driver.is_some()));
        if want[0] != s.slots_at[0] {
            (s.control_slot)(want[0]);
        }
        if want[1] != s.slots_at[1] {
            (s.pool_slot)(want[1]);
        }
        s.slots_at = want;
        let same = |a: &Option<(u64, Arc<Driver>)>, b: &Option<(u64, Arc<Driver>)>| match (a, b) {
            (Some((x, p)), Some((y, q))) => x == y && Arc::ptr_eq(p, q),
            (None, None) => true,
            _ => false,
        };
        if let Some(hv) = &self.irqfds {
            let want = s.vector.zip(driver.clone()).map(|(g, d)| (u64::from(g), d));
            let now = s.irq_at.clone().map(|(g, d)| (u64::from(g), d));
            if !same(&want, &now) {
                if let Some((gsi, d)) = s.irq_at.take() {
                    for fd in &d.incoming {
                        let _ = hv.detach(fd.as_raw_fd(), gsi);
                    }
                }
                if let Some((gsi, d)) = want {
                    let fds: Vec<RawFd> = d.incoming.iter().map(|f| f.as_raw_fd()).collect();
                    let at = crate::msiroute::reroute(
                        &**hv,
                        &fds,
                        None,
                        Some(gsi as u32),
                        format_args!("the rpc-port's vector"),
                    );
                    s.irq_at = at.map(|g| (g, d));
                }
            }
        }
        if let Some(hv) = &self.ioeventfds {
            let want = s.bars[0].zip(driver);
            if !same(&want, &s.bells_at) {
                if let Some((bar0, d)) = s.bells_at.take() {
                    for (i, bell) in d.outgoing.iter().enumerate() {
                        let _ = hv.detach(bell.fd().as_raw_fd(), doorbell(bar0, i));
                    }
                }
                if let Some((bar0, d)) = want {
                    for (i, bell) in d.outgoing.iter().enumerate() {
                        // Not fatal: the write then exits, and `ring` signals it.
                        if let Err(e) = hv.attach(bell.fd().as_raw_fd(), doorbell(bar0, i)) {
                            ratelog::warn!(
                                "the hypervisor will not catch the rpc-port's doorbell {i}: {e}"
                            );
                        }
                    }
                    s.bells_at = Some((bar0, d));
                }
            }
        }
    }

    /// Checks a driver VM's setup and maps it into the guest.
    fn take(&self, sock: &OwnedFd) -> Result<(), String> {
        if !rpc::setup::readable_within(sock, SETUP_WITHIN).map_err(|e| e.to_string())? {
            return Err(format!("it sent no setup within {SETUP_WITHIN:?}"));
        }
        let s = rpc::setup::recv(sock).map_err(|e| e.to_string())?;
        if s.pool_size != self.pool_size {
            return Err(format!(
                "its pool is {} bytes; this port's pool_size is {}: make them equal",
                s.pool_size, self.pool_size
            ));
        }
        if !s.hosts.is_empty() {
            return Err(format!(
                "it sent {} host ends: a driver VM served by a device VM names it with \
                 [backend] device_vm, and its device VM opens its devices' files",
                s.hosts.len()
            ));
        }
        rpc::shm::check_sealed(&s.pool, self.pool_size, "its pool").map_err(|e| e.to_string())?;
        rpc::shm::check_sealed(&s.control, rpc::shm::SIZE as u64, "its control region")
            .map_err(|e| e.to_string())?;
        let incoming: Vec<OwnedFd> = std::iter::once(s.to_backend)
            .chain(s.notify.into_iter().map(|(_, fd)| fd))
            .collect();
        let outgoing: Vec<OwnedFd> = [s.to_proxy, s.to_proxy_replies]
            .into_iter()
            .chain(
                s.msi
                    .into_iter()
                    .flat_map(|m| m.devices)
                    .flat_map(|(_, v)| v),
            )
            .collect();
        for (i, fd) in incoming.iter().chain(&outgoing).enumerate() {
            crate::connect::peer_eventfd(fd, format_args!("its doorbell {i}"))?;
        }
        if outgoing.len() as u64 > port::MAX_DOORBELLS {
            return Err(format!(
                "{} doorbells; the port has {}",
                outgoing.len(),
                port::MAX_DOORBELLS
            ));
        }
        self.control
            .map(&s.control)
            .map_err(|e| format!("mapping its control region: {e}"))?;
        self.pool
            .map(&s.pool)
            .map_err(|e| format!("mapping its pool: {e}"))?;
        let mut st = self.lock();
        st.connections = st.connections.wrapping_add(1);
        st.driver = Some(Arc::new(Driver {
            words: s.words,
            incoming,
            outgoing: outgoing.into_iter().map(rpc::Doorbell::from_fd).collect(),
        }));
        self.sync(&mut st);
        Ok(())
    }

    /// The driver VM went: out of the guest first, then out of this process.
    fn release(&self) {
        let mut st = self.lock();
        st.driver = None;
        self.sync(&mut st);
        drop(st);
        self.control.clear();
        self.pool.clear();
    }

    /// Where the driver VM's control region and pool are in the guest now (BARs 2 and 4,
    /// while one is connected).
    pub fn mapped(&self) -> [Option<u64>; 2] {
        self.lock().slots_at
    }
}

fn doorbell(bar0: u64, i: usize) -> u64 {
    bar0 + port::REG_DOORBELLS + 4 * i as u64
}

impl port::Driver for Wiring {
    fn state(&self) -> (u32, Option<[u64; port::SETUP_WORDS]>) {
        let s = self.lock();
        (s.connections, s.driver.as_ref().map(|d| d.words))
    }
    fn ring(&self, i: u32) {
        let s = self.lock();
        if let Some(bell) = s.driver.as_ref().and_then(|d| d.outgoing.get(i as usize)) {
            // Non-blocking (checked at connection): a full counter cannot hold the vCPU.
            bell.ring();
        }
    }
}

impl port::Interrupt for Wiring {
    fn route(&self, msi: Option<Message>) {
        let mut s = self.lock();
        s.vector = msi.and_then(|m| crate::msiroute::gsi_of(self.frame.as_ref(), m));
        self.sync(&mut s);
    }
}

/// Serves the port's socket for the VM's life: one driver VM at a time, each until it hangs up.
fn serve(listener: OwnedFd, w: Arc<Wiring>) {
    loop {
        let sock = match rpc::setup::accept(&listener) {
            Ok(s) => s,
            Err(e) => {
                ratelog::warn!("rpc-port {}: accept: {e}", w.socket.display());
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Err(why) = w.take(&sock) {
            ratelog::warn!(
                "rpc-port {}: refused a driver VM: {why}",
                w.socket.display()
            );
            continue;
        }
        log::info!(
            "rpc-port {}: a driver VM connected: its control region {} bytes at BAR 2, its \
             pool {} bytes at BAR 4",
            w.socket.display(),
            rpc::shm::SIZE,
            w.pool_size
        );
        wait_for_hangup(&listener, &sock, &w.socket);
        w.release();
        log::info!("rpc-port {}: the driver VM went", w.socket.display());
    }
}

/// Until the driver VM's socket hangs up (or says anything: the protocol has nothing more to
/// say), turning away whoever else connects.
fn wait_for_hangup(listener: &OwnedFd, sock: &OwnedFd, socket: &Path) {
    loop {
        let mut p = [listener, sock].map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: poll on two descriptors we hold.
        if unsafe { libc::poll(p.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if p[1].revents != 0 {
            return;
        }
        if p[0].revents != 0 {
            if let Ok(other) = rpc::setup::accept(listener) {
                drop(other);
                ratelog::warn!(
                    "rpc-port {}: turned away a second driver VM (this port serves one)",
                    socket.display()
                );
            }
        }
    }
}

/// The port function for device `d` and its wiring; the starter serves its socket (bound now,
/// so that a path in use is named before the VM starts).
pub fn build(
    d: &layout::Device,
    socket: &Path,
    pool_size: u64,
    frame: Option<V2m>,
    hv: PortHv<'_>,
) -> Result<(port::Port, crate::devices::Starter, Arc<Wiring>), PortError> {
    let fail = |why: String| PortError::Setup {
        socket: socket.to_owned(),
        why,
    };
    let listener = crate::backend::listen_at(socket).map_err(|e| fail(e.to_string()))?;
    let control = Reserved::new(rpc::shm::SIZE as u64)?;
    let pool = Reserved::new(pool_size)?;
    let devfn = d.slot << 3;
    let control_slot = (hv.memslot)(PORT_SLOTS + devfn, control.host());
    let pool_slot = (hv.memslot)(PORT_SLOTS + 256 + devfn, pool.host());
    let w = Arc::new(Wiring {
        socket: socket.to_owned(),
        pool_size,
        frame,
        irqfds: hv.irqfds,
        ioeventfds: hv.ioeventfds,
        control,
        pool,
        state: Mutex::new(State {
            bars: [None; 3],
            vector: None,
            driver: None,
            connections: 0,
            control_slot,
            pool_slot,
            slots_at: [None; 2],
            irq_at: None,
            bells_at: None,
        }),
    });
    let bar = |i: usize| d.bars.iter().find(|b| usize::from(b.index) == i);
    let bars = port::Bars {
        regs: bar(0).map_or(0, |b| b.base),
        control: bar(2).map_or(0, |b| b.base),
        control_size: bar(2).map_or(layout::layout::PORT_CONTROL_BAR, |b| b.size),
        pool: bar(4).map_or(0, |b| b.base),
        pool_size: bar(4).map_or(pool_size.next_power_of_two(), |b| b.size),
        wide: bar(2).is_some_and(|b| b.is_64bit),
    };
    let f = port::Port::new(bars, w.clone(), w.clone());
    let served = w.clone();
    let start: crate::devices::Starter = Box::new(move || {
        let name = "rpc-port".to_owned();
        if let Err(e) = std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(listener, served))
        {
            log::error!("rpc-port: no thread to serve its socket: {e}");
        }
    });
    Ok((f, start, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pci::PciFunction;
    use port::{Driver as _, Interrupt as _};
    use rpc::shm::{sealed_memfd, Doorbell};
    use std::time::Instant;

    const POOL: u64 = 0x10_0000;

    /// What the hypervisor was asked, in order.
    #[derive(Debug, Clone, PartialEq)]
    enum Hv {
        Slot(u32, u64, Option<u64>),
        Irqfd(bool, RawFd, u32),
        Ioeventfd(bool, RawFd, u64),
    }
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Hv>>>);
    impl Calls {
        fn push(&self, c: Hv) {
            self.0.lock().unwrap().push(c);
        }
        fn take(&self) -> Vec<Hv> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }
    impl Irqfds for Calls {
        fn attach(&self, fd: RawFd, gsi: u32) -> io::Result<()> {
            self.push(Hv::Irqfd(true, fd, gsi));
            Ok(())
        }
        fn detach(&self, fd: RawFd, gsi: u32) -> io::Result<()> {
            self.push(Hv::Irqfd(false, fd, gsi));
            Ok(())
        }
    }
    impl Ioeventfds for Calls {
        fn attach(&self, fd: RawFd, addr: u64) -> io::Result<()> {
            self.push(Hv::Ioeventfd(true, fd, addr));
            Ok(())
        }
        fn detach(&self, fd: RawFd, addr: u64) -> io::Result<()> {
            self.push(Hv::Ioeventfd(false, fd, addr));
            Ok(())
        }
    }

    fn device_vm(dir: &Path) -> (layout::Layout, PathBuf) {
        let socket = dir.join("port.sock");
        let d = layout::Description::parse(
            &format!(
                "[[device]]\nkind = \"rpc-port\"\nsocket = \"{}\"\npool_size = \"1M\"\n",
                socket.display()
            ),
            "test",
        )
        .unwrap();
        (layout::resolve(&d).unwrap().layout, socket)
    }

    /// The port of a device VM whose hypervisor is `calls`, the memory behind each memslot,
    /// and the wiring.
    fn port(dir: &Path, calls: &Calls) -> (port::Port, Arc<Wiring>, Arc<Mutex<Vec<HostMemory>>>) {
        let (l, socket) = device_vm(dir);
        let d = &l.devices[0];
        let hosts: Arc<Mutex<Vec<HostMemory>>> = Arc::default();
        let (c, h) = (calls.clone(), hosts.clone());
        let memslot = move |slot: u32, host: HostMemory| -> Box<dyn FnMut(Option<u64>) + Send> {
            h.lock().unwrap().push(host);
            let c = c.clone();
            Box::new(move |at| c.push(Hv::Slot(slot, host.size, at)))
        };
        let (f, start, w) = build(
            d,
            &socket,
            POOL,
            l.v2m.clone(),
            PortHv {
                irqfds: Some(Box::new(calls.clone())),
                ioeventfds: Some(Box::new(calls.clone())),
                memslot: &memslot,
            },
        )
        .unwrap();
        start();
        (f, w, hosts)
    }

    /// A driver VM's side: its memfds and eventfds, and its connection.
    struct DriverVm {
        pool: OwnedFd,
        control: OwnedFd,
        bells: Vec<Doorbell>,
        msi: Vec<Doorbell>,
        notify: Doorbell,
        sock: OwnedFd,
    }

    fn connect(socket: &Path, pool_size: u64, pool_sealed: bool, host_end: bool) -> DriverVm {
        let pool = if pool_sealed {
            sealed_memfd(c"pool", pool_size).unwrap()
        } else {
            let f = tempfile::tempfile().unwrap();
            f.set_len(pool_size).unwrap();
            f.into()
        };
        let control = rpc::shm::Region::create()
            .unwrap()
            .fd()
            .try_clone()
            .unwrap();
        let bells: Vec<Doorbell> = (0..3).map(|_| Doorbell::new().unwrap()).collect();
        let msi: Vec<Doorbell> = (0..2).map(|_| Doorbell::new().unwrap()).collect();
        let notify = Doorbell::new().unwrap();
        let host = tempfile::tempfile().unwrap();
        let sock = rpc::setup::connect(socket).unwrap();
        rpc::setup::send(
            &sock,
            0x5000_0000,
            pool_size,
            [
                pool.as_raw_fd(),
                control.as_raw_fd(),
                bells[0].fd().as_raw_fd(),
                bells[1].fd().as_raw_fd(),
                bells[2].fd().as_raw_fd(),
            ],
            &[(1, msi.iter().map(|b| b.fd().as_raw_fd()).collect())],
            &[(1, notify.fd().as_raw_fd())],
            &if host_end {
                vec![(1, host.as_raw_fd())]
            } else {
                vec![]
            },
        )
        .unwrap();
        DriverVm {
            pool,
            control,
            bells,
            msi,
            notify,
            sock,
        }
    }

    /// Waits (at most 10 s, for a failure to show) until the port's state is `want`.
    fn until(w: &Wiring, want: impl Fn((u32, bool)) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !want({
            let (n, s) = w.state();
            (n, s.is_some())
        }) {
            assert!(
                Instant::now() < deadline,
                "the port's state: {:?}",
                w.state().0
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn r64(f: &mut port::Port, off: u64) -> u64 {
        let mut b = [0u8; 8];
        f.bar_read(0, off, &mut b);
        u64::from_le_bytes(b)
    }

    /// A driver VM connects: its control region and pool become memslots at BARs 2 and 4
    /// (the very memory it shares: a byte it wrote reads through the slot's memory), its
    /// incoming doorbells irqfds of the port's vector, its outgoing ones ioeventfds at BAR 0's
    /// doorbells; a doorbell write that exits rings its eventfd. It hangs up: all of it leaves
    /// the guest, and the next one is served.
    #[test]
    fn a_driver_vm_is_mapped_routed_and_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let calls = Calls::default();
        let (mut f, w, hosts) = port(dir.path(), &calls);
        let (control_host, pool_host) = {
            let h = hosts.lock().unwrap();
            assert_eq!(
                (h[0].size, h[1].size),
                (rpc::shm::SIZE as u64, POOL),
                "memslots the size of the control region and the pool"
            );
            (h[0], h[1])
        };
        let (bar0, bar2, bar4) = (0x1000_0000u64, 0x80_0000_0000u64, 0x80_0010_0000u64);
        for (i, at) in [(0, bar0), (2, bar2), (4, bar4)] {
            w.bar_at(i, Some(at));
        }
        assert!(
            calls.take().is_empty(),
            "nothing in the guest without a driver VM"
        );
        let msg = (0x0802_0040u64, 70u32);
        w.route(Some(msg));
        let gsi = 70 - layout::layout::SPI_BASE_INTID;

        let drv = connect(&w.socket, POOL, true, false);
        until(&w, |(n, on)| n == 1 && on);
        let got = calls.take();
        let slot = PORT_SLOTS + (1 << 3);
        assert!(
            got.contains(&Hv::Slot(slot, rpc::shm::SIZE as u64, Some(bar2))),
            "{got:?}"
        );
        assert!(
            got.contains(&Hv::Slot(slot + 256, POOL, Some(bar4))),
            "{got:?}"
        );
        let irqfds = got
            .iter()
            .filter(|c| matches!(c, Hv::Irqfd(true, _, g) if *g == gsi));
        assert_eq!(
            irqfds.count(),
            2,
            "to-backend and the notify eventfd: {got:?}"
        );
        let bells: Vec<u64> = got
            .iter()
            .filter_map(|c| match c {
                Hv::Ioeventfd(true, _, a) => Some(*a),
                _ => None,
            })
            .collect();
        let want: Vec<u64> = (0..4).map(|i| bar0 + port::REG_DOORBELLS + 4 * i).collect();
        assert_eq!(bells, want, "events, replies and two MSIs");
        // The memory behind the slots is the driver's own.
        let map = |fd: &OwnedFd, size: u64| {
            // SAFETY: a new shared mapping of a memfd of that size.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            }
            .cast::<u8>()
        };
        let (pool, control) = (
            map(&drv.pool, POOL),
            map(&drv.control, rpc::shm::SIZE as u64),
        );
        // SAFETY: in bounds of the mappings above and of the port's (checked sizes).
        unsafe {
            pool.add(0x1234).write_volatile(0xa5);
            assert_eq!(
                (pool_host.addr as *const u8).add(0x1234).read_volatile(),
                0xa5
            );
            assert_eq!(
                (control_host.addr as *const u64).read_volatile(),
                control.cast::<u64>().read_volatile(),
                "the control region's header"
            );
        }
        // The registers show the driver's setup; a doorbell write that exits rings it.
        assert_eq!(r64(&mut f, port::REG_STATUS), 1 | 1 << 32);
        assert_eq!(r64(&mut f, port::REG_SETUP + 16), 0x5000_0000);
        assert_eq!(r64(&mut f, port::REG_SETUP + 24), POOL);
        f.bar_write(0, port::REG_DOORBELLS + 4, &1u32.to_le_bytes());
        f.bar_write(0, port::REG_DOORBELLS + 12, &1u32.to_le_bytes());
        assert!(
            drv.bells[2].wait(Some(Duration::ZERO)),
            "its replies doorbell"
        );
        assert!(
            drv.msi[1].wait(Some(Duration::ZERO)),
            "its device's vector 1"
        );
        assert!(!drv.bells[1].wait(Some(Duration::ZERO)));
        assert!(!drv.notify.wait(Some(Duration::ZERO)));

        // A second driver VM is turned away while the first is served.
        let other = rpc::setup::connect(&w.socket).unwrap();
        assert!(rpc::setup::readable_within(&other, Duration::from_secs(10)).unwrap());
        assert_eq!(w.state().0, 1);

        drop(drv);
        until(&w, |(_, on)| !on);
        let got = calls.take();
        for want in [
            Hv::Slot(slot, rpc::shm::SIZE as u64, None),
            Hv::Slot(slot + 256, POOL, None),
        ] {
            assert!(got.contains(&want), "{want:?} in {got:?}");
        }
        assert_eq!(
            got.iter()
                .filter(|c| matches!(c, Hv::Irqfd(false, ..)))
                .count(),
            2
        );
        assert_eq!(
            got.iter()
                .filter(|c| matches!(c, Hv::Ioeventfd(false, ..)))
                .count(),
            4
        );
        assert_eq!(
            r64(&mut f, port::REG_SETUP + 24),
            0,
            "nothing while no one is connected"
        );

        let _again = connect(&w.socket, POOL, true, false);
        until(&w, |(n, on)| n == 2 && on);
        assert!(calls
            .take()
            .contains(&Hv::Slot(slot + 256, POOL, Some(bar4))));
        // SAFETY: unmapping the test's own mappings.
        unsafe {
            libc::munmap(pool.cast(), POOL as usize);
            libc::munmap(control.cast(), rpc::shm::SIZE);
        }
    }

    /// A pool of another size, an unsealed pool and host ends are each refused with the
    /// connection closed; the port stays up and serves the next driver VM.
    #[test]
    fn a_driver_vm_that_sends_the_wrong_things_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let calls = Calls::default();
        let (_f, w, _) = port(dir.path(), &calls);
        w.bar_at(4, Some(0x80_0010_0000));
        for (size, sealed, host_end) in [
            (2 * POOL, true, false),
            (POOL, false, false),
            (POOL, true, true),
        ] {
            let d = connect(&w.socket, size, sealed, host_end);
            let mut b = [0u8; 8];
            // The port hangs up on it: recv returns 0.
            assert!(rpc::setup::readable_within(&d.sock, Duration::from_secs(10)).unwrap());
            // SAFETY: a read into a local buffer from our socket.
            let n = unsafe { libc::read(d.sock.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
            assert_eq!(
                n, 0,
                "hung up on ({size}, sealed {sealed}, host end {host_end})"
            );
            assert_eq!(w.state(), (0, None));
        }
        assert!(calls.take().is_empty(), "nothing reached the guest");
        let _good = connect(&w.socket, POOL, true, false);
        until(&w, |(n, on)| n == 1 && on);
    }
}
