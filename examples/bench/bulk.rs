//! Bulk transfer over one connection, guest → host (with a TX descriptor layout) or host →
//! guest (into the guest's 4 KiB RX buffers, consumed in place by a sink).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use vsock_router::sim::{Sink, TxLayout};

use crate::cpu::CpuProbe;
use crate::rig::{Kind, Rig};
use crate::{Aligned, Sample, RUN_LIMIT};

/// Bytes each side hands over per call.
pub const CHUNK: usize = 256 * 1024;

/// Which way the bytes go.
#[derive(Clone, Debug)]
pub enum Dir {
    /// With the TX layout, the guest application writing this many bytes per `send` (a
    /// [`CHUNK`] for bulk; 1 KiB for a writer of small pieces: one packet each).
    GuestToHost(TxLayout, usize),
    /// Over a connection the guest opened, or (`true`) one a host program opened.
    HostToGuest(bool),
}

fn counter(c: &vsock_router::stats::Counters) -> [u64; 4] {
    [
        c.tx_packets.load(Ordering::Relaxed),
        c.rx_packets.load(Ordering::Relaxed),
        c.interrupts.load(Ordering::Relaxed),
        c.tx_coalesced.load(Ordering::Relaxed),
    ]
}

/// Moves `bytes` over one connection of a fresh device.
pub fn run(kind: Kind, dir: &Dir, buf_alloc: u32, bytes: u64) -> Result<Sample, String> {
    let mut rig = Rig::new(kind, buf_alloc)?;
    if let Dir::GuestToHost(layout, _) = dir {
        rig.g.layout = layout.clone();
    }
    let (port, s) = match dir {
        Dir::HostToGuest(true) => rig.connect_from_host(9000)?,
        _ => rig.connect(9000)?,
    };
    s.set_read_timeout(Some(RUN_LIMIT))
        .map_err(|e| e.to_string())?;
    let before = counter(&rig.counters);
    let kicks = (rig.g.kicks_sent, rig.g.kicks_skipped);
    let cpu = CpuProbe::start(rig.device);
    let start = Instant::now();
    let deadline = start + RUN_LIMIT;
    let wall = match dir {
        Dir::GuestToHost(_, write) => {
            let mut rs = s;
            let reader = thread::spawn(move || -> Result<Instant, String> {
                let mut buf = vec![0u8; CHUNK];
                let mut n = 0u64;
                while n < bytes {
                    let k = rs.read(&mut buf).map_err(|e| format!("host read: {e}"))?;
                    if k == 0 {
                        return Err(format!("host read EOF after {n} bytes"));
                    }
                    n += k as u64;
                }
                Ok(Instant::now())
            });
            // At the page offset the guest writes TX payload to: the copy never aliases.
            let off = if crate::legacy() {
                16
            } else {
                vsock_router::sim::TX_PAYLOAD_PAGE_OFFSET
            };
            let data = Aligned::new(CHUNK, off);
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(*write as u64) as usize;
                let left = deadline.saturating_duration_since(Instant::now());
                rig.g.send(port, &data.as_slice()[..n], left)?;
                sent += n as u64;
            }
            let end = reader.join().map_err(|_| "reader panicked")??;
            end - start
        }
        Dir::HostToGuest(_) => {
            let got = Arc::new(AtomicU64::new(0));
            let seen = got.clone();
            if !crate::legacy() {
                rig.g.set_sink(
                    port,
                    Sink::new(move |p| {
                        seen.fetch_add(p.len() as u64, Ordering::Relaxed);
                    }),
                );
            }
            let mut ws = s;
            let writer = thread::spawn(move || -> Result<(), String> {
                let data = Aligned::new(CHUNK, 0);
                let mut sent = 0u64;
                while sent < bytes {
                    let n = (bytes - sent).min(CHUNK as u64) as usize;
                    ws.write_all(&data.as_slice()[..n])
                        .map_err(|e| format!("host write: {e}"))?;
                    sent += n as u64;
                }
                Ok(())
            });
            let done = rig.g.pump_until(RUN_LIMIT, |g| {
                if crate::legacy() {
                    // Received as the tests receive: byte by byte out of the socket's queue.
                    let n = g.recv(port, usize::MAX).len();
                    got.fetch_add(n as u64, Ordering::Relaxed);
                }
                got.load(Ordering::Relaxed) >= bytes
            });
            let end = Instant::now();
            if !done {
                return Err(format!(
                    "guest got {} of {bytes} bytes in {RUN_LIMIT:?}",
                    got.load(Ordering::Relaxed)
                ));
            }
            writer.join().map_err(|_| "writer panicked")??;
            end - start
        }
    };
    let cpu = cpu.used();
    let after = counter(&rig.counters);
    if !rig.g.violations.is_empty() {
        return Err(format!("guest saw violations: {:?}", rig.g.violations));
    }
    let data_pkts = match dir {
        Dir::GuestToHost(..) => after[0] - before[0],
        Dir::HostToGuest(_) => after[1] - before[1],
    };
    let sent = rig.g.kicks_sent - kicks.0;
    let skipped = rig.g.kicks_skipped - kicks.1;
    Ok(Sample {
        wall,
        amount: bytes as f64,
        cpu,
        extra: if rig.external {
            // A daemon's own counters are out of reach; the guest's kicks are not.
            vec![
                ("kicks", sent as f64),
                (
                    "kicks skipped %",
                    100.0 * skipped as f64 / (sent + skipped).max(1) as f64,
                ),
            ]
        } else {
            vec![
                ("B/pkt", bytes as f64 / data_pkts.max(1) as f64),
                (
                    "irq/pkt",
                    (after[2] - before[2]) as f64 / data_pkts.max(1) as f64,
                ),
                ("kick/pkt", sent as f64 / data_pkts.max(1) as f64),
                // TX packets that shared a host write with the one before them.
                (
                    "coalesced %",
                    100.0 * (after[3] - before[3]) as f64 / data_pkts.max(1) as f64,
                ),
                (
                    "kicks skipped %",
                    100.0 * skipped as f64 / (sent + skipped).max(1) as f64,
                ),
            ]
        },
    })
}
