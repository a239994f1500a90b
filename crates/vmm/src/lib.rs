//! The hypervisor boundary. Everything that knows KVM lives under `kvm`, compiled only for
//! aarch64 hosts; the rest of splitvirt sees plain types and errors.

#[cfg(target_arch = "aarch64")]
mod kvm;

/// What a host check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    pub api_version: i32,
    /// Address and value of the guest's first MMIO write.
    pub mmio_exit: (u64, Vec<u8>),
    pub gic_irqs: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("splitvirt runs VMs on aarch64 Linux hosts with /dev/kvm; this host is {0}. Run it inside the emulated arm64 board: `cargo xtask board`")]
    WrongArch(&'static str),
    #[error("cannot open /dev/kvm: {0} (is KVM enabled in the host kernel, and may this user open /dev/kvm?)")]
    NoKvm(String),
    #[error("KVM refused to {what}: {detail}")]
    Kvm { what: &'static str, detail: String },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("the guest stopped with {0} before its MMIO write")]
    UnexpectedExit(String),
}

/// Proves this host can run splitvirt guests: opens /dev/kvm, creates a VM with an in-kernel
/// vgic-v2, runs a few guest instructions and sees their MMIO write as an exit.
pub fn host_check() -> Result<HostReport, Error> {
    #[cfg(target_arch = "aarch64")]
    {
        kvm::smoke()
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        Err(Error::WrongArch(std::env::consts::ARCH))
    }
}
