//! Proves the integration platform itself (no vsock-vmm needed):
//! - the TCG "KVM host" boots, loads kvm-amd and runs a KVM guest;
//! - the inner guest image boots under QEMU and its /init runs scenarios;
//! - the harness reports failures with the console attached.
//!
//! Each test boots one guest in a few seconds once the images are cached
//! (the first run builds them: about 4 minutes). Run one alone with
//! `cargo test -p vsock-integration --test platform -- --nocapture <name>`.

use std::time::{Duration, Instant};

use vsock_integration::{
    artifacts_or_skip, host_has_hardware_kvm, pattern, rerun_on_platform_fault, sha256_hex,
    GuestRun, HarnessError, Status,
};

#[test]
fn kvm_host_runs_a_kvm_guest() {
    let Some(artifacts) = artifacts_or_skip("kvm_host_runs_a_kvm_guest") else {
        return;
    };
    eprintln!(
        "machine has hardware virtualization: {} (the tests nest the VMM in TCG either way)",
        host_has_hardware_kvm()
    );
    let scenario = r#"
vr_check kvm-host-dev-kvm test -c /dev/kvm
if out="$(vr-kvmcheck)"; then vr_pass kvm-host-kvm "$out"; else vr_fail kvm-host-kvm "$out"; fi
if dmesg | grep -q 'Nested Virtualization enabled'; then
	vr_pass kvm-host-svm "$(dmesg | grep -c 'SVM: ') SVM lines"
else
	vr_fail kvm-host-svm "$(dmesg | grep -i -e svm -e kvm | tail -n 3)"
fi
vr_check kvm-host-dev-vsock test -c /dev/vsock
vr_check kvm-host-inner-images test -s $VR_INNER/vmlinux -a -s $VR_INNER/initramfs.cpio
vr_check kvm-host-loopback ip link show lo
vr_info kvm-host-uptime-ms "$(vr_uptime_ms)"
"#;
    let outcome = GuestRun::kvm_host(scenario)
        .name("kvm_host_runs_a_kvm_guest")
        .modules(&["kvm", "vsock"])
        .run(
            artifacts,
            &[
                "host-modules-kvm",
                "host-modules-vsock",
                "kvm-host-dev-kvm",
                "kvm-host-kvm",
                "kvm-host-svm",
                "kvm-host-dev-vsock",
                "kvm-host-inner-images",
                "kvm-host-loopback",
            ],
        )
        .unwrap();
    eprintln!(
        "kvm-host-kvm: {}; guest uptime at end: {} ms; wall time {:.1} s",
        outcome.detail("kvm-host-kvm").unwrap_or(""),
        outcome
            .report
            .info
            .get("kvm-host-uptime-ms")
            .map_or("?", String::as_str),
        outcome.elapsed.as_secs_f64()
    );
}

#[test]
fn inner_guest_runs_a_scenario_from_the_command_line() {
    let Some(artifacts) = artifacts_or_skip("inner_guest_runs_a_scenario_from_the_command_line")
    else {
        return;
    };
    let scenario = r#"
sum="$(vr_pattern_file /tmp/data 1048576)"
vr_expect_eq inner-data-size 1048576 "$(wc -c </tmp/data | tr -d ' ')"
vr_pass inner-data-sha256 "$sum"
vr_check inner-socat socat -V
vr_check inner-sysfs test -d /sys/kernel
"#;
    let outcome = GuestRun::inner_direct(scenario)
        .name("inner_guest_runs_a_scenario_from_the_command_line")
        .run(
            artifacts,
            &[
                "inner-data-size",
                "inner-data-sha256",
                "inner-socat",
                "inner-sysfs",
            ],
        )
        .unwrap();
    assert_eq!(
        outcome.detail("inner-data-sha256"),
        Some(sha256_hex(&pattern(1 << 20)).as_str()),
        "guest and host disagree on the test pattern"
    );
    assert_eq!(outcome.report.boots.len(), 1, "{}", outcome.console);
}

#[test]
fn inner_guest_runs_a_shipped_scenario() {
    let Some(artifacts) = artifacts_or_skip("inner_guest_runs_a_shipped_scenario") else {
        return;
    };
    GuestRun::inner_direct_named("smoke")
        .name("inner_guest_runs_a_shipped_scenario")
        .run(
            artifacts,
            &["proc-mounted", "data-size", "data-sha256", "socat-runs"],
        )
        .unwrap();
}

