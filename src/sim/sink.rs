//! Cheap ways for a benchmark's guest application to move data: received bytes handed to a
//! callback straight from the RX buffer's copy instead of queued byte by byte
//! ([`SimGuest::set_sink`]), a bulk [`SimGuest::recv_into`], and a [`SimGuest::try_send`] that
//! never waits for credit.

use std::fmt;

use super::{SimGuest, SockState};
use crate::wire::{op, MAX_PAYLOAD};

/// Where a socket's received bytes go when the application consumes them at once: called with
/// each RW packet's payload (one bulk copy out of guest memory, never byte by byte).
pub struct Sink(Box<SinkFn>);

/// What a [`Sink`] calls.
type SinkFn = dyn FnMut(&[u8]) + Send;

impl Sink {
    /// A sink that calls `f` with each payload.
    pub fn new(f: impl FnMut(&[u8]) + Send + 'static) -> Sink {
        Sink(Box::new(f))
    }

    /// Hands one payload to the sink.
    pub fn take(&mut self, payload: &[u8]) {
        (self.0)(payload)
    }
}

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sink")
    }
}

impl SimGuest {
    /// Sends the bytes `port` receives from now on to `sink` instead of its receive queue: the
    /// application consumes each packet as it arrives (credit is returned as Linux returns it
    /// after a `recv`). Bytes already queued stay for [`SimGuest::recv`]. Returns whether the
    /// socket exists.
    pub fn set_sink(&mut self, port: u32, sink: Sink) -> bool {
        match self.socks.get_mut(&port) {
            Some(s) => {
                s.sink = Some(sink);
                true
            }
            None => false,
        }
    }

    /// As [`SimGuest::recv`], into `buf` with at most two bulk copies; returns the bytes taken.
    pub fn recv_into(&mut self, port: u32, buf: &mut [u8]) -> usize {
        let Some(s) = self.socks.get_mut(&port) else {
            return 0;
        };
        let n = buf.len().min(s.rx.len());
        let (a, b) = s.rx.as_slices();
        let na = n.min(a.len());
        buf[..na].copy_from_slice(&a[..na]);
        buf[na..n].copy_from_slice(&b[..n - na]);
        s.rx.drain(..n);
        if s.consume(n) {
            self.send_credit_update(port);
        }
        n
    }

    /// Sends one RW packet of as much of `data` as the device's credit allows (at most 64 KiB)
    /// without waiting for credit; returns the bytes sent (0 without credit).
    pub fn try_send(&mut self, port: u32, data: &[u8]) -> Result<usize, String> {
        let s = self.socks.get(&port).ok_or("no such socket")?;
        if s.state != SockState::Established {
            return Err(format!("socket {port} is {:?}", s.state));
        }
        let n = (s.peer_credit() as usize)
            .min(MAX_PAYLOAD as usize)
            .min(data.len());
        if n == 0 {
            return Ok(0);
        }
        self.send_rw(port, &data[..n]);
        Ok(n)
    }

    fn send_credit_update(&mut self, port: u32) {
        self.send_ctl(port, op::CREDIT_UPDATE, 0);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::device::DeviceConfig;
    use crate::sim::PairBackend;

    /// With kicks only where EVENT_IDX asks for them, a sink and `try_send`, bulk data crosses
    /// both ways intact, and some kicks are skipped.
    #[test]
    fn event_idx_kicks_and_a_sink_move_bulk_data_both_ways() {
        let (backend, host) = PairBackend::new();
        let (mut g, dev) = SimGuest::with_device(DeviceConfig::new(3), backend);
        g.event_idx_kicks = true;
        let t = Duration::from_secs(10);
        let port = g.connect(2, 9).expect("connected");
        let (_, mut s) = host.accept(t).expect("host end");
        s.set_read_timeout(Some(t)).unwrap();
        let n = 2 << 20;
        let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        // Guest → host, one packet at a time without waiting for credit.
        let mut reader = s.try_clone().unwrap();
        let want = data.clone();
        let read = std::thread::spawn(move || {
            let mut got = vec![0u8; want.len()];
            reader.read_exact(&mut got).unwrap();
            got == want
        });
        let (mut off, end) = (0, Instant::now() + t);
        while off < n && Instant::now() < end {
            off += g.try_send(port, &data[off..]).unwrap();
            g.pump(Duration::from_millis(1));
        }
        assert!(read.join().unwrap(), "the host got the guest's bytes");
        // Host → guest, into a sink that checks every byte.
        let (seen, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (seen2, bad2) = (seen.clone(), bad.clone());
        assert!(g.set_sink(
            port,
            Sink::new(move |p| {
                let at = seen2.fetch_add(p.len() as u64, Ordering::Relaxed) as usize;
                let wrong = p
                    .iter()
                    .enumerate()
                    .filter(|&(i, &b)| b != ((at + i) * 7 % 251) as u8)
                    .count();
                bad2.fetch_add(wrong as u64, Ordering::Relaxed);
            })
        ));
        let write = std::thread::spawn(move || s.write_all(&data).is_ok());
        let done = g.pump_until(t, |_| seen.load(Ordering::Relaxed) >= n as u64);
        assert!(
            done,
            "{} of {n} bytes reached the sink",
            seen.load(Ordering::Relaxed)
        );
        assert!(write.join().unwrap());
        assert_eq!(bad.load(Ordering::Relaxed), 0, "bytes changed on the way");
        assert!(g.kicks_skipped > 0, "no kick was ever suppressed");
        assert!(g.violations.is_empty(), "{:?}", g.violations);
        drop(dev);
    }

    #[test]
    fn recv_into_takes_what_recv_would() {
        let (backend, host) = PairBackend::new();
        let (mut g, _dev) = SimGuest::with_device(DeviceConfig::new(3), backend);
        let t = Duration::from_secs(5);
        let port = g.connect(2, 9).expect("connected");
        let (_, mut s) = host.accept(t).expect("host end");
        s.write_all(b"hello, world").unwrap();
        assert!(g.pump_until(t, |g| g.socks[&port].rx.len() == 12));
        let mut buf = [0u8; 5];
        assert_eq!(g.recv_into(port, &mut buf), 5);
        assert_eq!(&buf, b"hello");
        assert_eq!(g.recv(port, 100), b", world");
        assert_eq!(g.recv_into(port, &mut buf), 0);
    }
}
