//! Bulk throughput through the device: simulated guest → device thread + CSM → Unix socket pair
//! → host thread, and back.
//!
//! ```text
//! cargo run --release --example throughput [-- --mib N] [--repeat R]
//! ```
//!
//! For each direction (guest → host with a few TX descriptor layouts, host → guest) it moves
//! N MiB (default 1024) over one connection on a fresh device, R times (default 3), and prints
//! the run with the median wall time: wall time, MB/s, packets per second and interrupts per
//! packet (from the device's counters). The guest runs on the main thread, the host side on its
//! own thread, the device on its own: three busy threads. See `docs/performance.md`.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use vsock_router::device::{DeviceConfig, VsockDevice};
use vsock_router::sim::{PairBackend, PairHost, SimGuest, TxLayout};
use vsock_router::stats::Counters;

const GUEST: u64 = 3;
/// Bound of each run; a run that takes longer is reported as failed.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// Size of the chunk each side hands over per call.
const CHUNK: usize = 256 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    GuestToHost,
    HostToGuest,
}

struct Row {
    dir: &'static str,
    layout: String,
    bytes: u64,
    wall: Duration,
    /// Data packets: TX for guest → host, RX for host → guest.
    data_pkts: u64,
    tx_pkts: u64,
    rx_pkts: u64,
    irqs: u64,
}

fn setup() -> (SimGuest, VsockDevice<PairBackend>, PairHost) {
    let (backend, host) = PairBackend::new();
    let (g, dev) = SimGuest::with_device(DeviceConfig::new(GUEST), backend);
    (g, dev, host)
}

fn snapshot(c: &Counters) -> (u64, u64, u64) {
    (
        c.tx_packets.load(Ordering::Relaxed),
        c.rx_packets.load(Ordering::Relaxed),
        c.interrupts.load(Ordering::Relaxed),
    )
}

fn fill(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn run(dir: Dir, layout: TxLayout, bytes: u64, label: &str) -> Result<Row, String> {
    let (mut g, dev, host) = setup();
    g.layout = layout;
    let port = g
        .connect(2, 9000)
        .map_err(|st| format!("connect: {st:?}"))?;
    let (_, s) = host
        .accept(Duration::from_secs(5))
        .ok_or("host accept timed out")?;
    let counters = dev.counters();
    let data = fill(CHUNK);
    let before = snapshot(&counters);
    let start = Instant::now();
    let deadline = start + RUN_LIMIT;
    let wall = match dir {
        Dir::GuestToHost => {
            let mut rs = s;
            rs.set_read_timeout(Some(RUN_LIMIT))
                .map_err(|e| e.to_string())?;
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
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(CHUNK as u64) as usize;
                let left = deadline.saturating_duration_since(Instant::now());
                g.send(port, &data[..n], left)?;
                sent += n as u64;
            }
            let end = reader.join().map_err(|_| "reader panicked")??;
            end - start
        }
        Dir::HostToGuest => {
            let mut ws = s;
            let writer = thread::spawn(move || -> Result<(), String> {
                let mut sent = 0u64;
                while sent < bytes {
                    let n = (bytes - sent).min(CHUNK as u64) as usize;
                    ws.write_all(&data[..n])
                        .map_err(|e| format!("host write: {e}"))?;
                    sent += n as u64;
                }
                let _ = ws.shutdown(Shutdown::Write);
                Ok(())
            });
            let mut got = 0u64;
            while got < bytes {
                if Instant::now() > deadline {
                    return Err(format!("guest got {got} of {bytes} bytes in {RUN_LIMIT:?}"));
                }
                let k = g.recv(port, usize::MAX).len();
                if k == 0 {
                    g.pump(Duration::from_millis(5));
                }
                got += k as u64;
            }
            let end = Instant::now();
            writer.join().map_err(|_| "writer panicked")??;
            end - start
        }
    };
    let after = snapshot(&counters);
    if !g.violations.is_empty() {
        return Err(format!("credit violations: {:?}", g.violations));
    }
    let (tx_pkts, rx_pkts, irqs) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    Ok(Row {
        dir: match dir {
            Dir::GuestToHost => "guest->host",
            Dir::HostToGuest => "host->guest",
        },
        layout: label.to_string(),
        bytes,
        wall,
        data_pkts: if dir == Dir::GuestToHost {
            tx_pkts
        } else {
            rx_pkts
        },
        tx_pkts,
        rx_pkts,
        irqs,
    })
}

