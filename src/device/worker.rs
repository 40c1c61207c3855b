//! The device thread (Cloud Hypervisor style): runs a [`DeviceCore`] until told to stop. A
//! busy device never delays the VMM's own loop, and stopping is a message and a join, so the
//! VMM can reset the device from any thread.

use std::io;
use std::time::Duration;

use super::core::{DeviceCore, Flow};
use crate::seam::Backend;

/// Runs `core` until a [`super::core::ControlMsg::Stop`]; returns the backend so the device can
/// be activated again. With a `busy_poll` time, each wait first polls that long without
/// sleeping ([`DeviceCore::run_polled`]).
pub fn run<B: Backend>(mut core: DeviceCore<B>, busy_poll: Duration) -> io::Result<B> {
    loop {
        if core.run_polled(busy_poll, -1)? == Flow::Stop {
            return Ok(core.into_backend());
        }
    }
}
