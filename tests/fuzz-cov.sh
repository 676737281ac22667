#!/usr/bin/env bash
# Line and branch coverage of uexportd.c reached by the fuzzers: clang's
# source-based coverage (make tests/libfuzz-cov tests/fuzz-cov), read with
# llvm-profdata-14 and llvm-cov-14 (Debian: llvm-14).
#
#   tests/fuzz-cov.sh libfuzz SECONDS  fuzz SECONDS with tests/libfuzz (ASan,
#                                      from tests/fuzz-corpus), then replay
#                                      the seeds and what it found
#   tests/fuzz-cov.sh corpus DIR...    replay libFuzzer corpora
#   tests/fuzz-cov.sh fuzz ITERS [SEED]  tests/fuzz's random requests
#
# Prints llvm-cov's report for uexportd.c and one summary line.  As root the
# block-device variants get a loop device, as in fuzz_08.bats.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFDATA=${PROFDATA:-llvm-profdata-14}
COV=${COV:-llvm-cov-14}
MAKE=${MAKE:-make}
mode=${1:-}
[ $# -ge 2 ] || { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2; }
shift

# Functions of the request path, by name (a renamed one drops out).
REQUEST_PATH='^(fuse_|image_|fd_|file_|blkdev_|null_|mem_|ts_to_attr$|setattr_time$|rw_full$|sys_rw2$|payload_track_|devfuse_(parse|serve_one|reply)$|ring_sqe$|ring_io_|ring_queue_(parse|commit|fuse_cmd|request|start_io|image_io|io_done|fuse_done|reap|sqe)$)'

tmp=$(mktemp -d)
LOOP=
cleanup() {
	[ -z "$LOOP" ] || losetup -d "$LOOP" 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT

loop_device() {
	local blk
	if [ "$(id -u)" = 0 ] && command -v losetup >/dev/null; then
		blk=$(mktemp /dev/shm/uexportd-fuzzcov.XXXXXX)
		truncate -s 1M "$blk"
		LOOP=$(losetup --find --show "$blk" 2>/dev/null) || LOOP=
		rm -f "$blk"
	fi
	export UEXPORTD_FUZZ_BLKDEV=$LOOP
}

case $mode in
libfuzz)
	$MAKE -s tests/libfuzz tests/libfuzz-cov
	loop_device
	mkdir "$tmp/corpus"
	tests/libfuzz -max_total_time="$1" -timeout=20 -print_final_stats=1 \
		-artifact_prefix="$tmp/" "$tmp/corpus" tests/fuzz-corpus >"$tmp/fuzz.log" 2>&1 || {
		grep -v '^uexportd: ' "$tmp/fuzz.log" | tail -40; exit 1; }
	grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added)' "$tmp/fuzz.log"
	bin=tests/libfuzz-cov
	LLVM_PROFILE_FILE=$tmp/cov.profraw $bin -runs=0 "$tmp/corpus" tests/fuzz-corpus \
		>"$tmp/replay.log" 2>&1
	;;
corpus)
	$MAKE -s tests/libfuzz-cov
	loop_device
	bin=tests/libfuzz-cov
	LLVM_PROFILE_FILE=$tmp/cov.profraw $bin -runs=0 "$@" >"$tmp/replay.log" 2>&1
	;;
fuzz)
	$MAKE -s tests/fuzz-cov
	bin=tests/fuzz-cov
	truncate -s 1M "$tmp/img"
	( ulimit -f 4096; LLVM_PROFILE_FILE=$tmp/cov.profraw $bin "${2:-7}" "$1" "$tmp/img" )
	;;
*)
	echo "unknown mode '$mode'" >&2
	exit 2
	;;
esac

"$PROFDATA" merge -sparse -o "$tmp/cov.profdata" "$tmp/cov.profraw"
report=$("$COV" report "$bin" -instr-profile="$tmp/cov.profdata" \
	-ignore-filename-regex='tests/(lib)?fuzz\.c$')
echo "$report"
# TOTAL: regions missed cover, functions missed cover, lines missed cover,
# branches missed cover.
echo "$report" | awk '$1 == "TOTAL" {
	printf "uexportd.c: lines %d/%d (%s), branches %d/%d (%s), functions %d/%d (%s)\n",
		$8 - $9, $8, $10, $11 - $12, $11, $13, $5 - $6, $5, $7 }'
# The request path alone (what a request touches once the export is up:
# backends, protocol, the transports' data path; not start-up, mount,
# options, threads), per function: name regions miss cover lines miss cover
# branches miss cover.
"$COV" report -show-functions "$bin" -instr-profile="$tmp/cov.profdata" uexportd.c |
awk -v re="$REQUEST_PATH" '
	{ name = $1; sub(/^[^:]*\.c:/, "", name) }
	NF == 10 && name ~ re { n++; hit += ($5 > $6); l += $5; lm += $6; b += $8; bm += $9 }
	END { printf "request path (%d functions, %d entered): lines %d/%d (%.2f%%), branches %d/%d (%.2f%%)\n",
		n, hit, l - lm, l, 100 * (l - lm) / l, b - bm, b, b ? 100 * (b - bm) / b : 0 }'
