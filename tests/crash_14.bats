#!/usr/bin/env bats
# Crashes and stale state: what is left when the daemon dies, and what the
# next start finds.

load helpers

# The unprivileged test's directory is outside helpers' tmpdir.
teardown_hook() {
	[ -n "${USER_DIR:-}" ] || return 0
	[ -f "$USER_DIR/pid" ] && kill -9 "$(cat "$USER_DIR/pid")" 2>/dev/null
	umount -l "$USER_DIR/mnt" 2>/dev/null
	rm -rf "$USER_DIR"
}

# The crash watcher of daemon $DPID (root: its child, named uexportd-watch).
watcher_pid() { pgrep -P "$DPID" -x uexportd-watch; }

# blocks_over FILE N: FILE has more than N 512-byte blocks allocated.
blocks_over() { [ "$(stat -c %b "$1")" -gt "$2" ]; }

# A fio writer with verify, deep queue, that fsyncs every 64 writes.
fio_writer() {
	fio --name=crash --filename="$MNT" --direct=1 --ioengine=libaio --iodepth=64 \
		--rw=randwrite --bs=4k --size=32M --time_based --runtime=60 \
		--verify=crc32c --verify_fatal=1 --verify_state_save=0 --fsync=64 \
		>"$W/fio.out" 2>&1
}

# kill_cycle N: start, put fio under load, SIGKILL the daemon; fio must end
# within seconds, the mount must go, data fsync'd before the kill must be
# intact and the next start must succeed.
kill_cycle() {
	local i fpid
	for i in $(seq "$1"); do
		rm -f "$IMG"
		truncate -s 48M "$IMG"
		start_export -w "$IMG" "$MNT"
		fio_writer & fpid=$!
		# fio is writing (the sparse image fills) before the kill.
		wait_until 10 blocks_over "$IMG" 2048 ||
			{ echo "cycle $i: fio does not write" >&2; cat "$W/fio.out" >&2; return 1; }
		# Something fsync'd at a known place: it must survive the kill.
		echo "cycle $i survives" | dd of="$MNT" bs=1 seek=$((40 << 20)) conv=notrunc,fsync status=none
		kill -9 "$DPID"
		wait_until 10 pid_gone "$fpid" || { echo "cycle $i: fio still running 10 s after the kill" >&2; kill -9 "$fpid"; return 1; }
		wait "$fpid" || true
		wait_until 5 not_mounted "$MNT" || { echo "cycle $i: mount left behind" >&2; return 1; }
		[ "$(dd if="$IMG" bs=1 skip=$((40 << 20)) count=$((15 + ${#i})) status=none)" = "cycle $i survives" ] ||
			{ echo "cycle $i: fsync'd data lost" >&2; return 1; }
		rm -f "$PIDFILE"
	done
}

@test "kill -9 under a deep-queue fio load: fio ends, no mount left, fsync'd data intact, restarts" {
	require_root
	require_cmd fio
	truncate -s 48M "$IMG"
	kill_cycle 3
	start_export -w "$IMG" "$MNT"
	stop_export
}

@test "kill -9 cycles, long" {
	[ -n "${LONG:-}" ] || skip "long: make check-long"
	require_root
	require_cmd fio
	truncate -s 48M "$IMG"
	kill_cycle 20
}

@test "a dead mount left by a crash is named at the next start; --clean-stale detaches it" {
	require_root
	truncate -s 16M "$IMG"
	start_export -w "$IMG" "$MNT"
	# Kill the watcher first: the mount stays behind, dead.
	wpid=$(watcher_pid)
	[ -n "$wpid" ]
	kill -9 "$wpid" "$DPID"
	wait_until 5 pid_gone "$DPID"
	rm -f "$PIDFILE"
	is_mounted "$MNT"
	run "$UEXPORTD" $(transport_opt) -w "$IMG" "$MNT"
	[ "$status" -eq 5 ]
	[[ "$output" == *"mount point $MNT: a dead FUSE mount is still there"*"umount -l $MNT"*"--clean-stale"* ]]
	start_export -w --clean-stale "$IMG" "$MNT"
	[ "$(grep -c " $MNT fuse" /proc/mounts)" = 1 ]
	echo hello | dd of="$MNT" conv=notrunc status=none
	stop_export
	[ "$(head -c 5 "$IMG")" = hello ]
	not_mounted "$MNT"
}

