//! What a KVM host's QEMU was doing when its console went silent: the CPU time QEMU used over
//! the silence (`/proc/PID/stat`) and the virtual CPUs' state from QEMU's human monitor
//! (`info cpus`, `info registers -a`, `info lapic`), for the platform-fault report
//! (docs/testing.md, "A KVM host that hangs without a word").

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The monitor socket's name in a run's directory: `run-kvm-host.sh --monitor` puts QEMU's
/// human monitor there.
pub(crate) const MONITOR_SOCKET: &str = "monitor.sock";

/// What the monitor is asked at a silence.
const MONITOR_COMMANDS: &[&str] = &["info cpus", "info registers -a", "info lapic"];

/// The user and system CPU time process `pid` has used so far, or `None` once it is gone.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) end in ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf(3) reads a constant of the system; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// One line on how busy QEMU was over a silence of `over`: `used` of CPU time in that span.
pub(crate) fn cpu_line(used: Duration, over: Duration) -> String {
    format!(
        "QEMU used {:.1} s of CPU time in the {:.0} s of silence ({:.0} % of one core): {}",
        used.as_secs_f64(),
        over.as_secs_f64(),
        100.0 * used.as_secs_f64() / over.as_secs_f64().max(1e-9),
        if used.as_secs_f64() < 0.1 * over.as_secs_f64() {
            "idle, waiting for an event that did not come"
        } else {
            "busy, running without output"
        }
    )
}

/// Asks the human monitor at `dir/monitor.sock` [`MONITOR_COMMANDS`], each answer at most
/// `limit` away; returns the transcript, or why there is none.
pub(crate) fn monitor_dump(dir: &Path, limit: Duration) -> Result<String, String> {
    let path = dir.join(MONITOR_SOCKET);
    // A socket address holds at most 107 bytes: a deeper directory is reached through the
    // descriptor of the directory itself.
    let dir_fd;
    let target = if path.as_os_str().len() < 100 {
        path.clone()
    } else {
        dir_fd = std::fs::File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        use std::os::fd::AsRawFd;
        Path::new(&format!("/proc/self/fd/{}", dir_fd.as_raw_fd())).join(MONITOR_SOCKET)
    };
    let mut s = UnixStream::connect(&target).map_err(|e| format!("{}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    let mut banner = String::new();
    // The banner ends in the first prompt.
    read_to_prompt(&mut s, &mut banner, limit)?;
    let mut out = String::new();
    for cmd in MONITOR_COMMANDS {
        s.write_all(format!("{cmd}\n").as_bytes())
            .map_err(|e| format!("{cmd}: {e}"))?;
        let mut answer = String::new();
        read_to_prompt(&mut s, &mut answer, limit)?;
        out.push_str(&format!("> {cmd}\n{}", readable(&answer)));
    }
    Ok(out)
}

/// An answer of the monitor without its echo of the command (drawn with terminal escapes),
/// its prompt, and the floating-point and vector registers (long, and of no use here).
fn readable(answer: &str) -> String {
    answer
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.contains('\x1b') && l.trim() != "(qemu)" && !l.trim().is_empty())
        .filter(|l| !["XMM", "YMM", "FPR"].iter().any(|p| l.starts_with(p)))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Reads from `s` into `out` until it ends in the monitor's `(qemu) ` prompt, at most `limit`.
fn read_to_prompt(s: &mut UnixStream, out: &mut String, limit: Duration) -> Result<(), String> {
    let until = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    let from = out.len();
    loop {
        if out[from..].trim_end().ends_with("(qemu)") {
            out.push('\n');
            return Ok(());
        }
        if Instant::now() > until {
            return Err(format!("no monitor prompt within {limit:?}"));
        }
        match s.read(&mut buf) {
            Ok(0) => return Err("the monitor closed".into()),
            Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn our_own_cpu_time_is_read() {
        let pid = std::process::id();
        let before = cpu_time(pid).unwrap();
        let until = Instant::now() + Duration::from_millis(300);
        let mut x = 0u64;
        while Instant::now() < until {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        assert_ne!(x, 7);
        let after = cpu_time(pid).unwrap();
        assert!(after > before, "{before:?} -> {after:?}");
        assert!(cpu_time(u32::MAX).is_none());
    }

    #[test]
    fn the_cpu_line_says_idle_or_busy() {
        let idle = cpu_line(Duration::from_secs(3), Duration::from_secs(300));
        assert!(
            idle.contains("1 % of one core") && idle.contains("idle"),
            "{idle}"
        );
        let busy = cpu_line(Duration::from_secs(290), Duration::from_secs(300));
        assert!(busy.contains("97 %") && busy.contains("busy"), "{busy}");
    }

    /// A fake monitor (banner, prompt, an answer per command) in a directory deeper than a
    /// socket address can name.
    #[test]
    fn the_monitor_is_asked_every_command() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let dir_fd = std::fs::File::open(&deep).unwrap();
        use std::os::fd::AsRawFd;
        let via = Path::new(&format!("/proc/self/fd/{}", dir_fd.as_raw_fd())).join(MONITOR_SOCKET);
        let listener = UnixListener::bind(via).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.write_all(b"QEMU 7.2 monitor - type 'help'\r\n(qemu) ")
                .unwrap();
            let mut seen = String::new();
            let mut buf = [0u8; 256];
            for _ in MONITOR_COMMANDS {
                let n = c.read(&mut buf).unwrap();
                let cmd = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                // The echo as QEMU draws it, then the answer and the prompt.
                c.write_all(
                    format!("i\x1b[K\x1b[D{cmd}\x1b[K\r\nanswer to {cmd}\r\nYMM00=0\r\n(qemu) ")
                        .as_bytes(),
                )
                .unwrap();
                seen.push_str(&cmd);
                seen.push('|');
            }
            seen
        });
        let dump = monitor_dump(&deep, Duration::from_secs(5)).unwrap();
        assert_eq!(
            server.join().unwrap(),
            "info cpus|info registers -a|info lapic|"
        );
        for cmd in MONITOR_COMMANDS {
            assert!(dump.contains(&format!("answer to {cmd}")), "{dump}");
        }
        assert!(!dump.contains('\r') && !dump.contains("(qemu)"), "{dump}");
        assert!(
            dump.starts_with("> info cpus\nanswer to info cpus\n"),
            "{dump}"
        );
        assert!(monitor_dump(tmp.path(), Duration::from_secs(1)).is_err());
    }
}
