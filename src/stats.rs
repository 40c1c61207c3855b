//! Monotonic counters of a device, readable from any thread, and their typed snapshot: what
//! happened ([`Activity`]) apart from what went wrong ([`ErrorCounts`]).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    (
        activity { $($(#[$am:meta])* $a:ident),* $(,)? }
        errors { $($(#[$em:meta])* $e:ident),* $(,)? }
    ) => {
        /// Counters of one vsock device. Names are part of the API (`GET /api/v1/vsock`).
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$am])* pub $a: AtomicU64,)*
            $($(#[$em])* pub $e: AtomicU64,)*
            /// RSTs the device sent (or queued for the guest), by [`RstReason`].
            pub rst_sent_by: [AtomicU64; RstReason::ALL.len()],
            /// RSTs the guest sent, by [`RstState`] of the connection they ended.
            pub rst_received_by: [AtomicU64; RstState::ALL.len()],
        }

        /// What the device did, at one moment.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Activity {
            $($(#[$am])* pub $a: u64,)*
        }

        /// What went wrong, by kind, at one moment: guest misbehaviour, refusals, failures.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct ErrorCounts {
            $($(#[$em])* pub $e: u64,)*
        }

        impl Activity {
            /// Every counter with its name, in declaration order.
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($a), self.$a),)*].into_iter()
            }
        }

        impl ErrorCounts {
            /// Every counter with its name, in declaration order.
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($e), self.$e),)*].into_iter()
            }
        }

        impl Counters {
            /// The error counters now (what [`Counters::snapshot`] has as `errors`).
            pub fn errors(&self) -> ErrorCounts {
                ErrorCounts {
                    $($e: self.$e.load(Ordering::Relaxed),)*
                }
            }

            /// The counters now.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot {
                    activity: Activity {
                        $($a: self.$a.load(Ordering::Relaxed),)*
                    },
                    errors: self.errors(),
                    rst_sent_by: self.rst_sent_by.each_ref().map(|c| c.load(Ordering::Relaxed)),
                    rst_received_by: self
                        .rst_received_by
                        .each_ref()
                        .map(|c| c.load(Ordering::Relaxed)),
                }
            }
        }
    };
}

counters!(
    activity {
        /// Guest-initiated connections routed to host services (CID 2).
        path_host,
        /// Guest-initiated connections routed to a sibling guest.
        path_sibling,
        /// Guest-initiated connections routed to the G2H uplink (fallback taken).
        path_uplink,
        /// Guest-initiated connections refused by the router.
        path_refused,
        /// Host-initiated connections offered to the guest.
        incoming,
        /// TX packets processed.
        tx_packets,
        /// TX packets whose payload went to the host in one write with the packet before it
        /// (RW packets of one stream connection, one after the other in one TX batch).
        tx_coalesced,
        /// RX packets delivered.
        rx_packets,
        /// Interrupts raised.
        interrupts,
        /// Connections whose host peer stopped receiving (shut its read side or closed) while
        /// guest bytes were still owed to it: the bytes were dropped and the guest told
        /// SHUTDOWN(RCV), as a peer kernel would.
        host_dropped,
        /// Payload bytes guest → host side of the connections that ended (live ones: their
        /// snapshot, `GET /api/v1/vsock/connections`).
        ended_bytes_to_host,
        /// Payload bytes host side → guest of the connections that ended.
        ended_bytes_to_guest,
        /// SOCK_STREAM connections that ended.
        ended_stream_conns,
        /// SOCK_SEQPACKET connections that ended.
        ended_seqpacket_conns,
        /// Whole SOCK_SEQPACKET messages guest → host side of the connections that ended (the
        /// device's own connections; a sibling relay passes messages through uncounted).
        ended_messages_to_host,
        /// Whole SOCK_SEQPACKET messages host side → guest of the connections that ended.
        ended_messages_to_guest,
        /// Times host bytes waited for guest credit (the guest's receive buffer was full, and the
        /// device asked it for credit).
        credit_stalls,
        /// Times the device had packets for the guest and found no RX buffer.
        rx_queue_full,
        /// Wake-ups of the device's loop (each handles every ready fd, then the queues).
        wakeups,
        /// Nanoseconds the device spent working in its wake-ups (not waiting).
        busy_ns,
    }
    errors {
        /// Chains refused as malformed (any reason), returned with used length 0.
        malformed_chains,
        /// TX packets whose header claims more payload than the chain or 64 KiB.
        bad_len,
        /// TX packets with a `src_cid` other than the guest's, dropped unanswered.
        spoofed_src,
        /// Packets of a socket type the device does not serve (one that does not exist, or
        /// SEQPACKET when the driver did not acknowledge VIRTIO_VSOCK_F_SEQPACKET), reset; and
        /// host-initiated SEQPACKET connections refused for that reason.
        bad_type,
        /// Packets with an unknown op, reset.
        bad_op,
        /// Packets for no known connection, reset.
        unknown_conn,
        /// REQUESTs refused because the connection limit was reached.
        conn_limit,
        /// Connections reset because the guest overran its credit.
        credit_overrun,
        /// Connections reset for a protocol violation by the guest (or a sibling link).
        protocol_error,
        /// Host-side connects that failed.
        connect_failed,
        /// Connections that timed out (unanswered REQUEST, slow connect, lingering close).
        timeouts,
        /// Connections reset because the host stream failed.
        host_error,
        /// RSTs dropped because the reply queue for unknown connections was full.
        rst_dropped,
        /// Writes to the read-only config space, ignored.
        config_writes,
        /// Times the avail index jumped ahead by more than the queue size.
        bad_avail_idx,
    }
);

