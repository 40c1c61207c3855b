//! Runtime control and observability of a device's routing, for the VMM's API thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::csm::muxer::ConnInfo;
use crate::device::DeviceHandle;
use crate::stats::Counters;

/// The routing policy that may change while the device runs. The router reads it once per new
/// connection, so a change affects only connections opened after it; established connections
/// keep the path they took.
#[derive(Debug)]
pub struct Policy {
    g2h_fallback: AtomicBool,
}

impl Policy {
    /// A policy with `g2h_fallback` set as given.
    pub fn new(g2h_fallback: bool) -> Self {
        Policy {
            g2h_fallback: AtomicBool::new(g2h_fallback),
        }
    }

    /// The current `g2h_fallback`.
    pub fn g2h_fallback(&self) -> bool {
        self.g2h_fallback.load(Ordering::Acquire)
    }

    /// Sets `g2h_fallback`.
    pub fn set_g2h_fallback(&self, on: bool) {
        self.g2h_fallback.store(on, Ordering::Release);
    }
}

/// A cheap, cloneable, thread-safe handle on a running vsock device: flip the fallback, list
/// connections, read counters.
#[derive(Clone)]
pub struct VsockHandle {
    policy: Arc<Policy>,
    device: DeviceHandle,
}

impl VsockHandle {
    /// A handle over the device's `policy` and `device` handle.
    pub fn new(policy: Arc<Policy>, device: DeviceHandle) -> Self {
        VsockHandle { policy, device }
    }

    /// The current `g2h_fallback`.
    pub fn g2h_fallback(&self) -> bool {
        self.policy.g2h_fallback()
    }

    /// Sets `g2h_fallback` for connections opened from now on.
    pub fn set_g2h_fallback(&self, on: bool) {
        self.policy.set_g2h_fallback(on);
    }

    /// The live connections.
    pub fn connections(&self) -> Vec<ConnInfo> {
        self.device.connections()
    }

    /// The device's counters.
    pub fn counters(&self) -> &Counters {
        self.device.counters()
    }
}
