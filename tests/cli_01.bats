#!/usr/bin/env bats
# Command line, start-up, shutdown and every bad input.

load helpers

@test "--help and --version" {
	run "$UEXPORTD" --help
	[ "$status" -eq 0 ]
	[[ "$output" == *"--queue-depth"* ]]
	run "$UEXPORTD" -V
	[ "$status" -eq 0 ]
	[[ "$output" == "uexportd "* ]]
}

@test "start daemonized: live on return, pidfile, startup line, SIGTERM unmounts" {
	require_root
	random_file "$IMG" 1M
	start_export "$IMG" "$MNT"
	cmp "$IMG" "$MNT"
	grep -q "($((1024*1024)) bytes, ro) on $MNT: transport=$UEXPORTD_TRANSPORT" "$LOG"
	kill -0 "$DPID"
	stop_export
}

@test "foreground: startup line on stderr, SIGINT exits 0" {
	require_root
	random_file "$IMG" 64K
	"$UEXPORTD" $(transport_opt) -f "$IMG" "$MNT" 2>"$LOG" &
	pid=$!
	wait_until 10 is_mounted "$MNT"
	wait_until 5 grep -q "transport=$UEXPORTD_TRANSPORT" "$LOG"
	cmp "$IMG" "$MNT"
	kill -INT $pid
	wait $pid
	not_mounted "$MNT"
}

@test "SIGHUP also shuts down cleanly" {
	require_root
	random_file "$IMG" 64K
	start_export "$IMG" "$MNT"
	kill -HUP "$DPID"
	wait_until 20 pid_gone "$DPID"
	not_mounted "$MNT"
}

@test "external umount makes the daemon exit by itself" {
	require_root
	random_file "$IMG" 64K
	start_export -w "$IMG" "$MNT"
	umount "$MNT"
	wait_until 20 pid_gone "$DPID"
	[ ! -e "$PIDFILE" ]
}

@test "bad options: clear one-line errors, non-zero exit" {
	random_file "$IMG" 64K
	run "$UEXPORTD" --queue-depth=0 "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"invalid --queue-depth '0'"* ]]
	run "$UEXPORTD" -q 99999 "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"expected 1-"* ]]
	run "$UEXPORTD" -q abc "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"invalid --queue-depth"* ]]
	run "$UEXPORTD" -q 4294967297 "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"invalid --queue-depth '4294967297'"* ]]
	run "$UEXPORTD" --io-uring=maybe "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"invalid --io-uring 'maybe'"* ]]
	run "$UEXPORTD" --allow-other=yes "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"invalid --allow-other 'yes'"* ]]
	run "$UEXPORTD" --max-memory=12X "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"invalid --max-memory '12X'"* ]]
	run "$UEXPORTD" --max-memory=4K "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"at least 1M"* ]]
	run "$UEXPORTD" --no-such-option "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"--help"* ]]
	run "$UEXPORTD" -g "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"--growable needs --writable"* ]]
	run "$UEXPORTD" "$IMG"
	[ "$status" -eq 2 ]; [[ "$output" == *"expected IMAGE and MOUNTPOINT"* ]]
	run "$UEXPORTD" null:12Q "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"invalid image 'null:12Q'"* ]]
	not_mounted "$MNT"
}

@test "bad images: missing, directory, unwritable with --writable" {
	run "$UEXPORTD" -f "$W/missing.raw" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == "uexportd: open $W/missing.raw: No such file or directory" ]]
	mkdir "$W/dir"
	run "$UEXPORTD" -f "$W/dir" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"$W/dir: Is a directory"* ]]
	run "$UEXPORTD" -f /dev/null "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"not a regular file or block device"* ]]
	# A FIFO is refused at once, not waited on for a writer.
	mkfifo "$W/fifo"
	run timeout -k 1 10 "$UEXPORTD" -f "$W/fifo" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"$W/fifo: not a regular file or block device"* ]]
	random_file "$IMG" 4K
	chmod 0444 "$IMG"
	chattr +i "$IMG" 2>/dev/null || skip "cannot make an unwritable image (chattr)"
	run "$UEXPORTD" -f -w "$IMG" "$MNT"
	chattr -i "$IMG"
	[ "$status" -eq 4 ]; [[ "$output" == *"open $IMG: Operation not permitted"* ]]
	not_mounted "$MNT"
}

