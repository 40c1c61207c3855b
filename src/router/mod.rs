//! Routing of new connections: which path a connection takes, and the runtime control of that
//! policy.

pub mod connector;
pub mod control;
pub mod decide;

pub use control::{Policy, VsockHandle};
pub use decide::{decide, Decision, RefuseReason, RouteCtx};

pub use crate::seam::{Path, RouteInfo};
