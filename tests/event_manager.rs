//! The device in a VMM's event-manager loop (`RunMode::External`): a real
//! `event_manager::EventManager` runs the device's subscriber on its own thread while the
//! simulated guest moves data both ways through real socket pairs; one interrupt per batch; a
//! reset takes the core back from the loop and the device can be activated again.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{setup_with, GUEST};
use event_manager::{EventManager, SubscriberOps};
use vsock_router::device::virtio::VirtioDevice;
use vsock_router::device::{DeviceConfig, RunMode};
use vsock_router::sim::PairBackend;

const T: Duration = Duration::from_secs(20);

#[test]
fn the_device_runs_in_an_event_manager_loop() {
    let mut cfg = DeviceConfig::new(GUEST);
    cfg.run = RunMode::External;
    let (mut g, mut dev, host) = setup_with(cfg);
    let sub = dev
        .subscriber()
        .expect("a subscriber in event-manager mode");
    let stop = Arc::new(AtomicBool::new(false));
    let turns = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut em: EventManager<_> = EventManager::new().unwrap();
            em.add_subscriber(sub);
            let mut turns = 0u64;
            while !stop.load(Ordering::Relaxed) {
                turns += em.run_with_timeout(20).unwrap() as u64;
            }
            turns
        })
    };

    // Guest → host and back on one connection.
    let port = g.connect(2, 7000).expect("connect through the event loop");
    let (_, mut s) = host.accept(T).unwrap();
    let up: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let reader = thread::spawn(move || {
        let mut got = vec![0u8; 1 << 20];
        s.read_exact(&mut got).unwrap();
        (got, s)
    });
    g.send(port, &up, T).unwrap();
    let (got, mut s) = reader.join().unwrap();
    assert_eq!(got, up, "guest → host");
    let writer = thread::spawn(move || {
        s.write_all(&[7u8; 1 << 20]).unwrap();
        s
    });
    let back = g.recv_exact(port, 1 << 20, T);
    assert_eq!(back.len(), 1 << 20, "host → guest");
    assert!(back.iter().all(|&b| b == 7));
    let _s = writer.join().unwrap();

    // The API's snapshot is answered by the loop.
    assert_eq!(dev.connections().len(), 1);
    let c = dev.counters();
    let pkts = c.rx_packets.load(Ordering::Relaxed);
    let irqs = c.interrupts.load(Ordering::Relaxed);
    assert!(pkts >= 256, "1 MiB in 4 KiB buffers: {pkts}");
    assert!(
        irqs < pkts,
        "one interrupt per batch: {irqs} for {pkts} packets"
    );

    // A reset takes the core out of the running loop; the subscriber then leaves it.
    assert!(dev.reset(), "the backend came back");
    assert!(dev.connections().is_empty());
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    assert!(turns.join().unwrap() > 0);
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}

#[test]
fn the_thread_mode_has_no_subscriber() {
    let (backend, _host) = PairBackend::new();
    let (_g, dev) = vsock_router::sim::SimGuest::with_device(DeviceConfig::new(GUEST), backend);
    assert!(dev.subscriber().is_none());
}
