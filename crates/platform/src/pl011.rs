//! The Arm PL011 UART (PrimeCell UART TRM, DDI 0183), as Linux's amba-pl011 driver and
//! earlycon use it. No rust-vmm crate models a PL011 (vm-superio has the 16550 only), so the
//! registers are here: data, flags, baud and line control, interrupt mask/status/clear, DMA
//! control, and the PrimeCell ID registers the AMBA bus probes. TX completes at once; RX has a
//! FIFO that the VMM fills from its input.

use crate::{put_le, IrqLine, MmioDevice};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

const DR: u64 = 0x000;
const RSR: u64 = 0x004;
const FR: u64 = 0x018;
const ILPR: u64 = 0x020;
const IBRD: u64 = 0x024;
const FBRD: u64 = 0x028;
const LCR_H: u64 = 0x02c;
const CR: u64 = 0x030;
const IFLS: u64 = 0x034;
const IMSC: u64 = 0x038;
const RIS: u64 = 0x03c;
const MIS: u64 = 0x040;
const ICR: u64 = 0x044;
const DMACR: u64 = 0x048;

const FR_RXFE: u32 = 1 << 4;
const FR_TXFF: u32 = 1 << 5;
const FR_RXFF: u32 = 1 << 6;
const FR_TXFE: u32 = 1 << 7;

pub const INT_RX: u32 = 1 << 4;
pub const INT_TX: u32 = 1 << 5;
pub const INT_RT: u32 = 1 << 6;
const INT_ALL: u32 = 0x7ff;

/// PeriphID0..3 (PL011 r1p5, as QEMU reports) then PCellID0..3, at 0xfe0..0xffc.
const ID: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// The hardware FIFO is 16 deep (32 in r1p5); more input waits in `pending`.
const FIFO_DEPTH: usize = 16;
/// Input beyond this is dropped: a guest that never reads must not grow our memory.
const PENDING_MAX: usize = 64 * 1024;

pub struct Pl011 {
    out: Box<dyn Write + Send>,
    irq: Arc<dyn IrqLine>,
    rx: VecDeque<u8>,
    pending: VecDeque<u8>,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    ris: u32,
    dmacr: u32,
    ilpr: u32,
    line: bool,
}

impl Pl011 {
    pub fn new(out: Box<dyn Write + Send>, irq: Arc<dyn IrqLine>) -> Self {
        Pl011 {
            out,
            irq,
            rx: VecDeque::new(),
            pending: VecDeque::new(),
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: 0x300,
            ifls: 0x12,
            imsc: 0,
            ris: 0,
            dmacr: 0,
            ilpr: 0,
            line: false,
        }
    }

    /// Input from the host (stdin, a socket): into the FIFO, raising RX.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.pending.len() < PENDING_MAX {
                self.pending.push_back(b);
            }
        }
        self.refill();
    }

    fn refill(&mut self) {
        while self.rx.len() < FIFO_DEPTH {
            match self.pending.pop_front() {
                Some(b) => self.rx.push_back(b),
                None => break,
            }
        }
        if !self.rx.is_empty() {
            self.ris |= INT_RX | INT_RT;
        }
        self.update();
    }

    fn update(&mut self) {
        let level = self.ris & self.imsc != 0;
        if level != self.line {
            self.line = level;
            self.irq.set_level(level);
        }
    }

    fn flags(&self) -> u32 {
        let mut f = FR_TXFE;
        if self.rx.is_empty() {
            f |= FR_RXFE;
        }
        if self.rx.len() >= FIFO_DEPTH {
            f |= FR_RXFF;
        }
        f & !FR_TXFF
    }
}

