//! KVM on aarch64: guest memory (memfds from `memory`), vCPU threads, the in-kernel vgic-v2, and
//! the MMIO bus with the PL011 and GICv2m models wired to KVM interrupt lines.

use crate::bus::Bus;
use crate::{Error, Exit, HostReport, Prepared};
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2,
    kvm_userspace_memory_region, kvm_vcpu_init, KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_REG_ARM64, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64, KVM_VGIC_V2_ADDR_TYPE_CPU,
    KVM_VGIC_V2_ADDR_TYPE_DIST,
};
use kvm_bindings::{
    kvm_enable_cap, kvm_vcpu_events, KVM_ARM_VCPU_POWER_OFF, KVM_CAP_ARM_INJECT_EXT_DABT,
    KVM_CAP_ARM_NISV_TO_USER, KVM_CAP_HALT_POLL, KVM_EXIT_ARM_NISV, KVM_MEM_READONLY,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use platform::{IrqLine, SpiTrigger};
use std::io::Read;
use std::sync::{mpsc, Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// KVM's irqfds for `msiroute`: an eventfd bound to a GSI, which KVM's default routing maps
/// to SPI n (interrupt 32 + n); an irqfd pulses it, which is how an edge-triggered MSI arrives.
struct KvmIrqfds(Arc<VmFd>);

impl KvmIrqfds {
    /// `fd` as the EventFd kvm-ioctls takes, borrowed: never closed here.
    fn with_eventfd<R>(
        fd: std::os::fd::RawFd,
        f: impl FnOnce(&vmm_sys_util::eventfd::EventFd) -> R,
    ) -> R {
        use std::os::fd::FromRawFd;
        // SAFETY: a view of a descriptor that MsiRoutes owns and keeps open; ManuallyDrop
        // keeps this view from closing it.
        let e =
            std::mem::ManuallyDrop::new(unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(fd) });
        f(&e)
    }
}

impl crate::msiroute::Irqfds for KvmIrqfds {
    fn attach(&self, fd: std::os::fd::RawFd, gsi: u32) -> std::io::Result<()> {
        Self::with_eventfd(fd, |e| self.0.register_irqfd(e, gsi))
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
    fn detach(&self, fd: std::os::fd::RawFd, gsi: u32) -> std::io::Result<()> {
        Self::with_eventfd(fd, |e| self.0.unregister_irqfd(e, gsi))
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl crate::msiroute::Ioeventfds for KvmIrqfds {
    fn attach(&self, fd: std::os::fd::RawFd, addr: u64) -> std::io::Result<()> {
        use kvm_ioctls::{IoEventAddress::Mmio, NoDatamatch};
        Self::with_eventfd(fd, |e| self.0.register_ioevent(e, &Mmio(addr), NoDatamatch))
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
    fn detach(&self, fd: std::os::fd::RawFd, addr: u64) -> std::io::Result<()> {
        use kvm_ioctls::{IoEventAddress::Mmio, NoDatamatch};
        Self::with_eventfd(fd, |e| {
            self.0.unregister_ioevent(e, &Mmio(addr), NoDatamatch)
        })
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

fn eventfd(what: &'static str) -> Result<vmm_sys_util::eventfd::EventFd, Error> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC).map_err(|e| Error::Kvm {
        what,
        detail: e.to_string(),
    })
}

/// An eventfd as a plain descriptor, for the backend.
fn owned(e: vmm_sys_util::eventfd::EventFd) -> std::os::fd::OwnedFd {
    use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
    // SAFETY: the eventfd's descriptor, handed over whole.
    unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
}

/// Queue notifications of virtio devices, caught by KVM (ioeventfd) and signalled straight to
/// whoever serves them (the backend, or a thread of splitvirt's): one eventfd per device,
/// attached at each queue's notify address (a 16-bit write of the queue index, as Linux's
/// virtio-pci writes it) wherever the guest puts BAR 0. Any other write there still exits to splitvirt and travels as a message.
/// When the backend dies they are detached, so that notifications reach the reaper again, and
/// a restarted backend gets them back.
struct Notifiers {
    vm: Arc<VmFd>,
    devices: Mutex<std::collections::HashMap<u8, Notifier>>,
    detached: std::sync::atomic::AtomicBool,
}

struct Notifier {
    /// One for all queues, or one per queue (`per_queue`: a vhost-user device's kicks).
    fds: Vec<vmm_sys_util::eventfd::EventFd>,
    per_queue: bool,
    writes: Vec<(u64, u16)>,
    /// Where BAR 0 decodes, and whether KVM catches the writes there now.
    at: Option<u64>,
    attached: bool,
}

impl crate::machine::QueueNotify for Notifiers {
    fn fds(&self) -> Vec<(u8, std::os::fd::OwnedFd)> {
        Notifiers::fds(self)
    }
    fn queue_fds(&self) -> Vec<(u8, Vec<std::os::fd::OwnedFd>)> {
        let d = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        d.iter()
            .filter(|(_, n)| n.per_queue)
            .map(|(dev, n)| {
                let fds = n
                    .fds
                    .iter()
                    .filter_map(|f| Some(owned(f.try_clone().ok()?)));
                (*dev, fds.collect())
            })
            .collect()
    }
    fn place(&self, dev: u8, at: Option<u64>) {
        Notifiers::place(self, dev, at)
    }
    fn attach_all(&self, on: bool) {
        Notifiers::attach_all(self, on)
    }
}

impl Notifiers {
    fn new(vm: Arc<VmFd>, l: &layout::Layout, at: layout::Placement) -> Result<Notifiers, Error> {
        let mut devices = std::collections::HashMap::new();
        for d in l.devices.iter().filter(|d| d.placement == at) {
            let Some(writes) = crate::devices::notify_writes(&d.kind) else {
                continue;
            };
            let per_queue = matches!(d.kind, layout::DeviceKind::VhostUser { .. });
            let fds = (0..if per_queue { writes.len() } else { 1 })
                .map(|_| eventfd("make an eventfd for queue notifications"))
                .collect::<Result<Vec<_>, _>>()?;
            devices.insert(
                d.slot as u8,
                Notifier {
                    fds,
                    per_queue,
                    writes,
                    at: None,
                    attached: false,
                },
            );
        }
        Ok(Notifiers {
            vm,
            devices: Mutex::new(devices),
            detached: Default::default(),
        })
    }

    /// (device, eventfd) for the backend.
    fn fds(&self) -> Vec<(u8, std::os::fd::OwnedFd)> {
        let d = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        d.iter()
            .filter(|(_, n)| !n.per_queue)
            .filter_map(|(dev, n)| Some((*dev, owned(n.fds.first()?.try_clone().ok()?))))
            .collect()
    }

    /// Device `dev`'s BAR 0 now decodes at `at` (None: nowhere).
    fn place(&self, dev: u8, at: Option<u64>) {
        let mut d = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let Some(n) = d.get_mut(&dev) else { return };
        self.catch(dev, n, false);
        n.at = at;
        let on = !self.detached.load(std::sync::atomic::Ordering::Acquire);
        self.catch(dev, n, on);
    }

    /// KVM catches `n`'s notification writes (`on`) or lets them exit to splitvirt.
    fn catch(&self, dev: u8, n: &mut Notifier, on: bool) {
        use kvm_ioctls::IoEventAddress::Mmio;
        let Some(base) = n.at else { return };
        if n.attached == on {
            return;
        }
        for (i, (off, q)) in n.writes.iter().enumerate() {
            let Some(fd) = n.fds.get(if n.per_queue { i } else { 0 }) else {
                continue;
            };
            if !on {
                let _ = self.vm.unregister_ioevent(fd, &Mmio(base + off), *q);
            } else if let Err(e) = self.vm.register_ioevent(fd, &Mmio(base + off), *q) {
                // Not fatal: the notification then exits to splitvirt as before.
                log::warn!("KVM will not catch device {dev}'s notifications: {e}");
            }
        }
        n.attached = on;
    }

    /// Every device's notifications caught by KVM (`on`: a backend serves them) or not.
    fn attach_all(&self, on: bool) {
        self.detached
            .store(!on, std::sync::atomic::Ordering::Release);
        let mut d = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        for (dev, n) in d.iter_mut() {
            self.catch(*dev, n, on);
        }
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm {
        what,
        detail: e.to_string(),
    }
}

/// Register id of a 64-bit core register at `offset` bytes into `struct kvm_regs`.
fn core_reg(offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | (offset / 4)
}
/// `regs.pc` follows x0..x30 and sp in `struct user_pt_regs`.
const PC: u64 = 32 * 8;

const RAM: u64 = 0x4000_0000;
const GIC_DIST: u64 = 0x0800_0000;
const GIC_CPU: u64 = 0x0801_0000;
const UART: u64 = 0x0900_0000;
const GIC_IRQS: u32 = 128;

/// movz x1, #0x900, lsl #16; movz x0, #0x41; strb w0, [x1]; b .
const GUEST_CODE: [u32; 4] = [0xd2a1_2001, 0xd280_0820, 0x3900_0020, 0x1400_0000];

/// Maps a host range as guest memory in memslot `slot`.
fn map_memory(vm: &VmFd, slot: u32, host: u64, base: u64, size: u64) -> Result<(), Error> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: base,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: the caller's mapping of this range outlives the VM (both live until exit).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("map guest memory"))
}

/// The in-kernel vgic-v2, created after the vCPUs and initialised last (KVM's order).
fn create_vgic(vm: &VmFd, dist: u64, cpu: u64, irqs: u32) -> Result<kvm_ioctls::DeviceFd, Error> {
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2,
        fd: 0,
        flags: 0,
    };
    let gic = vm.create_device(&mut dev).map_err(kvm_err(
        "create an in-kernel vgic-v2 (is GICv2 emulation available?)",
    ))?;
    let set = |group: u32, attr: u64, addr: u64, what| {
        gic.set_device_attr(&kvm_device_attr {
            flags: 0,
            group,
            attr,
            addr,
        })
        .map_err(kvm_err(what))
    };
    set(
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V2_ADDR_TYPE_DIST),
        &dist as *const u64 as u64,
        "place the GIC distributor",
    )?;
    set(
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V2_ADDR_TYPE_CPU),
        &cpu as *const u64 as u64,
        "place the GIC CPU interface",
    )?;
    set(
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        &irqs as *const u32 as u64,
        "size the GIC",
    )?;
    set(
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
        0,
        "initialise the vgic-v2",
    )?;
    Ok(gic)
}

pub fn smoke() -> Result<HostReport, Error> {
    let kvm = Kvm::new().map_err(|e| Error::NoKvm(e.to_string()))?;
    let api_version = kvm.get_api_version();
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM), 0x10000)])
        .map_err(|e| Error::Memory(e.to_string()))?;
    let code: Vec<u8> = GUEST_CODE.iter().flat_map(|i| i.to_le_bytes()).collect();
    mem.write_slice(&code, GuestAddress(RAM))
        .map_err(|e| Error::Memory(e.to_string()))?;
    let host = mem
        .get_host_address(GuestAddress(RAM))
        .map_err(|e| Error::Memory(e.to_string()))?;
    map_memory(&vm, 0, host as u64, RAM, 0x10000)?;

    let vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU 0"))?;
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(kvm_err("name a preferred CPU target"))?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    vcpu.vcpu_init(&kvi).map_err(kvm_err("initialise vCPU 0"))?;

    let _gic = create_vgic(&vm, GIC_DIST, GIC_CPU, GIC_IRQS)?;

    vcpu.set_one_reg(core_reg(PC), &RAM.to_le_bytes())
        .map_err(kvm_err("set the PC"))?;
    let mut vcpu = vcpu;
    // A few exits at most before the store; bounded so that a broken host cannot hang the check.
    for _ in 0..16 {
        match vcpu.run().map_err(kvm_err("run vCPU 0"))? {
            VcpuExit::MmioWrite(addr, data) if addr == UART => {
                return Ok(HostReport {
                    api_version,
                    mmio_exit: (addr, data.to_vec()),
                    gic_irqs: GIC_IRQS,
                });
            }
            VcpuExit::MmioWrite(..) | VcpuExit::MmioRead(..) => {}
            other => return Err(Error::UnexpectedExit(format!("{other:?}"))),
        }
    }
    Err(Error::UnexpectedExit(
        "16 exits without the expected write".into(),
    ))
}

