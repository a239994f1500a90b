//! The backend process: `serve` (its main), `jail` and `policy` (what confines it).

pub mod jail;
pub mod policy;
pub mod serve;
