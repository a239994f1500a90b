//! A named range of guest physical addresses.

use crate::size::ByteSize;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    pub base: u64,
    pub size: u64,
}

impl Region {
    pub fn new(name: impl Into<String>, base: u64, size: u64) -> Self {
        Region {
            name: name.into(),
            base,
            size,
        }
    }

    /// One past the last byte; `None` when the region wraps past 2^64.
    pub fn end(&self) -> Option<u64> {
        self.base.checked_add(self.size)
    }

    /// Last byte (inclusive), saturating, for messages.
    pub fn last(&self) -> u64 {
        self.base.saturating_add(self.size.saturating_sub(1))
    }

    pub fn overlaps(&self, other: &Region) -> bool {
        self.size != 0 && other.size != 0 && self.base <= other.last() && other.base <= self.last()
    }

    pub fn contains(&self, other: &Region) -> bool {
        other.base >= self.base && other.last() <= self.last()
    }

    pub fn contains_addr(&self, addr: u64) -> bool {
        addr >= self.base && addr <= self.last() && self.size != 0
    }
}

/// `RAM [0x40000000-0x5fffffff] (512 MiB)`: the kernel's own way of printing ranges.
impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{:#x}-{:#x}] ({})",
            self.name,
            self.base,
            self.last(),
            ByteSize(self.size)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_symmetric_and_touching_is_not_overlap() {
        let a = Region::new("a", 0x1000, 0x1000);
        let b = Region::new("b", 0x2000, 0x1000);
        let c = Region::new("c", 0x1fff, 2);
        assert!(!a.overlaps(&b) && !b.overlaps(&a));
        assert!(a.overlaps(&c) && c.overlaps(&a) && b.overlaps(&c));
    }

    #[test]
    fn top_of_address_space_does_not_wrap() {
        let top = Region::new("top", u64::MAX - 0xfff, 0x1000);
        assert_eq!(top.end(), None);
        assert_eq!(top.last(), u64::MAX);
        assert!(top.contains_addr(u64::MAX));
    }

    #[test]
    fn prints_inclusive_range_and_size() {
        let r = Region::new("RAM", 0x4000_0000, 512 << 20);
        assert_eq!(r.to_string(), "RAM [0x40000000-0x5fffffff] (512 MiB)");
    }
}
