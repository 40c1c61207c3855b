//! What the device logs, through its real path (simulated guest, real guest memory, real Unix
//! socket pairs): one info line per connection when it ends, with its facts as key-value
//! fields, and rate-limited warnings about a misbehaving guest, so that a hostile guest
//! cannot flood the log. The device runs in this thread on a manual clock, so the 10 s
//! interval of the warnings is simulated, not waited for.

mod common;

use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::Duration;

use log::kv::{Key, Value, VisitSource};
use vsock_router::device::guest_warn::WARN_INTERVAL;
use vsock_router::device::virtio::VirtioDevice;
use vsock_router::device::DeviceConfig;
use vsock_router::sim::{PairBackend, SimGuest};

use common::GUEST;
const T: Duration = Duration::from_secs(10);

/// One captured record: level, message and its key-value fields as text.
#[derive(Clone, Debug)]
struct Line {
    level: log::Level,
    message: String,
    fields: Vec<(String, String)>,
}

struct Capture;

static LINES: Mutex<Vec<Line>> = Mutex::new(Vec::new());
/// One test at a time: they share the logger.
static SERIAL: Mutex<()> = Mutex::new(());

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        self.0.push((key.to_string(), value.to_string()));
        Ok(())
    }
}

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target().starts_with("vsock_router")
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let mut fields = Vec::new();
            let _ = r.key_values().visit(&mut Fields(&mut fields));
            LINES.lock().unwrap().push(Line {
                level: r.level(),
                message: r.args().to_string(),
                fields,
            });
        }
    }

    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

/// A fresh capture; the lock keeps the other test out.
fn capture() -> std::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Info);
    LINES.lock().unwrap().clear();
    guard
}

fn lines(level: log::Level) -> Vec<Line> {
    LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.level == level)
        .cloned()
        .collect()
}

fn field<'a>(l: &'a Line, key: &str) -> Option<&'a str> {
    l.fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A device in this thread, on a manual clock.
fn guest() -> (
    SimGuest,
    vsock_router::device::VsockDevice<PairBackend>,
    vsock_router::sim::PairHost,
) {
    common::driven_with(DeviceConfig::new(GUEST), true)
}

#[test]
fn a_connection_that_ends_logs_one_info_line_with_its_facts() {
    let _one = capture();
    let (mut g, mut dev, host) = guest();
    let port = g.connect(2, 7000).expect("connected");
    let (_, mut s) = host.accept(T).expect("host end");
    g.send(port, &[7u8; 3000], T).unwrap();
    let mut got = vec![0u8; 3000];
    s.read_exact(&mut got).unwrap();
    s.write_all(&[9u8; 1200]).unwrap();
    assert_eq!(g.recv_exact(port, 1200, T).len(), 1200);
    g.pump(Duration::from_millis(1500));
    assert!(
        lines(log::Level::Info).is_empty(),
        "nothing logged while it runs"
    );
    drop(s);
    assert!(g.close(port, T), "the connection closed");
    g.pump_until(T, |_| !lines(log::Level::Info).is_empty());
    let info = lines(log::Level::Info);
    assert_eq!(info.len(), 1, "{info:?}");
    let l = &info[0];
    assert!(
        l.message.contains(&format!("{GUEST}:{port} <-> 2:7000")),
        "{}",
        l.message
    );
    assert!(
        l.message
            .contains("3000 bytes to the host side, 1200 to the guest"),
        "{}",
        l.message
    );
    assert_eq!(field(l, "path"), Some("host"));
    assert_eq!(field(l, "initiator"), Some("guest"));
    assert_eq!(field(l, "guest_port"), Some(port.to_string().as_str()));
    assert_eq!(field(l, "peer_cid"), Some("2"));
    assert_eq!(field(l, "peer_port"), Some("7000"));
    assert_eq!(field(l, "bytes_to_host"), Some("3000"));
    assert_eq!(field(l, "bytes_to_guest"), Some("1200"));
    assert_eq!(field(l, "end"), Some("closed"));
    // The simulated time it lasted (the clock moved only as the guest waited): at least the
    // 1.5 s wait, not more than a few of the guest's 10 s bounds.
    let secs: f64 = field(l, "seconds").unwrap().parse().unwrap();
    assert!((1.5..30.0).contains(&secs), "{secs}");
    assert!(
        lines(log::Level::Warn).is_empty(),
        "{:?}",
        lines(log::Level::Warn)
    );
    assert!(dev.reset());
}

#[test]
fn a_flooding_guest_gets_one_warning_per_interval_with_the_counts() {
    let _one = capture();
    let (mut g, mut dev, _host) = guest();
    let spoofed = |i: u32| common::request(99, 40_000 + i);
    // Ten thousand spoofed packets, and as many with an unknown op, within the interval.
    for i in 0..10_000 {
        g.send_packet(&spoofed(i), &[]);
        let mut bad = spoofed(i);
        bad.src_cid = GUEST;
        bad.op = 99;
        g.send_packet(&bad, &[]);
        if i % 64 == 0 {
            g.pump(Duration::ZERO);
        }
    }
    g.pump(Duration::from_millis(100));
    let warn = lines(log::Level::Warn);
    assert_eq!(
        warn.len(),
        1,
        "one line for the first misbehaviour: {warn:?}"
    );
    assert!(
        warn[0].message.contains("guest CID 3 misbehaved"),
        "{}",
        warn[0].message
    );
    // Once the interval has passed, one more line sums up the rest.
    g.pump(WARN_INTERVAL);
    let warn = lines(log::Level::Warn);
    assert_eq!(warn.len(), 2, "{warn:?}");
    // And a new interval starts: more misbehaviour waits for the next line.
    g.send_packet(&spoofed(0), &[]);
    g.pump(Duration::from_millis(10));
    assert_eq!(lines(log::Level::Warn).len(), 2);
    let sum = &warn[1].message;
    let first = &warn[0].message;
    // Together the two lines account for every bad packet.
    let count = |m: &str, kind: &str| -> u64 {
        m.split(", ")
            .flat_map(|p| p.split(": "))
            .filter(|p| p.contains(&format!("({kind})")))
            .filter_map(|p| p.split(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(
        count(first, "spoofed_src") + count(sum, "spoofed_src"),
        10_000,
        "{first}\n{sum}"
    );
    assert_eq!(
        count(first, "bad_op") + count(sum, "bad_op"),
        10_000,
        "{first}\n{sum}"
    );
    assert!(dev.reset());
}
