#!/usr/bin/env bats
# Data paths: byte-exact read-back, EOF rules, growth, truncate, read-only.

load helpers

# write_at FILE OFFSET LEN SEED: LEN pseudo-random bytes at OFFSET, also
# applied to the reference copy $REF.
write_at() {
	head -c "$3" "$W/rand" > "$W/chunk"
	dd if="$W/chunk" of="$1" bs=1 seek="$2" conv=notrunc status=none oflag=seek_bytes iflag=fullblock bs=64K
	dd if="$W/chunk" of="$REF" seek="$2" conv=notrunc status=none oflag=seek_bytes bs=64K
}

@test "odd offsets and sizes across 4 KiB and 1 MiB boundaries read back exactly" {
	require_root
	random_file "$IMG" 4M
	REF=$W/ref; cp "$IMG" "$REF"
	random_file "$W/rand" 3M
	start_export -w "$IMG" "$MNT"
	write_at "$MNT" 0 1
	write_at "$MNT" 4095 2
	write_at "$MNT" 8191 4099
	write_at "$MNT" 1048575 3
	write_at "$MNT" 1048000 1049000
	write_at "$MNT" 777 131073
	write_at "$MNT" $((4*1024*1024 - 5)) 5
	cmp "$MNT" "$REF"
	# Reads at odd offsets and sizes, through the export.
	cmp <(dd if="$MNT" bs=7777 skip=13 count=300 status=none) <(dd if="$REF" bs=7777 skip=13 count=300 status=none)
	stop_export
	cmp "$IMG" "$REF"
}

@test "large sequential writes and reads (1 MiB requests) round-trip" {
	require_root
	truncate -s 32M "$IMG"
	random_file "$W/src" 32M
	start_export -w "$IMG" "$MNT"
	dd if="$W/src" of="$MNT" bs=4M conv=notrunc status=none
	cmp "$W/src" "$MNT"
	stop_export
	cmp "$W/src" "$IMG"
}

@test "non-growable: write across EOF is short, at EOF is ENOSPC, size fixed" {
	require_root
	random_file "$IMG" 10000
	start_export -w "$IMG" "$MNT"
	run "$FSOPS" pwrite "$MNT" 9990 100
	[ "$output" = "ok 10" ]
	run "$FSOPS" pwrite "$MNT" 10000 1
	[ "$output" = "err ENOSPC" ]
	run "$FSOPS" pwrite "$MNT" 20000 1
	[ "$output" = "err ENOSPC" ]
	run "$FSOPS" truncate "$MNT" 20000
	[ "$output" = "err EFBIG" ]
	run "$FSOPS" fallocate "$MNT" 0 9000 2000
	[ "$output" = "err ENOSPC" ]
	[ "$(stat -c %s "$MNT")" = 10000 ]
	# A smaller size zeroes the tail instead: the size never changes.
	head -c 5000 "$IMG" > "$W/ref"; head -c 5000 /dev/zero >> "$W/ref"
	run "$FSOPS" truncate "$MNT" 5000
	[ "$output" = "ok 0" ]
	[ "$(stat -c %s "$MNT")" = 10000 ]
	cmp "$MNT" "$W/ref"
	stop_export
	cmp "$IMG" "$W/ref"
}

@test "reads at and past EOF are short / empty" {
	require_root
	random_file "$IMG" 10001
	start_export "$IMG" "$MNT"
	[ "$(dd if="$MNT" bs=4096 skip=2 status=none | wc -c)" = $((10001 - 8192)) ]
	[ "$(dd if="$MNT" bs=4096 skip=3 status=none | wc -c)" = 0 ]
	[ "$(dd if="$MNT" bs=1 skip=10000 status=none | wc -c)" = 1 ]
	stop_export
}

