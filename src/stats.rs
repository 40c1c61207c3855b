//! Monotonic counters of a device, readable from any thread.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fm])* pub $field: AtomicU64,)*
        }

        impl $name {
            /// Every counter with its name, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters!(
    /// Counters of one vsock device. Names are part of the API (`GET /api/v1/vsock`).
    Counters {
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
        /// RX packets delivered.
        rx_packets,
        /// Interrupts raised.
        interrupts,
        /// Chains refused as malformed (any reason), returned with used length 0.
        malformed_chains,
        /// TX packets whose header claims more payload than the chain or 64 KiB.
        bad_len,
        /// TX packets with a `src_cid` other than the guest's, dropped unanswered.
        spoofed_src,
        /// Packets of a socket type other than STREAM, reset.
        bad_type,
        /// Packets with an unknown op, reset.
        bad_op,
        /// Packets for no known connection, reset.
        unknown_conn,
        /// REQUESTs refused because the connection limit was reached.
        conn_limit,
        /// Connections reset because the guest overran its credit.
        credit_overrun,
        /// Connections reset for a protocol violation by the guest.
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

impl Counters {
    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}
