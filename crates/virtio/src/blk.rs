//! virtio-blk (VIRTIO 1.2, 5.2) on a raw image file: IN, OUT, FLUSH (fdatasync before the
//! request completes), GET_ID, and a read-only mode. Every request is checked against the
//! disk's size and the memory the device may reach before any byte moves.

use crate::{DeviceError, Interrupt, Memory, VirtioDevice};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

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

const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const SEG_MAX: u32 = 126;
/// A chain longer than this is a loop or an attack (queue size bounds an honest one).
const MAX_CHAIN: usize = QUEUE_SIZE as usize;
const ID_LEN: usize = 20;

pub struct Block {
    file: File,
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    active: Option<(Memory, Queue, Arc<dyn Interrupt>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("disk image {path}: {why}")]
pub struct OpenError {
    path: String,
    why: String,
}

impl Block {
    pub fn open(path: &Path, read_only: bool) -> Result<Block, OpenError> {
        let err = |why: String| OpenError {
            path: path.display().to_string(),
            why,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| {
                err(format!(
                    "cannot open it{}: {e}",
                    if read_only {
                        ""
                    } else {
                        " for writing (set read_only = true?)"
                    }
                ))
            })?;
        let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
        if len % SECTOR != 0 {
            return Err(err(format!(
                "its size {len} is not a multiple of 512 bytes; pad it (truncate -s)"
            )));
        }
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (d, s) in id.iter_mut().zip(name.bytes()) {
            *d = s;
        }
        Ok(Block {
            file,
            capacity: len / SECTOR,
            read_only,
            id,
            active: None,
        })
    }

    /// One request; returns the bytes written into the guest's buffers (status included).
    fn request(
        file: &File,
        capacity: u64,
        read_only: bool,
        id: &[u8; ID_LEN],
        mem: &Memory,
        descs: &[(GuestAddress, u32, bool)],
    ) -> Result<u32, String> {
        let (&(haddr, hlen, hw), rest) = descs.split_first().ok_or("empty chain")?;
        let (&(saddr, slen, sw), data) = rest.split_last().ok_or("no status descriptor")?;
        if hw || hlen < 16 {
            return Err("the request header must be a device-readable buffer of 16 bytes".into());
        }
        if !sw || slen < 1 {
            return Err("the status must be a device-writable byte".into());
        }
        let kind: u32 = mem.read_obj(haddr).map_err(|e| e.to_string())?;
        let sector: u64 = mem
            .read_obj(GuestAddress(
                haddr.0.checked_add(8).ok_or("header address overflows")?,
            ))
            .map_err(|e| e.to_string())?;
        let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
        let in_range = sector
            .checked_mul(SECTOR)
            .and_then(|b| b.checked_add(total))
            .is_some_and(|end| end <= capacity * SECTOR);
        let mut written = 0u32;
        let status = match kind {
            T_IN | T_OUT if !in_range => S_IOERR,
            T_IN if data.iter().any(|d| !d.2) => S_IOERR,
            T_OUT if read_only || data.iter().any(|d| d.2) => S_IOERR,
            T_IN => {
                let mut off = sector * SECTOR;
                for &(addr, len, _) in data {
                    let mut buf = vec![0u8; len as usize];
                    match file.read_exact_at(&mut buf, off) {
                        Ok(()) => mem.write_slice(&buf, addr).map_err(|e| e.to_string())?,
                        Err(_) => return Self::finish(mem, saddr, S_IOERR, written),
                    }
                    off += u64::from(len);
                    written += len;
                }
                S_OK
            }
            T_OUT => {
                let mut off = sector * SECTOR;
                for &(addr, len, _) in data {
                    let mut buf = vec![0u8; len as usize];
                    mem.read_slice(&mut buf, addr).map_err(|e| e.to_string())?;
                    if file.write_all_at(&buf, off).is_err() {
                        return Self::finish(mem, saddr, S_IOERR, written);
                    }
                    off += u64::from(len);
                }
                S_OK
            }
            // Data is on stable storage before the guest hears the flush is done.
            T_FLUSH => match file.sync_data() {
                Ok(()) => S_OK,
                Err(_) => S_IOERR,
            },
            T_DISCARD | T_WRITE_ZEROES if read_only || data.iter().any(|d| d.2) => S_IOERR,
            T_DISCARD | T_WRITE_ZEROES => {
                let mut status = S_OK;
                for &(addr, len, _) in data {
                    if len % 16 != 0 || len / 16 > MAX_SEGS {
                        status = S_UNSUPP;
                        break;
                    }
                    let mut seg = [0u8; 16];
                    mem.read_slice(&mut seg, addr).map_err(|e| e.to_string())?;
                    let start = u64::from_le_bytes(seg[..8].try_into().expect("8 bytes"));
                    let count = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
                    let fits = count <= MAX_RANGE_SECTORS
                        && start
                            .checked_add(u64::from(count))
                            .is_some_and(|end| end <= capacity);
                    if !fits {
                        status = S_IOERR;
                        break;
                    }
                    let (off, bytes) = (start * SECTOR, u64::from(count) * SECTOR);
                    let ok = if kind == T_DISCARD {
                        discard(file, off, bytes)
                    } else {
                        zero(file, off, bytes)
                    };
                    if !ok {
                        status = S_IOERR;
                        break;
                    }
                }
                status
            }
            T_GET_ID => match data.first() {
                Some(&(addr, len, true)) => {
                    let n = (len as usize).min(ID_LEN);
                    mem.write_slice(&id[..n], addr).map_err(|e| e.to_string())?;
                    written += n as u32;
                    S_OK
                }
                _ => S_IOERR,
            },
            _ => S_UNSUPP,
        };
        Self::finish(mem, saddr, status, written)
    }