/// All counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// What the device did.
    pub activity: Activity,
    /// What went wrong.
    pub errors: ErrorCounts,
    /// RSTs sent, indexed like [`RstReason::ALL`].
    pub rst_sent_by: [u64; RstReason::ALL.len()],
    /// RSTs received, indexed like [`RstState::ALL`].
    pub rst_received_by: [u64; RstState::ALL.len()],
}

/// Why the device sent the guest an RST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RstReason {
    /// The router refused the connection (strict mode, no uplink, a reserved CID).
    Refused,
    /// The host-side connect failed.
    ConnectFailed,
    /// A packet for no known connection.
    UnknownConn,
    /// A packet of an unsupported socket type or with an unknown op.
    Invalid,
    /// The connection limit was reached.
    ConnLimit,
    /// The device reset a connection: credit overrun, protocol violation, timeout, host stream
    /// failure.
    Reset,
    /// The last packet of a connection shut down both ways (a close, as the kernel ends one).
    Close,
}

impl RstReason {
    /// Every reason, in index order.
    pub const ALL: [RstReason; 7] = [
        RstReason::Refused,
        RstReason::ConnectFailed,
        RstReason::UnknownConn,
        RstReason::Invalid,
        RstReason::ConnLimit,
        RstReason::Reset,
        RstReason::Close,
    ];

    /// Its name in the API and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            RstReason::Refused => "refused",
            RstReason::ConnectFailed => "connect_failed",
            RstReason::UnknownConn => "unknown_conn",
            RstReason::Invalid => "invalid",
            RstReason::ConnLimit => "conn_limit",
            RstReason::Reset => "reset",
            RstReason::Close => "close",
        }
    }
}

/// The state of the connection an RST from the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RstState {
    /// A host-initiated connection the guest refused (nobody listens on the port).
    Handshake,
    /// A connection past its handshake.
    Open,
    /// No known connection.
    Unknown,
}

impl RstState {
    /// Every state, in index order.
    pub const ALL: [RstState; 3] = [RstState::Handshake, RstState::Open, RstState::Unknown];

    /// Its name in the API and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            RstState::Handshake => "handshake",
            RstState::Open => "open",
            RstState::Unknown => "unknown",
        }
    }
}

impl Counters {
    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an RST sent for `reason`.
    pub fn rst_sent(&self, reason: RstReason) {
        Counters::inc(&self.rst_sent_by[reason as usize]);
    }

    /// Counts an RST received on a connection in `state`.
    pub fn rst_received(&self, state: RstState) {
        Counters::inc(&self.rst_received_by[state as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_keeps_errors_apart() {
        let c = Counters::default();
        Counters::inc(&c.tx_packets);
        Counters::inc(&c.bad_len);
        Counters::inc(&c.bad_len);
        let s = c.snapshot();
        assert_eq!(s.activity.tx_packets, 1);
        assert_eq!(s.errors.bad_len, 2);
        assert!(s.errors.iter().all(|(n, _)| !n.contains("packets")));
        assert!(s.activity.iter().any(|(n, v)| n == "tx_packets" && v == 1));
        assert_eq!(s.errors.iter().map(|(_, v)| v).sum::<u64>(), 2);
    }
}
