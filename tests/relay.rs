//! Siblings see each other as two guests on one kernel do: two devices in one process, each with
//! a simulated Linux guest, joined by the CID registry, whose link relays every packet. Close,
//! half-close each way, RST, credit and port reuse are checked packet by packet; the kernel's own
//! conformance suite runs the same rules between real guests (integration/tests/conformance.rs).
//! The second half plays the sibling device by hand on a socket pair, to force event orders and
//! to send what no honest device sends.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{setup, TempDir, GUEST};
use vsock_router::config::VsockConfig;
use vsock_router::device::{DeviceConfig, VsockDevice};
use vsock_router::router::connector::Router;
use vsock_router::router::Policy;
use vsock_router::sim::{SimGuest, SockState, LINUX_FEATURES};
use vsock_router::wire::{op, seq, shutdown, sock_type, Header, HEADER_LEN};

const T: Duration = Duration::from_secs(10);
const A: u64 = 3;
const B: u64 = 5;

type Job = Box<dyn FnOnce(&mut SimGuest) + Send>;

/// A simulated guest on its own thread, pumping all the time, that runs what it is asked to.
struct Remote {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Remote {
    fn new(mut g: SimGuest) -> Remote {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = thread::spawn(move || loop {
            match rx.try_recv() {
                Ok(job) => job(&mut g),
                Err(mpsc::TryRecvError::Empty) => {
                    g.pump(Duration::from_millis(1));
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        });
        Remote {
            jobs: Some(tx),
            thread: Some(thread),
        }
    }

    /// Runs `f` on the guest's thread and returns its result.
    fn call<R: Send + 'static>(&self, f: impl FnOnce(&mut SimGuest) -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .unwrap()
            .send(Box::new(move |g| {
                let _ = tx.send(f(g));
            }))
            .unwrap();
        rx.recv_timeout(Duration::from_secs(60))
            .expect("guest thread answers")
    }

    /// Pumps until `done` holds (bounded by `T`); returns whether it did.
    fn until(&self, done: impl FnMut(&mut SimGuest) -> bool + Send + 'static) -> bool {
        self.call(move |g| g.pump_until(T, done))
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Siblings {
    _dir: TempDir,
    a: SimGuest,
    dev_a: VsockDevice<Router>,
    b: Remote,
    dev_b: VsockDevice<Router>,
}

/// Guest A (CID 3) in this thread and guest B (CID 5, listening on 9000) on its own, each on a
/// device of its own, siblings through one registry.
fn siblings(name: &str, b_setup: impl FnOnce(&mut SimGuest)) -> Siblings {
    siblings_with(name, LINUX_FEATURES, b_setup)
}

/// [`siblings`] with B's driver acknowledging only `b_features`.
fn siblings_with(name: &str, b_features: u64, b_setup: impl FnOnce(&mut SimGuest)) -> Siblings {
    let dir = TempDir::new(name);
    let reg = dir.path("registry");
    let device = |cid: u64| {
        let cfg: VsockConfig = format!(
            "cid={cid},socket={},uplink=none,registry={}",
            dir.path(&format!("vm{cid}.sock")).display(),
            reg.display()
        )
        .parse()
        .unwrap();
        let router = Router::new(&cfg, Arc::new(Policy::new(true))).unwrap();
        let features = if cid == B { b_features } else { LINUX_FEATURES };
        SimGuest::with_device_features(DeviceConfig::new(cid), router, features)
    };
    let (a, dev_a) = device(A);
    let (mut b, dev_b) = device(B);
    b.listen(9000);
    b_setup(&mut b);
    Siblings {
        _dir: dir,
        a,
        dev_a,
        b: Remote::new(b),
        dev_b,
    }
}

impl Siblings {
    /// A connects from its port `local` to B's port 9000, which B accepts; returns `local`.
    fn connect(&mut self, local: u32) -> u32 {
        assert_eq!(self.a.connect_from(local, B, 9000), Ok(local));
        let p = self.b.call(|g| g.accept(T)).expect("B accepts");
        assert_eq!(p, 9000, "B's socket is its port 9000");
        local
    }

    /// Both tables are empty (bounded wait).
    fn all_gone(&mut self) -> bool {
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            self.a.pump(Duration::from_millis(5));
            if self.dev_a.connections().is_empty() && self.dev_b.connections().is_empty() {
                return true;
            }
        }
        false
    }
}

/// The SHUTDOWN packets a guest received on `port`.
fn shutdown_flags(g: &SimGuest, port: u32) -> Vec<u32> {
    g.received
        .iter()
        .filter(|h| h.op == op::SHUTDOWN && h.dst_port == port)
        .map(|h| h.flags)
        .collect()
}

#[test]
fn a_close_reaches_the_sibling_as_one_shutdown_with_both_flags_after_the_last_byte() {
    // The kernel suite's "client close": after the peer's close, send() fails with EPIPE,
    // which Linux decides from the peer's RCV flag, and the byte sent before still arrives.
    let mut s = siblings("client-close", |_| {});
    let pa = s.connect(50_000);
    s.a.send(pa, &[1], T).unwrap();
    assert!(
        s.a.close(pa, T),
        "A's close is answered with RST, by B's kernel"
    );
    let (flags, got, rw_before) = s.b.call(|g| {
        g.pump_until(T, |g| g.socks[&9000].state == SockState::Reset);
        let rw = g
            .received
            .iter()
            .position(|h| h.op == op::RW && h.dst_port == 9000);
        let sd = g
            .received
            .iter()
            .position(|h| h.op == op::SHUTDOWN && h.dst_port == 9000);
        (
            shutdown_flags(g, 9000),
            g.recv(9000, 16),
            rw.zip(sd).is_some_and(|(r, s)| r < s),
        )
    });
    assert_eq!(
        flags,
        vec![shutdown::BOTH],
        "one SHUTDOWN with RCV and SEND"
    );
    assert_eq!(got, [1], "the byte before the close");
    assert!(rw_before, "data first, then the SHUTDOWN");
    assert!(s.all_gone());
}

#[test]
fn a_sibling_close_reaches_the_connector_the_same_way() {
    // The kernel suite's "server close".
    let mut s = siblings("server-close", |_| {});
    let pa = s.connect(50_001);
    s.b.call(|g| {
        g.send(9000, &[1], T).unwrap();
        g.shutdown(9000, shutdown::BOTH)
    });
    assert!(s
        .a
        .pump_until(T, |g| g.socks[&pa].state == SockState::Reset));
    assert_eq!(shutdown_flags(&s.a, pa), vec![shutdown::BOTH]);
    assert_eq!(s.a.recv(pa, 16), [1]);
    assert!(
        s.b.until(|g| g.socks[&9000].state == SockState::Reset),
        "B's close is answered with A's RST"
    );
    assert!(s.all_gone());
}

#[test]
fn half_closes_cross_each_way_with_exactly_their_flag() {
    let mut s = siblings("half-close", |_| {});
    let pa = s.connect(50_002);
    // A stops sending: B sees SEND only and still sends.
    s.a.shutdown(pa, shutdown::SEND);
    assert!(s.b.until(|g| g.socks[&9000].peer_shutdown != 0));
    assert_eq!(s.b.call(|g| shutdown_flags(g, 9000)), vec![shutdown::SEND]);
    s.b.call(|g| g.send(9000, b"answer", T)).unwrap();
    assert_eq!(s.a.recv_exact(pa, 6, T), b"answer");
    // B stops receiving: A sees RCV (its send() would now fail with EPIPE).
    s.b.call(|g| g.shutdown(9000, shutdown::RCV));
    assert!(s.a.pump_until(T, |g| g.socks[&pa].peer_shutdown != 0));
    assert_eq!(shutdown_flags(&s.a, pa), vec![shutdown::RCV]);
    // B can still send after that; A still receives.
    s.b.call(|g| g.send(9000, b"more", T)).unwrap();
    assert_eq!(s.a.recv_exact(pa, 4, T), b"more");
    // Both connections stay until someone closes, as on one kernel.
    assert_eq!(s.dev_a.connections().len(), 1);
    assert_eq!(s.dev_b.connections().len(), 1);
    assert!(s.a.close(pa, T));
    assert!(s.all_gone());
}

/// A message of `len` bytes whose content depends on `seed`.
fn msg(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed as u8))
        .collect()
}

#[test]
fn seqpacket_messages_cross_whole_both_ways_with_their_eor_flags() {
    // vsock_test's "SOCK_SEQPACKET msg bounds": every message arrives whole, and MSG_EOR with
    // exactly the messages sent with it, whatever the sizes of the RX buffers in between.
    let mut s = siblings("seqpacket", |_| {});
    let pa = s.a.connect_seq(B, 9000).expect("connected");
    let pb = s.b.call(|g| g.accept(T)).expect("B accepts");
    assert_eq!(
        s.b.call(move |g| g.socks[&pb].sock_type),
        sock_type::SEQPACKET
    );
    let sizes = [1usize, 4096, 5000, 65536, 100_000, 3];
    for (i, &n) in sizes.iter().enumerate() {
        s.a.send_msg(pa, &msg(i, n), i % 2 == 1, T).unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        let (got, eor) =
            s.b.call(move |g| g.recv_msg(pb, T))
                .unwrap_or_else(|| panic!("message {i} to B"));
        assert!(got == msg(i, n), "message {i} to B: {} bytes", got.len());
        assert_eq!(eor, i % 2 == 1, "EOR of message {i} to B");
    }
    for (i, &n) in sizes.iter().enumerate() {
        s.b.call(move |g| g.send_msg(pb, &msg(i + 10, n), i % 3 == 0, T))
            .unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        let (got, eor) =
            s.a.recv_msg(pa, T)
                .unwrap_or_else(|| panic!("message {i} to A"));
        assert!(
            got == msg(i + 10, n),
            "message {i} to A: {} bytes",
            got.len()
        );
        assert_eq!(eor, i % 3 == 0, "EOR of message {i} to A");
    }
    // Both guests' kernels saw only packets of the connection's type.
    assert!(s.a.violations.is_empty(), "{:?}", s.a.violations);
    assert!(s.b.call(|g| g.violations.clone()).is_empty());
    assert!(s.a.close(pa, T));
    assert!(s.all_gone());
}

#[test]
fn a_seqpacket_request_to_a_sibling_whose_driver_lacks_the_type_is_reset() {
    let features = LINUX_FEATURES & !(1 << vsock_router::device::VIRTIO_VSOCK_F_SEQPACKET);
    let mut s = siblings_with("seqpacket-refused", features, |_| {});
    assert_eq!(s.a.connect_seq(B, 9000), Err(SockState::Reset));
    // B's guest never heard of it; its streams still work.
    assert!(s
        .b
        .call(|g| !g.received.iter().any(|h| h.op == op::REQUEST)));
    assert!(s.all_gone());
    let pa = s.connect(50_010);
    s.a.send(pa, b"stream", T).unwrap();
    assert_eq!(s.b.call(|g| g.recv_exact(9000, 6, T)), b"stream");
}

#[test]
fn an_rst_crosses_as_an_rst() {
    let mut s = siblings("rst", |_| {});
    let pa = s.connect(50_003);
    s.a.reset(pa);
    assert!(s.b.until(|g| g.socks[&9000].state == SockState::Reset));
    assert!(s.b.call(|g| shutdown_flags(g, 9000).is_empty()));
    assert!(s.all_gone());
}

#[test]
fn credit_is_the_receiving_guests_own() {
    const SMALL: u32 = 16 * 1024;
    let mut s = siblings("credit", |g| g.buf_alloc = SMALL);
    let pa = s.connect(50_004);
    assert_eq!(
        s.a.socks[&pa].peer_buf_alloc, SMALL,
        "A sees B's buffer size, not the device's"
    );
    // B does not read: A can send exactly B's buffer, then it has no credit.
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    let err = s.a.send(pa, &data, Duration::from_secs(2)).unwrap_err();
    assert!(err.contains("no credit"), "{err}");
    assert_eq!(s.a.socks[&pa].tx_cnt, SMALL);
    assert!(s.b.until(|g| g.socks[&9000].rx.len() == SMALL as usize));
    // B reads: its credit update reaches A, which sends the rest.
    let first = s.b.call(|g| g.recv(9000, usize::MAX));
    assert_eq!(first, data[..SMALL as usize]);
    assert!(s.a.pump_until(T, |g| g.socks[&pa].peer_fwd_cnt == SMALL));
    let more = data[SMALL as usize..2 * SMALL as usize].to_vec();
    s.a.send(pa, &more, T).unwrap();
    let n = more.len();
    assert_eq!(s.b.call(move |g| g.recv_exact(9000, n, T)), more);
}

#[test]
fn a_port_is_free_again_right_after_a_close() {
    let mut s = siblings("reuse", |_| {});
    let pa = s.connect(50_005);
    s.a.send(pa, b"first", T).unwrap();
    assert!(s.b.until(|g| g.socks[&9000].rx.len() == 5));
    assert!(s.a.close(pa, T));
    // Same local port at once: B's kernel dropped the old socket when the close arrived.
    let pa = s.connect(50_005);
    s.a.send(pa, b"second", T).unwrap();
    assert_eq!(
        s.b.call(move |g| g.recv_exact(9000, 6, T)),
        b"second",
        "the new connection works"
    );
    assert_eq!(s.b.call(|g| g.detached.len()), 1, "the old socket");
    assert_eq!(s.dev_b.counters().protocol_error.load(Ordering::Relaxed), 0);
}

#[test]
fn a_port_is_free_again_after_a_close_that_only_the_closers_timeout_ends() {
    // B holds unread bytes, so its kernel does not answer the close with RST; A's kernel
    // resets after its close timeout and connects again from the same port at once. The old
    // link's end and the new link reach B's device on two sockets, in either order; B's guest
    // must see the old connection's RST before the new REQUEST.
    let mut s = siblings("reuse-timeout", |g| g.reset_with_unread = false);
    let pa = s.connect(50_006);
    s.a.send(pa, b"unread", T).unwrap();
    s.a.shutdown(pa, shutdown::BOTH);
    assert!(s
        .b
        .until(|g| g.socks[&9000].peer_shutdown == shutdown::BOTH));
    s.a.reset(pa);
    let pa = s.connect(50_006);
    s.a.send(pa, b"again", T).unwrap();
    assert_eq!(s.b.call(move |g| g.recv_exact(9000, 5, T)), b"again");
    let (old_state, order_ok) = s.b.call(|g| {
        let rst = g
            .received
            .iter()
            .position(|h| h.op == op::RST && h.dst_port == 9000);
        let second_req = g
            .received
            .iter()
            .enumerate()
            .filter(|(_, h)| h.op == op::REQUEST && h.dst_port == 9000)
            .nth(1)
            .map(|(i, _)| i);
        (
            g.detached.first().map(|s| s.state),
            rst.zip(second_req).is_some_and(|(r, q)| r < q),
        )
    });
    assert_eq!(
        old_state,
        Some(SockState::Reset),
        "the old socket got its RST"
    );
    assert!(order_ok, "RST of the old connection before the new REQUEST");
}

// ---- The sibling device played by hand ----

fn hdr(op_: u16, src_port: u32, dst_port: u32, len: u32, flags: u32) -> Header {
    Header {
        src_cid: 7,
        dst_cid: GUEST,
        src_port,
        dst_port,
        len,
        type_: sock_type::STREAM,
        op: op_,
        flags,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn read_frame(link: &mut UnixStream) -> (Header, Vec<u8>) {
    link.set_read_timeout(Some(T)).unwrap();
    let mut raw = [0u8; HEADER_LEN];
    link.read_exact(&mut raw).unwrap();
    let h = Header::decode(&raw);
    let mut payload = vec![0u8; if h.op == op::RW { h.len as usize } else { 0 }];
    link.read_exact(&mut payload).unwrap();
    (h, payload)
}

/// The link was closed by the device (end of stream or a reset).
fn link_closed(link: &mut UnixStream) -> bool {
    link.set_read_timeout(Some(T)).unwrap();
    let mut sink = [0u8; 4096];
    loop {
        match link.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn an_old_links_close_is_delivered_before_a_newcomer_with_the_same_addresses() {
    let (mut g, dev, host) = setup();
    g.reset_with_unread = false;
    g.listen(9000);
    let req = hdr(op::REQUEST, 4000, 9000, 0, 0).encode();
    let mut old = host.connect_relay(9000, 7, 4000, &req, None);
    assert_eq!(g.accept(T), Some(9000));
    let (h, _) = read_frame(&mut old);
    assert_eq!((h.op, h.src_cid, h.src_port), (op::RESPONSE, GUEST, 9000));
    let mut data = hdr(op::RW, 4000, 9000, 3, 0).encode().to_vec();
    data.extend_from_slice(b"abc");
    old.write_all(&data).unwrap();
    old.write_all(&hdr(op::SHUTDOWN, 4000, 9000, 0, shutdown::BOTH).encode())
        .unwrap();
    assert!(g.pump_until(T, |g| g.socks[&9000].peer_shutdown == shutdown::BOTH));
    // The sibling's kernel reset the old connection and connects again from the same port;
    // the device sees the new link at the very moment the old one ends.
    let mut new = host.connect_relay(9000, 7, 4000, &req, Some(Box::new(move || drop(old))));
    assert!(g.pump_until(T, |g| g.detached.len() == 1));
    let rst = g
        .received
        .iter()
        .position(|h| h.op == op::RST && h.dst_port == 9000)
        .expect("the old connection's end");
    let second = g
        .received
        .iter()
        .enumerate()
        .filter(|(_, h)| h.op == op::REQUEST)
        .nth(1)
        .map(|(i, _)| i)
        .expect("the new REQUEST");
    assert!(rst < second, "the old RST comes first");
    let (h, _) = read_frame(&mut new);
    assert_eq!(h.op, op::RESPONSE, "the newcomer was accepted");
    assert_eq!(dev.counters().protocol_error.load(Ordering::Relaxed), 0);
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}

#[test]
fn a_newcomer_for_a_live_connection_is_refused() {
    let (mut g, dev, host) = setup();
    g.listen(9000);
    let req = hdr(op::REQUEST, 4000, 9000, 0, 0).encode();
    let mut first = host.connect_relay(9000, 7, 4000, &req, None);
    assert_eq!(g.accept(T), Some(9000));
    let _ = read_frame(&mut first);
    let mut dup = host.connect_relay(9000, 7, 4000, &req, None);
    assert!(link_closed(&mut dup), "the duplicate is closed");
    assert_eq!(dev.counters().protocol_error.load(Ordering::Relaxed), 1);
    // The first one is untouched.
    let mut data = hdr(op::RW, 4000, 9000, 2, 0).encode().to_vec();
    data.extend_from_slice(b"ok");
    first.write_all(&data).unwrap();
    assert_eq!(g.recv_exact(9000, 2, T), b"ok");
}

/// Offers a link to guest port 9000 whose REQUEST is answered, then sends `bad`: the guest must
/// get an RST and the link must close. Returns the device's counters afterwards.
fn bad_frame_resets(bad: &[u8], close_after: bool) -> (u64, u64) {
    let (mut g, dev, host) = setup();
    g.listen(9000);
    g.buf_alloc = 4096;
    let req = hdr(op::REQUEST, 4001, 9000, 0, 0).encode();
    let mut link = host.connect_relay(9000, 7, 4001, &req, None);
    assert_eq!(g.accept(T), Some(9000));
    let _ = read_frame(&mut link);
    link.write_all(bad).unwrap();
    if close_after {
        link.shutdown(std::net::Shutdown::Write).unwrap();
    }
    assert!(
        g.pump_until(T, |g| g.socks[&9000].state == SockState::Reset),
        "guest reset"
    );
    assert!(link_closed(&mut link), "link closed");
    assert!(g.pump_until(T, |_| dev.connections().is_empty()));
    let c = dev.counters();
    (
        c.protocol_error.load(Ordering::Relaxed),
        c.credit_overrun.load(Ordering::Relaxed),
    )
}

#[test]
fn a_hostile_link_cannot_get_past_the_device() {
    // A packet of another connection.
    let mut other = hdr(op::RW, 4001, 9000, 1, 0);
    other.src_cid = 8;
    let mut f = other.encode().to_vec();
    f.push(0);
    assert_eq!(bad_frame_resets(&f, false), (1, 0));
    // A payload beyond 64 KiB.
    assert_eq!(
        bad_frame_resets(&hdr(op::RW, 4001, 9000, 70_000, 0).encode(), false),
        (1, 0)
    );
    // A second REQUEST, an unknown op, a control packet with payload.
    for bad in [
        hdr(op::REQUEST, 4001, 9000, 0, 0),
        hdr(99, 4001, 9000, 0, 0),
        hdr(op::SHUTDOWN, 4001, 9000, 4, 1),
    ] {
        assert_eq!(bad_frame_resets(&bad.encode(), false), (1, 0), "{bad:?}");
    }
    // Data beyond the credit our guest advertised (4 KiB).
    let mut big = hdr(op::RW, 4001, 9000, 5000, 0).encode().to_vec();
    big.extend(std::iter::repeat_n(9u8, 5000));
    assert_eq!(bad_frame_resets(&big, false), (0, 1));
    // The link ends in the middle of a header, and in the middle of a payload.
    assert_eq!(
        bad_frame_resets(&hdr(op::RW, 4001, 9000, 8, 0).encode()[..20], true),
        (0, 0)
    );
    let mut cut = hdr(op::RW, 4001, 9000, 8, 0).encode().to_vec();
    cut.extend_from_slice(b"abc");
    assert_eq!(bad_frame_resets(&cut, true), (1, 0));
}

#[test]
fn a_link_whose_first_packet_is_not_a_request_is_closed_unseen() {
    let (mut g, dev, host) = setup();
    g.listen(9000);
    let mut link = host.connect_relay(9000, 7, 4002, &hdr(op::RW, 4002, 9000, 0, 0).encode(), None);
    assert!(link_closed(&mut link));
    g.pump(Duration::from_millis(100));
    assert!(
        g.received.iter().all(|h| h.dst_port != 9000),
        "the guest saw nothing: {:?}",
        g.received
    );
    assert!(dev.connections().is_empty());
    assert_eq!(dev.counters().protocol_error.load(Ordering::Relaxed), 1);
}

#[test]
fn a_guest_beyond_its_siblings_credit_is_reset_and_the_link_closed() {
    let (mut g, dev, host) = setup();
    host.set_relay(true);
    let connector = thread::spawn({
        let host = host.clone();
        move || {
            let (_, mut link) = host.accept(T).expect("the relay link");
            let (req, _) = read_frame(&mut link);
            assert_eq!(req.op, op::REQUEST);
            let mut resp = hdr(op::RESPONSE, req.dst_port, req.src_port, 0, 0);
            resp.src_cid = req.dst_cid;
            resp.buf_alloc = 1000;
            link.write_all(&resp.encode()).unwrap();
            link
        }
    });
    let p = g.connect(7, 80).expect("connected through the relay");
    let mut link = connector.join().unwrap();
    assert_eq!(g.socks[&p].peer_buf_alloc, 1000);
    // A hostile guest ignores the credit.
    let s = &g.socks[&p];
    let rw = Header {
        src_cid: GUEST,
        dst_cid: 7,
        src_port: p,
        dst_port: 80,
        len: 2000,
        type_: sock_type::STREAM,
        op: op::RW,
        flags: 0,
        buf_alloc: s.buf_alloc,
        fwd_cnt: s.fwd_cnt,
    };
    g.send_packet(&rw, &[0u8; 2000]);
    assert!(g.pump_until(T, |g| g.socks[&p].state == SockState::Reset));
    assert!(link_closed(&mut link));
    assert_eq!(dev.counters().credit_overrun.load(Ordering::Relaxed), 1);
}

#[test]
fn packets_wait_in_order_while_the_link_is_full() {
    let (mut g, _dev, host) = setup();
    host.set_relay(true);
    host.set_socket_buffers(4096);
    let connector = thread::spawn({
        let host = host.clone();
        move || {
            let (_, mut link) = host.accept(T).expect("the relay link");
            let (req, _) = read_frame(&mut link);
            let mut resp = hdr(op::RESPONSE, req.dst_port, req.src_port, 0, 0);
            resp.src_cid = req.dst_cid;
            resp.buf_alloc = 256 * 1024;
            link.write_all(&resp.encode()).unwrap();
            link
        }
    });
    let p = g.connect(7, 81).unwrap();
    let mut link = connector.join().unwrap();
    // 200 KiB in small packets while nobody reads the link: most of it waits in the device.
    let data: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 253) as u8).collect();
    for chunk in data.chunks(1000) {
        g.send(p, chunk, T).unwrap();
    }
    g.shutdown(p, shutdown::SEND);
    g.pump(Duration::from_millis(50));
    // Now the sibling reads: every byte in order, framed, then the SHUTDOWN.
    let mut got = Vec::new();
    let mut frames = 0;
    loop {
        let (h, payload) = read_frame(&mut link);
        assert_eq!((h.src_cid, h.src_port, h.dst_port), (GUEST, p, 81));
        frames += 1;
        match h.op {
            op::RW => got.extend(payload),
            op::SHUTDOWN => {
                assert_eq!(h.flags, shutdown::SEND);
                break;
            }
            op::CREDIT_UPDATE | op::CREDIT_REQUEST => {}
            o => panic!("unexpected op {o}"),
        }
    }
    assert_eq!(got, data);
    assert!(
        frames < 205,
        "{frames} frames: data packets that waited were merged"
    );
}

#[test]
fn many_small_seqpacket_messages_wait_for_a_full_link_each_with_its_boundary() {
    // Messages are never merged while they wait (each keeps its EOM), so the frames that may
    // wait are bounded by number (MAX_QUEUED_FRAMES) as well as by credit, not by the 32 that
    // bound control frames: 3000 small messages behind a link nobody reads.
    let (mut g, _dev, host) = setup();
    host.set_relay(true);
    host.set_socket_buffers(4096);
    let connector = thread::spawn({
        let host = host.clone();
        move || {
            let (_, mut link) = host.accept(T).expect("the relay link");
            let (req, _) = read_frame(&mut link);
            assert_eq!(req.type_, sock_type::SEQPACKET);
            let mut resp = hdr(op::RESPONSE, req.dst_port, req.src_port, 0, 0);
            resp.src_cid = req.dst_cid;
            resp.type_ = sock_type::SEQPACKET;
            resp.buf_alloc = 256 * 1024;
            link.write_all(&resp.encode()).unwrap();
            link
        }
    });
    let p = g.connect_seq(7, 82).unwrap();
    let mut link = connector.join().unwrap();
    let count = 3000u32;
    for i in 0..count {
        let m = i.to_le_bytes();
        g.send_msg(p, &m, i % 5 == 0, T).unwrap();
    }
    g.pump(Duration::from_millis(50));
    assert_ne!(
        g.socks[&p].state,
        SockState::Reset,
        "messages waited, nobody was reset"
    );
    let mut next = 0u32;
    while next < count {
        let (h, payload) = read_frame(&mut link);
        match h.op {
            op::RW => {
                assert_eq!(payload, next.to_le_bytes(), "message {next}");
                let want = seq::EOM | if next % 5 == 0 { seq::EOR } else { 0 };
                assert_eq!(h.flags, want, "flags of message {next}");
                next += 1;
            }
            op::CREDIT_UPDATE | op::CREDIT_REQUEST => {}
            o => panic!("unexpected op {o}"),
        }
    }
}
