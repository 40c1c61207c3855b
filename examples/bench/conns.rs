//! Many concurrent connections: each of N connections moves `bytes / N`, all at once, one way.
//! Reports the aggregate rate and each connection's own rate (its bytes over the time from the
//! start until its last byte arrived): the slowest and the fastest show how fair the device's
//! scheduling is.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vsock_router::sim::{Sink, TX_PAYLOAD_PAGE_OFFSET};

use crate::bulk::CHUNK;
use crate::cpu::CpuProbe;
use crate::rig::{Kind, Rig};
use crate::{Aligned, Sample, RUN_LIMIT};

/// Serves every host end with epoll until each has moved `quota` bytes (`write`: host → guest;
/// else guest → host); returns when each finished.
fn host_side(
    streams: Vec<UnixStream>,
    quota: u64,
    write: bool,
    deadline: Instant,
) -> Result<Vec<Instant>, String> {
    let ep = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
    let set = if write { EventSet::OUT } else { EventSet::IN };
    for (i, s) in streams.iter().enumerate() {
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        ep.ctl(
            ControlOperation::Add,
            s.as_raw_fd(),
            EpollEvent::new(set, i as u64),
        )
        .map_err(|e| format!("epoll add: {e}"))?;
    }
    let data = Aligned::new(CHUNK, 0);
    let mut buf = vec![0u8; CHUNK];
    let mut left = vec![quota; streams.len()];
    let mut done = vec![None; streams.len()];
    let mut open = streams.len();
    let mut events = vec![EpollEvent::default(); 256];
    while open > 0 {
        if Instant::now() >= deadline {
            return Err(format!("{open} connections unfinished after {RUN_LIMIT:?}"));
        }
        let n = ep
            .wait(100, &mut events)
            .map_err(|e| format!("epoll wait: {e}"))?;
        for ev in &events[..n] {
            let i = ev.data() as usize;
            let mut s = &streams[i];
            // At most a few calls per event, so that one connection cannot starve the others.
            for _ in 0..4 {
                if left[i] == 0 {
                    break;
                }
                let want = left[i].min(CHUNK as u64) as usize;
                let r = if write {
                    s.write(&data.as_slice()[..want])
                } else {
                    s.read(&mut buf[..want])
                };
                match r {
                    Ok(0) => return Err(format!("connection {i} ended early")),
                    Ok(k) => left[i] -= k as u64,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("connection {i}: {e}")),
                }
            }
            if left[i] == 0 && done[i].is_none() {
                done[i] = Some(Instant::now());
                open -= 1;
                let _ = ep.ctl(ControlOperation::Delete, s.as_raw_fd(), *ev);
            }
        }
    }
    Ok(done.into_iter().map(|d| d.expect("all done")).collect())
}

/// When one connection's last byte reached the guest's sink.
struct Got {
    bytes: AtomicU64,
    done: Mutex<Option<Instant>>,
}

/// `conns` connections of a fresh device moving `bytes` in all, host → guest when `to_guest`.
pub fn run(kind: Kind, conns: usize, to_guest: bool, bytes: u64) -> Result<Sample, String> {
    let mut rig = Rig::new(kind, 256 * 1024)?;
    let quota = (bytes / conns as u64).max(1);
    let mut ports = Vec::with_capacity(conns);
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (p, s) = rig.connect(9200)?;
        ports.push(p);
        streams.push(s);
    }
    let total = Arc::new(AtomicU64::new(0));
    let mut got = Vec::new();
    if to_guest {
        for &p in &ports {
            let g = Arc::new(Got {
                bytes: AtomicU64::new(0),
                done: Mutex::new(None),
            });
            got.push(g.clone());
            let total = total.clone();
            rig.g.set_sink(
                p,
                Sink::new(move |d| {
                    total.fetch_add(d.len() as u64, Ordering::Relaxed);
                    let b = g.bytes.fetch_add(d.len() as u64, Ordering::Relaxed) + d.len() as u64;
                    if b >= quota {
                        g.done.lock().unwrap().get_or_insert_with(Instant::now);
                    }
                }),
            );
        }
    }
    let cpu = CpuProbe::start(rig.device);
    let start = Instant::now();
    let deadline = start + RUN_LIMIT;
    let host = thread::spawn(move || host_side(streams, quota, to_guest, deadline));
    let all = quota * conns as u64;
    let ends: Vec<Instant> = if to_guest {
        let ok = rig
            .g
            .pump_until(RUN_LIMIT, |_| total.load(Ordering::Relaxed) >= all);
        host.join().map_err(|_| "host thread panicked")??;
        if !ok {
            return Err(format!(
                "guest got {} of {all} bytes",
                total.load(Ordering::Relaxed)
            ));
        }
        got.iter()
            .map(|g| g.done.lock().unwrap().expect("every connection finished"))
            .collect()
    } else {
        let data = Aligned::new(CHUNK, TX_PAYLOAD_PAGE_OFFSET);
        let mut left = vec![quota; conns];
        let mut open = conns;
        while open > 0 {
            if Instant::now() >= deadline {
                return Err(format!(
                    "{open} guest connections unsent after {RUN_LIMIT:?}"
                ));
            }
            let mut sent_any = false;
            for (i, &p) in ports.iter().enumerate() {
                if left[i] == 0 {
                    continue;
                }
                let want = left[i].min(CHUNK as u64) as usize;
                let n = rig.g.try_send(p, &data.as_slice()[..want])? as u64;
                left[i] -= n;
                sent_any |= n > 0;
                if n > 0 && left[i] == 0 {
                    open -= 1;
                }
            }
            // Take back TX buffers and credit updates; wait for them when no credit was left.
            let wait = if sent_any { 0 } else { 5 };
            rig.g.pump(Duration::from_millis(wait));
        }
        host.join().map_err(|_| "host thread panicked")??
    };
    let wall = ends.iter().max().map_or(Duration::ZERO, |e| *e - start);
    let cpu = cpu.used();
    if !rig.g.violations.is_empty() {
        return Err(format!("guest saw violations: {:?}", rig.g.violations));
    }
    let rate = |e: &Instant| quota as f64 / (*e - start).as_secs_f64().max(1e-9) / 1e6;
    let rates: Vec<f64> = ends.iter().map(rate).collect();
    let slow = rates.iter().cloned().fold(f64::INFINITY, f64::min);
    let fast = rates.iter().cloned().fold(0.0, f64::max);
    // Issue 14's fairness bar: no connection below half the mean of the connections' rates.
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    Ok(Sample {
        wall,
        amount: all as f64,
        cpu,
        extra: vec![
            ("slowest MB/s", slow),
            ("fastest MB/s", fast),
            ("fast/slow", fast / slow),
            ("mean MB/s", mean),
            ("slowest/mean", slow / mean),
        ],
    })
}
