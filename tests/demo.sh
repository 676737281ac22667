#!/usr/bin/env bash
# make demo: export a small scratch image, write through the export, read it
# back, unmount.  Needs root (or fusermount3 and a 0666 /dev/fuse).
set -eu
cd "$(dirname "$0")/.."
d=$(mktemp -d)
trap 'umount "$d/disk.file" 2>/dev/null || true; rm -rf "$d"' EXIT
truncate -s 16M "$d/disk.raw"
touch "$d/disk.file"
set -x
./uexportd -v -w -p "$d/pid" "$d/disk.raw" "$d/disk.file"
grep "$d/disk.file" /proc/mounts
echo "hello from uexportd" | dd of="$d/disk.file" bs=1 seek=1000 conv=notrunc status=none
dd if="$d/disk.file" bs=1 skip=1000 count=20 status=none
dd if="$d/disk.raw" bs=1 skip=1000 count=20 status=none
stat -c '%n: %s bytes, mode %a' "$d/disk.file"
kill "$(cat "$d/pid")"
{ set +x; } 2>/dev/null
for _ in $(seq 100); do grep -q "$d/disk.file" /proc/mounts || break; sleep 0.05; done
grep -q "$d/disk.file" /proc/mounts && { echo "still mounted"; exit 1; }
echo "unmounted: demo done"
