//! The description's PCI devices as functions on the ECAM, and where their interrupts go.

use crate::bus::Bus;
use layout::{DeviceKind, Layout};
use pci::ecam::{devfn, DevFn};
use pci::PciFunction;
use platform::IrqLine;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use virtio::transport::{Signal, VirtioPci};

/// MSI-X messages are memory writes by the device: they go over the bus (to the GICv2m frame,
/// which checks them); INTx goes to the device's swizzled line.
pub struct DeviceSignal {
    pub bus: Arc<OnceLock<Arc<Bus>>>,
    pub intx: Arc<dyn IrqLine>,
}

impl Signal for DeviceSignal {
    fn msi(&self, (addr, data): (u64, u32)) {
        match self.bus.get() {
            Some(bus) => bus.write(addr, &data.to_le_bytes()),
            None => eprintln!("splitvirt: MSI to {addr:#x} before the bus exists"),
        }
    }
    fn intx(&self, level: bool) {
        self.intx.set_level(level);
    }
}

/// A console device shared with the input thread.
pub type SharedConsole = Arc<Mutex<VirtioPci<virtio::console::Console>>>;

/// Wraps a shared function so that the ECAM can own a handle while the VMM keeps another.
pub struct SharedFunction<F: PciFunction>(pub Arc<Mutex<F>>);

impl<F: PciFunction> SharedFunction<F> {
    fn with<R>(&self, f: impl FnOnce(&mut F) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<F: PciFunction> PciFunction for SharedFunction<F> {
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_address(bar)
    }
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.with(|f| f.config_read(off, data))
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.with(|f| f.config_write(off, data))
    }
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        self.with(|f| f.bar_read(bar, off, data))
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        self.with(|f| f.bar_write(bar, off, data))
    }
}

pub type SharedNet = Arc<Mutex<VirtioPci<virtio::net::Net>>>;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Disk(#[from] virtio::blk::OpenError),
    #[error(transparent)]
    Tap(#[from] crate::tap::TapError),
}

pub struct Built {
    pub functions: Vec<(DevFn, Box<dyn PciFunction>)>,
    pub console: Option<SharedConsole>,
    /// Network devices and the TAP each reads frames from.
    pub nets: Vec<(SharedNet, crate::tap::Tap)>,
    /// Devices the description names that this build cannot serve yet, with why.
    pub skipped: Vec<String>,
}

/// Builds every device the description lists. `mem` is what devices may reach (the pool).
/// A disk image or TAP that cannot be opened is an error here, before any vCPU runs.
pub fn build(
    l: &Layout,
    mem: virtio::Memory,
    signal: &dyn Fn(&layout::Device) -> Arc<dyn Signal>,
    console_out: Box<dyn Write + Send>,
) -> Result<Built, OpenError> {
    let mut out = Built {
        functions: Vec::new(),
        console: None,
        nets: Vec::new(),
        skipped: Vec::new(),
    };
    let mut console_out = Some(console_out);
    for d in &l.devices {
        let bar = d.bars.first().map_or(0, |b| b.base);
        match &d.kind {
            DeviceKind::VirtioBlk { image, read_only } => {
                let dev = virtio::blk::Block::open(image, *read_only)?;
                let f = VirtioPci::new(dev, mem.clone(), bar, d.intx_pin as u8, signal(d));
                out.functions.push((devfn(d.slot as u8, 0), Box::new(f)));
            }
            DeviceKind::VirtioNet { backend, mac } => {
                let tap = crate::tap::Tap::open(backend)?;
                let reader = tap.try_clone().map_err(|e| crate::tap::TapError {
                    name: backend.clone(),
                    why: e.to_string(),
                })?;
                let dev = virtio::net::Net::new(*mac, Box::new(tap));
                let f = Arc::new(Mutex::new(VirtioPci::new(
                    dev,
                    mem.clone(),
                    bar,
                    d.intx_pin as u8,
                    signal(d),
                )));
                out.nets.push((f.clone(), reader));
                out.functions.push((devfn(d.slot as u8, 0), Box::new(SharedFunction(f))));
            }
            DeviceKind::VirtioConsole if console_out.is_some() => {
                let dev = virtio::console::Console::new(console_out.take().expect("checked"));
                let f = Arc::new(Mutex::new(VirtioPci::new(dev, mem.clone(), bar, d.intx_pin as u8, signal(d))));
                out.console = Some(f.clone());
                out.functions.push((devfn(d.slot as u8, 0), Box::new(SharedFunction(f))));
            }
            other => out.skipped.push(format!(
                "{} at slot {} is not served yet by this build of splitvirt; the guest will not see it",
                other.label(),
                d.slot
            )),
        }
    }
    Ok(out)
}

/// Frames from the TAP to the device, on a thread of their own.
pub fn start_net_rx(net: SharedNet, mut tap: crate::tap::Tap) {
    std::thread::spawn(move || {
        let mut buf = [0u8; virtio::net::MAX_FRAME + 64];
        while let Ok(n) = tap.read_frame(&mut buf) {
            let mut f = net.lock().unwrap_or_else(|e| e.into_inner());
            f.with_device(|d| d.receive(&buf[..n]));
        }
    });
}
