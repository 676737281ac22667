#!/usr/bin/env bats
# The fault matrix: a backing store that fails reads, writes, a bad range,
# fsync, or everything, under a regular-file image (tests/faultfs, a FUSE
# file failing what its control file says) and under a block-device image
# (a loop device over a sparse file on a full tmpfs, whose write-back fails
# for real; or a loop device over faultfs, whose reads fail), each buffered
# and with --direct.  For each: the client gets the error for exactly the
# failed requests, everything else reads back byte-exact, the daemon stays
# up and mounted, logs each failed image I/O once (rate-limited), and stops
# with exit status 3 exactly when acknowledged writes may have been lost.
#
# Offsets are bytes.  $W/expect holds what the export must read back: the
# initial content, with every acknowledged write (fsops writes 0xab)
# patched in.

load helpers

FAULTFS=$TOP/tests/faultfs
K=1024
M=$((1024 * 1024))

teardown_hook() {
	[ -n "${CA:-}" ] && exec {CA}>&-
	[ -n "${CB:-}" ] && exec {CB}>&-
	[ -n "${CC:-}" ] && exec {CC}>&-
	# A loop device over faultfs's file holds it: detach first, once (the
	# number may be another test's device by the time helpers' teardown
	# would detach it again).
	[ -n "${LOOP:-}" ] && losetup -d "$LOOP" 2>/dev/null
	LOOP=
	if [ -n "${FPID:-}" ]; then
		kill -TERM "$FPID" 2>/dev/null
		wait_until 5 exited "$FPID" || kill -9 "$FPID" 2>/dev/null
	fi
	true
}

# start_faultfs SIZE: faultfs serving $W/backing (SIZE random bytes, also
# in $W/expect) as FIMG, faults from $W/faults (none yet).
start_faultfs() {
	require_root
	[ -x "$FAULTFS" ] || { echo "build it first: make tests/faultfs" >&2; return 1; }
	random_file "$W/backing" "$1"
	cp "$W/backing" "$W/expect"
	FIMG=$W/img.file FLOG=$W/faultfs.log CTL=$W/faults
	touch "$FIMG"
	"$FAULTFS" "$W/backing" "$FIMG" "$CTL" 2>"$FLOG" >/dev/null 3>&- &
	FPID=$!
	wait_until 5 is_mounted "$FIMG" || { cat "$FLOG" >&2; return 1; }
	cmp "$W/backing" "$FIMG"
}

# stop_faultfs: unmount FIMG (an io_uring ring may still hold the image
# for a moment after the daemon's exit), faultfs then exits 0.
stop_faultfs() {
	wait_until 5 umount "$FIMG" 2>/dev/null || { echo "cannot unmount $FIMG" >&2; return 1; }
	wait_until 5 exited "$FPID"
	wait "$FPID"
}

# set_faults RULE...: replace faultfs's rules (none: clear); its next
# request sees them.
set_faults() {
	printf '%s\n' "$@" > "$CTL.new"
	mv -f "$CTL.new" "$CTL"
}

# full_loop: LOOP over $W/t/backing, 16 MiB sparse on an 8 MiB tmpfs that
# is full.  Its first 2 MiB hold random data (in $W/expect too) and take
# writes; anything written past them fails in the loop device when it
# reaches the tmpfs (ENOSPC): buffered write-back records EIO on the
# device, an O_DIRECT write returns ENOSPC.
full_loop() {
	require_root
	require_cmd losetup
	mkdir "$W/t"
	mount -t tmpfs -o size=8M tmpfs "$W/t"
	truncate -s 16M "$W/t/backing"
	random_file "$W/head" 2M
	dd if="$W/head" of="$W/t/backing" conv=notrunc status=none
	cp "$W/t/backing" "$W/expect"
	dd if=/dev/zero of="$W/t/fill" bs=64K status=none 2>/dev/null || true
	[ "$(stat -f -c %a "$W/t")" = 0 ] || { echo "tmpfs not full" >&2; df "$W/t" >&2; return 1; }
	LOOP=$(losetup --find --show "$W/t/backing" 2>/dev/null) || skip "no loop devices"
}

# expect_ab OFF LEN: an acknowledged write of 0xab over [OFF, OFF + LEN).
expect_ab() {
	fill_ab "$2" | dd of="$W/expect" bs=64K seek="$1" oflag=seek_bytes conv=notrunc status=none
}

