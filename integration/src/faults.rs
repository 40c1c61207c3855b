//! Platform faults: the emulated KVM host's own kernel oopses, BUGs (soft lockups) or panics
//! now and then under load (seen: `BUG: TASK stack guard page was hit` in an inner guest's vCPU
//! thread, both vCPUs in soft lockup), and an inner guest now and then triple-faults before
//! its vsock device ran (see [`crate::InnerTripleFault`]). That is a fault of the platform, not
//! of the code under test, so a run that shows one ([`crate::HarnessError::PlatformFault`]) is
//! printed, counted, and its scenario is run once more; a fault on the rerun too fails the test.
//!
//! Counting: when `VR_PLATFORM_FAULTS` names a file, each fault appends one line to it
//! (`<test>\t<run 1|2>\t<seconds into the run>\t<first fault line>`); `scripts/test.sh` creates
//! the file, shares it with every test process and prints the summary at its end.

use std::io::Write;
use std::path::Path;

use crate::HarnessError;

/// The environment variable naming the file that collects the platform faults of a test run.
pub const PLATFORM_FAULTS_ENV: &str = "VR_PLATFORM_FAULTS";

/// Runs `attempt`; when it fails with a platform fault, prints and records the fault and runs
/// `attempt` once more (it must set everything up anew: VMs, daemons, sockets). A second
/// platform fault is printed, recorded and returned. Other results are returned as they are.
pub fn rerun_on_platform_fault<T>(
    name: &str,
    attempt: impl FnMut() -> Result<T, HarnessError>,
) -> Result<T, HarnessError> {
    let file = std::env::var_os(PLATFORM_FAULTS_ENV);
    // Written past libtest's output capture, so a fault shows even when its test passes.
    let say = |text: &str| {
        let _ = std::io::stderr().write_all(text.as_bytes());
    };
    rerun_recording(
        name,
        file.as_deref()
            .map(Path::new)
            .filter(|p| !p.as_os_str().is_empty()),
        &say,
        attempt,
    )
}

fn rerun_recording<T>(
    name: &str,
    file: Option<&Path>,
    say: &dyn Fn(&str),
    mut attempt: impl FnMut() -> Result<T, HarnessError>,
) -> Result<T, HarnessError> {
    match attempt() {
        Err(e) if e.is_platform_fault() => {
            report(name, 1, &e, file, say);
            let again = attempt();
            match &again {
                Err(e) if e.is_platform_fault() => report(name, 2, e, file, say),
                Ok(_) => say(&format!(
                    "[vsock-integration] {name}: the rerun after the platform fault passed\n"
                )),
                Err(_) => {}
            }
            again
        }
        other => other,
    }
}

fn report(name: &str, run: u32, e: &HarnessError, file: Option<&Path>, say: &dyn Fn(&str)) {
    let HarnessError::PlatformFault { lines, after, .. } = e else {
        return;
    };
    let first = lines.first().map_or("", String::as_str);
    let next = if run == 1 {
        "rerunning the scenario once"
    } else {
        "a fault on the rerun too: the test fails"
    };
    let mut text = format!(
        "PLATFORM FAULT: {name} (run {run} of at most 2) after {:.1} s: the emulated platform \
         faulted; {next}\n",
        after.as_secs_f64()
    );
    for l in lines.iter().take(12) {
        text.push_str(&format!("  | {l}\n"));
    }
    say(&text);
    if let Some(path) = file {
        let line = format!(
            "{name}\trun {run}\t{:.1}s\t{}\n",
            after.as_secs_f64(),
            first.replace('\t', " ")
        );
        // One short O_APPEND write per fault: the test processes of a run share the file.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(err) = written {
            say(&format!(
                "[vsock-integration] cannot record the platform fault in {}: {err}\n",
                path.display()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::time::Duration;

    /// Collects what the rerun logic prints.
    #[derive(Default)]
    struct Printed(RefCell<String>);

    impl Printed {
        fn say(&self) -> impl Fn(&str) + '_ {
            |t: &str| self.0.borrow_mut().push_str(t)
        }
    }

    fn fault(line: &str) -> HarnessError {
        HarnessError::PlatformFault {
            name: "t".into(),
            lines: vec![line.to_string()],
            after: Duration::from_millis(12_300),
            console: String::new(),
            qemu_log: String::new(),
        }
    }

    #[test]
    fn one_fault_reruns_once_and_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("faults");
        let printed = Printed::default();
        let mut runs = 0;
        let got = rerun_recording("scenario-a", Some(&file), &printed.say(), || {
            runs += 1;
            if runs == 1 {
                Err(fault("[ 1.000000] BUG: soft lockup"))
            } else {
                Ok(runs)
            }
        });
        assert_eq!(got.unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "scenario-a\trun 1\t12.3s\t[ 1.000000] BUG: soft lockup\n"
        );
        let printed = printed.0.into_inner();
        assert!(
            printed.contains("PLATFORM FAULT: scenario-a (run 1 of at most 2) after 12.3 s")
                && printed.contains("rerunning the scenario once")
                && printed.contains("| [ 1.000000] BUG: soft lockup")
                && printed.contains("the rerun after the platform fault passed"),
            "{printed}"
        );
    }

    #[test]
    fn a_fault_on_the_rerun_fails_and_both_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("faults");
        let printed = Printed::default();
        let mut runs = 0;
        let got: Result<(), _> = rerun_recording("b", Some(&file), &printed.say(), || {
            runs += 1;
            Err(fault("[ 2.000000] Kernel panic - not syncing: x"))
        });
        assert!(got.unwrap_err().is_platform_fault());
        assert_eq!(runs, 2, "exactly one rerun");
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.lines().nth(1).unwrap().starts_with("b\trun 2\t"),
            "{text}"
        );
        assert!(printed
            .0
            .into_inner()
            .contains("a fault on the rerun too: the test fails"));
    }

    #[test]
    fn other_failures_are_not_rerun_nor_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("faults");
        let printed = Printed::default();
        let mut runs = 0;
        let got: Result<(), _> = rerun_recording("c", Some(&file), &printed.say(), || {
            runs += 1;
            Err(HarnessError::Setup("broken".into()))
        });
        assert!(matches!(got, Err(HarnessError::Setup(_))));
        assert_eq!(runs, 1);
        assert!(!file.exists());
        let mut runs = 0;
        rerun_recording("d", Some(&file), &printed.say(), || {
            runs += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(runs, 1);
        assert!(!file.exists());
        assert_eq!(printed.0.into_inner(), "");
    }
}
