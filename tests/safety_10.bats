#!/usr/bin/env bats
# Data safety: synchronous writes are durable before they return, a
# fixed-size export never changes size, a clean stop keeps what a mapping
# stored, and the daemon's own descriptors and pidfile never hit the image.

load helpers

# phys_offset FILE OFF: where byte OFF of FILE lies on its file system's
# device (filefrag, 4 KiB blocks).
phys_offset() {
	filefrag -v -b4096 "$1" | awk -v blk=$(($2 / 4096)) -v rem=$(($2 % 4096)) '
		$1 ~ /^[0-9]+:$/ {
			ls = $2 + 0; le = $3 + 0; ps = $4 + 0
			if (blk >= ls && blk <= le) { print (ps + blk - ls) * 4096 + rem; exit }
		}'
}

# sync_writes_reach DEVFILE MAP: every synchronous-write intent, small and
# large (an offloaded copy over io_uring), aligned and not, lands on
# DEVFILE before pwrite returns.  MAP=phys looks the offset up with
# filefrag (a regular-file image), MAP=same uses it as is (a device).
sync_writes_reach() {
	local dev=$1 map=$2 k=0 mode len off where
	for mode in o-dsync o-sync rwf-dsync rwf-sync; do
		for len in 4096 1048576 100; do
			off=$((k * 1048576 + (len == 100 ? 1000 : 0))); k=$((k + 1))
			run "$FSOPS" pwrite "$MNT" "$off" "$len" "$mode"
			[ "$output" = "ok $len" ]
			for where in "$off" $((off + len - 100)); do
				[ "$map" = phys ] && where=$(phys_offset "$IMG" "$where")
				is_ab "$dev" "$where" 100 ||
					{ echo "$mode write of $len at $off is not on $dev"; return 1; }
			done
		done
	done
}

@test "O_DSYNC, O_SYNC, RWF_DSYNC, RWF_SYNC writes reach the device below a block-device image" {
	attach_loop 16M
	start_export -w "$LOOP" "$MNT"
	sync_writes_reach "$W/backing" same
	stop_export
}

@test "synchronous writes with --direct reach the device (aligned and unaligned)" {
	attach_loop 16M
	start_export -w --direct "$LOOP" "$MNT"
	sync_writes_reach "$W/backing" same
	stop_export
}

# ext4_image: IMG, 16 MiB of random data on a fresh ext4 (4 KiB blocks)
# on a loop device over $W/fs, written out, so its blocks have fixed places.
ext4_image() {
	require_root
	require_cmd mkfs.ext4
	require_cmd filefrag
	truncate -s 64M "$W/fs"
	mkfs.ext4 -q -F -b 4096 "$W/fs"
	mkdir "$W/m"
	mount -o loop "$W/fs" "$W/m" || skip "cannot loop-mount an ext4 image"
	IMG=$W/m/disk.raw
	random_file "$IMG" 16M
	sync -f "$IMG"
}

@test "synchronous writes reach the disk below a regular-file image" {
	ext4_image
	start_export -w "$IMG" "$MNT"
	sync_writes_reach "$W/fs" phys
	stop_export
}

@test "passthrough: synchronous writes reach the disk below the image" {
	ext4_image
	"$UEXPORTD" $(transport_opt) -v -p "$PIDFILE" -w -g --passthrough "$IMG" "$MNT" 2>"$LOG" ||
		skip "$(tail -1 "$LOG")"
	DPID=$(cat "$PIDFILE")
	sync_writes_reach "$W/fs" phys
	stop_export
}

