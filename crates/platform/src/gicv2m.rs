//! The GICv2m MSI frame (Arm GICv2m spec; QEMU's hw/intc/arm_gicv2m.c). KVM's vgic-v2 has no
//! v2m, and no rust-vmm crate models one: a write of an interrupt ID to MSI_SETSPI_NS raises
//! that SPI. The whole device is this file.

use crate::{put_le, MmioDevice, SpiTrigger};
use std::sync::Arc;

pub const MSI_TYPER: u64 = 0x008;
pub const MSI_SETSPI_NS: u64 = 0x040;
pub const MSI_IIDR: u64 = 0xfcc;
/// Arm's JEP106 code as implementer, product 0: what QEMU reports.
pub const IIDR_VALUE: u32 = 0x0000_043b;

pub struct Gicv2m {
    spi_base: u32,
    spi_count: u32,
    spis: Arc<dyn SpiTrigger>,
    /// Out-of-range writes seen (a guest bug or a hostile guest); logged once.
    pub rejected: u64,
}

impl Gicv2m {
    pub fn new(spi_base: u32, spi_count: u32, spis: Arc<dyn SpiTrigger>) -> Self {
        Gicv2m {
            spi_base,
            spi_count,
            spis,
            rejected: 0,
        }
    }
}

impl MmioDevice for Gicv2m {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            MSI_TYPER => (self.spi_base << 16) | (self.spi_count & 0x3ff),
            MSI_IIDR => IIDR_VALUE,
            _ => 0,
        };
        put_le(data, u64::from(v));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != MSI_SETSPI_NS || data.len() < 2 {
            return;
        }
        let id = (crate::le_value(data) & 0x3ff) as u32;
        if id >= self.spi_base && id - self.spi_base < self.spi_count {
            self.spis.trigger(id);
        } else {
            if self.rejected == 0 {
                ratelog::warn!(
                    "gicv2m: ignoring MSI to interrupt ID {id}, outside {}..{}",
                    self.spi_base,
                    self.spi_base + self.spi_count
                );
            }
            self.rejected += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen(Mutex<Vec<u32>>);
    impl SpiTrigger for Seen {
        fn trigger(&self, intid: u32) {
            self.0.lock().unwrap().push(intid);
        }
    }

    #[test]
    fn typer_iidr_and_setspi() {
        let seen = Arc::new(Seen::default());
        let mut f = Gicv2m::new(64, 64, seen.clone());
        let mut d = [0u8; 4];
        f.read(MSI_TYPER, &mut d);
        assert_eq!(u32::from_le_bytes(d), (64 << 16) | 64);
        f.read(MSI_IIDR, &mut d);
        assert_eq!(u32::from_le_bytes(d), IIDR_VALUE);
        f.write(MSI_SETSPI_NS, &70u32.to_le_bytes());
        f.write(MSI_SETSPI_NS, &(70u16).to_le_bytes());
        assert_eq!(*seen.0.lock().unwrap(), vec![70, 70]);
    }

    #[test]
    fn out_of_range_and_stray_writes_raise_nothing() {
        let seen = Arc::new(Seen::default());
        let mut f = Gicv2m::new(64, 64, seen.clone());
        for id in [0u32, 63, 128, 1023, u32::MAX] {
            f.write(MSI_SETSPI_NS, &id.to_le_bytes());
        }
        f.write(0x44, &70u32.to_le_bytes());
        f.write(MSI_SETSPI_NS, &[70]);
        assert!(seen.0.lock().unwrap().is_empty());
        assert_eq!(f.rejected, 5);
    }
}
