//! Parsing of the machine-readable lines guests print on their serial console.
//!
//! Format (each at the start of a line; `\r` is ignored):
//! - `VRTEST <name> PASS|FAIL|SKIP [detail]`: one check's verdict
//! - `VRTEST-INFO <name> <value>`: a measurement or note, never a verdict
//! - `VRTEST-BOOT <which> [...]`: printed by `/init` once user space runs
//! - `VRTEST-DONE rc=<n>`: the scenario finished with exit code `n`
//! - `VRTEST-ALIVE uptime_ms=<n>`: the KVM host's heartbeat, printed by its `/init` every
//!   [`HEARTBEAT_SECS`] from its boot line until the scenario ends, never a verdict

use std::collections::BTreeMap;
use std::fmt;

/// Verdict of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The check passed.
    Pass,
    /// The check failed.
    Fail,
    /// The check could not run (not a failure).
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        })
    }
}

/// One `VRTEST` result line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    /// Check name (a repeated name gets `#2`, `#3`, ... appended).
    pub name: String,
    /// Verdict.
    pub status: Status,
    /// Rest of the line (may be empty).
    pub detail: String,
}

/// How often the KVM host's `/init` prints [`HEARTBEAT`] (`integration/images/rootfs/host-init`).
pub const HEARTBEAT_SECS: u64 = 30;

/// The KVM host's heartbeat line.
pub const HEARTBEAT: &str = "VRTEST-ALIVE";

/// The boot line after which the KVM host prints [`HEARTBEAT`].
pub const HEARTBEAT_FROM: &str = "VRTEST-BOOT kvm-host";

/// Everything the harness understood from a console log.
#[derive(Clone, Debug, Default)]
pub struct ConsoleReport {
    /// Results by name.
    pub results: BTreeMap<String, CheckResult>,
    /// Result names in the order they were printed.
    pub order: Vec<String>,
    /// `VRTEST-INFO` values by name (a repeated name keeps the last value).
    pub info: BTreeMap<String, String>,
    /// The text after each `VRTEST-BOOT`.
    pub boots: Vec<String>,
    /// The scenario's exit code from `VRTEST-DONE rc=<n>`, once seen.
    pub done_rc: Option<i32>,
    /// Lines that start with `VRTEST` but could not be parsed.
    pub malformed: Vec<String>,
    /// Heartbeat lines (`VRTEST-ALIVE`) seen.
    pub heartbeats: usize,
}

impl ConsoleReport {
    /// True once `VRTEST-DONE` was seen.
    pub fn is_done(&self) -> bool {
        self.done_rc.is_some()
    }

    /// Verdict of the check `name`, if it was reported.
    pub fn status(&self, name: &str) -> Option<Status> {
        self.results.get(name).map(|r| r.status)
    }

    /// The results with status FAIL, in console order.
    pub fn failures(&self) -> Vec<&CheckResult> {
        self.order
            .iter()
            .filter_map(|n| self.results.get(n))
            .filter(|r| r.status == Status::Fail)
            .collect()
    }

    /// Problems that make a finished run a failure: FAIL results, malformed
    /// lines, a missing `VRTEST-DONE`, a non-zero exit code, no result at
    /// all, and each name in `required` that is absent or not PASS.
    pub fn problems(&self, required: &[&str]) -> Vec<String> {
        let mut problems: Vec<String> = self
            .failures()
            .iter()
            .map(|r| format!("FAIL {}: {}", r.name, r.detail))
            .collect();
        problems.extend(
            self.malformed
                .iter()
                .map(|l| format!("malformed line: {l}")),
        );
        match self.done_rc {
            None => problems.push("no VRTEST-DONE line".to_string()),
            Some(0) => {}
            Some(rc) => problems.push(format!("scenario exit code {rc}")),
        }
        if self.results.is_empty() {
            problems.push("no VRTEST result line at all".to_string());
        }
        for name in required {
            match self.results.get(*name) {
                None => problems.push(format!("required check {name} not reported")),
                Some(r) if r.status != Status::Pass => problems.push(format!(
                    "required check {name} is {}: {}",
                    r.status, r.detail
                )),
                Some(_) => {}
            }
        }
        problems
    }
}

/// Parses every `VRTEST` line of a serial console log.
pub fn parse_console(text: &str) -> ConsoleReport {
    let mut report = ConsoleReport::default();
    for raw in text.split('\n') {
        let line = raw.trim_end_matches('\r').trim_end();
        let Some((tag, rest)) = split_word(line) else {
            continue;
        };
        match tag {
            "VRTEST" => match parse_result(rest) {
                Some(mut r) => {
                    let base = r.name.clone();
                    let mut n = 1;
                    while report.results.contains_key(&r.name) {
                        n += 1;
                        r.name = format!("{base}#{n}");
                    }
                    report.order.push(r.name.clone());
                    report.results.insert(r.name.clone(), r);
                }
                None => report.malformed.push(line.to_string()),
            },
            "VRTEST-INFO" => match split_word(rest) {
                Some((name, value)) => {
                    report.info.insert(name.to_string(), value.to_string());
                }
                None => report.malformed.push(line.to_string()),
            },
            "VRTEST-BOOT" => report.boots.push(rest.to_string()),
            HEARTBEAT => report.heartbeats += 1,
            "VRTEST-DONE" => match rest.strip_prefix("rc=").and_then(|v| v.trim().parse().ok()) {
                Some(rc) => report.done_rc = Some(rc),
                None => {
                    report.malformed.push(line.to_string());
                    report.done_rc = Some(-1);
                }
            },
            t if t.starts_with("VRTEST") => report.malformed.push(line.to_string()),
            _ => {}
        }
    }
    report
}