@test "fixed-size export: cp, dd, O_TRUNC and truncate replace the content, never the size" {
	require_root
	random_file "$IMG" 4M
	start_export -w "$IMG" "$MNT"
	random_file "$W/new" 4M
	cp "$W/new" "$MNT"
	cmp "$W/new" "$MNT"
	# A sparse source: cp seeks over its holes, which must read back zero.
	truncate -s 4M "$W/sparse"
	random_file "$W/chunk" 5000
	dd if="$W/chunk" of="$W/sparse" bs=5000 seek=500 conv=notrunc status=none
	cp "$W/sparse" "$MNT"
	cmp "$W/sparse" "$MNT"
	# A smaller source ending in a hole: its bytes, then zeros, same size.
	truncate -s 3M "$W/small"
	dd if="$W/chunk" of="$W/small" conv=notrunc status=none
	cp "$W/small" "$MNT"
	[ "$(stat -c %s "$MNT")" = $((4 * 1024 * 1024)) ]
	cmp <(cat "$W/small"; head -c 1M /dev/zero) "$MNT"
	dd if="$W/new" of="$MNT" bs=64K status=none
	cmp "$W/new" "$MNT"
	echo hello > "$MNT"
	cmp <(echo hello; head -c $((4 * 1024 * 1024 - 6)) /dev/zero) "$MNT"
	# No route changes the size.
	run "$FSOPS" truncate "$MNT" $((8 * 1024 * 1024))
	[ "$output" = "err EFBIG" ]
	run "$FSOPS" fallocate "$MNT" 0 0 $((8 * 1024 * 1024))
	[ "$output" = "err ENOSPC" ]
	run "$FSOPS" pwrite "$MNT" $((4 * 1024 * 1024)) 1
	[ "$output" = "err ENOSPC" ]
	cp "$W/new" "$MNT"
	truncate -s 0 "$MNT"
	[ "$(stat -c %s "$MNT")" = $((4 * 1024 * 1024)) ]
	cmp <(head -c 4M /dev/zero) "$MNT"
	cp "$W/new" "$MNT"
	stop_export
	cmp "$W/new" "$IMG"
}

@test "fixed-size export: qemu-img convert onto it, same size and larger" {
	require_root
	require_cmd qemu-img
	random_file "$IMG" 4M
	start_export -w "$IMG" "$MNT"
	random_file "$W/new" 4M
	qemu-img convert -O raw "$W/new" "$MNT"
	cmp "$W/new" "$MNT"
	# Mostly zeros: qemu-img writes only the data, trusting the target's
	# zeros after its truncate.
	truncate -s 3M "$W/small"
	random_file "$W/chunk" 5000
	dd if="$W/chunk" of="$W/small" bs=5000 seek=100 conv=notrunc status=none
	qemu-img convert -O raw "$W/small" "$MNT"
	[ "$(stat -c %s "$MNT")" = $((4 * 1024 * 1024)) ]
	cmp <(cat "$W/small"; head -c 1M /dev/zero) "$MNT"
	stop_export
	cmp <(cat "$W/small"; head -c 1M /dev/zero) "$IMG"
}

@test "block-device image: cp and O_TRUNC keep the device's size and zero what they skip" {
	attach_loop 4M
	start_export -w "$LOOP" "$MNT"
	truncate -s 4M "$W/sparse"
	random_file "$W/chunk" 5000
	dd if="$W/chunk" of="$W/sparse" bs=1 seek=1001 conv=notrunc status=none
	cp "$W/sparse" "$MNT"
	cmp "$W/sparse" "$MNT"
	echo hello > "$MNT"
	[ "$(stat -c %s "$MNT")" = $((4 * 1024 * 1024)) ]
	cmp <(echo hello; head -c $((4 * 1024 * 1024 - 6)) /dev/zero) "$MNT"
	stop_export
	cmp <(echo hello; head -c $((4 * 1024 * 1024 - 6)) /dev/zero) "$LOOP"
}

@test "--growable on a block device is refused with the reason" {
	attach_loop 4M
	run "$UEXPORTD" $(transport_opt) -w -g "$LOOP" "$MNT"
	[ "$status" -ne 0 ]
	[[ "$output" == "uexportd: --growable: $LOOP is a block device, whose size is fixed" ]]
	not_mounted "$MNT"
}