/// `regs.pstate` follows pc.
const PSTATE: u64 = 33 * 8;
/// EL1h with D, A, I and F masked: the boot protocol's entry state.
const PSTATE_EL1H_MASKED: u64 = 0x3c5;
/// KVM_IRQ_LINE on arm64: type in bits 24..31 (1 = SPI), interrupt ID in the low bits.
const KVM_ARM_IRQ_TYPE_SPI: u32 = 1;

struct SpiLine {
    vm: Arc<VmFd>,
    intid: u32,
}

impl IrqLine for SpiLine {
    fn set_level(&self, high: bool) {
        if let Err(e) = self
            .vm
            .set_irq_line((KVM_ARM_IRQ_TYPE_SPI << 24) | self.intid, high)
        {
            ratelog::error!("cannot set interrupt {}: {e}", self.intid);
        }
    }
}

struct Msi {
    vm: Arc<VmFd>,
}

impl SpiTrigger for Msi {
    /// An MSI is an edge: raise and lower the line.
    fn trigger(&self, intid: u32) {
        let irq = (KVM_ARM_IRQ_TYPE_SPI << 24) | intid;
        if let Err(e) = self
            .vm
            .set_irq_line(irq, true)
            .and_then(|_| self.vm.set_irq_line(irq, false))
        {
            ratelog::error!("cannot raise MSI interrupt {intid}: {e}");
        }
    }
}

