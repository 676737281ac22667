#!/usr/bin/env bash
# Run the bats suite once per available transport.  As root on Debian it
# installs what the tests need and turns on fuse.enable_uring.
set -u
cd "$(dirname "$0")/.."

need=()
command -v bats >/dev/null || need+=(bats)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v fio >/dev/null || need+=(fio)
command -v xfs_io >/dev/null || need+=(xfsprogs)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v musl-gcc >/dev/null || need+=(musl-tools)
# tests/libfuzz: clang and its libFuzzer runtime.
command -v clang-14 >/dev/null || need+=(clang-14)
compgen -G '/usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a' >/dev/null ||
	need+=(libclang-rt-14-dev)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
	echo "installing: ${need[*]}"
	apt-get update -qq >/dev/null 2>&1
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 ||
		echo "warning: apt-get install ${need[*]} failed"
fi
command -v bats >/dev/null || { echo "bats not found: install bats"; exit 1; }
# tests/libfuzz is built here, once its compiler may have been installed;
# fuzz_08 falls back to tests/fuzz without one.  With clang-14 and its
# libFuzzer runtime present, a harness that does not build is a failure.
build_failed=0
if command -v clang-14 >/dev/null &&
   compgen -G '/usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a' >/dev/null; then
	${MAKE:-make} -s tests/libfuzz || { echo "FAIL: tests/libfuzz does not build"; build_failed=1; }
elif ! ${MAKE:-make} -s tests/libfuzz >/dev/null 2>&1; then
	echo "SKIP libFuzzer harness: needs clang-14 and libclang-rt-14-dev"
fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null

param=/sys/module/fuse/parameters/enable_uring
if [ -w "$param" ] && [ "$(cat $param)" != Y ]; then
	echo Y > "$param" 2>/dev/null && echo "enabled $param"
fi

transports=(dev-fuse)
if [ -r "$param" ] && [ "$(cat $param)" = Y ]; then
	transports=(uring dev-fuse)
else
	echo "SKIP io_uring transport run: $param is not Y (needs Linux 6.14+ and root to enable)"
fi
[ -n "${TRANSPORTS:-}" ] && read -r -a transports <<<"$TRANSPORTS"

export BATS_TEST_TIMEOUT=${BATS_TEST_TIMEOUT:-180}
# TESTS="tests/io_02.bats ...": run only those files.
read -r -a files <<<"${TESTS:-$(echo tests/*.bats)}"
passed=0 failed=$build_failed skipped=0 rc=$build_failed

# run_pass LABEL TRANSPORT FILE...: one bats run, added to the tally.
run_pass() {
	local label=$1 transport=$2 out p s f t0=$SECONDS; shift 2
	echo "=== $label, transport: $transport ==="
	out=$(mktemp)
	UEXPORTD_TRANSPORT=$transport bats --tap "$@" | tee "$out"
	[ "${PIPESTATUS[0]}" = 0 ] || rc=1
	echo "=== $label, transport: $transport: $((SECONDS - t0)) s ==="
	p=$(grep -c '^ok ' "$out"); s=$(grep -c '^ok .* # skip' "$out"); f=$(grep -c '^not ok ' "$out")
	passed=$((passed + p - s)) skipped=$((skipped + s)) failed=$((failed + f))
	rm -f "$out"
}

# The passes.  Every bats file runs once per transport; the files that
# start the daemon also run against two sanitized builds of it,
# tests/uexportd-asan (ASan, UBSan, LSan) and tests/uexportd-tsan (TSan).
# Every report goes to a file in one directory (a daemon's stderr is
# /dev/null) and any file there fails the run.  make check, within its
# ten minutes, with transports uring and dev-fuse:
#
#   plain uring      every file
#   asan  dev-fuse   every file that starts $UEXPORTD (the same code as
#                    the plain binary, checked; ASan costs little here)
#   plain dev-fuse   the rest: the harnesses fuzz_08 and unit_11 (built
#                    with ASan already), bare_16 (the static builds),
#                    install_17, and a smoke set of the plain binary
#   tsan  uring      the files that drive the serving threads hardest
#
# make check-long runs every file plain, under ASan and under TSan, on
# both transports.  SANITIZE="" runs only plain passes, on every file.
SANITIZE=${SANITIZE-asan tsan}
TSAN_FILES=${TSAN_FILES:-io_02 stress_04 uring_05 safety_10 crash_14 faults_12}
PLAIN_SMOKE=${PLAIN_SMOKE:-io_02 cli_01 system_18}
# picks NAMES FILE...: the files whose basename is in NAMES ("*": all).
picks() {
	local names=$1 f; shift
	for f in "$@"; do
		[[ "$names" == "*" || " $names " == *" $(basename "$f" .bats) "* ]] && echo "$f"
	done
}
daemon_files=() rest_files=()
for f in "${files[@]}"; do
	case $f in
	*/fuzz_08.bats|*/unit_11.bats|*/bench_09.bats|*/bare_16.bats|*/install_17.bats)
		rest_files+=("$f") ;;
	*)	daemon_files+=("$f") ;;
	esac
