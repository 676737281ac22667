#!/usr/bin/env bats
# Table-driven tests of the pure parsers and planners (tests/unit.c, built
# with ASan and UBSan): parse_cpu_list, parse_size, memory_plan, and the
# MBR/GPT parsers (pt_parse, pt_find, crc32_ieee) on sound and damaged
# tables built in memory.  Nothing here depends on the transport; both
# passes run it.

load helpers

UNIT=$TOP/tests/unit

@test "unit: parse_cpu_list, parse_size, memory_plan, partition tables" {
	[ -x "$UNIT" ] || skip "tests/unit not built (make tests/unit)"
	run "$UNIT"
	echo "$output"
	[ "$status" -eq 0 ]
	[[ "$output" =~ ^ok\ [1-9][0-9]*\ cases$ ]]
}

@test "unit: helpers' expected_memory_plan agrees with memory_plan()" {
	[ -x "$UNIT" ] || skip "tests/unit not built (make tests/unit)"
	[ "$UEXPORTD_TRANSPORT" = dev-fuse ] || skip "transport-independent: runs in the dev-fuse pass"
	# uring_05 predicts the start-up depth with the bash copy: keep it honest.
	for budget in $(( 1 << 20 )) $(( 256 << 20 )) $(( 4 << 30 )); do
		for units in 1 2 4 5 9 16 17 64 128 200 256 4096; do
			for depth in 2 20 64 1024; do
				want=$("$UNIT" plan "$budget" "$units" "$depth")
				got=$(expected_memory_plan "$budget" "$units" "$depth")
				[ "$got" = "$want" ] || {
					echo "budget $budget units $units depth $depth: helpers say '$got', memory_plan '$want'"
					false; }
			done
		done
	done
}