#[test]
fn harness_reports_failures_with_the_console() {
    let Some(artifacts) = artifacts_or_skip("harness_reports_failures_with_the_console") else {
        return;
    };
    let err =
        GuestRun::inner_direct("vr_pass fine\nvr_fail broken 'on purpose'\necho marker-xyz\n")
            .name("harness_reports_failures_with_the_console")
            .run(artifacts, &["fine", "never-reported"])
            .unwrap_err();
    let HarnessError::ChecksFailed {
        problems, console, ..
    } = &err
    else {
        panic!("expected ChecksFailed, got: {err}");
    };
    assert!(
        problems.iter().any(|p| p == "FAIL broken: on purpose"),
        "{err}"
    );
    assert!(
        problems.iter().any(|p| p.contains("never-reported")),
        "{err}"
    );
    assert!(
        problems.iter().any(|p| p == "scenario exit code 1"),
        "{err}"
    );
    assert!(console.contains("marker-xyz"), "{err}");
    assert!(err.to_string().contains("---- serial console ----"));
}

/// A KVM host whose console goes silent after its boot line (here its scenario stops the
/// heartbeat and sleeps: what a hung kernel looks like from outside) is ended as the platform's
/// fault, long before its time limit.
#[test]
fn a_silent_kvm_host_is_a_platform_fault() {
    let Some(artifacts) = artifacts_or_skip("a_silent_kvm_host_is_a_platform_fault") else {
        return;
    };
    let name = "a_silent_kvm_host_is_a_platform_fault";
    let start = Instant::now();
    let err = GuestRun::kvm_host("vr_pass before\nkill \"$_heartbeat\"\nsleep 600\n")
        .name(name)
        .heartbeat_silence(Duration::from_secs(15))
        .timeout(Duration::from_secs(300))
        .spawn(artifacts)
        .unwrap()
        .wait()
        .unwrap_err();
    let HarnessError::PlatformFault { lines, console, .. } = &err else {
        panic!("expected a platform fault, got {err}");
    };
    assert!(
        lines.iter().any(|l| l.contains("printed nothing for 15 s")),
        "{lines:?}"
    );
    // What QEMU did meanwhile: its CPU time over the silence, and the monitor's view of the
    // virtual CPU (`info cpus`, `info registers -a`, `info lapic`).
    assert!(
        lines.iter().any(|l| l.starts_with("QEMU used ")),
        "{lines:?}"
    );
    for want in ["CPU #0", "RIP=", "LVT0"] {
        assert!(
            lines.iter().any(|l| l.contains(want)),
            "no {want} from the monitor: {lines:?}"
        );
    }
    assert!(console.contains("VRTEST before PASS"), "{console}");
    assert!(start.elapsed() < Duration::from_secs(250), "{err}");
}

#[test]
fn guest_watchdog_ends_a_hung_scenario() {
    let Some(artifacts) = artifacts_or_skip("guest_watchdog_ends_a_hung_scenario") else {
        return;
    };
    // 15 s limit -> the guest's own watchdog fires after 5 s.
    let name = "guest_watchdog_ends_a_hung_scenario";
    let outcome = rerun_on_platform_fault(name, || {
        GuestRun::inner_direct("vr_pass before\nsleep 600\n")
            .name(name)
            .timeout(Duration::from_secs(15))
            .spawn(artifacts)?
            .wait()
    })
    .unwrap();
    assert_eq!(outcome.report.status("before"), Some(Status::Pass));
    assert_eq!(
        outcome.report.status("scenario-timeout"),
        Some(Status::Fail)
    );
    assert_eq!(outcome.report.done_rc, Some(124));
}

