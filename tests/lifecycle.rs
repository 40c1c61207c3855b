//! The device's lifecycle (issue 12) with the simulated guest: pause, save and restore into a
//! fresh device with a fresh backend, TRANSPORT_RESET on the event queue and the RX gate it
//! holds, the TX queue looked at without a kick, the per-connection RST policy, and restored
//! states that must be refused.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use common::{request, setup, setup_with, GUEST};
use vm_memory::{Address, Bytes};
use vsock_router::csm::ports::EPHEMERAL_FIRST;
use vsock_router::device::core::Flow;
use vsock_router::device::virtio::{ActivateError, VirtioDevice};
use vsock_router::device::{
    DeviceConfig, LifecycleError, ResetPolicy, RunMode, VsockDevice, VsockState,
};
use vsock_router::sim::{PairBackend, PairHost, SimGuest, SockState, LINUX_FEATURES};
use vsock_router::wire::{op, sock_type};

const T: Duration = Duration::from_secs(10);

/// The used index the device published for the driver queue at `used`.
fn used_idx(g: &SimGuest, used: vm_memory::GuestAddress) -> u16 {
    g.mem.read_obj(used.unchecked_add(2)).unwrap()
}

/// Pauses `dev`, saves it, and sends the state through JSON as a file would carry it.
fn save_through_json(dev: &mut VsockDevice<PairBackend>) -> VsockState {
    dev.pause().expect("pause");
    let state = dev.save().expect("save");
    let json = serde_json::to_string(&state).unwrap();
    let back: VsockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    back
}

/// A fresh device with a fresh backend restored from `state` and activated over the same guest.
fn restore(
    g: &SimGuest,
    cfg: DeviceConfig,
    state: &VsockState,
    policy: ResetPolicy,
) -> (VsockDevice<PairBackend>, PairHost) {
    let (backend, host) = PairBackend::new();
    let (mut dev, queues) = VsockDevice::restore(cfg, backend, state, policy).expect("restore");
    dev.activate(g.restore_context(queues)).expect("activate");
    (dev, host)
}

/// Reads until EOF (or an error) within `T`; returns whether EOF came.
fn sees_eof(s: &mut std::os::unix::net::UnixStream) -> bool {
    s.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 64];
    for _ in 0..64 {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
    false
}

#[test]
fn a_paused_device_writes_no_guest_memory_and_data_flows_after_resume() {
    let (mut g, mut dev, host) = setup();
    let port = g.connect(2, 1234).expect("connected");
    let (_, mut s) = host.accept(T).expect("host side");
    g.pump(Duration::from_millis(50));
    dev.pause().expect("pause");
    assert!(dev.is_paused());
    assert!(!dev.is_active());
    let wakeups = dev.counters().wakeups.load(Ordering::Relaxed);
    let before = g.memory_digest();
    let rx_used = used_idx(&g, g.rxq.used);
    // The host sends, the guest kicks every queue: nothing may happen.
    s.write_all(b"sent while paused").unwrap();
    for q in 0..3 {
        g.kick(q);
    }
    thread::sleep(Duration::from_millis(300));
    assert_eq!(g.memory_digest(), before, "guest memory unchanged");
    assert_eq!(used_idx(&g, g.rxq.used), rx_used, "RX used ring unchanged");
    assert_eq!(dev.counters().wakeups.load(Ordering::Relaxed), wakeups);
    assert!(dev.connections().is_empty(), "no answers while paused");
    assert_eq!(dev.resume(), Ok(()));
    assert_eq!(g.recv_exact(port, 17, T), b"sent while paused");
    g.send(port, b"after", T).unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"after");
    assert_eq!(dev.connections().len(), 1, "the connection lived through");
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}

/// In a VMM's own loop (`RunMode::External`) the paused core leaves its subscriber: running it
/// does nothing (the subscriber says stop), and after resume a new subscriber runs the same
/// connections.
#[test]
fn a_paused_external_mode_device_leaves_its_subscriber_and_a_new_one_resumes_it() {
    let mut cfg = DeviceConfig::new(GUEST);
    cfg.run = RunMode::External;
    let (mut g, mut dev, host) = setup_with(cfg);
    g.drive_with(dev.subscriber().expect("external mode"), false);
    let port = g.connect(2, 1234).expect("connected");
    let (_, mut s) = host.accept(T).expect("host side");
    g.pump(Duration::from_millis(50));
    let old = dev.subscriber().expect("external mode");
    dev.pause().expect("pause");
    assert!(dev.subscriber().is_none());
    s.write_all(b"paused").unwrap();
    g.kick(0);
    let before = g.memory_digest();
    assert_eq!(
        old.run_once(0).unwrap(),
        Flow::Stop,
        "the old subscriber has no core"
    );
    assert_eq!(old.poll_fd(), None);
    for _ in 0..5 {
        g.pump(Duration::from_millis(20));
    }
    assert_eq!(g.memory_digest(), before, "guest memory unchanged");
    dev.resume().expect("resume");
    g.drive_with(dev.subscriber().expect("running again"), false);
    assert_eq!(g.recv_exact(port, 6, T), b"paused");
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}

