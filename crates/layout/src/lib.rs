//! The VM description and the memory map it resolves to.
//!
//! A description (TOML, over a built-in profile) becomes a [`Layout`] through [`resolve`], which
//! reports every problem it finds with the thing, the value and the fix.

pub mod desc;
pub mod layout;
pub mod problem;
pub mod profiles;
pub mod region;
pub mod resolve;
pub mod size;

pub use desc::{BackendDesc, Description, LoadError, PoolReference};
pub use layout::{
    Bar, ConsoleBackend, Device, DeviceKind, DiskFormat, Layout, NetBackend, Pci, Placement, Uart,
    V2m,
};
pub use problem::{Invalid, Problem, Rule, Severity};
pub use profiles::Profile;
pub use region::Region;
pub use resolve::{check, resolve, Resolved};
pub use size::ByteSize;
