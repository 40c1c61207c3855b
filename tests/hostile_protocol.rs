//! A hostile guest at the protocol level, and resource bounds. For each abuse: the device stays
//! up, the guest gets the RST or silence the protocol prescribes, other connections keep moving
//! data, and memory and file descriptors stay bounded.

mod common;

use common::{open_fds, rss_kib, setup, setup_with, GUEST};
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

use vsock_router::device::DeviceConfig;
use vsock_router::sim::{PairHost, SimGuest, SockState};
use vsock_router::wire::{op, shutdown, sock_type, Header};

const T: Duration = Duration::from_secs(10);

/// The resource checks read process-wide figures: run this file's tests one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn hdr(src_port: u32, dst_port: u32, op_: u16) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: 2,
        src_port,
        dst_port,
        len: 0,
        type_: sock_type::STREAM,
        op: op_,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn rst_for(g: &mut SimGuest, port: u32) -> bool {
    g.pump_until(T, |g| {
        g.received
            .iter()
            .any(|h| h.op == op::RST && h.dst_port == port)
    })
}

/// A live connection that must keep working through the abuse.
fn bystander(g: &mut SimGuest, host: &PairHost) -> (u32, std::os::unix::net::UnixStream) {
    let p = g.connect(2, 4000).unwrap();
    let (_, s) = host.accept(T).unwrap();
    (p, s)
}

fn check_bystander(g: &mut SimGuest, p: u32, s: &mut std::os::unix::net::UnixStream) {
    g.send(p, b"ping", T).unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    assert_eq!(g.recv_exact(p, 4, T), b"pong");
}

#[test]
fn rw_before_response_and_response_without_request_reset() {
    let _serial = serial();
    let (mut g, dev, host) = setup();
    let (bp, mut bs) = bystander(&mut g, &host);
    // A host-initiated connection the guest answers with RW instead of RESPONSE.
    g.answer_unknown = false;
    let mut s = host.connect(7000, b"");
    let req = g
        .pump_until(T, |g| g.received.iter().any(|h| h.op == op::REQUEST))
        .then(|| *g.received.iter().find(|h| h.op == op::REQUEST).unwrap())
        .unwrap();
    let mut h = hdr(7000, req.src_port, op::RW);
    h.len = 3;
    g.send_packet(&h, b"bad");
    assert!(rst_for(&mut g, 7000));
    s.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0, "the host client is closed");
    // RESPONSE for a connection nobody requested.
    g.send_packet(&hdr(7001, 1234, op::RESPONSE), &[]);
    assert!(rst_for(&mut g, 7001));
    assert!(dev.counters().protocol_error.load(Ordering::Relaxed) >= 1);
    check_bystander(&mut g, bp, &mut bs);
}

#[test]
fn credit_request_storm_is_answered_without_growth() {
    let _serial = serial();
    let (mut g, dev, host) = setup();
    let (bp, mut bs) = bystander(&mut g, &host);
    let rss = rss_kib();
    for _ in 0..20_000 {
        g.send_packet(&hdr(bp, 4000, op::CREDIT_REQUEST), &[]);
    }
    g.pump(Duration::from_millis(100));
    check_bystander(&mut g, bp, &mut bs);
    assert!(dev.is_active());
    assert!(rss_kib() < rss + 16 * 1024, "RSS grew beyond 16 MiB");
}

#[test]
fn shutdown_flags_never_go_back() {
    let _serial = serial();
    let (mut g, _dev, host) = setup();
    let p = g.connect(2, 4100).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    g.shutdown(p, shutdown::SEND);
    let mut v = Vec::new();
    s.set_read_timeout(Some(T)).unwrap();
    s.read_to_end(&mut v).unwrap();
    // "Undo" the SEND shutdown: data after it breaks the protocol and resets.
    let mut h = hdr(p, 4100, op::SHUTDOWN);
    h.flags = shutdown::RCV;
    g.send_packet(&h, &[]);
    let mut h = hdr(p, 4100, op::RW);
    h.len = 4;
    g.send_packet(&h, b"late");
    assert!(rst_for(&mut g, p));
}

#[test]
fn port_reuse_of_a_live_connection_resets_it() {
    let _serial = serial();
    let (mut g, _dev, host) = setup();
    let p = g.connect(2, 4200).unwrap();
    let _s = host.accept(T).unwrap();
    g.send_packet(&hdr(p, 4200, op::REQUEST), &[]);
    assert!(rst_for(&mut g, p));
}

#[test]
fn request_flood_past_the_limit_is_bounded() {
    let _serial = serial();
    let mut cfg = DeviceConfig::new(GUEST);
    cfg.max_connections = 64;
    let (mut g, dev, host) = setup_with(cfg);
    let (bp, mut bs) = bystander(&mut g, &host);
    for i in 0..5000u32 {
        g.send_packet(&hdr(10_000 + i, 80, op::REQUEST), &[]);
        if i % 256 == 0 {
            g.pump(Duration::ZERO);
        }
    }
    g.pump_until(T, |g| {
        g.received.iter().filter(|h| h.op == op::RST).count() >= 4000
    });
    assert!(dev.connections().len() <= 64);
    assert!(dev.counters().conn_limit.load(Ordering::Relaxed) > 0);
    check_bystander(&mut g, bp, &mut bs);
}

