//! The README's main job: boots a Linux guest under `vsock-vmm` with the vsock device (inside a
//! QEMU TCG KVM host on machines without hardware virtualization) and shows a guest → host
//! exchange and the router's decisions, in a form a newcomer can read.

use std::process::ExitCode;
use std::time::Duration;

use vsock_integration::{
    build_workspace_binary, ensure_artifacts, host_has_hardware_kvm, GuestRun,
};

const HOST_SIDE: &str = r#"
# Host and guest lines go to one log (both append), so they print in order.
say() { echo "DEMO host:  $*" >>/tmp/inner.log; }
: >/tmp/inner.log
mkdir -p /tmp/up
echo fallback > /tmp/phase
socat UNIX-LISTEN:/tmp/v.sock_1234,fork SYSTEM:'read l; echo "hi guest, the host got: $l"' &
socat UNIX-LISTEN:/tmp/up/77_6000,fork SYSTEM:'read l; echo "uplink peer CID 77 got: $l"' &
socat UNIX-LISTEN:/tmp/v.sock_999,fork SYSTEM:'cat /tmp/phase' &
# Emulation is slow: generous handshake budgets ($VR_VSOCK_TIMEOUTS, see docs/testing.md).
say "starting: vsock-vmm --vsock cid=3,socket=/tmp/v.sock,uplink=unix:/tmp/up,fallback=1,..."
vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio --memory size=256M \
    --cmdline "$(vr_inner_cmdline vr.scenario=demo vr.timeout=300)" \
    --vsock cid=3,socket=/tmp/v.sock,uplink=unix:/tmp/up,fallback=1,$VR_VSOCK_TIMEOUTS \
    --api-socket /tmp/api >>/tmp/inner.log 2>&1 &
vmm=$!
for _ in $(seq 1 600); do grep -q 'uplink stand-in answered' /tmp/inner.log && break; usleep 100000; done
info=$(vsock-vmm remote --api-socket /tmp/api info | tr -d ' \n')
num() { echo "$info" | sed -n 's/.*"'"$1"'":\([0-9][0-9]*\).*/\1/p'; }
say "GET /api/v1/vsock: g2h_fallback=$(echo "$info" | sed 's/.*"g2h_fallback":\([a-z]*\).*/\1/'); routed: host=$(num host) sibling=$(num sibling) uplink=$(num uplink) refused=$(num refused)"
say "switching g2h_fallback off: vsock-vmm remote --api-socket /tmp/api fallback off"
vsock-vmm remote --api-socket /tmp/api fallback off >/dev/null
echo strict > /tmp/phase
for _ in $(seq 1 3000); do kill -0 "$vmm" 2>/dev/null || break; usleep 100000; done
wait "$vmm"
say "the guest shut down; vsock-vmm exited with status $?"
grep '^DEMO ' /tmp/inner.log
vr_relay inner </tmp/inner.log >/tmp/relayed
grep '^VRTEST' /tmp/relayed
"#;

fn main() -> ExitCode {
    println!(
        "vsock-router demo: platform = {}",
        if host_has_hardware_kvm() {
            "hardware KVM present; the demo still runs inside the QEMU KVM host for one recipe"
        } else {
            "no hardware virtualization here: vsock-vmm runs on real KVM inside a QEMU TCG KVM host"
        }
    );
    println!(
        "checking the guest images and vsock-vmm (cached after the first run; a fresh machine \
         builds them first, about 7 minutes on 2 cores, showing each step) ..."
    );
    let artifacts = match ensure_artifacts() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cannot build the guest images: {e}");
            return ExitCode::FAILURE;
        }
    };
    let vmm = match build_workspace_binary("vsock-vmm", "vsock-vmm") {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot build vsock-vmm: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("booting ...\n");
    let run = GuestRun::kvm_host(HOST_SIDE)
        .name("demo")
        .binary(vmm)
        .timeout(Duration::from_secs(400))
        .run(
            artifacts,
            &[
                "inner/demo-guest-to-host",
                "inner/demo-fallback",
                "inner/demo-strict",
            ],
        );
    match run {
        Ok(out) => {
            for line in out.console.lines().filter(|l| l.starts_with("DEMO ")) {
                println!("{}", &line[5..]);
            }
            println!(
                "\ndemo finished in {:.1} s: every step behaved as expected",
                out.elapsed.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
