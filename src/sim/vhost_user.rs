//! A vhost-user frontend for the simulated guest: it hands a vhost-user-vsock backend (ours, or
//! any other) the guest's memfd memory and rings as a VMM does, so that [`SimGuest`] drives the
//! backend through the real vhost-user protocol, kick fds and call fds.
//!
//! Build the guest with [`SimGuest::new_shared`], connect with [`FrontendLink::connect`] (two
//! rings as QEMU, which keeps the event queue, or three as crosvm and Cloud Hypervisor), then
//! use the guest as with a device of its own.

use std::path::Path;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend as _};

use super::SimGuest;
use crate::device::virtio::ActivateContext;

/// The frontend's end of one vhost-user connection.
pub struct FrontendLink {
    frontend: Frontend,
    rings: usize,
}

impl FrontendLink {
    /// Connects to the backend at `socket` and sets it up for `guest` as a VMM does for a
    /// guest whose driver acked `features` (those the backend offers): owner, features, protocol features (MQ, CONFIG, RESET_DEVICE where offered),
    /// the memory table, then the first `rings` rings of `ctx` (the context
    /// [`SimGuest::new_shared`] returned), each started and enabled.
    pub fn connect(
        socket: &Path,
        guest: &SimGuest,
        ctx: &ActivateContext,
        rings: usize,
        features: u64,
    ) -> vhost::Result<Self> {
        let mut frontend = Frontend::connect(socket, 3)?;
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        // As a VMM: what the driver acked and the backend offers.
        frontend.set_features((features & offered) | (offered & protocol))?;
        if offered & protocol != 0 {
            let pf = frontend.get_protocol_features()?;
            frontend.set_protocol_features(
                pf & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::RESET_DEVICE),
            )?;
        }
        let regions = guest
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<vhost::Result<Vec<_>>>()?;
        frontend.set_mem_table(&regions)?;
        let va = |gpa: u64| {
            guest
                .mem
                .get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .unwrap_or(0)
        };
        for (i, q) in ctx.queues.iter().enumerate().take(rings) {
            frontend.set_vring_num(i, q.size())?;
            frontend.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: q.max_size(),
                    queue_size: q.size(),
                    flags: 0,
                    desc_table_addr: va(q.desc_table()),
                    used_ring_addr: va(q.used_ring()),
                    avail_ring_addr: va(q.avail_ring()),
                    log_addr: None,
                },
            )?;
            frontend.set_vring_base(i, 0)?;
            frontend.set_vring_call(i, &guest.interrupt_fd())?;
            frontend.set_vring_kick(i, &ctx.kicks[i])?;
        }
        // As QEMU's vhost_dev_start: the rings are enabled once all of them are set up.
        if offered & protocol != 0 {
            for i in 0..rings.min(ctx.queues.len()) {
                frontend.set_vring_enable(i, true)?;
            }
        }
        // A request with a reply as a barrier: the backend handles messages in order, so once
        // it answers, the rings are enabled, and a kick the guest writes from now on cannot be
        // read (and dropped) by a backend that has not seen SET_VRING_ENABLE yet. (A guest
        // under a VMM cannot kick this early: its driver starts after the VMM set up the rings.)
        frontend.get_features()?;
        Ok(FrontendLink { frontend, rings })
    }

    /// The guest CID in the backend's config space.
    pub fn guest_cid(&mut self) -> vhost::Result<u64> {
        let (_, payload) =
            self.frontend
                .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])?;
        let mut cid = [0u8; 8];
        cid.copy_from_slice(&payload[..8]);
        Ok(u64::from_le_bytes(cid))
    }

    /// Sends the memory table again (as a VMM does when guest memory is hot-plugged or
    /// remapped); the guest's memory stays where it is.
    pub fn resend_memory(&mut self, guest: &SimGuest) -> vhost::Result<()> {
        let regions = guest
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<vhost::Result<Vec<_>>>()?;
        self.frontend.set_mem_table(&regions)?;
        // A round trip: the backend has taken the table once it answers.
        self.frontend.get_features().map(|_| ())
    }

    /// VHOST_USER_RESET_DEVICE (a guest that resets its virtio device), then a round trip.
    pub fn reset_device(&mut self) -> vhost::Result<()> {
        self.frontend.reset_device()?;
        self.frontend.get_features().map(|_| ())
    }

    /// Stops the rings as a VMM does when the guest stops (GET_VRING_BASE on each) and returns
    /// where each ring's next available entry is.
    pub fn stop(&mut self) -> vhost::Result<Vec<u32>> {
        (0..self.rings)
            .map(|i| self.frontend.get_vring_base(i))
            .collect()
    }
}
