#!/usr/bin/env bats
# Malformed and random requests straight into the parsers and handlers.
# tests/libfuzz.c (clang's libFuzzer, coverage-guided, ASan and UBSan)
# drives both transports (/dev/fuse into a pipe, io_uring on a fake ring),
# fuse_init() and every backend; tests/fuzz.c (random requests, ASan and
# UBSan) is the fallback where libFuzzer cannot be built.

load helpers

LIBFUZZ=$TOP/tests/libfuzz
# make check-long fuzzes for 10 minutes.
if [ -n "${LONG:-}" ] && [ "${BATS_TEST_TIMEOUT:-0}" -lt 900 ]; then BATS_TEST_TIMEOUT=900; fi

@test "fuzz: the seed corpus is what tests/libfuzz writes (every opcode, both framings, INIT)" {
	[ -x "$LIBFUZZ" ] || skip "tests/libfuzz not built: needs clang-14 and libclang-rt-14-dev"
	UEXPORTD_FUZZ_SEEDS=$W/seeds "$LIBFUZZ"
	# A new opcode in fuse_opcodes[] needs its seeds: make fuzz-seeds.
	diff -r "$W/seeds" "$TOP/tests/fuzz-corpus"
}

@test "fuzz: libFuzzer from the seed corpus, no crash, leak or failed check" {
	[ "$UEXPORTD_TRANSPORT" = dev-fuse ] || skip "transport-independent: runs in the dev-fuse pass"
	[ -x "$LIBFUZZ" ] || skip "tests/libfuzz not built: needs clang-14 and libclang-rt-14-dev"
	secs=${FUZZ_SECONDS:-30}
	[ -n "${LONG:-}" ] && secs=600
	# The block-device variants on a loop device over tmpfs (fsync is free
	# there); its file is unlinked at once, teardown detaches the device.
	if [ "$(id -u)" = 0 ] && command -v losetup >/dev/null; then
		blk=$(mktemp /dev/shm/uexportd-libfuzz.XXXXXX)
		truncate -s 1M "$blk"
		LOOP=$(losetup --find --show "$blk" 2>/dev/null) || LOOP=
		rm -f "$blk"
	fi
	[ -n "${LOOP:-}" ] || echo "# no loop device: the block-device variants fuzz the file" >&3
	mkdir "$W/corpus"
	status=0
	UEXPORTD_FUZZ_BLKDEV=${LOOP:-} "$LIBFUZZ" -max_total_time="$secs" -timeout=20 \
		-print_final_stats=1 -artifact_prefix="$W/" "$W/corpus" "$TOP/tests/fuzz-corpus" \
		>"$W/libfuzz.log" 2>&1 || status=$?
	grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added)' \
		"$W/libfuzz.log" | sed 's/^/# /' >&3 || true
	if [ "$status" -ne 0 ] || ! grep -q '^Done [0-9]* runs' "$W/libfuzz.log"; then
		grep -v -e '^uexportd: ' -e '^#[0-9]' "$W/libfuzz.log" | tail -60
		echo "exit status $status; to replay: echo BASE64 | base64 -d >crash;"
		echo "UEXPORTD_FUZZ_TRACE=1 UEXPORTD_FUZZ_BLKDEV=/dev/loopN tests/libfuzz crash"
		false
	fi
}

@test "fuzz: random and malformed requests, both framings, no memory errors" {
	[ -x "$TOP/tests/fuzz" ] || skip "tests/fuzz not built (make tests/fuzz)"
	[ ! -x "$LIBFUZZ" ] || skip "tests/libfuzz runs instead (coverage-guided)"
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