# stop_with_mapping SIGNAL: a client stores through a shared mapping and
# keeps it; the daemon, stopped by SIGNAL, must write it to the image.
stop_with_mapping() {
	random_file "$IMG" 1M
	start_export -w "$IMG" "$MNT"
	"$FSOPS" mmap-store "$MNT" 5000 "stored-by-$1" > "$W/client.out" 3>&- &
	local client=$!
	wait_until 10 grep -q stored "$W/client.out"
	kill "-$1" "$DPID"
	wait_until 20 pid_gone "$DPID"
	kill "$client" 2>/dev/null || true
	wait_until 5 not_mounted "$MNT"
	[ "$(dd if="$IMG" bs=1 skip=5000 count=$((10 + ${#1})) status=none)" = "stored-by-$1" ]
}

@test "a clean stop writes back what a client stored through a shared mapping" {
	require_root
	stop_with_mapping TERM
	stop_with_mapping HUP
}

@test "started with stdin, stdout and stderr closed: returns once live, keeps its image" {
	require_root
	random_file "$IMG" 1M
	rc=0
	timeout -k 5 20 "$UEXPORTD" $(transport_opt) -w -p "$PIDFILE" "$IMG" "$MNT" 0<&- 1>&- 2>&- 3>&- ||
		rc=$?
	[ "$rc" = 0 ]
	DPID=$(cat "$PIDFILE")
	is_mounted "$MNT"
	run "$FSOPS" pwrite "$MNT" 4096 4096
	[ "$output" = "ok 4096" ]
	run "$FSOPS" fsync "$MNT"
	[ "$output" = "ok 0" ]
	is_ab "$IMG" 4096 4096
	stop_export
}

@test "pidfile /dev/fd/3 is the caller's descriptor, never the image" {
	require_root
	random_file "$IMG" 64K
	cp "$IMG" "$W/ref"
	"$UEXPORTD" $(transport_opt) -p /dev/fd/3 "$IMG" "$MNT" 3>"$W/pid.out"
	DPID=$(cat "$W/pid.out")
	kill -0 "$DPID"
	is_mounted "$MNT"
	cmp "$IMG" "$MNT"
	kill -TERM "$DPID"
	wait_until 20 pid_gone "$DPID"
	[ -e "$W/pid.out" ]
	# The caller's fd 3 is the image: refused before anything is written.
	run "$UEXPORTD" $(transport_opt) -p /dev/fd/3 "$IMG" "$MNT" 3<>"$IMG"
	[ "$status" -ne 0 ]
	[[ "$output" == *"pidfile /dev/fd/3: holds something other than a PID"* ]]
	# A pipe gets the PID and then EOF: pid=$(...) does not wait for the daemon.
	pid=$(timeout -k 1 20 "$UEXPORTD" $(transport_opt) -p /dev/stdout "$IMG" "$MNT")
	[ -n "$pid" ]; kill -0 "$pid"
	kill -TERM "$pid"
	wait_until 20 pid_gone "$pid"
	# No fd 3 at all; a dangling symbolic link (not followed, no spinning).
	run "$UEXPORTD" $(transport_opt) -p /dev/fd/3 "$IMG" "$MNT" 3>&-
	[ "$status" -ne 0 ]
	[[ "$output" == *"pidfile /dev/fd/3: No such file or directory"* ]]
	ln -s "$W/nowhere/pid" "$W/dangling"
	run timeout -k 1 10 "$UEXPORTD" $(transport_opt) -p "$W/dangling" "$IMG" "$MNT"
	[ "$status" = 1 ]
	[[ "$output" == *"pidfile $W/dangling: No such file or directory"* ]]
	[ ! -e "$W/nowhere" ]
	# The pidfile is the image, by any name, or any file holding data (a
	# loop device's backing file, a log): refused, never truncated, and a
	# file the daemon did not create is never removed.
	ln "$IMG" "$W/img.link"
	echo "precious data" > "$W/precious"
	cp "$W/precious" "$W/precious.ref"
	for p in "$IMG" "$W/img.link" "$W/precious"; do
		run "$UEXPORTD" $(transport_opt) -p "$p" "$IMG" "$MNT"
		[ "$status" -ne 0 ]; [[ "$output" == *"pidfile $p: holds something other than a PID; not overwritten"* ]]
		[ -e "$p" ]
	done
	cmp "$W/precious" "$W/precious.ref"
	: > "$W/empty.img"
	run "$UEXPORTD" $(transport_opt) -w -g -p "$W/empty.img" "$W/empty.img" "$MNT"
	[ "$status" -ne 0 ]; [[ "$output" == *"pidfile $W/empty.img: is the image"* ]]
	[ -e "$W/empty.img" ]
	run "$UEXPORTD" $(transport_opt) -p "$MNT" "$IMG" "$MNT"
	[ "$status" -ne 0 ]; [[ "$output" == *"is the mount point"* ]]
	[ -e "$MNT" ]
	not_mounted "$MNT"
	cmp "$IMG" "$W/ref"
	[ ! -s "$MNT" ]
	# A disk, or another live export, is never written either.
	attach_loop 1M
	cp "$W/backing" "$W/backing.ref"
	run "$UEXPORTD" $(transport_opt) -p "$LOOP" "$IMG" "$MNT"
	[ "$status" -ne 0 ]; [[ "$output" == *"pidfile $LOOP: is a block device"* ]]
	run "$UEXPORTD" $(transport_opt) -w -p "$W/backing" "$LOOP" "$MNT"
	[ "$status" -ne 0 ]; [[ "$output" == *"not overwritten"* ]]
	cmp "$W/backing" "$W/backing.ref"
	start_export -w "$IMG" "$MNT"
	touch "$W/other"
	run "$UEXPORTD" $(transport_opt) -p "$MNT" "$IMG" "$W/other"
	[ "$status" -ne 0 ]; [[ "$output" == *"pidfile $MNT: holds something other than a PID"* ]]
	cmp "$IMG" "$W/ref"
	stop_export
}

