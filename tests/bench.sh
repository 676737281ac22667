#!/usr/bin/env bash
# make bench: one fixed fio matrix against the raw image (the ceiling),
# uexportd over io_uring, over /dev/fuse, with --passthrough, on null:, the
# transport's floor (tests/nullfloor.c), and optionally peers and a disk.
#
#   RUNTIME=5 (s per job)  PEERS=1 (qemu-storage-daemon)  DISK=/path/img
#   SWEEP=0 (skip the depth/size sweep)  OUT=bench-results.md
#   SIZE=1G (the random image; smaller for a quick smoke run)
#   TARGETS="raw uring ..." (a subset of the targets, in that order;
#   "window" is not in the default set: uring through --offset=4096, for
#   TARGETS="uring window" to show what a window costs)
#   ONLY='4k randread qd64x2|qd256' (an extended regex: only the jobs whose
#   name matches, e.g. for a quick smoke run)
#   BASE=/path/to/uexportd (another build, e.g. the previous commit's:
#   adds base-uring, base-dev-fuse and the same on null:, for an A/B
#   within one run)
#
# Needs root, fio and python3 (to read fio's JSON).  Prints one results
# table, ratio tables against the raw image, qemu-storage-daemon, the floor
# and the disk, and the sweep, to stdout and $OUT; with gnuplot installed
# also a PNG of the sweep (${OUT%.md}-sweep.png).  Numbers are only
# comparable within one run.
set -eu
cd "$(dirname "$0")/.."
TOP=$PWD
RUNTIME=${RUNTIME:-5}
RAMP=${RAMP:-1}
SWEEP=${SWEEP:-1}
SIZE=${SIZE:-1G}
OUT=${OUT:-$TOP/bench-results.md}
PNG=${OUT%.md}-sweep.png
[ "$(id -u)" = 0 ] || { echo "bench: needs root"; exit 1; }
if ! command -v fio >/dev/null && command -v apt-get >/dev/null; then
	apt-get install -y -qq fio >/dev/null
fi
make -s uexportd tests/nullfloor
param=/sys/module/fuse/parameters/enable_uring
[ -w "$param" ] && echo Y > "$param"