done
split=0	# 1: the second transport's plain pass leaves the daemon files to ASan
[[ " $SANITIZE " == *" asan "* && -z "${LONG:-}" && ${#transports[@]} -gt 1 ]] && split=1

for t in "${transports[@]}"; do
	if [ "$split" = 1 ] && [ "$t" != "${transports[0]}" ]; then
		mapfile -t pass_files < <(picks "$PLAIN_SMOKE" "${daemon_files[@]}"; printf '%s\n' "${rest_files[@]}")
	else
		pass_files=("${files[@]}")
	fi
	[ ${#pass_files[@]} -gt 0 ] && run_pass "uexportd" "$t" "${pass_files[@]}"
done

# san_canary NAME: a program built with NAME's flags that makes NAME
# report must leave a report in SAN_DIR, where run.sh looks: else the
# sanitizer passes could not fail.
san_canary() {
	local bin=$SAN_DIR/canary
	case $1 in
	asan) printf '%s\n' '#include <stdlib.h>' \
		'int main(void) { volatile char *p = malloc(4); char c = p[4]; free((void *)p); return c; }' |
		${CC:-cc} -fsanitize=address -x c -o "$bin" - ;;
	tsan) printf '%s\n' '#include <pthread.h>' 'static int racy;' \
		'static void *bump(void *a) { racy++; return a; }' \
		'int main(void) { pthread_t t; pthread_create(&t, 0, bump, 0); racy++; pthread_join(t, 0); return 0; }' |
		${CC:-cc} -fsanitize=thread -x c -o "$bin" - -lpthread ;;
	esac || return 1
	"$bin" >/dev/null 2>&1
	rm -f "$bin"
	compgen -G "$SAN_DIR/$1.*" >/dev/null && rm -f "$SAN_DIR/$1".*
}

# san_reports: print every report in SAN_DIR, then fail if there was one.
san_reports() {
	local r n=0
	for r in "$SAN_DIR"/*; do
		[ -e "$r" ] || continue
		echo "FAIL: sanitizer report $r:"; head -n 80 "$r"; n=$((n + 1))
	done
	[ "$n" = 0 ]
}

for san in $SANITIZE; do
	bin=tests/uexportd-$san
	if ! ${MAKE:-make} -s "$bin"; then
		echo "FAIL: $bin does not build"; failed=$((failed + 1)) rc=1; continue
	fi
	SAN_DIR=$(mktemp -d /tmp/uexportd-san.XXXXXX)
	chmod 1777 "$SAN_DIR"	# daemons of the unprivileged tests report too
	export ASAN_OPTIONS="log_path=$SAN_DIR/asan:detect_leaks=1"
	export UBSAN_OPTIONS="log_path=$SAN_DIR/asan:print_stacktrace=1:halt_on_error=1"
	export TSAN_OPTIONS="log_path=$SAN_DIR/tsan:halt_on_error=0"
	if ! san_canary "$san"; then
		echo "FAIL: a $san report does not reach $SAN_DIR: the $san pass could not fail"
		failed=$((failed + 1)) rc=1
	fi
	san_transports=("${transports[@]}") pass_files=("${daemon_files[@]}")
	if [ -z "${LONG:-}" ] && [ "$san" = asan ]; then
		san_transports=("${transports[-1]}")
	elif [ -z "${LONG:-}" ]; then
		san_transports=("${transports[0]}")
		mapfile -t pass_files < <(picks "$TSAN_FILES" "${daemon_files[@]}")
	fi
	for t in "${san_transports[@]}"; do
		[ ${#pass_files[@]} -gt 0 ] || break
		UEXPORTD=$PWD/$bin run_pass "$san" "$t" "${pass_files[@]}"
		san_reports || { failed=$((failed + 1)) rc=1; }
		rm -f "$SAN_DIR"/*
	done
	rm -rf "$SAN_DIR"
	unset ASAN_OPTIONS UBSAN_OPTIONS TSAN_OPTIONS
done
echo "$passed passed, $failed failed, $skipped skipped"
exit $rc
