//! DTS source from a tree, in the form `dtc -I dtb -O dts` prints, so that `dtc` compiles it
//! back to the same blob. Ours needs no dtc on the user's machine.

use crate::tree::{Node, Tree};
use std::fmt::Write;

pub fn to_dts(t: &Tree) -> String {
    let mut out = String::from("/dts-v1/;\n\n");
    for (addr, size) in &t.mem_reserve {
        let _ = writeln!(out, "/memreserve/ {addr:#018x} {size:#018x};");
    }
    if !t.mem_reserve.is_empty() {
        out.push('\n');
    }
    node(&mut out, &t.root, 0);
    out
}

fn node(out: &mut String, n: &Node, depth: usize) {
    let indent = "\t".repeat(depth);
    let name = if depth == 0 { "/" } else { n.name.as_str() };
    let _ = writeln!(out, "{indent}{name} {{");
    for (k, v) in &n.props {
        let _ = writeln!(out, "{indent}\t{k}{};", value(v));
    }
    for c in &n.children {
        out.push('\n');
        node(out, c, depth + 1);
    }
    let _ = writeln!(out, "{indent}}};");
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
    if v.len() % 4 == 0 {
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
        // A single NUL-free run of cells that happens to look like text with a zero tail.
        assert_eq!(value(&[0, 0, 0, 0]), " = <0x00>");
    }
}
