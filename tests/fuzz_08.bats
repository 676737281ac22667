#!/usr/bin/env bats
# Malformed and random requests straight into the parsers and handlers
# (tests/fuzz.c, built with ASan and UBSan).

load helpers

@test "fuzz: random and malformed requests, both framings, no memory errors" {
	[ -x "$TOP/tests/fuzz" ] || skip "tests/fuzz not built (make tests/fuzz)"
	# tmpfs and a file-size limit: a handler bug must not be able to fill a disk.
	dir=$(mktemp -d /dev/shm/uexportd-fuzz.XXXXXX)
	truncate -s 1M "$dir/img"
	iters=${FUZZ_ITERS:-200000}
	[ -n "${LONG:-}" ] && iters=3000000
	run bash -c "ulimit -f 4096; '$TOP/tests/fuzz' ${FUZZ_SEED:-7} $iters '$dir/img'"
	rm -rf "$dir"
	echo "$output" | tail -20
	[ "$status" -eq 0 ]
	[[ "$output" == ok* ]]
}
