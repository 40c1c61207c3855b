//! Device-side ports for host-initiated connections: round robin in [2^30, 2^31), as Firecracker
//! and Cloud Hypervisor, never reused while live.

use std::collections::HashSet;

/// First device-side port.
pub const EPHEMERAL_FIRST: u32 = 1 << 30;
/// One past the last device-side port.
pub const EPHEMERAL_END: u32 = 1 << 31;

/// How many ports one allocation tries before it gives up.
const TRIES: usize = 1024;

/// The ports in use and where the next search starts.
pub struct Ports {
    in_use: HashSet<u32>,
    next: u32,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            in_use: HashSet::new(),
            next: EPHEMERAL_FIRST,
        }
    }
}

impl Ports {
    /// A free port, now in use; `None` if `TRIES` ports in a row are taken.
    pub fn alloc(&mut self) -> Option<u32> {
        for _ in 0..TRIES {
            let p = self.next;
            self.next = if p + 1 >= EPHEMERAL_END {
                EPHEMERAL_FIRST
            } else {
                p + 1
            };
            if self.in_use.insert(p) {
                return Some(p);
            }
        }
        None
    }

    /// Where the next search starts (for a save).
    pub fn cursor(&self) -> u32 {
        self.next
    }

    /// Starts the next search at `port` (a restore); a port outside the range starts it at
    /// the range's first.
    pub fn set_cursor(&mut self, port: u32) {
        self.next = if (EPHEMERAL_FIRST..EPHEMERAL_END).contains(&port) {
            port
        } else {
            EPHEMERAL_FIRST
        };
    }

    /// Gives `port` back.
    pub fn free(&mut self, port: u32) {
        self.in_use.remove(&port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_wraps_and_skips_ports_in_use() {
        let mut p = Ports {
            next: EPHEMERAL_END - 1,
            ..Ports::default()
        };
        assert_eq!(p.alloc(), Some(EPHEMERAL_END - 1));
        assert_eq!(p.alloc(), Some(EPHEMERAL_FIRST), "wraps");
        p.next = EPHEMERAL_FIRST;
        assert_eq!(p.alloc(), Some(EPHEMERAL_FIRST + 1), "skips the live one");
        p.free(EPHEMERAL_FIRST);
        p.next = EPHEMERAL_FIRST;
        assert_eq!(p.alloc(), Some(EPHEMERAL_FIRST), "free again");
    }

    #[test]
    fn a_restored_cursor_is_where_the_search_goes_on_and_a_bogus_one_starts_over() {
        let mut p = Ports::default();
        p.set_cursor(EPHEMERAL_FIRST + 7);
        assert_eq!(p.cursor(), EPHEMERAL_FIRST + 7);
        assert_eq!(p.alloc(), Some(EPHEMERAL_FIRST + 7));
        assert_eq!(p.cursor(), EPHEMERAL_FIRST + 8);
        for bogus in [0, EPHEMERAL_FIRST - 1, EPHEMERAL_END, u32::MAX] {
            p.set_cursor(bogus);
            assert_eq!(p.cursor(), EPHEMERAL_FIRST, "{bogus}");
        }
    }
}
