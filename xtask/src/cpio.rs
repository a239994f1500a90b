//! A newc cpio writer, so that initramfs images carry /dev/console and other device nodes
//! without root or mknod (the kernel's gen_init_cpio does the same from a spec).

use std::io::Write;

pub enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Default)]
pub struct Archive {
    entries: Vec<(String, Entry)>,
}

impl Archive {
    /// Adds an entry, and before it any parent directory not added yet.
    pub fn add(&mut self, path: &str, e: Entry) -> &mut Self {
        let path = path.trim_start_matches('/');
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !self.entries.iter().any(|(n, _)| *n == parent) {
                self.entries.push((parent.clone(), Entry::Dir));
            }
        }
        self.entries.push((path.to_owned(), e));
        self
    }

    pub fn write(&self, mut out: impl Write) -> std::io::Result<()> {
        for (ino, (name, e)) in (1u32..).zip(&self.entries) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match e {
                Entry::Dir => (0o040755, &[], (0, 0)),
                Entry::File { data, mode } => (0o100000 | mode, data, (0, 0)),
                Entry::Symlink(t) => (0o120777, t.as_bytes(), (0, 0)),
                Entry::CharDev { major, minor } => (0o020600, &[], (*major, *minor)),
            };
            header(&mut out, name, ino, mode, data.len() as u32, rdev)?;
            out.write_all(data)?;
            pad(&mut out, data.len())?;
        }
        header(&mut out, "TRAILER!!!", 0, 0, 0, (0, 0))
    }
}

fn header(
    out: &mut impl Write,
    name: &str,
    ino: u32,
    mode: u32,
    size: u32,
    rdev: (u32, u32),
) -> std::io::Result<()> {
    let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    let mut h = String::from("070701");
    for f in fields {
        h.push_str(&format!("{f:08x}"));
    }
    out.write_all(h.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, 110 + name.len() + 1)
}

fn pad(out: &mut impl Write, len: usize) -> std::io::Result<()> {
    out.write_all(&[0u8; 3][..(4 - len % 4) % 4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_lists_what_we_wrote() {
        let mut a = Archive::default();
        a.add("dev", Entry::Dir)
            .add("dev/console", Entry::CharDev { major: 5, minor: 1 })
            .add(
                "init",
                Entry::File {
                    data: b"#!/bin/sh\n".to_vec(),
                    mode: 0o755,
                },
            )
            .add("bin/sh", Entry::Symlink("busybox".into()));
        let mut buf = Vec::new();
        a.write(&mut buf).unwrap();
        let dir = std::env::temp_dir().join(format!("cpio-{}", std::process::id()));
        std::fs::write(&dir, &buf).unwrap();
        let o = std::process::Command::new("cpio")
            .args(["-t", "-v", "-F"])
            .arg(&dir)
            .output()
            .unwrap();
        std::fs::remove_file(&dir).unwrap();
        let list = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            list.contains("crw-------") && list.contains("dev/console"),
            "{list}"
        );
        assert!(list.contains("bin/sh -> busybox"), "{list}");
        assert!(list.contains("-rwxr-xr-x"), "{list}");
        // bin/ was added for bin/sh.
        assert!(
            list.lines()
                .any(|l| l.starts_with("drwx") && l.ends_with(" bin")),
            "{list}"
        );
    }
}