fn load(mem: &GuestMemoryMmap<()>, p: &mut Prepared) -> Result<(), Error> {
    let at_err = |what: &str, at: u64, e: String| {
        Error::Memory(format!("writing the {what} at {at:#x}: {e}"))
    };
    let put = |what: &str, bytes: &[u8], at: u64| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|e| at_err(what, at, e.to_string()))
    };
    // A file goes straight from the page cache into guest memory.
    let read_in = |f: &mut crate::BootFile, at: u64| {
        mem.read_exact_volatile_from(GuestAddress(at), &mut f.file, f.len as usize)
            .map_err(|e| at_err(f.what, at, format!("reading {}: {e}", f.path.display())))
    };
    match &mut p.image {
        crate::Payload::File(f) => read_in(f, p.placement.kernel)?,
        crate::Payload::Bytes(b) => put("kernel", b, p.placement.kernel)?,
    }
    put("device tree", &p.dtb, p.placement.dtb)?;
    if let (Some(f), Some((start, _))) = (&mut p.initrd, p.placement.initrd) {
        read_in(f, start)?;
    }
    Ok(())
}

fn dump_regs(vcpu: &VcpuFd) -> String {
    let mut out = String::new();
    let reg = |off: u64| {
        let mut b = [0u8; 8];
        vcpu.get_one_reg(core_reg(off), &mut b)
            .ok()
            .map(|_| u64::from_le_bytes(b))
    };
    for i in 0..31u64 {
        if let Some(v) = reg(i * 8) {
            out.push_str(&format!(
                "x{i:<2} {v:#018x}{}",
                if i % 4 == 3 { "\n" } else { "  " }
            ));
        }
    }
    for (name, off) in [("sp", 31 * 8), ("pc", PC), ("pstate", PSTATE)] {
        if let Some(v) = reg(off) {
            out.push_str(&format!("\n{name:<6} {v:#018x}"));
        }
    }
    out
}

