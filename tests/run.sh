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
passed=0 failed=$build_failed skipped=0 rc=$build_failed
for t in "${transports[@]}"; do
	echo "=== transport: $t ==="
	out=$(mktemp)
	UEXPORTD_TRANSPORT=$t bats --tap tests/*.bats | tee "$out"
	[ "${PIPESTATUS[0]}" = 0 ] || rc=1
	p=$(grep -c '^ok ' "$out"); s=$(grep -c '^ok .* # skip' "$out"); f=$(grep -c '^not ok ' "$out")
	passed=$((passed + p - s)) skipped=$((skipped + s)) failed=$((failed + f))
	rm -f "$out"
done
echo "$passed passed, $failed failed, $skipped skipped"
exit $rc