    fn finish(
        mem: &Memory,
        status_addr: GuestAddress,
        status: u8,
        written: u32,
    ) -> Result<u32, String> {
        mem.write_obj(status, status_addr)
            .map_err(|e| e.to_string())?;
        Ok(written + 1)
    }

    fn process(&mut self) -> Result<(), DeviceError> {
        let Some((mem, q, irq)) = self.active.as_mut() else {
            return Ok(());
        };
        let err = |what: String| DeviceError::Queue { queue: 0, what };
        let mut used_any = false;
        while let Some(chain) = q.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let mut descs = Vec::new();
            for d in chain {
                if descs.len() >= MAX_CHAIN {
                    return Err(err("descriptor chain too long (a loop?)".into()));
                }
                descs.push((d.addr(), d.len(), d.is_write_only()));
            }
            let len = Self::request(
                &self.file,
                self.capacity,
                self.read_only,
                &self.id,
                mem,
                &descs,
            )
            .map_err(|e| err(format!("request at descriptor {head}: {e}")))?;
            q.add_used(&*mem, head, len)
                .map_err(|e| err(e.to_string()))?;
            used_any = true;
        }
        if used_any && q.needs_notification(&*mem).unwrap_or(true) {
            irq.queue(0);
        }
        Ok(())
    }
}

/// DISCARD is a hint: punch a hole where the file system can, succeed either way.
fn discard(file: &File, off: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return false;
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on our own descriptor with in-range values.
    let _ = unsafe { libc::fallocate(file.as_raw_fd(), mode, o, l) };
    true
}

/// WRITE_ZEROES must leave zeros: ZERO_RANGE where supported, else write them.
fn zero(file: &File, off: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return false;
    };
    let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on our own descriptor with in-range values.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, o, l) } == 0 {
        return true;
    }
    let chunk = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        if file.write_all_at(&chunk[..n], off + done).is_err() {
            return false;
        }
        done += n as u64;
    }
    true
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
        &[QUEUE_SIZE]
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
    fn activate(&mut self, mem: Memory, mut queues: Vec<Queue>, interrupt: Arc<dyn Interrupt>) {
        if let Some(q) = queues.pop() {
            self.active = Some((mem, q, interrupt));
        }
    }
    fn notify(&mut self, _index: u16) -> Result<(), DeviceError> {
        self.process()
    }
    fn reset(&mut self) {
        self.active = None;
    }
}
