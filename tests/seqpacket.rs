//! SOCK_SEQPACKET through the real device path: a simulated Linux driver that acknowledged
//! VIRTIO_VSOCK_F_SEQPACKET on one side, real `SOCK_SEQPACKET` Unix socket pairs on the host
//! side. Every message must arrive whole, once, in order, with its EOR flag where the host
//! socket can carry one; credit as for streams; what cannot be delivered whole is reset, never
//! cut.

mod common;

use common::{setup, setup_features, GUEST, STREAM_ONLY_FEATURES};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vsock_router::device::virtio::VirtioDevice;
use vsock_router::seam::SockType;
use vsock_router::sim::{SimGuest, SockState};
use vsock_router::wire::{op, seq, shutdown, sock_type, Header};

const T: Duration = Duration::from_secs(10);

/// A message of `len` bytes whose content depends on `seed`.
fn msg(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Reads one message from a host-side SOCK_SEQPACKET socket (blocking, bounded by `T`), with
/// `MSG_TRUNC` so that a longer message than the buffer would show.
fn host_recv(s: &UnixStream) -> Vec<u8> {
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf = vec![0u8; 512 * 1024];
    // SAFETY: `buf` is valid for writes of its length during the call.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
        )
    };
    assert!(n >= 0, "recv: {}", std::io::Error::last_os_error());
    let n = n as usize;
    assert!(n <= buf.len(), "message cut");
    buf.truncate(n);
    buf
}

/// Compares a received message with the one sent, without printing them.
#[track_caller]
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: differs at byte {i} of {}", want.len());
    }
}

fn assert_clean(g: &SimGuest) {
    assert!(g.violations.is_empty(), "{:?}", g.violations);
    g.guards_intact().unwrap();
}

#[test]
fn the_device_offers_seqpacket_and_a_stream_only_driver_gets_rst_for_it() {
    let (g, dev, host) = setup_features(STREAM_ONLY_FEATURES);
    assert_ne!(dev.avail_features() & (1 << 1), 0, "F_SEQPACKET offered");
    assert_eq!(dev.acked_features() & (1 << 1), 0);
    // A host-initiated SEQPACKET connection never reaches a driver that cannot take it.
    let mut g = g;
    g.listen(7000);
    let mut h = host.connect_seq(7000);
    g.pump(Duration::from_millis(300));
    assert!(
        !g.received.iter().any(|p| p.op == op::REQUEST),
        "no REQUEST offered: {:?}",
        g.received
    );
    assert_eq!(dev.counters().bad_type.load(Ordering::Relaxed), 1);
    h.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(h.read(&mut b).unwrap(), 0, "the host client is closed");
    assert_clean(&g);
}

#[test]
fn guest_messages_reach_the_host_whole_and_in_order() {
    let (mut g, dev, host) = setup();
    let port = g.connect_seq(2, 5000).expect("connected");
    let (req, s) = host.accept(T).expect("host side");
    assert_eq!(req.sock_type, SockType::Seqpacket);
    // One packet, several packets (64 KiB each and a tail), one byte, empty-free.
    let sizes = [1usize, 100, 4096, 65536, 65537, 200_000, 7];
    for (i, &n) in sizes.iter().enumerate() {
        g.send_msg(port, &msg(i as u8, n), i % 2 == 0, T).unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        same(&host_recv(&s), &msg(i as u8, n), &format!("message {i}"));
    }
    let conns = dev.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].sock_type, SockType::Seqpacket);
    assert_eq!(conns[0].messages_to_host, sizes.len() as u64);
    let total: usize = sizes.iter().sum();
    assert_eq!(conns[0].bytes_to_host, total as u64);
    // Every packet of the connection was of its type, and the device's RESPONSE too.
    assert!(g
        .received
        .iter()
        .filter(|h| h.dst_port == port)
        .all(|h| h.type_ == sock_type::SEQPACKET));
    assert!(g.close(port, T));
    g.pump(Duration::from_millis(100));
    let c = dev.counters();
    assert_eq!(c.ended_seqpacket_conns.load(Ordering::Relaxed), 1);
    assert_eq!(c.ended_stream_conns.load(Ordering::Relaxed), 0);
    assert_eq!(
        c.ended_messages_to_host.load(Ordering::Relaxed),
        sizes.len() as u64
    );
    assert_clean(&g);
}