/// What a kernel prints when it faults: oopses and BUGs (`BUG: unable to handle page fault`,
/// `BUG: TASK stack guard page was hit`, `watchdog: BUG: soft lockup - CPU#1 stuck`, `kernel
/// BUG at ...`, `Oops: 0000 [#1]`, `stack guard page: 0000 [#1]`) and panics.
pub const KERNEL_FAULT_MARKERS: &[&str] = &[
    "BUG:",
    "kernel BUG at",
    "Oops",
    "stack guard page",
    "Kernel panic",
];

/// True when `line` of a VM's serial console is a fault message of the kernel that QEMU boots
/// (the KVM host's): a printk line (`[  12.345678] ...`, Debian kernels print the time) with a
/// [`KERNEL_FAULT_MARKERS`] marker after the timestamp. Never for our own result lines
/// (`VRTEST...`, whose details may quote a log) nor for a nested guest's console that a
/// scenario relays (`vr_relay`: `PREFIX: <line>`): an inner guest's oops is a failure of the
/// VMM under test, not of the platform. The timestamp may follow other text on the line (a
/// kernel message interrupting a half-written line of user space).
pub fn is_kernel_fault_line(line: &str) -> bool {
    let line = line.trim_end_matches('\r');
    if line.starts_with("VRTEST") || relay_prefix(line).is_some() {
        return false;
    }
    let mut rest = line;
    while let Some(at) = rest.find('[') {
        let after = &rest[at + 1..];
        if let Some(len) = printk_time_len(after) {
            let msg = &after[len..];
            if KERNEL_FAULT_MARKERS.iter().any(|m| msg.contains(m)) {
                return true;
            }
        }
        rest = after;
    }
    false
}

/// What a scenario prints when reference software it runs (not the code under test: QEMU as
/// the reference VMM) stalls on the emulated platform: `VRTEST-PLATFORM-FAULT <detail>`
/// (`vr_stall_watch`).
pub const PLATFORM_FAULT: &str = "VRTEST-PLATFORM-FAULT";

/// The platform's faults on `console`: the KVM host's kernel faults ([`kernel_fault_lines`])
/// and the stalls scenarios report ([`PLATFORM_FAULT`] lines).
pub fn platform_fault_lines(console: &str) -> Vec<String> {
    let mut lines = kernel_fault_lines(console);
    lines.extend(
        console
            .split('\n')
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| l.starts_with(PLATFORM_FAULT))
            .map(str::to_string),
    );
    lines
}

/// The lines of `console` for which [`is_kernel_fault_line`] holds.
pub fn kernel_fault_lines(console: &str) -> Vec<String> {
    console
        .split('\n')
        .filter(|l| is_kernel_fault_line(l))
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// `PREFIX` of a line `vr_relay PREFIX` printed for a nested console (`PREFIX: text`).
pub(crate) fn relay_prefix(line: &str) -> Option<&str> {
    let (prefix, _) = line.split_once(": ")?;
    let ok = !prefix.is_empty()
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
    ok.then_some(prefix)
}

/// Length of `   12.345678]` (a printk time without its `[`), if `s` starts with one.
fn printk_time_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && b[i] == b' ' {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if i == int_start || i >= b.len() || b[i] != b'.' {
        return None;
    }
    i += 1;
    let frac_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if i == frac_start || i >= b.len() || b[i] != b']' {
        return None;
    }
    Some(i + 1)
}

/// Splits off the first space-separated word; `None` for an empty line.
fn split_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    Some(match s.split_once(' ') {
        Some((w, rest)) => (w, rest.trim()),
        None => (s, ""),
    })
}

