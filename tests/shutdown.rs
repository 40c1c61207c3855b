//! Shutdown and close on the stream paths (host Unix sockets; the uplink and `listen=` run the
//! same code over AF_VSOCK): each row of the mapping in docs/routing.md, with the simulated
//! guest on one side and a real Unix socket on the other, checked the way a peer kernel would
//! behave. The sibling path, where packets cross unchanged, is tested in `tests/relay.rs`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::setup;
use vsock_router::sim::{SimGuest, SockState};
use vsock_router::wire::{op, shutdown, Header};

const T: Duration = Duration::from_secs(10);

/// The SHUTDOWN packets the guest received on `port`, oldest first, with their position in
/// the guest's packet log.
fn shutdowns(g: &SimGuest, port: u32) -> Vec<(usize, Header)> {
    g.received
        .iter()
        .enumerate()
        .filter(|(_, h)| h.op == op::SHUTDOWN && h.dst_port == port)
        .map(|(i, h)| (i, *h))
        .collect()
}

fn device_reset(g: &SimGuest, port: u32) -> bool {
    g.received
        .iter()
        .any(|h| h.op == op::RST && h.dst_port == port)
}

/// Writes to `s` until a write fails, bounded by `T`; returns that error.
fn write_until_error(s: &mut UnixStream) -> std::io::Error {
    s.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + T;
    loop {
        assert!(Instant::now() < deadline, "writes kept succeeding");
        match s.write(b"x") {
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return e,
        }
    }
}

#[test]
fn guest_shutdown_send_is_eof_on_the_host_which_can_still_send() {
    let (mut g, _dev, host) = setup();
    let port = g.connect(2, 7000).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    g.send(port, b"question", T).unwrap();
    g.shutdown(port, shutdown::SEND);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(
        got, b"question",
        "the host reads the bytes, then end of stream"
    );
    s.write_all(b"answer").unwrap();
    assert_eq!(g.recv_exact(port, 6, T), b"answer");
    assert!(shutdowns(&g, port).is_empty(), "the host still sends");
    assert!(!device_reset(&g, port));
}

#[test]
fn guest_shutdown_rcv_makes_host_writes_fail_with_epipe() {
    let (mut g, _dev, host) = setup();
    let port = g.connect(2, 7001).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    g.shutdown(port, shutdown::RCV);
    g.pump(Duration::from_millis(50));
    let e = write_until_error(&mut s);
    assert_eq!(e.raw_os_error(), Some(libc::EPIPE), "{e}");
    // The other direction is untouched.
    g.send(port, b"still flowing", T).unwrap();
    s.set_nonblocking(false).unwrap();
    let mut b = [0u8; 13];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still flowing");
    assert!(!device_reset(&g, port));
}

#[test]
fn host_shutdown_write_is_shutdown_send_only_and_the_guest_can_still_send() {
    let (mut g, _dev, host) = setup();
    let port = g.connect(2, 7002).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    s.write_all(b"last words").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(g.recv_exact(port, 64, T), b"last words");
    assert!(g.pump_until(T, |g| g.socks[&port].peer_shutdown != 0));
    g.pump(Duration::from_millis(100));
    assert_eq!(
        g.socks[&port].peer_shutdown,
        shutdown::SEND,
        "a peer that still receives: SEND only"
    );
    let sd = shutdowns(&g, port);
    assert_eq!(sd.len(), 1);
    assert_eq!(sd[0].1.flags, shutdown::SEND);
    g.send(port, b"reply", T).unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"reply");
    assert!(!device_reset(&g, port));
}

