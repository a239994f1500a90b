//! DTS source from a tree, close to what `dtc -I dtb -O dts` prints, but with labels and
//! `&label` references where a property holds phandles, so that dtc compiles it back to the
//! same tree without warnings. Ours needs no dtc on the user's machine.

use crate::tree::{Node, Tree};
use std::collections::HashMap;
use std::fmt::Write;

struct Printer<'t> {
    t: &'t Tree,
    labels: HashMap<u32, String>,
    out: String,
}

pub fn to_dts(t: &Tree) -> String {
    let mut p = Printer {
        t,
        labels: labels(t),
        out: String::from("/dts-v1/;\n\n"),
    };
    for (addr, size) in &t.mem_reserve {
        let _ = writeln!(p.out, "/memreserve/ {addr:#018x} {size:#018x};");
    }
    if !t.mem_reserve.is_empty() {
        p.out.push('\n');
    }
    p.node(&t.root, 0);
    p.out
}

/// A label per phandle, from the node's name (`interrupt-controller@8000000` -> `interrupt_controller`).
fn labels(t: &Tree) -> HashMap<u32, String> {
    let mut out: HashMap<u32, String> = HashMap::new();
    for (_, n) in t.walk() {
        let Some(ph) = n.prop_u32("phandle") else {
            continue;
        };
        let base: String = n
            .name
            .split('@')
            .next()
            .unwrap_or("")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let mut label = if base.starts_with(|c: char| c.is_ascii_alphabetic()) {
            base
        } else {
            format!("n_{base}")
        };
        if out.values().any(|l| *l == label) {
            label = format!("{label}_{ph}");
        }
        out.insert(ph, label);
    }
    out
}

impl Printer<'_> {
    fn node(&mut self, n: &Node, depth: usize) {
        let indent = "\t".repeat(depth);
        let name = if depth == 0 { "/" } else { n.name.as_str() };
        let label = n
            .prop_u32("phandle")
            .and_then(|ph| self.labels.get(&ph))
            .map(|l| format!("{l}: "))
            .unwrap_or_default();
        let _ = writeln!(self.out, "{indent}{label}{name} {{");
        for (k, v) in &n.props {
            let value = self.refs(k, v).unwrap_or_else(|| value(v));
            let _ = writeln!(self.out, "{indent}\t{k}{value};");
        }
        for c in &n.children {
            self.out.push('\n');
            self.node(c, depth + 1);
        }
        let _ = writeln!(self.out, "{indent}}};");
    }

    /// Phandle-valued properties as `<&label args...>`, or None to print them plainly.
    fn refs(&self, prop: &str, v: &[u8]) -> Option<String> {
        let args_prop = match prop {
            "interrupt-parent" | "memory-region" => None,
            "clocks" => Some("#clock-cells"),
            "msi-parent" => Some("#msi-cells"),
            _ => return None,
        };
        if v.is_empty() || !v.len().is_multiple_of(4) {
            return None;
        }
        let cells: Vec<u32> = v
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut parts = Vec::new();
        let mut i = 0;
        while i < cells.len() {
            let label = self.labels.get(&cells[i])?;
            let nargs = match args_prop {
                None => 0,
                Some(a) => self.t.by_phandle(cells[i])?.1.prop_u32(a).unwrap_or(0) as usize,
            };
            let args = cells.get(i + 1..i + 1 + nargs)?;
            parts.push(format!("&{label}"));
            parts.extend(args.iter().map(|a| format!("{a:#04x}")));
            i += 1 + nargs;
            if args_prop.is_some() && prop == "msi-parent" {
                break;
            }
        }
        (i == cells.len()).then(|| format!(" = <{}>", parts.join(" ")))
    }
}

/// dtc's guess, made the same way: printable NUL-terminated strings, else cells, else bytes.
fn value(v: &[u8]) -> String {
    if v.is_empty() {
        return String::new();
    }
    if let Some(list) = as_strings(v) {
        let quoted: Vec<String> = list.iter().map(|s| format!("\"{}\"", escape(s))).collect();
        return format!(" = {}", quoted.join(", "));
    }
    if v.len().is_multiple_of(4) {
        let cells: Vec<String> = v
            .chunks_exact(4)
            .map(|c| format!("{:#04x}", u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        return format!(" = <{}>", cells.join(" "));
    }
    let bytes: Vec<String> = v.iter().map(|b| format!("{b:02x}")).collect();
    format!(" = [{}]", bytes.join(" "))
}

fn as_strings(v: &[u8]) -> Option<Vec<&str>> {
    let body = v.strip_suffix(&[0])?;
    if body.is_empty() {
        return None;
    }
    let parts: Vec<&[u8]> = body.split(|&b| b == 0).collect();
    let printable = |s: &[u8]| {
        !s.is_empty()
            && s.iter()
                .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t' || b == b'\n')
    };
    if !parts.iter().all(|p| printable(p)) {
        return None;
    }
    parts
        .into_iter()
        .map(|p| std::str::from_utf8(p).ok())
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .replace('\t', "\\t")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_like_dtc() {
        assert_eq!(
            value(b"arm,pl011\0arm,primecell\0"),
            " = \"arm,pl011\", \"arm,primecell\""
        );
        assert_eq!(value(&[0, 0, 0, 2]), " = <0x02>");
        assert_eq!(value(&[1, 2, 3]), " = [01 02 03]");
        assert_eq!(value(&[]), "");
        assert_eq!(value(&[0, 0, 0, 0]), " = <0x00>");
    }

    #[test]
    fn phandles_become_labelled_references() {
        let l = layout::resolve(&layout::Description::default_vm())
            .unwrap()
            .layout;
        let t = Tree::parse(&crate::generate(&l, &Default::default()).unwrap()).unwrap();
        let s = to_dts(&t);
        assert!(
            s.contains("interrupt_controller: interrupt-controller@8000000 {"),
            "{s}"
        );
        assert!(s.contains("clocks = <&clock_apb_pclk &clock_apb_pclk>;"));
        assert!(s.contains("msi-parent = <&v2m>;"));
        assert!(s.contains("memory-region = <&swiotlb>;"));
        assert!(s.contains("interrupt-parent = <&interrupt_controller>;"));
    }

    #[test]
    fn unresolvable_phandles_stay_numbers() {
        let mut t = Tree::parse(
            &crate::generate(
                &layout::resolve(&layout::Description::default_vm())
                    .unwrap()
                    .layout,
                &Default::default(),
            )
            .unwrap(),
        )
        .unwrap();
        t.root
            .props
            .push(("msi-parent".into(), vec![0, 0, 0, 0x63]));
        assert!(to_dts(&t).contains("msi-parent = <0x63>;"));
    }
}
