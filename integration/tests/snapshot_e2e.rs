//! Issue 12 with a real Linux guest: snapshot and restore of a `vsock-vmm` VM with open vsock
//! connections. `vsock-vmm` boots the inner guest on the KVM host's KVM (inside QEMU TCG) as
//! CID 3; the guest's side is `images/inner-scenarios/snapshot-restore.sh`, its connection ends
//! are `vr-vsockcheck` (`images/tools/vr-vsockcheck.c`), which prints exactly how each ended.
//!
//! 1. Two connections are opened and kept open: the guest's to a host service (CID 2 port 7000,
//!    `<socket>_7000`), which answers one line and then stops reading, so the guest's sends run
//!    out of credit and block in `send()`; and a host client's through the hybrid socket
//!    (`CONNECT 6000`) to a guest listener, blocked in `recv()`. One line each way on each.
//! 2. `remote pause`, `remote snapshot DIR`: the snapshot's files are there, the paused VMM still
//!    holds both connections (nothing ended at the host); `remote shutdown` ends it (exit 0,
//!    sockets gone), and only then both host ends see their stream closed (EOF or ECONNRESET).
//! 3. `--restore DIR --vsock cid=7,socket=<another path>` in a new process: in the guest both old
//!    connections fail with exactly ECONNRESET (the blocked `send()` and the blocked `recv()`),
//!    `IOCTL_VM_SOCKETS_GET_LOCAL_CID` says 7, a new guest → host connection works through the new
//!    socket, and a new host → guest connection, made at once, reaches the listener opened before
//!    the snapshot (listening sockets survive), addressed to CID 7, from the next device port
//!    (the saved port cursor: not the port of the connection just reset); the API shows CID 7
//!    and the new socket, and lists neither old connection (the original's listed both).
//! 4. Two clones from the same snapshot side by side (CIDs 8 and 9, sockets of their own): the
//!    second starts once the first runs; each does the checks of 3 only once both run, and both
//!    still run when both are done.
//! 5. `--restore DIR` without `--vsock`: the saved configuration (CID 3, the original socket,
//!    free again), the same checks.
//!
//! Last, the snapshot's files are unchanged by the four restores.
//!
//! Run alone: `cargo test -p vsock-integration --test snapshot_e2e -- --nocapture`.

use std::time::Duration;

use vsock_integration::{
    artifacts_or_skip, build_workspace_binary, parse_console, ConsoleReport, GuestRun, HarnessError,
};

/// The original VM's CID.
const ORIGINAL_CID: u32 = 3;
/// The restores, in order: relay prefix and CID (`saved-config` restores without `--vsock`).
const RESTORES: &[(&str, u32)] = &[
    ("restored", 7),
    ("clone-a", 8),
    ("clone-b", 9),
    ("saved-config", 3),
];
/// The device port of the original's host-initiated connection (the first of the device's
/// round robin in [2^30, 2^31)) and of each restored VM's first one: the next, from the saved
/// cursor.
const OLD_DEVICE_PORT: u32 = 1 << 30;
const NEW_DEVICE_PORT: u32 = (1 << 30) + 1;

