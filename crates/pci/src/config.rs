//! A type 0 (endpoint) configuration header plus capabilities, 4 KiB per function.

/// Bytes of config space per function (ECAM gives every function 4 KiB).
pub const CONFIG_SIZE: usize = 4096;
pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYS_VENDOR: usize = 0x2c;
pub const SUBSYS_ID: usize = 0x2e;
pub const CAP_PTR: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_INTERRUPT: u16 = 1 << 3;
pub const STATUS_CAP_LIST: u16 = 1 << 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Mem32 {
        prefetchable: bool,
    },
    /// Takes this BAR register and the next.
    Mem64 {
        prefetchable: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// The config space of one function: bytes, which bits the guest may write, and the BARs.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    writable: Vec<u8>,
    bars: [Option<Bar>; 6],
    next_cap: usize,
    last_cap: usize,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ConfigSpace({:04x}:{:04x})",
            self.read16(VENDOR_ID),
            self.read16(DEVICE_ID)
        )
    }
}

impl ConfigSpace {
    /// A function with its identity; `class` is base class, subclass, prog-if as 0xBBSSPP.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut c = ConfigSpace {
            bytes: vec![0; CONFIG_SIZE],
            writable: vec![0; CONFIG_SIZE],
            bars: [None; 6],
            next_cap: 0x40,
            last_cap: 0,
        };
        c.set16(VENDOR_ID, vendor);
        c.set16(DEVICE_ID, device);
        c.bytes[REVISION] = revision;
        c.bytes[CLASS..CLASS + 3].copy_from_slice(&class.to_le_bytes()[..3]);
        c.bytes[HEADER_TYPE] = 0;
        // Command: memory space, bus master, INTx disable are the bits a device honours.
        c.mask16(
            COMMAND,
            COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
        );
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.set16(SUBSYS_VENDOR, vendor);
        self.set16(SUBSYS_ID, id);
    }

    /// Pin 1..=4 = INTA..INTD (read-only, as the device is wired).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
    }

    /// Declares BAR `index` (a power-of-two size of at least 16 bytes) and its initial address.
    pub fn set_bar(&mut self, index: usize, size: u64, kind: BarKind, addr: u64) {
        assert!(
            size.is_power_of_two() && size >= 16,
            "BAR sizes are powers of two >= 16"
        );
        assert!(index < 6 && !(matches!(kind, BarKind::Mem64 { .. }) && index == 5));
        self.bars[index] = Some(Bar { size, kind });
        self.write_bar_value(index, addr);
    }

    fn flags(kind: BarKind) -> u32 {
        match kind {
            BarKind::Mem32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Mem64 { prefetchable } => (2 << 1) | (u32::from(prefetchable) << 3),
        }
    }

    fn write_bar_value(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bars[index] else { return };
        let masked = addr & !(bar.size - 1);
        let lo = (masked as u32 & !0xf) | Self::flags(bar.kind);
        self.set32(BAR0 + 4 * index, lo);
        if matches!(bar.kind, BarKind::Mem64 { .. }) {
            self.set32(BAR0 + 4 * (index + 1), (masked >> 32) as u32);
        }
    }

    /// The address BAR `index` decodes now, if memory decoding is on and the BAR is set.
    pub fn bar_address(&self, index: usize) -> Option<(u64, u64)> {
        let bar = self.bars.get(index).copied().flatten()?;
        if self.read16(COMMAND) & COMMAND_MEMORY == 0 {
            return None;
        }
        let lo = u64::from(self.read32(BAR0 + 4 * index) & !0xf);
        let hi = match bar.kind {
            BarKind::Mem64 { .. } => u64::from(self.read32(BAR0 + 4 * (index + 1))) << 32,
            BarKind::Mem32 { .. } => 0,
        };
        Some((hi | lo, bar.size))
    }

    /// Appends a capability with `body` (after the ID and next bytes); `writable` masks the
    /// body bytes the guest may change. Returns the capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let at = self.next_cap;
        let len = (2 + body.len()).next_multiple_of(4);
        assert!(
            at + len <= 0x100,
            "capabilities overflow the 256-byte header"
        );
        self.bytes[at] = id;
        self.bytes[at + 2..at + 2 + body.len()].copy_from_slice(body);
        for (i, m) in writable.iter().enumerate().take(body.len()) {
            self.writable[at + 2 + i] = *m;
        }
        if self.last_cap == 0 {
            self.bytes[CAP_PTR] = at as u8;
            let st = self.read16(STATUS) | STATUS_CAP_LIST;
            self.set16(STATUS, st);
        } else {
            self.bytes[self.last_cap + 1] = at as u8;
        }
        self.last_cap = at;
        self.next_cap = at + len;
        at
    }

    pub fn read16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }
    pub fn read32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().expect("4 bytes"))
    }
    /// Device-side update (not masked): status bits, capability state.
    pub fn set16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn mask16(&mut self, off: usize, m: u16) {
        self.writable[off..off + 2].copy_from_slice(&m.to_le_bytes());
    }
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A guest read of any size at any offset: bytes beyond the space read as zero.
    pub fn read(&self, off: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(off.saturating_add(i as u64))
                .ok()
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A guest write: each byte is applied through its write mask, so read-only fields stay;
    /// BAR registers follow the sizing protocol (the size's low bits always read back as zero).
    pub fn write(&mut self, off: u64, data: &[u8]) {
        let Ok(off) = usize::try_from(off) else {
            return;
        };
        let bar_regs = BAR0..BAR0 + 24;
        let mut touched_bars = [false; 6];
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = off.checked_add(i).filter(|&o| o < CONFIG_SIZE) else {
                break;
            };
            if bar_regs.contains(&o) {
                let reg = (o - BAR0) / 4;
                self.bytes[o] = v;
                touched_bars[reg] = true;
                continue;
            }
            let m = self.writable[o];
            self.bytes[o] = (self.bytes[o] & !m) | (v & m);
        }
        for (reg, touched) in touched_bars.into_iter().enumerate() {
            if touched {
                self.settle_bar_register(reg);
            }
        }
    }

    /// After a write to BAR register `reg`, keep only the bits its BAR decodes.
    fn settle_bar_register(&mut self, reg: usize) {
        let off = BAR0 + 4 * reg;
        let raw = self.read32(off);
        // Which BAR owns this register: itself, or a 64-bit BAR just below.
        let (owner, upper) = match (
            self.bars[reg],
            reg.checked_sub(1).and_then(|r| self.bars[r]),
        ) {
            (Some(_), _) => (Some(reg), false),
            (None, Some(b)) if matches!(b.kind, BarKind::Mem64 { .. }) => (Some(reg - 1), true),
            _ => (None, false),
        };
        let Some(i) = owner else {
            self.set32(off, 0);
            return;
        };
        let bar = self.bars[i].expect("owner has a BAR");
        if upper {
            let mask = !((bar.size - 1) >> 32) as u32;
            self.set32(off, raw & mask);
        } else {
            let mask = !((bar.size - 1) as u32) & !0xf;
            self.set32(off, (raw & mask) | Self::flags(bar.kind));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> ConfigSpace {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x01_00_00, 1);
        c.set_bar(
            0,
            0x8000,
            BarKind::Mem64 { prefetchable: true },
            0x80_0000_0000,
        );
        c.set_bar(
            2,
            0x1000,
            BarKind::Mem32 {
                prefetchable: false,
            },
            0x1000_0000,
        );
        c.set_interrupt_pin(1);
        c
    }

    fn r32(c: &ConfigSpace, off: u64) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = dev();
        c.write(0, &[0xff; 4]);
        c.write(CLASS as u64, &[0; 3]);
        c.write(INTERRUPT_PIN as u64, &[4]);
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        assert_eq!(c.bytes()[CLASS + 2], 0x01);
        assert_eq!(c.bytes()[INTERRUPT_PIN], 1);
    }

    #[test]
    fn bar_sizing_protocol_32_and_64_bit() {
        let mut c = dev();
        // 64-bit BAR0/1: all ones reads back the size mask and type bits.
        c.write(0x10, &u32::MAX.to_le_bytes());
        c.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(r32(&c, 0x10), !(0x8000u32 - 1) | 0b1100);
        assert_eq!(r32(&c, 0x14), u32::MAX);
        // 32-bit BAR2.
        c.write(0x18, &u32::MAX.to_le_bytes());
        assert_eq!(r32(&c, 0x18), !(0x1000u32 - 1));
        // Unused BAR registers read zero whatever is written.
        c.write(0x1c, &u32::MAX.to_le_bytes());
        assert_eq!(r32(&c, 0x1c), 0);
    }

    #[test]
    fn bar_moves_are_seen_only_with_memory_decoding_on() {
        let mut c = dev();
        assert_eq!(c.bar_address(0), None);
        c.write(COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_address(0), Some((0x80_0000_0000, 0x8000)));
        c.write(0x10, &0x1234_5678u32.to_le_bytes());
        c.write(0x14, &0x42u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some((0x42_1234_0000, 0x8000)));
        assert_eq!(c.bar_address(1), None);
    }

    #[test]
    fn byte_and_unaligned_writes_go_through_masks() {
        let mut c = dev();
        // A 4-byte write straddling command and status: only command's writable bits change.
        c.write(0x05, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read16(COMMAND), (COMMAND_INTX_DISABLE & 0xff00));
        assert_eq!(c.read16(STATUS), 0);
        // Byte writes to a BAR assemble like a dword write.
        c.write(0x18, &[0xff]);
        c.write(0x19, &[0xff]);
        assert_eq!(r32(&c, 0x18) & 0xffff, 0xf000);
    }

    #[test]
    fn out_of_range_accesses_are_bounded() {
        let mut c = dev();
        let mut d = [0xaa; 8];
        c.read(4094, &mut d);
        assert_eq!(d, [0; 8]);
        c.read(u64::MAX - 2, &mut d);
        c.write(4095, &[1, 2, 3, 4]);
        c.write(u64::MAX, &[1]);
    }

    #[test]
    fn capabilities_chain() {
        let mut c = dev();
        let a = c.add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[]);
        let b = c.add_capability(0x09, &[0; 14], &[]);
        assert_eq!(c.bytes()[CAP_PTR] as usize, a);
        assert_eq!(c.bytes()[a + 1] as usize, b);
        assert_eq!(c.bytes()[b + 1], 0);
        assert_ne!(c.read16(STATUS) & STATUS_CAP_LIST, 0);
    }
}
