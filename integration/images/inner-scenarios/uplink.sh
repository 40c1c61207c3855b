# Inner-guest side of integration/tests/uplink_e2e.rs. vsock-vmm runs on the KVM host (CID 3)
# with the KVM host's real /dev/vsock as its G2H uplink; the enclave (CID 10) is the KVM host's
# sibling on the machine's vhost-user vsock daemon. We are CID 5.
want=$(vr_pattern_file /tmp/up.bin 1048576)

# 8. Inbound from the parent: the enclave connects to the KVM host's CID on port 8000
# (listen=8000), retrying until we listen; we keep accepting and answer each connection with the
# hash of what it carried.
vr_collect 8000 /tmp/in.d hash &
inbound=$!
# 7. vsock-connect on the KVM host reaches us through the CID registry (it retries too).
vr_collect 7100 /tmp/vc.d &
registry=$!

# 6. Fallback on: CID 10 is not on the KVM host, so the connection takes the uplink, through the
# KVM host's /dev/vsock to the enclave. Retried while the enclave is still booting (a refused
# connect sends nothing).
vr_retry uplink-upload 300 vr-socat -u FILE:/tmp/up.bin VSOCK-CONNECT:10:7000
vr_expect_eq uplink-upload 0 "$?"
echo fallback-done | vr-socat -u - VSOCK-CONNECT:2:998

# 6. Fallback off (the host flips it through the API): refused, nothing reaches the enclave.
vr_wait_for 300 vr_host_phase_is strict || vr_fail phase-strict "host never switched"
vr_expect_reset 10 7001
echo strict-done | vr-socat -u - VSOCK-CONNECT:2:997

# The host's vsock-connect retries ended before it switched to strict: the last connection is
# the one that counted.
kill "$registry"
vr_info registry-connections "$(vr_collected_count /tmp/vc.d)"
vr_expect_eq registry-vsock-connect-data "hello through the registry" \
	"$(f=$(vr_collected /tmp/vc.d); [ -f "$f" ] && cat "$f")"
# The enclave retries until a connection brings back the right hash, which is its check.
vr_wait_for 300 vr_collected_is /tmp/in.d "$want"
vr_check inbound-listen-status kill -0 "$inbound"
kill "$inbound"
vr_info inbound-connections "$(vr_collected_count /tmp/in.d)"
vr_expect_eq inbound-data "$want" "$(f=$(vr_collected /tmp/in.d); [ -f "$f" ] && vr_sha256 "$f")"