const SCENARIO: &str = r##"
# One VM and its restores, each NAME with CID and SOCK: console and log /tmp/NAME.log, API
# /tmp/NAME.api, PID /tmp/NAME.pid. The host services of a socket SOCK: SOCK_997 says the CID its
# guest must have (SOCK.cid), SOCK_999 the phase (SOCK.phase), SOCK_7001 takes one new guest ->
# host connection (what it got: SOCK.g2h.out).
expect_match() { # NAME REGEX TEXT: PASS with the part of TEXT that matched
	_m=$(printf '%s\n' "$3" | grep -oE "$2" | head -n 1)
	if [ -n "$_m" ]; then vr_pass "$1" "$_m"; else vr_fail "$1" "expected /$2/, got '$3'"; fi
}
services() { # SOCK CID
	echo wait >"$1.phase"
	echo "$2" >"$1.cid"
	socat UNIX-LISTEN:$1_997,fork SYSTEM:"cat $1.cid" &
	socat UNIX-LISTEN:$1_999,fork SYSTEM:"cat $1.phase" &
	vr-vsockcheck unix-serve $1_7001 ack-new-g2h >"$1.g2h.out" 2>&1 &
}
# restore NAME CID SOCK [saved]: vsock-vmm --restore with --vsock cid=CID,socket=SOCK, or (saved)
# without --vsock, the snapshot's own configuration, which is CID and SOCK.
restore() {
	_vsock="--vsock cid=$2,socket=$3,uplink=none,$VR_VSOCK_TIMEOUTS"
	[ "${4:-}" != saved ] || _vsock=
	_t0=$(vr_uptime_ms)
	# shellcheck disable=SC2086 # $_vsock is zero or two words
	vsock-vmm --restore /tmp/snap $_vsock --api-socket "/tmp/$1.api" --log-level info \
		>"/tmp/$1.log" 2>&1 &
	echo $! >"/tmp/$1.pid"
	vr_wait_while "$!" 120 test -S "$3" || vr_fail "$1-socket" "no $3: $(tail -n 3 "/tmp/$1.log")"
	vr_info "$1-socket-after-ms" $(($(vr_uptime_ms) - _t0))
}
# h2g_new NAME SOCK: a new host -> guest connection to the guest's listener on port 6000.
h2g_new() {
	vr-vsockcheck unix-connect "$2" 6000 new-h2g >"/tmp/$1.h2g.out" 2>&1 &
	echo $! >"/tmp/$1.h2g.pid"
}
# verify NAME CID SOCK: once the guest has done its checks, the host's side of its new
# connections and the API.
verify() {
	_pid=$(cat "/tmp/$1.pid")
	vr_wait_while "$_pid" 600 grep -q 'VRTEST-INFO checks-done' "/tmp/$1.log" || {
		vr_fail "$1-guest-checks-done" "$(tail -n 3 "/tmp/$1.log")"
		vr_vmm_lost "$1" "$_pid" "/tmp/$1.api"
	}
	vr_wait_for 60 vr_gone "$(cat "/tmp/$1.h2g.pid")"
	vr_info "$1-new-h2g" "$(tr '\n' ' ' <"/tmp/$1.h2g.out")"
	vr_expect_eq "$1-new-h2g-host" "1 got=ack-new-h2g cid=$2" "$(grep '^1 got=' "/tmp/$1.h2g.out")"
	vr_expect_eq "$1-new-g2h-host" "1 got=new-g2h cid=$2" "$(grep '^1 got=' "$3.g2h.out")"
	vsock-vmm remote --api-socket "/tmp/$1.api" info >"/tmp/$1.info" 2>&1
	_info=$(tr -d ' \n' <"/tmp/$1.info")
	expect_match "$1-api-cid" "\"cid\":$2[,}]" "$_info"
	expect_match "$1-api-socket" "\"socket\":\"$3\"" "$_info"
	# The saved connections were reset, not carried over: the device lists neither the old
	# guest -> host one (host port 7000) nor the old host -> guest one (device port 2^30).
	vsock-vmm remote --api-socket "/tmp/$1.api" connections >"/tmp/$1.conns" 2>&1
	_conns=$(tr -d ' \n' <"/tmp/$1.conns")
	if printf '%s\n' "$_conns" | grep -q '^\[' &&
		! printf '%s\n' "$_conns" | grep -qE '"local_port":7000[,}]|:1073741824[,}]'; then
		vr_pass "$1-api-no-old-connections" "$_conns"
	else
		vr_fail "$1-api-no-old-connections" "$_conns"
	fi
}
# end_vm NAME SOCK: tell the guest to finish, wait for its VMM, relay its console.
end_vm() {
	_pid=$(cat "/tmp/$1.pid")
	echo finish >"$2.phase"
	vr_wait_for 300 vr_gone "$_pid" || {
		vr_fail "$1-ends" "the guest did not finish: $(tail -n 3 "/tmp/$1.log")"
		vr_vmm_lost "$1" "$_pid" "/tmp/$1.api"
	}
	wait "$_pid"
	vr_expect_eq "$1-exit" 0 "$?"
	vr_relay "$1" <"/tmp/$1.log"
	vr_check "$1-sockets-removed" test ! -e "$2" -a ! -e "/tmp/$1.api"
}

# 1. The original (CID 3) with two connections open.
services /tmp/vm3.sock 3
vr-vsockcheck unix-serve /tmp/vm3.sock_7000 ack-g2h hold >/tmp/old-g2h.out 2>&1 &
vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio --memory size=128M \
	--cmdline "$(vr_inner_cmdline vr.scenario=snapshot-restore vr.timeout=1100)" \
	--vsock cid=3,socket=/tmp/vm3.sock,uplink=none,$VR_VSOCK_TIMEOUTS \
	--api-socket /tmp/orig.api --log-level info >/tmp/orig.log 2>&1 &
