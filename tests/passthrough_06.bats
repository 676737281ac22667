#!/usr/bin/env bats
# --passthrough: the kernel does READ/WRITE on the image itself.

load helpers

@test "passthrough: data round-trips, growth is seen, READ/WRITE never reach the daemon" {
	require_root
	random_file "$IMG" 1M
	REF=$W/ref; cp "$IMG" "$REF"
	"$UEXPORTD" $(transport_opt) -d -w -g --passthrough "$IMG" "$MNT" 2>"$LOG" &
	pid=$!
	wait_until 10 is_mounted "$MNT"
	wait_until 5 grep -q "transport=$UEXPORTD_TRANSPORT" "$LOG" || skip "$(tail -1 "$LOG")"
	grep -q "rw,growable,passthrough" "$LOG"
	random_file "$W/chunk" 70000
	dd if="$W/chunk" of="$MNT" bs=70000 seek=3 conv=notrunc status=none
	dd if="$W/chunk" of="$REF" bs=70000 seek=3 conv=notrunc status=none
	cmp "$MNT" "$REF"
	# Growth through the kernel is reflected in stat and in SEEK_HOLE.
	dd if="$W/chunk" of="$MNT" bs=1 seek=2000000 conv=notrunc status=none
	[ "$(stat -c %s "$MNT")" = $((2000000 + 70000)) ]
	run "$FSOPS" lseek "$MNT" hole 2000000
	[ "$output" = "ok 2070000" ]
	run "$FSOPS" truncate "$MNT" 5000
	[ "$output" = "ok 0" ]
	[ "$(stat -c %s "$IMG")" = 5000 ]
	kill -TERM $pid
	wait $pid
	not_mounted "$MNT"
	! grep -q "\] \(READ\|WRITE\) " "$LOG"
}

@test "passthrough: read-only export refuses writes" {
	require_root
	random_file "$IMG" 64K
	start_export --passthrough "$IMG" "$MNT" || skip "passthrough unavailable: $(tail -1 "$LOG")"
	cmp "$IMG" "$MNT"
	run "$FSOPS" open-rw "$MNT"
	[ "$output" = "err EROFS" ]
	stop_export
}

@test "passthrough: combinations it cannot honour are refused" {
	random_file "$IMG" 64K
	run "$UEXPORTD" --passthrough -w "$IMG" "$MNT"
	[ "$status" -ne 0 ]; [[ "$output" == *"--passthrough cannot cut writes short at EOF"* ]]
	run "$UEXPORTD" --passthrough --direct "$IMG" "$MNT"
	[ "$status" -ne 0 ]; [[ "$output" == *"--passthrough and --direct exclude each other"* ]]
	run "$UEXPORTD" -f --passthrough null:1M "$MNT"
	[ "$status" -ne 0 ]; [[ "$output" == *"--passthrough needs a regular-file image"* ]]
	not_mounted "$MNT"
}
