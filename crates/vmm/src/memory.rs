//! Guest RAM as the VMM holds it: the restricted pool is a memfd of its own, so that it can be
//! handed to a backend process (or a device VM) without the rest; the rest of RAM is anonymous
//! memory of this process, which no other process can map, backed by transparent huge pages
//! where the host allows them (every first touch of guest memory is a stage-2 fault, costly
//! under nested virtualization: 2 MiB pages make 512 times fewer). Devices in this process get
//! a mapping of the pool memfd alone, exactly what a backend maps.

use layout::Layout;
use std::fs::File;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

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

/// A transparent huge page (arm64 and x86_64 with 4 KiB base pages).
const HUGE: usize = 2 << 20;

/// The restricted pool: a sealed memfd (it is shared with the backend), on 2 MiB hugetlb pages
/// when `huge` and the host has enough of them free, else on 4 KiB pages (the host's shmem gets
/// no transparent huge pages by default), logged once. The guest zeroes the whole pool when
/// its first device attaches: on 4 KiB pages that is a stage-2 fault per page.
fn pool_memfd(size: u64, huge: bool) -> Result<File, MemoryError> {
    if huge && size.is_multiple_of(HUGE as u64) {
        match hugetlb_memfd(size) {
            Ok(f) => return Ok(f),
            Err(why) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    log::info!(
                        "the restricted pool gets no huge pages ({why}): the guest's first \
                         touch of it faults per 4 KiB page; reserving {} 2 MiB pages \
                         (/proc/sys/vm/nr_hugepages) gives it some",
                        size / HUGE as u64
                    )
                });
            }
        }
    }
    memfd(c"splitvirt-pool", size)
}

/// A sealed memfd on hugetlb pages, its pages reserved now (a shared mapping reserves them
/// for the file, so a later one cannot fail for want of pages).
fn hugetlb_memfd(size: u64) -> Result<File, String> {
    let flags = libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    let f = File::from(
        rpc::shm::sealed_memfd_with(c"splitvirt-pool", size, flags).map_err(|e| e.to_string())?,
    );
    // SAFETY: a shared mapping of our own memfd, unmapped at once; it only reserves pages.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(format!(
                "no {} free 2 MiB hugetlb pages: {}",
                size / HUGE as u64,
                std::io::Error::last_os_error()
            ));
        }
        libc::munmap(p, size as usize);
    }
    Ok(f)
}

/// Anonymous private memory of `size` bytes at a 2 MiB-aligned address (so that the host's
/// huge pages line up with the guest's, whose RAM is 2 MiB-aligned too), with huge pages asked
/// for (`huge`; otherwise refused). Whether it got them, the host's settings say: logged once
/// when it cannot.
fn anonymous(size: usize, huge: bool) -> Result<MmapRegion<()>, MemoryError> {
    let (prot, flags) = (
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
    );
    let err = |what: &str| {
        MemoryError(format!(
            "{what} {size} bytes: {}",
            std::io::Error::last_os_error()
        ))
    };
    let span = size.checked_add(HUGE).ok_or_else(|| err("cannot size"))?;
    // SAFETY: a new anonymous mapping, trimmed below to the aligned part, which this process
    // keeps for the VM's life (the region does not unmap it: it is raw).
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), span, prot, flags, -1, 0);
        if p == libc::MAP_FAILED {
            return Err(err("cannot map"));
        }
        let start = (p as usize).next_multiple_of(HUGE);
        let head = start - p as usize;
        if head > 0 {
            libc::munmap(p, head);
        }
        let tail = span - head - size;
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        if libc::madvise(start as *mut libc::c_void, size, advice) != 0 {
            if huge {
                no_huge_pages(&std::io::Error::last_os_error().to_string());
            }
        } else if let Some(why) = thp_disabled().filter(|_| huge) {
            no_huge_pages(&why);
        }
        MmapRegion::build_raw(start as *mut u8, size, prot, flags)
            .map_err(|e| MemoryError(format!("guest RAM of {size} bytes: {e}")))
    }
}

/// Why the host gives no transparent huge pages, if it says so.
fn thp_disabled() -> Option<String> {
    const KNOB: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
    let s = std::fs::read_to_string(KNOB).ok()?;
    s.contains("[never]").then(|| format!("{KNOB} is never"))
}

fn no_huge_pages(why: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::info!(
            "guest RAM gets no transparent huge pages ({why}): every first touch of a 4 KiB page \
             is a fault; `echo madvise > /sys/kernel/mm/transparent_hugepage/enabled` allows them"
        )
    });
}