vmm=$!
vr_wait_while "$vmm" 400 grep -q 'VRTEST-INFO listening 6000' /tmp/orig.log || {
	vr_fail orig-guest-listening "$(tail -n 3 /tmp/orig.log)"
	vr_vmm_lost orig "$vmm" /tmp/orig.api
}
vr-vsockcheck unix-connect /tmp/vm3.sock 6000 hello-h2g hold >/tmp/old-h2g.out 2>&1 &
vr_wait_while "$vmm" 400 grep -q 'VRTEST-INFO ready-for-snapshot' /tmp/orig.log || {
	vr_fail orig-guest-ready "$(tail -n 3 /tmp/orig.log)"
	vr_vmm_lost orig "$vmm" /tmp/orig.api
}
vr_expect_eq old-h2g-host-reply "1 got=ack-h2g cid=3" "$(grep '^1 got=' /tmp/old-h2g.out)"
vr_expect_eq old-g2h-host-got "1 got=hello-g2h cid=3" "$(grep '^1 got=' /tmp/old-g2h.out)"
vr_info old-h2g-ok-line "$(grep '^1 ok-line=' /tmp/old-h2g.out)"
# The API lists both connections, as the restores' checks look for them.
vsock-vmm remote --api-socket /tmp/orig.api connections >/tmp/orig.conns 2>&1
_conns=$(tr -d ' \n' </tmp/orig.conns)
expect_match orig-api-lists-old-g2h '"local_port":7000[,}]' "$_conns"
expect_match orig-api-lists-old-h2g ':1073741824[,}]' "$_conns"
vr_info orig-connections "$(printf '%s\n' "$_conns" | grep -oE '"(initiator|local_port|peer_port|state)":("[a-z]*"|[0-9]+)' | tr '\n' ' ')"

# 2. Pause, snapshot, end the original.
_t0=$(vr_uptime_ms)
vr_check pause vsock-vmm remote --api-socket /tmp/orig.api pause
vr_check snapshot vsock-vmm remote --api-socket /tmp/orig.api snapshot /tmp/snap
vr_info snapshot-ms $(($(vr_uptime_ms) - _t0))
vr_check snapshot-files test -s /tmp/snap/state.json -a -s /tmp/snap/memory
vr_info snapshot-files "$(ls -l /tmp/snap | awk 'NF > 8 { print $9 "=" $5 }' | tr '\n' ' ')"
snap_sum=$(cat /tmp/snap/state.json /tmp/snap/memory | sha256sum | cut -c1-64)
# Paused and saved, the original still holds both connections: nothing has ended at the host.
sleep 2
vr_check orig-connections-open-while-paused sh -c '! grep -h "^1 ended" /tmp/old-h2g.out /tmp/old-g2h.out'
vr_check orig-shutdown vsock-vmm remote --api-socket /tmp/orig.api shutdown
vr_wait_for 60 vr_gone "$vmm" || {
	vr_fail orig-ends "$(tail -n 3 /tmp/orig.log)"
	vr_vmm_lost orig "$vmm" /tmp/orig.api
}
wait "$vmm"
vr_expect_eq orig-exit 0 "$?"
vr_relay -u orig </tmp/orig.log
vr_check orig-sockets-removed test ! -e /tmp/vm3.sock -a ! -e /tmp/orig.api
# The host ends of the original's connections are closed with it.
vr_wait_for 60 grep -q '^1 ended' /tmp/old-h2g.out
expect_match old-h2g-host-closed '^1 ended (eof|errno=ECONNRESET) ' "$(grep '^1 ended' /tmp/old-h2g.out)"
vr_wait_for 60 grep -q '^1 ended' /tmp/old-g2h.out
expect_match old-g2h-host-closed '^1 ended (eof|errno=ECONNRESET) ' "$(grep '^1 ended' /tmp/old-g2h.out)"

# 3. Restored with another CID and socket; the host connects at once.
services /tmp/vm7.sock 7
echo go >/tmp/vm7.sock.phase
restore restored 7 /tmp/vm7.sock
h2g_new restored /tmp/vm7.sock
verify restored 7 /tmp/vm7.sock
end_vm restored /tmp/vm7.sock

# 4. Two clones side by side. B starts once A runs again (A's guest has seen its resets): two
# inner guests starting at once is where the platform loses one (docs/testing.md, "Inner guests
# that die without a word"). Their new connections start once both run.
services /tmp/vm8.sock 8
services /tmp/vm9.sock 9
restore clone-a 8 /tmp/vm8.sock
pa=$(cat /tmp/clone-a.pid)
vr_wait_while "$pa" 300 grep -q '^VRTEST old-h2g-reset ' /tmp/clone-a.log ||
	vr_info clone-a-not-reset "$(tail -n 3 /tmp/clone-a.log)"
