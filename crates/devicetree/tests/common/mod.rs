//! Helpers that run the real dtc.

use std::path::Path;
use std::process::Command;

/// Runs dtc; panics with a clear message when dtc is not installed (`cargo xtask test`
/// installs it), because a test that silently skips proves nothing.
pub fn dtc(args: &[&str], input: &Path) -> (Vec<u8>, String) {
    let out = Command::new("dtc").args(args).arg(input).output().expect(
        "dtc is not installed: run `cargo xtask test`, or apt-get install device-tree-compiler",
    );
    assert!(
        out.status.success(),
        "dtc {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("splitvirt-dt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}