#[test]
fn messages_wait_whole_while_the_host_does_not_read() {
    let (mut g, _dev, host) = setup();
    let port = g.connect_seq(2, 5001).expect("connected");
    let (_, s) = host.accept(T).expect("host side");
    // Far more than the host socket buffers: the rest waits in the device, within the credit
    // the guest honours; every message keeps its boundary.
    let count = 60;
    let size = 9000;
    let mut sent = 0;
    for i in 0..count {
        // Linux's sendmsg() would block here until the whole message had credit.
        g.pump(Duration::from_millis(20));
        if (g.socks[&port].peer_credit() as usize) < size {
            break;
        }
        g.send_msg(port, &msg(i as u8, size), false, T).unwrap();
        sent += 1;
    }
    assert!(sent < count, "the credit stopped the guest");
    assert!(sent > 20, "{sent} messages before the credit ran out");
    // The host reads them all, in order, each whole; then the guest sends the rest.
    for i in 0..sent {
        same(&host_recv(&s), &msg(i as u8, size), &format!("message {i}"));
    }
    g.pump(Duration::from_millis(50));
    for i in sent..count {
        g.send_msg(port, &msg(i as u8, size), false, T).unwrap();
        same(&host_recv(&s), &msg(i as u8, size), &format!("message {i}"));
    }
    assert_clean(&g);
}

#[test]
fn host_messages_reach_the_guest_whole_with_eom_on_the_last_packet() {
    let (mut g, dev, host) = setup();
    let port = g.connect_seq(2, 5002).expect("connected");
    let (_, mut s) = host.accept(T).expect("host side");
    // Smaller than an RX buffer, exactly one, several, and more than the guest's credit at once
    // is not possible (the guest's buffer is 256 KiB): up to 200 KB.
    let sizes = [1usize, 4096, 4097, 65536, 100_000, 200_000, 3];
    for (i, &n) in sizes.iter().enumerate() {
        s.write_all(&msg(i as u8, n)).unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        let (got, eor) = g.recv_msg(port, T).unwrap_or_else(|| {
            let tail: Vec<_> = g.received.iter().rev().take(4).collect();
            panic!(
                "message {i} never came; guest: {:?}, state {:?}, credit {}, last {tail:?}",
                g.violations,
                g.socks.get(&port).map(|s| s.state),
                g.socks.get(&port).map_or(0, |s| s.peer_credit())
            )
        });
        same(&got, &msg(i as u8, n), &format!("message {i}"));
        assert!(!eor, "AF_UNIX carries no MSG_EOR");
    }
    // EOM marks exactly the last packet of each message.
    let rws: Vec<&Header> = g
        .received
        .iter()
        .filter(|h| h.dst_port == port && h.op == op::RW)
        .collect();
    let eoms = rws.iter().filter(|h| h.flags & seq::EOM != 0).count();
    assert_eq!(eoms, sizes.len());
    assert!(
        rws.len() > sizes.len(),
        "long messages took several packets"
    );
    let conns = dev.connections();
    assert_eq!(conns[0].messages_to_guest, sizes.len() as u64);
    // End of stream from the host: SHUTDOWN(SEND) after the last message.
    s.shutdown(Shutdown::Write).unwrap();
    g.pump_until(T, |g| {
        g.received
            .iter()
            .any(|h| h.dst_port == port && h.op == op::SHUTDOWN)
    });
    assert!(g.recv_msg(port, Duration::from_millis(100)).is_none());
    // Nothing was sent to the host to find that out (a zero-length send, the stream probe for
    // a peer that stopped receiving, would be an empty message here).
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 16];
    let e = s.read(&mut b).unwrap_err();
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::WouldBlock,
        "no message for the host"
    );
    // A host that closes after its EOF: the guest sees RCV too.
    drop(s);
    g.pump_until(T, |g| g.socks[&port].peer_shutdown == shutdown::BOTH);
    assert_eq!(g.socks[&port].peer_shutdown, shutdown::BOTH);
    assert_clean(&g);
}

