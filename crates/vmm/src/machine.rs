//! A VM built from its layout, on any hypervisor: the MMIO bus (UART, GICv2m frame, ECAM and
//! PCI windows), the devices in splitvirt and in the backend, where each one's interrupts go,
//! the connectors' dataports, and which console stdin feeds. What is the hypervisor's own
//! (interrupt lines, irqfds, ioeventfds, memslots) comes through `Hypervisor`: `kvm.rs`
//! implements it, and the tests below use a fake, so that this wiring and its interrupt policy
//! are built and tested on any host.

use crate::backend::Remote;
use crate::bus::Bus;
use crate::connect::HostMemory;
use crate::msiroute::Irqfds;
use hostio::endpoint::Deliver;
use layout::layout::SPI_BASE_INTID;
use layout::Layout;
use platform::{gicv2m::Gicv2m, pl011::Pl011, shared_line::SharedLine, IrqLine, SpiTrigger};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

/// What the machine asks of the hypervisor once the VM, its memory and its vCPUs exist.
pub trait Hypervisor {
    /// The level line of SPI `intid` (an interrupt ID, 32 and up).
    fn spi_line(&self, intid: u32) -> Arc<dyn IrqLine>;
    /// Edges on SPIs, for the GICv2m frame's MSIs.
    fn spi_trigger(&self) -> Arc<dyn SpiTrigger>;
    /// Eventfds bound to interrupts (for the backend devices' MSI-X vectors).
    fn irqfds(&self) -> Box<dyn Irqfds>;
    /// Eventfds the hypervisor signals on guest writes (a connector's ring).
    fn ioeventfds(&self) -> Box<dyn crate::msiroute::Ioeventfds>;
    /// Queue notifications of `l`'s virtio devices placed `at`, caught by the hypervisor.
    fn notifiers(
        &self,
        l: &Layout,
        at: layout::Placement,
    ) -> Result<Arc<dyn QueueNotify>, crate::Error>;
    /// Memslot `slot` holding `host`: the returned function maps it into the guest at the
    /// address it is given, or unmaps it (None).
    fn memslot(&self, slot: u32, host: HostMemory) -> Box<dyn FnMut(Option<u64>) + Send>;
}

/// Queue notifications caught by the hypervisor (ioeventfds), one eventfd per backend device,
/// attached at each queue's notify address wherever the guest puts BAR 0.
pub trait QueueNotify: Send + Sync {
    /// (device, eventfd) for the backend: one for all of a device's queues.
    fn fds(&self) -> Vec<(u8, OwnedFd)>;
    /// (device, an eventfd per queue) for the devices whose queues are each another
    /// program's (vhost-user): each queue's kick.
    fn queue_fds(&self) -> Vec<(u8, Vec<OwnedFd>)>;
    /// Device `dev`'s BAR 0 now decodes at `at` (None: nowhere).
    fn place(&self, dev: u8, at: Option<u64>);
    /// Caught (`on`: a backend serves them) or let through to splitvirt (the reaper).
    fn attach_all(&self, on: bool);
}

/// Memslots of connector dataports: this plus the function's devfn (RAM uses 0..3).
pub const DATAPORT_SLOTS: u32 = 16;
/// Memslots of connector event pages: this plus the function's devfn.
pub const EVENT_PAGE_SLOTS: u32 = DATAPORT_SLOTS + 256;

/// Memslots of virtio-pmem regions: this plus the device's number among them.
pub const PMEM_SLOTS: u32 = crate::port::PORT_SLOTS + 512;

/// What the machine is built from, beside the layout and the hypervisor.
pub struct Parts<'a> {
    pub layout: &'a Layout,
    /// The splitvirt binary the backend is started from.
    pub exe: &'a Path,
    /// The description file, which the backend reads too.
    pub config: Option<&'a Path>,
    /// What in-process devices may reach (the pool).
    pub dev_mem: vm_memory::GuestMemoryMmap<()>,
    pub pool_fd: Option<&'a File>,
    /// Where the UART writes.
    pub uart_out: Box<dyn Write + Send>,
    /// Where a virtio-console on stdio writes.
    pub stdout: Box<dyn Write + Send>,
}

pub struct Machine {
    pub bus: Arc<Bus>,
    /// The backend of the moment, kept for the VM's life (dropping it ends the backend).
    pub remote: Option<Remote>,
    /// Where stdin's bytes go: the console the guest uses (hvc0 when its command line says
    /// `console=hvc0` and there is one, the UART otherwise).
    pub stdin: Deliver,
    /// Threads that feed in-process devices from their host ends, to start with the vCPUs.
    pub starters: Vec<crate::devices::Starter>,
    /// The virtio-pmem images' mappings, which the guest's memslots point into.
    _pmem: Vec<crate::devices::Pmem>,
}

