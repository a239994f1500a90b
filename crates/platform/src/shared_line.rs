//! PCI INTx lines after the swizzle: several devices on one level-triggered SPI. The line is
//! high while any of them holds it high; one device lowering its INTx must not lower another's.

use crate::IrqLine;
use std::sync::{Arc, Mutex};

/// One level-triggered line and which of its devices hold it high.
pub struct SharedLine {
    line: Arc<dyn IrqLine>,
    /// Bit i: input i holds the line high.
    high: Mutex<u64>,
}

impl SharedLine {
    pub fn new(line: Arc<dyn IrqLine>) -> Arc<SharedLine> {
        Arc::new(SharedLine {
            line,
            high: Mutex::new(0),
        })
    }

    /// Input `i` (0..64, a device's PCI slot) of the line, to hand to that device.
    pub fn input(self: &Arc<Self>, i: u8) -> Arc<dyn IrqLine> {
        Arc::new(Input {
            shared: self.clone(),
            bit: 1u64 << (i % 64),
        })
    }
}

struct Input {
    shared: Arc<SharedLine>,
    bit: u64,
}

impl IrqLine for Input {
    fn set_level(&self, high: bool) {
        let mut held = self.shared.high.lock().unwrap_or_else(|e| e.into_inner());
        let was = *held != 0;
        if high {
            *held |= self.bit;
        } else {
            *held &= !self.bit;
        }
        // Under the lock, so that two inputs' changes reach the line in the order they took
        // effect here.
        if high || was != (*held != 0) {
            self.shared.line.set_level(*held != 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Line(Mutex<Vec<bool>>);
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }

    /// Two devices on one line: the line stays high until both have lowered it, and a device
    /// that asserts again while it is high still reaches the line (a new interrupt).
    #[test]
    fn the_line_is_high_while_any_device_holds_it() {
        let line = Arc::new(Line::default());
        let shared = SharedLine::new(line.clone());
        let (a, b) = (shared.input(1), shared.input(5));
        a.set_level(true);
        b.set_level(true);
        a.set_level(false);
        assert_eq!(*line.0.lock().unwrap(), [true, true]);
        b.set_level(false);
        assert_eq!(line.0.lock().unwrap().last(), Some(&false));
        // Lowering a line nobody holds changes nothing.
        a.set_level(false);
        assert_eq!(line.0.lock().unwrap().len(), 3);
    }
}
