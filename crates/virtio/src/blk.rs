//! virtio-blk (VIRTIO 1.2, 5.2) on a raw or qcow2 image ([`crate::disk`]): IN, OUT, FLUSH
//! (stable storage before the request completes), GET_ID, DISCARD, WRITE_ZEROES and a read-only
//! mode. A notify parses and checks every request on the notifying thread (a bad chain is the
//! driver's fault and needs a reset); the I/O itself runs on a few worker threads, so several
//! requests are in flight at once and a slow disk never stalls a vCPU, or, for a request that
//! finds the device idle, on the notifying thread when it accepts work (`crate::defer`). Completions may come back
//! in any order, which virtio-blk allows.

use crate::disk::{self, Disk, Format, SECTOR};
use crate::{DeviceError, Interrupt, Memory, VirtioDevice};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

pub use crate::disk::OpenError;

pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
/// Segments per DISCARD / WRITE_ZEROES request, and sectors per segment, that we announce.
const MAX_SEGS: u32 = 1;
const MAX_RANGE_SECTORS: u32 = 1 << 21;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub const QUEUE_SIZE: u16 = 256;
/// Virtqueues of this device (the notify addresses a hypervisor may catch itself).
pub const QUEUES: usize = 1;
const SEG_MAX: u32 = 126;
/// A chain longer than this is a loop or an attack (queue size bounds an honest one).
const MAX_CHAIN: usize = QUEUE_SIZE as usize;
const ID_LEN: usize = 20;
/// Threads doing a device's I/O: requests in flight at once.
pub const WORKERS: usize = 4;
/// Bytes a worker moves per read or write call.
const CHUNK: usize = 256 << 10;
/// How long a reset waits for requests already at the disk.
const DRAIN: Duration = Duration::from_secs(30);

/// Where the device notes which requests it holds, so that someone else can fail them if this
/// process dies (the backend's control region, docs/RPC.md "Journal").
pub trait Journal: Send + Sync {
    /// The queue started; the driver's next chain will be at avail index `next_avail`.
    fn reset(&self, next_avail: u16);
    fn popped(&self, head: u16, next_avail: u16);
    /// Called just before the chain goes on the used ring, at used index `used`.
    fn completed(&self, head: u16, used: u16);
}

/// A checked request, ready for a worker.
#[derive(Debug)]
enum Op {
    Read {
        offset: u64,
        bufs: Vec<(GuestAddress, u32)>,
    },
    Write {
        offset: u64,
        bufs: Vec<(GuestAddress, u32)>,
    },
    Flush,
    GetId(GuestAddress, u32),
    Discard(u64, u64),
    Zero(u64, u64),
    /// Answered without touching the disk.
    Status(u8),
}

struct Request {
    head: u16,
    status: GuestAddress,
    op: Op,
}

/// The queue as the workers share it, and the requests they hold.
struct Active {
    mem: Memory,
    queue: Mutex<Queue>,
    irq: Arc<dyn Interrupt>,
    /// Cleared by reset: late completions must not touch the rings.
    live: AtomicBool,
    inflight: Mutex<usize>,
    drained: Condvar,
    journal: Option<Arc<dyn Journal>>,
}

type Job = (Arc<Active>, Request);

pub struct Block {
    disk: Arc<dyn Disk>,
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    active: Option<Arc<Active>>,
    jobs: Option<Sender<Job>>,
    journal: Option<Arc<dyn Journal>>,
}

impl Block {
    /// Opens a raw image (qcow2 when the name ends in `.qcow2`); see [`disk::open`].
    pub fn open(path: &Path, read_only: bool) -> Result<Block, OpenError> {
        Self::open_as(path, None, read_only)
    }

