#!/usr/bin/env bats
# make bench stays runnable: a short run prints every table and cleans up.

load helpers

@test "bench: a short run prints the results, ratio and sweep tables, leaves no mount" {
	require_root
	require_cmd fio
	require_cmd python3
	[ "$UEXPORTD_TRANSPORT" = uring ] || skip "runs once, in the io_uring pass"
	local out=$W/bench.md
	# The jobs the checks below look at, not the whole matrix.
	run env RUNTIME=1 RAMP=0 SIZE=64M TARGETS="uring floor" OUT="$out" \
		ONLY='^(4k randread qd64x2|1M seqread qd8|sweep qd256 4k)$' \
		"$BATS_TEST_DIRNAME/bench.sh"
	[ "$status" -eq 0 ] || { echo "$output"; false; }
	grep -q '^| uring | 4k randread qd64x2 | [1-9]' "$out"
	grep -q '^| floor | 1M seqread qd8 | [1-9]' "$out"
	grep -q '^## Throughput ÷ the transport' "$out"
	grep -q '^| 4k randread qd64x2 | [0-9]' "$out"		# a ratio row
	grep -q '^| qd256 4k | [1-9]' "$out"
	! grep -q uexportd-bench /proc/mounts
}
