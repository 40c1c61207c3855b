//! Triple faults of inner guests. The inner guests boot with `reboot=k` (`vr_inner_cmdline`),
//! so they reboot through the i8042 reset and a triple fault (`KVM_EXIT_SHUTDOWN`) is a crash
//! too deep for the guest kernel's own fault handlers: `vsock-vmm` logs
//! `vcpuN: triple fault: rip=... rsp=... cr2=...` and exits 0. Relayed under the inner guest's
//! prefix (`vr_relay`), that line is found here, and `rip` located in the inner kernel's symbol
//! table where the state survived (KVM on AMD, the emulated KVM host's CPU, resets the vCPU at a
//! triple fault and `vsock-vmm` then says so; Intel's keeps it).
//!
//! Whose fault it is:
//! - before `vsock-vmm` activated the vsock device (its log line `virtio-mmio: device type 19
//!   activated`), the guest has run nothing of the code under test but the VMM's fixed boot
//!   set-up and device registers: the emulated platform's (nested SVM under TCG);
//! - after activation, when the inner kernel reported a fault first (a printk line with `BUG:`,
//!   `Oops`, `Kernel panic`, `WARNING:`, ... under the guest's prefix, [`kernel_report`]): a
//!   failure of the code under test, reported with the run's problems;
//! - after activation without a word from the inner kernel: the platform's again. The device
//!   writes guest memory only into the RX buffers the driver posted (checked by the chain tests,
//!   the hostile-queue tests and the guard bytes of every bulk test and device fuzz input), and
//!   a Linux kernel whose memory is corrupted reports it (oops, BUG, list corruption) on its
//!   double-fault handler's own stack; a triple fault without a line means the virtual CPU could
//!   not deliver an exception at all. The platform does that by itself (inner guests died so
//!   before their vsock module was loaded, and the KVM host's own KVM overflowed its stack
//!   running a vCPU); see docs/testing.md, "Reliability".
//!
//! The platform's cases make the run a [`crate::HarnessError::PlatformFault`]: run once more,
//! counted and printed, and a second one fails the test.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::console::{is_kernel_fault_line, relay_prefix};

/// What `vsock-vmm` logs when the vsock device starts (virtio device type 19).
const ACTIVATED: &str = "virtio-mmio: device type 19 activated";
/// What precedes the vCPU state in `vsock-vmm`'s warning about a triple fault.
const TRIPLE_FAULT: &str = "triple fault: rip=";

/// One triple fault of an inner guest's vCPU, as relayed on a console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InnerTripleFault {
    /// The relay prefix of the inner guest's log (`inner`, `a`, `client`, ...).
    pub prefix: String,
    /// The vCPU state `vsock-vmm` logged (`rip=0x... rsp=0x... ...`).
    pub state: String,
    /// Whether `vsock-vmm` had activated the vsock device before.
    pub after_activation: bool,
    /// The first fault the inner kernel reported before it ([`kernel_report`]), if any.
    pub kernel_report: Option<String>,
}

impl InnerTripleFault {
    /// Whether the emulated platform is to blame (see the module documentation of
    /// `inner_faults`): the vsock device had not started, or the inner kernel said nothing
    /// before it died.
    pub fn is_platform_fault(&self) -> bool {
        !self.after_activation || self.kernel_report.is_none()
    }

    /// `rip` of the logged state.
    pub fn rip(&self) -> Option<u64> {
        let hex = self.state.strip_prefix("rip=0x")?;
        let hex = hex.split(' ').next()?;
        u64::from_str_radix(hex, 16).ok()
    }

