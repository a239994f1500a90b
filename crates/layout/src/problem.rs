//! What validation finds: each problem names the thing, the value and the fix.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// Which rule a problem comes from, so that callers and tests can tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    Overlap,
    AddressSpace,
    Alignment,
    PoolOutsideRam,
    PoolSize,
    EcamSize,
    BusRange,
    RamSize,
    IrqCollision,
    IrqRange,
    V2mRange,
    Vcpus,
    Slots,
    MsiBudget,
    BarPlacement,
    Device,
    Swiotlb,
    Earlycon,
    Backend,
    /// The GIC CPU interface is smaller than the architecture's registers.
    GicSize,
    /// A PCI window that cannot hold the BARs placed in it.
    PciWindow,
    /// A device in the backend shares an INTx line with an in-process device.
    IntxShared,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub rule: Rule,
    pub message: String,
    pub fix: String,
}

impl Problem {
    pub fn error(rule: Rule, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Problem {
            severity: Severity::Error,
            rule,
            message: message.into(),
            fix: fix.into(),
        }
    }

    pub fn warning(rule: Rule, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Problem {
            severity: Severity::Warning,
            ..Self::error(rule, message, fix)
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{tag}: {}\n  fix: {}", self.message, self.fix)
    }
}

/// A description that cannot become a VM: all of its problems, warnings included.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in the VM description:\n{}", .problems.iter().filter(|p| p.is_error()).count(), render(.problems))]
pub struct Invalid {
    pub problems: Vec<Problem>,
}

pub fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}
