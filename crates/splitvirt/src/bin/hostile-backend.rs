//! Test-only: the backend's serving loop, jailed like the real one, that misbehaves on the
//! wire (or with its memory) when the guest reads BAR 0 at `TRIGGER` (past virtio-blk's
//! device config) of one of its devices
//! (crates/splitvirt/tests/backend.rs). A file `FILE.hostile` beside the description says how;
//! the first backend reads and removes it, so the one that replaces it is honest. Started by
//! `vmm::backend::start` as `splitvirt backend --setup-fd 3 --config FILE`.

use pci::PciFunction;
use rpc::backend::Outbox;
use rpc::wire::{Msg, Op};
use std::os::fd::FromRawFd;
use std::sync::Arc;

/// Where the guest pulls the trigger: a BAR read (config-space reads never reach a backend).
const TRIGGER: u64 = 0x2000 + 0xfc; // virtio::transport::DEVICE_CFG + 0xfc

struct Hostile {
    inner: Box<dyn PciFunction>,
    out: Arc<Outbox>,
    dev: u8,
    mode: String,
    /// Copies of the pool and control memfds, kept for "shrink".
    memfds: Arc<Vec<(&'static str, std::fs::File)>>,
}

impl PciFunction for Hostile {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.inner.config_read(off, data)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.inner.config_write(off, data)
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.inner.bar_address(bar)
    }
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        if bar == 0 && off == TRIGGER {
            match self.mode.as_str() {
                // A stream of log lines, far past any rate limit.
                "flood" => {
                    for n in 0..20_000 {
                        self.out.log(&format!("flood {n}"));
                    }
                }
                // Messages a backend never sends: a request, in the reply ring.
                "garbage" => {
                    for _ in 0..rpc::proxy::VIOLATION_LIMIT {
                        let _ = self.out.send(&Msg::new(Op::Read));
                    }
                }
                // Another device's interrupt, as a message (it has no eventfd for it).
                "msi-other" => {
                    for _ in 0..16 {
                        self.out.msi(self.dev ^ 1, 0x0802_0040, 80);
                    }
                }
                // Never answers this read.
                "silent" => std::thread::sleep(std::time::Duration::from_secs(3600)),
                // Cuts the pool and the control region to nothing, under splitvirt's feet.
                "shrink" => {
                    for (what, f) in self.memfds.iter() {
                        let got = f.set_len(0).and_then(|()| f.set_len(1 << 30));
                        self.out.log(&format!("shrink {what}: {got:?}"));
                    }
                }
                _ => {}
            }
        }
        self.inner.bar_read(bar, off, data)
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        self.inner.bar_write(bar, off, data)
    }
    fn resume(&mut self) {
        self.inner.resume()
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let config = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .ok_or_else(|| {
            anyhow::anyhow!("usage: hostile-backend backend --setup-fd 3 --config FILE")
        })?;
    let l = layout::resolve(&layout::Description::load(std::path::Path::new(config))?)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .layout;
    let marker = format!("{config}.hostile");
    let mode = std::fs::read_to_string(&marker).unwrap_or_default();
    let _ = std::fs::remove_file(&marker);
    let jailed = backend::serve::confine(&l)?;
    // SAFETY: the setup socket that splitvirt passed as fd 3.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(3) };
    let setup = rpc::setup::recv(&fd)?;
    let memfds = Arc::new(if mode == "shrink" {
        vec![
            ("pool", std::fs::File::from(setup.pool.try_clone()?)),
            ("control", std::fs::File::from(setup.control.try_clone()?)),
        ]
    } else {
        Vec::new()
    });
    backend::serve::serve_with(&l, fd, setup, jailed, &move |dev, inner, out| {
        Box::new(Hostile {
            inner,
            out,
            dev,
            mode: mode.clone(),
            memfds: memfds.clone(),
        })
    })?;
    Ok(())
}
