//! The RPC decoder and ring consumers: a peer that writes anything into the control region
//! (indices, slots). The backend's request loop and the reply ring consumer must refuse what
//! does not decode, stop at a corrupt ring, never panic and never loop without end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pci::{ConfigSpace, PciFunction};
use rpc::backend::{drain, Outbox};
use rpc::shm::{REPLIES_AT, REQUESTS_AT};
use rpc::{Doorbell, Region, Registration};
use std::sync::Arc;
use std::time::Duration;

struct Cfg(ConfigSpace);
impl PciFunction for Cfg {
    fn config_read(&mut self, off: u64, data: &mut [u8]) {
        self.0.read(off, data)
    }
    fn config_write(&mut self, off: u64, data: &[u8]) {
        self.0.write(off, data)
    }
    fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        self.0.bar_address(bar)
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0x11)
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
    fn resume(&mut self) {}
}

fuzz_target!(|data: &[u8]| {
    let region = Arc::new(Region::create().unwrap());
    let (half, rest) = data.split_at(data.len() / 2);
    // Requests: head, tail and slots as the bytes say.
    region.write_raw(REQUESTS_AT, half);
    region.write_raw(REPLIES_AT, rest);
    let out = Outbox::with_wait(
        region.clone(),
        Doorbell::new().unwrap(),
        Doorbell::new().unwrap(),
        Duration::ZERO,
    );
    let reg = Registration {
        dev: 1,
        vendor: 0x1af4,
        device: 0x1042,
        class: 0x010000,
        revision: 1,
        bar0_size: 0x8000,
        bar0_64bit: true,
        bar0_prefetchable: true,
        intx_pin: 1,
    };
    let mut devs: Vec<(Registration, Box<dyn PciFunction>)> = vec![(
        reg,
        Box::new(Cfg(ConfigSpace::new(0x1af4, 0x1042, 0x010000, 1))),
    )];
    let mut refused = 0;
    let _ = drain(&region, &out, &mut devs, &mut |_, _| {}, &mut refused);
    // The reply ring as the VMM consumes it: at most a ring's worth, then empty or an error.
    for _ in 0..=rpc::shm::SLOTS {
        match region.replies().pop() {
            Ok(Some(_)) | Err(rpc::shm::RingError::Wire(_)) => {}
            _ => break,
        }
    }
});