#[test]
fn save_needs_a_paused_device_and_pause_a_running_one() {
    let (_g, mut dev, _host) = setup();
    assert_eq!(dev.save().unwrap_err(), LifecycleError::NotPaused);
    assert_eq!(dev.resume().unwrap_err(), LifecycleError::NotPaused);
    dev.pause().unwrap();
    assert_eq!(dev.pause().unwrap_err(), LifecycleError::NotRunning);
    assert!(
        dev.reset(),
        "a paused device resets and gives its backend back"
    );
    assert!(!dev.is_paused());
}

#[test]
fn save_and_restore_round_trip_through_json_into_a_fresh_device() {
    let (mut g, mut dev, host) = setup();
    let port = g.connect(2, 1234).expect("connected");
    let (_, mut s1) = host.accept(T).expect("host side");
    g.listen(5000);
    let mut s2 = host.connect(5000, b"");
    g.accept(T).expect("accepted");
    g.pump(Duration::from_millis(50));
    let state = save_through_json(&mut dev);
    assert_eq!(state.version, vsock_router::device::STATE_VERSION);
    assert_eq!(state.guest_cid, GUEST);
    assert_eq!(state.acked_features, LINUX_FEATURES);
    assert_eq!(
        state.next_port,
        EPHEMERAL_FIRST + 1,
        "one host-initiated port taken"
    );
    assert_eq!(state.connections.len(), 2);
    assert!(state
        .connections
        .iter()
        .any(|c| (c.device_cid, c.device_port, c.guest_port) == (2, 1234, port)));
    for (i, used) in [g.rxq.used, g.txq.used, g.evq.used].into_iter().enumerate() {
        let q = &state.queues[i];
        assert!(q.ready && q.event_idx && q.size == 256);
        assert_eq!(q.next_used, used_idx(&g, used), "queue {i}");
        assert_eq!(q.next_avail, q.next_used, "queue {i}");
    }
    assert!(state.queues[0].next_used > 0 && state.queues[1].next_used > 0);
    let (backend, _host2) = PairBackend::new();
    let (dev2, queues) = VsockDevice::restore(
        DeviceConfig::new(GUEST),
        backend,
        &state,
        ResetPolicy::default(),
    )
    .expect("restore");
    assert_eq!(dev2.acked_features(), LINUX_FEATURES);
    let mut cid = [0u8; 8];
    dev2.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST);
    for (q, s) in queues.iter().zip(&state.queues) {
        let r = q.state();
        assert_eq!(
            (r.next_avail, r.next_used, r.size),
            (s.next_avail, s.next_used, s.size)
        );
        assert_eq!(
            (r.desc_table, r.avail_ring, r.used_ring),
            (s.desc_table, s.avail_ring, s.used_ring)
        );
        assert!(r.event_idx_enabled);
    }
    // The saved device goes away: its host clients see their sockets closed.
    drop(dev);
    assert!(
        sees_eof(&mut s1),
        "guest-initiated connection's host end closed"
    );
    assert!(
        sees_eof(&mut s2),
        "host-initiated connection's host end closed"
    );
}