#[test]
fn relay_prefixes_nested_results() {
    let Some(artifacts) = artifacts_or_skip("relay_prefixes_nested_results") else {
        return;
    };
    // Feed a fake nested console through vr_relay, as a KVM-host scenario
    // does with vsock-vmm's serial output.
    let scenario = r#"
printf 'noise\r\nVRTEST-BOOT inner uptime_ms=5\r\nVRTEST a PASS x y\r\nVRTEST-INFO t 7\r\nVRTEST-DONE rc=0\r\n' | vr_relay nested
printf 'VRTEST b PASS\n' | vr_relay crashed
"#;
    let name = "relay_prefixes_nested_results";
    let outcome = rerun_on_platform_fault(name, || {
        GuestRun::inner_direct(scenario)
            .name(name)
            .spawn(artifacts)?
            .wait()
    })
    .unwrap();
    let r = &outcome.report;
    assert_eq!(
        r.status("nested/a"),
        Some(Status::Pass),
        "{}",
        outcome.console
    );
    assert_eq!(r.results["nested/a"].detail, "x y");
    assert_eq!(r.status("nested/done"), Some(Status::Pass));
    assert_eq!(r.info.get("nested/t").map(String::as_str), Some("7"));
    assert_eq!(r.status("crashed/b"), Some(Status::Pass));
    assert_eq!(r.status("crashed/done"), Some(Status::Fail));
    assert!(outcome.console.contains("nested: noise"));
    assert_eq!(r.boots.len(), 1, "only the outer VRTEST-BOOT counts");
}

#[test]
fn a_lost_nested_vmm_is_described_and_ended() {
    let name = "a_lost_nested_vmm_is_described_and_ended";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    // A process that stands for a nested VMM whose guest never answers.
    let scenario = r#"
sleep 600 &
p=$!
vr_wait_while "$p" 1 false
vr_info wait-running "$?"
vr_wait_while "$p" 5 true
vr_info wait-done "$?"
vr_vmm_lost lost "$p"
vr_check ended vr_gone "$p"
vr_wait_while "$p" 5 false
vr_info wait-gone "$?"
"#;
    let outcome = rerun_on_platform_fault(name, || {
        GuestRun::inner_direct(scenario)
            .name(name)
            .spawn(artifacts)?
            .wait()
    })
    .unwrap();
    let (r, console) = (&outcome.report, &outcome.console);
    let info = |k: &str| r.info.get(k).map(String::as_str);
    assert_eq!(info("wait-running"), Some("1"), "{console}");
    assert_eq!(info("wait-done"), Some("0"), "{console}");
    assert_eq!(info("wait-gone"), Some("2"), "{console}");
    assert_eq!(r.status("ended"), Some(Status::Pass), "{console}");
    for round in ["round 1: sleep S", "round 2: sleep S"] {
        assert!(console.contains(round), "no {round:?} in:\n{console}");
    }
    assert!(info("lost-ended").is_some(), "{console}");
}