# same_range OFF LEN: the export reads back $W/expect over [OFF, OFF + LEN).
same_range() {
	cmp <(dd if="$MNT" bs=64K skip="$1" count="$2" iflag=skip_bytes,count_bytes status=none) \
	    <(dd if="$W/expect" bs=64K skip="$1" count="$2" iflag=skip_bytes,count_bytes status=none)
}

# serving: the daemon is alive, the export mounted and answering.
serving() {
	! exited "$DPID" || { echo "the daemon died:" >&2; cat "$LOG" >&2; return 1; }
	is_mounted "$MNT" || { echo "$MNT is no longer mounted" >&2; return 1; }
	[ "$(stat -c %s "$MNT")" -gt 0 ]
}

# fsops_is EXPECTED ARGS...: run fsops, which must print EXPECTED.
fsops_is() {
	local want=$1 out
	shift
	out=$("$FSOPS" "$@") || true
	[ "$out" = "$want" ] || { echo "${CTX:-}fsops $*: '$out', expected '$want'" >&2; return 1; }
}

# io_errors_logged IMAGE LINE...: the daemon's log (read once it has
# exited) holds exactly these image I/O error lines, each once, and no
# other: "uexportd: IMAGE: " then LINE, e.g. "read of 4096 bytes at 0:
# Input/output error" or "fsync: Input/output error".
io_errors_logged() {
	local img=$1
	shift
	diff <(grep -F "uexportd: $img: " "$LOG" |
		grep -E ": ((read|write) of [0-9]+ bytes at [0-9]+|fsync): |: [0-9]+ more I/O errors not logged$" |
		sort) \
	     <(for l in "$@"; do printf 'uexportd: %s: %s\n' "$img" "$l"; done | sort) || {
		echo "^ image I/O error lines: < logged, > expected; the whole log:" >&2
		cat "$LOG" >&2
		return 1
	}
}

EIO="Input/output error"
ENOSPC="No space left on device"

# ---- regular-file image over faultfs -------------------------------------

@test "regular-file image: reads of a bad range get EIO, exactly those; the rest reads back byte-exact" {
	for direct in "" --direct; do
		start_faultfs 4M
		start_fg -w $direct "$FIMG" "$MNT"
		set_faults "read-eio $M $((64 * K))"
		fsops_is "err EIO" pread "$MNT" $M 4096
		fsops_is "err EIO" pread "$MNT" $((M + 60 * K)) 4096
		fsops_is "err EIO" pread "$MNT" $((M - 2048)) 4096	# straddles: unaligned
		fsops_is "err EIO" pread "$MNT" $((768 * K)) $((512 * K))	# offloaded over io_uring
		fsops_is "ok 4096" pread "$MNT" $((M - 4096)) 4096
		fsops_is "ok 4096" pread "$MNT" $((M + 64 * K)) 4096
		same_range 0 $M
		same_range $((M + 64 * K)) $((3 * M - 64 * K))
		serving
		# The disk recovers: nothing failed is remembered.
		set_faults
		cmp "$W/expect" "$MNT"
		stop_fg 0
		io_errors_logged "$FIMG" "read of 4096 bytes at $M: $EIO" \
			"read of 4096 bytes at $((M + 60 * K)): $EIO" \
			"read of 4096 bytes at $((M - 2048)): $EIO" \
			"read of $((512 * K)) bytes at $((768 * K)): $EIO"
		stop_faultfs
	done
}