    /// One line for a report: whose fault, where (with the symbol of `rip` in `vmlinux`, the
    /// inner kernel, when it can be found).
    pub fn describe(&self, vmlinux: Option<&Path>) -> String {
        let symbol = self
            .rip()
            .zip(vmlinux)
            .and_then(|(rip, v)| symbolize(v, rip))
            .map(|s| format!(" in {s}"))
            .unwrap_or_default();
        let when = match (&self.kernel_report, self.after_activation) {
            (_, false) => "before vsock-vmm activated the vsock device".to_string(),
            (None, true) => {
                "after vsock-vmm activated the vsock device, without a word from its kernel"
                    .to_string()
            }
            (Some(r), true) => {
                format!("after vsock-vmm activated the vsock device; its kernel reported `{r}`")
            }
        };
        format!(
            "{}: the inner guest crashed (vCPU triple fault, {when}){symbol}: {}",
            self.prefix, self.state
        )
    }
}

/// Every inner-guest triple fault relayed on `console`, in order.
pub fn inner_triple_faults(console: &str) -> Vec<InnerTripleFault> {
    let mut activated: Vec<&str> = Vec::new();
    // The first fault report of each inner guest: (prefix, line).
    let mut reports: Vec<(&str, &str)> = Vec::new();
    let mut found = Vec::new();
    for line in console.split('\n') {
        let line = line.trim_end_matches('\r');
        let Some(prefix) = relay_prefix(line) else {
            continue;
        };
        let text = &line[prefix.len() + 2..];
        if text.contains(ACTIVATED) {
            activated.push(prefix);
        } else if let Some(at) = text.find(TRIPLE_FAULT) {
            found.push(InnerTripleFault {
                prefix: prefix.to_string(),
                state: text[at + "triple fault: ".len()..].trim().to_string(),
                after_activation: activated.contains(&prefix),
                kernel_report: reports
                    .iter()
                    .find(|(p, _)| *p == prefix)
                    .map(|(_, r)| r.to_string()),
            });
        } else if kernel_report(text) && !reports.iter().any(|(p, _)| *p == prefix) {
            reports.push((prefix, text));
        }
    }
    found
}

/// Whether `text`, a line of an inner guest's console (without the relay prefix), is its
/// kernel reporting a fault: a printk line with one of the KVM host's fault markers
/// ([`is_kernel_fault_line`]) or a `WARNING:`.
pub fn kernel_report(text: &str) -> bool {
    is_kernel_fault_line(text) || (text.contains("] WARNING:") && text.starts_with('['))
}

/// `symbol+0xoffset` of the text address `addr` in the ELF `vmlinux` (its symbol table, by
/// `nm`); `None` when `nm` fails or no text symbol precedes `addr`.
pub fn symbolize(vmlinux: &Path, addr: u64) -> Option<String> {
    let out = Command::new("nm")
        .args(["-n", "--defined-only"])
        .arg(vmlinux)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    symbol_at(&String::from_utf8_lossy(&out.stdout), addr)
}

