//! The MSI-X table and pending bit array that live in a BAR (PCI Local Bus 3.0, 6.8.2).
//! Vectors start masked; a vector signalled while masked sets its pending bit and fires when
//! the guest unmasks it.

use crate::config::ConfigSpace;

pub const CAP_ID: u8 = 0x11;
const ENTRY: u64 = 16;
const CTRL_MASKED: u32 = 1;
const MSG_CTRL_ENABLE: u16 = 1 << 15;
const MSG_CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// The spec allows 2048 vectors.
pub const MAX_VECTORS: u16 = 2048;

/// A message to deliver: address and data as the guest programmed them.
pub type Message = (u64, u32);

#[derive(Clone, Debug)]
pub struct MsixTable {
    entries: Vec<[u32; 4]>,
    pending: Vec<bool>,
    /// Offset of the capability in config space.
    cap: usize,
    /// Message Control as the guest last wrote it (see `sync`).
    control: u16,
}

impl MsixTable {
    /// Adds the capability to `cfg`: `n` vectors, table at `table_off` and PBA at `pba_off`
    /// of BAR `bir`.
    pub fn new(cfg: &mut ConfigSpace, n: u16, bir: u8, table_off: u32, pba_off: u32) -> Self {
        let n = n.clamp(1, MAX_VECTORS);
        let mut body = Vec::new();
        body.extend_from_slice(&(n - 1).to_le_bytes());
        body.extend_from_slice(&(table_off | u32::from(bir)).to_le_bytes());
        body.extend_from_slice(&(pba_off | u32::from(bir)).to_le_bytes());
        let cap = cfg.add_capability(CAP_ID, &body, &[0x00, 0xc0]);
        MsixTable {
            entries: vec![[0, 0, 0, CTRL_MASKED]; usize::from(n)],
            pending: vec![false; usize::from(n)],
            cap,
            control: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY
    }

    /// Takes the enable and function-mask bits from config space after a guest config write,
    /// so that the table can be signalled without it (from a device thread). Returns messages
    /// that became due, with their vectors.
    pub fn sync(&mut self, cfg: &ConfigSpace) -> Vec<(u16, Message)> {
        self.control = cfg.read16(self.cap + 2);
        self.due()
    }

    pub fn enabled(&self) -> bool {
        self.control & MSG_CTRL_ENABLE != 0
    }

    fn masked(&self, v: usize) -> bool {
        self.control & MSG_CTRL_FUNCTION_MASK != 0 || self.entries[v][3] & CTRL_MASKED != 0
    }

    /// Vector `v`'s message while the guest lets it be sent (MSI-X enabled, vector and
    /// function unmasked): where an interrupt the hypervisor raises itself may go.
    pub fn deliverable(&self, v: u16) -> Option<Message> {
        let v = usize::from(v);
        (v < self.entries.len() && self.enabled() && !self.masked(v)).then(|| self.message(v))
    }

    /// The device raises vector `v`: the message to send now, or none (masked: pending).
    pub fn signal(&mut self, v: u16) -> Option<Message> {
        let v = usize::from(v);
        if v >= self.entries.len() || !self.enabled() {
            return None;
        }
        if self.masked(v) {
            self.pending[v] = true;
            return None;
        }
        Some(self.message(v))
    }

    fn message(&self, v: usize) -> Message {
        let e = self.entries[v];
        ((u64::from(e[1]) << 32) | u64::from(e[0]), e[2])
    }

    /// Messages that became due (pending vectors now unmasked), with their vectors.
    fn due(&mut self) -> Vec<(u16, Message)> {
        let mut out = Vec::new();
        if !self.enabled() {
            return out;
        }
        for v in 0..self.entries.len() {
            if self.pending[v] && !self.masked(v) {
                self.pending[v] = false;
                out.push((v as u16, self.message(v)));
            }
        }
        out
    }

    /// Guest read of the table (offset from the table's start); out of range reads zero.
    pub fn read_table(&self, off: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let o = off.saturating_add(i as u64);
            let e = usize::try_from(o / ENTRY)
                .ok()
                .and_then(|e| self.entries.get(e));
            *d = e.map_or(0, |e| {
                e[((o % ENTRY) / 4) as usize].to_le_bytes()[(o % 4) as usize]
            });
        }
    }

