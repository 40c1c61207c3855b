//! The device end to end: a simulated Linux guest over real guest memory, the device thread on
//! real EventFds, and real Unix socket pairs as host streams.

mod common;

use common::{setup, setup_features, setup_with, GUEST, STREAM_ONLY_FEATURES};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use vsock_router::device::virtio::VirtioDevice;
use vsock_router::device::{DeviceConfig, VsockDevice};
use vsock_router::sim::{PairBackend, RxLayout, SimGuest, SockState, TxLayout};
use vsock_router::stats::{RstReason, RstState};
use vsock_router::wire::{op, seq, shutdown, sock_type, Header, HEADER_LEN};

const T: Duration = Duration::from_secs(10);

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn hdr(src_port: u32, dst_cid: u64, dst_port: u32, op_: u16) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid,
        src_port,
        dst_port,
        len: 0,
        type_: sock_type::STREAM,
        op: op_,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

/// Waits until the guest received a packet matching `f`.
fn wait_for(g: &mut SimGuest, f: impl Fn(&Header) -> bool) -> Option<Header> {
    let mut found = None;
    g.pump_until(T, |g| {
        found = g.received.iter().find(|h| f(h)).copied();
        found.is_some()
    });
    found
}

#[test]
fn config_space_and_features() {
    let (backend, _host) = PairBackend::new();
    let mut dev = VsockDevice::new(DeviceConfig::new(0x1_0000_0003), backend);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    let mut b8 = [0xffu8; 8];
    dev.read_config(0, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), 0x1_0000_0003);
    let mut b4 = [0u8; 4];
    dev.read_config(0, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 3);
    dev.read_config(4, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 1);
    let mut b2 = [0xffu8; 2];
    dev.read_config(0, &mut b2);
    assert_eq!(b2, [0, 0], "2-byte reads are not allowed");
    dev.read_config(8, &mut b4);
    assert_eq!(b4, [0; 4], "past the config space");
    dev.write_config(0, &[1, 2, 3, 4]);
    assert_eq!(dev.counters().config_writes.load(Ordering::Relaxed), 1);
    let mut b8 = [0u8; 8];
    dev.read_config(0, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), 0x1_0000_0003, "writes are ignored");
    assert!(dev.ack_features(1 << 28).is_err(), "unoffered feature");
    assert!(dev.ack_features(1 << 29).is_err(), "VERSION_1 missing");
    assert!(dev.ack_features((1 << 32) | (1 << 29)).is_ok());
}

#[test]
fn guest_connects_to_host_and_data_flows_both_ways() {
    let (mut g, dev, host) = setup();
    let port = g.connect(2, 1234).expect("connected");
    let (req, mut s) = host.accept(T).expect("host side");
    assert_eq!((req.dst_cid, req.dst_port, req.guest_port), (2, 1234, port));
    g.send(port, b"hello host", T).unwrap();
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    s.write_all(b"hello guest").unwrap();
    assert_eq!(g.recv_exact(port, 11, T), b"hello guest");
    let conns = dev.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].state, "established");
    assert_eq!((conns[0].bytes_to_host, conns[0].bytes_to_guest), (10, 11));
    assert!(g.close(port, T), "device answers close() with RST");
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}

/// The SEQ flags mean nothing on a STREAM connection (the kernel reads them only for
/// SEQPACKET): an RW with EOM and EOR set is plain data, and the connection goes on.
#[test]
fn seq_flags_on_a_stream_connection_are_plain_data() {
    let (mut g, dev, host) = setup();
    let port = g.connect(2, 1234).expect("connected");
    let (_, mut s) = host.accept(T).expect("host side");
    let mut h = hdr(port, 2, 1234, op::RW);
    h.flags = seq::EOM | seq::EOR;
    h.len = 5;
    g.send_packet(&h, b"hello");
    g.send(port, b" world", T).unwrap();
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello world");
    s.write_all(b"back").unwrap();
    assert_eq!(g.recv_exact(port, 4, T), b"back");
    assert_eq!(dev.connections()[0].state, "established");
    assert!(!g.received.iter().any(|h| h.op == op::RST), "no RST");
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}

