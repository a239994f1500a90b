//! dt-validate with the kernel's own bindings: a Python venv with dtschema, and the schema
//! built from Debian's linux-source-6.12 (about two minutes), cached by both versions.

use crate::env::{self, cache, cmd, run};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// Pinned so that a finding means the same on every machine.
pub const DTSCHEMA: &str = "dtschema==2026.9";
pub const LINUX_SOURCE: &str = "linux-source-6.12";

pub struct Schema {
    pub dt_validate: PathBuf,
    pub schema: PathBuf,
}

fn venv() -> Result<PathBuf> {
    let dir = cache().join("venv").join(DTSCHEMA.replace("==", "-"));
    let bin = dir.join("bin/dt-validate");
    if bin.exists() {
        return Ok(dir);
    }
    println!("==> creating a venv with {DTSCHEMA} in {}", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
    // Debian's Python on every machine, with what pip needs to build pylibfdt when no wheel
    // fits (its C extension: the Python headers and swig).
    env::ensure_apt(&["python3-venv", "python3-dev", "swig"])?;
    run(cmd("/usr/bin/python3").args(["-m", "venv"]).arg(&dir))?;
    run(cmd(dir.join("bin/pip")).args(["install", "--quiet", DTSCHEMA]))?;
    Ok(dir)
}

pub fn ensure() -> Result<Schema> {
    env::ensure_apt(&[LINUX_SOURCE])?;
    let venv = venv()?;
    let key = format!(
        "{}-{}",
        env::deb_version(LINUX_SOURCE)?,
        DTSCHEMA.replace("==", "-")
    );
    let dir = cache().join("dt-schema").join(key);
    let schema = dir.join("schema.json");
    if !schema.exists() {
        println!("==> building the device tree schema from {LINUX_SOURCE} (about 2 minutes, cached in {})", dir.display());
        let work = dir.join("src");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let tarball = format!("/usr/src/{LINUX_SOURCE}.tar.xz");
        run(cmd("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&work)
            .args([
                "--wildcards",
                &format!("{LINUX_SOURCE}/Documentation/devicetree/bindings/*"),
            ]))?;
        let bindings = work
            .join(LINUX_SOURCE)
            .join("Documentation/devicetree/bindings");
        let tmp = dir.join("schema.json.tmp");
        let out = std::fs::File::create(&tmp)?;
        // It warns about a few bindings' own inconsistencies; keep that out of the test log.
        let log = dir.join("dt-mk-schema.log");
        let st = cmd(venv.join("bin/dt-mk-schema"))
            .arg("-j")
            .arg(&bindings)
            .stdout(out)
            .stderr(std::fs::File::create(&log)?)
            .status()
            .context("cannot run dt-mk-schema")?;
        anyhow::ensure!(
            st.success(),
            "dt-mk-schema failed ({st}); see {}",
            log.display()
        );
        std::fs::rename(&tmp, &schema)?;
        std::fs::remove_dir_all(&work)?;
    }
    Ok(Schema {
        dt_validate: venv.join("bin/dt-validate"),
        schema,
    })
}