    /// The message vector `v` is programmed with, whether or not it may be sent now.
    pub fn entry(&self, v: u16) -> Option<Message> {
        (usize::from(v) < self.entries.len()).then(|| self.message(usize::from(v)))
    }

    /// Guest write of the table; returns messages that an unmask made due, with their vectors.
    pub fn write_table(&mut self, off: u64, data: &[u8]) -> Vec<(u16, Message)> {
        for (i, &b) in data.iter().enumerate() {
            let o = off.saturating_add(i as u64);
            let Some(e) = usize::try_from(o / ENTRY)
                .ok()
                .and_then(|e| self.entries.get_mut(e))
            else {
                continue;
            };
            let word = ((o % ENTRY) / 4) as usize;
            let mut bytes = e[word].to_le_bytes();
            bytes[(o % 4) as usize] = b;
            e[word] = u32::from_le_bytes(bytes);
            if word == 3 {
                e[3] &= CTRL_MASKED;
            }
        }
        self.due()
    }

    /// Guest read of the PBA (offset from its start).
    pub fn read_pba(&self, off: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let byte = off.saturating_add(i as u64);
            *d = (0..8).fold(0u8, |acc, bit| {
                let v = byte.saturating_mul(8).saturating_add(bit);
                let set = usize::try_from(v)
                    .ok()
                    .and_then(|v| self.pending.get(v))
                    .copied()
                    .unwrap_or(false);
                acc | (u8::from(set) << bit)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSpace;

    fn setup() -> (ConfigSpace, MsixTable) {
        let mut cfg = ConfigSpace::new(0x1af4, 0x1041, 0x02_00_00, 1);
        let t = MsixTable::new(&mut cfg, 3, 0, 0x4000, 0x5000);
        (cfg, t)
    }

    fn enable(cfg: &mut ConfigSpace, t: &mut MsixTable, mask_all: bool) -> Vec<(u16, Message)> {
        let v = MSG_CTRL_ENABLE | if mask_all { MSG_CTRL_FUNCTION_MASK } else { 0 };
        cfg.write((t.cap + 2) as u64, &v.to_le_bytes());
        t.sync(cfg)
    }

    #[test]
    fn capability_describes_the_table() {
        let (cfg, t) = setup();
        assert_eq!(cfg.bytes()[t.cap], CAP_ID);
        assert_eq!(cfg.read16(t.cap + 2) & 0x7ff, 2);
        assert_eq!(cfg.read32(t.cap + 4), 0x4000);
        assert_eq!(t.table_size(), 48);
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let (mut cfg, mut t) = setup();
        enable(&mut cfg, &mut t, false);
        // Vector 1: address 0x08020040 (v2m SETSPI), data 66; still masked.
        t.write_table(16, &0x0802_0040u32.to_le_bytes());
        t.write_table(24, &66u32.to_le_bytes());
        assert_eq!(t.signal(1), None);
        let mut pba = [0u8; 1];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        let due = t.write_table(28, &0u32.to_le_bytes());
        assert_eq!(due, vec![(1, (0x0802_0040, 66))]);
        assert_eq!(t.entry(1), Some((0x0802_0040, 66)));
        assert_eq!(t.entry(3), None);
        assert_eq!(t.signal(1), Some((0x0802_0040, 66)));
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn function_mask_and_disable_hold_everything() {
        let (mut cfg, mut t) = setup();
        t.write_table(12, &0u32.to_le_bytes());
        assert_eq!(t.signal(0), None, "MSI-X disabled");
        enable(&mut cfg, &mut t, true);
        assert_eq!(t.signal(0), None, "function masked");
        assert_eq!(enable(&mut cfg, &mut t, false).len(), 1);
    }

    #[test]
    fn hostile_offsets_and_vectors_are_ignored() {
        let (_cfg, mut t) = setup();
        t.write_table(u64::MAX - 1, &[1, 2, 3, 4]);
        t.write_table(48, &[1; 16]);
        let mut d = [9u8; 8];
        t.read_table(1 << 40, &mut d);
        assert_eq!(d, [0; 8]);
        t.read_pba(u64::MAX, &mut d);
        assert_eq!(t.signal(9999), None);
    }
}