#[test]
fn host_connects_to_guest_with_ok_reply_and_early_bytes() {
    let (mut g, _dev, host) = setup();
    g.listen(5000);
    let mut s = host.connect(5000, b"sent with CONNECT");
    let port = g.accept(T).expect("accepted");
    let mut line = [0u8; 14];
    s.read_exact(&mut line).unwrap();
    let line = String::from_utf8_lossy(&line).to_string();
    assert!(line.starts_with("OK 1073741"), "{line}");
    assert_eq!(g.recv_exact(port, 17, T), b"sent with CONNECT");
    g.send(port, b"pong", T).unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}

#[test]
fn unanswered_host_request_times_out_and_closes_the_host_stream() {
    let mut cfg = DeviceConfig::new(GUEST);
    cfg.csm.request_timeout = Duration::from_millis(200);
    let (mut g, dev, host) = setup_with(cfg);
    // No listener: the guest answers the REQUEST with RST, the host stream is closed.
    let mut s = host.connect(6000, b"");
    let mut b = [0u8; 1];
    s.set_read_timeout(Some(T)).unwrap();
    g.pump_until(T, |g| g.received.iter().any(|h| h.op == op::REQUEST));
    g.pump(Duration::from_millis(100));
    assert_eq!(s.read(&mut b).unwrap(), 0, "refused: host stream closed");
    // A guest that never answers: stop pumping, let the timer fire.
    let mut s2 = host.connect(6001, b"");
    thread::sleep(Duration::from_millis(400));
    g.pump_until(T, |g| {
        g.received
            .iter()
            .any(|h| h.op == op::RST && h.dst_port == 6001)
    });
    s2.set_read_timeout(Some(T)).unwrap();
    assert_eq!(s2.read(&mut b).unwrap(), 0);
    assert_eq!(dev.counters().timeouts.load(Ordering::Relaxed), 1);
}

fn bulk(layout: TxLayout, size: usize) {
    bulk_with(layout, RxLayout::Whole, size);
}

fn bulk_with(layout: TxLayout, rx: RxLayout, size: usize) {
    let (mut g, _dev, host) = setup();
    g.layout = layout;
    g.rx_layout = rx;
    host.set_socket_buffers(4096);
    let port = g.connect(2, 7000).unwrap();
    let (_, s) = host.accept(T).unwrap();
    let up = pattern(size, 1);
    let down = pattern(size, 2);
    let want_up = Sha256::digest(&up);
    let mut rs = s.try_clone().unwrap();
    let reader = thread::spawn(move || {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 65536];
        let mut n = 0;
        while n < size {
            let k = rs.read(&mut buf).unwrap();
            assert!(k > 0, "early EOF at {n}");
            h.update(&buf[..k]);
            n += k;
        }
        h.finalize()
    });
    let mut ws = s.try_clone().unwrap();
    let down2 = down.clone();
    let writer = thread::spawn(move || ws.write_all(&down2).unwrap());
    // Interleave sending and receiving, as two guest threads would.
    let mut got = Vec::with_capacity(size);
    let mut off = 0;
    while off < size || got.len() < size {
        if off < size {
            let n = (size - off).min(256 * 1024);
            g.send(port, &up[off..off + n], T).unwrap();
            off += n;
        }
        got.extend(g.recv(port, usize::MAX));
        g.pump(Duration::from_millis(1));
    }
    assert_eq!(reader.join().unwrap(), want_up, "guest → host bytes");
    writer.join().unwrap();
    assert_eq!(
        Sha256::digest(&got),
        Sha256::digest(&down),
        "host → guest bytes"
    );
    assert!(g.violations.is_empty(), "{:?}", g.violations);
    // Thousands of RX buffers filled, never one byte past one.
    assert_eq!(g.guards_intact(), Ok(()));
}

#[test]
fn sixteen_mib_each_way_with_small_socket_buffers() {
    bulk(TxLayout::Fragments(vec![1000, 3000]), 16 << 20);
}

#[test]
fn bulk_with_linear_and_split_header_layouts() {
    bulk(TxLayout::Linear, 1 << 20);
    bulk(TxLayout::HeaderThenData, 1 << 20);
    for cut in [1, 8, 24, 43] {
        bulk(TxLayout::SplitHeader(cut), 256 << 10);
    }
}

