//! Byte sizes as people write them in a VM description: `536870912`, `"512M"`, `"64 MiB"`.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// A size in bytes. Suffixes are binary (K = KiB) because every size in a memory map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        // A 0x number has no unit: its letters are digits.
        let (num, unit) = if t.starts_with("0x") || t.starts_with("0X") {
            (t, "")
        } else {
            let end = t
                .find(|c: char| !(c.is_ascii_digit() || c == '_'))
                .unwrap_or(t.len());
            (&t[..end], t[end..].trim())
        };
        let base = parse_u64(num).ok_or_else(|| {
            format!("`{text}` is not a size; write bytes (4096, 0x1000) or a number with K, M or G (\"64M\")")
        })?;
        let mult = match unit {
            "" | "B" => 1,
            "K" | "KiB" | "k" => KIB,
            "M" | "MiB" => MIB,
            "G" | "GiB" => GIB,
            _ => {
                return Err(format!(
                    "`{text}` has an unknown unit `{unit}`; use K, M or G (binary: 1M = 1 MiB)"
                ))
            }
        };
        base.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` does not fit in 64 bits"))
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// Parses decimal or `0x` hexadecimal, with `_` separators.
pub fn parse_u64(text: &str) -> Option<u64> {
    let clean: String = text.chars().filter(|&c| c != '_').collect();
    if let Some(hex) = clean
        .strip_prefix("0x")
        .or_else(|| clean.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).ok()
    } else if clean.is_empty() {
        None
    } else {
        clean.parse().ok()
    }
}

/// Human form: the largest binary unit that divides the size exactly.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v != 0 && v.is_multiple_of(GIB) {
            write!(f, "{} GiB", v / GIB)
        } else if v != 0 && v.is_multiple_of(MIB) {
            write!(f, "{} MiB", v / MIB)
        } else if v != 0 && v.is_multiple_of(KIB) {
            write!(f, "{} KiB", v / KIB)
        } else {
            write!(f, "{v} B")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // TOML integers are i64: a string keeps every u64 and reads back through `parse`.
        let v = self.0;
        let text = if v != 0 && v.is_multiple_of(GIB) {
            format!("{}G", v / GIB)
        } else if v != 0 && v.is_multiple_of(MIB) {
            format!("{}M", v / MIB)
        } else if v != 0 && v.is_multiple_of(KIB) {
            format!("{}K", v / KIB)
        } else {
            format!("{v}")
        };
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: bytes as an integer, or a string such as \"64M\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_hex() {
        assert_eq!(ByteSize::parse("512M").unwrap().0, 512 * MIB);
        assert_eq!(ByteSize::parse("64 MiB").unwrap().0, 64 * MIB);
        assert_eq!(ByteSize::parse("4K").unwrap().0, 4096);
        assert_eq!(ByteSize::parse("0x1000").unwrap().0, 4096);
        assert_eq!(ByteSize::parse("1_048_576").unwrap().0, MIB);
        assert_eq!(ByteSize::parse("2G").unwrap().0, 2 * GIB);
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        assert!(ByteSize::parse("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(ByteSize::parse("M").unwrap_err().contains("not a size"));
        assert!(ByteSize::parse("99999999999999G")
            .unwrap_err()
            .contains("64 bits"));
    }

    #[test]
    fn display_and_serialise_round_trip() {
        for v in [4096, 3 * MIB, 5 * GIB, 4097] {
            let s = toml::Value::try_from(ByteSize(v)).unwrap();
            let back: ByteSize = s.try_into().unwrap();
            assert_eq!(back.0, v);
        }
        assert_eq!(ByteSize(64 * MIB).to_string(), "64 MiB");
    }
}