@test "regular-file image: writes to a bad range get EIO or ENOSPC, exactly those; the others land" {
	for direct in "" --direct; do
		start_faultfs 4M
		start_fg -w $direct "$FIMG" "$MNT"
		set_faults "write-eio $((2 * M)) $((64 * K))" "write-enospc $((3 * M)) 4096"
		fsops_is "err EIO" pwrite "$MNT" $((2 * M)) 4096
		fsops_is "err EIO" pwrite "$MNT" $((2 * M + 60 * K)) 4096
		fsops_is "err EIO" pwrite "$MNT" $((2 * M - 100)) 200	# straddles: unaligned
		fsops_is "err EIO" pwrite "$MNT" $((1536 * K)) $M	# offloaded over io_uring
		fsops_is "err ENOSPC" pwrite "$MNT" $((3 * M)) 4096
		fsops_is "err ENOSPC" pwrite "$MNT" $((3 * M + 4090)) 10
		for off in $((2 * M - 4096)) $((2 * M + 64 * K)) $((3 * M - 4096)) $((3 * M + 4096)); do
			fsops_is "ok 4096" pwrite "$MNT" $off 4096
			expect_ab $off 4096
		done
		fsops_is "ok 0" fsync "$MNT"
		# A failed write left nothing behind, on the export or the disk.
		cmp "$W/expect" "$MNT"
		cmp "$W/expect" "$W/backing"
		serving
		set_faults
		stop_fg 0
		io_errors_logged "$FIMG" "write of 4096 bytes at $((2 * M)): $EIO" \
			"write of 4096 bytes at $((2 * M + 60 * K)): $EIO" \
			"write of 200 bytes at $((2 * M - 100)): $EIO" \
			"write of $M bytes at $((1536 * K)): $EIO" \
			"write of 4096 bytes at $((3 * M)): $ENOSPC" \
			"write of 10 bytes at $((3 * M + 4090)): $ENOSPC"
		stop_faultfs
	done
}

@test "regular-file image: a failing fsync is EIO to the client, data stays served, the stop exits 3" {
	for direct in "" --direct; do
		start_faultfs 4M
		start_fg -w $direct "$FIMG" "$MNT"
		set_faults fsync-eio
		fsops_is "ok 4096" pwrite "$MNT" 8192 4096
		expect_ab 8192 4096
		fsops_is "err EIO" fsync "$MNT"
		cmp "$W/expect" "$MNT"
		serving
		set_faults
		fsops_is "ok 4096" pwrite "$MNT" 16384 4096
		expect_ab 16384 4096
		fsops_is "ok 0" fsync "$MNT"
		cmp "$W/expect" "$W/backing"
		# The image's fsync failed once: acknowledged writes may be lost.
		stop_fg 3
		io_errors_logged "$FIMG" "fsync: $EIO"
		stop_faultfs
	done
}

@test "regular-file image: a disk failing everything: EIO for each request, the daemon stays up and serves again" {
	for direct in "" --direct; do
		start_faultfs 4M
		start_fg -w $direct "$FIMG" "$MNT"
		set_faults all-eio
		fsops_is "err EIO" pread "$MNT" 0 4096
		fsops_is "err EIO" pwrite "$MNT" 4096 4096
		fsops_is "err EIO" fsync "$MNT"
		run dd if="$MNT" of=/dev/null bs=64K status=none
		[ "$status" -ne 0 ]; [[ "$output" == *"$EIO"* ]]
		# Metadata is not image I/O: still answered.
		[ "$(stat -c %s "$MNT")" = $((4 * M)) ]
		serving
		set_faults
		cmp "$W/expect" "$MNT"
		fsops_is "ok 4096" pwrite "$MNT" 4096 4096
		expect_ab 4096 4096
		fsops_is "ok 0" fsync "$MNT"
		cmp "$W/expect" "$W/backing"
		stop_fg 3
		io_errors_logged "$FIMG" "read of 4096 bytes at 0: $EIO" \
			"write of 4096 bytes at 4096: $EIO" "fsync: $EIO" \
			"read of $((64 * K)) bytes at 0: $EIO"
		stop_faultfs
	done
}

# rate_trigger: until the "N more I/O errors not logged" line is out, one
# more failed read every 300 ms (slower than the limit), in case the
# count is only written when the next error is.
rate_trigger() {
	grep -qE "^uexportd: $FIMG: [0-9]+ more I/O errors not logged$" "$LOG" && return 0
	local now
	now=$(date +%s%N)
	if (( now - LAST >= 300000000 )); then
		fsops_is "err EIO" pread "$MNT" $((2 * M + TRIGGERS * 4096)) 4096
		TRIGGERS=$((TRIGGERS + 1)) LAST=$now
	fi
	return 1
}

