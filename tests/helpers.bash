# Shared helpers for the uexportd bats suite.
#
# UEXPORTD_TRANSPORT=uring|dev-fuse picks the transport every export in the
# run must use; each start asserts the start-up line names it, so a silent
# fallback cannot pass as the other transport.

TOP=$(cd "$BATS_TEST_DIRNAME/.." && pwd)
UEXPORTD=${UEXPORTD:-$TOP/uexportd}
FSOPS=$TOP/tests/fsops
UEXPORTD_TRANSPORT=${UEXPORTD_TRANSPORT:-dev-fuse}

transport_opt() {
	if [ "$UEXPORTD_TRANSPORT" = uring ]; then echo --io-uring=on; else echo --io-uring=off; fi
}

# wait_until SECONDS CMD...: poll CMD every 20 ms until it succeeds.
wait_until() {
	local limit=$1; shift
	local deadline=$(( $(date +%s%N) + limit * 1000000000 ))
	until "$@"; do
		[ "$(date +%s%N)" -lt "$deadline" ] || return 1
		sleep 0.02
	done
}

# cpu_list_ids LIST: the CPU ids of a kernel CPU list ("0", "0-3,8-11",
# "0,2-5": the format of /sys/devices/system/cpu/possible and of
# taskset -pc), one per line.  Fails on anything else.
cpu_list_ids() {
	awk -v list="$1" 'BEGIN {
		sub(/[ \t\n]+$/, "", list)	# as read from sysfs
		n = split(list, part, ",")
		if (n == 0) { print "empty CPU list" > "/dev/stderr"; exit 1 }
		for (i = 1; i <= n; i++) {
			if (part[i] !~ /^[0-9]+(-[0-9]+)?$/) {
				print "bad CPU list: " list > "/dev/stderr"; exit 1
			}
			split(part[i], r, "-")
			a = r[1] + 0; b = (part[i] ~ /-/) ? r[2] + 0 : a
			if (b < a) { print "bad CPU list: " list > "/dev/stderr"; exit 1 }
			for (c = a; c <= b; c++) print c
		}
	}'
}

# cpu_list_count LIST: how many CPUs a kernel CPU list names.
cpu_list_count() {
	local ids
	ids=$(cpu_list_ids "$1") || return 1
	wc -l <<<"$ids"
}

# possible_cpus: the number of possible CPUs, the daemon's io_uring queue
# count (not the highest id + 1: ids may have gaps, e.g. 0-3,8-11).
possible_cpus() { cpu_list_count "$(cat /sys/devices/system/cpu/possible)"; }

# allowed_cpus: the ids of the CPUs this test may run on (its affinity,
# online ones only, as taskset -pc reports them), one per line.
allowed_cpus() {
	local list
	list=$(taskset -pc "$BASHPID") || return 1
	cpu_list_ids "${list##*: }"
}

# expected_memory_plan BUDGET UNITS DEPTH: "DEPTH PAYLOAD" as uexportd's
# memory_plan() fits UNITS queues x DEPTH entries x PAYLOAD bytes (1 MiB at
# most) in BUDGET bytes: depth halves down to 16, then the payload halves
# down to 128 KiB, then depth drops by one down to 1.
expected_memory_plan() {
	local budget=$1 units=$2 depth=$3 payload=$((1 << 20))
	while (( units * depth * payload > budget )); do
		if (( depth > 16 )); then
			depth=$(( depth / 2 < 16 ? 16 : depth / 2 ))
		elif (( payload > 128 << 10 )); then
			payload=$(( payload / 2 ))
		elif (( depth > 1 )); then
			depth=$(( depth - 1 ))
		else
			break
		fi
	done
	echo "$depth $payload"
}

is_mounted() { grep -q " $(realpath "$1") fuse" /proc/mounts; }
not_mounted() { ! is_mounted "$1"; }
# pid_gone PID: the process has ended.  A zombie has: it has closed its
# descriptors, released its mounts and left its exit status.
# A daemonized uexportd is an orphan, reaped by PID 1 whenever PID 1 gets to
# it (up to 2 s on this VM's init), so kill -0 alone would wait for that.
pid_gone() { exited "$1"; }
# exited PID: PID, a child of this shell, has ended (a zombie not yet
# reaped by wait counts: kill -0 still succeeds on it).
exited() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
	stat=${stat##*) }
	[ "${stat%% *}" = Z ]
}

# A scratch dir on a disk file system (ext4 here) rather than tmpfs: tmpfs
# lacks ZERO_RANGE and has different SEEK_DATA granularity.
setup() {
	W=$BATS_TEST_TMPDIR
	IMG=$W/disk.raw
	MNT=$W/disk.file
	PIDFILE=$W/uexportd.pid
	LOG=$W/uexportd.log
	touch "$MNT"
}

# start_export [OPTIONS...] IMAGE MOUNTPOINT: daemonize with a pidfile; the
# parent returns only once the mount is live.  Sets DPID.
start_export() {
	"$UEXPORTD" $(transport_opt) -v -p "$PIDFILE" "$@" 2>"$LOG" || {
		cat "$LOG" >&2; return 1; }
	DPID=$(cat "$PIDFILE")
	is_mounted "${@: -1}" || { echo "not mounted after start" >&2; return 1; }
	grep -q "transport=$UEXPORTD_TRANSPORT" "$LOG" || {
		echo "expected transport=$UEXPORTD_TRANSPORT:" >&2; cat "$LOG" >&2; return 1; }
}

