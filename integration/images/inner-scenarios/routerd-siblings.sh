# Two guests that are siblings through vsock-routerd (integration/tests/routerd_e2e.rs): bytes
# both ways by CID. Each side listens on port 6000 and sends its pattern file to the other's
# port 6000; the lower CID sends 1048576 bytes, the higher 1000000, so each side knows what the
# other must deliver. The receiver answers every connection with the sha256 of what it got
# (vr_collect ... hash), and the sender checks that answer: both ends hash-check each direction.
# The receiver also checks, from socat's accept log, that the connection came from the peer's
# CID. Senders retry (bounded) until the peer listens; the listener keeps running to the end
# of the scenario, so a peer's last retry always finds it.
#
# Parameters (environment first, for a guest that sources this file from its own scenario;
# else the kernel command line): VR_SELF / vr.self= this guest's CID, VR_PEER / vr.peer= the
# other guest's CID.
rs_self="${VR_SELF:-$(vr_cmdline_arg vr.self)}"
rs_peer="${VR_PEER:-$(vr_cmdline_arg vr.peer)}"
rs_len() { if [ "$1" -lt "$2" ]; then echo 1048576; else echo 1000000; fi; }
rs_mine="$(vr_pattern_file /tmp/rs-out "$(rs_len "$rs_self" "$rs_peer")")"
rs_theirs="$(vr_pattern_file /tmp/rs-want "$(rs_len "$rs_peer" "$rs_self")")"
vr_info sibling "self $rs_self, peer $rs_peer"
# The negotiated features of this guest's virtio-vsock device, bit 0 first (the test checks
# SEQPACKET, bit 1, and VERSION_1, bit 32, against the transport it asked for).
vr_info vsock-features "$(for d in /sys/bus/virtio/devices/*; do [ "$(cat $d/device)" = 0x0013 ] && cat $d/features; done)"
vr_collect -l /tmp/rs-in.log 6000 /tmp/rs-in.d hash &
rs_send() {
	vr-socat -t 60 -T 120 'FILE:/tmp/rs-out!!CREATE:/tmp/rs-reply' "VSOCK-CONNECT:$rs_peer:6000" 2>/dev/null &&
		[ "$(cat /tmp/rs-reply)" = "$rs_mine" ] && return 0
	sleep 1
	return 1
}
vr_retry sibling-send 300 rs_send
vr_expect_eq sibling-send "$rs_mine" "$(cat /tmp/rs-reply 2>/dev/null)"
vr_wait_for 300 vr_collected_is /tmp/rs-in.d "$rs_theirs"
rs_f="$(vr_collected /tmp/rs-in.d)"
vr_info sibling-connections "$(vr_collected_count /tmp/rs-in.d)"
vr_expect_eq sibling-receive "$rs_theirs" "$([ -f "$rs_f" ] && vr_sha256 "$rs_f")"
vr_check sibling-peer-cid grep -qi "accepting connection from.*cid:$rs_peer port:${rs_f##*.} " /tmp/rs-in.log
