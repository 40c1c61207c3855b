# Inner-guest side of integration/tests/uplink_e2e.rs. vsock-vmm runs on the KVM host (CID 3)
# with the KVM host's real /dev/vsock as its G2H uplink; the enclave (CID 10) is the KVM host's
# sibling on the machine's vhost-user vsock daemon. We are CID 5.
want=$(vr_pattern_file /tmp/up.bin 1048576)

# 8. Inbound from the parent: the enclave connects to the KVM host's CID on port 8000
# (listen=8000); we answer with the hash of what we got.
socat -t 60 -T 120 VSOCK-LISTEN:8000 SYSTEM:'cat >/tmp/in.bin; sha256sum </tmp/in.bin | head -c 64' &
inbound=$!
# 7. vsock-connect on the KVM host reaches us through the CID registry.
socat -u VSOCK-LISTEN:7100 CREATE:/tmp/vc.bin &
registry=$!

# 6. Fallback on: CID 10 is not on the KVM host, so the connection takes the uplink, through the
# KVM host's /dev/vsock to the enclave. Retried while the enclave is still booting (a refused
# connect sends nothing).
vr_wait_for 300 socat -u FILE:/tmp/up.bin VSOCK-CONNECT:10:7000
vr_expect_eq uplink-upload 0 "$?"
echo fallback-done | socat -u - VSOCK-CONNECT:2:998

# 6. Fallback off (the host flips it through the API): refused, nothing reaches the enclave.
vr_wait_for 300 vr_host_phase_is strict || vr_fail phase-strict "host never switched"
vr_expect_reset 10 7001
echo strict-done | socat -u - VSOCK-CONNECT:2:997

wait "$registry"
vr_expect_eq registry-vsock-connect-data "hello through the registry" "$(cat /tmp/vc.bin)"
wait "$inbound"
vr_expect_eq inbound-listen-status 0 "$?"
vr_expect_eq inbound-data "$want" "$(vr_sha256 /tmp/in.bin)"
