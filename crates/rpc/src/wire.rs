//! Messages: four little-endian u64 words (docs/RPC.md, "Messages"). Decoding checks every
//! field: the peer is not trusted, and a message that does not decode is refused whole.

/// Word 0: op (bits 0-7), device (8-15), space (16-23), len (24-31), id (32-47), 48-63 zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msg {
    pub op: Op,
    pub dev: u8,
    /// 0 = config space, 1..=6 = BAR 0..5.
    pub space: u8,
    /// Access width in bytes: 1, 2, 4 or 8 for accesses, 0 otherwise.
    pub len: u8,
    pub id: u16,
    pub w1: u64,
    pub w2: u64,
    pub w3: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    // Proxy -> backend.
    /// Read `len` bytes at `w1` of `space`; answered by Reply with the same id.
    Read = 0x01,
    /// Write `len` bytes of `w2` at `w1`; posted (no answer), in order with what follows.
    Write = 0x02,
    /// Answered by Reply with `w2` unchanged: a round trip with no device work.
    Ping = 0x03,
    /// Devices are registered and the guest may start: the backend may raise interrupts.
    Start = 0x04,
    /// Host input for a console device: `len` (up to 16) bytes in `w2`, `w3`.
    Input = 0x05,
    /// The writes that follow restore device `dev` to the state a previous backend left it
    /// in (`PciFunction::resume`).
    Resume = 0x06,
    // Backend -> proxy.
    /// Answer to Read or Ping: `w2` holds the bytes read (all ones when the backend failed).
    Reply = 0x81,
    /// A device: vendor | device << 16 | class << 32 (24 bits) | revision << 56 in `w1`,
    /// BAR 0 size in `w2`, BAR 0 flags (bit 0 64-bit, bit 1 prefetchable) | pin << 8 in `w3`.
    Register = 0x82,
    /// INTx of `dev` to level `w1` (0 or 1).
    Intx = 0x83,
    /// An MSI write of device `dev`: address `w1`, data `w2` (the proxy checks both).
    Msi = 0x84,
    /// Up to 24 bytes of a log line in w1..w3; `len` is their count; `space` 1 = more follows.
    Log = 0x85,
    /// All devices are registered.
    Ready = 0x86,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("unknown op {0:#04x}")]
    Op(u8),
    #[error("op {op:?}: bad length {len}")]
    Len { op: Op, len: u8 },
    #[error("op {op:?}: bad space {space}")]
    Space { op: Op, space: u8 },
    #[error("reserved bits set in word 0: {0:#018x}")]
    Reserved(u64),
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            0x01 => Op::Read,
            0x02 => Op::Write,
            0x03 => Op::Ping,
            0x04 => Op::Start,
            0x05 => Op::Input,
            0x06 => Op::Resume,
            0x81 => Op::Reply,
            0x82 => Op::Register,
            0x83 => Op::Intx,
            0x84 => Op::Msi,
            0x85 => Op::Log,
            0x86 => Op::Ready,
            _ => return None,
        })
    }
    /// Sent by the proxy (the backend must refuse the others, and the other way round).
    pub fn from_proxy(self) -> bool {
        (self as u8) < 0x80
    }
}

impl Msg {
    pub fn new(op: Op) -> Msg {
        Msg {
            op,
            dev: 0,
            space: 0,
            len: 0,
            id: 0,
            w1: 0,
            w2: 0,
            w3: 0,
        }
    }

    #[inline]
    pub fn encode(&self) -> [u64; 4] {
        let w0 = u64::from(self.op as u8)
            | u64::from(self.dev) << 8
            | u64::from(self.space) << 16
            | u64::from(self.len) << 24
            | u64::from(self.id) << 32;
        [w0, self.w1, self.w2, self.w3]
    }

    #[inline]
    pub fn decode(w: [u64; 4]) -> Result<Msg, WireError> {
        let w0 = w[0];
        let op = Op::from_u8(w0 as u8).ok_or(WireError::Op(w0 as u8))?;
        if w0 >> 48 != 0 {
            return Err(WireError::Reserved(w0));
        }
        let m = Msg {
            op,
            dev: (w0 >> 8) as u8,
            space: (w0 >> 16) as u8,
            len: (w0 >> 24) as u8,
            id: (w0 >> 32) as u16,
            w1: w[1],
            w2: w[2],
            w3: w[3],
        };
        match op {
            Op::Read | Op::Write => {
                if !matches!(m.len, 1 | 2 | 4 | 8) {
                    return Err(WireError::Len { op, len: m.len });
                }
                if m.space > 6 {
                    return Err(WireError::Space { op, space: m.space });
                }
            }
            Op::Log => {
                if m.len > 24 {
                    return Err(WireError::Len { op, len: m.len });
                }
                if m.space > 1 {
                    return Err(WireError::Space { op, space: m.space });
                }
            }
            Op::Input if m.len > 16 => return Err(WireError::Len { op, len: m.len }),
            Op::Reply if m.len > 8 => return Err(WireError::Len { op, len: m.len }),
            Op::Intx if m.w1 > 1 => return Err(WireError::Len { op, len: m.len }),
            _ => {}
        }
        Ok(m)
    }