/// RAM below the pool, the pool, RAM above it: up to three regions, the pool's from its memfd.
pub fn guest_ram(l: &Layout) -> Result<GuestRam, MemoryError> {
    let region = |base: u64, size: u64, fd: Option<&File>| -> Result<_, MemoryError> {
        let mapping = match fd {
            None => anonymous(size as usize, l.ram_huge_pages)?,
            Some(f) => {
                let f = f
                    .try_clone()
                    .map_err(|e| MemoryError(format!("memfd: {e}")))?;
                MmapRegion::from_file(FileOffset::new(f, 0), size as usize)
                    .map_err(|e| MemoryError(format!("the pool of {size} bytes: {e}")))?
            }
        };
        GuestRegionMmap::new(mapping, GuestAddress(base))
            .ok_or_else(|| MemoryError(format!("a region at {base:#x} overflows")))
    };
    let end = l.ram.base + l.ram.size;
    let Some(pool) = &l.pool else {
        let mem = GuestMemoryMmap::from_regions(vec![region(l.ram.base, l.ram.size, None)?])
            .map_err(|e| MemoryError(e.to_string()))?;
        return Ok(GuestRam { mem, pool_fd: None });
    };
    let pool_fd = pool_memfd(pool.size, l.ram_huge_pages)?;
    let pool_end = pool.base + pool.size;
    let mut regions = Vec::new();
    if pool.base > l.ram.base {
        regions.push(region(l.ram.base, pool.base - l.ram.base, None)?);
    }
    regions.push(region(pool.base, pool.size, Some(&pool_fd))?);
    if end > pool_end {
        regions.push(region(pool_end, end - pool_end, None)?);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError(e.to_string()))?;
    Ok(GuestRam {
        mem,
        pool_fd: Some(pool_fd),
    })
}

/// The pool memfd mapped at the pool's guest address: all a device may reach.
pub fn pool_memory(base: u64, size: u64, fd: &File) -> Result<GuestMemoryMmap<()>, MemoryError> {
    hostio::pool_memory(base, size, fd, 0).map_err(|e| MemoryError(e.to_string()))
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
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    /// RAM outside the pool is anonymous memory no other process can map, placed so that
    /// host huge pages line up with the guest's 2 MiB-aligned RAM, and marked for huge pages
    /// (the kernel's "hg" flag on the mapping) where the host has them.
    #[test]
    fn ram_outside_the_pool_is_anonymous_aligned_and_asks_for_huge_pages() {
        let l = layout::resolve(&layout::Description::default_vm())
            .unwrap()
            .layout;
        let ram = guest_ram(&l).unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
        let mut anonymous = 0;
        for r in ram.mem.iter() {
            let host = r.as_ptr() as usize;
            let in_pool = l.pool.as_ref().unwrap().base == r.start_addr().0;
            assert_eq!(
                r.file_offset().is_some(),
                in_pool,
                "only the pool is a file"
            );
            if in_pool {
                continue;
            }
            anonymous += 1;
            assert_eq!(host % HUGE, 0, "aligned for huge pages");
            // The mapping's entry starts with its address; its VmFlags line follows.
            let flags = smaps
                .lines()
                .skip_while(|l| !l.starts_with(&format!("{host:x}-")))
                .find(|l| l.starts_with("VmFlags:"))
                .unwrap_or_else(|| panic!("no mapping at {host:x} in smaps"));
            if thp {
                assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
            }
        }
        assert_eq!(anonymous, 2, "RAM below and above the pool");
    }

    /// The pool on hugetlb pages where the host has them free: a hugetlbfs file, sealed like
    /// any pool; where it has none, an error that says how to give it some, and a plain memfd.
    #[test]
    fn the_pool_takes_hugetlb_pages_where_there_are_some() {
        const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
        let size = 4 * HUGE as u64;
        let on_hugetlbfs = |f: &File| {
            // SAFETY: fstatfs into a zeroed buffer on our own descriptor.
            let mut s: libc::statfs = unsafe { std::mem::zeroed() };
            assert_eq!(
                unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(f), &mut s) },
                0
            );
            s.f_type as i64 == HUGETLBFS_MAGIC
        };
        match hugetlb_memfd(size) {
            Ok(f) => {
                assert!(on_hugetlbfs(&f));
                rpc::shm::check_sealed(&f, size, "pool").unwrap();
                assert!(f.set_len(HUGE as u64).is_err(), "a shrink went through");
            }
            Err(why) => assert!(why.contains("hugetlb pages"), "{why}"),
        }
        assert!(!on_hugetlbfs(&pool_memfd(size, false).unwrap()));
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
