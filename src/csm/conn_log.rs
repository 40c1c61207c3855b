//! What the end of a connection leaves: its counts ([`count_end`]) and its log line, one at
//! info (who, which path, bytes, duration, why), with the same facts as key-value fields for
//! structured logs (`--log-format json`). Routing decisions are logged at debug where they are made (the
//! muxer); nothing is logged per packet.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::conn::Conn;
use super::types::KillReason;
use crate::seam::RouteInfo;
use crate::stats::{Counters, RstReason};
use crate::stream::VsockStream;
use crate::wire::SockType;

/// The connection's one line at info when it ends: who, which path, bytes, duration, why.
pub(super) fn ended<S: VsockStream>(
    conn: &Conn<S>,
    route: RouteInfo,
    host_initiated: bool,
    lasted: Duration,
) {
    if !log::log_enabled!(log::Level::Info) {
        return;
    }
    let a = conn.addr();
    let (to_host, to_guest) = conn.bytes();
    let why = match conn.kill_reason() {
        None | Some(KillReason::Closed) => "closed",
        Some(KillReason::GuestReset) => "reset by the guest",
        Some(KillReason::CreditOverrun) => "reset: the guest overran its credit",
        Some(KillReason::Protocol) => "reset: protocol violation",
        Some(KillReason::ConnectFailed) => "reset: the host-side connect failed",
        Some(KillReason::Timeout) => "reset: timed out",
        Some(KillReason::HostError) => "reset: the host stream failed",
    };
    let initiator = if host_initiated { "host" } else { "guest" };
    let secs = lasted.as_secs_f64();
    log::info!(
        path = route.path.name(), to_host = route.to_host, initiator,
        guest_cid = a.peer_cid, guest_port = a.peer_port,
        peer_cid = a.local_cid, peer_port = a.local_port,
        bytes_to_host = to_host, bytes_to_guest = to_guest, seconds = secs, end = why;
        "vsock: connection {}:{} <-> {}:{} ({}, opened by the {initiator}) ended after {secs:.3} s: {why}; {to_host} bytes to the host side, {to_guest} to the guest",
        a.peer_cid,
        a.peer_port,
        a.local_cid,
        a.local_port,
        route.path.name()
    );
}

/// Counts the end of `conn`: why it ended, the RST it sent, what it moved.
pub(super) fn count_end<S: VsockStream>(c: &Counters, conn: &Conn<S>) {
    let counter = match conn.kill_reason() {
        Some(KillReason::CreditOverrun) => Some(&c.credit_overrun),
        Some(KillReason::Protocol) => Some(&c.protocol_error),
        Some(KillReason::ConnectFailed) => Some(&c.connect_failed),
        Some(KillReason::Timeout) => Some(&c.timeouts),
        Some(KillReason::HostError) => Some(&c.host_error),
        Some(KillReason::GuestReset) | Some(KillReason::Closed) | None => None,
    };
    if let Some(counter) = counter {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    if conn.sent_rst() {
        c.rst_sent(match conn.kill_reason() {
            Some(KillReason::ConnectFailed) => RstReason::ConnectFailed,
            None | Some(KillReason::Closed) => RstReason::Close,
            Some(_) => RstReason::Reset,
        });
    }
    let (to_host, to_guest) = conn.bytes();
    c.ended_bytes_to_host.fetch_add(to_host, Ordering::Relaxed);
    c.ended_bytes_to_guest
        .fetch_add(to_guest, Ordering::Relaxed);
    if conn.dropped() > 0 {
        Counters::inc(&c.host_dropped);
    }
    Counters::inc(match conn.sock_type() {
        SockType::Stream => &c.ended_stream_conns,
        SockType::Seqpacket => &c.ended_seqpacket_conns,
    });
    let (msgs_to_host, msgs_to_guest) = conn.messages();
    c.ended_messages_to_host
        .fetch_add(msgs_to_host, Ordering::Relaxed);
    c.ended_messages_to_guest
        .fetch_add(msgs_to_guest, Ordering::Relaxed);
}
