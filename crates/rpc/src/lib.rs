//! Virtio over RPC (docs/RPC.md): a VMM process (the proxy) and a backend process that hosts
//! the device models share a control region of two message rings and wake each other with
//! eventfds. The backend sees guest memory only through the pool it is given.
//! Nothing here knows KVM or virtio: the proxy stands in for `pci::PciFunction`s, the backend
//! serves any `pci::PciFunction`.

pub mod backend;
pub mod proxy;
pub mod setup;
pub mod shm;
pub mod wire;

pub use proxy::{Event, Link, Proxy, Registration, RemoteFunction};
pub use shm::{Bell, Doorbell, Region};
pub use wire::{Msg, Op};