/// The whole nested path with a reference VMM: QEMU inside the TCG KVM host
/// boots the inner guest on nested KVM with a (kernel) vhost-vsock device —
/// all inside the TCG guest — and 1 MiB goes each way over AF_VSOCK between
/// the inner guest and the KVM host. This is the shape of the later
/// vsock-vmm tests, and proves the inner kernel's virtio-mmio
/// (`virtio_mmio.device=` from QEMU's microvm) and vsock drivers.
#[test]
fn reference_qemu_runs_inner_guest_with_vsock_on_nested_kvm() {
    let name = "reference_qemu_runs_inner_guest_with_vsock_on_nested_kvm";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let scenario = r#"
cat >/tmp/inner.sh <<'INNER'
sum="$(vr_pattern_file /tmp/d 1048576)"
vr_check g2h-send vr-socat -u FILE:/tmp/d VSOCK-CONNECT:2:5000
vr_collect 5001 /tmp/back.d &
vr_wait_for 300 vr_collected_is /tmp/back.d "$sum"
vr_expect_eq h2g-receive "$sum" "$(vr_sha256 "$(vr_collected /tmp/back.d)" 2>&1)"
vr_info h2g-connections "$(vr_collected_count /tmp/back.d)"
INNER
want="$(vr_pattern_file /tmp/want 1048576)"
timeout 400 socat -u VSOCK-LISTEN:5000 CREATE:/tmp/got &
listener=$!
t0=$(vr_uptime_ms)
vr_qemu_inner "$(vr_cmd_arg /tmp/inner.sh)" -device vhost-vsock-device,guest-cid=3 >/tmp/inner.log &
qemu=$!
# QEMU and the kernel's vhost-vsock are the reference here, not the code under test: an inner
# guest that stops making progress on nested KVM is the platform's fault (it finishes in ~10 s
# unloaded; 240 s without a console line is a hang).
vr_stall_watch 240 reference-qemu-inner-guest "$qemu" /tmp/inner.log
# If QEMU dies early, do not wait for the listener's full 400 s.
(while kill -0 "$qemu" 2>/dev/null; do sleep 1; done; sleep 5; kill "$listener" 2>/dev/null) &
if wait "$listener"; then
	vr_expect_eq host-g2h-receive "$want" "$(vr_sha256 /tmp/got)"
	vr_info g2h-ms $(( $(vr_uptime_ms) - t0 ))
else
	vr_fail host-g2h-receive "socat VSOCK-LISTEN:5000 failed"
fi
vr_retry host-h2g-send 120 sh -c 'vr-socat -u FILE:/tmp/want VSOCK-CONNECT:3:5001 2>/dev/null' && vr_pass host-h2g-send || vr_fail host-h2g-send "no connection to 3:5001"
vr_wait_vmms 360 inner-qemu:$qemu:/tmp/inner.log || { vr_fail inner-exit "QEMU still running 360 s after host-h2g-send"; kill "$qemu"; }
vr_relay inner </tmp/inner.log
"#;
    // Generous limits inside, as every emulated scenario has: unloaded the inner guest's 1 MiB
    // arrives 4 s after QEMU starts; beside other TCG guests on a loaded machine the whole run
    // took over 180 s (1 Dec 2026).
    let outcome = GuestRun::kvm_host(scenario)
        .name(name)
        .nested_qemu()
        .modules(&["kvm", "vhost-vsock"])
        .run(
            artifacts,
            &[
                "host-modules-vhost-vsock",
                "host-g2h-receive",
                "host-h2g-send",
                "inner/g2h-send",
                "inner/h2g-receive",
                "inner/done",
            ],
        )
        .unwrap();
    eprintln!(
        "guest->host 1 MiB after {} ms (from starting the nested QEMU); wall time {:.1} s",
        outcome
            .report
            .info
            .get("g2h-ms")
            .map_or("?", String::as_str),
        outcome.elapsed.as_secs_f64()
    );
}