@test "growable: writes past EOF grow byte-exactly, truncate grows and shrinks" {
	require_root
	random_file "$IMG" 1000
	REF=$W/ref; cp "$IMG" "$REF"
	random_file "$W/rand" 2M
	start_export -w -g "$IMG" "$MNT"
	write_at "$MNT" 5000 3
	[ "$(stat -c %s "$MNT")" = 5003 ]
	write_at "$MNT" 1048577 1048579
	[ "$(stat -c %s "$MNT")" = $((1048577 + 1048579)) ]
	cmp "$MNT" "$REF"
	truncate -s 12345 "$MNT"; truncate -s 12345 "$REF"
	[ "$(stat -c %s "$MNT")" = 12345 ]
	truncate -s 3000001 "$MNT"; truncate -s 3000001 "$REF"
	cmp "$MNT" "$REF"
	stop_export
	cmp "$IMG" "$REF"
}

@test "open with O_TRUNC empties a growable export" {
	require_root
	random_file "$IMG" 100000
	start_export -w -g "$IMG" "$MNT"
	echo hello > "$MNT"
	[ "$(cat "$MNT")" = hello ]
	[ "$(stat -c %s "$MNT")" = 6 ]
	stop_export
	[ "$(cat "$IMG")" = hello ]
}

@test "read-only export refuses writes with EROFS and keeps the image intact" {
	require_root
	random_file "$IMG" 64K
	cp "$IMG" "$W/ref"
	mtime=$(stat -c %Y "$IMG")
	start_export "$IMG" "$MNT"
	run "$FSOPS" open-rw "$MNT"
	[ "$output" = "err EROFS" ]
	run "$FSOPS" truncate "$MNT" 0
	[ "$output" = "err EROFS" ]
	run touch -d '2021-05-06 07:08:09' "$MNT"
	[ "$status" -ne 0 ]; [[ "$output" == *"Read-only file system"* ]]
	[ "$(stat -c %Y "$IMG")" = "$mtime" ]
	# A read-only mount ("ro" in the table): no metadata change either.
	grep -q " $MNT fuse.uexportd ro," /proc/mounts
	run chmod 0644 "$MNT"
	[ "$status" -ne 0 ]; [[ "$output" == *"Read-only file system"* ]]
	run chmod 0444 "$MNT"
	[ "$status" -ne 0 ]
	[ "$(stat -c %a "$MNT")" = 400 ]
	stop_export
	cmp "$IMG" "$W/ref"
}

@test "stat: mode, owner, size, times, chmod and chown rules" {
	require_root
	random_file "$IMG" 12345
	touch -d '2020-01-02 03:04:05' "$IMG"
	start_export -w "$IMG" "$MNT"
	[ "$(stat -c '%F %a %u %g %s' "$MNT")" = "regular file 600 0 0 12345" ]
	[ "$(stat -c %Y "$MNT")" = "$(stat -c %Y "$IMG")" ]
	chmod 0640 "$MNT"
	[ "$(stat -c %a "$MNT")" = 640 ]
	chown 65534:65534 "$MNT"
	[ "$(stat -c '%u %g' "$MNT")" = "65534 65534" ]
	touch -d '2021-05-06 07:08:09' "$MNT"
	[ "$(stat -c %Y "$MNT")" = "$(date -d '2021-05-06 07:08:09' +%s)" ]
	stop_export
}

@test "--direct: aligned and unaligned I/O both round-trip" {
	require_root
	truncate -s 8M "$IMG"
	REF=$W/ref; cp "$IMG" "$REF"
	random_file "$W/rand" 2M
	start_export -w --direct "$IMG" "$MNT"
	write_at "$MNT" 0 1048576
	write_at "$MNT" 4097 12345
	write_at "$MNT" 2097152 65536
	cmp "$MNT" "$REF"
	stop_export
	cmp "$IMG" "$REF"
}

@test "shared mmap of the export works" {
	require_root
	require_cmd python3
	random_file "$IMG" 64K
	start_export -w "$IMG" "$MNT"
	python3 -c '
import mmap,sys
with open(sys.argv[1], "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)
    m[100:105] = b"hello"
    m.flush()
    m.close()
' "$MNT"
	[ "$(dd if="$IMG" bs=1 skip=100 count=5 status=none)" = hello ]
	stop_export
}
