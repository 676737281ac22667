#!/usr/bin/env bash
# make bench: one fixed fio matrix against the raw image (the ceiling),
# uexportd over io_uring, over /dev/fuse, with --passthrough, on null:, and
# optionally peers.
#
#   RUNTIME=5 (s per job)  PEERS=1 (qemu-storage-daemon)  DISK=/path/img
#   SWEEP=0 (skip the depth/size sweep)  OUT=bench-results.md
#   TARGETS="raw uring ..." (a subset of the rows, in that order)
#
# Needs root, fio and python3 (to read fio's JSON).  Results go to stdout
# and to $OUT.  Numbers are only comparable within one run.
set -eu
cd "$(dirname "$0")/.."
TOP=$PWD
RUNTIME=${RUNTIME:-5}
RAMP=${RAMP:-1}
SWEEP=${SWEEP:-1}
OUT=${OUT:-$TOP/bench-results.md}
[ "$(id -u)" = 0 ] || { echo "bench: needs root"; exit 1; }
if ! command -v fio >/dev/null && command -v apt-get >/dev/null; then
	apt-get install -y -qq fio >/dev/null
fi
make -s uexportd
param=/sys/module/fuse/parameters/enable_uring
[ -w "$param" ] && echo Y > "$param"

W=$(mktemp -d /dev/shm/uexportd-bench.XXXXXX)
MNT=$W/export
DPID=
cleanup() {
	[ -n "$DPID" ] && kill "$DPID" 2>/dev/null
	umount -l "$MNT" 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT
touch "$MNT"
echo "creating a 1 GiB random image on tmpfs..." >&2
head -c 1G /dev/urandom > "$W/img"

# job NAME FIO-ARGS...: the matrix, one line per job.
JOBS=(
	"4k randread qd1 psync|--rw=randread --bs=4k --ioengine=psync"
	"4k randread qd1 io_uring|--rw=randread --bs=4k --ioengine=io_uring --iodepth=1"
	"4k randread qd1 psync pinned|PIN --rw=randread --bs=4k --ioengine=psync"
	"4k randread qd64x2|--rw=randread --bs=4k --ioengine=io_uring --iodepth=64 --numjobs=2"
	"4k randrw70 qd1|--rw=randrw --rwmixread=70 --bs=4k --ioengine=psync"
	"4k randrw70 qd64x4|--rw=randrw --rwmixread=70 --bs=4k --ioengine=io_uring --iodepth=64 --numjobs=4"
	"1M seqread qd8|--rw=read --bs=1M --ioengine=io_uring --iodepth=8"
	"1M seqwrite qd8|--rw=write --bs=1M --ioengine=io_uring --iodepth=8"
)
SWEEP_JOBS=()
if [ "$SWEEP" = 1 ]; then
	for d in 1 4 16 64 256; do
		SWEEP_JOBS+=("sweep qd$d 4k|--rw=randread --bs=4k --ioengine=io_uring --iodepth=$d")
	done
	for bs in 4k 16k 64k 256k 1M; do
		SWEEP_JOBS+=("sweep bs=$bs qd16|--rw=randread --bs=$bs --ioengine=io_uring --iodepth=16")
	done
fi

proc_cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run_job TARGET-FILE PID LABEL ARGS: prints one Markdown row.
run_job() {
	local file=$1 pid=$2 label=$3 args=$4 pin= t0 t1 json
	if [[ $args == PIN* ]]; then pin="taskset -c 0"; args=${args#PIN }; fi
	[ -n "$pid" ] && t0=$(proc_cpu_ticks "$pid")
	json=$($pin fio --name=b --filename="$file" --direct=1 --time_based \
		--runtime="$RUNTIME" --ramp_time="$RAMP" --group_reporting \
		--output-format=json $args)
	t1=
	[ -n "$pid" ] && t1=$(( $(proc_cpu_ticks "$pid") - t0 ))
	local rss=-
	[ -n "$pid" ] && rss=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$pid/status")
	python3 - "$label" "${t1:-}" "$rss" "$RUNTIME" "$RAMP" <<PY
import json, os, sys
label, ticks, rss, runtime, ramp = sys.argv[1:6]
d = json.loads('''$json''')["jobs"][0]
r, w = d["read"], d["write"]
iops = r["iops"] + w["iops"]
mibs = (r["bw"] + w["bw"]) / 1024
ios = r["total_ios"] + w["total_ios"]
def lat(k):
    v = [x for x in (r, w) if x["total_ios"]]
    mean = sum(x["lat_ns"]["mean"] * x["total_ios"] for x in v) / max(1, sum(x["total_ios"] for x in v))
    p99 = max(x["clat_ns"]["percentile"].get("99.000000", 0) for x in v)
    return mean / 1000, p99 / 1000
mean, p99 = lat(0)
cpu = "-"
if ticks:
    hz = os.sysconf("SC_CLK_TCK")
    # CPU ticks cover ramp + runtime; fio's I/O count covers runtime only.
    total = ios * (float(runtime) + float(ramp)) / float(runtime)
    cpu = "%.2f" % (int(ticks) / hz * 1e6 / max(1, total))
print("| %s | %.0f | %.0f | %.1f | %.1f | %s | %s |" % (label, iops, mibs, mean, p99, cpu, rss))
PY
}

# start_target NAME: mounts $MNT for the named target; sets DPID.
start_target() {
	case $1 in
	uring) "$TOP/uexportd" -w --io-uring=on -p "$W/pid" "$W/img" "$MNT" ;;
	dev-fuse) "$TOP/uexportd" -w --io-uring=off -p "$W/pid" "$W/img" "$MNT" ;;
	passthrough) "$TOP/uexportd" -w -g --passthrough -p "$W/pid" "$W/img" "$MNT" ;;
	null-uring) "$TOP/uexportd" -w --io-uring=on -p "$W/pid" null:1G "$MNT" ;;
	null-dev-fuse) "$TOP/uexportd" -w --io-uring=off -p "$W/pid" null:1G "$MNT" ;;
	disk-uring) "$TOP/uexportd" -w --io-uring=on -p "$W/pid" "$DISK" "$MNT" ;;
	disk-uring-direct) "$TOP/uexportd" -w --direct --io-uring=on -p "$W/pid" "$DISK" "$MNT" ;;
	qsd)
		qemu-storage-daemon --daemonize --pidfile "$W/pid" \
			--blockdev node-name=file,driver=file,filename="$W/img",aio=io_uring \
			--blockdev node-name=fmt,driver=raw,file=file \
			--export type=fuse,id=exp,node-name=fmt,mountpoint="$MNT",writable=on >&2 ;;
	esac
	DPID=$(cat "$W/pid")
}