    pub fn open_as(
        path: &Path,
        format: Option<Format>,
        read_only: bool,
    ) -> Result<Block, OpenError> {
        let disk = disk::open(path, format, read_only)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self::with_disk(disk.into(), &name, read_only))
    }

    /// A device over any [`Disk`]; `name` (its first 20 bytes) answers GET_ID.
    pub fn with_disk(disk: Arc<dyn Disk>, name: &str, read_only: bool) -> Block {
        let mut id = [0u8; ID_LEN];
        for (d, s) in id.iter_mut().zip(name.bytes()) {
            *d = s;
        }
        Block {
            capacity: disk.size() / SECTOR,
            disk,
            read_only,
            id,
            active: None,
            jobs: None,
            journal: None,
        }
    }

    /// Keeps a journal of the requests in flight from now on.
    pub fn set_journal(&mut self, j: Arc<dyn Journal>) {
        self.journal = Some(j);
    }

    /// The worker threads, started when the device is first used.
    fn jobs(&mut self) -> &Sender<Job> {
        self.jobs.get_or_insert_with(|| {
            let (tx, rx) = channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            for n in 0..WORKERS {
                let (rx, disk, id) = (rx.clone(), self.disk.clone(), self.id);
                let _ = std::thread::Builder::new()
                    .name(format!("blk-io-{n}"))
                    .spawn(move || worker(&rx, &*disk, &id));
            }
            tx
        })
    }

    /// Checks one chain against the memory the device may reach and the disk's size.
    fn parse(&self, mem: &Memory, descs: &[(GuestAddress, u32, bool)]) -> Result<Request, String> {
        let (&(haddr, hlen, hw), rest) = descs.split_first().ok_or("empty chain")?;
        let (&(saddr, slen, sw), data) = rest.split_last().ok_or("no status descriptor")?;
        if hw || hlen < 16 {
            return Err("the request header must be a device-readable buffer of 16 bytes".into());
        }
        if !sw || slen < 1 || !mem.check_range(saddr, 1, vm_memory::Permissions::ReadWrite) {
            return Err("the status must be a device-writable byte the device can reach".into());
        }
        for &(addr, len, _) in data {
            if !mem.check_range(addr, len as usize, vm_memory::Permissions::ReadWrite) {
                return Err(format!(
                    "buffer {:#x}+{len:#x} is outside the memory the device may reach",
                    addr.0
                ));
            }
        }
        let kind: u32 = mem.read_obj(haddr).map_err(|e| e.to_string())?;
        let sector: u64 = mem
            .read_obj(GuestAddress(
                haddr.0.checked_add(8).ok_or("header address overflows")?,
            ))
            .map_err(|e| e.to_string())?;
        let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
        let offset = sector.checked_mul(SECTOR);
        let in_range = offset
            .and_then(|b| b.checked_add(total))
            .is_some_and(|end| end <= self.capacity * SECTOR);
        let bufs = || data.iter().map(|&(a, l, _)| (a, l)).collect::<Vec<_>>();
        let writes = |want: bool| data.iter().all(|d| d.2 == want);
        let op = match kind {
            T_IN | T_OUT if !in_range => Op::Status(S_IOERR),
            T_IN if !writes(true) => Op::Status(S_IOERR),
            T_OUT if self.read_only || !writes(false) => Op::Status(S_IOERR),
            T_IN => Op::Read {
                offset: offset.unwrap_or(0),
                bufs: bufs(),
            },
            T_OUT => Op::Write {
                offset: offset.unwrap_or(0),
                bufs: bufs(),
            },
            T_FLUSH => Op::Flush,
            T_DISCARD | T_WRITE_ZEROES if self.read_only || !writes(false) => Op::Status(S_IOERR),
            T_DISCARD | T_WRITE_ZEROES => match data {
                [(addr, 16, _)] => {
                    let mut seg = [0u8; 16];
                    mem.read_slice(&mut seg, *addr).map_err(|e| e.to_string())?;
                    let start = u64::from_le_bytes(seg[..8].try_into().expect("8 bytes"));
                    let count = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
                    let fits = count <= MAX_RANGE_SECTORS
                        && start
                            .checked_add(u64::from(count))
                            .is_some_and(|end| end <= self.capacity);
                    let range = (start * SECTOR, u64::from(count) * SECTOR);
                    match (fits, kind) {
                        (false, _) => Op::Status(S_IOERR),
                        (true, T_DISCARD) => Op::Discard(range.0, range.1),
                        (true, _) => Op::Zero(range.0, range.1),
                    }
                }
                // More segments than we announced (MAX_SEGS), or a torn one.
                _ => Op::Status(S_UNSUPP),
            },
            T_GET_ID => match data.first() {
                Some(&(addr, len, true)) => Op::GetId(addr, len),
                _ => Op::Status(S_IOERR),
            },
            _ => Op::Status(S_UNSUPP),
        };
        Ok(Request {
            head: 0,
            status: saddr,
            op,
        })
    }

    fn process(&mut self) -> Result<(), DeviceError> {
        let Some(active) = self.active.clone() else {
            return Ok(());
        };
        let err = |what: String| DeviceError::Queue { queue: 0, what };
        let mut ready = Vec::new();
        {
            let mut q = active.queue.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(chain) = crate::next_chain(&mut q, &active.mem) {
                let head = chain.head_index();
                if let Some(j) = &active.journal {
                    j.popped(head, q.next_avail());
                }
                let mut descs = Vec::new();
                for d in chain {
                    if descs.len() >= MAX_CHAIN {
                        return Err(err("descriptor chain too long (a loop?)".into()));
                    }
                    descs.push((d.addr(), d.len(), d.is_write_only()));
                }
                let mut req = self
                    .parse(&active.mem, &descs)
                    .map_err(|e| err(format!("request at descriptor {head}: {e}")))?;
                req.head = head;
                ready.push(req);
            }
        }
        // A request that finds the device idle, on a thread that accepts work (`defer`), is
        // done by that thread after the notify: no hand-off. Others go to the workers, the
        // batch's last request staying here so the rest start first.
        let idle = *active.inflight.lock().unwrap_or_else(|e| e.into_inner()) == 0;
        let last = ready.len();
        for (i, req) in ready.into_iter().enumerate() {
            *active.inflight.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            if idle && i + 1 == last && crate::defer::accepting() {
                let (a, disk, id) = (active.clone(), self.disk.clone(), self.id);
                crate::defer::offer(Box::new(move || {
                    INLINE_BUF.with(|b| complete(&a, &*disk, &id, req, &mut b.borrow_mut()))
                }));
                continue;
            }
            if let Err(e) = self.jobs().send((active.clone(), req)) {
                // No worker left (they never exit while we hold the sender): do it here.
                let (a, r) = e.0;
                complete(&a, &*self.disk, &self.id, r, &mut Vec::new());
            }
        }
        Ok(())
    }
}

