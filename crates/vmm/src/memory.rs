//! Guest RAM as the VMM holds it: two memfds, one for the restricted pool and one for the rest
//! of RAM, so that the pool can be handed to a backend process without the rest (a process
//! holding the RAM memfd could map all of it). Devices in this process get a mapping of the
//! pool memfd alone, exactly what a backend maps.

use layout::Layout;
use std::fs::File;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
#[error("guest memory: {0}")]
pub struct MemoryError(pub String);

pub struct GuestRam {
    /// All of RAM, pool included, as the vCPUs see it.
    pub mem: GuestMemoryMmap<()>,
    pub pool_fd: Option<File>,
}

/// A memfd sealed at `size`: whoever it is handed to (a backend, a peer VM) cannot shrink it
/// under splitvirt's mappings.
pub fn memfd(name: &std::ffi::CStr, size: u64) -> Result<File, MemoryError> {
    rpc::shm::sealed_memfd(name, size)
        .map(File::from)
        .map_err(|e| MemoryError(format!("a sealed memfd of {size} bytes: {e}")))
}

fn clone(f: &File) -> Result<File, MemoryError> {
    f.try_clone()
        .map_err(|e| MemoryError(format!("memfd: {e}")))
}

/// RAM below the pool, the pool, RAM above it: up to three regions from two memfds.
pub fn guest_ram(l: &Layout) -> Result<GuestRam, MemoryError> {
    let ram = memfd(c"splitvirt-ram", l.ram.size)?;
    let Some(pool) = &l.pool else {
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(l.ram.base),
            l.ram.size as usize,
            Some(FileOffset::new(ram, 0)),
        )])
        .map_err(|e| MemoryError(e.to_string()))?;
        return Ok(GuestRam { mem, pool_fd: None });
    };
    let pool_fd = memfd(c"splitvirt-pool", pool.size)?;
    let (end, pool_end) = (l.ram.base + l.ram.size, pool.base + pool.size);
    let mut ranges = Vec::new();
    if pool.base > l.ram.base {
        ranges.push((
            GuestAddress(l.ram.base),
            (pool.base - l.ram.base) as usize,
            Some(FileOffset::new(clone(&ram)?, 0)),
        ));
    }
    ranges.push((
        GuestAddress(pool.base),
        pool.size as usize,
        Some(FileOffset::new(clone(&pool_fd)?, 0)),
    ));
    if end > pool_end {
        ranges.push((
            GuestAddress(pool_end),
            (end - pool_end) as usize,
            Some(FileOffset::new(clone(&ram)?, pool_end - l.ram.base)),
        ));
    }
    let mem =
        GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| MemoryError(e.to_string()))?;
    Ok(GuestRam {
        mem,
        pool_fd: Some(pool_fd),
    })
}

/// The pool memfd mapped at the pool's guest address: all a device may reach.
pub fn pool_memory(base: u64, size: u64, fd: &File) -> Result<GuestMemoryMmap<()>, MemoryError> {
    hostio::pool_memory(base, size, fd).map_err(|e| MemoryError(e.to_string()))
}

/// What devices in this process may reach: the pool alone, or all of RAM without a pool.
pub fn device_memory(l: &Layout, ram: &GuestRam) -> Result<GuestMemoryMmap<()>, MemoryError> {
    match (&l.pool, &ram.pool_fd) {
        (Some(p), Some(fd)) => pool_memory(p.base, p.size, fd),
        _ => Ok(ram.mem.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn the_pool_memfd_is_sealed_at_its_size() {
        let l = layout::resolve(&layout::Description::default_vm())
            .unwrap()
            .layout;
        let pool = l.pool.clone().unwrap();
        let fd = guest_ram(&l).unwrap().pool_fd.unwrap();
        rpc::shm::check_sealed(&fd, pool.size, "pool").unwrap();
        assert!(fd.set_len(4096).is_err(), "a shrink went through");
        assert!(fd.set_len(pool.size * 2).is_err(), "a growth went through");
    }

    #[test]
    fn the_pool_is_its_own_memfd_and_devices_see_only_it() {
        let l = layout::resolve(&layout::Description::default_vm())
            .unwrap()
            .layout;
        let pool = l.pool.clone().unwrap();
        let ram = guest_ram(&l).unwrap();
        assert_eq!(ram.mem.num_regions(), 3);
        ram.mem
            .write_obj(0x1234_5678u32, GuestAddress(pool.base + 8))
            .unwrap();
        ram.mem
            .write_obj(0xdeadu32, GuestAddress(l.ram.base))
            .unwrap();
        let dev = device_memory(&l, &ram).unwrap();
        assert_eq!(
            dev.read_obj::<u32>(GuestAddress(pool.base + 8)).unwrap(),
            0x1234_5678
        );
        assert!(dev.read_obj::<u32>(GuestAddress(l.ram.base)).is_err());
        assert!(dev
            .read_obj::<u32>(GuestAddress(pool.base + pool.size))
            .is_err());
        // The pool memfd holds the pool's bytes and nothing else.
        let fd = ram.pool_fd.as_ref().unwrap();
        assert_eq!(fd.metadata().unwrap().len(), pool.size);
    }
}