W=$(mktemp -d /dev/shm/uexportd-bench.XXXXXX)
MNT=$W/export
RES=$W/results.tsv
DPID=
cleanup() {
	[ -n "$DPID" ] && kill "$DPID" 2>/dev/null
	umount -l "$MNT" 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT
touch "$MNT" "$RES"
echo "creating a $SIZE random image on tmpfs..." >&2
head -c "$SIZE" /dev/urandom > "$W/img"

# job NAME FIO-ARGS...: the matrix, one line per job.
JOBS=(
	"4k randread qd1 psync|--rw=randread --bs=4k --ioengine=psync"
	"4k randread qd1 io_uring|--rw=randread --bs=4k --ioengine=io_uring --iodepth=1"
	"4k randread qd1 psync pinned|PIN --rw=randread --bs=4k --ioengine=psync"
	"4k randread qd64x2|--rw=randread --bs=4k --ioengine=io_uring --iodepth=64 --numjobs=2"
	"4k randrw70 qd1|--rw=randrw --rwmixread=70 --bs=4k --ioengine=psync"
	"4k randrw70 qd64x4|--rw=randrw --rwmixread=70 --bs=4k --ioengine=io_uring --iodepth=64 --numjobs=4"
	"4k randwrite qd1|--rw=randwrite --bs=4k --ioengine=psync"
	"4k randwrite qd1 O_DSYNC|--rw=randwrite --bs=4k --ioengine=psync --sync=dsync"
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

# run_job TARGET FILE PID LABEL ARGS: appends one tab-separated line to $RES.
run_job() {
	local target=$1 file=$2 pid=$3 label=$4 args=$5 pin= t0= t1= rss=-
	if [[ $args == PIN* ]]; then pin="taskset -c 0"; args=${args#PIN }; fi
	[ -n "$pid" ] && t0=$(proc_cpu_ticks "$pid")
	$pin fio --name=b --filename="$file" --direct=1 --time_based \
		--runtime="$RUNTIME" --ramp_time="$RAMP" --group_reporting \
		--output-format=json $args > "$W/fio.json"
	if [ -n "$pid" ]; then
		t1=$(( $(proc_cpu_ticks "$pid") - t0 ))
		rss=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$pid/status")
	fi
	python3 - "$target" "$label" "$t1" "$rss" "$RUNTIME" "$RAMP" "$W/fio.json" \
		>> "$RES" <<'PY'
import json, os, sys
target, label, ticks, rss, runtime, ramp, path = sys.argv[1:8]
d = json.load(open(path))["jobs"][0]
r, w = d["read"], d["write"]
iops = r["iops"] + w["iops"]
mibs = (r["bw"] + w["bw"]) / 1024
ios = r["total_ios"] + w["total_ios"]
v = [x for x in (r, w) if x["total_ios"]]
mean = sum(x["lat_ns"]["mean"] * x["total_ios"] for x in v) / max(1, ios) / 1000
p99 = max(x["clat_ns"]["percentile"].get("99.000000", 0) for x in v) / 1000
cpu = "-"
if ticks:
    # CPU ticks cover ramp + runtime; fio's I/O count covers runtime only.
    total = ios * (float(runtime) + float(ramp)) / float(runtime)
    cpu = "%.2f" % (int(ticks) / os.sysconf("SC_CLK_TCK") * 1e6 / max(1, total))
print("\t".join([target, label, "%.0f" % iops, "%.0f" % mibs, "%.1f" % mean,
                 "%.1f" % p99, cpu, rss]))
PY
}

# Bounded poll for $MNT in /proc/mounts.
wait_mount() {
	for _ in $(seq 200); do
		grep -q " $MNT fuse" /proc/mounts && return 0
		sleep 0.05
	done
	return 1
}

# start_target NAME: mounts $MNT for the named target and sets DPID.
start_target() {
	case $1 in
	uring) "$TOP/uexportd" -w --io-uring=on -p "$W/pid" "$W/img" "$MNT" ;;
	# The same image through a window: all but its first 4 KiB.
	window) "$TOP/uexportd" -w --io-uring=on --offset=4096 -p "$W/pid" "$W/img" "$MNT" ;;
	dev-fuse) "$TOP/uexportd" -w --io-uring=off -p "$W/pid" "$W/img" "$MNT" ;;
	passthrough) "$TOP/uexportd" -w -g --passthrough -p "$W/pid" "$W/img" "$MNT" ;;
	null-uring) "$TOP/uexportd" -w --io-uring=on -p "$W/pid" null:1G "$MNT" ;;
	null-dev-fuse) "$TOP/uexportd" -w --io-uring=off -p "$W/pid" null:1G "$MNT" ;;
	floor)
		[ "$(cat "$param" 2>/dev/null)" = Y ] || return 1
		"$TOP/tests/nullfloor" "$MNT" &
		echo $! > "$W/pid"
		wait_mount ;;
	base-uring) "$BASE" -w --io-uring=on -p "$W/pid" "$W/img" "$MNT" ;;
	base-dev-fuse) "$BASE" -w --io-uring=off -p "$W/pid" "$W/img" "$MNT" ;;
	base-null-uring) "$BASE" -w --io-uring=on -p "$W/pid" null:1G "$MNT" ;;
	base-null-dev-fuse) "$BASE" -w --io-uring=off -p "$W/pid" null:1G "$MNT" ;;
	disk-uring) "$TOP/uexportd" -w --io-uring=on -p "$W/pid" "$DISK" "$MNT" ;;
	disk-uring-direct) "$TOP/uexportd" -w --direct --io-uring=on -p "$W/pid" "$DISK" "$MNT" ;;
	qsd)
		qemu-storage-daemon --daemonize --pidfile "$W/pid" \
			--blockdev node-name=file,driver=file,filename="$W/img",aio=io_uring \
			--blockdev node-name=fmt,driver=raw,file=file \
			--export type=fuse,id=exp,node-name=fmt,mountpoint="$MNT",writable=on >&2 ;;
	esac
}

# A target that has exited may linger as our zombie (nullfloor is a child).
alive() { ! grep -qs '^State:[[:space:]]*Z' "/proc/$1/status" && [ -e "/proc/$1" ]; }

stop_target() {
	kill "$DPID" 2>/dev/null
	for _ in $(seq 200); do
		alive "$DPID" || break
		sleep 0.05
	done
	umount "$MNT" 2>/dev/null || true
	DPID=
}

targets=(raw uring dev-fuse passthrough null-uring null-dev-fuse floor)
if [ "${PEERS:-0}" = 1 ]; then
	command -v qemu-storage-daemon >/dev/null ||
		apt-get install -y -qq qemu-system-common >/dev/null 2>&1 || true
	targets+=(qsd)
fi
[ -n "${BASE:-}" ] && targets+=(base-uring base-dev-fuse base-null-uring base-null-dev-fuse)
[ -n "${DISK:-}" ] && targets+=(disk-raw disk-uring disk-uring-direct)
[ -n "${TARGETS:-}" ] && read -r -a targets <<<"$TARGETS"

for t in "${targets[@]}"; do
	echo "bench: $t" >&2
	file=$MNT pid=
	case $t in
	raw) file=$W/img ;;
	disk-raw) file=$DISK ;;
	*)
		if ! start_target "$t"; then
			[ -s "$W/pid" ] && DPID=$(cat "$W/pid") && stop_target
			echo "bench: $t did not start; left out" >&2
			continue
		fi
		DPID=$(cat "$W/pid")
		pid=$DPID ;;
	esac
	jobs=("${JOBS[@]}")
	case $t in uring|dev-fuse|base-uring|base-dev-fuse) jobs+=("${SWEEP_JOBS[@]}") ;; esac
	for j in "${jobs[@]}"; do
		[ -z "${ONLY:-}" ] || [[ "${j%%|*}" =~ $ONLY ]] || continue
		run_job "$t" "$file" "$pid" "${j%%|*}" "${j#*|}"
	done
	[ -n "$pid" ] && stop_target
	rm -f "$W/pid"