/// Builds the machine: the bus and every device on it, the backend started and its devices
/// behind proxies, each interrupt routed.
pub fn build(p: Parts<'_>, hv: &dyn Hypervisor) -> Result<Machine, crate::Error> {
    let l = p.layout;
    let mut bus = Bus::default();
    let uart = Arc::new(Mutex::new(Pl011::new(
        p.uart_out,
        hv.spi_line(SPI_BASE_INTID + l.uart.spi),
    )));
    bus.add(l.uart.region.clone(), uart.clone());
    if let Some(v) = &l.v2m {
        let frame = Gicv2m::new(v.spi_base, v.spi_count, hv.spi_trigger());
        bus.add(v.region.clone(), Arc::new(Mutex::new(frame)));
    }
    let (ecam, pci_regions) = crate::pci_bus::host(l);
    for (region, dev) in pci_regions {
        bus.add(region, dev);
    }
    let bus_cell: Arc<OnceLock<Arc<Bus>>> = Arc::default();
    // INTx: devices whose pins swizzle to one SPI share it, in-process or not.
    let mut shared: HashMap<u32, Arc<SharedLine>> = HashMap::new();
    for d in &l.devices {
        shared
            .entry(d.intx_spi)
            .or_insert_with(|| SharedLine::new(hv.spi_line(SPI_BASE_INTID + d.intx_spi)));
    }
    let intx = |d: &layout::Device| -> Arc<dyn IrqLine> {
        match shared.get(&d.intx_spi) {
            Some(line) => line.input(d.slot as u8),
            None => hv.spi_line(SPI_BASE_INTID + d.intx_spi),
        }
    };
    let signal = |d: &layout::Device| -> Arc<dyn virtio::transport::Signal> {
        Arc::new(crate::devices::DeviceSignal {
            bus: bus_cell.clone(),
            frame: l.v2m.clone(),
            intx: intx(d),
        })
    };
    let connector_hv = || crate::connect::Hv {
        irqfds: Some(hv.irqfds()),
        ioeventfds: Some(hv.ioeventfds()),
    };
    // In-process virtio devices' queue notifications: caught by the hypervisor too. A
    // vhost-user device takes an eventfd per queue as that queue's kick: a notification wakes
    // its backend program with no thread of splitvirt in between.
    let local = hv.notifiers(l, layout::Placement::InProcess)?;
    let kicks: Mutex<HashMap<u8, Vec<OwnedFd>>> =
        Mutex::new(local.queue_fds().into_iter().collect());
    // The MSI-X vectors of the backend's devices and of vhost-user devices: eventfds the
    // hypervisor routes to what the guest programs into each (irqfds).
    let msi = crate::msiroute::MsiRoutes::new(l, hv.irqfds())
        .map_err(|e| crate::Error::Io(format!("cannot make the MSI eventfds: {e}")))?
        .map(Arc::new);
    let vhost = |d: &layout::Device| hostio::devices::VhostFds {
        kicks: kicks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(d.slot as u8))
            .unwrap_or_default(),
        calls: msi
            .as_ref()
            .map_or(Vec::new(), |m| m.vhost_fds(d.slot as u8)),
    };
    let built = crate::devices::build(
        l,
        p.dev_mem,
        &signal,
        p.stdout,
        &|_| None,
        &connector_hv,
        &vhost,
    )?;
    for s in &built.skipped {
        log::warn!("{s}");
    }
    // Devices in the backend process: their INTx comes back as events, each to its own line;
    // their MSIs go through their own vectors' eventfds (msiroute).
    let intx_lines: HashMap<u8, Arc<dyn IrqLine>> = l
        .backend_devices()
        .map(|d| (d.slot as u8, intx(d)))
        .collect();
    let notifiers = hv.notifiers(l, layout::Placement::Backend)?;
    let dead_notifiers = notifiers.clone();
    let events = Arc::new(move |e: rpc::Event| match e {
        rpc::Event::Intx { dev, level } => {
            if let Some(line) = intx_lines.get(&dev) {
                line.set_level(level);
            }
        }
        // Refused before it gets here (backend::Launch): MSIs travel by eventfd only.
        rpc::Event::Msi { .. } => {}
        // The notifications go to splitvirt (and the reaper) until a new backend serves them.
        rpc::Event::Dead(_) => dead_notifiers.attach_all(false),
    });
    let routes = msi.clone();
    let back_on = notifiers.clone();
    let mut remote = crate::backend::start(
        l,
        p.exe,
        p.config,
        p.pool_fd,
        events,
        &signal,
        crate::backend::Bypass {
            msi,
            notify: notifiers.fds(),
            reattached: Some(Box::new(move || back_on.attach_all(true))),
        },
    )?;
    // The others' replayed onto the bus by a thread of each device's own, so that a vCPU never
    // waits while a device works (a packet written to a TAP, a disk request) and does not
    // exit at all.
    local.attach_all(true);
    let mut starters = built.starters;
    // Where each in-process device's BAR 0 decodes, for its notifications.
    let bar0s: HashMap<u8, Arc<Mutex<Option<u64>>>> = l
        .devices
        .iter()
        .filter(|d| d.placement == layout::Placement::InProcess)
        .filter(|d| crate::devices::notify_writes(&d.kind).is_some())
        .map(|d| (d.slot as u8, Arc::default()))
        .collect();
    for (dev, fd) in local.fds() {
        let (Some(writes), Some(at)) = (
            l.devices
                .iter()
                .find(|d| d.slot as u8 == dev)
                .and_then(|d| crate::devices::notify_writes(&d.kind)),
            bar0s.get(&dev).cloned(),
        ) else {
            continue;
        };
        let bus = bus_cell.clone();
        starters.push(Box::new(move || {
            std::thread::Builder::new()
                .name(format!("notify{dev}"))
                .spawn(move || replay_notifications(fd, &at, &bus, &writes))
                .map(drop)
                .unwrap_or_else(|e| log::warn!("no notification thread for device {dev}: {e}"));
        }));
    }
    for (df, f) in built.functions {
        // A vhost-user device's vectors follow what the guest writes into its MSI-X table.
        let vhost_vectors = l.devices.iter().find_map(|d| match d.kind {
            layout::DeviceKind::VhostUser { queues, .. } if d.slot as u8 == df >> 3 => {
                Some(queues + 1)
            }
            _ => None,
        });
        let f: Box<dyn pci::PciFunction> = match (&routes, vhost_vectors) {
            (Some(routes), Some(vectors)) => Box::new(crate::msiroute::Routed {
                inner: f,
                routes: routes.clone(),
                dev: df >> 3,
                vectors,
            }),
            _ => f,
        };
        // A connector's memory is in the guest wherever the guest puts its BARs, each a
        // memslot of its own moved with its BAR: the dataport at BAR 1 (no exit per access),
        // the event page at BAR 0 read-only (reads of any kind at memory speed, writes exit).
        let Some((_, host)) = built.connectors.iter().find(|(d, _)| *d == df) else {
            let dev = df >> 3;
            match bar0s.get(&dev) {
                Some(at) => {
                    let (local, at) = (local.clone(), at.clone());
                    let moved = move |to: Option<u64>| {
                        *at.lock().unwrap_or_else(|e| e.into_inner()) = to;
                        local.place(dev, to);
                    };
                    ecam.add(df, Box::new(pci::BarWatch::new(f, 0, Box::new(moved))));
                }
                None => ecam.add(df, f),
            }
            continue;
        };
        let dataport = hv.memslot(DATAPORT_SLOTS + u32::from(df), host.dataport);
        let mut page = hv.memslot(EVENT_PAGE_SLOTS + u32::from(df), host.event_page);
        // BAR 0 carries the page's memslot and the ring's ioeventfd with it.
        let ring = host.ring.clone();
        let bar0 = Box::new(move |at: Option<u64>| {
            page(at);
            ring.bar0_at(at);
        });
        let f = Box::new(pci::BarWatch::new(f, 1, dataport));
        ecam.add(df, Box::new(pci::BarWatch::new(f, 0, bar0)));
    }
    // A device VM's ports: a driver VM's memory at BARs 2 and 4 while one is connected, its
    // doorbells at BAR 0, each moved with its BAR.
    for d in &l.devices {
        let layout::DeviceKind::RpcPort { socket, pool_size } = &d.kind else {
            continue;
        };
        let memslot = |slot: u32, host: HostMemory| hv.memslot(slot, host);
        let (f, start, wiring) = crate::port::build(
            d,
            socket,
            *pool_size,
            l.v2m.clone(),
            crate::port::PortHv {
                irqfds: Some(hv.irqfds()),
                ioeventfds: Some(hv.ioeventfds()),
                memslot: &memslot,
            },
        )?;
        starters.push(start);
        let mut f: Box<dyn pci::PciFunction> = Box::new(f);
        for bar in [0, 2, 4] {
            let w = wiring.clone();
            f = Box::new(pci::BarWatch::new(
                f,
                bar,
                Box::new(move |at| w.bar_at(bar, at)),
            ));
        }
        ecam.add((d.slot << 3) as u8, f);
    }
    if let Some(r) = &mut remote {
        for (df, f) in std::mem::take(&mut r.functions) {
            let (n, dev) = (notifiers.clone(), df >> 3);
            let moved = move |at: Option<u64>| n.place(dev, at);
            ecam.add(df, Box::new(pci::BarWatch::new(f, 0, Box::new(moved))));
        }
    }
    // Each virtio-pmem image in the guest at the window its device's config gives: memory, so
    // the guest's reads and writes of it never exit.
    for (n, p) in built.pmem.iter().enumerate() {
        hv.memslot(PMEM_SLOTS + n as u32, p.host)(Some(p.window));
    }
    let bus = Arc::new(bus);
    let _ = bus_cell.set(bus.clone());
    let stdin = stdin_target(l, built.console, remote.as_ref(), uart);
    Ok(Machine {
        bus,
        remote,
        stdin,
        starters,
        _pmem: built.pmem,
    })
}