enum Stop {
    Exit(Exit),
    Fault {
        vcpu: usize,
        why: String,
        regs: String,
    },
}

/// The description's `halt_poll_us`: KVM polls a halted vCPU of this VM that long at most
/// (KVM_CAP_HALT_POLL, Linux 5.8). Not fatal where the host cannot: its default stays.
fn halt_poll(vm: &VmFd, t: std::time::Duration) {
    let ns = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_HALT_POLL,
        ..Default::default()
    };
    cap.args[0] = ns;
    let done = if vm.check_extension_raw(u64::from(KVM_CAP_HALT_POLL)) > 0 {
        vm.enable_cap(&cap).map_err(|e| e.to_string())
    } else {
        Err("no KVM_CAP_HALT_POLL (Linux 5.8)".into())
    };
    match done {
        Ok(()) => log::debug!("a halted vCPU is polled for up to {t:?}"),
        Err(e) => log::warn!(
            "halt_poll_us: this host's KVM keeps its own halt polling ({e}); remove \
             halt_poll_us, or set the host's /sys/module/kvm/parameters/halt_poll_ns"
        ),
    }
}

/// What a vCPU does with an access KVM could not decode (`undecodable`).
struct Undecodable {
    seen: Arc<crate::undecoded::Undecoded>,
    /// KVM hands such accesses over (KVM_CAP_ARM_NISV_TO_USER) and can inject an external
    /// data abort (KVM_CAP_ARM_INJECT_EXT_DABT); without both, `KVM_RUN` fails on them.
    handled: bool,
}

