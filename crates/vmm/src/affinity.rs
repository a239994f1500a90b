//! The host CPUs a VM's vCPU threads run on (the description's `vcpu_affinity`). Two VMs that
//! answer each other (a device VM and its driver VM) otherwise often share one CPU: the
//! scheduler wakes a vCPU on the CPU of the thread that woke it.

use layout::resolve::cpu_list;
use std::io;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AffinityError {
    #[error(
        "vcpu_affinity of vCPU {vcpu} names host CPU {cpu}, which this process may not run on \
         (it may run on {allowed}); name CPUs among those, or remove vcpu_affinity"
    )]
    NotAllowed {
        vcpu: usize,
        cpu: usize,
        allowed: String,
    },
    #[error("cannot read the host CPUs this process may run on: {0}")]
    Get(#[source] io::Error),
    #[error("cannot move vCPU {vcpu}'s thread to host CPUs {cpus}: {source}")]
    Set {
        vcpu: usize,
        cpus: String,
        #[source]
        source: io::Error,
    },
}

/// The host CPUs the calling thread may run on.
pub fn allowed() -> io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the size is the set's own; 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads a set we own, for numbers below its size.
    Ok((0..layout::resolve::MAX_HOST_CPUS)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Each vCPU's CPUs are ones this process may run on: checked before any vCPU runs, so that
/// a description written for another host fails with the CPUs it may name.
pub fn check(per_vcpu: &[Vec<usize>]) -> Result<(), AffinityError> {
    let allowed = allowed().map_err(AffinityError::Get)?;
    for (vcpu, cpus) in per_vcpu.iter().enumerate() {
        if let Some(&cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
            return Err(AffinityError::NotAllowed {
                vcpu,
                cpu,
                allowed: cpu_list(&allowed),
            });
        }
    }
    Ok(())
}

/// Moves the calling thread (vCPU `vcpu`'s) to `cpus`.
pub fn pin_current(vcpu: usize, cpus: &[usize]) -> Result<(), AffinityError> {
    // SAFETY: an all-zero cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| c < layout::resolve::MAX_HOST_CPUS) {
        // SAFETY: c is below the set's size.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: the size is the set's own; 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(AffinityError::Set {
            vcpu,
            cpus: cpu_list(cpus),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread pinned to one CPU runs there only, as the kernel says; a CPU the process may
    /// not use is refused before any thread moves, naming the CPUs it may use.
    #[test]
    fn a_pinned_thread_runs_on_its_cpu_only() {
        let all = allowed().unwrap();
        let first = all[0];
        let (on, cpu) = std::thread::spawn(move || {
            pin_current(0, &[first]).unwrap();
            // SAFETY: sched_getcpu has no preconditions.
            (allowed().unwrap(), unsafe { libc::sched_getcpu() })
        })
        .join()
        .unwrap();
        assert_eq!(on, vec![first]);
        assert_eq!(cpu, first as i32);
        assert_eq!(allowed().unwrap(), all, "only the pinned thread moved");
        let outside = (0..layout::resolve::MAX_HOST_CPUS)
            .find(|c| !all.contains(c))
            .unwrap();
        let e = check(&[vec![first], vec![outside]])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("vCPU 1 names host CPU {outside}")) && e.contains(&cpu_list(&all)),
            "{e}"
        );
        check(std::slice::from_ref(&all)).unwrap();
    }
}