restore clone-b 9 /tmp/vm9.sock
pb=$(cat /tmp/clone-b.pid)
h2g_new clone-a /tmp/vm8.sock
h2g_new clone-b /tmp/vm9.sock
echo go >/tmp/vm8.sock.phase
echo go >/tmp/vm9.sock.phase
verify clone-a 8 /tmp/vm8.sock
verify clone-b 9 /tmp/vm9.sock
# Both did their checks while both ran; both still run, waiting for the word to finish.
if vr_running "$pa" && vr_running "$pb"; then
	vr_pass clones-side-by-side "pids $pa $pb"
else
	vr_fail clones-side-by-side "clone-a $(vr_running "$pa" && echo runs || echo ended), clone-b $(vr_running "$pb" && echo runs || echo ended)"
fi
echo finish >/tmp/vm8.sock.phase
echo finish >/tmp/vm9.sock.phase
vr_wait_vmms 300 clone-a:$pa:/tmp/clone-a.log clone-b:$pb:/tmp/clone-b.log || {
	vr_fail clones-end "still running after 300 s"
	vr_vmm_lost clone-a "$pa" /tmp/clone-a.api
	vr_vmm_lost clone-b "$pb" /tmp/clone-b.api
}
wait "$pa"
vr_expect_eq clone-a-exit 0 "$?"
wait "$pb"
vr_expect_eq clone-b-exit 0 "$?"
vr_relay clone-a </tmp/clone-a.log
vr_relay clone-b </tmp/clone-b.log
vr_check clone-a-sockets-removed test ! -e /tmp/vm8.sock -a ! -e /tmp/clone-a.api
vr_check clone-b-sockets-removed test ! -e /tmp/vm9.sock -a ! -e /tmp/clone-b.api

# 5. Restored without --vsock: the saved CID 3 and socket (the original's services still run).
echo go >/tmp/vm3.sock.phase
restore saved-config 3 /tmp/vm3.sock saved
h2g_new saved-config /tmp/vm3.sock
verify saved-config 3 /tmp/vm3.sock
end_vm saved-config /tmp/vm3.sock

vr_expect_eq snapshot-unchanged "$snap_sum" "$(cat /tmp/snap/state.json /tmp/snap/memory | sha256sum | cut -c1-64)"
"##;

/// The guest's checks after each restore (under the restore's prefix) and the host's about it
/// (`<prefix>-<name>`).
const GUEST_AFTER_RESTORE: &[&str] = &[
    "old-g2h-reset",
    "old-h2g-reset",
    "cid-after-restore",
    "new-g2h-reply",
    "new-g2h-peer",
    "new-h2g-line",
    "new-h2g-local-cid",
    "new-h2g-new-device-port",
    "done",
];
const HOST_AFTER_RESTORE: &[&str] = &[
    "new-h2g-host",
    "new-g2h-host",
    "api-cid",
    "api-socket",
    "api-no-old-connections",
    "exit",
    "sockets-removed",
];
/// The checks up to the original's end.
const ORIGINAL_CHECKS: &[&str] = &[
    "orig/cid-before",
    "orig/old-g2h-reply",
    "orig/old-h2g-line",
    "orig/unfinished",
    "old-h2g-host-reply",
    "old-g2h-host-got",
    "orig-api-lists-old-g2h",
    "orig-api-lists-old-h2g",
    "pause",
    "snapshot",
    "snapshot-files",
    "orig-connections-open-while-paused",
    "orig-shutdown",
    "orig-exit",
    "orig-sockets-removed",
    "old-h2g-host-closed",
    "old-g2h-host-closed",
];

/// Every check of [`SCENARIO`] that must pass.
fn required() -> Vec<String> {
    let mut names: Vec<String> = ORIGINAL_CHECKS.iter().map(|s| s.to_string()).collect();
    for (vm, _) in RESTORES {
        names.extend(GUEST_AFTER_RESTORE.iter().map(|c| format!("{vm}/{c}")));
        names.extend(HOST_AFTER_RESTORE.iter().map(|c| format!("{vm}-{c}")));
    }
    names.push("clones-side-by-side".into());
    names.push("snapshot-unchanged".into());
    names
}

