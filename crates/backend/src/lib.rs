//! The backend process: `serve` (its main), `jail` and `policy` (what confines it); and
//! `device_vm`, the same serving loop inside a device VM, over its rpc-port.

pub mod device_vm;
pub mod jail;
pub mod policy;
pub mod serve;