#[test]
fn restore_sends_transport_reset_and_holds_rx_until_the_driver_handled_it() {
    let (mut g, mut dev, host) = setup();
    let old = g.connect(2, 1234).expect("connected");
    let (_, mut s) = host.accept(T).expect("host side");
    // A host-initiated connection takes the first device-side port.
    g.listen(4000);
    let _s2 = host.connect(4000, b"");
    g.accept(T).expect("accepted");
    g.pump(Duration::from_millis(50));
    let state = save_through_json(&mut dev);
    drop(dev);
    assert!(sees_eof(&mut s));
    let (backend, host2) = PairBackend::new();
    let (mut dev2, queues) = VsockDevice::restore(
        DeviceConfig::new(GUEST),
        backend,
        &state,
        ResetPolicy::TransportReset,
    )
    .expect("restore");
    // A host client of the clone connects before the guest saw the reset: its REQUEST waits.
    g.listen(5000);
    let mut c = host2.connect(5000, b"");
    let interrupts = dev2.counters().interrupts.load(Ordering::Relaxed);
    let rx_used = used_idx(&g, g.rxq.used);
    g.received.clear();
    dev2.activate(g.restore_context(queues)).expect("activate");
    assert!(
        g.pump_until(T, |g| g.evq.used_pending(&g.mem)),
        "the event is in the used ring"
    );
    assert!(dev2.counters().interrupts.load(Ordering::Relaxed) > interrupts);
    // The driver has not handled the event: no RX buffer is used, however often the device
    // wakes up meanwhile (kicks of the data queues, host bytes), and it does not spin.
    c.write_all(b"early").unwrap();
    // TX is not held: a REQUEST the driver sends meanwhile is connected, and its host end
    // sends at once (the answers wait behind the gate).
    let mut h = request(GUEST, 42_000);
    h.dst_port = 1234;
    g.send_packet(&h, &[]);
    let (_, mut s3) = host2.accept(T).expect("TX served during the hold");
    s3.write_all(b"to a guest behind the gate").unwrap();
    let wakeups = dev2.counters().wakeups.load(Ordering::Relaxed);
    for _ in 0..10 {
        g.kick(0);
        g.kick(1);
        g.pump(Duration::from_millis(30));
    }
    let woke = dev2.counters().wakeups.load(Ordering::Relaxed) - wakeups;
    assert!(
        woke < 100,
        "{woke} wake-ups in 300 ms: the gate must not spin the device"
    );
    assert_eq!(used_idx(&g, g.rxq.used), rx_used, "RX held back");
    assert!(g.received.is_empty());
    assert!(g.socks.contains_key(&old), "the guest still believes in it");
    // Linux handles the event: resets every socket, posts the buffer again, kicks.
    assert_eq!(g.take_events(), vec![Some(0)]);
    assert!(!g.socks.contains_key(&old));
    let port = g
        .accept(T)
        .expect("the REQUEST arrives once the gate opened");
    assert_eq!(g.socks[&port].state, SockState::Established);
    let mut line = [0u8; 14];
    c.read_exact(&mut line).unwrap();
    assert!(
        line.starts_with(b"OK 1073741825"),
        "the port cursor was restored"
    );
    c.write_all(b"hi").unwrap();
    assert_eq!(g.recv_exact(port, 7, T), b"earlyhi");
    assert_eq!(g.take_events(), vec![], "one event only");
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}

#[test]
fn a_tx_packet_queued_before_the_save_is_served_after_restore_without_a_kick() {
    let (mut g, mut dev, _host) = setup();
    g.pump(Duration::from_millis(50));
    dev.pause().unwrap();
    // The driver queues a REQUEST while the device is paused; its kick is lost.
    let mut h = request(GUEST, 41_000);
    h.dst_port = 1234;
    g.send_packet(&h, &[]);
    let state = dev.save().unwrap();
    assert_eq!(
        state.queues[1].next_avail,
        g.txq.avail_idx().wrapping_sub(1),
        "the REQUEST is not taken yet"
    );
    drop(dev);
    g.lose_kicks();
    let (_dev2, host2) = restore(
        &g,
        DeviceConfig::new(GUEST),
        &state,
        ResetPolicy::ConnectionRst,
    );
    let (req, _s) = host2
        .accept(T)
        .expect("the REQUEST was served without a kick");
    assert_eq!((req.dst_port, req.guest_port), (1234, 41_000));
}

#[test]
fn connection_rst_policy_resets_each_connection_the_guest_had() {
    let (mut g, mut dev, host) = setup();
    let p1 = g.connect(2, 1234).expect("connected");
    let (_, mut s1) = host.accept(T).unwrap();
    let p2 = g.connect(2, 1235).expect("connected");
    let (_, mut s2) = host.accept(T).unwrap();
    g.pump(Duration::from_millis(50));
    let state = save_through_json(&mut dev);
    drop(dev);
    assert!(
        sees_eof(&mut s1) && sees_eof(&mut s2),
        "host clients see close"
    );
    g.received.clear();
    let (dev2, _host2) = restore(
        &g,
        DeviceConfig::new(GUEST),
        &state,
        ResetPolicy::ConnectionRst,
    );
    assert!(g.pump_until(T, |g| [p1, p2]
        .iter()
        .all(|p| g.socks[p].state == SockState::Reset)));
    for (p, dst) in [(p1, 1234), (p2, 1235)] {
        assert!(g.received.iter().any(|h| h.op == op::RST
            && (h.src_cid, h.src_port, h.dst_cid, h.dst_port) == (2, dst, GUEST, p)
            && h.type_ == sock_type::STREAM));
    }
    assert!(
        !g.evq.used_pending(&g.mem),
        "no TRANSPORT_RESET under this policy"
    );
    assert!(dev2.connections().is_empty());
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}

