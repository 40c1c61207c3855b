//! The device benchmark: bulk each way with every TX layout and two `buf_alloc` sizes, 64-byte
//! request/response round trips, 100 and 1000 concurrent connections, each over the socket-pair
//! backend and the real hybrid Unix host backend; the `memcpy` ceiling in the same run. For
//! each workload: min/median/max of `--repeat` runs, and the CPU seconds per GiB (or µs per
//! round trip) of the device thread, the guest (driver) thread and the whole process.
//!
//! ```text
//! cargo run --release --example bench [-- --mib N] [--repeat R] [--rr N] [--only PAT,...]
//!                                        [--quick] [--tsv] [--list] [--legacy-driver]
//!                                        [--pin D,R] [--busy-poll-us N]
//! ```
//!
//! See `docs/performance.md`; `scripts/bench-compare.sh` runs two builds of it interleaved.

mod bulk;
mod conns;
mod cpu;
mod memcpy;
mod rig;
mod rr;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bulk::Dir;
use rig::{Daemon, Kind};
use vsock_router::sim::TxLayout;

/// Bound of each run; a run that takes longer fails.
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

static LEGACY: AtomicBool = AtomicBool::new(false);
/// `--busy-poll-us`: the device thread's busy polling, in microseconds (0: off).
static BUSY_POLL_US: AtomicUsize = AtomicUsize::new(0);

/// The device thread's busy polling (`--busy-poll-us`).
pub fn busy_poll() -> Duration {
    Duration::from_micros(BUSY_POLL_US.load(Ordering::Relaxed) as u64)
}
/// `--pin`: 1 + the device thread's CPU, and 1 + every other thread's (0: not pinned).
static PIN: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// The CPUs of `--pin D,R`: the device thread's and every other thread's.
pub fn pinned() -> Option<(usize, usize)> {
    match PIN.each_ref().map(|p| p.load(Ordering::Relaxed)) {
        [0, _] | [_, 0] => None,
        [d, r] => Some((d - 1, r - 1)),
    }
}

/// Whether the simulated driver runs as the tests use it (`--legacy-driver`).
pub fn legacy() -> bool {
    LEGACY.load(Ordering::Relaxed)
}

