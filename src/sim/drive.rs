//! A device without a thread of its own (`RunMode::External`), run by the simulated guest
//! wherever the guest would wait for it ([`SimGuest::drive_with`]),
//! on the monotonic clock or on a manual one.
//!
//! On a manual clock the guest simulates time: where it would wait, it runs the device until
//! the device is idle (none of its fds ready), then moves the device's clock straight to its
//! next deadline (or to the end of the wait) and runs it again. Waits for timers then cost
//! nothing, and which timers fire depends only on the program of waits, not on the machine's
//! speed.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::SimGuest;
use crate::backend::Backend;
use crate::device::VsockSubscriber;

/// The device as the simulated guest runs it.
pub(super) trait Drive: Send {
    /// One wake-up of the device that first waits up to `wait_ms` milliseconds (0: not at
    /// all) for work.
    fn run(&mut self, wait_ms: i32);
    /// Whether one of the device's fds is ready (it has work it has not done yet).
    fn has_work(&self) -> bool;
    /// The device's time while it runs on a manual clock, else `None`.
    fn manual_now(&self) -> Option<Instant>;
    /// The device's earliest deadline.
    fn next_deadline(&self) -> Option<Instant>;
    /// Moves the device's manual clock on by `by`.
    fn advance(&mut self, by: Duration);
}

/// A [`VsockSubscriber`] run in the guest's thread.
pub(super) struct Driven<B: Backend> {
    device: VsockSubscriber<B>,
    manual: bool,
}

impl<B: Backend> Driven<B> {
    /// `device`, on a manual clock when `manual` (see the [module documentation](self)).
    pub(super) fn new(device: VsockSubscriber<B>, manual: bool) -> Self {
        if manual {
            device
                .use_manual_clock()
                .expect("the device's timerfd can be cleared");
        }
        Driven { device, manual }
    }

    fn poll_fd(&self) -> Option<RawFd> {
        self.device.poll_fd()
    }
}

impl<B: Backend> Drive for Driven<B> {
    fn run(&mut self, wait_ms: i32) {
        let _ = self.device.run_once(wait_ms);
    }

    fn has_work(&self) -> bool {
        self.poll_fd().is_some_and(|fd| {
            crate::sys::poll_one(fd, libc::POLLIN, 0).is_ok_and(|r| r & libc::POLLIN != 0)
        })
    }

    fn manual_now(&self) -> Option<Instant> {
        if self.manual {
            self.device.now()
        } else {
            None
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.device.next_deadline()
    }

    fn advance(&mut self, by: Duration) {
        self.device.advance_clock(by);
    }
}

impl SimGuest {
    /// Runs `device` wherever the guest would wait for it: for a device without a thread of
    /// its own (`RunMode::External`), driven in the guest's thread. With `manual_clock`, the
    /// device's time moves only as the guest waits (see `drive`): [`SimGuest::now`] and
    /// [`SimGuest::let_time_pass`].
    pub fn drive_with<B: Backend + 'static>(
        &mut self,
        device: VsockSubscriber<B>,
        manual_clock: bool,
    ) {
        self.driver = Some(Box::new(Driven::new(device, manual_clock)));
    }

    /// The time on the device's manual clock, or on the monotonic clock.
    pub fn now(&self) -> Instant {
        self.driver
            .as_ref()
            .and_then(|d| d.manual_now())
            .unwrap_or_else(Instant::now)
    }

    /// Lets `by` pass while the device does not run (a late device thread): moves its manual
    /// clock, or sleeps.
    pub fn let_time_pass(&mut self, by: Duration) {
        match self.driver.as_mut() {
            Some(d) if d.manual_now().is_some() => d.advance(by),
            _ => std::thread::sleep(by),
        }
    }
}

/// Most wake-ups in a row of a device that stays busy without answering, before a wait on a
/// manual clock lets time pass anyway (a device whose fds stay ready must not hang the guest).
const BUSY_RUNS: usize = 64;

/// Runs `device` until `answered()` holds or `timeout` passed on the device's clock.
pub(super) fn run_for(device: &mut dyn Drive, timeout: Duration, answered: impl Fn() -> bool) {
    match device.manual_now() {
        Some(start) => run_simulated(device, start + timeout, answered),
        None => run_monotonic(device, Instant::now() + timeout, answered),
    }
}

