#!/usr/bin/env bats
# Block-device images (a loop device) and a failing disk (dm "error").

load helpers

# helpers' teardown kills the daemon and unmounts, then runs this, then
# detaches the loop device: the dm table over it must go first.
teardown_hook() {
	local pid
	[ -f "$W/inner.pid" ] && pid=$(cat "$W/inner.pid") && kill -9 "$pid" 2>/dev/null
	[ -n "${DM:-}" ] && dmsetup remove --retry "$DM" 2>/dev/null
	true
}

@test "block device: size from the device, byte-exact I/O, fixed size" {
	attach_loop 8M
	start_export -w "$LOOP" "$MNT"
	[ "$(stat -c %s "$MNT")" = $((8 * 1024 * 1024)) ]
	cmp "$LOOP" "$MNT"
	random_file "$W/chunk" 12345
	dd if="$W/chunk" of="$MNT" bs=12345 seek=7 conv=notrunc status=none
	cmp <(dd if="$LOOP" bs=12345 skip=7 count=1 status=none) "$W/chunk"
	run "$FSOPS" pwrite "$MNT" $((8 * 1024 * 1024)) 1
	[ "$output" = "err ENOSPC" ]
	run "$FSOPS" truncate "$MNT" 10000
	[ "$output" = "ok 0" ]
	[ "$(stat -c %s "$MNT")" = $((8 * 1024 * 1024)) ]
	cmp <(tail -c +10001 "$LOOP") <(head -c $((8 * 1024 * 1024 - 10000)) /dev/zero)
	cmp <(head -c 10000 "$LOOP") <(head -c 10000 "$W/backing")
	run "$FSOPS" lseek "$MNT" hole 0
	[ "$output" = "ok $((8 * 1024 * 1024))" ]
	run "$FSOPS" fallocate "$MNT" zero 4096 8192
	[ "$output" = "ok 0" ]
	cmp <(head -c 8192 /dev/zero) <(dd if="$MNT" bs=4096 skip=1 count=2 status=none)
	stop_export
}

@test "block device with --direct" {
	attach_loop 4M
	start_export -w --direct "$LOOP" "$MNT"
	random_file "$W/chunk" 1M
	dd if="$W/chunk" of="$MNT" bs=1M seek=1 conv=notrunc status=none
	dd if="$W/chunk" of="$MNT" bs=1 seek=3 count=1000 conv=notrunc status=none
	cmp <(dd if="$MNT" bs=1M skip=1 count=1 status=none) "$W/chunk"
	cmp <(dd if="$MNT" bs=1 skip=3 count=1000 status=none) <(head -c 1000 "$W/chunk")
	stop_export
}

@test "failing disk: EIO reaches the client, the daemon keeps serving and exits cleanly" {
	require_root
	require_cmd dmsetup
	attach_loop 4M
	# Sectors 2048-4095 (1-2 MiB) fail; the rest maps to the loop device.
	DM=uexportd-test-$$
	printf '0 2048 linear %s 0\n2048 2048 error\n4096 4096 linear %s 4096\n' "$LOOP" "$LOOP" |
		dmsetup create "$DM" || skip "device-mapper unavailable"
	start_export -w "/dev/mapper/$DM" "$MNT"
	run dd if="$MNT" of=/dev/null bs=4096 skip=300 count=1 status=none
	[ "$status" -ne 0 ]; [[ "$output" == *"Input/output error"* ]]
	run dd if=/dev/zero of="$MNT" bs=4096 seek=300 count=1 conv=notrunc,fsync status=none
	[ "$status" -ne 0 ]; [[ "$output" == *"Input/output error"* ]]
	cmp <(head -c 1M "$W/backing") <(head -c 1M "$MNT")
	kill -0 "$DPID"
	stop_export
}

@test "failing storage under the image: errors reach the client, the daemon survives" {
	require_root
	# The image lives on a second export whose connection we abort: every
	# I/O on it then fails (ECONNABORTED), like a disk that went away.
	random_file "$W/inner.raw" 1M
	touch "$W/inner.file"
	"$UEXPORTD" $(transport_opt) -w -p "$W/inner.pid" "$W/inner.raw" "$W/inner.file"
	start_export -w "$W/inner.file" "$MNT"
	cmp "$W/inner.raw" "$MNT"
	minor=$(stat -c %d "$W/inner.file")
	minor=$(( minor & 0xff | (minor >> 12) & ~0xff ))
	[ -e /sys/fs/fuse/connections/$minor/abort ] || mount -t fusectl fusectl /sys/fs/fuse/connections
	echo 1 > /sys/fs/fuse/connections/$minor/abort
	run dd if="$MNT" of=/dev/null bs=4096 count=1 status=none
	[ "$status" -ne 0 ]; [[ "$output" == *"connection abort"* || "$output" == *"not connected"* ]]
	run "$FSOPS" pwrite "$MNT" 0 4096
	[[ "$output" == "err ECONNABORTED" || "$output" == "err ENOTCONN" ]]
	kill -0 "$DPID"
	stop_export
	# The aborted inner daemon noticed and took its dead mount down itself.
	inner=$(cat "$W/inner.pid" 2>/dev/null || true)
	[ -z "$inner" ] || wait_until 20 pid_gone "$inner"
	wait_until 10 not_mounted "$W/inner.file"
}