/// Waits on an in-process device's notification eventfd and, for each wake-up, writes every
/// queue's notification to the device at BAR 0 (`at`) through the bus, as the guest's write
/// would have: the device looks at each queue (finding nothing new in most is cheap). Runs for
/// the VM's life.
fn replay_notifications(
    fd: OwnedFd,
    at: &Mutex<Option<u64>>,
    bus: &OnceLock<Arc<Bus>>,
    writes: &[(u64, u16)],
) {
    use std::os::fd::AsRawFd;
    loop {
        let mut n = 0u64;
        // SAFETY: an 8-byte read into a local from an eventfd we own.
        if unsafe { libc::read(fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) } != 8 {
            return;
        }
        let base = *at.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(base), Some(bus)) = (base, bus.get()) {
            // This thread is the device's own: it does a request's work itself, after the
            // write has let go of the bus (virtio::defer), rather than wake a worker.
            virtio::defer::accept(|| {
                for (off, q) in writes {
                    bus.write(base + off, &q.to_le_bytes());
                }
            });
        }
    }
}

/// stdin feeds the console the guest uses: hvc0 when its command line says so (in the
/// backend or in splitvirt), the UART otherwise.
fn stdin_target(
    l: &Layout,
    local: Option<crate::devices::SharedConsole>,
    remote: Option<&Remote>,
    uart: Arc<Mutex<Pl011>>,
) -> Deliver {
    let hvc0 = l
        .cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("console="))
        .next_back()
        == Some("hvc0");
    match (local, hvc0, remote.and_then(|r| r.console_input())) {
        (_, true, Some(input)) => Box::new(move |b: &[u8]| input(b)),
        (Some(c), true, _) => Box::new(move |b: &[u8]| {
            let mut f = c.lock().unwrap_or_else(|e| e.into_inner());
            f.with_device(|d| d.queue_input(b));
        }),
        _ => Box::new(move |b: &[u8]| {
            uart.lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_input(b)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// Records the writes that reach it as (offset, bytes).
    #[derive(Default)]
    struct Writes(Mutex<Vec<(u64, Vec<u8>)>>);
    impl crate::bus::BusDevice for Writes {
        fn read(&self, _: u64, _: &mut [u8]) {}
        fn write(&self, off: u64, data: &[u8]) {
            self.0.lock().unwrap().push((off, data.to_vec()));
        }
    }

    /// An in-process device's caught notification comes back as the guest's writes would
    /// have: each queue's index at its notify address, under BAR 0 where it is now.
    #[test]
    fn a_caught_notification_is_replayed_to_every_queue_at_bar_0() {
        let dev = Arc::new(Writes::default());
        let mut bus = Bus::default();
        bus.add(layout::Region::new("bar", 0x1000_0000, 0x8000), dev.clone());
        let cell: Arc<OnceLock<Arc<Bus>>> = Arc::default();
        let _ = cell.set(Arc::new(bus));
        let fd = crate::msiroute::new_eventfd().unwrap();
        let ring = fd.try_clone().unwrap();
        let at = Arc::new(Mutex::new(Some(0x1000_0000)));
        let writes = vec![(0x3000, 0u16), (0x3004, 1)];
        let (at2, cell2, w2) = (at.clone(), cell.clone(), writes.clone());
        std::thread::spawn(move || replay_notifications(fd, &at2, &cell2, &w2));
        rpc::shm::Doorbell::from_fd(ring).ring();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while dev.0.lock().unwrap().len() < 2 {
            assert!(std::time::Instant::now() < deadline, "nothing replayed");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            *dev.0.lock().unwrap(),
            [(0x3000, vec![0, 0]), (0x3004, vec![1, 0])]
        );
    }

    /// Memslot moves as (slot, where).
    type Moves = Arc<Mutex<Vec<(u32, Option<u64>, bool)>>>;

    /// A hypervisor that records what the machine asks of it.
    #[derive(Default, Clone)]
    struct Fake {
        levels: Arc<Mutex<Vec<(u32, bool)>>>,
        slots: Moves,
        /// What each memslot holds, as it was asked for.
        hosts: Arc<Mutex<Vec<(u32, HostMemory)>>>,
    }
    struct Line(Fake, u32);
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.levels.lock().unwrap().push((self.1, high));
        }
    }
    struct NoEdges;
    impl SpiTrigger for NoEdges {
        fn trigger(&self, _: u32) {}
    }
    struct NoIrqfds;
    impl Irqfds for NoIrqfds {
        fn attach(&self, _: std::os::fd::RawFd, _: u32) -> std::io::Result<()> {
            Ok(())
        }
        fn detach(&self, _: std::os::fd::RawFd, _: u32) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl crate::msiroute::Ioeventfds for NoIrqfds {
        fn attach(&self, _: std::os::fd::RawFd, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn detach(&self, _: std::os::fd::RawFd, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }
    struct NoNotify;
    impl QueueNotify for NoNotify {
        fn fds(&self) -> Vec<(u8, OwnedFd)> {
            Vec::new()
        }
        fn queue_fds(&self) -> Vec<(u8, Vec<OwnedFd>)> {
            Vec::new()
        }
        fn place(&self, _: u8, _: Option<u64>) {}
        fn attach_all(&self, _: bool) {}
    }
    impl Hypervisor for Fake {
        fn spi_line(&self, intid: u32) -> Arc<dyn IrqLine> {
            Arc::new(Line(self.clone(), intid))
        }
        fn spi_trigger(&self) -> Arc<dyn SpiTrigger> {
            Arc::new(NoEdges)
        }
        fn irqfds(&self) -> Box<dyn Irqfds> {
            Box::new(NoIrqfds)
        }
        fn ioeventfds(&self) -> Box<dyn crate::msiroute::Ioeventfds> {
            Box::new(NoIrqfds)
        }
        fn notifiers(
            &self,
            _: &Layout,
            _: layout::Placement,
        ) -> Result<Arc<dyn QueueNotify>, crate::Error> {
            Ok(Arc::new(NoNotify))
        }
        fn memslot(&self, slot: u32, host: HostMemory) -> Box<dyn FnMut(Option<u64>) + Send> {
            self.hosts.lock().unwrap().push((slot, host));
            let slots = self.slots.clone();
            Box::new(move |at| slots.lock().unwrap().push((slot, at, host.read_only)))
        }
    }

    /// The machine of `toml` (its devices in splitvirt) on the fake hypervisor.
    fn machine(toml: &str) -> (Layout, Machine, Fake) {
        let d = layout::Description::parse(toml, "t.toml").unwrap();
        let l = layout::resolve(&d).unwrap().layout;
        let pool = l.pool.clone().unwrap();
        let dev_mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(
            GuestAddress(pool.base),
            pool.size as usize,
        )])
        .unwrap();
        let fake = Fake::default();
        let m = build(
            Parts {
                layout: &l,
                exe: Path::new("/nonexistent"),
                config: None,
                dev_mem,
                pool_fd: None,
                uart_out: Box::new(std::io::sink()),
                stdout: Box::new(std::io::sink()),
            },
            &fake,
        )
        .unwrap();
        (l, m, fake)
    }

    /// Whether the UART has received bytes (PL011 FR.RXFE clear).
    fn uart_has_input(l: &Layout, m: &Machine) -> bool {
        let mut fr = [0u8; 4];
        m.bus.read(l.uart.region.base + 0x18, &mut fr);
        u32::from_le_bytes(fr) & (1 << 4) == 0
    }

    /// stdin goes to the console the guest uses: the UART, unless its command line says
    /// console=hvc0 and there is a virtio-console to take it.
    #[test]
    fn stdin_feeds_the_console_the_guest_uses() {
        let console = "[[device]]\nkind = \"virtio-console\"\nplacement = \"in-process\"\n";
        for (cmdline, to_uart) in [("console=ttyAMA0", true), ("console=hvc0", false)] {
            let toml = format!("[kernel]\ncmdline = \"{cmdline}\"\n{console}");
            let (l, mut m, _) = machine(&toml);
            assert!(!uart_has_input(&l, &m));
            (m.stdin)(b"x");
            assert_eq!(uart_has_input(&l, &m), to_uart, "{cmdline}");
        }
    }

    /// A connector's dataport and event page are memslots that follow their BARs (1 and 0):
    /// mapped where the guest's memory decoding puts them, unmapped when decoding stops; the
    /// event page read-only.
    #[test]
    fn a_connectors_memory_follows_its_bars() {
        let (l, m, fake) = machine(
            "[[device]]\nkind = \"connector\"\nname = \"c\"\ndataport_size = \"1M\"\nslot = 3\n",
        );
        let d = &l.devices[0];
        let ecam_fn = l.pci.ecam.base + (u64::from(d.slot) << 15);
        let df = u32::from(pci::ecam::devfn(d.slot as u8, 0));
        let (port, page) = (DATAPORT_SLOTS + df, EVENT_PAGE_SLOTS + df);
        m.bus.write(ecam_fn + 4, &2u16.to_le_bytes());
        m.bus.write(ecam_fn + 4, &0u16.to_le_bytes());
        let slots = fake.slots.lock().unwrap().clone();
        assert_eq!(
            slots,
            [
                (port, Some(d.bars[1].base), false),
                (page, Some(d.bars[0].base), true),
                (port, None, false),
                (page, None, true)
            ]
        );
    }

    /// A virtio-pmem image is memory of the guest at its window: the file itself, shared (what
    /// the guest writes there is in the file), and its device's config says where.
    #[test]
    fn a_pmem_image_is_a_memslot_of_the_file_at_the_window_its_config_gives() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("pmem.img");
        let mut bytes = vec![0u8; 2 << 20];
        bytes[..5].copy_from_slice(b"hello");
        std::fs::write(&img, &bytes).unwrap();
        let (l, m, fake) = machine(&format!(
            "[[device]]\nkind = \"virtio-pmem\"\nimage = \"{}\"\nslot = 2\n",
            img.display()
        ));
        let base = layout::layout::PMEM_BASE;
        assert_eq!(
            *fake.slots.lock().unwrap(),
            [(PMEM_SLOTS, Some(base), false)]
        );
        let host = fake.hosts.lock().unwrap()[0].1;
        assert_eq!(host.size, 2 << 20);
        // SAFETY: the machine keeps the mapping (`_pmem`) while `m` lives.
        let mapped = unsafe { std::slice::from_raw_parts_mut(host.addr as *mut u8, 5) };
        assert_eq!(mapped, b"hello");
        mapped.copy_from_slice(b"HELLO");
        assert_eq!(&std::fs::read(&img).unwrap()[..5], b"HELLO");
        let d = &l.devices[0];
        let ecam_fn = l.pci.ecam.base + (u64::from(d.slot) << 15);
        m.bus.write(ecam_fn + 4, &2u16.to_le_bytes());
        let mut cfg = [0u8; 16];
        m.bus
            .read(d.bars[0].base + virtio::transport::DEVICE_CFG, &mut cfg);
        assert_eq!(cfg[..8], base.to_le_bytes());
        assert_eq!(cfg[8..], (2u64 << 20).to_le_bytes());
        drop(m);
    }

    /// The UART's interrupt is the layout's SPI, raised through the hypervisor's line when
    /// input arrives with the receive interrupt unmasked.
    #[test]
    fn the_uarts_interrupt_reaches_its_line() {
        let (l, mut m, fake) =
            machine("[[device]]\nkind = \"virtio-console\"\nplacement = \"in-process\"\n");
        // PL011 IMSC (0x38): unmask the receive interrupt (bit 4).
        m.bus
            .write(l.uart.region.base + 0x38, &(1u32 << 4).to_le_bytes());
        (m.stdin)(b"x");
        let uart = SPI_BASE_INTID + l.uart.spi;
        assert_eq!(fake.levels.lock().unwrap().last(), Some(&(uart, true)));
    }
}