impl MmioDevice for Pl011 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            DR => {
                let c = self.rx.pop_front().map_or(0, u32::from);
                if self.rx.is_empty() {
                    self.ris &= !(INT_RX | INT_RT);
                }
                self.refill();
                c
            }
            RSR => 0,
            FR => self.flags(),
            ILPR => self.ilpr,
            IBRD => self.ibrd,
            FBRD => self.fbrd,
            LCR_H => self.lcr_h,
            CR => self.cr,
            IFLS => self.ifls,
            IMSC => self.imsc,
            RIS => self.ris,
            MIS => self.ris & self.imsc,
            DMACR => self.dmacr,
            0xfe0..=0xffc if offset.is_multiple_of(4) => {
                u32::from(ID[((offset - 0xfe0) / 4) as usize])
            }
            _ => 0,
        };
        put_le(data, u64::from(v));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let v = crate::le_value(data) as u32;
        match offset {
            DR => {
                // A console that cannot be written is not worth stopping the guest for.
                let _ = self.out.write_all(&[v as u8]);
                let _ = self.out.flush();
                // TX "completes" at once: the FIFO is always below its trigger level.
                self.ris |= INT_TX;
            }
            RSR => {}
            ILPR => self.ilpr = v & 0xff,
            IBRD => self.ibrd = v & 0xffff,
            FBRD => self.fbrd = v & 0x3f,
            LCR_H => self.lcr_h = v & 0xff,
            CR => self.cr = v & 0xffff,
            IFLS => self.ifls = v & 0x3f,
            IMSC => self.imsc = v & INT_ALL,
            ICR => self.ris &= !(v & INT_ALL),
            DMACR => self.dmacr = v & 0x7,
            _ => {}
        }
        if offset == ICR && !self.rx.is_empty() {
            // Data still waiting keeps RX asserted, or the guest would never read it.
            self.ris |= INT_RX | INT_RT;
        }
        self.update();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Line {
        high: AtomicBool,
        changes: AtomicUsize,
    }
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.high.store(high, Ordering::SeqCst);
            self.changes.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);
    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Pl011, Out, Arc<Line>) {
        let out = Out::default();
        let line = Arc::new(Line::default());
        (Pl011::new(Box::new(out.clone()), line.clone()), out, line)
    }

    fn r(u: &mut Pl011, off: u64) -> u32 {
        let mut d = [0u8; 4];
        u.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn primecell_ids_identify_a_pl011() {
        let (mut u, ..) = uart();
        let ids: Vec<u32> = (0..8).map(|i| r(&mut u, 0xfe0 + i * 4)).collect();
        assert_eq!(ids, vec![0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
    }

    #[test]
    fn transmit_goes_out_and_raises_tx_when_unmasked() {
        let (mut u, out, line) = uart();
        u.write(DR, b"h");
        u.write(DR, &[b'i', 0, 0, 0]);
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert!(!line.high.load(Ordering::SeqCst), "masked");
        u.write(IMSC, &INT_TX.to_le_bytes());
        assert!(line.high.load(Ordering::SeqCst));
        u.write(ICR, &INT_TX.to_le_bytes());
        assert!(!line.high.load(Ordering::SeqCst));
        assert_eq!(r(&mut u, FR) & FR_TXFE, FR_TXFE);
    }

    #[test]
    fn receive_fills_the_fifo_and_interrupts_until_drained() {
        let (mut u, _, line) = uart();
        u.write(IMSC, &(INT_RX | INT_RT).to_le_bytes());
        assert_eq!(r(&mut u, FR) & FR_RXFE, FR_RXFE);
        u.queue_input(b"ok\n");
        assert!(line.high.load(Ordering::SeqCst));
        assert_eq!(r(&mut u, FR) & FR_RXFE, 0);
        let got: Vec<u8> = (0..3).map(|_| r(&mut u, DR) as u8).collect();
        assert_eq!(got, b"ok\n");
        assert!(!line.high.load(Ordering::SeqCst));
        assert_eq!(r(&mut u, FR) & FR_RXFE, FR_RXFE);
    }

    #[test]
    fn long_input_waits_beyond_the_fifo_and_is_bounded() {
        let (mut u, ..) = uart();
        let input: Vec<u8> = (0..100u8).collect();
        u.queue_input(&input);
        assert_eq!(r(&mut u, FR) & FR_RXFF, FR_RXFF);
        let got: Vec<u8> = (0..100).map(|_| r(&mut u, DR) as u8).collect();
        assert_eq!(got, input);
        u.queue_input(&vec![b'x'; PENDING_MAX * 2]);
        assert!(u.pending.len() <= PENDING_MAX);
    }

    #[test]
    fn clearing_rx_with_data_left_keeps_it_asserted() {
        let (mut u, _, line) = uart();
        u.write(IMSC, &INT_RX.to_le_bytes());
        u.queue_input(b"a");
        u.write(ICR, &INT_ALL.to_le_bytes());
        assert!(line.high.load(Ordering::SeqCst));
    }

    #[test]
    fn registers_keep_their_values_and_odd_accesses_are_harmless() {
        let (mut u, ..) = uart();
        u.write(IBRD, &13u32.to_le_bytes());
        u.write(LCR_H, &0x70u32.to_le_bytes());
        assert_eq!((r(&mut u, IBRD), r(&mut u, LCR_H)), (13, 0x70));
        let mut big = [0xffu8; 16];
        u.read(0x1234, &mut big);
        assert_eq!(big, [0u8; 16]);
        u.write(0xfe1, &[1, 2, 3]);
        u.write(DR, &[]);
    }
}
