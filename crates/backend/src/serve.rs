//! `splitvirt backend`: the process that serves the description's backend devices
//! (docs/RPC.md). `confine` puts it in its jail (`jail`) first thing; `serve` takes the setup
//! from splitvirt (the pool, the control region, its doorbells and eventfds, its devices'
//! host ends), maps the pool, puts its system call policy on (`policy`), builds the devices
//! exactly as splitvirt would build in-process ones (`hostio`), registers them and serves
//! splitvirt's requests over the rings (`rpc::backend::serve`). It never receives the RAM
//! memfd: the pool is all of the guest it can reach.

use layout::{Layout, Placement};
use pci::PciFunction;
use rpc::backend::{Inbox, Kick, Outbox, Wait};
use rpc::setup::MsiFds;
use rpc::{Bell, Doorbell, Region, Registration};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("backend: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend: {0}")]
    Setup(String),
    #[error(transparent)]
    Devices(#[from] hostio::devices::OpenError),
    #[error(transparent)]
    Pool(#[from] hostio::PoolError),
}

/// How the backend raises its devices' MSI-X vectors without a message: the eventfds
/// splitvirt gave (`MsiFds`), or a device VM's port doorbells.
pub trait Vectors: Send + Sync {
    /// Raises device `dev`'s vector `vector`; false if there is no way for it.
    fn raise(&self, dev: u8, vector: u16) -> bool;
}

impl Vectors for MsiFds {
    fn raise(&self, dev: u8, vector: u16) -> bool {
        MsiFds::raise(self, dev, vector)
    }
}

/// The devices' interrupts, as the backend sends them: an MSI straight to the hypervisor
/// when it has a vector for it, anything else as a message.
struct RemoteSignal {
    out: Arc<Outbox>,
    dev: u8,
    msi: Option<Arc<dyn Vectors>>,
}

impl virtio::transport::Signal for RemoteSignal {
    fn msi(&self, (addr, data): (u64, u32)) {
        self.out.msi(self.dev, addr, data);
    }
    fn msi_vector(&self, vector: u16, message: (u64, u32)) {
        if !self.msi.as_ref().is_some_and(|m| m.raise(self.dev, vector)) {
            self.msi(message);
        }
    }
    fn intx(&self, level: bool) {
        self.out.intx(self.dev, level);
    }
}

/// A virtio-blk device's journal, kept in the control region for the VMM.
struct RegionJournal {
    region: Arc<Region>,
    dev: u8,
}

impl virtio::blk::Journal for RegionJournal {
    fn reset(&self, next_avail: u16) {
        self.region.journal_reset(self.dev, next_avail);
    }
    fn popped(&self, head: u16, next_avail: u16) {
        self.region.journal_popped(self.dev, head, next_avail);
    }
    fn completed(&self, head: u16, used: u16) {
        self.region.journal_completed(self.dev, head, used);
    }
}

/// What the backend's devices need of the system call policy.
pub fn policy_needs(l: &Layout) -> crate::policy::Needs {
    let mut n = crate::policy::Needs::default();
    for d in l.backend_devices() {
        match &d.kind {
            layout::DeviceKind::VirtioBlk { .. } => n.disk = true,
            layout::DeviceKind::VirtioConsole {
                backend: layout::ConsoleBackend::Socket(_),
            } => n.socket_console = true,
            _ => {}
        }
    }
    n
}

/// Enters the backend's jail as the description says (`[backend] jail`), or says loudly that
/// it does not. Call first thing in `splitvirt backend`, while it has one thread. Returns
/// whether the backend is jailed (its system call policy goes on in `serve`).
pub fn confine(l: &Layout) -> Result<bool, ServeError> {
    let Some((uid, gid)) = l.rpc_jail else {
        log::warn!(
            "the backend runs unconfined ([backend] jail = false): a compromised device model \
             has this user's files, network and privileges"
        );
        return Ok(false);
    };
    let ids = crate::jail::ids_for(crate::jail::Ids { uid, gid });
    crate::jail::enter(ids).map_err(|e| ServeError::Setup(e.to_string()))?;
    Ok(true)
}

/// `splitvirt backend`: the backend process. Returns when the VMM goes away. `jailed`: it
/// entered its jail (`confine`), and its system call policy goes on before any device is
/// built, that is before it reads anything a guest (or a former backend) wrote.
pub fn serve(l: &Layout, setup_fd: OwnedFd, jailed: bool) -> Result<(), ServeError> {
    let s = rpc::setup::recv(&setup_fd)?;
    serve_with(l, setup_fd, s, jailed, &|_, f, _| f)
}

/// Each device function as built, handed its slot and the way out, returning what serves it
/// (the test-only hostile backend wraps them; `serve` keeps them as they are).
pub type Wrap = dyn Fn(u8, Box<dyn PciFunction>, Arc<Outbox>) -> Box<dyn PciFunction>;

/// `serve` from a setup already received on `setup_fd`, with every device function passed
/// through `wrap` first.
pub fn serve_with(
    l: &Layout,
    setup_fd: OwnedFd,
    s: rpc::setup::Setup,
    jailed: bool,
    wrap: &Wrap,
) -> Result<(), ServeError> {
    let pool = check_pool(l, s.pool_base, s.pool_size)?;
    let pool_file = File::from(s.pool);
    rpc::shm::check_sealed(&pool_file, pool.size, "the pool memfd")
        .map_err(|e| ServeError::Setup(e.to_string()))?;
    let mem = hostio::pool_memory(pool.base, pool.size, &pool_file, 0)?;
    drop(pool_file);
    let parts = Parts {
        mem,
        region: Arc::new(Region::open(s.control)?),
        to_proxy: Box::new(Doorbell::from_fd(s.to_proxy)),
        replies: Box::new(Doorbell::from_fd(s.to_proxy_replies)),
        from_proxy: Doorbell::from_fd(s.to_backend),
        msi: s.msi.map(|m| Arc::new(m) as Arc<dyn Vectors>),
        notify: s
            .notify
            .into_iter()
            .map(|(dev, fd)| (dev, Doorbell::from_fd(fd)))
            .collect(),
        hosts: s.hosts,
    };
    // The VMM closing its end of the setup socket (it ended) ends the backend.
    let gone = Box::new(move || {
        let mut b = [0u8; 1];
        // SAFETY: a blocking recv into a local; returns at EOF.
        unsafe { libc::recv(setup_fd.as_raw_fd(), b.as_mut_ptr().cast(), 1, 0) };
    });
    serve_parts(l, parts, jailed, wrap, gone)
}

/// The description's pool, which must be the one offered at `base`, `size`.
pub(crate) fn check_pool(l: &Layout, base: u64, size: u64) -> Result<layout::Region, ServeError> {
    let Some(pool) = &l.pool else {
        return Err(ServeError::Setup("the description has no pool".into()));
    };
    if (base, size) != (pool.base, pool.size) {
        return Err(ServeError::Setup(format!(
            "offered a pool at {base:#x}+{size:#x}, the description says {:#x}+{:#x}",
            pool.base, pool.size
        )));
    }
    Ok(pool.clone())
}

/// What the backend serves with, however it reached the driver VM: the pool mapped, the
/// control region, the ways to wake the proxy and raise MSIs, what wakes the backend (the
/// proxy's doorbell, each device's queue notifications), the devices' host ends.
pub struct Parts {
    pub mem: vm_memory::GuestMemoryMmap<()>,
    pub region: Arc<Region>,
    pub to_proxy: Box<dyn Bell>,
    pub replies: Box<dyn Bell>,
    pub from_proxy: Doorbell,
    pub msi: Option<Arc<dyn Vectors>>,
    pub notify: Vec<(u8, Doorbell)>,
    pub hosts: Vec<(u8, OwnedFd)>,
}

/// Serves `p` until the VMM goes: `gone` returns when it has (run on a thread of its own;
/// the process then ends).
pub fn serve_parts(
    l: &Layout,
    p: Parts,
    jailed: bool,
    wrap: &Wrap,
    gone: Box<dyn FnOnce() + Send>,
) -> Result<(), ServeError> {
    let (mem, region) = (p.mem, p.region);
    let out = Outbox::new(region.clone(), p.to_proxy, p.replies);
    let from_proxy = p.from_proxy;
    let msi = p.msi;
    let notify = p.notify;
    if jailed {
        crate::policy::install(policy_needs(l)).map_err(|e| ServeError::Setup(e.to_string()))?;
    }
    let signal = |d: &layout::Device| -> Arc<dyn virtio::transport::Signal> {
        Arc::new(RemoteSignal {
            out: out.clone(),
            dev: d.slot as u8,
            msi: msi.clone(),
        })
    };
    let journal = |d: &layout::Device| -> Option<Arc<dyn virtio::blk::Journal>> {
        Some(Arc::new(RegionJournal {
            region: region.clone(),
            dev: d.slot as u8,
        }))
    };
    // The backend's devices (`build` takes those placed here), built as the VMM builds its own.
    let built = hostio::devices::build(
        l,
        mem,
        &signal,
        Box::new(std::io::stdout()),
        Placement::Backend,
        hostio::devices::Extras {
            journal: &journal,
            vhost: &|_| hostio::devices::VhostFds::default(),
        },
        p.hosts,
    )?;
    for s in &built.skipped {
        out.log(s);
    }
    let mut funcs: Vec<(Registration, Box<dyn PciFunction>)> = Vec::new();
    for (df, mut f) in built.functions {
        let slot = df >> 3;
        let Some(d) = l.devices.iter().find(|d| d.slot == u32::from(slot)) else {
            continue;
        };
        let mut id = [0u8; 12];
        f.config_read(0, &mut id);
        let bar = d.bars.first().copied();
        let reg = Registration {
            dev: slot,
            vendor: u16::from_le_bytes([id[0], id[1]]),
            device: u16::from_le_bytes([id[2], id[3]]),
            revision: id[8],
            class: u32::from_le_bytes([id[9], id[10], id[11], 0]),
            bar0_size: bar.map_or(0, |b| b.size),
            bar0_64bit: bar.is_some_and(|b| b.is_64bit),
            bar0_prefetchable: bar.is_some_and(|b| b.prefetchable),
            intx_pin: d.intx_pin as u8,
        };
        funcs.push((reg, wrap(slot, f, out.clone())));
    }
    for start in built.starters {
        start();
    }
    if jailed {
        // What it holds, and room for console clients.
        crate::jail::limit_files(8).map_err(|e| ServeError::Setup(e.to_string()))?;
    }
    std::thread::spawn(move || {
        gone();
        std::process::exit(0);
    });
    let console = built.console;
    let mut input = move |_dev: u8, bytes: &[u8]| {
        if let Some(c) = &console {
            let mut f = c.lock().unwrap_or_else(|e| e.into_inner());
            f.with_device(|d| d.queue_input(bytes));
        }
    };
    // Queue notifications the hypervisor catches itself arrive as kicks, replayed as the
    // notify writes they stand for.
    let kicks: Vec<Kick> = notify
        .into_iter()
        .filter_map(|(dev, bell)| {
            let d = l.devices.iter().find(|d| d.slot == u32::from(dev))?;
            Some(Kick {
                dev,
                bell,
                writes: hostio::devices::notify_writes(&d.kind)?,
            })
        })
        .collect();
    let stop = AtomicBool::new(false);
    // The loop does the request of a device it finds idle itself, after the kick's replay
    // (`virtio::defer`): no hand-off to a worker thread, one wake-up fewer per request. A
    // request behind another at the disk still goes to the workers, so the loop waits for one
    // read at most before it serves the other devices and the guest's register accesses.
    // While the loop polls, the queues its replays find empty stay unarmed (`virtio::polling`);
    // requests of the ring (a notification that came as a write) re-arm them as always.
    let inbox = Inbox {
        region: &region,
        bell: &from_proxy,
        kicks: &kicks,
        replay: &|on, f| virtio::polling(on, || virtio::defer::accept(f)),
    };
    let wait = l.rpc_poll.map_or(Wait::Block, Wait::Poll);
    rpc::backend::serve(inbox, &out, &mut funcs, &mut input, &stop, wait)
        .map_err(|e| ServeError::Setup(e.to_string()))
}
