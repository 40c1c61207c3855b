//! Context IDs: which name the hypervisor, the local machine, the host, or a guest.
//!
//! The virtio header carries 64-bit CIDs, but Linux's are 32 bits and `u32::MAX` means "any"
//! (`VMADDR_CID_ANY`), so a CID is a guest's only between [`Cid::HOST`] and `u32::MAX`,
//! exclusive. Every rule of the crate about CIDs asks this type.

use std::fmt;

/// A vsock context ID as the wire carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cid(pub u64);

impl Cid {
    /// The hypervisor (`VMADDR_CID_HYPERVISOR`).
    pub const HYPERVISOR: Cid = Cid(0);
    /// The local machine itself (`VMADDR_CID_LOCAL`).
    pub const LOCAL: Cid = Cid(1);
    /// The host, that is the VMM serving the guest (`VMADDR_CID_HOST`).
    pub const HOST: Cid = Cid(2);
    /// "Any CID" in a bind (`VMADDR_CID_ANY`); never an address.
    pub const ANY: Cid = Cid(u32::MAX as u64);

    /// Whether a guest can have this CID: above the host, below [`Cid::ANY`].
    pub fn is_guest(self) -> bool {
        self > Cid::HOST && self < Cid::ANY
    }

    /// Whether a connection can never go to this CID: the hypervisor, the local machine, "any",
    /// and everything beyond 32 bits.
    pub fn is_unreachable(self) -> bool {
        self <= Cid::LOCAL || self >= Cid::ANY
    }

    /// The 32-bit CID Linux uses, when it fits.
    pub fn to_u32(self) -> Option<u32> {
        u32::try_from(self.0).ok()
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_cids_are_guests() {
        for (cid, guest, unreachable) in [
            (0, false, true),
            (1, false, true),
            (2, false, false),
            (3, true, false),
            (u64::from(u32::MAX) - 1, true, false),
            (u64::from(u32::MAX), false, true),
            (1 << 32, false, true),
            (u64::MAX, false, true),
        ] {
            assert_eq!(Cid(cid).is_guest(), guest, "{cid}");
            assert_eq!(Cid(cid).is_unreachable(), unreachable, "{cid}");
        }
        assert_eq!(Cid(7).to_u32(), Some(7));
        assert_eq!(Cid(1 << 32).to_u32(), None);
    }
}