/// What the PASS lines must also say, exactly: the CIDs the guest's kernel reported (before the
/// snapshot and after each restore) and that the device addressed the new connection to, and the
/// device ports of the old and the new host-initiated connection.
fn detail_problems(report: &ConsoleReport) -> Vec<String> {
    let mut want = vec![("orig/cid-before".to_string(), ORIGINAL_CID.to_string())];
    for (vm, cid) in RESTORES {
        want.push((format!("{vm}/cid-after-restore"), cid.to_string()));
        want.push((format!("{vm}/new-h2g-local-cid"), cid.to_string()));
        want.push((
            format!("{vm}/new-h2g-new-device-port"),
            format!("old={OLD_DEVICE_PORT} new={NEW_DEVICE_PORT}"),
        ));
    }
    want.into_iter()
        .filter_map(|(name, detail)| {
            let got = report.results.get(&name).map(|r| r.detail.as_str());
            (got != Some(detail.as_str())).then(|| format!("{name}: want `{detail}`, got {got:?}"))
        })
        .collect()
}

#[test]
fn a_restored_guest_resets_its_connections_takes_the_new_cid_and_connects_again() {
    let name = "a_restored_guest_resets_its_connections_takes_the_new_cid_and_connects_again";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let vmm = build_workspace_binary("vsock-vmm", "vsock-vmm").unwrap();
    let required = required();
    let required: Vec<&str> = required.iter().map(String::as_str).collect();
    let outcome = GuestRun::kvm_host(SCENARIO)
        .name(name)
        .binary(vmm)
        .timeout(Duration::from_secs(1200))
        .run(artifacts, &required)
        .unwrap();
    let problems = detail_problems(&outcome.report);
    if !problems.is_empty() {
        panic!(
            "{}",
            HarnessError::ChecksFailed {
                name: name.into(),
                problems,
                console: outcome.console,
                qemu_log: outcome.qemu_log,
            }
        );
    }
    for info in ["snapshot-ms", "snapshot-files"] {
        if let Some(v) = outcome.report.info.get(info) {
            eprintln!("[vsock-integration] {name}: {info}: {v}");
        }
    }
}

/// A console on which every check of the scenario passed with the details it must have.
fn passing_console() -> String {
    let exact = |name: &str| -> Option<String> {
        if name == "orig/cid-before" {
            return Some(ORIGINAL_CID.to_string());
        }
        let (vm, check) = name.split_once('/')?;
        let cid = RESTORES.iter().find(|(v, _)| *v == vm)?.1;
        match check {
            "cid-after-restore" | "new-h2g-local-cid" => Some(cid.to_string()),
            "new-h2g-new-device-port" => {
                Some(format!("old={OLD_DEVICE_PORT} new={NEW_DEVICE_PORT}"))
            }
            _ => None,
        }
    };
    let mut console: String = required()
        .iter()
        .map(|n| format!("VRTEST {n} PASS {}\n", exact(n).unwrap_or_default()))
        .collect();
    console.push_str("VRTEST-DONE rc=0\n");
    console
}

#[test]
fn snapshot_checks_fail_on_a_missing_check_a_wrong_cid_or_a_reused_port() {
    let required = required();
    let required: Vec<&str> = required.iter().map(String::as_str).collect();
    let good = passing_console();
    let report = parse_console(&good);
    assert_eq!(report.problems(&required), Vec::<String>::new());
    assert_eq!(detail_problems(&report), Vec::<String>::new());
    // Every restore is checked: one missing check of the last clone fails the run.
    let missing = good.replace("VRTEST clone-b/old-h2g-reset PASS", "VRTEST-INFO x");
    assert!(!parse_console(&missing).problems(&required).is_empty());
    let cases = [
        // The second clone kept the first one's CID.
        (
            "VRTEST clone-b/cid-after-restore PASS 9",
            "VRTEST clone-b/cid-after-restore PASS 8",
        ),
        // The device addressed the new connection to the old CID.
        (
            "VRTEST restored/new-h2g-local-cid PASS 7",
            "VRTEST restored/new-h2g-local-cid PASS 3",
        ),
        // Not the port after the saved cursor.
        (
            "VRTEST saved-config/new-h2g-new-device-port PASS old=1073741824 new=1073741825",
            "VRTEST saved-config/new-h2g-new-device-port PASS old=1073741824 new=1073741826",
        ),
        (
            "VRTEST orig/cid-before PASS 3",
            "VRTEST orig/cid-before PASS 4294967295",
        ),
    ];
    for (from, to) in cases {
        assert!(good.contains(from), "{from}");
        let report = parse_console(&good.replace(from, to));
        assert_eq!(report.problems(&required), Vec::<String>::new(), "{to}");
        assert_eq!(detail_problems(&report).len(), 1, "{to}");
    }
    // Each restore's checks are its own: the prefixes do not stand in for each other.
    assert_eq!(
        required
            .iter()
            .filter(|n| n.ends_with("/old-g2h-reset"))
            .count(),
        RESTORES.len()
    );
}