#[test]
fn a_cid_change_sends_transport_reset_whatever_the_policy() {
    let (mut g, mut dev, _host) = setup();
    let old = g.connect(2, 1234).expect("connected");
    g.pump(Duration::from_millis(50));
    let state = save_through_json(&mut dev);
    drop(dev);
    let (dev2, _host2) = restore(&g, DeviceConfig::new(7), &state, ResetPolicy::ConnectionRst);
    assert!(g.pump_until(T, |g| g.evq.used_pending(&g.mem)));
    assert_eq!(g.take_events(), vec![Some(0)]);
    assert!(!g.socks.contains_key(&old));
    let mut cid = [0u8; 8];
    dev2.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 7, "the driver reads the new CID");
    assert!(
        !g.received.iter().any(|h| h.op == op::RST),
        "no RST addressed to the old CID"
    );
}

/// A restored device saved again before its driver handled the TRANSPORT_RESET still owes it:
/// the next restore sends it whatever the policy.
#[test]
fn an_event_not_yet_handled_is_saved_and_sent_again() {
    let (mut g, mut dev, _host) = setup();
    g.pump(Duration::from_millis(50));
    let state = save_through_json(&mut dev);
    assert!(!state.event_owed);
    drop(dev);
    let (mut dev2, _host2) = restore(
        &g,
        DeviceConfig::new(GUEST),
        &state,
        ResetPolicy::TransportReset,
    );
    assert!(g.pump_until(T, |g| g.evq.used_pending(&g.mem)));
    let again = save_through_json(&mut dev2);
    assert!(again.event_owed, "the driver has not handled it");
    drop(dev2);
    let (_dev3, _host3) = restore(
        &g,
        DeviceConfig::new(GUEST),
        &again,
        ResetPolicy::ConnectionRst,
    );
    assert!(g.pump_until(T, |g| {
        let used: u16 = g.mem.read_obj(g.evq.used.unchecked_add(2)).unwrap();
        used == 2
    }));
    assert_eq!(g.take_events(), vec![Some(0), Some(0)]);
}

#[test]
fn restore_refuses_bogus_states_with_a_reason() {
    let (mut g, mut dev, _host) = setup_with(DeviceConfig::new(GUEST));
    g.pump(Duration::from_millis(50));
    dev.pause().unwrap();
    let good = dev.save().unwrap();
    type Bend = fn(&mut VsockState);
    let cases: [(Bend, &str); 11] = [
        (|s| s.version = 2, "version"),
        (|s| s.guest_cid = 2, "CID"),
        (|s| s.acked_features |= 1 << 40, "never offered"),
        (|s| s.acked_features &= !(1 << 32), "VERSION_1"),
        (|s| s.queues.truncate(2), "2 queues"),
        (|s| s.queues[0].size = 100, "power of two"),
        (|s| s.queues[1].max_size = 128, "max size"),
        (
            |s| s.queues[1].next_avail = s.queues[1].next_used.wrapping_add(300),
            "differ",
        ),
        (|s| s.queues[0].desc_table = 0x1001, "queue 0"),
        (
            |s| {
                s.connections.push(vsock_router::device::SavedConn {
                    sock_type: 9,
                    device_cid: 2,
                    device_port: 1,
                    guest_port: 1,
                })
            },
            "socket type 9",
        ),
        (|s| s.next_port = 5, "next port"),
    ];
    for (bend, says) in cases {
        let mut bad = good.clone();
        bend(&mut bad);
        let (backend, _h) = PairBackend::new();
        let Err(e) = VsockDevice::restore(
            DeviceConfig::new(GUEST),
            backend,
            &bad,
            ResetPolicy::default(),
        ) else {
            panic!("accepted a state that should fail with {says}");
        };
        assert!(e.to_string().contains(says), "{e} (wanted {says})");
    }
    let (backend, _h) = PairBackend::new();
    let unbent = VsockDevice::restore(
        DeviceConfig::new(GUEST),
        backend,
        &good,
        ResetPolicy::default(),
    );
    assert!(unbent.is_ok(), "the unbent state is fine");
    assert!(serde_json::from_str::<VsockState>(r#"{"version":1}"#).is_err());
    // TRANSPORT_RESET owed and no event queue to carry it: activation refuses.
    let (backend, _h) = PairBackend::new();
    let (mut dev2, mut queues) = VsockDevice::restore(
        DeviceConfig::new(GUEST),
        backend,
        &good,
        ResetPolicy::TransportReset,
    )
    .unwrap();
    queues[2] = <virtio_queue::Queue as virtio_queue::QueueT>::new(256).unwrap();
    assert!(matches!(
        dev2.activate(g.restore_context(queues)),
        Err(ActivateError::InvalidQueue(2))
    ));
}
