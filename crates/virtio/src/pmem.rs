//! virtio-pmem (VIRTIO 1.2, 5.19): a file the VMM maps into the guest at `start` (the guest
//! reads and writes it as memory, with no exit), and one queue on which the driver asks for a
//! flush: the file's data reaches stable storage (`fdatasync`) before the request completes.
//! The mapping is the VMM's (`vmm`, a memslot); the model only answers the config and the
//! flushes. A flush runs on the notifying thread after the notify when that thread accepts
//! work (`crate::defer`), so a vCPU never waits for the disk and no lock is held meanwhile.

use crate::{DeviceError, Interrupt, Memory, VirtioDevice};
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub const DEVICE_TYPE: u32 = 27;
pub const QUEUE_SIZE: u16 = 32;
pub const REQ_FLUSH: u32 = 0;
pub const RESP_OK: u32 = 0;
pub const RESP_EIO: u32 = 1;
/// A region's size is a multiple of this (Linux maps it in 2 MiB sections).
pub const ALIGN: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("virtio-pmem image {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "virtio-pmem image {path}: its size, {size} bytes, is not a positive multiple of 2 MiB \
         (the guest maps the region in 2 MiB sections); grow it with `truncate -s %2M {path}`"
    )]
    Size { path: String, size: u64 },
    #[error(
        "virtio-pmem image {path}: {size} bytes does not fit the device's window of {window} \
         bytes; use a smaller image, or several devices"
    )]
    TooBig {
        path: String,
        size: u64,
        window: u64,
    },
}

/// Opens `path` read-write for a region of at most `window` bytes: the file and its size.
pub fn open(path: &Path, window: u64) -> Result<(File, u64), OpenError> {
    let name = path.display().to_string();
    let io = |source| OpenError::Io {
        path: name.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size == 0 || !size.is_multiple_of(ALIGN) {
        return Err(OpenError::Size { path: name, size });
    }
    if size > window {
        return Err(OpenError::TooBig {
            path: name,
            size,
            window,
        });
    }
    Ok((file, size))
}

struct Active {
    mem: Memory,
    /// None once the device is reset: a flush that ends later touches no ring.
    queue: Mutex<Option<Queue>>,
    irq: Arc<dyn Interrupt>,
}

pub struct Pmem {
    file: Arc<File>,
    start: u64,
    size: u64,
    active: Option<Arc<Active>>,
}

impl Pmem {
    /// The device for `file` (`size` bytes), which the VMM maps at guest address `start`.
    pub fn new(file: File, start: u64, size: u64) -> Pmem {
        Pmem {
            file: Arc::new(file),
            start,
            size,
            active: None,
        }
    }
}

/// A checked request: its head, and where its response goes.
struct Request {
    head: u16,
    resp: GuestAddress,
    kind: u32,
}

fn parse(mem: &Memory, chain: virtio_queue::DescriptorChain<&Memory>) -> Result<Request, String> {
    let head = chain.head_index();
    let descs: Vec<_> = chain.take(3).collect();
    let [req, resp] = descs.as_slice() else {
        return Err(format!(
            "request at descriptor {head}: a request is two buffers (request, response)"
        ));
    };
    if req.is_write_only() || req.len() < 4 || !resp.is_write_only() || resp.len() < 4 {
        return Err(format!(
            "request at descriptor {head}: want a 4-byte request the device reads and a \
             4-byte response it writes"
        ));
    }
    let kind: u32 = mem
        .read_obj(req.addr())
        .map_err(|e| format!("request at descriptor {head}: {e}"))?;
    Ok(Request {
        head,
        resp: resp.addr(),
        kind,
    })
}

/// Does the requests and puts them on the used ring. One sync answers every flush of the
/// batch: each asks only for what was written before the driver posted it.
fn complete(a: &Active, file: &File, reqs: Vec<Request>) {
    let flush = match reqs
        .iter()
        .any(|r| r.kind == REQ_FLUSH)
        .then(|| file.sync_data())
    {
        Some(Err(e)) => {
            ratelog::error!("virtio-pmem: flush failed: {e}");
            RESP_EIO
        }
        _ => RESP_OK,
    };
    for r in reqs {
        let ret = if r.kind == REQ_FLUSH { flush } else { RESP_EIO };
        let notify = {
            let mut q = a.queue.lock().unwrap_or_else(|e| e.into_inner());
            let Some(q) = q.as_mut() else { return };
            let written = a.mem.write_obj(ret, r.resp).is_ok();
            let _ = q.add_used(&a.mem, r.head, if written { 4 } else { 0 });
            q.needs_notification(&a.mem).unwrap_or(true)
        };
        // Not under the queue's lock: the interrupt may take the transport's.
        if notify {
            a.irq.queue(0);
        }
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&self.start.to_le_bytes());
        cfg[8..].copy_from_slice(&self.size.to_le_bytes());
        crate::read_config_bytes(&cfg, offset, data);
    }
    fn activate(
        &mut self,
        mem: Memory,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), DeviceError> {
        if let Some(q) = queues.pop() {
            self.active = Some(Arc::new(Active {
                mem,
                queue: Mutex::new(Some(q)),
                irq: interrupt,
            }));
        }
        Ok(())
    }
    fn notify(&mut self, _: u16) -> Result<(), DeviceError> {
        let Some(a) = self.active.clone() else {
            return Ok(());
        };
        let mut reqs = Vec::new();
        {
            let mut q = a.queue.lock().unwrap_or_else(|e| e.into_inner());
            let Some(q) = q.as_mut() else { return Ok(()) };
            // Bounded by the queue's size: a driver's ring holds no more.
            while let Some(chain) = crate::next_chain(q, &a.mem) {
                if reqs.len() >= usize::from(QUEUE_SIZE) {
                    break;
                }
                reqs.push(
                    parse(&a.mem, chain).map_err(|what| DeviceError::Queue { queue: 0, what })?,
                );
            }
        }
        if reqs.is_empty() {
            return Ok(());
        }
        let file = self.file.clone();
        crate::defer::offer(Box::new(move || complete(&a, &file, reqs)));
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            *a.queue.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}
