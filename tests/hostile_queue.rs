//! A hostile guest at the queue level: broken descriptor chains and rings. Each case checks that
//! the chain is returned (or the queue refused) and counted, that nothing is answered, and that
//! the device keeps serving a well-behaved connection afterwards.

mod common;

use common::setup;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vsock_router::device::VsockDevice;
use vsock_router::sim::{PairBackend, PairHost, RawDesc, SimGuest, REGION_SPLIT};
use vsock_router::wire::{op, Header, HEADER_LEN};

const T: Duration = Duration::from_secs(10);
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

fn rw_header() -> [u8; HEADER_LEN] {
    common::request(3, 40).encode()
}

/// Writes the descriptors `descs` (their `next` fields index into `descs`) into free table
/// slots, publishes the first as a chain head and kicks TX.
fn post_raw(g: &mut SimGuest, descs: &[RawDesc]) {
    let ids = g.txq.take_descs(descs.len()).expect("free descriptors");
    let m = g.mem.clone();
    for (k, d) in descs.iter().enumerate() {
        let mut d = *d;
        if d.flags & F_NEXT != 0 && (d.next as usize) < ids.len() {
            d.next = ids[d.next as usize];
        }
        g.txq.write_desc(&m, ids[k], d);
    }
    g.txq.track(ids[0], &ids);
    g.txq.publish(&m, ids[0]);
    g.kick(1);
}

/// The device still serves a normal connection.
fn still_works(g: &mut SimGuest, host: &PairHost) {
    let port = g.connect(2, 4242).expect("connect after abuse");
    let (_, mut s) = host.accept(T).expect("host side");
    g.send(port, b"alive", T).unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"alive");
}

fn expect_malformed(g: &mut SimGuest, dev: &VsockDevice<PairBackend>, n: u64) {
    let c = dev.counters();
    assert!(
        g.pump_until(T, |_| c.malformed_chains.load(Ordering::Relaxed) >= n),
        "malformed count {} < {n}",
        c.malformed_chains.load(Ordering::Relaxed)
    );
    g.pump_until(T, |g| g.txq.free_descs() == 256);
    assert_eq!(g.txq.free_descs(), 256, "every chain came back");
}

#[test]
fn descriptor_loop_next_out_of_range_and_bad_addresses() {
    let (mut g, dev, host) = setup();
    let hdr = rw_header();
    g.mem.write_slice(&hdr, GuestAddress(0x40_0000)).unwrap();
    // A loop: 0 → 1 → 0.
    post_raw(
        &mut g,
        &[
            RawDesc {
                addr: 0x40_0000,
                len: 44,
                flags: F_NEXT,
                next: 1,
            },
            RawDesc {
                addr: 0x40_1000,
                len: 8,
                flags: F_NEXT,
                next: 0,
            },
        ],
    );
    // next beyond the table.
    post_raw(
        &mut g,
        &[RawDesc {
            addr: 0x40_0000,
            len: 44,
            flags: F_NEXT,
            next: 999,
        }],
    );
    // Buffers outside guest memory, wrapping the address space, and huge.
    post_raw(
        &mut g,
        &[RawDesc {
            addr: 1 << 40,
            len: 44,
            flags: 0,
            next: 0,
        }],
    );
    post_raw(
        &mut g,
        &[RawDesc {
            addr: u64::MAX - 10,
            len: 44,
            flags: 0,
            next: 0,
        }],
    );
    post_raw(
        &mut g,
        &[RawDesc {
            addr: 0x40_0000,
            len: u32::MAX,
            flags: 0,
            next: 0,
        }],
    );
    // An indirect descriptor, never offered.
    post_raw(
        &mut g,
        &[RawDesc {
            addr: 0x40_0000,
            len: 64,
            flags: F_INDIRECT,
            next: 0,
        }],
    );
    // Zero-length descriptors only: shorter than a header.
    post_raw(
        &mut g,
        &[
            RawDesc {
                addr: 0x40_0000,
                len: 0,
                flags: F_NEXT,
                next: 1,
            },
            RawDesc {
                addr: 0x40_0000,
                len: 0,
                flags: 0,
                next: 0,
            },
        ],
    );
    // A device-writable descriptor in the middle of a TX chain.
    post_raw(
        &mut g,
        &[
            RawDesc {
                addr: 0x40_0000,
                len: 44,
                flags: F_NEXT,
                next: 1,
            },
            RawDesc {
                addr: 0x40_1000,
                len: 8,
                flags: F_WRITE,
                next: 0,
            },
        ],
    );
    expect_malformed(&mut g, &dev, 8);
    assert!(g.received.is_empty(), "malformed chains are not answered");
    assert_eq!(host.connects(), 0);
    still_works(&mut g, &host);
}

