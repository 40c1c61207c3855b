//! Control experiment for the silent triple faults of inner guests (docs/testing.md,
//! "Reliability"). They were seen only in scenarios that run two inner guests at once with vsock
//! traffic between them (the sibling conformance run, `siblings_through_the_registry`), and the
//! harness takes one without a word from the inner kernel for the emulated platform's. This
//! checks that judgement without our device in the picture: one KVM host runs two `vsock-vmm`
//! inner guests at once, each with its vsock device (activated by the driver) but **no vsock
//! traffic at all**, under CPU and memory load for `VR_CONTROL_SECS` (default 600) seconds,
//! `VR_CONTROL_RUNS` (default 2) times. It prints how many inner guests died of a triple fault.
//!
//! An experiment, not part of `scripts/test.sh` (it takes `runs × secs` of machine time):
//! `cargo test -p vsock-integration --test control_platform -- --ignored --nocapture`.
//! It fails when an inner guest ends any other way than by finishing its load or by a triple
//! fault (a harness or scenario error), so that its figures can be trusted.

use std::time::Duration;

use vsock_integration::{
    artifacts_or_skip, build_workspace_binary, inner_triple_faults, GuestRun, HarnessError,
};

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn scenario(secs: u64) -> String {
    format!(
        r#"
cat >/tmp/inner.sh <<'EOS'
end=$(( $(vr_uptime_ms) + {secs} * 1000 ))
n=0
while [ "$(vr_uptime_ms)" -lt "$end" ]; do
	head -c 4194304 /dev/urandom | sha256sum >/dev/null
	dd if=/dev/zero of=/tmp/m bs=1M count=32 2>/dev/null
	rm -f /tmp/m
	n=$((n + 1))
done
vr_pass load-rounds "$n"
EOS
run_vmm() {{ # CID
	vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio --memory size=256M \
		--cmdline "$(vr_inner_cmdline "$(vr_cmd_arg /tmp/inner.sh)" vr.timeout={limit})" \
		--vsock cid=$1,socket=/tmp/vm$1.sock,uplink=none --log-level info >/tmp/vm$1.log 2>&1
}}
run_vmm 5 &
a=$!
vr_wait_for 120 grep -q VRTEST-BOOT /tmp/vm5.log
run_vmm 6 &
b=$!
# No vr_wait_vmms: a guest that dies must not end the other one (it is what is counted).
wait "$a"
wait "$b"
vr_relay a </tmp/vm5.log
vr_relay b </tmp/vm6.log
:
"#,
        limit = secs + 300
    )
}

#[test]
#[ignore = "an experiment of runs × VR_CONTROL_SECS of machine time; see the module docs"]
fn two_inner_guests_without_vsock_traffic() {
    let name = "two_inner_guests_without_vsock_traffic";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let (runs, secs) = (
        env_u64("VR_CONTROL_RUNS", 2),
        env_u64("VR_CONTROL_SECS", 600),
    );
    let vmm = build_workspace_binary("vsock-vmm", "vsock-vmm").unwrap();
    let script = scenario(secs);
    let (mut finished, mut triple, mut before_activation, mut host_faults) = (0, 0, 0, 0);
    for run in 1..=runs {
        let result = GuestRun::kvm_host(&script)
            .name(name)
            .binary(&vmm)
            .timeout(Duration::from_secs(secs + 900))
            .spawn(artifacts)
            .and_then(|vm| vm.wait());
        let console = match result {
            Ok(outcome) => outcome.console,
            Err(HarnessError::PlatformFault { lines, console, .. }) => {
                // The KVM host's own kernel faulted, or an inner guest triple-faulted.
                eprintln!("control run {run}: platform fault: {lines:?}");
                if inner_triple_faults(&console).is_empty() {
                    host_faults += 1;
                    continue;
                }
                console
            }
            Err(HarnessError::ChecksFailed { console, .. }) => console,
            Err(e) => panic!("control run {run}: {e}"),
        };
        let faults = inner_triple_faults(&console);
        for f in &faults {
            eprintln!("control run {run}: {}", f.describe(None));
        }
        let done = ["a/load-rounds", "b/load-rounds"]
            .iter()
            .filter(|n| console.contains(&format!("VRTEST {n} PASS")))
            .count();
        assert_eq!(
            done + faults.len(),
            2,
            "control run {run}: each inner guest must finish its load or triple-fault:\n{console}"
        );
        // The device ran in every guest that finished (its driver activated it), or the claim
        // of "with a vsock device" would not hold; a fault may come before activation.
        for side in ["a", "b"] {
            if !console.contains(&format!("VRTEST {side}/load-rounds PASS")) {
                continue;
            }
            let prefix = format!("{side}: ");
            let activated = console
                .lines()
                .any(|l| l.starts_with(&prefix) && l.contains("device type 19 activated"));
            assert!(
                activated,
                "control run {run}: {side}'s vsock device never ran:\n{console}"
            );
        }
        before_activation += faults.iter().filter(|f| !f.after_activation).count();
        finished += done;
        triple += faults.len();
    }
    eprintln!(
        "control: {runs} runs of two inner guests without vsock traffic, {secs} s of load each: \
         {finished} finished, {triple} died of a triple fault ({before_activation} of them before \
         their vsock device was activated); {host_faults} runs lost to a KVM-host fault"
    );
}