@test "a mount point on a hung FUSE mount fails the start in bounded time" {
	require_root
	truncate -s 16M "$IMG" "$W/inner.raw"
	start_export -w "$IMG" "$MNT"
	kill -STOP "$DPID"
	touch "$W/other"
	run timeout 30 "$UEXPORTD" $(transport_opt) -w "$W/inner.raw" "$MNT"
	kill -CONT "$DPID"
	[ "$status" -eq 5 ]
	[[ "$output" == *"mount point $MNT: no answer in 5 s"* ]]
	stop_export
}

@test "after the daemon exits and is reaped, its image can be released at once" {
	require_root
	require_cmd mkfs.ext4
	local i pid
	truncate -s 64M "$W/fs.img"
	mkfs.ext4 -q -F "$W/fs.img"
	mkdir "$W/fs"
	mount -o loop "$W/fs.img" "$W/fs" || skip "cannot loop-mount an ext4 image"
	truncate -s 16M "$W/fs/disk.raw"
	for i in 1 2 3 4 5; do
		"$UEXPORTD" $(transport_opt) -f -w "$W/fs/disk.raw" "$MNT" 2>"$LOG" & pid=$!
		wait_until 10 is_mounted "$MNT"
		dd if=/dev/zero of="$MNT" bs=1M count=4 conv=notrunc,fsync status=none
		kill -TERM "$pid"
		wait "$pid"
		# The image's file system must be free now, not some time later.
		umount "$W/fs" || { echo "round $i: image still held after the daemon exited" >&2; false; }
		mount -o loop "$W/fs.img" "$W/fs"
	done
	umount "$W/fs"
}

@test "an unprivileged daemon's kill -9 leaves no mount either; capturing its output does not hang" {
	require_root
	require_cmd fusermount3
	require_cmd setpriv
	fuse_dev_for_users
	# Its own directory: the user must reach it, helpers' tmpdir may not be.
	USER_DIR=$(mktemp -d /tmp/uexportd-crash.XXXXXX)
	chmod 755 "$USER_DIR"
	truncate -s 16M "$USER_DIR/img"
	touch "$USER_DIR/mnt"
	chown 65534:65534 "$USER_DIR" "$USER_DIR/img" "$USER_DIR/mnt"
	# $(...) returns only when nobody holds the pipe: not the daemon, not
	# fusermount3 (it stays, for auto_unmount), not the watcher.
	out=$(timeout 30 setpriv --reuid=65534 --regid=65534 --clear-groups "$UEXPORTD" $(transport_opt) -v -w \
		-p "$USER_DIR/pid" "$USER_DIR/img" "$USER_DIR/mnt" 2>&1) || {
		echo "$out"
		[[ "$out" == *"Operation not permitted"* ]] && skip "io_uring or FUSE refused to this user: $out"
		false; }
	[[ "$out" == *"transport=$UEXPORTD_TRANSPORT"* ]]
	is_mounted "$USER_DIR/mnt"
	kill -9 "$(cat "$USER_DIR/pid")"
	wait_until 15 not_mounted "$USER_DIR/mnt"
}

# An export unmounted from outside while its daemon is stopped; a
# successor mounted on the same path then (typically given the same device
# minor, freed with the first connection).  Sets APID (stopped), BPIDFILE.
successor_over_stopped() {
	truncate -s 16M "$IMG"
	printf successor > "$W/b.raw"
	truncate -s 16M "$W/b.raw"
	start_fg -v -w "$IMG" "$MNT"
	APID=$DPID
	kill -STOP "$APID"
	umount -c "$MNT"
	BPIDFILE=$W/b.pid
	PIDFILE=$BPIDFILE LOG=$W/b.log start_export -w "$W/b.raw" "$MNT"
}

# The successor is still mounted and serving its own image.
successor_serves() {
	is_mounted "$MNT" || { echo "the successor's mount was taken down" >&2; return 1; }
	[ "$(head -c 9 "$MNT")" = successor ] || { echo "the successor does not serve" >&2; return 1; }
}

@test "a daemon unmounted from outside leaves a successor's mount on the same path alone" {
	require_root
	successor_over_stopped
	kill -CONT "$APID"
	wait_until 20 exited "$APID"
	wait "$APID"
	successor_serves
	grep -q "no longer our mount on top: not unmounting it" "$LOG" || { cat "$LOG"; false; }
	PIDFILE=$BPIDFILE stop_export
}

@test "the crash watcher of a daemon unmounted from outside leaves a successor's mount alone" {
	require_root
	successor_over_stopped
	wpid=$(pgrep -P "$APID" -x uexportd-watch)
	[ -n "$wpid" ]
	kill -9 "$APID"
	wait_until 10 pid_gone "$wpid"
	successor_serves
	PIDFILE=$BPIDFILE stop_export
}