@test "image I/O errors: logged once each, at most 10 a second, the rest counted in one line" {
	require_cmd xfs_io
	start_faultfs 4M
	start_fg "$FIMG" "$MNT"
	set_faults "read-eio 0 $((4 * M))"
	# One process, 100 reads of 4 KiB, each failing: a burst.
	args=()
	for i in $(seq 0 99); do args+=(-c "pread -q $((i * 4096)) 4096"); done
	t0=$(date +%s%N)
	run xfs_io -r "${args[@]}" "$MNT"
	t1=$(date +%s%N)
	[ "$status" -ne 0 ]
	[ "$(grep -c "^pread: $EIO\$" <<<"$output")" = 100 ]
	serving
	TRIGGERS=0 LAST=0
	wait_until 10 rate_trigger || { echo "no 'more I/O errors not logged' line:" >&2; cat "$LOG" >&2; false; }
	set_faults
	stop_fg 0
	# Each client read was one failed image read.
	total=$(grep -c '^faultfs: READ ' "$FLOG")
	[ "$total" = $((100 + TRIGGERS)) ]
	lines=$(grep -E "^uexportd: $FIMG: read of 4096 bytes at [0-9]+: $EIO\$" "$LOG")
	[ -z "$(sort <<<"$lines" | uniq -d)" ]
	burst=$(awk '$8 + 0 < 409600' <<<"$lines" | wc -l)
	limit=$(( 10 * ((t1 - t0 + 999999999) / 1000000000 + 1) ))
	echo "burst of 100 in $(( (t1 - t0) / 1000000 )) ms: $burst logged, limit $limit"
	[ "$burst" -ge 1 ]
	[ "$burst" -le "$limit" ]
	# Every failed I/O is either logged or counted.
	more=$(grep -oE "^uexportd: $FIMG: [0-9]+ more I/O errors not logged\$" "$LOG" |
		awk '{ n += $3 } END { print n + 0 }')
	[ $(( $(wc -l <<<"$lines") + more )) = "$total" ]
}

# ---- growable image on a full tmpfs --------------------------------------

@test "growable image on a full tmpfs: writes past the space get ENOSPC or a short count, earlier data intact" {
	require_root
	for direct in "" --direct; do
		mkdir -p "$W/small"
		mount -t tmpfs -o size=1M tmpfs "$W/small"
		IMG=$W/small/img
		size=$((64 * K - 1000))
		random_file "$IMG" $size
		cp "$IMG" "$W/expect"
		dd if=/dev/zero of="$W/small/fill" bs=4096 status=none 2>/dev/null || true
		[ "$(stat -f -c %a "$W/small")" = 0 ]
		start_fg -w -g $direct "$IMG" "$MNT"
		# The last page has room for 1000 bytes; nothing past it.
		fsops_is "ok 1000" pwrite "$MNT" $size 8192
		expect_ab $size 1000
		[ "$(stat -c %s "$MNT")" = $((64 * K)) ]
		fsops_is "err ENOSPC" pwrite "$MNT" $((64 * K)) 4096
		fsops_is "err ENOSPC" pwrite "$MNT" $M 4096
		[ "$(stat -c %s "$MNT")" = $((64 * K)) ]
		fsops_is "ok 4096" pwrite "$MNT" 4096 4096	# allocated: lands
		expect_ab 4096 4096
		fsops_is "ok 0" fsync "$MNT"
		cmp "$W/expect" "$MNT"
		serving
		# Space again: the image grows.
		truncate -s 512K "$W/small/fill"
		fsops_is "ok 4096" pwrite "$MNT" $((64 * K)) 4096
		expect_ab $((64 * K)) 4096
		cmp "$W/expect" "$MNT"
		stop_fg 0
		cmp "$W/expect" "$IMG"
		io_errors_logged "$IMG" "write of 4096 bytes at $((64 * K)): $ENOSPC" \
			"write of 4096 bytes at $M: $ENOSPC"
		wait_until 5 umount "$W/small" 2>/dev/null
	done
}

# ---- block-device images -------------------------------------------------

