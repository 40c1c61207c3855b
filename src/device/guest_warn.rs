//! Warnings about a misbehaving guest, rate-limited so that a hostile guest cannot flood the
//! log: every packet it gets wrong is counted ([`Counters`]), and at the end of a wake-up the
//! core calls [`GuestWarnings::check`], which logs one warning line naming what went wrong
//! since the last line (kind and count), at most once per [`WARN_INTERVAL`]. The first
//! misbehaviour is reported at once; what happens in between is summed into the next line.

use std::time::{Duration, Instant};

use crate::stats::{Counters, ErrorCounts};

/// At most one warning line per this interval.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The error kinds that only a guest (its driver or its sockets) causes, with what they mean.
const GUEST_KINDS: &[(&str, &str)] = &[
    ("malformed_chains", "malformed descriptor chains"),
    ("bad_len", "packets longer than their chain or 64 KiB"),
    ("spoofed_src", "packets with a foreign source CID"),
    ("bad_type", "packets of an unsupported socket type"),
    ("bad_op", "packets with an unknown op"),
    ("credit_overrun", "connections that overran their credit"),
    ("protocol_error", "protocol violations"),
    ("config_writes", "writes to the read-only config space"),
    ("bad_avail_idx", "avail index jumps"),
    (
        "rst_dropped",
        "RSTs dropped for a flood of packets for unknown connections",
    ),
];

/// The rate limiter of one device's guest warnings.
pub struct GuestWarnings {
    guest_cid: u64,
    /// The counters as of the last warning line (or the start).
    reported: ErrorCounts,
    last_line: Option<Instant>,
    /// Lines logged, for tests.
    lines: u64,
}

impl GuestWarnings {
    /// No misbehaviour reported yet for the guest `guest_cid`.
    pub fn new(guest_cid: u64, counters: &Counters) -> Self {
        GuestWarnings {
            guest_cid,
            reported: counters.errors(),
            last_line: None,
            lines: 0,
        }
    }

    /// Logs one warning line if the guest misbehaved since the last one and the interval has
    /// passed (or no line was logged yet). Cheap when nothing happened: the error counters'
    /// atomic loads, once per wake-up.
    pub fn check(&mut self, counters: &Counters, now: Instant) {
        if self
            .last_line
            .is_some_and(|t| now.saturating_duration_since(t) < WARN_INTERVAL)
        {
            return;
        }
        let errors = counters.errors();
        let mut parts = Vec::new();
        for ((name, new), (_, old)) in errors.iter().zip(self.reported.iter()) {
            if new > old {
                if let Some((_, what)) = GUEST_KINDS.iter().find(|(k, _)| *k == name) {
                    parts.push(format!("{} {what} ({name})", new - old));
                }
            }
        }
        if parts.is_empty() {
            return;
        }
        log::warn!(
            "vsock: guest CID {} misbehaved: {} (each answered as the kernel would; at most one such line per {} s)",
            self.guest_cid,
            parts.join(", "),
            WARN_INTERVAL.as_secs()
        );
        self.reported = errors;
        self.last_line = Some(now);
        self.lines += 1;
    }

    /// Warning lines logged so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_at_once_then_at_most_one_per_interval_with_the_sums() {
        let c = Counters::default();
        let mut w = GuestWarnings::new(3, &c);
        let t0 = Instant::now();
        w.check(&c, t0);
        assert_eq!(w.lines(), 0, "nothing happened");
        Counters::inc(&c.spoofed_src);
        w.check(&c, t0);
        assert_eq!(w.lines(), 1, "the first misbehaviour at once");
        for i in 0..10_000u64 {
            Counters::inc(&c.bad_len);
            w.check(&c, t0 + Duration::from_millis(i % 9_000));
        }
        assert_eq!(w.lines(), 1, "a flood within the interval: no line");
        w.check(&c, t0 + WARN_INTERVAL);
        assert_eq!(w.lines(), 2, "then one line with the sum");
        assert_eq!(w.reported.bad_len, 10_000);
        // Host-side failures are not the guest's: no line for them.
        Counters::inc(&c.connect_failed);
        w.check(&c, t0 + 3 * WARN_INTERVAL);
        assert_eq!(w.lines(), 2);
    }
}