done

python3 - "$RES" "$W/sweep.dat" "$(uname -r)" "$(nproc)" "$RUNTIME" <<'PY' | tee "$OUT"
import sys
res, dat, kernel, ncpu, runtime = sys.argv[1:6]
rows = [l.rstrip("\n").split("\t") for l in open(res) if l.strip()]
targets = list(dict.fromkeys(r[0] for r in rows))
jobs = [j for j in dict.fromkeys(r[1] for r in rows) if not j.startswith("sweep")]
val = {(r[0], r[1]): r for r in rows}

print(f"# uexportd bench: Linux {kernel}, {ncpu} CPUs, {runtime} s per job, fio --direct=1\n")
print("| target | job | IOPS | MiB/s | mean µs | p99 µs | daemon CPU µs/IO | daemon RSS MiB |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if not r[1].startswith("sweep"):
        print("| " + " | ".join(r) + " |")

# Throughput ratios (IOPS; at depth 1 that is the inverse latency ratio).
def ratios(ref, title):
    if ref not in targets:
        return
    disk = ref.startswith("disk")
    others = [t for t in targets if t != ref and t.startswith("disk") == disk]
    print(f"\n## {title}\n")
    print("| job | " + " | ".join(others) + " |")
    print("|---|" + "---|" * len(others))
    for j in jobs:
        base = val.get((ref, j))
        if not base or float(base[2]) == 0:
            continue
        cells = ["%.2f" % (float(val[t, j][2]) / float(base[2])) if (t, j) in val else "-"
                 for t in others]
        print(f"| {j} | " + " | ".join(cells) + " |")

ratios("raw", "Throughput ÷ the raw image (no FUSE: the ceiling)")
ratios("qsd", "Throughput ÷ qemu-storage-daemon's FUSE export")
ratios("floor", "Throughput ÷ the transport's floor (tests/nullfloor: no storage work)")
ratios("disk-raw", "Throughput ÷ the disk image itself")

if "uring" in targets and "window" in targets:
    print("\n## Throughput of the window ÷ the whole image (uring, same run)\n")
    print("| job | window ÷ uring |")
    print("|---|---|")
    for j in jobs:
        if ("uring", j) in val and ("window", j) in val and float(val["uring", j][2]):
            print(f"| {j} | %.2f |" % (float(val["window", j][2]) / float(val["uring", j][2])))

pairs = [(t, "base-" + t) for t in ("uring", "dev-fuse", "null-uring", "null-dev-fuse")
         if t in targets and "base-" + t in targets]
if pairs:
    print("\n## Throughput of this build ÷ BASE's (same run)\n")
    print("| job | " + " | ".join(f"{a} ÷ {b}" for a, b in pairs) + " |")
    print("|---|" + "---|" * len(pairs))
    for j in jobs:
        cells = ["%.2f" % (float(val[a, j][2]) / float(val[b, j][2]))
                 if (a, j) in val and (b, j) in val and float(val[b, j][2]) else "-"
                 for a, b in pairs]
        print(f"| {j} | " + " | ".join(cells) + " |")

sweep = [r for r in rows if r[1].startswith("sweep")]
if sweep:
    st = list(dict.fromkeys(r[0] for r in sweep))
    sj = list(dict.fromkeys(r[1] for r in sweep))
    print("\n## Sweep: 4k random read by depth; random read by size at depth 16\n")
    print("| job | " + " | ".join(f"{t} IOPS | {t} MiB/s" for t in st) + " |")
    print("|---|" + "---|---|" * len(st))
    for j in sj:
        cells = []
        for t in st:
            cells += val[t, j][2:4] if (t, j) in val else ["-", "-"]
        print(f"| {j[6:]} | " + " | ".join(cells) + " |")
    with open(dat, "w") as f:
        for t in st:
            f.write(f'"{t}"\n')
            for j in sj:
                if (t, j) in val:
                    tic = j.split()[1].replace("bs=", "")  # "qd16" or "64k"
                    f.write(f'"{tic}" {val[t, j][2]} {val[t, j][3]}\n')
            f.write("\n\n")
PY

if command -v gnuplot >/dev/null && [ -s "$W/sweep.dat" ]; then
	last=$(( $(grep -c '^"[^" ]*"$' "$W/sweep.dat") - 1 ))
	gnuplot <<GNUPLOT && echo "bench: sweep chart in $PNG" >&2
set terminal png size 1000,420
set output "$PNG"
set multiplot layout 1,2
set style data linespoints
set key top left
set title "4k random read IOPS by queue depth"
plot for [i=0:$last] "$W/sweep.dat" index i every ::0::4 using 0:2:xtic(1) title columnheader(1)
set title "random read MiB/s by request size, depth 16"
plot for [i=0:$last] "$W/sweep.dat" index i every ::5::9 using 0:3:xtic(1) title columnheader(1)
unset multiplot
GNUPLOT
fi
