//! PCI as the guest sees it, with no hypervisor in sight: type 0 config space with write masks
//! and the BAR sizing protocol, capability lists, MSI-X tables, and an ECAM decoder that routes
//! config accesses to functions (absent ones read as all ones). Every value a guest writes is
//! masked or bounded here; nothing a guest does can panic this crate.

pub mod config;
pub mod ecam;
pub mod msix;
pub mod watch;

pub use config::{BarKind, ConfigSpace};
pub use ecam::{Ecam, PciFunction};
pub use msix::MsixTable;
pub use watch::BarWatch;