#[test]
fn a_host_message_longer_than_the_guests_buffer_resets_the_connection() {
    let (mut g, dev, host) = setup();
    g.buf_alloc = 64 * 1024;
    let port = g.connect_seq(2, 5003).expect("connected");
    let (_, mut s) = host.accept(T).expect("host side");
    s.write_all(&msg(1, 1000)).unwrap();
    assert_eq!(g.recv_msg(port, T).expect("small message").0, msg(1, 1000));
    s.write_all(&msg(2, 100_000)).unwrap();
    g.pump_until(T, |g| {
        g.socks
            .get(&port)
            .is_none_or(|s| s.state == SockState::Reset)
    });
    assert_eq!(g.socks[&port].state, SockState::Reset, "never cut: reset");
    let delivered: u64 = g
        .received
        .iter()
        .filter(|h| h.dst_port == port && h.op == op::RW)
        .map(|h| u64::from(h.len))
        .sum();
    assert_eq!(
        delivered, 1000,
        "nothing of the long message reached the guest"
    );
    g.pump(Duration::from_millis(100));
    assert_eq!(dev.counters().host_error.load(Ordering::Relaxed), 1);
    assert_clean(&g);
}

#[test]
fn a_host_initiated_seqpacket_connection_gets_its_ok_as_one_message() {
    let (mut g, dev, host) = setup();
    g.listen(6000);
    let s = host.connect_seq(6000);
    let port = g.accept(T).expect("accepted");
    assert_eq!(g.socks[&port].sock_type, sock_type::SEQPACKET);
    let ok = host_recv(&s);
    assert!(ok.starts_with(b"OK ") && ok.ends_with(b"\n"), "{ok:?}");
    // Messages both ways right after it.
    g.send_msg(port, b"from the guest", true, T).unwrap();
    assert_eq!(host_recv(&s), b"from the guest");
    (&s).write_all(b"from the host").unwrap();
    assert_eq!(g.recv_msg(port, T).unwrap().0, b"from the host");
    let conns = dev.connections();
    assert_eq!(conns[0].sock_type, SockType::Seqpacket);
    assert!(!conns[0].guest_initiated);
    assert_eq!(
        (conns[0].messages_to_host, conns[0].messages_to_guest),
        (1, 1),
        "the OK line is not the guest's message"
    );
    assert_clean(&g);
}

#[test]
fn an_unfinished_message_is_dropped_when_the_guest_shuts_its_sending_side() {
    let (mut g, _dev, host) = setup();
    let port = g.connect_seq(2, 5004).expect("connected");
    let (_, s) = host.accept(T).expect("host side");
    g.send_msg(port, b"whole", false, T).unwrap();
    // The first packet of a message whose last packet never comes.
    let h = Header {
        src_cid: GUEST,
        dst_cid: 2,
        src_port: port,
        dst_port: 5004,
        len: 4,
        type_: sock_type::SEQPACKET,
        op: op::RW,
        flags: 0,
        buf_alloc: g.buf_alloc,
        fwd_cnt: 0,
    };
    g.send_packet(&h, b"part");
    g.shutdown(port, vsock_router::wire::shutdown::SEND);
    assert_eq!(host_recv(&s), b"whole");
    s.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(
        (&s).read(&mut b).unwrap(),
        0,
        "end of stream, no partial message"
    );
    assert_clean(&g);
}

#[test]
fn a_packet_of_the_other_type_on_a_live_connection_is_reset() {
    let (mut g, dev, host) = setup();
    let port = g.connect_seq(2, 5005).expect("connected");
    let (_, _s) = host.accept(T).expect("host side");
    let h = Header {
        src_cid: GUEST,
        dst_cid: 2,
        src_port: port,
        dst_port: 5005,
        len: 3,
        type_: sock_type::STREAM,
        op: op::RW,
        flags: 0,
        buf_alloc: g.buf_alloc,
        fwd_cnt: 0,
    };
    g.send_packet(&h, b"abc");
    g.pump_until(T, |g| g.socks[&port].state == SockState::Reset);
    assert_eq!(g.socks[&port].state, SockState::Reset);
    g.pump(Duration::from_millis(100));
    assert_eq!(dev.counters().protocol_error.load(Ordering::Relaxed), 1);
}

