//! CPU time of the device thread (or of a vhost-user daemon's whole process), the guest (main)
//! thread and the whole process.
//!
//! A thread's time is the first field of `/proc/self/task/<tid>/schedstat` (nanoseconds on a
//! CPU, the same accounting as utime + stime of `/proc/self/task/<tid>/stat`, which is the
//! fallback, in 10 ms ticks). The process's is `getrusage(RUSAGE_SELF)`, in microseconds, which
//! also counts the host threads that ended before the reading.

use std::fs;
use std::time::{Duration, Instant};

/// Seconds per clock tick: USER_HZ is 100 on every Linux architecture this runs on.
const TICK: f64 = 0.01;

/// CPU seconds of thread `tid`.
fn thread_secs(tid: u32) -> f64 {
    let sched = fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok();
    if let Some(ns) = sched.and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok()) {
        return ns as f64 * 1e-9;
    }
    ticks(&format!("/proc/self/task/{tid}/stat")).map_or(f64::NAN, |t| t as f64 * TICK)
}

/// User + system CPU seconds of the whole process, its ended threads included.
fn process_secs() -> f64 {
    // SAFETY: an all-zero `rusage` is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage` that outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// utime + stime of a `stat` file, in ticks.
fn ticks(path: &str) -> Option<u64> {
    let s = fs::read_to_string(path).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `state` is field 3, utime field 14 and stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The thread id of the device thread of the guest with CID `cid` (the device names its thread
/// `vsock-<cid>`), waiting up to a second for it to appear.
pub fn device_tid(cid: u64) -> Option<u32> {
    let want = format!("vsock-{cid}");
    let end = Instant::now() + Duration::from_secs(1);
    loop {
        for e in fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == want {
                return e.file_name().to_str()?.parse().ok();
            }
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// CPU seconds of the device thread, the guest thread and the process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub dev: f64,
    pub guest: f64,
    pub process: f64,
}

/// Where the device runs.
#[derive(Clone, Copy, Debug)]
pub enum Device {
    /// A thread of this process.
    Thread(u32),
    /// A process of its own (a vhost-user daemon): all its threads.
    Process(u32),
}

/// Where the CPU time of one run is read.
pub struct CpuProbe {
    dev: Device,
    guest: u32,
    start: Cpu,
}

/// CPU seconds of every thread of process `pid` (the threads alive now).
fn other_process_secs(pid: u32) -> f64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return f64::NAN;
    };
    let mut sum = 0.0;
    for t in tasks.flatten() {
        let sched = fs::read_to_string(t.path().join("schedstat")).ok();
        match sched.and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok()) {
            Some(ns) => sum += ns as f64 * 1e-9,
            None => return f64::NAN,
        }
    }
    sum
}

impl CpuProbe {
    /// Starts counting for the device; the guest runs on the calling thread, which must be the
    /// main thread (its tid is the process id).
    pub fn start(dev: Device) -> CpuProbe {
        let mut p = CpuProbe {
            dev,
            guest: std::process::id(),
            start: Cpu::default(),
        };
        p.start = p.now();
        p
    }

    fn now(&self) -> Cpu {
        Cpu {
            dev: match self.dev {
                Device::Thread(tid) => thread_secs(tid),
                Device::Process(pid) => other_process_secs(pid),
            },
            guest: thread_secs(self.guest),
            process: process_secs(),
        }
    }

    /// CPU seconds since [`CpuProbe::start`].
    pub fn used(&self) -> Cpu {
        let n = self.now();
        Cpu {
            dev: n.dev - self.start.dev,
            guest: n.guest - self.start.guest,
            process: n.process - self.start.process,
        }
    }
}

/// Pins thread `tid` (0: the calling thread) to CPU `cpu`. Threads it spawns later inherit it.
pub fn pin(tid: u32, cpu: usize) -> Result<(), String> {
    // SAFETY: an all-zero `cpu_set_t` is the empty set, a valid value of the plain C struct.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is checked to lie within the set, which is valid and writable.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(format!("CPU {cpu} is beyond CPU_SETSIZE"));
        }
        libc::CPU_SET(cpu, &mut set);
    }
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a valid `cpu_set_t` of `size` bytes that outlives the call.
    let r = unsafe { libc::sched_setaffinity(tid as libc::pid_t, size, &set) };
    if r != 0 {
        return Err(format!(
            "pinning thread {tid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
