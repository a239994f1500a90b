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

/// RAM below the pool, the pool, RAM above it: up to three regions. The pool is a memfd (it
/// is shared with the backend); the rest is private anonymous memory, which the host backs
/// with transparent huge pages (a first touch of guest memory is a stage-2 fault, costly
/// under nested virtualization), unless `[memory] shared` asks for a memfd there too.
pub fn guest_ram(l: &Layout) -> Result<GuestRam, MemoryError> {
    let ram = if l.ram_shared {
        Some(memfd(c"splitvirt-ram", l.ram.size)?)
    } else {
        None
    };
    let rest = |offset: u64| -> Result<Option<FileOffset>, MemoryError> {
        ram.as_ref()
            .map(|f| Ok(FileOffset::new(clone(f)?, offset)))
            .transpose()
    };
    let Some(pool) = &l.pool else {
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(l.ram.base),
            l.ram.size as usize,
            rest(0)?,
        )])
        .map_err(|e| MemoryError(e.to_string()))?;
        advise_huge(&mem, None);
        return Ok(GuestRam { mem, pool_fd: None });
    };
    let pool_fd = memfd(c"splitvirt-pool", pool.size)?;
    let (end, pool_end) = (l.ram.base + l.ram.size, pool.base + pool.size);
    let mut ranges = Vec::new();
    if pool.base > l.ram.base {
        ranges.push((
            GuestAddress(l.ram.base),
            (pool.base - l.ram.base) as usize,
            rest(0)?,
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
            rest(pool_end - l.ram.base)?,
        ));
    }
    let mem =
        GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| MemoryError(e.to_string()))?;
    advise_huge(&mem, Some(pool.base));
    Ok(GuestRam {
        mem,
        pool_fd: Some(pool_fd),
    })
}

/// Asks for transparent huge pages on the anonymous regions (all but the pool's), for hosts
/// whose THP setting is `madvise`; a host that refuses keeps 4 KiB pages, so failure is fine.
fn advise_huge(mem: &GuestMemoryMmap<()>, pool_base: Option<u64>) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in mem.iter() {
        if Some(r.start_addr().0) == pool_base || r.file_offset().is_some() {
            continue;
        }
        // SAFETY: advice on a mapping this GuestMemoryMmap owns, its whole length.
        unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
    }
}

/// The pool memfd mapped at the pool's guest address: all a device may reach.
pub fn pool_memory(base: u64, size: u64, fd: &File) -> Result<GuestMemoryMmap<()>, MemoryError> {
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(base),
        size as usize,
        Some(FileOffset::new(clone(fd)?, 0)),
    )])
    .map_err(|e| MemoryError(format!("mapping the pool: {e}")))
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

    /// VmFlags of the mapping that holds `addr`, from /proc/self/smaps (the kernel may merge
    /// a region with a neighbour of the same kind, so it need not start there).
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(l) = lines.next() {
            let range = l.split_whitespace().next().and_then(|r| {
                let (a, b) = r.split_once('-')?;
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            });
            if range.is_some_and(|(a, b)| a <= addr && addr < b) {
                for l in lines.by_ref() {
                    if let Some(f) = l.strip_prefix("VmFlags:") {
                        return f.to_owned();
                    }
                }
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    /// RAM outside the pool is private anonymous memory advised for huge pages; the pool is
    /// the memfd; `[memory] shared = true` puts the rest in a memfd too.
    #[test]
    fn ram_outside_the_pool_is_anonymous_and_asks_for_huge_pages() {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let l = layout::resolve(&layout::Description::default_vm())
            .unwrap()
            .layout;
        let pool = l.pool.clone().unwrap();
        let ram = guest_ram(&l).unwrap();
        for r in ram.mem.iter() {
            let is_pool = r.start_addr().0 == pool.base;
            assert_eq!(r.file_offset().is_some(), is_pool);
            let flags = vm_flags(r.as_ptr() as usize);
            assert_eq!(flags.contains(" hg"), !is_pool, "{flags}");
        }
        let shared =
            layout::resolve(&layout::Description::parse("[memory]\nshared = true\n", "t").unwrap())
                .unwrap()
                .layout;
        assert!(guest_ram(&shared)
            .unwrap()
            .mem
            .iter()
            .all(|r| r.file_offset().is_some()));
    }

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
