//! The description's in-process PCI devices as functions on the ECAM (`hostio` builds the
//! virtio ones, this adds the connectors), and where their interrupts go.

use crate::bus::Bus;
use layout::{DeviceKind, Layout};
use pci::ecam::{devfn, DevFn};
use pci::PciFunction;
use platform::IrqLine;
use std::io::Write;
use std::sync::{Arc, OnceLock};
use virtio::transport::Signal;

/// MSI-X messages are memory writes by the device, to whatever address the guest programmed:
/// only a write to the GICv2m frame's MSI_SETSPI_NS of one of its SPIs goes over the bus
/// (to the frame). Anything else is dropped: a vector pointed at the device's own BAR would
/// otherwise re-enter the device while its lock is held. INTx goes to the swizzled line.
pub struct DeviceSignal {
    pub bus: Arc<OnceLock<Arc<Bus>>>,
    pub intx: Arc<dyn IrqLine>,
    pub frame: Option<layout::layout::V2m>,
}

/// Whether an MSI write of `data` to `addr` is one the GICv2m `frame` takes.
pub fn msi_to_frame(frame: Option<&layout::layout::V2m>, addr: u64, data: u32) -> bool {
    frame.is_some_and(|f| {
        addr == f.region.base + platform::gicv2m::MSI_SETSPI_NS
            && data >= f.spi_base
            && data - f.spi_base < f.spi_count
    })
}

impl Signal for DeviceSignal {
    fn msi(&self, (addr, data): (u64, u32)) {
        if !msi_to_frame(self.frame.as_ref(), addr, data) {
            ratelog::warn!(
                "a device's MSI-X message (address {addr:#x}, data {data}) is not an SPI of the \
                 GICv2m frame; dropped"
            );
            return;
        }
        match self.bus.get() {
            Some(bus) => bus.write(addr, &data.to_le_bytes()),
            None => ratelog::warn!("MSI to {addr:#x} before the bus exists"),
        }
    }
    fn intx(&self, level: bool) {
        self.intx.set_level(level);
    }
}

pub use hostio::devices::{
    notify_writes, open_disk, virtio_shape, OpenError, SharedConsole, SharedFunction, Starter,
};

/// What splitvirt builds for itself: `hostio`'s devices, and the connectors with their
/// dataports.
pub struct Built {
    pub functions: Vec<(DevFn, Box<dyn PciFunction>)>,
    /// The console on splitvirt's stdio, which stdin feeds when the guest's console is hvc0.
    pub console: Option<SharedConsole>,
    /// Threads that feed devices from their host ends.
    pub starters: Vec<Starter>,
    /// Devices the description names that this build cannot serve yet, with why.
    pub skipped: Vec<String>,
    /// Connector dataports, to map into the guest at their function's BAR 1.
    pub connectors: Vec<(DevFn, crate::connect::ConnectorMemory)>,
    /// virtio-pmem regions: each image's mapping here, to map into the guest at its window.
    pub pmem: Vec<Pmem>,
}

/// A virtio-pmem device's image as the guest reaches it.
pub struct Pmem {
    /// The guest physical address its device's config gives.
    pub window: u64,
    pub host: crate::connect::HostMemory,
    /// Kept for the VM's life.
    pub mapping: crate::connect::FileDataport,
}