@test "bad mount points: missing, directory, already mounted" {
	require_root
	random_file "$IMG" 64K
	run "$UEXPORTD" -f "$IMG" "$W/nothere"
	[ "$status" -eq 5 ]; [[ "$output" == *"mount point $W/nothere: No such file or directory"* ]]
	mkdir "$W/mntdir"
	run "$UEXPORTD" -f "$IMG" "$W/mntdir"
	[ "$status" -eq 5 ]; [[ "$output" == *"is a directory"* ]]
	start_export "$IMG" "$MNT"
	run "$UEXPORTD" $(transport_opt) -f "$IMG" "$MNT"
	[ "$status" -eq 5 ]; [[ "$output" == *"already a mount point"* ]]
	stop_export
}

@test "daemon start failure is reported by the parent with non-zero exit" {
	require_root
	random_file "$IMG" 64K
	# The pidfile directory does not exist: the failure happens after the
	# mount, in the daemonized child; the parent must still say why.
	run "$UEXPORTD" $(transport_opt) -p "$W/no/such/dir/pid" "$IMG" "$MNT"
	[ "$status" -eq 1 ]
	[[ "$output" == *"pidfile $W/no/such/dir/pid: No such file or directory"* ]]
	wait_until 5 not_mounted "$MNT"
}

@test "null: backend reads zeros, swallows writes, reports its size" {
	require_root
	start_export -w null:3M "$MNT"
	[ "$(stat -c %s "$MNT")" = $((3*1024*1024)) ]
	cmp <(head -c 3M /dev/zero) "$MNT"
	dd if=/dev/urandom of="$MNT" bs=64K count=4 conv=notrunc status=none
	cmp <(head -c 3M /dev/zero) "$MNT"
	grep -q "null:3M (3145728 bytes, rw)" "$LOG"
	stop_export
}

@test "allow-other: on lets another user in, off keeps them out" {
	require_root
	require_cmd setpriv
	random_file "$IMG" 64K
	chmod 0644 "$IMG"
	chmod 755 "$W" "$(dirname "$W")" "$(dirname "$(dirname "$W")")"
	# Writable (a read-only mount refuses chmod) and 0644: the mode is
	# not what lets the other user in or keeps them out.
	start_export -w --allow-other=on "$IMG" "$MNT"
	chmod 0644 "$MNT"
	setpriv --reuid=65534 --regid=65534 --clear-groups cat "$MNT" | cmp - "$IMG"
	stop_export
	start_export -w --allow-other=off "$IMG" "$MNT"
	chmod 0644 "$MNT"
	run setpriv --reuid=65534 --regid=65534 --clear-groups cat "$MNT"
	[ "$status" -ne 0 ]; [[ "$output" == *"Permission denied"* ]]
	stop_export
}

@test "debug: one line per request" {
	require_root
	random_file "$IMG" 64K
	"$UEXPORTD" $(transport_opt) -d "$IMG" "$MNT" 2>"$LOG" &
	pid=$!
	wait_until 10 is_mounted "$MNT"
	wait_until 5 grep -q "transport=" "$LOG"
	dd if="$MNT" of=/dev/null bs=4k count=1 skip=3 status=none
	wait_until 5 grep -q "\] READ unique=[0-9]* off=12288 len=4096 -> 0/4096" "$LOG"
	kill -TERM $pid
	wait $pid
}

@test "static builds: glibc -static and musl both build and run" {
	run make -C "$TOP" -s static
	[ "$status" -eq 0 ] || { echo "$output"; false; }
	"$TOP/uexportd-static" -V | grep -q "^uexportd "
	command -v musl-gcc >/dev/null || skip "musl-gcc missing (Debian package musl-tools)"
	run make -C "$TOP" -s static-musl
	[ "$status" -eq 0 ] || { echo "$output"; false; }
	"$TOP/uexportd-musl" -V | grep -q "^uexportd "
	[ -z "$(echo "$output" | grep warning)" ]
}
