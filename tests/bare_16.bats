#!/usr/bin/env bats
# A bare root: each static build (uexportd-static: glibc, uexportd-musl)
# runs in a chroot holding the binary, a /dev/fuse node and the image --
# plus the empty file the export is mounted on -- and nothing else: no
# /proc, /sys, /etc, /dev/null, /dev/log or /dev/kmsg.  Start (io_uring
# counts its queues by asking the kernel), data, SIGTERM, an external
# umount, a second start, kill -9 (the crash watcher), a dead mount left
# anyway (--clean-stale), a client holding the file at the stop (the abort
# through a detached fusectl mount), and a daemon whose output is captured.

load helpers

# Both static builds, once for the file (make rebuilds only a stale one).
setup_file() {
	make -C "$TOP" -s uexportd-static || return 1
	if command -v musl-gcc >/dev/null; then make -C "$TOP" -s uexportd-musl || return 1; fi
}

# bare_root BUILD (static, musl): ROOT, holding only the binary BUILD, a
# /dev/fuse node and a 16 MiB image of random bytes, plus the mount point
# BMNT=ROOT/file.  The daemon's pidfile is ROOT/pid (helpers' teardown
# kills what it names), its mount point and image /file and /image.
bare_root() {
	require_root
	require_cmd chroot
	local bin=$TOP/uexportd-$1
	[ -x "$bin" ] || skip "uexportd-$1 not built (musl-gcc missing: Debian package musl-tools)"
	ROOT=$(realpath "$W")/root
	BMNT=$ROOT/file
	PIDFILE=$ROOT/pid
	mkdir -p "$ROOT/dev"
	cp "$bin" "$ROOT/uexportd"
	mknod "$ROOT/dev/fuse" c 10 229
	random_file "$ROOT/image" $((16 << 20))
	touch "$BMNT"
	[ "$(cd "$ROOT" && find . ! -type d | sort | tr '\n' ' ')" = "./dev/fuse ./file ./image ./uexportd " ]
}

# The export on BMNT (by its exact path: a dead mount cannot be resolved).
bare_mounted() { grep -q " $BMNT fuse" /proc/mounts; }
bare_unmounted() { ! bare_mounted; }
bare_mounts() { grep -c " $BMNT fuse" /proc/mounts; }

# expect_transport: LOG's start-up line names the run's transport; over
# io_uring with one queue per possible CPU, counted without /sys.
expect_transport() {
	if [ "$UEXPORTD_TRANSPORT" = uring ]; then
		grep -q "transport=uring queues=$(possible_cpus) " "$LOG" &&
			grep -q "no /sys/devices/system/cpu/possible: the kernel takes $(possible_cpus) queues" "$LOG"
	else
		grep -q "transport=dev-fuse" "$LOG"
	fi || { echo "expected transport=$UEXPORTD_TRANSPORT:" >&2; cat "$LOG" >&2; return 1; }
}

# bare_fg [OPTIONS...]: the daemon in the chroot, in the foreground (a
# child of this shell: chroot execs it), exporting /image writable on
# /file, its stderr in LOG; returns once live.  Sets DPID.
bare_fg() {
	chroot "$ROOT" /uexportd $(transport_opt) -f -v -w -p /pid "$@" /image /file \
		2>"$LOG" >/dev/null 3>&- &
	DPID=$!
	wait_until 20 fg_started || true
	if exited "$DPID" || ! bare_mounted; then
		kill -9 "$DPID" 2>/dev/null
		echo "not live after start:" >&2; cat "$LOG" >&2; return 1
	fi
	expect_transport
}

# bare_daemon [OPTIONS...]: the same, daemonized; returns once live.
bare_daemon() {
	chroot "$ROOT" /uexportd $(transport_opt) -v -w -p /pid "$@" /image /file 2>"$LOG" ||
		{ cat "$LOG" >&2; return 1; }
	DPID=$(cat "$PIDFILE")
	bare_mounted || { echo "not mounted after start" >&2; return 1; }
	expect_transport
}

