//! Guest accesses the hypervisor cannot decode: on arm64 a data abort on an address with no
//! memory behind it whose syndrome carries no register or size (vector loads such as `ld1`,
//! load and store pairs, writeback forms; glibc's string functions use them). KVM hands them
//! to splitvirt (`KVM_CAP_ARM_NISV_TO_USER`) instead of failing `KVM_RUN`; the guest gets an
//! external data abort at that instruction (a program: SIGBUS; the kernel: its own fault
//! handling) and the VM goes on. Each address is logged once.

use std::collections::HashSet;
use std::sync::Mutex;

/// How many distinct addresses are remembered; past that, lines are only rate-limited.
const REMEMBERED: usize = 256;

#[derive(Default)]
pub struct Undecoded {
    seen: Mutex<HashSet<u64>>,
}

impl Undecoded {
    /// vCPU `vcpu` touched guest-physical `addr` with an access the hypervisor cannot decode
    /// (`syndrome`: what the hypervisor knows of it). Logs it the first time for an address;
    /// returns whether it did.
    pub fn report(&self, vcpu: usize, addr: u64, syndrome: u64) -> bool {
        let first = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.len() < REMEMBERED {
                seen.insert(addr)
            } else {
                !seen.contains(&addr)
            }
        };
        if first {
            ratelog::warn!(
                "vCPU {vcpu}: the guest accessed {addr:#x} with an instruction the hypervisor \
                 cannot emulate (vector, pair or writeback access to device memory; syndrome \
                 {syndrome:#x}): it gets an external abort there (a program: SIGBUS), the VM \
                 goes on. Logged once per address."
            );
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_is_logged_once_and_memory_stays_bounded() {
        let u = Undecoded::default();
        assert!(u.report(0, 0x1000_0000, 0));
        assert!(!u.report(1, 0x1000_0000, 0), "the same address again");
        assert!(u.report(0, 0x1000_0008, 0));
        for a in 0..10_000u64 {
            u.report(0, 0x2000_0000 + a * 8, 0);
        }
        assert_eq!(u.seen.lock().unwrap().len(), REMEMBERED);
        assert!(!u.report(0, 0x1000_0000, 0), "still remembered");
    }
}