/// The direct variant of the scenarios (`GuestRun::machine`) runs here too, without a guest:
/// the KVM host's layout, a private `/tmp`, and every process gone when the run ends.
#[test]
fn a_machine_run_has_the_kvm_host_layout() {
    let name = "a_machine_run_has_the_kvm_host_layout";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    // In the machine's own /tmp, which the run must not see.
    let marker = tempfile::Builder::new()
        .prefix("vr-machine-marker.")
        .tempfile_in("/tmp")
        .unwrap();
    let vmm = vsock_integration::build_workspace_binary("vsock-vmm", "vsock-vmm").unwrap();
    // A binary under the machine's /tmp (as everything is when the checkout or the cargo target
    // directory is there): the run must still find it behind its private /tmp.
    let tmp_tools = tempfile::Builder::new()
        .prefix("vr-machine-tool.")
        .tempdir_in("/tmp")
        .unwrap();
    let tool = tmp_tools.path().join("vr-tool-from-tmp");
    std::fs::write(&tool, "#!/bin/sh\necho tool-from-the-machines-tmp\n").unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = format!(
        r#"
vr_check private-tmp test ! -e {marker}
vr_check tmp-writable sh -c 'echo x >/tmp/x && test -s /tmp/x'
vr_check vsock-vmm-on-path sh -c 'vsock-vmm --help 2>&1 | grep -q -- --vsock'
vr_check binary-from-the-machines-tmp sh -c 'vr-tool-from-tmp | grep -q tool-from-the-machines-tmp'
vr_check helpers-sourced type vr_retry vr_collect
vr_check socat-on-path sh -c 'socat -V | grep -q "socat version"'
vr_check busybox-applets usleep 1000
vr_check inner-images test -s "$VR_INNER/vmlinux" -a -s "$VR_INNER/initramfs.cpio"
vr_check own-pid-namespace test "$(cat /proc/1/comm)" = sh
sleep 6543 &
vr_check background-process-runs kill -0 $!
# Two "VMMs": one ends at once without VRTEST-DONE, so the other is stopped after the grace.
sh -c 'echo booted' >/tmp/vmm-a.log 2>&1 &
vmm_a=$!
sleep 6544 >/tmp/vmm-b.log 2>&1 &
vmm_b=$!
t0=$(vr_uptime_ms)
VR_PEER_GRACE=1 vr_wait_vmms 50 a:$vmm_a:/tmp/vmm-a.log b:$vmm_b:/tmp/vmm-b.log
vr_check peer-of-a-crashed-vmm-stopped vr_gone "$vmm_b"
vr_check peer-stopped-after-the-grace test $(($(vr_uptime_ms) - t0)) -lt 20000
# A process whose log stops growing is ended by the stall watch, which says so (into a file
# here: on the console the line would end the run as a platform fault).
sleep 6545 >/tmp/quiet.log 2>&1 &
quiet=$!
vr_stall_watch 2 quiet-one "$quiet" /tmp/quiet.log >/tmp/watch.out
vr_check stall-watch-reports vr_wait_for 30 grep -q '^VRTEST-PLATFORM-FAULT quiet-one made no progress for 2 s' /tmp/watch.out
vr_check stall-watch-ends-it vr_wait_for 10 vr_gone "$quiet"
"#,
        marker = marker.path().display()
    );
    GuestRun::machine(script)
        .name(name)
        .binary(vmm)
        .binary(&tool)
        .timeout(Duration::from_secs(60))
        .run(
            artifacts,
            &[
                "private-tmp",
                "tmp-writable",
                "vsock-vmm-on-path",
                "binary-from-the-machines-tmp",
                "helpers-sourced",
                "socat-on-path",
                "busybox-applets",
                "inner-images",
                "own-pid-namespace",
                "background-process-runs",
                "peer-of-a-crashed-vmm-stopped",
                "peer-stopped-after-the-grace",
                "stall-watch-reports",
                "stall-watch-ends-it",
            ],
        )
        .unwrap();
    // The run's `sleep 6543` died with it.
    let leftover = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .any(|c| c == b"sleep\x006543\x00");
    assert!(!leftover, "a process of the machine run outlived it");
    let refused = GuestRun::machine("socat - VSOCK-CONNECT:2:1234\n")
        .name("af-vsock-script")
        .spawn(artifacts)
        .unwrap_err();
    assert!(
        refused.to_string().contains("must not use AF_VSOCK"),
        "{refused}"
    );
}

/// A real fault of the KVM host's kernel ends its run at once, as a platform fault: a panic
/// through `/proc/sysrq-trigger`, with `panic=0` so that the kernel then spins instead of
/// rebooting (QEMU would otherwise exit by itself). Without the detector the run would last
/// until its 300 s limit and end as a timeout.
#[test]
fn a_kvm_host_kernel_fault_ends_the_run_at_once() {
    let name = "a_kvm_host_kernel_fault_ends_the_run_at_once";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let limit = Duration::from_secs(300);
    let started = Instant::now();
    let vm =
        GuestRun::kvm_host("vr_pass before-the-fault\necho c >/proc/sysrq-trigger\nsleep 600\n")
            .name(name)
            .append("panic=0")
            .timeout(limit)
            .spawn(artifacts)
            .unwrap();
    let pid = vm.pid().unwrap();
    let err = vm.wait().unwrap_err();
    let took = started.elapsed();
    let HarnessError::PlatformFault { lines, console, .. } = &err else {
        panic!("expected a platform fault, got: {err}");
    };
    eprintln!(
        "{name}: ended {:.1} s after the start: {lines:?}",
        took.as_secs_f64()
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("Kernel panic - not syncing: sysrq triggered crash")),
        "{err}"
    );
    assert!(console.contains("VRTEST before-the-fault PASS"), "{err}");
    // Printed only when the kernel stays up (panic=0), so QEMU did not end the run itself.
    assert!(console.contains("---[ end Kernel panic"), "{err}");
    assert!(took < limit / 3, "ended after {took:?}: not at once");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU (pid {pid}) outlived its run"
    );
}