@test "block device, buffered: write-back failing past the space is EIO from fsync; other ranges keep working" {
	full_loop
	start_fg -w "$LOOP" "$MNT"
	fsops_is "ok 4096" pwrite "$MNT" $M 4096
	expect_ab $M 4096
	fsops_is "ok 0" fsync "$MNT"
	# Acknowledged into the device's page cache; its write-back fails.
	fsops_is "ok 4096" pwrite "$MNT" $((8 * M)) 4096
	fsops_is "err EIO" fsync "$MNT"
	# Reported once: nothing new failed since.
	fsops_is "ok 4096" pwrite "$MNT" $((M + 4096)) 4096
	expect_ab $((M + 4096)) 4096
	fsops_is "ok 0" fsync "$MNT"
	same_range 0 $((2 * M))
	same_range $((4 * M)) $M
	serving
	stop_fg 3
	cmp <(head -c 2M "$W/expect") <(head -c 2M "$W/t/backing")
	io_errors_logged "$LOOP" "fsync: $EIO"
}

@test "block device --direct: a write past the space is ENOSPC at once and leaves nothing; unaligned ones fail in fsync" {
	full_loop
	start_fg -w --direct "$LOOP" "$MNT"
	fsops_is "err ENOSPC" pwrite "$MNT" $((8 * M)) 4096
	fsops_is "err ENOSPC" pwrite "$MNT" $((9 * M)) $((64 * K))
	fsops_is "ok 4096" pread "$MNT" $((8 * M)) 4096
	same_range $((8 * M)) $((2 * M))
	fsops_is "ok 4096" pwrite "$MNT" $M 4096
	expect_ab $M 4096
	fsops_is "ok 0" fsync "$MNT"
	# Unaligned: the buffered descriptor, acknowledged, then write-back fails.
	fsops_is "ok 100" pwrite "$MNT" $((10 * M + 10)) 100
	fsops_is "err EIO" fsync "$MNT"
	fsops_is "ok 0" fsync "$MNT"
	same_range 0 $((2 * M))
	serving
	stop_fg 3
	cmp <(head -c 2M "$W/expect") <(head -c 2M "$W/t/backing")
	io_errors_logged "$LOOP" "write of 4096 bytes at $((8 * M)): $ENOSPC" \
		"write of $((64 * K)) bytes at $((9 * M)): $ENOSPC" "fsync: $EIO"
}

@test "block device over a failing disk (loop over faultfs): only reads touching the bad range fail" {
	require_cmd losetup
	for direct in "" --direct; do
		start_faultfs 4M
		LOOP=$(losetup --find --show "$FIMG" 2>/dev/null) || skip "no loop devices"
		start_fg -w $direct "$LOOP" "$MNT"
		set_faults "read-eio $M $((64 * K))"
		fsops_is "err EIO" pread "$MNT" $M 4096
		fsops_is "err EIO" pread "$MNT" $((M + 60 * K)) 4096
		fsops_is "err EIO" pread "$MNT" $((M + 32 * K)) $((512 * K))	# starts in it
		fsops_is "ok 4096" pread "$MNT" $((M - 4096)) 4096
		fsops_is "ok 4096" pread "$MNT" $((M + 64 * K)) 4096
		# Reaching into it: what the device gives, the bytes before the
		# bad sector (buffered: the page cache stops there; --direct:
		# unaligned, the buffered descriptor too).
		fsops_is "ok 2048" pread "$MNT" $((M - 2048)) 4096
		same_range 0 $M
		same_range $((M + 64 * K)) $((3 * M - 64 * K))
		serving
		set_faults
		cmp "$W/expect" "$MNT"
		stop_fg 0
		io_errors_logged "$LOOP" "read of 4096 bytes at $M: $EIO" \
			"read of 4096 bytes at $((M + 60 * K)): $EIO" \
			"read of $((512 * K)) bytes at $((M + 32 * K)): $EIO"
		losetup -d "$LOOP"
		LOOP=
		stop_faultfs
	done
}

# ---- write-back errors reach every open file (issue 11, item 3) ----------

@test "a write-back error reaches every open file: all clients' fsync get EIO, a later open gets 0" {
	full_loop
	start_fg -w "$LOOP" "$MNT"
	exec {CA}<>"$MNT" {CB}<>"$MNT" {CC}<"$MNT"
	fsops_is "ok 4096" fd-pwrite $CA $((8 * M)) 4096	# its write-back fails
	fsops_is "ok 4096" fd-pwrite $CB $M 4096		# lands
	expect_ab $M 4096
	fsops_is "err EIO" fd-fsync $CA
	fsops_is "err EIO" fd-fsync $CB
	fsops_is "err EIO" fd-fsync $CC
	# Each open file hears of it once; an open after it hears nothing.
	fsops_is "ok 0" fd-fsync $CA
	fsops_is "ok 0" fd-fsync $CB
	fsops_is "ok 0" fsync "$MNT"
	exec {CA}>&- {CB}>&- {CC}>&-
	CA= CB= CC=
	same_range 0 $((2 * M))
	serving
	stop_fg 3
	cmp <(head -c 2M "$W/expect") <(head -c 2M "$W/t/backing")
}