/// A buffer whose slice starts at a chosen offset within a 4 KiB page, filled with a pattern.
pub struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    /// `len` bytes starting `page_off` bytes into a page.
    pub fn new(len: usize, page_off: usize) -> Aligned {
        let mut buf = vec![0u8; len + 8192];
        let at = buf.as_ptr() as usize % 4096;
        let off = (page_off % 4096 + 4096 - at) % 4096;
        let mut x: u32 = 0x9e37_79b9;
        for b in &mut buf[off..off + len] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        Aligned { buf, off, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// One run of a workload.
pub struct Sample {
    /// Wall time of the measured part.
    pub wall: Duration,
    /// Bytes moved, or round trips.
    pub amount: f64,
    /// CPU seconds over the same window.
    pub cpu: cpu::Cpu,
    /// Further figures of the run, shown for the median run.
    pub extra: Vec<(&'static str, f64)>,
}

#[derive(Clone, Debug)]
enum Work {
    Memcpy(usize, usize),
    Bulk(Kind, Dir, u32),
    Rr(Kind),
    Conns(Kind, usize, bool),
}

impl Work {
    /// Whether the amount is round trips (else bytes).
    fn per_op(&self) -> bool {
        matches!(self, Work::Rr(_))
    }
}

struct Opts {
    mib: u64,
    repeat: usize,
    rr: u64,
    only: Vec<String>,
    tsv: bool,
    list: bool,
    quick: bool,
    legacy: bool,
    pin: Option<(usize, usize)>,
    busy_poll_us: u64,
    /// `--vhost-user OURS,THEIRS`: the two daemons' binaries.
    vhost_user: Option<[std::path::PathBuf; 2]>,
}

const USAGE: &str = "usage: bench [--mib N] [--repeat R] [--rr N] [--only PAT[,PAT...]] [--quick] \
[--tsv] [--list] [--legacy-driver] [--pin D,R] [--busy-poll-us N] [--vhost-user OURS,THEIRS]
  --mib N     MiB per bulk run and per many-connection run (default 512; --quick: 32)
  --repeat R  runs per workload, min/median/max shown (default 3)
  --rr N      round trips per run (default 20000; --quick: 2000)
  --only PAT  only workloads whose name contains one of the comma-separated PATs
  --quick     small sizes, for CI
  --tsv       machine-readable lines: name, unit, median, device CPU, process CPU (medians)
  --list      print the workload names and exit
  --legacy-driver  the simulated driver as the tests run it, to see what it costs: a kick after
              every TX packet and RX refill, bulk RX queued and received byte by byte, the TX
              source at page offset 16 (aliasing the guest's copy modulo 4 KiB)
  --pin D,R   pins each device thread to CPU D and the guest and host threads to CPU R
  --busy-poll-us N  the device thread polls up to N microseconds before it sleeps (the
              `busy_poll_us` option of --vsock; default 0, off)
  --vhost-user OURS,THEIRS  instead: the vhost-user daemons vsock-routerd (OURS) and
              vhost-device-vsock (THEIRS), each in a process of its own, driven by the same
              simulated guest through a vhost-user frontend, runs interleaved, with the ratio of
              medians (OURS / THEIRS); dev = the daemon's whole process";

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        mib: 0,
        repeat: 3,
        rr: 0,
        only: Vec::new(),
        tsv: false,
        list: false,
        quick: false,
        legacy: false,
        pin: None,
        busy_poll_us: 0,
        vhost_user: None,
    };
    let mut args = std::env::args().skip(1);
    let num = |a: &str, v: Option<String>, max: u64| -> Result<u64, String> {
        let v = v.ok_or(format!("{a} needs a value"))?;
        match v.parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(format!("{a}: {v:?} is not in 1..={max}")),
        }
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => o.mib = num(&a, args.next(), 64 * 1024)?,
            "--repeat" => o.repeat = num(&a, args.next(), 50)? as usize,
            "--rr" => o.rr = num(&a, args.next(), 10_000_000)?,
            "--only" => {
                let v = args.next().ok_or("--only needs a value")?;
                o.only
                    .extend(v.split(',').filter(|p| !p.is_empty()).map(String::from));
            }
            "--quick" => o.quick = true,
            "--tsv" => o.tsv = true,
            "--list" => o.list = true,
            "--legacy-driver" => o.legacy = true,
            "--pin" => {
                let v = args.next().ok_or("--pin needs D,R")?;
                let cpus: Vec<usize> = v.split(',').filter_map(|c| c.parse().ok()).collect();
                match cpus[..] {
                    [d, r] if d < 1024 && r < 1024 => o.pin = Some((d, r)),
                    _ => return Err(format!("--pin: {v:?} is not two CPU numbers D,R")),
                }
            }
            "--busy-poll-us" => {
                let v = args.next().ok_or("--busy-poll-us needs a value")?;
                o.busy_poll_us = match v.parse::<u64>() {
                    Ok(n) if n <= 10_000 => n,
                    _ => return Err(format!("--busy-poll-us: {v:?} is not in 0..=10000")),
                };
            }
            "--vhost-user" => {
                let v = args.next().ok_or("--vhost-user needs OURS,THEIRS")?;
                match v.split_once(',') {
                    Some((a, b)) if !a.is_empty() && !b.is_empty() => {
                        o.vhost_user = Some([a.into(), b.into()])
                    }
                    _ => return Err(format!("--vhost-user: {v:?} is not OURS,THEIRS")),
                }
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if o.mib == 0 {
        o.mib = if o.quick { 32 } else { 512 };
    }
    if o.rr == 0 {
        o.rr = if o.quick { 2000 } else { 20_000 };
    }
    Ok(o)
}

fn workloads() -> Vec<(String, Work)> {
    let mut w = vec![
        ("memcpy/64k-hot".to_string(), Work::Memcpy(64 * 1024, 0)),
        ("memcpy/64k-32m".to_string(), Work::Memcpy(32 << 20, 0)),
        (
            "memcpy/64k-hot-dst+28".to_string(),
            Work::Memcpy(64 * 1024, 28),
        ),
    ];
    let layouts = [
        ("linear", TxLayout::Linear),
        ("hdr+data", TxLayout::HeaderThenData),
        ("frags", TxLayout::Fragments(vec![1000, 3000])),
        ("split", TxLayout::SplitHeader(24)),
    ];
    for kind in [Kind::Pair, Kind::Unix] {
        let k = kind.name();
        for (ba, ba_name) in [(256 * 1024, "256k"), (64 * 1024, "64k")] {
            for (l, layout) in &layouts {
                let dir = Dir::GuestToHost(layout.clone(), bulk::CHUNK);
                w.push((
                    format!("bulk/{k}/g2h-{l}/{ba_name}"),
                    Work::Bulk(kind, dir, ba),
                ));
            }
            if ba_name == "256k" {
                // An application writing 1 KiB at a time: one small packet per write, several
                // queued while the device is busy (TX coalescing).
                let dir = Dir::GuestToHost(TxLayout::HeaderThenData, 1024);
                w.push((
                    format!("bulk/{k}/g2h-1k-writes/{ba_name}"),
                    Work::Bulk(kind, dir, ba),
                ));
            }
            let dir = Dir::HostToGuest(false);
            w.push((format!("bulk/{k}/h2g/{ba_name}"), Work::Bulk(kind, dir, ba)));
        }
        // The same over a connection a host program opened (hybrid CONNECT / OK).
        let dir = Dir::HostToGuest(true);
        w.push((
            format!("bulk/{k}/h2g-hostconn/256k"),
            Work::Bulk(kind, dir, 256 * 1024),
        ));
        w.push((format!("rr/{k}"), Work::Rr(kind)));
        for n in [100, 1000] {
            for (to_guest, d) in [(false, "g2h"), (true, "h2g")] {
                w.push((format!("conns/{k}/{n}/{d}"), Work::Conns(kind, n, to_guest)));
            }
        }
    }
    w
}

/// The vhost-user comparison: the same workloads for both daemons, in pairs (ours, theirs).
/// The connection buffer is vhost-device-vsock's default, 64 KiB, for both.
fn vhost_user_workloads() -> Vec<(String, Work, Work)> {
    let (ours, theirs) = (Kind::Vu(Daemon::Ours), Kind::Vu(Daemon::Vdv));
    let mut w = Vec::new();
    let ba = 64 * 1024;
    // Not the fragmented layouts: vhost-device-vsock 0.3.0 refuses a payload in more than one
    // descriptor (`DescriptorLengthTooSmall`), and its connection stalls.
    let layouts = [
        ("linear", TxLayout::Linear),
        ("hdr+data", TxLayout::HeaderThenData),
    ];
    for (l, layout) in &layouts {
        let d = Dir::GuestToHost(layout.clone(), bulk::CHUNK);
        w.push((
            format!("vu/bulk/g2h-{l}/64k"),
            Work::Bulk(ours, d.clone(), ba),
            Work::Bulk(theirs, d, ba),
        ));
    }
    let d = Dir::HostToGuest(false);
    w.push((
        "vu/bulk/h2g/64k".into(),
        Work::Bulk(ours, d.clone(), ba),
        Work::Bulk(theirs, d, ba),
    ));
    w.push(("vu/rr".into(), Work::Rr(ours), Work::Rr(theirs)));
    for (to_guest, d) in [(false, "g2h"), (true, "h2g")] {
        w.push((
            format!("vu/conns/100/{d}"),
            Work::Conns(ours, 100, to_guest),
            Work::Conns(theirs, 100, to_guest),
        ));
    }
    w
}

/// Runs each pair of [`vhost_user_workloads`] `repeat` times, ours and theirs in turn, and
/// prints both and the ratio of medians.
fn run_vhost_user(o: &Opts) -> bool {
    let chosen: Vec<_> = vhost_user_workloads()
        .into_iter()
        .filter(|(n, _, _)| o.only.is_empty() || o.only.iter().any(|p| n.contains(p.as_str())))
        .collect();
    let mut ok = !chosen.is_empty();
    for (name, ours, theirs) in chosen {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..o.repeat {
            match run_once(&ours, o).and_then(|x| Ok((x, run_once(&theirs, o)?))) {
                Ok((x, y)) => {
                    a.push(x);
                    b.push(y);
                }
                Err(e) => {
                    println!("{}{name}: FAILED: {e}", if o.tsv { "# " } else { "" });
                    ok = false;
                    break;
                }
            }
        }
        if a.len() < o.repeat {
            continue;
        }
        report(&format!("{name}/routerd"), &ours, &a, o.tsv);
        report(&format!("{name}/vdv"), &theirs, &b, o.tsv);
        let rate = |s: &Sample| s.amount / s.wall.as_secs_f64();
        let dev = |s: &Sample| s.cpu.dev / s.amount;
        let ratio = |f: &dyn Fn(&Sample) -> f64| {
            let mut x: Vec<f64> = a.iter().map(f).collect();
            let mut y: Vec<f64> = b.iter().map(f).collect();
            median(&mut x) / median(&mut y)
        };
        let (r, c) = (ratio(&rate), ratio(&dev));
        if o.tsv {
            println!("{name}/ratio\tx\t{r:.3}\t{c:.3}\t-");
        } else {
            println!(
                "{:<34} ratio routerd/vdv: {} the rate at {} the daemon CPU per {}",
                format!("{name}/ratio"),
                fmt_num(r),
                fmt_num(c),
                if ours.per_op() { "round trip" } else { "byte" }
            );
        }
    }
    ok
}

fn run_once(work: &Work, o: &Opts) -> Result<Sample, String> {
    let bytes = o.mib << 20;
    match work {
        Work::Memcpy(span, off) => {
            memcpy::run(*span, *off, if o.quick { 512 << 20 } else { 4 << 30 })
        }
        Work::Bulk(kind, dir, ba) => bulk::run(*kind, dir, *ba, bytes),
        Work::Rr(kind) => rr::run(*kind, o.rr),
        Work::Conns(kind, n, to_guest) => conns::run(*kind, *n, *to_guest, bytes),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The figures of `runs`: rates and CPU per GiB (or µs per round trip).
fn report(name: &str, work: &Work, runs: &[Sample], tsv: bool) {
    let per_op = work.per_op();
    let rate = |s: &Sample| s.amount / s.wall.as_secs_f64() / if per_op { 1.0 } else { 1e6 };
    // CPU per GiB in seconds, or per round trip in µs.
    let per = |c: f64, s: &Sample| {
        if per_op {
            c / s.amount * 1e6
        } else {
            c / (s.amount / f64::from(1u32 << 30))
        }
    };
    let mut rates: Vec<f64> = runs.iter().map(rate).collect();
    let mut dev: Vec<f64> = runs.iter().map(|s| per(s.cpu.dev, s)).collect();
    let mut guest: Vec<f64> = runs.iter().map(|s| per(s.cpu.guest, s)).collect();
    let mut process: Vec<f64> = runs.iter().map(|s| per(s.cpu.process, s)).collect();
    let (lo, hi) = rates
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(l, h), &r| (l.min(r), h.max(r)));
    let med = median(&mut rates);
    let (dev, guest, process) = (median(&mut dev), median(&mut guest), median(&mut process));
    let unit = if per_op { "rt/s" } else { "MB/s" };
    if tsv {
        let f = |v: f64| {
            if v.is_nan() {
                "-".into()
            } else {
                format!("{v:.4}")
            }
        };
        println!("{name}\t{unit}\t{med:.1}\t{}\t{}", f(dev), f(process));
        return;
    }
    let mid = runs
        .iter()
        .min_by(|a, b| (rate(a) - med).abs().total_cmp(&(rate(b) - med).abs()))
        .expect("runs");
    let extra: Vec<String> = mid
        .extra
        .iter()
        .map(|(k, v)| format!("{k} {}", fmt_num(*v)))
        .collect();
    let cpu_unit = if per_op { "us/rt" } else { "s/GiB" };
    println!(
        "{name:<34} {unit:>5} {:>9} {:>9} {:>9}  {:>7} {:>7} {:>7} {cpu_unit:<5}  {}",
        fmt_num(lo),
        fmt_num(med),
        fmt_num(hi),
        fmt_num(dev),
        fmt_num(guest),
        fmt_num(process),
        extra.join(", ")
    );
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(bins) = o.vhost_user.clone() {
        for b in &bins {
            if !b.exists() {
                eprintln!("--vhost-user: {} does not exist", b.display());
                return ExitCode::FAILURE;
            }
        }
        let _ = rig::DAEMONS.set(bins);
    }
    let all = workloads();
    let chosen: Vec<&(String, Work)> = all
        .iter()
        .filter(|(n, _)| o.only.is_empty() || o.only.iter().any(|p| n.contains(p.as_str())))
        .collect();
    if o.list {
        for (n, _) in &all {
            println!("{n}");
        }
        for (n, _, _) in vhost_user_workloads() {
            println!("{n}  (--vhost-user)");
        }
        return ExitCode::SUCCESS;
    }
    if chosen.is_empty() && o.vhost_user.is_none() {
        eprintln!("no workload matches {:?} (see --list)", o.only);
        return ExitCode::FAILURE;
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; measure with --release");
    }
    // Nothing here may open an AF_VSOCK socket; the library refuses to while this is set.
    std::env::set_var(vsock_router::backend::vsock::FORBID_ENV, "1");
    // Two fds per connection and the device's own: beyond a default soft limit of 1024.
    let _ = vsock_router::sys::raise_fd_limit(8192);
    LEGACY.store(o.legacy, Ordering::Relaxed);
    BUSY_POLL_US.store(o.busy_poll_us as usize, Ordering::Relaxed);
    if let Some((d, r)) = o.pin {
        PIN[0].store(d + 1, Ordering::Relaxed);
        PIN[1].store(r + 1, Ordering::Relaxed);
    }
    let head = format!(
        "bench: {} MiB per bulk/conns run, {} round trips per rr run, {} runs each; \
         CPU columns are medians (dev = device thread, guest = simulated driver + guest app, \
         proc = whole process){}",
        o.mib,
        o.rr,
        o.repeat,
        match (o.legacy, o.pin, o.busy_poll_us) {
            (false, None, 0) => String::new(),
            (l, p, b) => format!(
                ";{}{}{}",
                if l { " LEGACY DRIVER" } else { "" },
                p.map_or(String::new(), |(d, r)| format!(
                    " device on CPU {d}, the rest on CPU {r}"
                )),
                if b > 0 {
                    format!(" device thread busy-polls {b} us")
                } else {
                    String::new()
                }
            ),
        }
    );
    if o.tsv {
        println!("# {head}");
    } else {
        println!("{head}");
        println!(
            "{:<34} {:>5} {:>9} {:>9} {:>9}  {:>7} {:>7} {:>7} {:<5}  median run",
            "workload", "unit", "min", "median", "max", "dev", "guest", "proc", "cpu"
        );
    }
    if o.vhost_user.is_some() {
        return if run_vhost_user(&o) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let mut failed = false;
    for (name, work) in chosen {
        let mut runs = Vec::with_capacity(o.repeat);
        for _ in 0..o.repeat {
            match run_once(work, &o) {
                Ok(s) => runs.push(s),
                Err(e) => {
                    println!("{}{name}: FAILED: {e}", if o.tsv { "# " } else { "" });
                    failed = true;
                    break;
                }
            }
        }
        if runs.len() == o.repeat {
            report(name, work, &runs, o.tsv);
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