impl Undecodable {
    fn enable(vm: &VmFd) -> Undecodable {
        let has = |cap: u32| vm.check_extension_raw(u64::from(cap)) > 0;
        let handled = has(KVM_CAP_ARM_NISV_TO_USER)
            && has(KVM_CAP_ARM_INJECT_EXT_DABT)
            && vm
                .enable_cap(&kvm_enable_cap {
                    cap: KVM_CAP_ARM_NISV_TO_USER,
                    ..Default::default()
                })
                .is_ok();
        if !handled {
            log::warn!(
                "this host's KVM cannot hand over guest accesses it cannot decode \
                 (KVM_CAP_ARM_NISV_TO_USER and KVM_CAP_ARM_INJECT_EXT_DABT, Linux 5.5): a guest \
                 program that reads device memory with vector or pair loads will stop the VM"
            );
        }
        Undecodable {
            seen: Default::default(),
            handled,
        }
    }

    /// An external data abort for the access `vcpu` just made; logged once per address.
    fn abort(&self, id: usize, vcpu: &mut VcpuFd) -> Result<(), String> {
        // SAFETY: the exit reason is KVM_EXIT_ARM_NISV, so `arm_nisv` is the union's member.
        let n = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.arm_nisv };
        self.seen.report(id, n.fault_ipa, n.esr_iss);
        let mut events = kvm_vcpu_events::default();
        events.exception.ext_dabt_pending = 1;
        vcpu.set_vcpu_events(&events)
            .map_err(|e| format!("cannot inject an external abort: {e}"))
    }
}

fn vcpu_loop(id: usize, vcpu: &mut VcpuFd, bus: &Bus, undecodable: &Undecodable) -> Stop {
    if id == 0 {
        crate::stats::first_run();
    }
    loop {
        match vcpu.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => bus.read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.write(addr, data),
            Ok(VcpuExit::Unsupported(KVM_EXIT_ARM_NISV)) if undecodable.handled => {
                if let Err(why) = undecodable.abort(id, vcpu) {
                    return Stop::Fault {
                        vcpu: id,
                        why,
                        regs: dump_regs(vcpu),
                    };
                }
            }
            Ok(VcpuExit::SystemEvent(t, _)) if t == KVM_SYSTEM_EVENT_SHUTDOWN => {
                return Stop::Exit(Exit::PowerOff)
            }
            Ok(VcpuExit::SystemEvent(t, _)) if t == KVM_SYSTEM_EVENT_RESET => {
                return Stop::Exit(Exit::Reset)
            }
            Ok(other) => {
                let why = format!("unexpected exit {other:?}");
                return Stop::Fault {
                    vcpu: id,
                    why,
                    regs: dump_regs(vcpu),
                };
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                return Stop::Fault {
                    vcpu: id,
                    why: format!("KVM_RUN failed: {e}"),
                    regs: dump_regs(vcpu),
                }
            }
        }
    }
}

/// stdin -> PL011. Ctrl-A x ends splitvirt (the guest owns Ctrl-C).
fn input_thread(mut deliver: hostio::endpoint::Deliver, tx: mpsc::Sender<Stop>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        let mut ctrl_a = false;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut out = Vec::with_capacity(n);
            for &b in &buf[..n] {
                if ctrl_a && b == b'x' {
                    let _ = tx.send(Stop::Exit(Exit::Quit));
                    return;
                }
                ctrl_a = b == 0x01 && !ctrl_a;
                if !ctrl_a {
                    out.push(b);
                }
            }
            deliver(&out);
        }
    });
}