#[test]
fn streams_and_seqpacket_connections_side_by_side() {
    let (mut g, _dev, host) = setup();
    let sp = g.connect_seq(2, 5006).expect("seqpacket");
    let (r1, s1) = host.accept(T).unwrap();
    let st = g.connect(2, 5007).expect("stream");
    let (r2, mut s2) = host.accept(T).unwrap();
    assert_eq!(
        (r1.sock_type, r2.sock_type),
        (SockType::Seqpacket, SockType::Stream)
    );
    for i in 0..20u8 {
        g.send_msg(sp, &msg(i, 3000), false, T).unwrap();
        g.send(st, &msg(i, 3000), T).unwrap();
    }
    let mut all = vec![0u8; 60_000];
    s2.read_exact(&mut all).unwrap();
    for i in 0..20u8 {
        same(&host_recv(&s1), &msg(i, 3000), "seqpacket message");
        same(
            &all[i as usize * 3000..][..3000],
            &msg(i, 3000),
            "stream bytes",
        );
    }
    // Stream RW packets carry no SEQ flags.
    s2.write_all(b"stream bytes").unwrap();
    assert_eq!(g.recv_exact(st, 12, T), b"stream bytes");
    assert_clean(&g);
}

#[test]
fn a_guest_with_many_small_messages_waiting_is_told_there_is_no_room_and_then_there_is() {
    let (mut g, dev, host) = setup();
    host.set_socket_buffers(4096);
    let port = g.connect_seq(2, 5010).expect("connected");
    let (_, s) = host.accept(T).expect("host side");
    // One-byte messages cost one byte of credit each: without the window closing, a quarter of
    // a million could wait in the device.
    let mut sent = 0u32;
    while sent < 5000 {
        let m = [sent as u8];
        if g.send_msg(port, &m, false, Duration::from_millis(200))
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    assert!(
        (1025..5000).contains(&sent),
        "the window closed after {sent} waiting messages"
    );
    assert_eq!(g.socks[&port].peer_credit(), 0);
    // The host reads; the device tells the guest the whole buffer is free again.
    for i in 0..sent {
        same(&host_recv(&s), &[i as u8], &format!("message {i}"));
    }
    assert!(g.pump_until(T, |g| g.socks[&port].peer_credit() > 128 * 1024));
    g.send_msg(port, b"more", false, T).unwrap();
    same(&host_recv(&s), b"more", "after the window opened");
    assert_eq!(dev.counters().credit_overrun.load(Ordering::Relaxed), 0);
    assert_clean(&g);
}

#[test]
fn a_guest_that_ignores_the_closed_window_is_reset() {
    let (mut g, dev, host) = setup();
    host.set_socket_buffers(4096);
    let port = g.connect_seq(2, 5011).expect("connected");
    let (_, _s) = host.accept(T).expect("host side");
    // Raw one-byte messages, never looking at the credit the device advertises.
    let mut h = Header {
        src_cid: GUEST,
        dst_cid: 2,
        src_port: port,
        dst_port: 5011,
        len: 1,
        type_: sock_type::SEQPACKET,
        op: op::RW,
        flags: seq::EOM,
        buf_alloc: g.buf_alloc,
        fwd_cnt: 0,
    };
    let mut n = 0;
    while n < 20_000 && g.socks[&port].state != SockState::Reset {
        h.fwd_cnt = g.socks[&port].fwd_cnt;
        g.send_packet(&h, b"x");
        n += 1;
        if n % 256 == 0 {
            g.pump(Duration::ZERO);
        }
    }
    g.pump_until(T, |g| g.socks[&port].state == SockState::Reset);
    assert_eq!(g.socks[&port].state, SockState::Reset, "after {n} messages");
    assert!(
        n > 16 * 1024,
        "reset after {n} messages, not before the limit"
    );
    g.pump(Duration::from_millis(100));
    assert_eq!(dev.counters().credit_overrun.load(Ordering::Relaxed), 1);
}
