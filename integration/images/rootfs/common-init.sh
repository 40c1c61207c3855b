# Shared part of /init for the inner guest and the KVM host (sourced).
export PATH=/vr/bin:/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
umask 022
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs tmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
# shellcheck source=vrtest.sh
. /lib/vrtest.sh

vr_shutdown() {
	# Reboot, not power off: without ACPI a power-off only halts, while a
	# reboot exits QEMU (-no-reboot) and is what our VMM observes (i8042
	# reset with reboot=k, or a triple fault with reboot=t).
	sync
	reboot -f
	sleep 5
	echo b >/proc/sysrq-trigger 2>/dev/null
	while :; do sleep 60; done
}

# Run the scenario given on the command line: vr.cmd=<base64 script>,
# vr.cmdgz=<base64 of gzipped script>, or vr.scenario=<name> (a file in
# /vr/scenarios/), or the file /vr/scenario.sh. vr.timeout=<s> bounds it.
vr_run_scenario() {
	_script=/tmp/vr-scenario.sh
	if _c="$(vr_cmdline_arg vr.cmd)"; then
		printf '%s' "$_c" | base64 -d >"$_script" || { vr_fail scenario "vr.cmd is not base64"; return 1; }
	elif _c="$(vr_cmdline_arg vr.cmdgz)"; then
		printf '%s' "$_c" | base64 -d | gunzip >"$_script" || { vr_fail scenario "vr.cmdgz is not base64 gzip"; return 1; }
	elif _c="$(vr_cmdline_arg vr.scenario)"; then
		[ -f "/vr/scenarios/$_c.sh" ] || { vr_fail scenario "no scenario named '$_c'"; return 1; }
		cp "/vr/scenarios/$_c.sh" "$_script"
	elif [ -f /vr/scenario.sh ]; then
		cp /vr/scenario.sh "$_script"
	else
		vr_fail scenario "no vr.cmd, vr.cmdgz, vr.scenario or /vr/scenario.sh"
		return 1
	fi
	_timeout="$(vr_cmdline_arg vr.timeout || echo 600)"
	# Watchdog: a hung scenario still ends the VM with a verdict.
	(
		sleep "$_timeout"
		echo "VRTEST scenario-timeout FAIL scenario still running after ${_timeout}s"
		echo "VRTEST-DONE rc=124"
		vr_shutdown
	) &
	_wd=$!
	VR_FAILED=0
	# shellcheck source=vrtest.sh disable=SC1090
	( . /lib/vrtest.sh; VR_FAILED=0; . "$_script"; _rc=$?; [ "$VR_FAILED" = 0 ] || exit 1; exit "$_rc" )
	_rc=$?
	kill "$_wd" 2>/dev/null
	return "$_rc"
}
