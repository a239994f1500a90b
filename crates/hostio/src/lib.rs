//! The host side of the devices: what a virtio device reaches outside the guest (disk images,
//! TAPs, console sockets and ptys, links between VMs), opened by splitvirt (`hostends`) and
//! used by whichever process serves the device (`devices::build`), and the pool mapping that
//! is all of the guest a device may reach. Shared by splitvirt (`vmm`) and the backend
//! process (`backend`); it knows nothing of the hypervisor.

pub mod devices;
pub mod endpoint;
pub mod hostends;
pub mod tap;

use std::fs::File;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
#[error("mapping the pool: {0}")]
pub struct PoolError(String);

/// The pool (a memfd, or a device VM's port at `offset`) mapped at the pool's guest address:
/// all a device may reach.
pub fn pool_memory(
    base: u64,
    size: u64,
    fd: &File,
    offset: u64,
) -> Result<GuestMemoryMmap<()>, PoolError> {
    let fd = fd.try_clone().map_err(|e| PoolError(e.to_string()))?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(base),
        size as usize,
        Some(FileOffset::new(fd, offset)),
    )])
    .map_err(|e| PoolError(e.to_string()))
}
