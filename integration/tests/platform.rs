//! Proves the integration platform itself (no vsock-vmm needed):
//! - the TCG "KVM host" boots, loads kvm-amd and runs a KVM guest;
//! - the inner guest image boots under QEMU and its /init runs scenarios;
//! - the harness reports failures with the console attached.
//!
//! Each test boots one guest in a few seconds once the images are cached
//! (the first run builds them: about 4 minutes). Run one alone with
//! `cargo test -p vsock-integration --test platform -- --nocapture <name>`.

use vsock_integration::{
    artifacts_or_skip, host_has_hardware_kvm, pattern, sha256_hex, GuestRun, HarnessError, Status,
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

#[test]
fn guest_watchdog_ends_a_hung_scenario() {
    let Some(artifacts) = artifacts_or_skip("guest_watchdog_ends_a_hung_scenario") else {
        return;
    };
    // 15 s limit -> the guest's own watchdog fires after 5 s.
    let outcome = GuestRun::inner_direct("vr_pass before\nsleep 600\n")
        .name("guest_watchdog_ends_a_hung_scenario")
        .timeout(std::time::Duration::from_secs(15))
        .spawn(artifacts)
        .unwrap()
        .wait()
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
    let outcome = GuestRun::inner_direct(scenario)
        .name("relay_prefixes_nested_results")
        .spawn(artifacts)
        .unwrap()
        .wait()
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
vr_check g2h-send socat -u FILE:/tmp/d VSOCK-CONNECT:2:5000
if timeout 60 socat -u VSOCK-LISTEN:5001 CREATE:/tmp/back; then
	vr_expect_eq h2g-receive "$sum" "$(vr_sha256 /tmp/back)"
else
	vr_fail h2g-receive "socat VSOCK-LISTEN failed"
fi
INNER
want="$(vr_pattern_file /tmp/want 1048576)"
timeout 90 socat -u VSOCK-LISTEN:5000 CREATE:/tmp/got &
listener=$!
t0=$(vr_uptime_ms)
vr_qemu_inner "$(vr_cmd_arg /tmp/inner.sh)" -device vhost-vsock-device,guest-cid=3 >/tmp/inner.log &
qemu=$!
# If QEMU dies early, do not wait for the listener's full 90 s.
(while kill -0 "$qemu" 2>/dev/null; do sleep 1; done; sleep 5; kill "$listener" 2>/dev/null) &
if wait "$listener"; then
	vr_expect_eq host-g2h-receive "$want" "$(vr_sha256 /tmp/got)"
	vr_info g2h-ms $(( $(vr_uptime_ms) - t0 ))
else
	vr_fail host-g2h-receive "socat VSOCK-LISTEN:5000 failed"
fi
vr_wait_for 30 sh -c 'socat -u FILE:/tmp/want VSOCK-CONNECT:3:5001 2>/dev/null' && vr_pass host-h2g-send || vr_fail host-h2g-send "no connection to 3:5001"
wait "$qemu"
vr_relay inner </tmp/inner.log
"#;
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
    let script = format!(
        r#"
vr_check private-tmp test ! -e {marker}
vr_check tmp-writable sh -c 'echo x >/tmp/x && test -s /tmp/x'
vr_check vsock-vmm-on-path sh -c 'vsock-vmm --help 2>&1 | grep -q -- --vsock'
vr_check socat-on-path sh -c 'socat -V | grep -q "socat version"'
vr_check busybox-applets usleep 1000
vr_check inner-images test -s "$VR_INNER/vmlinux" -a -s "$VR_INNER/initramfs.cpio"
vr_check own-pid-namespace test "$(cat /proc/1/comm)" = sh
sleep 6543 &
vr_check background-process-runs kill -0 $!
"#,
        marker = marker.path().display()
    );
    GuestRun::machine(script)
        .name(name)
        .binary(vmm)
        .timeout(std::time::Duration::from_secs(60))
        .run(
            artifacts,
            &[
                "private-tmp",
                "tmp-writable",
                "vsock-vmm-on-path",
                "socat-on-path",
                "busybox-applets",
                "inner-images",
                "own-pid-namespace",
                "background-process-runs",
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