fn parse_result(rest: &str) -> Option<CheckResult> {
    let (name, rest) = split_word(rest)?;
    let (status, detail) = split_word(rest)?;
    let status = match status {
        "PASS" => Status::Pass,
        "FAIL" => Status::Fail,
        "SKIP" => Status::Skip,
        _ => return None,
    };
    let valid = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._:/-#".contains(c));
    if !valid {
        return None;
    }
    Some(CheckResult {
        name: name.to_string(),
        status,
        detail: detail.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "[    0.1] kernel noise\r\n\
        VRTEST-BOOT kvm-host uptime_ms=1450\r\n\
        VRTEST host-modules-kvm PASS irqbypass.ko ccp.ko\r\n\
        VRTEST dev-kvm PASS \r\n\
        VRTEST-INFO boot-ms 790\n\
        VRTEST-ALIVE uptime_ms=31000\r\n\
        VRTEST x SKIP not here\n\
        VRTEST x FAIL second x\n\
        inner: VRTEST not-a-result PASS\n\
        VRTEST-DONE rc=0\r\n\
        [    2.0] reboot: Restarting system\n";

    #[test]
    fn parses_results_info_boot_and_done() {
        let r = parse_console(LOG);
        assert_eq!(r.status("host-modules-kvm"), Some(Status::Pass));
        assert_eq!(r.results["host-modules-kvm"].detail, "irqbypass.ko ccp.ko");
        assert_eq!(r.results["dev-kvm"].detail, "");
        assert_eq!(r.status("x"), Some(Status::Skip));
        assert_eq!(r.status("x#2"), Some(Status::Fail));
        assert_eq!(r.status("not-a-result"), None);
        assert_eq!(r.info["boot-ms"], "790");
        assert_eq!(r.boots, vec!["kvm-host uptime_ms=1450".to_string()]);
        assert_eq!(r.done_rc, Some(0));
        assert!(r.malformed.is_empty());
        assert_eq!(r.heartbeats, 1);
        assert_eq!(r.order, ["host-modules-kvm", "dev-kvm", "x", "x#2"]);
        assert_eq!(r.problems(&["dev-kvm"]), ["FAIL x#2: second x"]);
    }

    #[test]
    fn kvm_host_kernel_faults_are_recognised() {
        for line in [
            // Seen on the KVM host (Debian 6.1.0-57) in a user's run and in ours.
            "[  212.634817] BUG: TASK stack guard page was hit at 00000000a1b2c3d4 (stack is 0000000011112222..0000000033334444)",
            "[  212.634901] stack guard page: 0000 [#1] PREEMPT SMP NOPTI",
            "[   64.100321] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [vcpu0:201]\r",
            "[    9.000001] BUG: unable to handle page fault for address: ffffffffc0a00000",
            "[    9.000002] Oops: 0000 [#1] PREEMPT SMP NOPTI",
            "[    9.000003] kernel BUG at mm/slub.c:379!",
            "[    5.318542] Kernel panic - not syncing: sysrq triggered crash",
            // A kernel message that interrupted a line user space was writing.
            "socat[12] N start[  33.123456] BUG: soft lockup - CPU#0 stuck for 23s! [sh:1]",
        ] {
            assert!(is_kernel_fault_line(line), "{line}");
        }
        let console = "VRTEST a PASS\n[ 1.000000] BUG: x\nplain\n";
        assert_eq!(kernel_fault_lines(console), ["[ 1.000000] BUG: x"]);
        let stalled =
            format!("{console}\nVRTEST-PLATFORM-FAULT q made no progress for 240 s: x\r\n");
        assert_eq!(
            platform_fault_lines(&stalled),
            [
                "[ 1.000000] BUG: x",
                "VRTEST-PLATFORM-FAULT q made no progress for 240 s: x"
            ]
        );
    }

    #[test]
    fn inner_guest_faults_and_ordinary_lines_are_not_platform_faults() {
        for line in [
            // The inner guest's kernel, relayed by vr_relay: a failure of the VMM under test.
            "inner: [    3.210000] BUG: kernel NULL pointer dereference, address: 0000000000000000",
            "inner: [    3.210100] Oops: 0002 [#1] SMP",
            "a: [    4.000000] Kernel panic - not syncing: Attempted to kill init!",
            "nested/x: [    1.5] BUG: soft lockup - CPU#0 stuck for 22s!",
            // Our result lines may quote logs.
            "VRTEST inner-log FAIL [    3.2] BUG: kernel NULL pointer dereference",
            "VRTEST-INFO connections [ 1.0] Oops",
            // Ordinary KVM host and scenario lines.
            "[    0.660603] PCI: Fatal: No config space access function found",
            "[   13.542101] kvm [185]: vcpu0, guest rIP: 0xffffffff81002899 Unhandled WRMSR(0xc0010007) = 0xffff",
            "[   96.478852] reboot: Restarting system",
            "BUG: words without a kernel timestamp (a scenario's own output)",
            "grep: [x.y] Oops",
            "",
        ] {
            assert!(!is_kernel_fault_line(line), "{line}");
        }
    }

    #[test]
    fn missing_done_missing_required_and_garbage_are_problems() {
        let r = parse_console("VRTEST a PASS\nVRTEST b MAYBE\nVRTEST-DONE rc=3\n");
        let p = r.problems(&["a", "c"]);
        assert!(
            p.iter()
                .any(|l| l.contains("malformed line: VRTEST b MAYBE")),
            "{p:?}"
        );
        assert!(p.iter().any(|l| l == "scenario exit code 3"), "{p:?}");
        assert!(
            p.iter()
                .any(|l| l.contains("required check c not reported")),
            "{p:?}"
        );
        let r = parse_console("nothing\n");
        let p = r.problems(&[]);
        assert!(p.contains(&"no VRTEST-DONE line".to_string()), "{p:?}");
        assert!(
            p.contains(&"no VRTEST result line at all".to_string()),
            "{p:?}"
        );
    }
}