stop_target() {
	kill "$DPID"
	while kill -0 "$DPID" 2>/dev/null; do sleep 0.05; done
	DPID=
}

targets=(raw uring dev-fuse passthrough null-uring null-dev-fuse)
[ "${PEERS:-0}" = 1 ] && command -v qemu-storage-daemon >/dev/null || {
	[ "${PEERS:-0}" = 1 ] && apt-get install -y -qq qemu-system-common >/dev/null 2>&1; true; }
[ "${PEERS:-0}" = 1 ] && targets+=(qsd)
[ -n "${DISK:-}" ] && targets+=(disk-raw disk-uring disk-uring-direct)
[ -n "${TARGETS:-}" ] && read -r -a targets <<<"$TARGETS"

{
echo "# uexportd bench: $(uname -r), $(nproc) CPUs, runtime ${RUNTIME}s/job"
echo
for t in "${targets[@]}"; do
	echo "## $t"
	echo
	echo "| job | IOPS | MiB/s | mean µs | p99 µs | daemon CPU µs/IO | daemon RSS MiB |"
	echo "|---|---|---|---|---|---|---|"
	file=$MNT pid=
	case $t in
	raw) file=$W/img ;;
	disk-raw) file=$DISK ;;
	*) start_target "$t"; pid=$DPID ;;
	esac
	jobs=("${JOBS[@]}")
	case $t in uring|dev-fuse) jobs+=("${SWEEP_JOBS[@]}") ;; esac
	for j in "${jobs[@]}"; do
		run_job "$file" "$pid" "${j%%|*}" "${j#*|}"
	done
	[ -n "$pid" ] && stop_target
	echo
done
} | tee "$OUT"