thread_local! {
    /// The buffer of requests a notifying thread does itself.
    static INLINE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn worker(rx: &Mutex<Receiver<Job>>, disk: &dyn Disk, id: &[u8; ID_LEN]) {
    let mut buf = Vec::new();
    loop {
        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((active, req)) = job else { return };
        complete(&active, disk, id, req, &mut buf);
    }
}

/// Runs one request and puts it on the used ring (unless the device was reset meanwhile).
fn complete(a: &Active, disk: &dyn Disk, id: &[u8; ID_LEN], req: Request, buf: &mut Vec<u8>) {
    let (status, written) = if a.live.load(Ordering::Acquire) {
        execute(&a.mem, disk, id, &req.op, buf)
    } else {
        (S_IOERR, 0)
    };
    if a.live.load(Ordering::Acquire) {
        let _ = a.mem.write_obj(status, req.status);
        let mut q = a.queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(j) = &a.journal {
            j.completed(req.head, q.next_used());
        }
        if q.add_used(&a.mem, req.head, written + 1).is_ok()
            && q.needs_notification(&a.mem).unwrap_or(true)
        {
            drop(q);
            a.irq.queue(0);
        }
    }
    let mut n = a.inflight.lock().unwrap_or_else(|e| e.into_inner());
    *n = n.saturating_sub(1);
    a.drained.notify_all();
}

/// The disk work of one request: its status and the bytes written into guest buffers.
fn execute(mem: &Memory, disk: &dyn Disk, id: &[u8], op: &Op, buf: &mut Vec<u8>) -> (u8, u32) {
    let io = |r: std::io::Result<()>| if r.is_ok() { S_OK } else { S_IOERR };
    match op {
        Op::Status(s) => (*s, 0),
        Op::Flush => (io(disk.flush()), 0),
        Op::Discard(off, len) => (io(disk.discard(*off, *len)), 0),
        Op::Zero(off, len) => (io(disk.write_zeroes(*off, *len)), 0),
        Op::GetId(addr, len) => {
            let n = (*len as usize).min(ID_LEN);
            match mem.write_slice(&id[..n], *addr) {
                Ok(()) => (S_OK, n as u32),
                Err(_) => (S_IOERR, 0),
            }
        }
        Op::Read { offset, bufs } => {
            if buf.len() < CHUNK {
                buf.resize(CHUNK, 0);
            }
            let (mut at, mut off, mut written) = (At::default(), *offset, 0u32);
            loop {
                let Some((next, n)) = walk(bufs, at, |_, _, _| true) else {
                    return (S_IOERR, written);
                };
                if n == 0 {
                    return (S_OK, written);
                }
                let ok = disk.read_at(&mut buf[..n], off).is_ok()
                    && walk(bufs, at, |a, p, m| {
                        mem.write_slice(&buf[p..p + m], a).is_ok()
                    })
                    .is_some();
                if !ok {
                    return (S_IOERR, written);
                }
                (at, off) = (next, off + n as u64);
                written = written.saturating_add(n as u32);
            }
        }
        Op::Write { offset, bufs } => {
            if buf.len() < CHUNK {
                buf.resize(CHUNK, 0);
            }
            let (mut at, mut off) = (At::default(), *offset);
            loop {
                let gathered = walk(bufs, at, |a, p, m| {
                    mem.read_slice(&mut buf[p..p + m], a).is_ok()
                });
                let Some((next, n)) = gathered else {
                    return (S_IOERR, 0);
                };
                if n == 0 {
                    return (S_OK, 0);
                }
                if disk.write_at(&buf[..n], off).is_err() {
                    return (S_IOERR, 0);
                }
                (at, off) = (next, off + n as u64);
            }
        }
    }
}

/// A place in a request's data buffers: a descriptor and the bytes of it already done.
#[derive(Clone, Copy, Default)]
struct At {
    desc: usize,
    done: u32,
}

/// The next piece of a request, up to CHUNK bytes however many descriptors it spans, so that
/// the disk sees one call per piece (a guest's 4 KiB segments, one call each, cost a syscall
/// and, on qcow2, a partly written cluster apiece). Calls `f(address, offset in the piece,
/// length)` per descriptor part; gives the place after it and the piece's length, or None if
/// `f` failed.
fn walk(
    bufs: &[(GuestAddress, u32)],
    mut at: At,
    mut f: impl FnMut(GuestAddress, usize, usize) -> bool,
) -> Option<(At, usize)> {
    let mut fill = 0;
    while fill < CHUNK {
        let Some(&(addr, len)) = bufs.get(at.desc) else {
            break;
        };
        let n = ((len - at.done) as usize).min(CHUNK - fill);
        if n > 0
            && !f(
                GuestAddress(addr.0.checked_add(u64::from(at.done))?),
                fill,
                n,
            )
        {
            return None;
        }
        fill += n;
        at.done += n as u32;
        if at.done == len {
            at = At {
                desc: at.desc + 1,
                done: 0,
            };
        }
    }
    Some((at, fill))
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        2
    }
    fn features(&self) -> u64 {
        F_SEG_MAX
            | F_FLUSH
            | if self.read_only {
                F_RO
            } else {
                F_DISCARD | F_WRITE_ZEROES
            }
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 60];
        cfg[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        cfg[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        // max_discard_sectors, max_discard_seg, discard_sector_alignment,
        // max_write_zeroes_sectors, max_write_zeroes_seg (write_zeroes_may_unmap stays 0).
        let limits = [
            (36, MAX_RANGE_SECTORS),
            (40, MAX_SEGS),
            (44, 1),
            (48, MAX_RANGE_SECTORS),
            (52, MAX_SEGS),
        ];
        for (off, v) in limits {
            cfg[off..off + 4].copy_from_slice(&v.to_le_bytes());
        }
        crate::read_config_bytes(&cfg, offset, data);
    }
    fn activate(
        &mut self,
        mem: Memory,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), DeviceError> {
        if let Some(q) = queues.pop() {
            if let Some(j) = &self.journal {
                j.reset(q.next_avail());
            }
            self.active = Some(Arc::new(Active {
                mem,
                queue: Mutex::new(q),
                irq: interrupt,
                live: AtomicBool::new(true),
                inflight: Mutex::new(0),
                drained: Condvar::new(),
                journal: self.journal.clone(),
            }));
        }
        Ok(())
    }
    fn notify(&mut self, _index: u16) -> Result<(), DeviceError> {
        self.process()
    }
    /// After a reset the device must not touch guest memory: wait for requests at the disk.
    fn reset(&mut self) {
        let Some(a) = self.active.take() else { return };
        a.live.store(false, Ordering::Release);
        let n = a.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let (n, timeout) = a
            .drained
            .wait_timeout_while(n, DRAIN, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() {
            ratelog::warn!(
                "virtio-blk reset while {} request(s) still wait for the disk",
                *n
            );
        }
    }
}
