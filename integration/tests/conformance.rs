//! Linux's own vsock conformance suite, `tools/testing/vsock/vsock_test` from linux-source-6.1
//! (11 cases: 7 SOCK_STREAM, 4 SOCK_SEQPACKET), against our device in real guests. The scenario
//! (`images/inner-scenarios/conformance-vsock-test.sh`) runs every case alone, one vsock_test
//! run per case, its control connection tunnelled over vsock, and reports each case on each
//! side as `vsock_test/<index>-<slug>`.
//!
//! - Between two sibling inner guests: two `vsock-vmm` in one KVM host sharing a CID registry
//!   (the server CID 5, the client CID 3). Both devices offer VIRTIO_VSOCK_F_SEQPACKET, so every
//!   case, SOCK_STREAM and SOCK_SEQPACKET, must pass on both sides (a SKIP is a failure).
//! - Across the real AF_VSOCK uplink (the nested-cloud topology of `uplink_e2e.rs`): the inner
//!   guest (CID 5 on the KVM host, CID 3) is the client and reaches the enclave (CID 10, the
//!   server) by g2h fallback through the KVM host's `/dev/vsock`, whose device, like the
//!   enclave's, is `vsock-routerd`'s. Every device in the path offers SOCK_SEQPACKET, so here
//!   too every case must pass on both sides. (With vhost-device-vsock 0.3.0 as the cloud host,
//!   as before, the 4 SOCK_SEQPACKET cases could not run: it does not offer the feature.)
//!
//! Run alone: `cargo test -p vsock-integration --test conformance -- --nocapture`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vsock_integration::{
    artifacts_or_skip, build_workspace_binary, images_dir, rerun_on_platform_fault, run_uplink,
    GuestRun, RunOutcome, Status, UplinkRun,
};

/// One case of vsock_test 6.1 (`vsock_test --list`), named as the scenario names it.
struct Case {
    index: usize,
    slug: &'static str,
    seqpacket: bool,
}

const fn case(index: usize, slug: &'static str, seqpacket: bool) -> Case {
    Case {
        index,
        slug,
        seqpacket,
    }
}

/// The 11 cases of vsock_test in linux-source-6.1, in its order.
const CASES: [Case; 11] = [
    case(0, "stream-connection-reset", false),
    case(1, "stream-bind-only", false),
    case(2, "stream-client-close", false),
    case(3, "stream-server-close", false),
    case(4, "stream-multiple-connections", false),
    case(5, "stream-msg-peek", false),
    case(6, "seqpacket-msg-bounds", true),
    case(7, "seqpacket-msg-trunc-flag", true),
    case(8, "seqpacket-timeout", true),
    case(9, "seqpacket-invalid-receive-buffer", true),
    case(10, "stream-poll-so-rcvlowat", false),
];

/// The QEMU guests of these tests are heavy (TCG, nested KVM): one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const SIBLINGS: &str = r#"
mkdir -p /tmp/reg
run_vmm() { # CID ROLE PEER
	vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio --memory size=256M \
		--cmdline "$(vr_inner_cmdline vr.scenario=conformance-vsock-test vr.role=$2 vr.peer=$3 vr.timeout=1500)" \
		--vsock cid=$1,socket=/tmp/vm$1.sock,uplink=none,registry=/tmp/reg,$VR_VSOCK_TIMEOUTS \
		--log-level info >/tmp/vm$1.log 2>&1
}
run_vmm 5 server 3 &
server=$!
# The client boots once the server's user space runs (two early boots at once gain nothing).
if vr_wait_for 120 grep -q VRTEST-BOOT /tmp/vm5.log; then
	run_vmm 3 client 5 &
	client=$!
else
	vr_info server-not-booted "$(tail -n 5 /tmp/vm5.log)"
	client=
fi
vr_wait_vmms 1600 server:$server:/tmp/vm5.log ${client:+client:$client:/tmp/vm3.log}
wait "$server"; vr_expect_eq vmm-server-exit 0 "$?"
[ -z "$client" ] || { wait "$client"; vr_expect_eq vmm-client-exit 0 "$?"; }
vr_relay server </tmp/vm5.log
[ -z "$client" ] || vr_relay client </tmp/vm3.log
:
"#;