fn parse_args() -> Result<(u64, usize), String> {
    let mut args = std::env::args().skip(1);
    let mut mib = 1024;
    let mut repeat = 3;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => {
                let v = args.next().ok_or("--mib needs a value")?;
                mib = v.parse().map_err(|_| format!("bad --mib value {v:?}"))?;
                if mib == 0 || mib > 64 * 1024 {
                    return Err("--mib must be in 1..=65536".into());
                }
            }
            "--repeat" => {
                let v = args.next().ok_or("--repeat needs a value")?;
                repeat = v.parse().map_err(|_| format!("bad --repeat value {v:?}"))?;
                if !(1..=20).contains(&repeat) {
                    return Err("--repeat must be in 1..=20".into());
                }
            }
            "-h" | "--help" => {
                return Err(
                    "usage: throughput [--mib N] [--repeat R]   (defaults: 1024 MiB, 3 runs)"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((mib, repeat))
}

/// Runs one configuration `repeat` times; returns the run with the median wall time.
fn median_run(
    dir: Dir,
    layout: &TxLayout,
    bytes: u64,
    label: &str,
    repeat: usize,
) -> Result<Row, String> {
    let mut rows = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        rows.push(run(dir, layout.clone(), bytes, label)?);
    }
    rows.sort_by_key(|r| r.wall);
    Ok(rows.swap_remove(repeat / 2))
}

fn main() -> ExitCode {
    let (mib, repeat) = match parse_args() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; measure with --release");
    }
    let bytes = mib << 20;
    let runs: Vec<(Dir, TxLayout, &str)> = vec![
        (Dir::GuestToHost, TxLayout::Linear, "linear"),
        (Dir::GuestToHost, TxLayout::HeaderThenData, "hdr+data"),
        (
            Dir::GuestToHost,
            TxLayout::SplitHeader(24),
            "hdr split+4K frags",
        ),
        (Dir::HostToGuest, TxLayout::Linear, "(4K RX bufs)"),
    ];
    println!(
        "{mib} MiB per run, one connection, device buf_alloc 256 KiB, default socket buffers; \
         median of {repeat} runs"
    );
    println!(
        "{:<12} {:<19} {:>8} {:>9} {:>7} {:>10} {:>8} {:>9} {:>9} {:>8} {:>8}",
        "direction",
        "layout",
        "wall s",
        "MB/s",
        "Gb/s",
        "pkts/s",
        "B/pkt",
        "tx pkts",
        "rx pkts",
        "irqs",
        "irq/pkt"
    );
    let mut failed = false;
    for (dir, layout, label) in runs {
        match median_run(dir, &layout, bytes, label, repeat) {
            Ok(r) => {
                let secs = r.wall.as_secs_f64();
                let mbs = r.bytes as f64 / secs / 1e6;
                println!(
                    "{:<12} {:<19} {:>8.3} {:>9.1} {:>7.2} {:>10.0} {:>8} {:>9} {:>9} {:>8} {:>8.3}",
                    r.dir,
                    r.layout,
                    secs,
                    mbs,
                    mbs * 8.0 / 1000.0,
                    r.data_pkts as f64 / secs,
                    r.bytes / r.data_pkts.max(1),
                    r.tx_pkts,
                    r.rx_pkts,
                    r.irqs,
                    r.irqs as f64 / r.data_pkts.max(1) as f64
                );
            }
            Err(e) => {
                failed = true;
                println!("{label}: FAILED: {e}");
            }
        }
    }
    println!(
        "pkts/s, B/pkt and irq/pkt count every packet on the data direction's queue (TX for \
         guest->host, RX for host->guest), control packets included; irqs are all interrupts \
         the device raised (one per batch, for either queue)."
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