#[test]
fn host_shutdown_read_reaches_the_guest_as_shutdown_rcv_and_bytes_still_flow_to_it() {
    let (mut g, dev, host) = setup();
    let port = g.connect(2, 7003).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    s.shutdown(Shutdown::Read).unwrap();
    // AF_UNIX reports a peer's read shutdown to nobody: the guest learns it at its next send.
    let _ = g.send(port, b"nobody reads this", T);
    assert!(g.pump_until(T, |g| g.socks[&port].peer_shutdown & shutdown::RCV != 0));
    assert_eq!(g.socks[&port].peer_shutdown, shutdown::RCV, "RCV only");
    assert!(!device_reset(&g, port), "not a reset");
    s.write_all(b"but I still talk").unwrap();
    assert_eq!(g.recv_exact(port, 16, T), b"but I still talk");
    let dropped = dev
        .counters()
        .host_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    // The connection is still alive: the counter moves when it is removed.
    assert_eq!(dropped, 0);
    drop(s);
    assert!(g.pump_until(T, |g| g.socks[&port].peer_shutdown == shutdown::BOTH));
    assert!(g.pump_until(T, |_| dev.connections().is_empty()));
    assert_eq!(
        dev.counters()
            .host_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn host_close_is_one_shutdown_with_both_flags_after_the_last_byte() {
    let (mut g, dev, host) = setup();
    let port = g.connect(2, 7004).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    s.write_all(&data).unwrap();
    drop(s);
    assert_eq!(g.recv_exact(port, data.len() + 1, T), data);
    assert!(g.pump_until(T, |g| g.socks[&port].peer_shutdown == shutdown::BOTH));
    let sd = shutdowns(&g, port);
    assert_eq!(
        sd.len(),
        1,
        "one SHUTDOWN, as a peer kernel's close() sends"
    );
    assert_eq!(sd[0].1.flags, shutdown::BOTH);
    let last_rw = g
        .received
        .iter()
        .rposition(|h| h.op == op::RW && h.dst_port == port)
        .unwrap();
    assert!(sd[0].0 > last_rw, "after the last byte");
    // The guest answers with RST, as Linux does; the device never sent one.
    assert!(g.pump_until(T, |_| dev.connections().is_empty()));
    assert!(!device_reset(&g, port));
}

#[test]
fn host_close_with_guest_bytes_unread_is_a_close_not_a_reset() {
    let (mut g, dev, host) = setup();
    let port = g.connect(2, 7005).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    g.send(port, &[7u8; 1000], T).unwrap();
    // Wait until the bytes sit unread in the host's socket, then answer and close: AF_UNIX
    // reports ECONNRESET to our side, which is still a close.
    let mut peek = [0u8; 1000];
    s.set_read_timeout(Some(T)).unwrap();
    let mut have = 0;
    while have < 1000 {
        // SAFETY: `peek` is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                peek.as_mut_ptr().cast(),
                peek.len(),
                libc::MSG_PEEK,
            )
        };
        assert!(n > 0);
        have = n as usize;
    }
    s.write_all(b"bye").unwrap();
    drop(s);
    assert_eq!(g.recv_exact(port, 4, T), b"bye");
    assert!(g.pump_until(T, |g| g.socks[&port].peer_shutdown == shutdown::BOTH));
    assert!(!device_reset(&g, port));
    assert!(g.pump_until(T, |_| dev.connections().is_empty()));
    assert_eq!(
        dev.counters()
            .host_error
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn a_host_that_closes_after_its_eof_reaches_the_guest_as_shutdown_rcv_at_once() {
    // On one kernel the peer's close() after its shutdown(SHUT_WR) sends SHUTDOWN(RCV|SEND):
    // the guest's next send() fails with EPIPE at once. The device no longer reads a stream at
    // its end; the hang-up tells it, without the guest having to send first.
    let (mut g, _dev, host) = setup();
    let port = g.connect(2, 7010).unwrap();
    let (_, s) = host.accept(T).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert!(g.pump_until(T, |g| g.socks[&port].peer_shutdown == shutdown::SEND));
    g.pump(Duration::from_millis(50));
    drop(s);
    assert!(g.pump_until(T, |g| g.socks[&port].peer_shutdown == shutdown::BOTH));
    let sd = shutdowns(&g, port);
    assert_eq!(
        sd.iter().map(|(_, h)| h.flags).collect::<Vec<_>>(),
        [shutdown::SEND, shutdown::BOTH]
    );
    assert!(!device_reset(&g, port), "a close, not a reset");
    assert!(g.close(port, T));
}

#[test]
fn after_the_guest_shut_receiving_a_host_close_arrives_through_the_hang_up() {
    let (mut g, dev, host) = setup();
    let port = g.connect(2, 7006).unwrap();
    let (_, s) = host.accept(T).unwrap();
    g.shutdown(port, shutdown::RCV);
    g.pump(Duration::from_millis(50));
    drop(s);
    // The device no longer reads the stream; only the hang-up tells it.
    assert!(g.pump_until(T, |g| g.socks[&port].peer_shutdown == shutdown::BOTH));
    assert!(!device_reset(&g, port));
    assert!(g.pump_until(T, |_| dev.connections().is_empty()));
}

#[test]
fn guest_close_flushes_then_resets_and_the_host_sees_eof_and_epipe() {
    let (mut g, dev, host) = setup();
    let port = g.connect(2, 7007).unwrap();
    let (_, mut s) = host.accept(T).unwrap();
    g.send(port, b"goodbye", T).unwrap();
    assert!(g.close(port, T), "the device answers the close with RST");
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"goodbye");
    let e = write_until_error(&mut s);
    assert_eq!(e.raw_os_error(), Some(libc::EPIPE), "{e}");
    assert!(dev.connections().is_empty());
    assert_eq!(
        g.socks.get(&port).map(|s| s.state),
        None,
        "closed on the guest side"
    );
    let _ = SockState::Reset;
}
