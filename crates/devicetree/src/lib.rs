//! The guest's device tree: generated from a [`layout::Layout`], read back from any DTB,
//! printed as DTS, and linted against what a splitvirt guest needs.

pub mod dts;
pub mod gen;
pub mod lint;
pub mod tree;

pub use dts::to_dts;
pub use gen::{generate, BootInfo, GenError};
pub use lint::{lint, Finding, Level};
pub use tree::{Node, ParseError, Tree};
