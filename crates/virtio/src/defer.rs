//! Work a device may leave to the thread that notified it. A thread that exists only to turn
//! a queue's notifications into device calls (the VMM's per-device notification thread) runs
//! its calls in [`accept`]; a device called there may [`offer`] the request's work, which that
//! thread then runs itself once the call has returned, so with every lock of the device and
//! the bus let go. A request then costs no hand-off to a worker thread (one thread wake-up
//! fewer), and a vCPU, which never accepts, still never waits for a device's work.

use std::cell::RefCell;

pub type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    /// Some while the thread accepts work: what was offered so far.
    static TAKEN: RefCell<Option<Vec<Job>>> = const { RefCell::new(None) };
}

/// Runs `f`, then the work devices offered during it, on this thread.
pub fn accept<R>(f: impl FnOnce() -> R) -> R {
    let outer = TAKEN.with(|t| t.borrow_mut().replace(Vec::new()));
    let r = f();
    let jobs = TAKEN.with(|t| std::mem::replace(&mut *t.borrow_mut(), outer));
    for job in jobs.unwrap_or_default() {
        job();
    }
    r
}

/// Whether this thread is inside [`accept`] (an offer would be taken).
pub fn accepting() -> bool {
    TAKEN.with(|t| t.borrow().is_some())
}

/// Leaves `job` to the accepting thread. Where none accepts it runs at once, under whatever
/// locks the caller holds (a device with workers of its own asks [`accepting`] first).
pub fn offer(job: Job) {
    let job = TAKEN.with(|t| match t.borrow_mut().as_mut() {
        Some(v) => {
            v.push(job);
            None
        }
        None => Some(job),
    });
    if let Some(job) = job {
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn offered_work_runs_after_the_call_and_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let r = accept(|| {
            assert!(accepting());
            for n in 0..2 {
                let l = l.clone();
                offer(Box::new(move || l.lock().unwrap().push(n)));
            }
            l.lock().unwrap().push(9);
            7
        });
        assert_eq!(r, 7);
        assert_eq!(*log.lock().unwrap(), [9, 0, 1]);
        assert!(!accepting());
    }

    #[test]
    fn without_accept_an_offer_runs_at_once() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        offer(Box::new(move || l.lock().unwrap().push(1)));
        assert_eq!(*log.lock().unwrap(), [1]);
    }
}