# bare_wait_exit STATUS: the foreground daemon DPID exits with STATUS within
# 20 s, leaving neither its mount nor its pidfile.
bare_wait_exit() {
	local rc=0
	wait_until 20 exited "$DPID" || { kill -9 "$DPID"; echo "daemon $DPID did not exit" >&2; return 1; }
	wait "$DPID" || rc=$?
	[ "$rc" = "$1" ] || { echo "exited $rc, expected $1:" >&2; cat "$LOG" >&2; return 1; }
	wait_until 5 bare_unmounted || { echo "$BMNT still mounted" >&2; return 1; }
	[ ! -e "$PIDFILE" ] || { echo "pidfile left behind" >&2; return 1; }
}

# write_and_check: 1 MiB of random bytes written at 64 KiB through the
# mount from outside the chroot, fsync'd, read back byte for byte.
write_and_check() {
	random_file "$W/data" $((1 << 20))
	dd if="$W/data" of="$BMNT" bs=64K seek=1 conv=notrunc,fsync status=none
	cmp <(dd if="$BMNT" bs=64K skip=1 count=16 status=none) "$W/data"
}

# in_image: those bytes are in the image itself.
in_image() { cmp <(dd if="$ROOT/image" bs=64K skip=1 count=16 status=none) "$W/data"; }

serves_and_stops() {
	bare_root "$1"
	bare_fg
	write_and_check
	kill -TERM "$DPID"
	bare_wait_exit 0
	in_image
	[ "$(stat -c %s "$BMNT")" = 0 ]		# the file underneath again
}

@test "glibc: starts without /proc /sys /etc, serves byte-exact, SIGTERM unmounts, exit 0" {
	serves_and_stops static
}

@test "musl: starts without /proc /sys /etc, serves byte-exact, SIGTERM unmounts, exit 0" {
	serves_and_stops musl
}

exits_on_umount() {
	bare_root "$1"
	bare_fg
	write_and_check
	umount "$BMNT"
	bare_wait_exit 0
	in_image
}

@test "glibc: an external umount makes the daemon exit by itself" {
	exits_on_umount static
}

@test "musl: an external umount makes the daemon exit by itself" {
	exits_on_umount musl
}

# Without /proc the "already a mount point" check is statx's.  The second
# start's output goes to a file: a daemon that stacked would hold a pipe.
never_stacks() {
	local rc=0
	bare_root "$1"
	bare_fg
	chroot "$ROOT" /uexportd $(transport_opt) -w /image /file >"$W/second.log" 2>&1 || rc=$?
	[ "$rc" = 5 ] && grep -q "mount point /file: already a mount point" "$W/second.log" ||
		{ echo "second start: status $rc:" >&2; cat "$W/second.log" >&2; return 1; }
	[ "$(bare_mounts)" = 1 ]
	kill -TERM "$DPID"
	bare_wait_exit 0
	bare_fg
	[ "$(bare_mounts)" = 1 ]
	write_and_check
	kill -TERM "$DPID"
	bare_wait_exit 0
	in_image
}

@test "glibc: a second start is refused while live, and a start after a stop mounts once" {
	never_stacks static
}

@test "musl: a second start is refused while live, and a start after a stop mounts once" {
	never_stacks musl
}

# The watcher aborts through a detached fusectl mount (no /sys) and logs
# to the daemon's stderr, a file (no syslog).
crash_cleaned_up() {
	local rc=0
	bare_root "$1"
	bare_daemon
	write_and_check
	exec 4<"$BMNT"
	kill -9 "$DPID"
	wait_until 10 bare_unmounted || { echo "dead mount left behind:" >&2; cat "$LOG" >&2; return 1; }
	# A client still holding the file fails at once instead of waiting.
	timeout 10 cat <&4 >/dev/null 2>&1 || rc=$?
	exec 4<&-
	[ "$rc" != 0 ] && [ "$rc" != 124 ] || { echo "read after the crash: status $rc" >&2; return 1; }
	wait_until 5 grep -q "uexportd-watch: daemon $DPID died: aborting connection [0-9]*, detaching /file" "$LOG" ||
		{ cat "$LOG" >&2; return 1; }
	! grep -q "abort connection\|detach /file:" "$LOG" || { cat "$LOG" >&2; return 1; }
	in_image
	rm -f "$PIDFILE"
	bare_daemon
	[ "$(bare_mounts)" = 1 ]
	kill -TERM "$DPID"
	wait_until 20 pid_gone "$DPID"
	wait_until 5 bare_unmounted
}