/// The last text symbol at or below `addr` in `nm -n` output.
fn symbol_at(nm: &str, addr: u64) -> Option<String> {
    let mut best = None;
    for line in nm.lines() {
        let mut words = line.split_whitespace();
        let (Some(a), Some(kind), Some(name)) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        if !matches!(kind, "t" | "T" | "W" | "w") {
            continue;
        }
        let Ok(a) = u64::from_str_radix(a, 16) else {
            continue;
        };
        if a > addr {
            break;
        }
        best = Some((a, name));
    }
    best.map(|(a, name)| format!("{name}+{:#x}", addr - a))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = "rip=0xffffffff81012345 rsp=0xffffc90000003f58 rflags=0x10046 cs=0x10 \
                         cr0=0x80050033 cr2=0x0 cr3=0x2a0c000 cr4=0x3506f0 idt=0xfffffe0000000000/0xfff";

    #[test]
    fn finds_triple_faults_and_whether_the_device_ran() {
        let console = format!(
            "VRTEST-BOOT kvm-host\n\
             a: [2026-12-01T10:00:00Z INFO  vsock_vmm::transport::mmio] {ACTIVATED} (driver features 0x100000000)\r\n\
             b: [2026-12-01T10:00:01Z WARN  vsock_vmm::vmm] vcpu0: triple fault: {STATE}\n\
             a: [2026-12-01T10:00:02Z WARN  vsock_vmm::vmm] vcpu0: triple fault: {STATE}\n\
             a: [2026-12-01T10:00:02Z INFO  vsock_vmm::vmm] exiting: vcpu0: triple fault (a reboot with reboot=t, otherwise a guest crash) at {STATE}\n\
             VRTEST a/done FAIL rc=1 vcpu0: triple fault: {STATE}\n"
        );
        let got = inner_triple_faults(&console);
        assert_eq!(
            got,
            vec![
                InnerTripleFault {
                    prefix: "b".into(),
                    state: STATE.into(),
                    after_activation: false,
                    kernel_report: None,
                },
                InnerTripleFault {
                    prefix: "a".into(),
                    state: STATE.into(),
                    after_activation: true,
                    kernel_report: None,
                },
            ]
        );
        assert_eq!(got[0].rip(), Some(0xffff_ffff_8101_2345));
        assert_eq!(
            got[1].describe(None),
            format!(
                "a: the inner guest crashed (vCPU triple fault, after vsock-vmm activated the \
                 vsock device, without a word from its kernel): {STATE}"
            )
        );
        assert!(got.iter().all(InnerTripleFault::is_platform_fault));
        assert!(inner_triple_faults("inner: [..] vcpu0: guest reboot\n").is_empty());
    }

    #[test]
    fn a_crash_the_inner_kernel_reported_is_the_code_under_tests() {
        let oops = "[   12.345678] BUG: unable to handle page fault for address: ffff888000000000";
        let console = format!(
            "a: [2026-12-01T10:00:00Z INFO  vsock_vmm::transport::mmio] {ACTIVATED} (f)\n\
             b: [2026-12-01T10:00:00Z INFO  vsock_vmm::transport::mmio] {ACTIVATED} (f)\n\
             b: {oops}\n\
             a: [   12.000000] virtio_vsock: something ordinary\n\
             VRTEST a/x FAIL [   13.000000] BUG: quoted in a detail\n\
             a: [2026-12-01T10:00:02Z WARN  vsock_vmm::vmm] vcpu0: triple fault: {STATE}\n\
             b: [2026-12-01T10:00:02Z WARN  vsock_vmm::vmm] vcpu0: triple fault: {STATE}\n"
        );
        let got = inner_triple_faults(&console);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].prefix, "a");
        assert_eq!(got[0].kernel_report, None, "a's kernel said nothing");
        assert!(got[0].is_platform_fault());
        assert_eq!(got[1].prefix, "b");
        assert_eq!(got[1].kernel_report.as_deref(), Some(oops));
        assert!(!got[1].is_platform_fault());
        assert!(got[1]
            .describe(None)
            .contains("its kernel reported `[   12.345678] BUG:"));
        assert!(kernel_report(
            "[    1.000000] WARNING: CPU: 0 PID: 1 at net/vmw_vsock/x.c:1"
        ));
        assert!(!kernel_report(
            "[    1.000000] i8042: Can't read CTR while initializing i8042"
        ));
    }

    #[test]
    fn symbols_are_found_by_address() {
        let nm = "0000000000000000 D __per_cpu_start\n\
                  ffffffff81000000 T _text\n\
                  ffffffff81012300 t do_idle\n\
                  ffffffff81012400 T schedule\n\
                  ffffffff82000000 D _data\n";
        assert_eq!(
            symbol_at(nm, 0xffff_ffff_8101_2345).as_deref(),
            Some("do_idle+0x45")
        );
        assert_eq!(
            symbol_at(nm, 0xffff_ffff_8101_2400).as_deref(),
            Some("schedule+0x0")
        );
        assert_eq!(symbol_at(nm, 0x1000), None);
    }
}
