//! The routing decision: one pure function, in the kernel's order.

use crate::backend::namespace::NsMode;
use crate::wire::{Cid, HOST_CID};

/// What the decision needs to know besides the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteCtx {
    /// The CID of the guest that connects (`None` for a program on the machine itself, such as
    /// `vsock-connect`).
    pub own_cid: Option<u64>,
    /// `g2h_fallback`: whether CIDs nobody on this machine owns go to the uplink.
    pub g2h_fallback: bool,
    /// Whether an uplink is configured.
    pub uplink: bool,
    /// The CID namespace's mode: from a `local` one nothing takes the uplink.
    pub ns_mode: NsMode,
}

/// Why a connection is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseReason {
    /// CID 0 (hypervisor), 1 (local), the connecting guest's own CID, or beyond 32 bits.
    ReservedCid,
    /// Nobody on this machine owns the CID, and the fallback is off or there is no uplink:
    /// the kernel's ENODEV.
    NoRoute,
    /// Nobody on this machine owns the CID, and the namespace is `local`: the uplink is never
    /// taken from it, whatever `g2h_fallback` says (the kernel's virtio G2H transport refuses
    /// sockets of a local namespace). Also ENODEV.
    LocalNamespace,
}

/// Where a new connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Host services (CID 2) over Unix sockets.
    Host,
    /// A guest on this machine that owns the CID (H2G).
    Sibling,
    /// The G2H uplink, taken by fallback: the connection is marked `to_host`, our analogue of
    /// the kernel setting `VMADDR_FLAG_TO_HOST`.
    Uplink,
    /// Refused: the guest gets an RST.
    Refuse(RefuseReason),
}

/// Decides the path of a new connection to `dst_cid`, mirroring `vsock_assign_transport()`
/// after the g2h_fallback change. `owned(cid)` says whether a guest on this machine (a sibling
/// in the CID registry) owns `cid`; it is asked only when the answer matters.
pub fn decide(dst_cid: u64, ctx: &RouteCtx, owned: impl FnOnce(u64) -> bool) -> Decision {
    if Cid(dst_cid).is_unreachable() || Some(dst_cid) == ctx.own_cid {
        return Decision::Refuse(RefuseReason::ReservedCid);
    }
    if dst_cid == HOST_CID {
        return Decision::Host;
    }
    if owned(dst_cid) {
        return Decision::Sibling;
    }
    if !ctx.ns_mode.reaches_parent() {
        return Decision::Refuse(RefuseReason::LocalNamespace);
    }
    if ctx.g2h_fallback && ctx.uplink {
        return Decision::Uplink;
    }
    Decision::Refuse(RefuseReason::NoRoute)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: u64 = 3;
    const SIBLING: u64 = 5;
    const STRANGER: u64 = 77;

    /// Every row: CID 0/1/2/own/owned/not-owned/u32::MAX/beyond × fallback × uplink.
    #[test]
    fn decision_table() {
        use Decision::*;
        use RefuseReason::*;
        let reserved = Refuse(ReservedCid);
        let rows: &[(u64, bool, bool, Decision)] = &[
            (0, false, false, reserved),
            (0, false, true, reserved),
            (0, true, false, reserved),
            (0, true, true, reserved),
            (1, false, false, reserved),
            (1, false, true, reserved),
            (1, true, false, reserved),
            (1, true, true, reserved),
            (2, false, false, Host),
            (2, false, true, Host),
            (2, true, false, Host),
            (2, true, true, Host),
            (OWN, false, false, reserved),
            (OWN, false, true, reserved),
            (OWN, true, false, reserved),
            (OWN, true, true, reserved),
            (SIBLING, false, false, Sibling),
            (SIBLING, false, true, Sibling),
            (SIBLING, true, false, Sibling),
            (SIBLING, true, true, Sibling),
            (STRANGER, false, false, Refuse(NoRoute)),
            (STRANGER, false, true, Refuse(NoRoute)),
            (STRANGER, true, false, Refuse(NoRoute)),
            (STRANGER, true, true, Uplink),
            (u32::MAX as u64, false, false, reserved),
            (u32::MAX as u64, true, true, reserved),
            (u32::MAX as u64 + 1, true, true, reserved),
            (u64::MAX, true, true, reserved),
        ];
        for &(cid, fallback, uplink, want) in rows {
            let ctx = RouteCtx {
                own_cid: Some(OWN),
                g2h_fallback: fallback,
                uplink,
                ns_mode: NsMode::Global,
            };
            let got = decide(cid, &ctx, |c| c == SIBLING || c == OWN);
            assert_eq!(got, want, "cid {cid} fallback {fallback} uplink {uplink}");
            // A local namespace decides the same, except that nothing takes the uplink.
            let local = RouteCtx {
                ns_mode: NsMode::Local,
                ..ctx
            };
            let want = match want {
                Refuse(NoRoute) | Uplink => Refuse(LocalNamespace),
                other => other,
            };
            let got = decide(cid, &local, |c| c == SIBLING || c == OWN);
            assert_eq!(
                got, want,
                "local: cid {cid} fallback {fallback} uplink {uplink}"
            );
        }
    }

    #[test]
    fn host_programs_have_no_own_cid() {
        let ctx = RouteCtx {
            own_cid: None,
            g2h_fallback: false,
            uplink: true,
            ns_mode: NsMode::Global,
        };
        assert_eq!(decide(SIBLING, &ctx, |c| c == SIBLING), Decision::Sibling);
        assert_eq!(
            decide(STRANGER, &ctx, |_| false),
            Decision::Refuse(RefuseReason::NoRoute)
        );
    }

    #[test]
    fn ownership_is_not_asked_for_reserved_or_host() {
        let ctx = RouteCtx {
            own_cid: Some(OWN),
            g2h_fallback: true,
            uplink: true,
            ns_mode: NsMode::Global,
        };
        for cid in [0, 1, 2, OWN, u64::MAX] {
            decide(cid, &ctx, |_| panic!("asked for {cid}"));
        }
    }
}