/// RX buffers as Linux ≤ 6.1 posts them (the kernels of the integration tests' guests): a
/// 44-byte header descriptor chained to a 4 KiB data descriptor. From the first refill on every
/// buffer is split; the device writes the header into the first and the payload into the second,
/// never past the first (the guest checks guard bytes behind it on every buffer).
#[test]
fn bulk_into_linux_6_1_split_rx_buffers() {
    bulk_with(TxLayout::HeaderThenData, RxLayout::Split, 4 << 20);
}

#[test]
fn guest_half_close_reaches_host_as_eof_and_reply_still_flows() {
    let (mut g, _dev, host) = setup();
    let port = g.connect(2, 7100).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    g.send(port, b"request", T).unwrap();
    g.shutdown(port, shutdown::SEND);
    let mut got = Vec::new();
    s.set_read_timeout(Some(T)).unwrap();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request", "host reads the bytes, then EOF");
    s.write_all(b"reply after EOF").unwrap();
    assert_eq!(g.recv_exact(port, 15, T), b"reply after EOF");
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}

#[test]
fn host_half_close_sends_shutdown_send_only() {
    let (mut g, _dev, host) = setup();
    let port = g.connect(2, 7200).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    s.write_all(b"all of it").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(g.recv_exact(port, 100, T), b"all of it");
    let sd = wait_for(&mut g, |h| h.op == op::SHUTDOWN).expect("SHUTDOWN");
    assert_eq!(sd.flags, shutdown::SEND, "EOF is SEND only, not RCV|SEND");
    // The guest → host direction still works.
    g.send(port, b"still open", T).unwrap();
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still open");
    assert!(g.close(port, T));
}

#[test]
fn unknown_connection_bad_type_and_bad_op_get_rst() {
    // A driver that did not acknowledge VIRTIO_VSOCK_F_SEQPACKET: its SEQPACKET REQUEST is a
    // bad type.
    let (mut g, dev, _host) = setup_features(STREAM_ONLY_FEATURES);
    g.send_packet(&hdr(9, 2, 99, op::RW), &[]);
    let r = wait_for(&mut g, |h| h.op == op::RST && h.dst_port == 9).expect("RST");
    assert_eq!((r.src_port, r.buf_alloc, r.fwd_cnt), (99, 0, 0));
    let mut h = hdr(10, 2, 99, op::REQUEST);
    h.type_ = sock_type::SEQPACKET;
    g.send_packet(&h, &[]);
    let r = wait_for(&mut g, |h| h.op == op::RST && h.dst_port == 10).expect("RST for SEQPACKET");
    // The RST says SEQPACKET, as the kernel's does: a driver matches it to its socket by type.
    assert_eq!(r.type_, sock_type::SEQPACKET);
    assert_eq!(
        g.received.iter().find(|h| h.dst_port == 9).map(|h| h.type_),
        Some(sock_type::STREAM)
    );
    g.send_packet(&hdr(11, 2, 99, 42), &[]);
    wait_for(&mut g, |h| h.op == op::RST && h.dst_port == 11).expect("RST for bad op");
    // An RST for an unknown connection is never answered.
    g.send_packet(&hdr(12, 2, 99, op::RST), &[]);
    g.pump(Duration::from_millis(200));
    assert!(!g.received.iter().any(|h| h.dst_port == 12));
    let c = dev.counters();
    assert_eq!(c.unknown_conn.load(Ordering::Relaxed), 1);
    assert_eq!(c.bad_type.load(Ordering::Relaxed), 1);
    assert_eq!(c.bad_op.load(Ordering::Relaxed), 1);
    // The RSTs by reason, and the guest's RST for no connection.
    let snap = c.snapshot();
    let sent = |r: RstReason| snap.rst_sent_by[r as usize];
    assert_eq!(sent(RstReason::UnknownConn), 1);
    assert_eq!(sent(RstReason::Invalid), 2);
    assert_eq!(snap.rst_sent_by.iter().sum::<u64>(), 3);
    assert_eq!(snap.rst_received_by[RstState::Unknown as usize], 1);
}