@test "pidfile: a second daemon is refused, a restart never loses the new pidfile" {
	require_root
	random_file "$IMG" 64K
	start_export "$IMG" "$MNT"
	touch "$W/other"
	run "$UEXPORTD" $(transport_opt) -p "$PIDFILE" "$IMG" "$W/other"
	[ "$status" -ne 0 ]
	[[ "$output" == *"pidfile $PIDFILE: in use by process $DPID"* ]]
	[ "$(cat "$PIDFILE")" = "$DPID" ]
	not_mounted "$W/other"
	for i in $(seq 10); do
		old=$DPID
		# Half the stops by signal, half by an external unmount.
		if [ $((i % 2)) = 0 ]; then kill -TERM "$old"; else umount "$MNT"; fi
		wait_until 20 not_mounted "$MNT"
		start_export "$IMG" "$MNT"
		wait_until 20 pid_gone "$old"
		[ "$(cat "$PIDFILE")" = "$DPID" ] || { echo "round $i: pidfile lost"; false; }
		kill -0 "$DPID"
	done
	stop_export
}

@test "two daemons started together on one mount point: one serves, the other refuses" {
	require_root
	random_file "$W/a.img" 64K
	random_file "$W/b.img" 64K
	for i in $(seq 10); do
		"$UEXPORTD" $(transport_opt) -w -p "$W/a.pid" "$W/a.img" "$MNT" 2>"$W/a.log" & a=$!
		"$UEXPORTD" $(transport_opt) -w -p "$W/b.pid" "$W/b.img" "$MNT" 2>"$W/b.log" & b=$!
		ra=0; rb=0; wait $a || ra=$?; wait $b || rb=$?
		[ $((ra == 0)) -ne $((rb == 0)) ] || { cat "$W/a.log" "$W/b.log"; false; }
		[ "$(grep -c " $MNT fuse" /proc/mounts)" = 1 ]
		if [ "$ra" = 0 ]; then win=a; else win=b; fi
		cmp "$W/$win.img" "$MNT"
		DPID=$(cat "$W/$win.pid"); PIDFILE=$W/$win.pid
		stop_export
	done
}
