//! The device thread (Cloud Hypervisor style): runs a [`DeviceCore`] until told to stop or to
//! pause. A busy device never delays the VMM's own loop, and stopping or pausing is a message
//! and a join, so the VMM can reset or pause the device from any thread.

use std::io;
use std::time::Duration;

use super::core::{DeviceCore, Flow};
use crate::seam::Backend;

/// Runs `core` until a [`super::core::ControlMsg::Stop`] or [`super::core::ControlMsg::Pause`];
/// returns the core, untouched since that wake-up, so the device can take its backend back or
/// keep it paused. With a `busy_poll` time, each wait first polls that long without sleeping
/// ([`DeviceCore::run_polled`]).
pub fn run<B: Backend>(mut core: DeviceCore<B>, busy_poll: Duration) -> io::Result<DeviceCore<B>> {
    loop {
        match core.run_polled(busy_poll, -1)? {
            Flow::Continue => {}
            Flow::Stop | Flow::Pause => return Ok(core),
        }
    }
}
