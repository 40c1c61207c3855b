//! Request/response round trips: the guest sends 64 bytes, the host answers 64 bytes, the guest
//! waits for them; one connection, one request in flight.

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use crate::cpu::CpuProbe;
use crate::rig::{Kind, Rig};
use crate::{Sample, RUN_LIMIT};

/// Bytes of a request and of a response.
pub const MSG: usize = 64;

/// `count` round trips over one connection of a fresh device.
pub fn run(kind: Kind, count: u64) -> Result<Sample, String> {
    let mut rig = Rig::new(kind, 256 * 1024)?;
    let (port, mut s) = rig.connect(9100)?;
    s.set_read_timeout(Some(RUN_LIMIT))
        .map_err(|e| e.to_string())?;
    let server = thread::spawn(move || -> Result<(), String> {
        let mut buf = [0u8; MSG];
        for _ in 0..count {
            s.read_exact(&mut buf)
                .map_err(|e| format!("host read: {e}"))?;
            buf[0] = buf[0].wrapping_add(1);
            s.write_all(&buf).map_err(|e| format!("host write: {e}"))?;
        }
        Ok(())
    });
    let cpu = CpuProbe::start(rig.device);
    let start = Instant::now();
    let deadline = start + RUN_LIMIT;
    let mut req = [0x5au8; MSG];
    let mut resp = [0u8; MSG];
    for i in 0..count {
        req[0] = i as u8;
        let left = deadline.saturating_duration_since(Instant::now());
        rig.g.send(port, &req, left)?;
        let mut got = 0;
        while got < MSG {
            if Instant::now() >= deadline {
                return Err(format!("round trip {i}: no answer in {RUN_LIMIT:?}"));
            }
            let n = rig.g.recv_into(port, &mut resp[got..]);
            if n == 0 {
                rig.g.pump(Duration::from_millis(10));
            }
            got += n;
        }
        if resp[0] != req[0].wrapping_add(1) {
            return Err(format!("round trip {i}: wrong answer"));
        }
    }
    let wall = start.elapsed();
    let cpu = cpu.used();
    server.join().map_err(|_| "server panicked")??;
    if !rig.g.violations.is_empty() {
        return Err(format!("guest saw violations: {:?}", rig.g.violations));
    }
    Ok(Sample {
        wall,
        amount: count as f64,
        cpu,
        extra: vec![("irqs/rt", rig.g.interrupts as f64 / count as f64)],
    })
}