/// The machine's hypervisor: KVM's interrupt lines, irqfds, ioeventfds and memslots.
struct KvmHypervisor(Arc<VmFd>);

impl crate::machine::Hypervisor for KvmHypervisor {
    fn spi_line(&self, intid: u32) -> Arc<dyn IrqLine> {
        Arc::new(SpiLine {
            vm: self.0.clone(),
            intid,
        })
    }
    fn spi_trigger(&self) -> Arc<dyn SpiTrigger> {
        Arc::new(Msi { vm: self.0.clone() })
    }
    fn irqfds(&self) -> Box<dyn crate::msiroute::Irqfds> {
        Box::new(KvmIrqfds(self.0.clone()))
    }
    fn ioeventfds(&self) -> Box<dyn crate::msiroute::Ioeventfds> {
        Box::new(KvmIrqfds(self.0.clone()))
    }
    fn notifiers(
        &self,
        l: &layout::Layout,
        at: layout::Placement,
    ) -> Result<Arc<dyn crate::machine::QueueNotify>, Error> {
        Ok(Arc::new(Notifiers::new(self.0.clone(), l, at)?))
    }
    fn memslot(
        &self,
        slot: u32,
        host: crate::connect::HostMemory,
    ) -> Box<dyn FnMut(Option<u64>) + Send> {
        let vm = self.0.clone();
        Box::new(move |at: Option<u64>| {
            let region = kvm_userspace_memory_region {
                slot,
                // Reads at memory speed; writes exit as MMIO, to the device's model.
                flags: if host.read_only { KVM_MEM_READONLY } else { 0 },
                guest_phys_addr: at.unwrap_or(0),
                memory_size: at.map_or(0, |_| host.size),
                userspace_addr: host.addr,
            };
            // SAFETY: the mapping lives as long as its device, which the VM keeps until the
            // process ends; size 0 removes the slot.
            if let Err(e) = unsafe { vm.set_user_memory_region(region) } {
                ratelog::error!("cannot map guest memory at {at:?} (slot {slot}): {e}");
            }
        })
    }
}