#[test]
fn header_split_in_every_way_and_straddling_regions_work() {
    let (mut g, dev, host) = setup();
    // The header cut at every byte, with the REQUEST's header straddling the region boundary.
    let hdr = rw_header();
    for cut in 1..HEADER_LEN as u64 {
        let base = REGION_SPLIT - cut;
        let mut h = Header::decode(&hdr);
        h.src_port = 100 + cut as u32;
        g.mem.write_slice(&h.encode(), GuestAddress(base)).unwrap();
        post_raw(
            &mut g,
            &[
                RawDesc {
                    addr: base,
                    len: cut as u32,
                    flags: F_NEXT,
                    next: 1,
                },
                RawDesc {
                    addr: base + cut,
                    len: 44 - cut as u32,
                    flags: 0,
                    next: 0,
                },
            ],
        );
        let (_, _s) = host
            .accept(T)
            .unwrap_or_else(|| panic!("cut {cut}: REQUEST not seen"));
    }
    assert_eq!(dev.counters().malformed_chains.load(Ordering::Relaxed), 0);
    g.pump_until(T, |g| {
        g.received.iter().filter(|h| h.op == op::RESPONSE).count() == 43
    });
}

#[test]
fn avail_index_running_ahead_is_refused_without_harm() {
    let (mut g, dev, _host) = setup();
    let m = g.mem.clone();
    g.txq.force_avail_idx(&m, 1000);
    g.kick(1);
    let c = dev.counters();
    assert!(g.pump_until(T, |_| c.bad_avail_idx.load(Ordering::Relaxed) >= 1));
    assert!(dev.is_active(), "the device thread is still running");
    assert!(dev.connections().is_empty(), "and still answers");
}

/// A read-only buffer among the RX buffers the device takes in one batch (several per `readv`):
/// it ends the batch, is returned unused once (counted), and every host byte still arrives in
/// order in the well-formed buffers around it.
#[test]
fn a_malformed_rx_buffer_inside_a_batch_is_returned_once() {
    let (mut g, dev, host) = setup();
    let port = g.connect(2, 4242).expect("connect");
    let (_, mut s) = host.accept(T).expect("host side");
    g.pump(Duration::from_millis(50));
    let posted = g.rx_posted();
    let bad = [5u16, 6, 40];
    for i in bad {
        // VIRTQ_DESC_F_WRITE cleared: a buffer the device may not write.
        let flags = GuestAddress(g.rxq.desc.0 + 16 * u64::from(i) + 12);
        g.mem.write_obj(0u16, flags).unwrap();
    }
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            s.write_all(&data).unwrap();
            s
        })
    };
    let mut got = Vec::new();
    let start = std::time::Instant::now();
    while got.len() < data.len() && start.elapsed() < T {
        g.pump(Duration::from_millis(20));
        got.extend(g.recv(port, usize::MAX));
    }
    let _s = writer.join().unwrap();
    assert_eq!(got.len(), data.len(), "bytes received");
    assert!(got == data, "the bytes arrived in order");
    let c = dev.counters();
    assert_eq!(c.malformed_chains.load(Ordering::Relaxed), bad.len() as u64);
    // The sim reports each returned-unused buffer (used length 0) and nothing else.
    assert_eq!(g.violations.len(), bad.len(), "{:?}", g.violations);
    assert!(g.violations.iter().all(|v| v.contains("RX used length 0")));
    g.pump_until(T, |g| g.rx_posted() == posted);
    assert_eq!(g.rx_posted(), posted, "every RX buffer is posted again");
    still_works(&mut g, &host);
}
