# The two inner guests of routerd_e2e.rs's test 4, one on vsock-routerd and one on vsock-vmm,
# siblings through one CID registry: bytes both ways by CID (routerd-siblings.sh), then Linux's
# vsock_test between them (conformance-vsock-test.sh), every case alone.
# Parameters on the kernel command line: vr.self= and vr.peer= (the CIDs), vr.role=
# server|client, vr.ct_device= this guest's device (for the reports).
. /vr/scenarios/routerd-siblings.sh
. /vr/scenarios/conformance-vsock-test.sh