/// The two sides of [`SIBLINGS`] in its console (the prefixes `vr_relay` gives them).
const SIBLING_SIDES: [&str; 2] = ["client/", "server/"];

#[test]
fn vsock_test_between_sibling_guests() {
    let name = "vsock_test_between_sibling_guests";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let vmm = build_workspace_binary("vsock-vmm", "vsock-vmm").unwrap();
    let start = Instant::now();
    let outcome = rerun_on_platform_fault(name, || {
        GuestRun::kvm_host(SIBLINGS)
            .name(name)
            .binary(&vmm)
            .timeout(Duration::from_secs(1800))
            .spawn(artifacts)?
            .wait()
    })
    .unwrap();
    eprintln!(
        "{name}: {:.1} s (client CID 3, server CID 5)\n{}",
        start.elapsed().as_secs_f64(),
        table(&[(&outcome, "client/"), (&outcome, "server/")])
    );
    // Both devices are ours and offer SOCK_SEQPACKET: no case may be skipped.
    let mut problems = case_problems(&outcome, &SIBLING_SIDES);
    if let Err(e) = outcome.check(&[
        "vmm-server-exit",
        "vmm-client-exit",
        "server/done",
        "client/done",
    ]) {
        problems.push(e.to_string());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

const UPLINK_KVM_HOST: &str = r#"
mkdir -p /tmp/reg
vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio --memory size=256M \
	--cmdline "$(vr_inner_cmdline vr.scenario=conformance-vsock-test vr.role=client vr.peer=10 vr.timeout=1500)" \
	--vsock cid=5,socket=/tmp/v.sock,uplink=/dev/vsock,fallback=1,registry=/tmp/reg,$VR_VSOCK_TIMEOUTS \
	--log-level info >/tmp/inner.log 2>&1 &
vmm=$!
vr_wait_vmms 1600 inner:$vmm:/tmp/inner.log
wait "$vmm"
vr_expect_eq vmm-exit-status 0 "$?"
vr_relay inner </tmp/inner.log
:
"#;

const UPLINK_ENCLAVE: &str = r#"
VR_ROLE=server VR_PEER=3 VR_CT_DEVICE=vsock-routerd . /vr/files/conformance-vsock-test.sh
"#;

#[test]
fn vsock_test_across_the_uplink() {
    let name = "vsock_test_across_the_uplink";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let vmm = build_workspace_binary("vsock-vmm", "vsock-vmm").unwrap();
    let vsock_test = vsock_test_binary();
    let start = Instant::now();
    let enclave = GuestRun::kvm_host(UPLINK_ENCLAVE)
        .name("enclave")
        .binary(&vsock_test)
        .file(
            images_dir().join("inner-scenarios/conformance-vsock-test.sh"),
            "/vr/files/conformance-vsock-test.sh",
        )
        .modules(&["vsock"])
        .memory("512M")
        .smp(1)
        .timeout(Duration::from_secs(1800));
    let host = GuestRun::kvm_host(UPLINK_KVM_HOST)
        .name(name)
        .binary(&vmm)
        .modules(&["kvm", "vsock"])
        .timeout(Duration::from_secs(1800));
    let run = run_uplink(name, artifacts, &host, &enclave).unwrap();
    // The KVM host opens every connection (to a sibling, in the daemon), the enclave takes them.
    let through = [(0, "sibling"), (1, "incoming")].map(|(vm, key)| (key, run.counter(vm, key)));
    let UplinkRun {
        host,
        enclave,
        daemon_log,
        ..
    } = run;
    eprintln!(
        "{name}: {:.1} s (client: the inner guest, CID 5 on the KVM host; server: the enclave)\n{}",
        start.elapsed().as_secs_f64(),
        table(&[(&host, "inner/"), (&enclave, "")])
    );
    let mut problems = case_problems(&host, &["inner/"]);
    problems.extend(case_problems(&enclave, &[""]));
    if let Err(e) = host.check(&["vmm-exit-status", "inner/done"]) {
        problems.push(e.to_string());
    }
    // Every vsock_test connection crosses the daemon from the KVM host to the enclave.
    for (who, (key, count)) in ["KVM host", "enclave"].iter().zip(through) {
        if count.unwrap_or(0) == 0 {
            problems.push(format!("{who}: the daemon's `{key}` counter is {count:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n---- vsock-routerd log ----\n{daemon_log}",
        problems.join("\n")
    );
}

/// The static vsock_test binary (`images/build-vsock-test.sh`, cached), for the enclave.
fn vsock_test_binary() -> PathBuf {
    let script = images_dir().join("build-vsock-test.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Every case's verdict on each side (`prefixes` name the sides in `outcome`'s console): every
/// case, SOCK_STREAM and SOCK_SEQPACKET, must PASS (every device in our paths offers the
/// feature; a SKIP is a failure).
fn case_problems(outcome: &RunOutcome, prefixes: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    for prefix in prefixes {
        for case in &CASES {
            let name = format!("{prefix}vsock_test/{}-{}", case.index, case.slug);
            match outcome.report.results.get(&name) {
                None => problems.push(format!("{name}: not reported")),
                Some(r) if r.status != Status::Pass => {
                    problems.push(format!("{name}: {}: {}", r.status, r.detail))
                }
                Some(_) => {}
            }
        }
    }
    problems
}

/// A per-case table: one column per side (a run and the prefix of that side in its console).
fn table(sides: &[(&RunOutcome, &str)]) -> String {
    let mut out = String::new();
    for case in &CASES {
        out.push_str(&format!("  {:>2}-{:<34}", case.index, case.slug));
        for (outcome, prefix) in sides {
            let name = format!("{prefix}vsock_test/{}-{}", case.index, case.slug);
            match outcome.report.results.get(&name) {
                Some(r) => out.push_str(&format!(" | {} {}", r.status, r.detail)),
                None => out.push_str(" | (not reported)"),
            }
        }
        out.push('\n');
    }
    out
}

/// The verdict logic itself, on made-up consoles: it must be able to fail.
#[test]
fn case_verdicts_need_every_case_to_pass() {
    let outcome = |console: String| RunOutcome {
        name: "t".into(),
        report: vsock_integration::parse_console(&console),
        console,
        qemu_log: String::new(),
        exit: None,
        elapsed: Duration::ZERO,
        inner_crashes: Vec::new(),
    };
    let all = |verdict: &dyn Fn(&Case) -> &'static str| -> String {
        CASES
            .iter()
            .map(|c| {
                format!(
                    "VRTEST s/vsock_test/{}-{} {}\n",
                    c.index,
                    c.slug,
                    verdict(c)
                )
            })
            .collect()
    };
    let good = all(&|_| "PASS ok");
    assert_eq!(
        case_problems(&outcome(good.clone()), &["s/"]),
        Vec::<String>::new()
    );
    // A SOCK_SEQPACKET SKIP (even an honest one), a failing SOCK_STREAM case, a missing case,
    // the other side's prefix: each is a problem.
    let bad = [
        all(&|c| {
            if c.seqpacket {
                "SKIP feature bit 1 = 0"
            } else {
                "PASS ok"
            }
        }),
        good.replace(
            "2-stream-client-close PASS ok",
            "2-stream-client-close FAIL x",
        ),
        good.replace(
            "VRTEST s/vsock_test/0-stream-connection-reset PASS ok\n",
            "",
        ),
        all(&|c| if c.seqpacket { "FAIL rc=1" } else { "PASS ok" }),
    ];
    for console in bad {
        assert!(
            !case_problems(&outcome(console.clone()), &["s/"]).is_empty(),
            "{console}"
        );
    }
    assert!(!case_problems(&outcome(good), &["other/"]).is_empty());
}
