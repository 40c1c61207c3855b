//! TX coalescing (issue 14, docs/performance.md): RW packets of one stream connection that the
//! guest queued one after the other reach the host in one `writev`, with exactly the bytes,
//! order, credit and resets of handling them one by one. The device runs in the test's thread
//! (`RunMode::External`), so a burst is on the ring before the device looks at it.

use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vsock_router::device::{DeviceConfig, VsockDevice};
use vsock_router::sim::{PairBackend, PairHost, SimGuest, SockState, TxLayout};

mod common;
use common::GUEST;

const T: Duration = Duration::from_secs(10);

/// A device run in this thread, on a manual clock.
fn guest(cfg: DeviceConfig) -> (SimGuest, VsockDevice<PairBackend>, PairHost) {
    common::driven_with(cfg, true)
}

/// Chunk `i` of a burst: `len` bytes that differ from every other chunk's.
fn chunk(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| ((i * 31 + j * 7) % 251) as u8).collect()
}

/// `n` chunks of `len` bytes, and the burst that sends them all on `port`.
fn chunks(n: usize, len: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| chunk(i, len)).collect()
}

fn burst_on(port: u32, chunks: &[Vec<u8>]) -> Vec<(u32, &[u8])> {
    chunks.iter().map(|c| (port, &c[..])).collect()
}

fn coalesced(dev: &VsockDevice<PairBackend>) -> u64 {
    dev.counters().tx_coalesced.load(Ordering::Relaxed)
}

/// Reads exactly `n` bytes from the host end, running the device while it waits.
fn host_read(g: &mut SimGuest, s: &mut std::os::unix::net::UnixStream, n: usize) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let ok = g.pump_until(T, |_| {
        while got.len() < n {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(_) => break,
            }
        }
        got.len() >= n
    });
    assert!(ok, "the host got {} of {n} bytes", got.len());
    got
}

#[test]
fn a_burst_of_small_packets_reaches_the_host_in_one_write() {
    let (mut g, dev, host) = guest(DeviceConfig::new(GUEST));
    let port = g.connect(2, 7000).expect("connected");
    let (_, mut s) = host.accept(T).expect("host end");
    let c: Vec<Vec<u8>> = (0..12).map(|i| chunk(i, 100 * (i + 1))).collect();
    let before = coalesced(&dev);
    g.send_burst(&burst_on(port, &c), Duration::from_millis(200));
    let want = c.concat();
    assert_eq!(host_read(&mut g, &mut s, want.len()), want);
    assert_eq!(coalesced(&dev) - before, 11, "12 packets, one write");
    // The connection goes on as before.
    g.send(port, b"after", T).unwrap();
    assert_eq!(host_read(&mut g, &mut s, 5), b"after");
}

#[test]
fn a_short_write_leaves_the_rest_of_the_run_in_order() {
    let (mut g, dev, host) = guest(DeviceConfig::new(GUEST));
    host.set_socket_buffers(4096);
    let port = g.connect(2, 7001).expect("connected");
    let (_, mut s) = host.accept(T).expect("host end");
    let c = chunks(10, 1500);
    g.send_burst(&burst_on(port, &c), Duration::from_millis(200));
    let want = c.concat();
    assert_eq!(host_read(&mut g, &mut s, want.len()), want);
    assert_eq!(coalesced(&dev), 9);
}

#[test]
fn past_the_iovec_limit_the_rest_waits_in_order() {
    let (mut g, dev, host) = guest(DeviceConfig::new(GUEST));
    // 20 data descriptors a packet: ten packets need 200 iovecs, more than one write takes.
    g.layout = TxLayout::Fragments(vec![100; 19]);
    let port = g.connect(2, 7002).expect("connected");
    let (_, mut s) = host.accept(T).expect("host end");
    let c = chunks(10, 2000);
    g.send_burst(&burst_on(port, &c), Duration::from_millis(200));
    let want = c.concat();
    assert_eq!(host_read(&mut g, &mut s, want.len()), want);
    assert_eq!(coalesced(&dev), 9);
}

#[test]
fn interleaved_connections_keep_each_ones_order() {
    let (mut g, dev, host) = guest(DeviceConfig::new(GUEST));
    let a = g.connect(2, 7003).expect("connected");
    let (_, mut sa) = host.accept(T).expect("host end");
    let b = g.connect(2, 7004).expect("connected");
    let (_, mut sb) = host.accept(T).expect("host end");
    let c: Vec<Vec<u8>> = (0..7).map(|i| chunk(i, 300 + i)).collect();
    let order = [a, a, b, a, a, b, b];
    let burst: Vec<(u32, &[u8])> = order.iter().zip(&c).map(|(&p, d)| (p, &d[..])).collect();
    g.send_burst(&burst, Duration::from_millis(200));
    let of = |p: u32| -> Vec<u8> {
        order
            .iter()
            .zip(&c)
            .filter(|(&q, _)| q == p)
            .flat_map(|(_, d)| d.clone())
            .collect()
    };
    let (wa, wb) = (of(a), of(b));
    assert_eq!(host_read(&mut g, &mut sa, wa.len()), wa);
    assert_eq!(host_read(&mut g, &mut sb, wb.len()), wb);
    // Runs: (a a) (b) (a a) (b b).
    assert_eq!(coalesced(&dev), 3);
}

#[test]
fn a_burst_past_the_credit_is_reset_as_packet_by_packet() {
    let mut cfg = DeviceConfig::new(GUEST);
    cfg.csm.buf_alloc = 8192;
    let (mut g, dev, host) = guest(cfg);
    host.set_socket_buffers(4096);
    let port = g.connect(2, 7005).expect("connected");
    let (_, _s) = host.accept(T).expect("host end");
    let data = chunk(0, 4096);
    // 16 KiB against an 8 KiB window while the host reads nothing.
    let burst: Vec<(u32, &[u8])> = (0..4).map(|_| (port, &data[..])).collect();
    g.send_burst(&burst, Duration::from_millis(200));
    assert!(
        g.pump_until(T, |g| g
            .socks
            .get(&port)
            .is_some_and(|s| s.state == SockState::Reset)),
        "the overrun is reset"
    );
    assert_eq!(dev.counters().credit_overrun.load(Ordering::Relaxed), 1);
    assert_eq!(coalesced(&dev), 0, "past the credit, packet by packet");
    assert!(dev.connections().is_empty());
}