# ---- exit status 3: acknowledged writes may be lost (issue 11, item 4) ---

@test "exit status 3 when the final flush fails; 0 when everything was written" {
	full_loop
	start_fg -w "$LOOP" "$MNT"
	fsops_is "ok 4096" pwrite "$MNT" $M 4096
	expect_ab $M 4096
	stop_fg 0
	cmp <(head -c 2M "$W/expect") <(head -c 2M "$W/t/backing")
	# Acknowledged, never fsynced by the client, lost in the stop's flush.
	start_fg -w "$LOOP" "$MNT"
	fsops_is "ok 4096" pwrite "$MNT" $((8 * M)) 4096
	stop_fg 3
	grep -qE "^uexportd: .*flush.*: $EIO\$" "$LOG" || {
		echo "no log line saying the flush failed:" >&2; cat "$LOG" >&2; false; }
}

# ---- long: random faults against a model ---------------------------------

# rand30: a random number below 2^30 ($RANDOM has 15 bits).
rand30() { echo $(( RANDOM << 15 | RANDOM )); }

@test "long: random faults and I/O checked against a model, buffered and --direct" {
	[ -n "${LONG:-}" ] || skip "long: make check-long"
	seed=${FAULTS_SEED:-$$}
	echo "seed $seed (FAULTS_SEED=$seed repeats this run)"
	RANDOM=$seed
	for direct in "" --direct; do
		start_faultfs 4M
		start_fg -w $direct "$FIMG" "$MNT"
		fsync_failed=0
		for step in $(seq 600); do
			# One fault, or none: a range of up to 128 KiB, or fsync.
			fo=$(( $(rand30) % (4 * M) )) fl=$(( RANDOM % (128 * K) + 1 ))
			kinds=(read-eio write-eio write-enospc fsync-eio none)
			kind=${kinds[RANDOM % 5]}
			case $kind in
			none) set_faults ;;
			fsync-eio) set_faults fsync-eio ;;
			*) set_faults "$kind $fo $fl" ;;
			esac
			# One request of up to 64 KiB (one FUSE request all the way
			# down), half of them 4 KiB-aligned (--direct's O_DIRECT path).
			off=$(( $(rand30) % (4 * M) )) len=$(( RANDOM % (64 * K) + 1 ))
			if (( RANDOM % 2 )); then
				off=$(( off / 4096 * 4096 )) len=$(( (len + 4095) / 4096 * 4096 ))
			fi
			(( off + len <= 4 * M )) || len=$(( 4 * M - off ))
			hit=$(( off < fo + fl && fo < off + len ))
			CTX="step $step, fault $kind $fo $fl: "
			case $(( RANDOM % 3 )) in
			0)	want="ok $len"
				[ "$kind" = read-eio ] && (( hit )) && want="err EIO"
				fsops_is "$want" pread "$MNT" $off $len ;;
			1)	want="ok $len"
				[ "$kind" = write-eio ] && (( hit )) && want="err EIO"
				[ "$kind" = write-enospc ] && (( hit )) && want="err ENOSPC"
				fsops_is "$want" pwrite "$MNT" $off $len
				[ "$want" != "ok $len" ] || expect_ab $off $len ;;
			2)	want="ok 0"
				[ "$kind" = fsync-eio ] && want="err EIO" fsync_failed=1
				fsops_is "$want" fsync "$MNT" ;;
			esac
			if (( step % 100 == 0 )); then
				set_faults
				cmp "$W/expect" "$MNT"
				serving
			fi
		done
		set_faults
		fsops_is "ok 0" fsync "$MNT"
		cmp "$W/expect" "$MNT"
		cmp "$W/expect" "$W/backing"
		stop_fg $(( fsync_failed ? 3 : 0 ))
		stop_faultfs
	done
}