/// Builds the description's in-process devices: the virtio ones as `hostio` builds them
/// (opening their host ends here), and the connectors. `vhost`: the hypervisor's eventfds a
/// vhost-user device hands its backend program.
pub fn build(
    l: &Layout,
    mem: virtio::Memory,
    signal: &dyn Fn(&layout::Device) -> Arc<dyn Signal>,
    stdout: Box<dyn Write + Send>,
    journal: &dyn Fn(&layout::Device) -> Option<Arc<dyn virtio::blk::Journal>>,
    hv: &dyn Fn() -> crate::connect::Hv,
    vhost: &dyn Fn(&layout::Device) -> hostio::devices::VhostFds,
) -> Result<Built, OpenError> {
    let b = hostio::devices::build(
        l,
        mem.clone(),
        signal,
        stdout,
        layout::Placement::InProcess,
        hostio::devices::Extras { journal, vhost },
        Vec::new(),
    )?;
    let mut out = Built {
        functions: b.functions,
        console: b.console,
        starters: b.starters,
        skipped: b.skipped,
        connectors: Vec::new(),
        pmem: Vec::new(),
    };
    for d in l.devices.iter() {
        let DeviceKind::VirtioPmem { image, window } = &d.kind else {
            continue;
        };
        let (file, size) = virtio::pmem::open(image, layout::layout::PMEM_WINDOW)?;
        let dup = file
            .try_clone()
            .map_err(|source| virtio::pmem::OpenError::Io {
                path: image.display().to_string(),
                source,
            })?;
        let mapping =
            crate::connect::FileDataport::map_shared(dup, size, image, "virtio-pmem image")?;
        let host = crate::connect::HostMemory {
            addr: mapping.host_address(),
            size,
            read_only: false,
        };
        let bar = d.bars.first().map_or(0, |b| b.base);
        let dev = virtio::pmem::Pmem::new(file, *window, size);
        let f =
            virtio::transport::VirtioPci::new(dev, mem.clone(), bar, d.intx_pin as u8, signal(d));
        out.functions.push((devfn(d.slot as u8, 0), Box::new(f)));
        out.pmem.push(Pmem {
            window: *window,
            host,
            mapping,
        });
    }
    for d in l.devices.iter() {
        let DeviceKind::Connector {
            name,
            dataport_size,
            peer,
        } = &d.kind
        else {
            continue;
        };
        let at = devfn(d.slot as u8, 0);
        let (f, start, host) = crate::connect::build(
            d,
            name,
            *dataport_size,
            peer.as_deref(),
            signal(d),
            l.v2m.clone(),
            hv(),
        )?;
        out.starters.extend(start);
        out.connectors.push((at, host));
        out.functions.push((at, Box::new(f)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the writes that reach it.
    #[derive(Default)]
    struct Counted(AtomicUsize);
    impl crate::bus::BusDevice for Counted {
        fn read(&self, _: u64, _: &mut [u8]) {}
        fn write(&self, _: u64, _: &[u8]) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    struct NoLine;
    impl IrqLine for NoLine {
        fn set_level(&self, _: bool) {}
    }

    /// The guest may program any address into an MSI-X entry: only the frame's doorbell with
    /// one of its SPIs is written, never a BAR (the device's own: a deadlock) or RAM.
    #[test]
    fn device_msis_reach_only_the_frames_doorbell() {
        let l = layout::resolve(&layout::Description::default_vm())
            .unwrap()
            .layout;
        let v = l.v2m.clone().unwrap();
        let (frame, bar) = (Arc::new(Counted::default()), Arc::new(Counted::default()));
        let mut bus = Bus::default();
        bus.add(v.region.clone(), frame.clone());
        let bar_region = layout::Region::new("a BAR", l.pci.mem32.base, 0x4000);
        bus.add(bar_region.clone(), bar.clone());
        let cell = Arc::new(OnceLock::new());
        let _ = cell.set(Arc::new(bus));
        let s = DeviceSignal {
            bus: cell,
            intx: Arc::new(NoLine),
            frame: Some(v.clone()),
        };
        let doorbell = v.region.base + platform::gicv2m::MSI_SETSPI_NS;
        s.msi((bar_region.base + 0x1000, v.spi_base));
        s.msi((doorbell, v.spi_base + v.spi_count));
        s.msi((doorbell, v.spi_base - 1));
        s.msi((v.region.base, v.spi_base));
        assert_eq!(bar.0.load(Ordering::Relaxed), 0);
        assert_eq!(frame.0.load(Ordering::Relaxed), 0);
        s.msi((doorbell, v.spi_base + v.spi_count - 1));
        assert_eq!(frame.0.load(Ordering::Relaxed), 1);
        // Without a frame there is no MSI at all.
        assert!(!msi_to_frame(None, doorbell, v.spi_base));
    }
}
