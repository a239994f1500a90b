//! A flattened device tree read into nodes and properties.
//!
//! vm-fdt only writes DTBs. Users hand us DTBs of any origin, so the reader is ours: every
//! offset and length is checked against the blob, the depth is bounded, and a bad blob is an
//! error naming what is wrong, never a panic.

const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
/// Deeper trees than this are not device trees anyone writes; the bound keeps recursion safe.
const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not a device tree blob: magic is {0:#010x}, expected 0xd00dfeed")]
    BadMagic(u32),
    #[error("device tree blob is truncated: {0}")]
    Truncated(&'static str),
    #[error("device tree blob is malformed at structure offset {offset:#x}: {what}")]
    Malformed { offset: usize, what: String },
    #[error("device tree version {0} is older than 16, the oldest this reader understands")]
    TooOld(u32),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub props: Vec<(String, Vec<u8>)>,
    pub children: Vec<Node>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    pub root: Node,
    pub mem_reserve: Vec<(u64, u64)>,
    pub boot_cpuid: u32,
}

fn be32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be64(b: &[u8], off: usize) -> Option<u64> {
    Some((u64::from(be32(b, off)?) << 32) | u64::from(be32(b, off + 4)?))
}

impl Tree {
    pub fn parse(blob: &[u8]) -> Result<Tree, ParseError> {
        let hdr = |i: usize| be32(blob, i * 4).ok_or(ParseError::Truncated("header"));
        let magic = hdr(0)?;
        if magic != FDT_MAGIC {
            return Err(ParseError::BadMagic(magic));
        }
        let total = hdr(1)? as usize;
        let off_struct = hdr(2)? as usize;
        let off_strings = hdr(3)? as usize;
        let off_rsvmap = hdr(4)? as usize;
        let version = hdr(5)?;
        let boot_cpuid = hdr(7)?;
        let size_strings = hdr(8)? as usize;
        let size_struct = hdr(9)? as usize;
        if version < 16 {
            return Err(ParseError::TooOld(version));
        }
        if total > blob.len() {
            return Err(ParseError::Truncated("totalsize is larger than the file"));
        }
        let blob = &blob[..total];
        let section = |off: usize, len: usize, what: &'static str| {
            off.checked_add(len)
                .and_then(|end| blob.get(off..end))
                .ok_or(ParseError::Truncated(what))
        };
        let strings = section(off_strings, size_strings, "strings block")?;
        let structs = section(off_struct, size_struct, "structure block")?;

        let mut mem_reserve = Vec::new();
        let mut off = off_rsvmap;
        loop {
            let (Some(addr), Some(size)) = (be64(blob, off), be64(blob, off + 8)) else {
                return Err(ParseError::Truncated("memory reservation block"));
            };
            if addr == 0 && size == 0 {
                break;
            }
            mem_reserve.push((addr, size));
            off += 16;
        }

        let mut r = Reader {
            s: structs,
            strings,
            pos: 0,
        };
        r.skip_nops()?;
        if r.token()? != FDT_BEGIN_NODE {
            return Err(r.bad("the structure block does not start with the root node"));
        }
        let root = r.node(0)?;
        r.skip_nops()?;
        if r.token()? != FDT_END {
            return Err(r.bad("expected FDT_END after the root node"));
        }
        Ok(Tree {
            root,
            mem_reserve,
            boot_cpuid,
        })
    }

    /// The node at an absolute path such as `/reserved-memory/swiotlb@50000000`.
    pub fn find(&self, path: &str) -> Option<&Node> {
        let mut n = &self.root;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            n = n.children.iter().find(|c| c.name == part)?;
        }
        Some(n)
    }

    /// Every node with its absolute path, parents before children.
    pub fn walk(&self) -> Vec<(String, &Node)> {
        fn go<'a>(n: &'a Node, path: String, out: &mut Vec<(String, &'a Node)>) {
            for c in &n.children {
                let p = if path == "/" {
                    format!("/{}", c.name)
                } else {
                    format!("{path}/{}", c.name)
                };
                out.push((p.clone(), c));
                go(c, p, out);
            }
        }
        let mut out = vec![("/".to_owned(), &self.root)];
        go(&self.root, "/".into(), &mut out);
        out
    }

    /// The node carrying `phandle` (or the legacy `linux,phandle`).
    pub fn by_phandle(&self, ph: u32) -> Option<(String, &Node)> {
        self.walk().into_iter().find(|(_, n)| {
            n.prop_u32("phandle") == Some(ph) || n.prop_u32("linux,phandle") == Some(ph)
        })
    }
}