#[test]
fn spoofed_source_cid_is_dropped_unanswered() {
    let (mut g, dev, host) = setup();
    let mut h = hdr(20, 2, 99, op::REQUEST);
    h.src_cid = 7;
    g.send_packet(&h, &[]);
    g.pump(Duration::from_millis(200));
    assert!(g.received.is_empty(), "no answer to a spoofed packet");
    assert_eq!(host.connects(), 0);
    assert_eq!(dev.counters().spoofed_src.load(Ordering::Relaxed), 1);
}

#[test]
fn credit_overrun_resets_the_connection() {
    let mut cfg = DeviceConfig::new(GUEST);
    cfg.csm.buf_alloc = 8192;
    let (mut g, dev, host) = setup_with(cfg);
    host.set_socket_buffers(4096);
    let port = g.connect(2, 7300).unwrap();
    let (_, _s) = host.accept(T).unwrap();
    // Ignore the advertised credit: send 3 × 4 KiB while the host reads nothing.
    let mut h = hdr(port, 2, 7300, op::RW);
    h.len = 4096;
    let data = pattern(4096, 3);
    for _ in 0..4 {
        g.send_packet(&h, &data);
    }
    let r = wait_for(&mut g, |h| h.op == op::RST && h.dst_port == port).expect("RST");
    assert_eq!(r.src_port, 7300);
    assert_eq!(dev.counters().credit_overrun.load(Ordering::Relaxed), 1);
    assert!(dev.connections().is_empty());
}

#[test]
fn credit_request_is_answered_with_credit_update() {
    let (mut g, _dev, host) = setup();
    let port = g.connect(2, 7400).unwrap();
    let _s = host.accept(T).unwrap();
    g.send_packet(&hdr(port, 2, 7400, op::CREDIT_REQUEST), &[]);
    let u = wait_for(&mut g, |h| h.op == op::CREDIT_UPDATE).expect("update");
    assert_eq!(u.buf_alloc, 256 * 1024);
}

#[test]
fn connection_limit_answers_with_rst_and_frees_up() {
    let mut cfg = DeviceConfig::new(GUEST);
    cfg.max_connections = 4;
    let (mut g, dev, host) = setup_with(cfg);
    let ports: Vec<u32> = (0..4).map(|i| g.connect(2, 8000 + i).unwrap()).collect();
    assert_eq!(g.connect(2, 8100), Err(SockState::Reset));
    assert_eq!(dev.counters().conn_limit.load(Ordering::Relaxed), 1);
    assert!(g.close(ports[0], T));
    assert!(g.connect(2, 8101).is_ok(), "a slot was freed");
    drop(host);
}

#[test]
fn malformed_chains_are_returned_and_the_device_keeps_working() {
    let (mut g, dev, host) = setup();
    let c = dev.counters();
    // len larger than the chain.
    let mut h = hdr(30, 2, 99, op::RW);
    h.len = 1000;
    g.send_packet(&h, &[0u8; 10]);
    // len beyond 64 KiB.
    h.len = 70_000;
    g.send_packet(&h, &[0u8; 10]);
    // A chain shorter than the header.
    let id = g.txq.take_descs(1).unwrap()[0];
    let m = g.mem.clone();
    g.txq.write_desc(
        &m,
        id,
        vsock_router::sim::RawDesc {
            addr: 0x40_0000,
            len: 20,
            flags: 0,
            next: 0,
        },
    );
    g.txq.track(id, &[id]);
    g.txq.publish(&m, id);
    // A write-only descriptor on TX.
    let id = g.txq.take_descs(1).unwrap()[0];
    g.txq.write_desc(
        &m,
        id,
        vsock_router::sim::RawDesc {
            addr: 0x40_0000,
            len: 64,
            flags: 2,
            next: 0,
        },
    );
    g.txq.track(id, &[id]);
    g.txq.publish(&m, id);
    g.kick(1);
    let free_before = g.txq.free_descs();
    assert!(g.pump_until(T, |_| c.malformed_chains.load(Ordering::Relaxed) == 4));
    g.pump_until(T, |g| g.txq.free_descs() == 256);
    assert!(g.txq.free_descs() > free_before, "chains came back");
    assert_eq!(c.bad_len.load(Ordering::Relaxed), 2);
    assert!(g.received.is_empty(), "malformed packets are not answered");
    // Still working.
    let port = g.connect(2, 7500).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    g.send(port, b"ok", T).unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ok");
}