# start_fg [OPTIONS...] IMAGE MOUNTPOINT: run the daemon in the foreground
# (-f) as a child of this shell, its log (stderr) in LOG, with a pidfile;
# returns once the mount is live.  Sets DPID; stop_fg gets the exit status.
start_fg() {
	local mnt=${*: -1}
	"$UEXPORTD" $(transport_opt) -f -p "$PIDFILE" "$@" 2>"$LOG" >/dev/null 3>&- &
	DPID=$!
	wait_until 20 fg_started || true
	if exited "$DPID" || ! is_mounted "$mnt"; then
		kill -9 "$DPID" 2>/dev/null
		echo "not live after start:" >&2; cat "$LOG" >&2; return 1
	fi
	grep -q "transport=$UEXPORTD_TRANSPORT" "$LOG" || {
		echo "expected transport=$UEXPORTD_TRANSPORT:" >&2; cat "$LOG" >&2; return 1; }
}
fg_started() { [ "$(cat "$PIDFILE" 2>/dev/null)" = "$DPID" ] || exited "$DPID"; }

# stop_fg STATUS: SIGTERM to a start_fg daemon, which must exit with STATUS
# and leave neither its mount nor its pidfile.
stop_fg() {
	local want=$1 mnt=${2:-$MNT} rc=0
	kill -TERM "$DPID"
	wait_until 20 exited "$DPID" || {
		kill -9 "$DPID"; echo "daemon $DPID did not exit" >&2; return 1; }
	wait "$DPID" || rc=$?
	wait_until 5 not_mounted "$mnt" || { echo "$mnt still mounted" >&2; return 1; }
	[ ! -e "$PIDFILE" ] || { echo "pidfile left behind" >&2; return 1; }
	[ "$rc" = "$want" ] || {
		echo "daemon exited $rc, expected $want; its log:" >&2; cat "$LOG" >&2; return 1; }
}

# stop_export: SIGTERM, then the daemon must exit 0 and the mount be gone.
stop_export() {
	local mnt=${1:-$MNT}
	kill -TERM "$DPID"
	wait_until 20 pid_gone "$DPID" || { echo "daemon $DPID did not exit" >&2; return 1; }
	wait_until 5 not_mounted "$mnt"
	[ ! -e "$PIDFILE" ] || { echo "pidfile left behind" >&2; return 1; }
}

# teardown: whatever the test left (it may have failed half-way).  A test
# file that holds more (a device-mapper table, a kernel parameter it
# flipped) defines teardown_hook, not its own teardown: the hook runs once
# the daemon is dead and the mounts are gone, before the loop device (LOOP)
# is detached and /dev/fuse's mode (FUSE_DEV_MODE) restored.
teardown() {
	local pid
	# Dead, not just signalled: its image (a device) may be removed next.
	[ -f "$PIDFILE" ] && pid=$(cat "$PIDFILE") && kill -9 "$pid" 2>/dev/null &&
		wait_until 5 pid_gone "$pid"
	for m in $(grep " $BATS_TEST_TMPDIR" /proc/mounts | awk '{print $2}' | sort -r); do
		umount -l "$m" 2>/dev/null || true
	done
	if declare -F teardown_hook >/dev/null; then teardown_hook || true; fi
	[ -n "${LOOP:-}" ] && losetup -d "$LOOP" 2>/dev/null
	[ -n "${FUSE_DEV_MODE:-}" ] && chmod "$FUSE_DEV_MODE" /dev/fuse
	true
}

# attach_loop SIZE: a loop device over $W/backing, SIZE random bytes; sets
# LOOP (detached by teardown).
attach_loop() {
	require_root
	require_cmd losetup
	random_file "$W/backing" "$1"
	LOOP=$(losetup --find --show "$W/backing" 2>/dev/null) || skip "no loop devices"
}

# fuse_dev_for_users: /dev/fuse open to everyone, as distributions ship it
# (fusermount3 opens it as the user); a fresh VM may have it 0600.  The
# mode is restored by teardown.
fuse_dev_for_users() {
	if [ "$(( 0$(stat -c %a /dev/fuse) & 06 ))" != 6 ]; then
		FUSE_DEV_MODE=$(stat -c %a /dev/fuse)
		chmod 0666 /dev/fuse
	fi
}

require_root() { [ "$(id -u)" = 0 ] || skip "needs root"; }
require_cmd() { command -v "$1" >/dev/null || skip "needs $1"; }

# Random file of SIZE bytes.
random_file() { head -c "$2" /dev/urandom > "$1"; }

# fill_ab LEN: LEN bytes of 0xab, what "fsops pwrite" writes.
fill_ab() { head -c "$1" /dev/zero | tr '\0' '\253'; }

# is_ab FILE OFF LEN: FILE holds 0xab over [OFF, OFF + LEN).
is_ab() {
	cmp <(dd if="$1" iflag=skip_bytes,count_bytes skip="$2" count="$3" bs=64K status=none) \
	    <(fill_ab "$3")
}
