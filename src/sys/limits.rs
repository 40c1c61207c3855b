//! The process's file-descriptor limit (`RLIMIT_NOFILE`).

use std::io;

/// The file-descriptor limit before and after [`raise_fd_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit found.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
    /// The hard limit (the soft limit cannot go above it without privilege).
    pub hard: u64,
}

fn get() -> io::Result<libc::rlimit> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(l)
}

/// Raises the soft `RLIMIT_NOFILE` to `want`, or to the hard limit if that is lower; never
/// lowers it. Most systems start processes with a soft limit of 1024 and a much higher hard
/// limit, which a device with its default limits (1023 connections, 1024 pending handshakes on
/// each of two sockets) can exceed.
pub fn raise_fd_limit(want: u64) -> io::Result<FdLimit> {
    let l = get()?;
    let target = want.min(l.rlim_max);
    if target > l.rlim_cur {
        let new = libc::rlimit {
            rlim_cur: target,
            rlim_max: l.rlim_max,
        };
        // SAFETY: `new` is a valid rlimit whose soft limit is within the hard limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let now = get()?;
    Ok(FdLimit {
        before: l.rlim_cur,
        now: now.rlim_cur,
        hard: now.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_goes_up_to_the_hard_limit_and_never_down() {
        let start = get().unwrap();
        let l = raise_fd_limit(0).unwrap();
        assert_eq!(
            (l.before, l.now),
            (start.rlim_cur, start.rlim_cur),
            "never lowered"
        );
        let l = raise_fd_limit(u64::MAX).unwrap();
        assert_eq!(l.now, l.hard, "capped at the hard limit");
        assert!(l.now >= start.rlim_cur);
    }
}