/// Runs until the guest powers off or resets (the caller decides what a reset means).
pub fn run(spec: &crate::RunSpec, mut p: Prepared) -> Result<Exit, Error> {
    let (l, stats) = (&spec.layout, spec.stats);
    let start = crate::stats::process_start();
    // A description written for another host fails before anything is built.
    if let Some(a) = &l.vcpu_affinity {
        crate::affinity::check(a)?;
    }
    let kvm = Kvm::new().map_err(|e| Error::NoKvm(e.to_string()))?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
    let undecodable = Arc::new(Undecodable::enable(&vm));
    if let Some(t) = l.halt_poll {
        halt_poll(&vm, t);
    }
    crate::stats::phase("vm");
    let ram = crate::memory::guest_ram(l).map_err(|e| Error::Memory(e.0))?;
    crate::stats::phase("ram");
    let mem = ram.mem.clone();
    // Guest RAM outside the pool (anonymous memory), which --stats leaves out of our own.
    let guest_ranges: Vec<(u64, u64)> = mem
        .iter()
        .filter(|r| r.file_offset().is_none())
        .map(|r| (r.as_ptr() as u64, r.len()))
        .collect();
    let dev_mem = crate::memory::device_memory(l, &ram).map_err(|e| Error::Memory(e.0))?;
    load(&mem, &mut p)?;
    crate::stats::phase("loaded");
    // The kernel and initrd are in guest memory now: their files (or an inflated Image) are
    // not needed for the VM's life.
    let placement = p.placement.clone();
    drop(p);
    // One memslot per region: RAM below the pool, the pool (its own memfd), RAM above it.
    for (slot, r) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(r.start_addr())
            .map_err(|e| Error::Memory(e.to_string()))?;
        map_memory(&vm, slot as u32, host as u64, r.start_addr().0, r.len())?;
    }

    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(kvm_err("name a preferred CPU target"))?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    let mut vcpus = Vec::new();
    for id in 0..l.vcpus as u64 {
        let vcpu = vm.create_vcpu(id).map_err(kvm_err("create a vCPU"))?;
        let mut init = kvi;
        if id > 0 {
            // Secondaries wait, powered off, for the guest's PSCI CPU_ON (handled by KVM).
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        vcpu.vcpu_init(&init)
            .map_err(kvm_err("initialise a vCPU"))?;
        vcpus.push(vcpu);
    }
    let boot = &vcpus[0];
    boot.set_one_reg(core_reg(PC), &placement.kernel.to_le_bytes())
        .map_err(kvm_err("set the PC"))?;
    boot.set_one_reg(core_reg(0), &placement.dtb.to_le_bytes())
        .map_err(kvm_err("set x0"))?;
    for r in 1..4 {
        boot.set_one_reg(core_reg(r * 8), &0u64.to_le_bytes())
            .map_err(kvm_err("clear x1..x3"))?;
    }
    boot.set_one_reg(core_reg(PSTATE), &PSTATE_EL1H_MASKED.to_le_bytes())
        .map_err(kvm_err("set PSTATE"))?;

    let _gic = create_vgic(&vm, l.gic_dist.base, l.gic_cpu.base, l.gic_irqs)?;
    crate::stats::phase("vcpus");

    let console =
        crate::stats::TimedConsole::new(std::io::stdout(), start, crate::stats::INIT_MARKER);
    let timings = console.timings.clone();
    let mut machine = crate::machine::build(
        crate::machine::Parts {
            layout: l,
            exe: std::path::Path::new("/proc/self/exe"),
            config: spec.config.as_deref(),
            dev_mem,
            pool_fd: ram.pool_fd.as_ref(),
            uart_out: Box::new(console),
            stdout: Box::new(std::io::stdout()),
        },
        &KvmHypervisor(vm.clone()),
    )?;
    for start in std::mem::take(&mut machine.starters) {
        start();
    }
    crate::stats::phase("devices");
    let bus = machine.bus.clone();

    let term = crate::terminal::RawTerminal::enter();
    let (tx, rx) = mpsc::channel();
    input_thread(
        std::mem::replace(&mut machine.stdin, Box::new(|_| {})),
        tx.clone(),
    );
    for (id, mut vcpu) in vcpus.into_iter().enumerate() {
        let (bus, tx, undecodable) = (bus.clone(), tx.clone(), undecodable.clone());
        let cpus = l.vcpu_affinity.as_ref().and_then(|a| a.get(id).cloned());
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // Checked at the start: a refusal now (a CPU gone offline since) leaves it
                // unpinned.
                if let Some(Err(e)) = cpus.map(|c| crate::affinity::pin_current(id, &c)) {
                    ratelog::error!("{e}");
                }
                let stop = vcpu_loop(id, &mut vcpu, &bus, &undecodable);
                let _ = tx.send(stop);
                // Keep the vCPU fd open until the process ends: other vCPUs may still run.
                std::mem::forget(vcpu);
            })
            .map_err(|e| Error::Io(format!("cannot start a vCPU thread: {e}")))?;
    }
    drop(tx);
    let stop = rx
        .recv()
        .map_err(|_| Error::Io("every vCPU thread ended without a reason".into()))?;
    term.restore();
    // Other vCPUs may still be inside KVM_RUN: their memory must outlive them, and the process
    // ends right after this returns.
    std::mem::forget(mem);
    if stats {
        let t = *timings.lock().unwrap_or_else(|e| e.into_inner());
        let ms = |d: Option<std::time::Duration>| {
            d.map_or("-".to_owned(), |d| d.as_millis().to_string())
        };
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let rss = crate::stats::own_rss_kib(
            &read("/proc/self/status"),
            &read("/proc/self/smaps"),
            &guest_ranges,
        );
        eprintln!(
            "splitvirt-stats: first_run_ms={} first_console_ms={} init_ms={} end_ms={} \
             own_rss_kib={} start_ms={}",
            ms(crate::stats::until_first_run()),
            ms(t.first_byte),
            ms(t.marker),
            start.elapsed().as_millis(),
            rss.map_or("-".to_owned(), |r| r.to_string()),
            crate::stats::phases()
        );
    }
    // The backend lives as long as the VM: until the process ends right after this returns.
    std::mem::forget(machine);
    match stop {
        Stop::Exit(e) => Ok(e),
        Stop::Fault { vcpu, why, regs } => Err(Error::GuestFault { vcpu, why, regs }),
    }
}
