#!/usr/bin/env bats
# FUSE-over-io_uring specifics: selection and fallback, one ring per queue,
# every CPU's queue serving.

load helpers

PARAM=/sys/module/fuse/parameters/enable_uring

require_uring_run() {
	[ "$UEXPORTD_TRANSPORT" = uring ] || skip "io_uring transport run only"
	require_root
}

# set_enable_uring Y|N: flipped for this test, restored by teardown.
set_enable_uring() {
	[ -w "$PARAM" ] || skip "needs a writable $PARAM (Linux 6.14+, root)"
	URING_PARAM_OLD=${URING_PARAM_OLD:-$(cat "$PARAM")}
	echo "$1" > "$PARAM"
}

# Run by helpers' teardown.
teardown_hook() {
	[ -n "${URING_PARAM_OLD:-}" ] && echo "$URING_PARAM_OLD" > "$PARAM"
	true
}

@test "enable_uring=N: auto falls back to /dev/fuse and says why; on refuses" {
	require_root
	set_enable_uring N
	random_file "$IMG" 64K
	run "$UEXPORTD" --io-uring=on -f "$IMG" "$MNT"
	[ "$status" -ne 0 ]
	[[ "$output" == *"enable_uring"* ]]
	not_mounted "$MNT"
	"$UEXPORTD" --io-uring=auto -v -p "$PIDFILE" "$IMG" "$MNT" 2>"$LOG"
	DPID=$(cat "$PIDFILE")
	grep -q "transport=dev-fuse threads=[0-9]* reason=enable_uring is off" "$LOG"
	cmp "$IMG" "$MNT"
	stop_export
}

@test "enable_uring=Y: the default start-up uses io_uring" {
	require_root
	set_enable_uring Y
	random_file "$IMG" 64K
	"$UEXPORTD" -v -p "$PIDFILE" "$IMG" "$MNT" 2>"$LOG"
	DPID=$(cat "$PIDFILE")
	# Default depth 64 and --max-memory 256M: the depth is lower on hosts
	# with more than 4 possible CPUs (and the payload too past 16).
	queues=$(possible_cpus)
	read -r depth payload < <(expected_memory_plan $(( 256 << 20 )) "$queues" 64)
	grep -q "memory: $queues x $depth buffers of $(( payload >> 10 )) KiB" "$LOG"
	grep -q "transport=uring queues=$queues depth=$depth\$" "$LOG"
	cmp "$IMG" "$MNT"
	stop_export
}

@test "--io-uring=off never uses io_uring" {
	require_root
	random_file "$IMG" 64K
	"$UEXPORTD" --io-uring=off -v -p "$PIDFILE" "$IMG" "$MNT" 2>"$LOG"
	DPID=$(cat "$PIDFILE")
	grep -q "transport=dev-fuse threads=[0-9]* reason=--io-uring=off" "$LOG"
	[ "$(ls -l /proc/$DPID/fd | grep -c 'io_uring')" = 0 ]
	stop_export
}

@test "one ring per possible CPU in the daemon" {
	require_uring_run
	random_file "$IMG" 64K
	start_export "$IMG" "$MNT"
	possible=$(possible_cpus)
	[ "$(ls -l /proc/$DPID/fd | grep -c 'io_uring')" = "$possible" ]
	stop_export
}

@test "clients pinned to each CPU are served through the ring of that CPU" {
	require_uring_run
	require_cmd taskset
	queues=$(possible_cpus)
	# The CPUs this test may run on, by their real ids (not 0..nproc-1:
	# the affinity mask or the online CPUs may have gaps).
	cpus=$(allowed_cpus)
	n=$(wc -l <<<"$cpus")
	size=$(( (n + 8) * 4096 )); (( size > 1 << 20 )) || size=$(( 1 << 20 ))
	random_file "$IMG" "$size"
	"$UEXPORTD" $(transport_opt) -d -w "$IMG" "$MNT" 2>"$LOG" &
	pid=$!
	wait_until 10 is_mounted "$MNT"
	wait_until 5 grep -q "transport=uring" "$LOG"
	i=0
	for cpu in $cpus; do
		# The kernel serves a request on the queue numbered like its
		# caller's CPU; with gaps in the possible list an id may be past
		# the last queue (the kernel then falls back to another queue).
		(( cpu < queues )) || continue
		blk=$(( i + 7 )) off=$(( 4096 * (i + 7) )) i=$(( i + 1 ))
		taskset -c "$cpu" dd if="$IMG" of="$MNT" bs=4096 count=1 skip=$blk seek=$blk conv=notrunc,fsync status=none
		taskset -c "$cpu" dd if="$MNT" of=/dev/null bs=4096 count=1 skip=$blk iflag=direct status=none
		wait_until 5 grep -q "\[q$cpu\] READ unique=[0-9]* off=$off len=4096 -> 0/4096" "$LOG"
		grep -q "\[q$cpu\] WRITE unique=[0-9]* off=$off len=4096 -> 0/8" "$LOG"
	done
	[ "$i" -gt 0 ]
	kill -TERM $pid
	wait $pid
	not_mounted "$MNT"
	[ "$(grep -c '\[dev[0-9]*\] \(READ\|WRITE\)' "$LOG")" = 0 ]
}

@test "deep queues on every CPU with fio verify (queue depth 256 per job)" {
	require_root
	require_cmd fio
	jobs=$(nproc)
	# A 64M region per job (32M written in each): the export cannot grow.
	truncate -s $(( jobs > 4 ? jobs * 64 : 256 ))M "$IMG"
	start_export -w -q 128 "$IMG" "$MNT"
	run fio --name=deep --filename="$MNT" --direct=1 --ioengine=io_uring --iodepth=256 \
		--rw=randwrite --bs=4k --numjobs="$jobs" --size=32M --offset_increment=64M \
		--verify=crc32c --verify_fatal=1 --verify_state_save=0 --group_reporting
	[ "$status" -eq 0 ] || { echo "$output"; false; }
	stop_export
}

@test "--max-memory bounds the ring buffers: depth, then request size shrink" {
	require_uring_run
	random_file "$IMG" 4M
	possible=$(possible_cpus)
	# possible x 16 entries x 512 KiB
	start_export -w --max-memory=$(( possible * 8 ))M "$IMG" "$MNT"
	grep -q "transport=uring queues=$possible depth=16" "$LOG"
	grep -q "payload 524288 bytes per entry" "$LOG"
	# Requests larger than a payload are split by the kernel: still exact.
	random_file "$W/src" 4M
	dd if="$W/src" of="$MNT" bs=4M conv=notrunc oflag=direct status=none
	cmp "$W/src" "$MNT"
	stop_export
}