@test "glibc: kill -9 leaves no dead mount: the watcher aborts and detaches, and says so" {
	crash_cleaned_up static
}

@test "musl: kill -9 leaves no dead mount: the watcher aborts and detaches, and says so" {
	crash_cleaned_up musl
}

# The watcher killed with the daemon: the dead mount stays; the next start
# names it (found by a bounded stat, no /proc), --clean-stale detaches it.
stale_cleaned() {
	local rc=0 wpid
	bare_root "$1"
	bare_daemon
	wpid=$(pgrep -P "$DPID" -x uexportd-watch) || { echo "no watcher" >&2; return 1; }
	kill -9 "$wpid" "$DPID"
	wait_until 5 pid_gone "$DPID"
	rm -f "$PIDFILE"
	bare_mounted
	chroot "$ROOT" /uexportd $(transport_opt) -w /image /file >"$W/stale.log" 2>&1 || rc=$?
	[ "$rc" = 5 ] &&
		grep -q "mount point /file: a dead FUSE mount is still there.*umount -l /file.*--clean-stale" "$W/stale.log" ||
		{ echo "start over a dead mount: status $rc:" >&2; cat "$W/stale.log" >&2; return 1; }
	bare_daemon --clean-stale
	[ "$(bare_mounts)" = 1 ]
	write_and_check
	kill -TERM "$DPID"
	wait_until 20 pid_gone "$DPID"
	wait_until 5 bare_unmounted
	in_image
}

@test "glibc: a dead mount left with the watcher killed too: named at the next start, --clean-stale detaches it" {
	stale_cleaned static
}

@test "musl: a dead mount left with the watcher killed too: named at the next start, --clean-stale detaches it" {
	stale_cleaned musl
}

# A client holds the file at the stop: lazy detach, then after the grace
# period the connection is aborted through a detached fusectl mount.
abort_at_stop() {
	local rc=0
	bare_root "$1"
	bare_fg
	exec 4<"$BMNT"
	kill -TERM "$DPID"
	bare_wait_exit 0
	timeout 10 cat <&4 >/dev/null 2>&1 || rc=$?
	exec 4<&-
	[ "$rc" != 0 ] && [ "$rc" != 124 ] || { echo "read after the stop: status $rc" >&2; return 1; }
	grep -q "clients still hold /file: aborting the connection" "$LOG" || { cat "$LOG" >&2; return 1; }
	! grep -q "abort connection\|threads did not end" "$LOG" || { cat "$LOG" >&2; return 1; }
}

@test "glibc: a client holding the file at the stop: its connection is aborted without /sys" {
	abort_at_stop static
}

@test "musl: a client holding the file at the stop: its connection is aborted without /sys" {
	abort_at_stop musl
}

# Without /dev/null the daemon must still let go of its caller's pipes, and
# say where its later messages go: nowhere here.  The reader is bounded: a
# daemon that kept the pipe would hold $(...) forever.
captured() {
	local out rc
	bare_root "$1"
	{
		chroot "$ROOT" /uexportd $(transport_opt) -v -w -p /pid /image /file 2>&1 |
			timeout 20 cat >"$W/out"
		rc=("${PIPESTATUS[@]}")
	} || true
	out=$(cat "$W/out")
	[ "${rc[1]}" != 124 ] || { echo "the daemon holds its caller's pipe: $out" >&2; return 1; }
	[ "${rc[0]}" = 0 ] || { echo "start: status ${rc[0]}: $out" >&2; return 1; }
	[[ "$out" == *"transport=$UEXPORTD_TRANSPORT"* ]] || { echo "$out" >&2; return 1; }
	[[ "$out" == *"no syslog (/dev/log), no /dev/kmsg, and stderr is a pipe: later messages are lost"* ]] ||
		{ echo "$out" >&2; return 1; }
	DPID=$(cat "$PIDFILE")
	bare_mounted
	write_and_check
	kill -TERM "$DPID"
	wait_until 20 pid_gone "$DPID"
	wait_until 5 bare_unmounted
	in_image
}

@test "glibc: daemonized with its output captured: returns once live, holds no pipe" {
	captured static
}

@test "musl: daemonized with its output captured: returns once live, holds no pipe" {
	captured musl
}