#[test]
fn guest_full_close_with_pending_bytes_flushes_then_resets() {
    let (mut g, _dev, host) = setup();
    host.set_socket_buffers(4096);
    let port = g.connect(2, 7600).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    let data = pattern(100_000, 4);
    g.send(port, &data, T).unwrap();
    g.shutdown(port, shutdown::BOTH);
    let reader = thread::spawn(move || {
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    });
    wait_for(&mut g, |h| h.op == op::RST && h.dst_port == port).expect("RST after flush");
    assert_eq!(reader.join().unwrap(), data);
}

#[test]
fn host_close_with_unflushable_bytes_is_a_close_not_a_reset() {
    let (mut g, dev, host) = setup();
    host.set_socket_buffers(4096);
    let port = g.connect(2, 7700).unwrap();
    let (_, s) = host.accept(T).unwrap();
    drop(s);
    let _ = g.send(port, &pattern(200_000, 5), Duration::from_secs(2));
    // As from a peer kernel's close(): SHUTDOWN with RCV and SEND (the guest's next send()
    // fails with EPIPE), which the guest answers with RST.
    assert!(g.pump_until(T, |g| g.socks[&port].peer_shutdown == shutdown::BOTH));
    assert!(
        !g.received
            .iter()
            .any(|h| h.op == op::RST && h.dst_port == port),
        "the device does not reset a closed connection"
    );
    assert!(g.pump_until(T, |_| dev.connections().is_empty()));
}

#[test]
fn interrupts_are_batched() {
    let (mut g, dev, host) = setup();
    let port = g.connect(2, 7800).unwrap();
    let (_, s) = host.accept(T).unwrap();
    let mut s = s;
    let w = thread::spawn(move || s.write_all(&pattern(1 << 20, 6)).unwrap());
    let got = g.recv_exact(port, 1 << 20, T);
    w.join().unwrap();
    assert_eq!(got.len(), 1 << 20);
    let c = dev.counters();
    let pkts = c.rx_packets.load(Ordering::Relaxed);
    let irqs = c.interrupts.load(Ordering::Relaxed);
    assert!(pkts >= 256, "1 MiB in 4 KiB buffers: {pkts}");
    assert!(
        irqs < pkts,
        "one interrupt per batch, not per packet: {irqs} for {pkts}"
    );
    let _ = HEADER_LEN;
}

#[test]
fn full_close_with_unflushable_bytes_resets_after_the_linger_time() {
    let mut cfg = DeviceConfig::new(GUEST);
    cfg.csm.linger = Duration::from_millis(300);
    let (mut g, dev, host) = setup_with(cfg);
    host.set_socket_buffers(4096);
    let port = g.connect(2, 7900).unwrap();
    // The host never reads: bytes stay in the device's buffer.
    let (_, _s) = host.accept(T).unwrap();
    g.send(port, &pattern(100_000, 7), T).unwrap();
    g.shutdown(port, shutdown::BOTH);
    let start = std::time::Instant::now();
    wait_for(&mut g, |h| h.op == op::RST && h.dst_port == port).expect("RST after linger");
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert!(dev.connections().is_empty());
}

#[test]
fn host_bytes_waiting_for_guest_credit_are_counted_as_credit_stalls() {
    let (mut g, dev, host) = setup();
    // A guest whose receive buffer holds 4 KiB and which does not read at first.
    g.buf_alloc = 4096;
    let port = g.connect(2, 7000).unwrap();
    let (_, s) = host.accept(T).unwrap();
    let data = pattern(64 * 1024, 7);
    let mut w = s.try_clone().unwrap();
    let d2 = data.clone();
    let writer = thread::spawn(move || w.write_all(&d2).unwrap());
    let stalled = g.pump_until(T, |_| {
        dev.counters().credit_stalls.load(Ordering::Relaxed) > 0
    });
    assert!(stalled, "the device never waited for credit");
    // Reading frees credit, and every byte arrives.
    assert_eq!(g.recv_exact(port, data.len(), T), data);
    writer.join().unwrap();
    assert!(dev.counters().credit_stalls.load(Ordering::Relaxed) >= 1);
    drop(s);
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}