/// On the monotonic clock: the device waits in its own poll (kicks, timers, host streams)
/// between wake-ups, so it runs again as soon as it has work.
fn run_monotonic(device: &mut dyn Drive, end: Instant, answered: impl Fn() -> bool) {
    let mut wait_ms = 0;
    loop {
        device.run(wait_ms);
        let now = Instant::now();
        if answered() || now >= end {
            return;
        }
        let left = end - now;
        if left < Duration::from_millis(1) {
            // Below the poll's resolution: sleep the rest, run the device once more.
            std::thread::sleep(left);
            wait_ms = 0;
        } else {
            wait_ms = left.as_millis().min(i32::MAX as u128) as i32;
        }
    }
}

/// On a manual clock: runs the device until it is idle, then moves its clock to its next
/// deadline (or to `end`), until it answers or its clock reaches `end`.
fn run_simulated(device: &mut dyn Drive, end: Instant, answered: impl Fn() -> bool) {
    let mut busy = 0;
    loop {
        device.run(0);
        if answered() {
            return;
        }
        if device.has_work() && busy < BUSY_RUNS {
            busy += 1;
            continue;
        }
        busy = 0;
        let Some(now) = device.manual_now() else {
            // The device was reset: nothing will answer.
            return;
        };
        if now >= end {
            return;
        }
        let to = device.next_deadline().filter(|t| *t < end).unwrap_or(end);
        // A deadline that did not fire when due (it cannot: each wake-up fires what is due)
        // must not stop the clock.
        let by = to
            .saturating_duration_since(now)
            .max(Duration::from_micros(1));
        device.advance(by);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::{Duration, Instant};

    use super::super::{PairBackend, SimGuest};
    use crate::csm::connection::CsmConfig;
    use crate::device::virtio::VirtioDevice;
    use crate::device::{DeviceConfig, RunMode};
    use crate::wire::op;

    /// A device on a manual clock: the guest's waits move its clock, and the request timeout
    /// (2 s) of a host-initiated connection the guest never answers fires exactly when the
    /// clock reaches it, without waiting in real time.
    #[test]
    fn a_manual_clock_fires_timers_as_the_guest_waits_not_in_real_time() {
        let mut cfg = DeviceConfig::new(3);
        cfg.run = RunMode::External;
        cfg.csm = CsmConfig {
            request_timeout: Duration::from_secs(2),
            ..CsmConfig::default()
        };
        let (backend, host) = PairBackend::new();
        let (mut g, mut dev) = SimGuest::with_device(cfg, backend);
        g.drive_with(dev.subscriber().expect("external mode"), true);
        // Nobody listens on the port, and the guest does not answer: the REQUEST goes unanswered.
        g.answer_unknown = false;
        let t0 = g.now();
        let real = Instant::now();
        let mut stream = host.connect(100, b"");
        stream.set_nonblocking(true).unwrap();
        let open = |s: &mut std::os::unix::net::UnixStream| matches!(s.read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        let asked = g.pump_until(Duration::from_secs(1), |g| {
            g.received.iter().any(|h| h.op == op::REQUEST)
        });
        assert!(asked, "no REQUEST for the host's connection");
        assert_eq!(
            g.now(),
            t0,
            "the device answered at once: the clock stood still"
        );
        g.pump(Duration::from_secs(1));
        assert_eq!(
            g.now() - t0,
            Duration::from_secs(1),
            "the wait moved the clock"
        );
        assert!(open(&mut stream), "closed before the request timeout");
        let closed = g.pump_until(Duration::from_secs(10), |_| !open(&mut stream));
        assert!(closed, "the request timeout never fired");
        let fired = g.now() - t0;
        assert!(
            fired >= Duration::from_secs(2) && fired <= Duration::from_millis(2020),
            "the 2 s request timeout fired at {fired:?}"
        );
        assert!(
            real.elapsed() < Duration::from_secs(2),
            "simulated, not waited"
        );
        assert!(g.violations.is_empty(), "{:?}", g.violations);
        assert!(dev.reset());
    }
}
