# Inner guest smoke test: user space runs, data can be generated and hashed.
vr_info boot-ms "$(vr_uptime_ms)"
vr_check proc-mounted test -r /proc/cmdline
sum="$(vr_pattern_file /tmp/data 1048576)"
vr_expect_eq data-size 1048576 "$(wc -c </tmp/data | tr -d ' ')"
vr_result data-sha256 PASS "$sum"
vr_check socat-runs socat -V