struct Reader<'a> {
    s: &'a [u8],
    strings: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn bad(&self, what: impl Into<String>) -> ParseError {
        ParseError::Malformed {
            offset: self.pos,
            what: what.into(),
        }
    }

    fn token(&mut self) -> Result<u32, ParseError> {
        let t = be32(self.s, self.pos).ok_or(ParseError::Truncated("structure block"))?;
        self.pos += 4;
        Ok(t)
    }

    fn skip_nops(&mut self) -> Result<(), ParseError> {
        while be32(self.s, self.pos) == Some(FDT_NOP) {
            self.pos += 4;
        }
        Ok(())
    }

    fn align(&mut self) {
        self.pos = self.pos.next_multiple_of(4);
    }

    fn cstr(buf: &[u8], at: usize) -> Option<&str> {
        let rest = buf.get(at..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }

    /// Reads a node whose FDT_BEGIN_NODE token was just consumed.
    fn node(&mut self, depth: usize) -> Result<Node, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.bad(format!("nodes nested deeper than {MAX_DEPTH}")));
        }
        let name = Self::cstr(self.s, self.pos)
            .ok_or_else(|| self.bad("node name is not a NUL-terminated UTF-8 string"))?
            .to_owned();
        self.pos += name.len() + 1;
        self.align();
        let mut node = Node {
            name,
            ..Default::default()
        };
        loop {
            match self.token()? {
                FDT_PROP => {
                    let len = self.token()? as usize;
                    let nameoff = self.token()? as usize;
                    let pname = Self::cstr(self.strings, nameoff)
                        .ok_or_else(|| {
                            self.bad(format!(
                                "property name offset {nameoff:#x} is outside the strings block"
                            ))
                        })?
                        .to_owned();
                    let value = self
                        .pos
                        .checked_add(len)
                        .and_then(|end| self.s.get(self.pos..end))
                        .ok_or_else(|| {
                            self.bad(format!(
                                "property `{pname}` of {len} bytes runs past the structure block"
                            ))
                        })?
                        .to_vec();
                    self.pos += len;
                    self.align();
                    node.props.push((pname, value));
                }
                FDT_BEGIN_NODE => node.children.push(self.node(depth + 1)?),
                FDT_END_NODE => return Ok(node),
                FDT_NOP => {}
                t => return Err(self.bad(format!("unexpected token {t:#x}"))),
            }
        }
    }
}

impl Node {
    pub fn prop(&self, name: &str) -> Option<&[u8]> {
        self.props
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    pub fn has(&self, name: &str) -> bool {
        self.prop(name).is_some()
    }

    pub fn prop_u32(&self, name: &str) -> Option<u32> {
        let v = self.prop(name)?;
        (v.len() == 4).then(|| be32(v, 0)).flatten()
    }

    pub fn cells(&self, name: &str) -> Option<Vec<u32>> {
        let v = self.prop(name)?;
        (v.len() % 4 == 0).then(|| v.chunks_exact(4).map(|c| be32(c, 0).unwrap_or(0)).collect())
    }

    /// A string-list property (`compatible`), empty when absent or not strings.
    pub fn strings(&self, name: &str) -> Vec<&str> {
        let Some(v) = self.prop(name) else {
            return Vec::new();
        };
        let v = v.strip_suffix(&[0]).unwrap_or(v);
        v.split(|&b| b == 0)
            .filter_map(|s| std::str::from_utf8(s).ok())
            .collect()
    }

    pub fn is_compatible(&self, c: &str) -> bool {
        self.strings("compatible").contains(&c)
    }

    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// `reg` split into (address, size) pairs with the given cell counts.
    pub fn reg(&self, address_cells: u32, size_cells: u32) -> Option<Vec<(u64, u64)>> {
        let cells = self.cells("reg")?;
        let (a, s) = (address_cells as usize, size_cells as usize);
        if a == 0 || a > 2 || s > 2 || cells.len() % (a + s) != 0 {
            return None;
        }
        Some(
            cells
                .chunks_exact(a + s)
                .map(|c| (join_cells(&c[..a]), join_cells(&c[a..])))
                .collect(),
        )
    }
}

/// Big-endian cells as one number (at most two cells are meaningful).
pub fn join_cells(c: &[u32]) -> u64 {
    c.iter().fold(0u64, |acc, &x| (acc << 32) | u64::from(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Vec<u8> {
        let mut w = vm_fdt::FdtWriter::new().unwrap();
        let root = w.begin_node("").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_string_list("compatible", vec!["a,b".into(), "c".into()])
            .unwrap();
        let m = w.begin_node("memory@40000000").unwrap();
        w.property_array_u64("reg", &[0x4000_0000, 0x2000_0000])
            .unwrap();
        w.property_u32("phandle", 7).unwrap();
        w.end_node(m).unwrap();
        w.end_node(root).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn reads_what_vm_fdt_writes() {
        let t = Tree::parse(&tiny()).unwrap();
        assert_eq!(t.root.prop_u32("#address-cells"), Some(2));
        assert_eq!(t.root.strings("compatible"), vec!["a,b", "c"]);
        let m = t.find("/memory@40000000").unwrap();
        assert_eq!(m.reg(2, 2), Some(vec![(0x4000_0000, 0x2000_0000)]));
        assert_eq!(t.by_phandle(7).unwrap().0, "/memory@40000000");
    }

    #[test]
    fn rejects_non_dtb_and_truncation() {
        assert_eq!(
            Tree::parse(b"hello world, not a dtb at all....").unwrap_err(),
            ParseError::BadMagic(0x68656c6c)
        );
        let b = tiny();
        for cut in [0, 3, 20, 40, b.len() / 2, b.len() - 1] {
            assert!(Tree::parse(&b[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn corrupted_blobs_are_errors_not_panics() {
        let b = tiny();
        // Flip every byte in turn: each result is either a tree or an error.
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0xff;
            let _ = Tree::parse(&c);
        }
    }
}