#[test]
fn half_open_connections_kept_forever_are_bounded_by_the_limit() {
    let _serial = serial();
    let mut cfg = DeviceConfig::new(GUEST);
    cfg.max_connections = 8;
    let (mut g, dev, host) = setup_with(cfg);
    // Fill the table with connections the guest shuts for sending and then never closes.
    let mut held = Vec::new();
    for i in 0..8u32 {
        let p = g.connect(2, 4300 + i).unwrap();
        let (_, s) = host.accept(T).unwrap();
        g.shutdown(p, shutdown::SEND);
        held.push((p, s));
    }
    // Each host end sees EOF, yet the other direction stays open: legal, so the device keeps
    // them. They hold their slots, so the next connection is refused, not queued.
    for (_, s) in &mut held {
        s.set_read_timeout(Some(T)).unwrap();
        assert_eq!(
            s.read(&mut [0u8; 8]).unwrap(),
            0,
            "host sees the guest's EOF"
        );
    }
    assert_eq!(g.connect(2, 4400), Err(SockState::Reset));
    assert!(dev.counters().conn_limit.load(Ordering::Relaxed) >= 1);
    assert_eq!(dev.connections().len(), 8);
    // Held for a while (no timer reaps a half-open connection) they still carry host data.
    g.pump(Duration::from_millis(300));
    for (p, s) in &mut held {
        s.write_all(b"still here").unwrap();
        assert_eq!(g.recv_exact(*p, 10, T), b"still here");
    }
    // Once the guest lets one go, its slot is free again.
    let (p, _s) = held.pop().unwrap();
    g.send_packet(&hdr(p, 4307, op::RST), &[]);
    assert!(g.pump_until(T, |_| dev.connections().len() == 7));
    let q = g.connect(2, 4401).unwrap();
    let _ = host.accept(T).unwrap();
    assert!(dev.connections().iter().any(|c| c.peer_port == q));
}

#[test]
fn hundred_thousand_hostile_packets_leave_memory_bounded() {
    let _serial = serial();
    let (mut g, dev, host) = setup();
    let (bp, mut bs) = bystander(&mut g, &host);
    // Warm up allocations, then measure.
    let ops = [
        op::RW,
        op::SHUTDOWN,
        op::CREDIT_UPDATE,
        0,
        9,
        op::RESPONSE,
        op::RST,
    ];
    let send_batch = |g: &mut SimGuest, n: u32| {
        for i in 0..n {
            let mut h = hdr(20_000 + (i % 997), 1 + (i % 13), ops[(i % 7) as usize]);
            h.src_cid = if i % 11 == 0 { 99 } else { GUEST };
            h.type_ = if i % 17 == 0 { 7 } else { sock_type::STREAM };
            g.send_packet(&h, &[]);
            if i % 128 == 0 {
                g.pump(Duration::ZERO);
            }
        }
        g.pump(Duration::from_millis(50));
    };
    send_batch(&mut g, 5_000);
    let (rss, fds) = (rss_kib(), open_fds());
    send_batch(&mut g, 100_000);
    let grown = rss_kib().saturating_sub(rss);
    assert!(
        grown < 8 * 1024,
        "RSS grew by {grown} KiB over 100k hostile packets"
    );
    assert_eq!(open_fds(), fds, "no fd leaked");
    assert!(dev.is_active());
    check_bystander(&mut g, bp, &mut bs);
}

#[test]
fn ten_thousand_connect_close_cycles_leak_nothing() {
    let _serial = serial();
    let (mut g, dev, host) = setup();
    g.listen(5000);
    let cycle = |g: &mut SimGuest, i: u32| {
        if i % 2 == 0 {
            let p = g.connect(2, 6000).unwrap();
            let (_, s) = host.accept(T).unwrap();
            assert!(g.close(p, T));
            drop(s);
        } else {
            let s = host.connect(5000, b"");
            let p = g.accept(T).unwrap();
            drop(s);
            g.pump_until(T, |g| {
                g.socks
                    .get(&p)
                    .is_none_or(|s| s.peer_shutdown != 0 || s.state == SockState::Reset)
            });
            g.close(p, T);
        }
    };
    for i in 0..200 {
        cycle(&mut g, i);
    }
    g.pump_until(T, |_| dev.connections().is_empty());
    let (rss, fds) = (rss_kib(), open_fds());
    for i in 0..10_000 {
        cycle(&mut g, i);
    }
    g.pump_until(T, |_| dev.connections().is_empty());
    assert!(dev.connections().is_empty(), "{:?}", dev.connections());
    assert_eq!(open_fds(), fds, "fds back where they started");
    let grown = rss_kib().saturating_sub(rss);
    assert!(grown < 8 * 1024, "RSS grew by {grown} KiB");
    g.received.clear();
}