    /// Log text split into messages of 24 bytes.
    pub fn log(text: &str) -> Vec<Msg> {
        let bytes = text.as_bytes();
        let chunks: Vec<&[u8]> = if bytes.is_empty() {
            vec![&[][..]]
        } else {
            bytes.chunks(24).collect()
        };
        let n = chunks.len();
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let mut b = [0u8; 24];
                b[..c.len()].copy_from_slice(c);
                let word =
                    |k: usize| u64::from_le_bytes(b[k * 8..k * 8 + 8].try_into().expect("8"));
                Msg {
                    len: c.len() as u8,
                    space: u8::from(i + 1 < n),
                    w1: word(0),
                    w2: word(1),
                    w3: word(2),
                    ..Msg::new(Op::Log)
                }
            })
            .collect()
    }

    /// Input bytes split into messages of 16.
    pub fn input(dev: u8, bytes: &[u8]) -> Vec<Msg> {
        bytes
            .chunks(16)
            .map(|c| {
                let mut b = [0u8; 16];
                b[..c.len()].copy_from_slice(c);
                Msg {
                    dev,
                    len: c.len() as u8,
                    w2: u64::from_le_bytes(b[..8].try_into().expect("8")),
                    w3: u64::from_le_bytes(b[8..].try_into().expect("8")),
                    ..Msg::new(Op::Input)
                }
            })
            .collect()
    }

    /// The bytes of an Input message.
    pub fn input_bytes(&self) -> Vec<u8> {
        let mut b = self.w2.to_le_bytes().to_vec();
        b.extend_from_slice(&self.w3.to_le_bytes());
        b.truncate(usize::from(self.len.min(16)));
        b
    }

    /// The bytes of a Log message.
    pub fn log_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        for w in [self.w1, self.w2, self.w3] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.truncate(usize::from(self.len.min(24)));
        b
    }
}

/// Log messages joined into lines: a message with `space == 0` ends one. A line keeps at most
/// its first [`LogLines::MAX`] bytes, so a backend that never ends one cannot grow it.
#[derive(Default)]
pub struct LogLines {
    text: Vec<u8>,
}

impl LogLines {
    pub const MAX: usize = 4096;

    /// Adds a Log message's bytes; gives the line when this message ends it.
    pub fn push(&mut self, m: &Msg) -> Option<String> {
        if self.text.len() < Self::MAX {
            self.text.extend(m.log_bytes());
        }
        (m.space == 0).then(|| {
            let line = String::from_utf8_lossy(&self.text).into_owned();
            self.text.clear();
            line
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_refusals() {
        let m = Msg {
            dev: 3,
            space: 1,
            len: 4,
            id: 0xbeef,
            w1: 0x3000,
            w2: 7,
            ..Msg::new(Op::Write)
        };
        assert_eq!(Msg::decode(m.encode()), Ok(m));
        assert_eq!(Msg::decode([0x7f, 0, 0, 0]), Err(WireError::Op(0x7f)));
        let bad_len = Msg { len: 3, ..m }.encode();
        assert!(matches!(Msg::decode(bad_len), Err(WireError::Len { .. })));
        let bad_space = Msg { space: 7, ..m }.encode();
        assert!(matches!(
            Msg::decode(bad_space),
            Err(WireError::Space { .. })
        ));
        let mut w = m.encode();
        w[0] |= 1 << 60;
        assert!(matches!(Msg::decode(w), Err(WireError::Reserved(_))));
    }

    #[test]
    fn log_lines_split_and_join() {
        let text = "backend: virtio-blk at slot 1 serves disk.img";
        let msgs = Msg::log(text);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].space, 1);
        assert_eq!(msgs[1].space, 0);
        let mut lines = LogLines::default();
        let joined: Vec<String> = msgs
            .iter()
            .filter_map(|m| lines.push(&Msg::decode(m.encode()).unwrap()))
            .collect();
        assert_eq!(joined, [text]);
    }

    #[test]
    fn a_line_that_never_ends_stays_bounded() {
        let mut lines = LogLines::default();
        let part = Msg::log(&"x".repeat(48))[0];
        assert_eq!(part.space, 1);
        for _ in 0..1000 {
            assert_eq!(lines.push(&part), None);
        }
        let line = lines.push(&Msg::log("end")[0]).unwrap();
        // Its first 4 KiB (to the message that crossed it); the rest, "end" too, dropped.
        assert!(line.len() < LogLines::MAX + 24, "{}", line.len());
        assert!(line.bytes().all(|b| b == b'x'));
        assert_eq!(lines.push(&Msg::log("next")[0]).as_deref(), Some("next"));
    }

    proptest! {
        #[test]
        fn any_words_decode_or_fail_cleanly(w in any::<[u64; 4]>()) {
            if let Ok(m) = Msg::decode(w) {
                prop_assert_eq!(m.encode(), w);
            }
        }
    }
}
