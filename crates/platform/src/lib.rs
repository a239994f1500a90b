//! The board's own device models. Each is a plain struct with `read(offset, data)` and
//! `write(offset, data)` and an interrupt handle: no KVM, testable with no VM at all.

pub mod gicv2m;
pub mod pl011;
pub mod shared_line;

/// A level-triggered interrupt line into the interrupt controller.
pub trait IrqLine: Send + Sync {
    fn set_level(&self, high: bool);
}

/// Raises an SPI by interrupt ID as an edge (what an MSI is).
pub trait SpiTrigger: Send + Sync {
    fn trigger(&self, intid: u32);
}

/// A device on the MMIO bus. Offsets are relative to the device's base; `data` is the access.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Reads an access of 1..=8 bytes as a little-endian value (longer accesses: the first 8).
pub fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Fills an access with a little-endian value.
pub fn put_le(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = b.get(i).copied().unwrap_or(0);
    }
}
