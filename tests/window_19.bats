#!/usr/bin/env bats
# Windows: --offset/--size byte ranges and --partition (MBR, GPT) against
# the reference tools (losetup -o/--sizelimit, partx, sfdisk, sgdisk);
# damaged tables; fixed-size semantics inside a window; and the safety
# property: no path writes a byte outside the window.

load helpers

MiB=$((1024 * 1024))

# helpers' teardown kills the first daemon and unmounts; this kills the
# second one (a reference export, or a second partition) and the extra
# loop device.
teardown_hook() {
	local pid
	[ -f "$W/p2.pid" ] && pid=$(cat "$W/p2.pid") && kill -9 "$pid" 2>/dev/null &&
		wait_until 5 pid_gone "$pid"
	[ -n "${LOOP2:-}" ] && losetup -d "$LOOP2" 2>/dev/null
	true
}

# start_second [OPTIONS...] IMAGE MOUNTPOINT: another daemon, pidfile
# $W/p2.pid; sets DPID2.
start_second() {
	"$UEXPORTD" $(transport_opt) -p "$W/p2.pid" "$@" 2>"$W/p2.log" || {
		cat "$W/p2.log" >&2; return 1; }
	DPID2=$(cat "$W/p2.pid")
}

stop_second() {
	kill -TERM "$DPID2"
	wait_until 20 pid_gone "$DPID2"
	wait_until 5 not_mounted "$1"
}

# bytes FILE OFF LEN: LEN bytes of FILE at OFF, on stdout.
bytes() { dd if="$1" iflag=skip_bytes,count_bytes skip="$2" count="$3" bs=1M status=none; }

# outside_same A B OFF LEN: A and B agree everywhere but [OFF, OFF + LEN).
outside_same() {
	local size
	size=$(stat -c %s "$1")
	cmp <(bytes "$1" 0 "$3") <(bytes "$2" 0 "$3") &&
		cmp <(bytes "$1" $(($3 + $4)) $((size - $3 - $4))) \
		    <(bytes "$2" $(($3 + $4)) $((size - $3 - $4)))
}

# part_node LOOP N: a device node for partition N of LOOP (in $W: this
# system may run no udev), made after the kernel or partx added it.
part_node() {
	local dev=${1#/dev/}p$2
	wait_until 5 test -e "/sys/class/block/$dev/dev" || return 1
	[ -b "$W/$dev" ] || mknod "$W/$dev" b $(tr ':' ' ' < "/sys/class/block/$dev/dev")
	echo "$W/$dev"
}

# attach_parts IMAGE: a loop device over IMAGE with its partitions, read
# by the kernel (losetup -P) or, when it has no parser for the table, by
# libblkid (partx -a); sets LOOP.
attach_parts() {
	LOOP=$(losetup --find --show -P "$1") || skip "no loop devices"
	ls "/sys/class/block/${LOOP#/dev/}/" | grep -q "^${LOOP#/dev/}p" ||
		partx -a "$LOOP" || skip "neither the kernel nor partx reads the table"
}

# mbr_image FILE: 64 MiB of random bytes with an MBR made by sfdisk:
# primaries 1 (83), 2 (extended), 3 (0c), logicals 5 (83), 6 (82).
mbr_image() {
	random_file "$1" 64M
	sfdisk -q "$1" <<-EOF
		label: dos
		start=2048, size=8192, type=83
		start=10240, size=20000, type=5
		start=40000, size=1000, type=c
		start=12288, size=2048, type=83
		start=16384, size=4096, type=82
	EOF
}

# gpt_image FILE: 64 MiB random with a GPT made by sfdisk: 1 "root fs",
# 2 "swap", 3 "data".  FILE may be a device (then not overwritten).
gpt_image() {
	[ -b "$1" ] || random_file "$1" 64M
	sfdisk -q "$1" <<-EOF
		label: gpt
		start=2048, size=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root fs"
		start=20480, size=4096, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name=swap
		size=3000, name=data
	EOF
}

# sfdisk_table IMAGE [SECTOR]: "NR START SIZE TYPE" in bytes from
# sfdisk -d (its sectors of SECTOR bytes, 512 unless said), for comparing
# with --list-partitions.
sfdisk_table() {
	local ss=${2:-512}
	sfdisk -d "$1" | awk -v ss="$ss" -F'[ ,=:]+' '
		/start=/ {
			nr = $1; sub(/.*[^0-9]/, "", nr)
			for (i = 2; i < NF; i++) {
				if ($i == "start") s = $(i + 1)
				if ($i == "size") n = $(i + 1)
				if ($i == "type") t = $(i + 1)
			}
			if (length(t) <= 2) sub(/^0/, "", t)
			if (length(t) <= 2) t = "0x" t
			printf "%d %d %d %s\n", nr, s * ss, n * ss, tolower(t)
		}' | sort -n
}

# list_table IMAGE: "NR START SIZE TYPE" from --list-partitions.
list_table() { "$UEXPORTD" --list-partitions "$1" | awk 'NR > 1 { print $1, $2, $3, $4 }' | sort -n; }

@test "--offset/--size: unaligned byte windows read and write like losetup -o --sizelimit" {
	require_root
	require_cmd losetup
	random_file "$IMG" 8M
	cp "$IMG" "$W/orig"
	random_file "$W/rand" 2M
	for win in "1 4096" "12345 1048576" "4095 $((3 * MiB + 7))" "$((7 * MiB)) $MiB"; do
		set -- $win
		start_export -w --offset="$1" --size="$2" "$IMG" "$MNT"
		grep -q "\[$1+$2\] ($2 bytes, rw) on $MNT" "$LOG"
		[ "$(stat -c %s "$MNT")" = "$2" ]
		cmp "$MNT" <(bytes "$IMG" "$1" "$2")
		# The reference: a loop device over the same bytes (its size is
		# rounded down to 512-byte sectors).
		LOOP=$(losetup --find --show -o "$1" --sizelimit "$2" "$W/orig") || skip "no loop devices"
		cmp <(head -c $(($2 / 512 * 512)) "$MNT") "$LOOP"
		losetup -d "$LOOP"; LOOP=
		# Writes at odd places inside, and across the end: cut short there.
		dd if="$W/rand" of="$MNT" bs=777 count=3 seek=1 conv=notrunc status=none
		run "$FSOPS" pwrite "$MNT" $(($2 - 3)) 10
		[ "$output" = "ok 3" ]
		run "$FSOPS" pwrite "$MNT" "$2" 1
		[ "$output" = "err ENOSPC" ]
		stop_export
		outside_same "$IMG" "$W/orig" "$1" "$2"
		cmp <(bytes "$IMG" $(($1 + 777)) $((777 * 3))) <(head -c $((777 * 3)) "$W/rand")
		is_ab "$IMG" $(($1 + $2 - 3)) 3
		cp "$IMG" "$W/orig"
	done
}

@test "--offset/--size: --direct uses O_DIRECT where base + offset is aligned, buffered elsewhere" {
	require_root
	random_file "$IMG" 8M
	cp "$IMG" "$W/orig"
	random_file "$W/rand" 1M
	for off in 1048576 1000001; do
		start_export -w --direct --offset=$off --size=4M "$IMG" "$MNT"
		dd if="$W/rand" of="$MNT" bs=64K seek=3 oflag=direct conv=notrunc status=none
		dd if="$W/rand" of="$MNT" bs=1000 count=5 seek=7 conv=notrunc status=none
		cmp <(bytes "$MNT" $((3 * 65536)) $MiB) "$W/rand"
		cmp <(dd if="$MNT" bs=64K skip=3 count=16 iflag=direct status=none) "$W/rand"
		cmp <(bytes "$MNT" 7000 5000) <(head -c 5000 "$W/rand")
		stop_export
		outside_same "$IMG" "$W/orig" $off $((4 * MiB))
		cp "$IMG" "$W/orig"
	done
}

@test "bad windows: past the end, empty, -g, --passthrough, with --partition; -o offset=,size=" {
	require_root
	random_file "$IMG" 1M
	run "$UEXPORTD" --offset=2M "$IMG" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"--offset=2097152 is past the image's end (1048576 bytes)"* ]]
	run "$UEXPORTD" --offset=4096 --size=1M "$IMG" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"window 4096+1048576 ends past the image's end (1048576 bytes)"* ]]
	run "$UEXPORTD" --offset=1M "$IMG" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"is empty"* ]]
	run "$UEXPORTD" -w -g --offset=4096 "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"--growable: a window"*"fixed size"* ]]
	run "$UEXPORTD" --passthrough --size=4096 "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"--passthrough cannot export a window"*"cannot shift"* ]]
	run "$UEXPORTD" --partition=1 --offset=0 "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"exclude each other"* ]]
	run "$UEXPORTD" --offset=8E "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"invalid --offset"* ]]
	run "$UEXPORTD" --offset=$(( (1 << 62) )) --size=$(( (1 << 62) )) "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == *"largest file size"* ]]
	run "$UEXPORTD" --partition=1 "$IMG" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"--partition=1: no partition table"* ]]
	run "$UEXPORTD" --partition=1 null:1G "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"null: has no partition table"* ]]
	not_mounted "$MNT"
	# mount(8)'s form.
	start_export -o offset=1000,size=2000 "$IMG" "$MNT"
	[ "$(stat -c %s "$MNT")" = 2000 ]
	cmp "$MNT" <(bytes "$IMG" 1000 2000)
	stop_export
}

@test "MBR by sfdisk: primaries and logicals by number and PARTUUID match partx's partitions" {
	require_root
	require_cmd sfdisk
	require_cmd partx
	mbr_image "$IMG"
	# --list-partitions: sfdisk's view, and partx's UUIDs (blkid's PARTUUID).
	diff <(list_table "$IMG") <(sfdisk_table "$IMG")
	diff <("$UEXPORTD" --list-partitions "$IMG" | awk 'NR > 1 { print $1, $5 }') \
	     <(partx -g -o NR,UUID "$IMG" | awk '{ print $1, $2 }' | sort -n)
	"$UEXPORTD" --list-partitions "$IMG" | head -1 | grep -qx 'NR START SIZE TYPE UUID NAME'
	attach_parts "$IMG"
	for n in 1 3 5 6; do
		start_export --partition=$n "$IMG" "$MNT"
		grep -q "\[partition $n: " "$LOG"
		cmp "$MNT" "$(part_node "$LOOP" $n)"
		stop_export
	done
	uuid=$(partx -g -o UUID -n 5 "$IMG")
	start_export --partition=uuid:${uuid^^} "$IMG" "$MNT"
	cmp "$MNT" "$(part_node "$LOOP" 5)"
	stop_export
	# The extended partition is a container, not data; 4 does not exist.
	run "$UEXPORTD" --partition=2 "$IMG" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"partition 2 is the extended partition"* ]]
	run "$UEXPORTD" --partition=4 "$IMG" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"no partition 4 (dos table: 1, 2, 3, 5, 6)"* ]]
	run "$UEXPORTD" --partition=name:x "$IMG" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"an MBR names no partitions"* ]]
}

@test "GPT by sfdisk: by number, name and UUID, the bytes of partx's partitions" {
	require_root
	require_cmd sfdisk
	require_cmd partx
	gpt_image "$IMG"
	diff <(list_table "$IMG") <(sfdisk_table "$IMG")
	diff <("$UEXPORTD" --list-partitions "$IMG" | tail -n +2 | cut -d' ' -f1,5-) \
	     <(partx -g -o NR,UUID,NAME "$IMG" | sed -E 's/^ +//; s/ +/ /g' | sort -n)
	attach_parts "$IMG"
	for spec in 1 3 "name:root fs" name:swap uuid:$(partx -g -o UUID -n 3 "$IMG"); do
		start_export "--partition=$spec" "$IMG" "$MNT"
		case $spec in 1|"name:root fs") n=1 ;; name:swap) n=2 ;; *) n=3 ;; esac
		grep -q "\[partition $n: " "$LOG"
		cmp "$MNT" "$(part_node "$LOOP" $n)"
		stop_export
	done
	run "$UEXPORTD" --partition=name:nope "$IMG" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"no partition named nope (gpt table: 1, 2, 3)"* ]]
	# Two of one name: ambiguous, never the first.
	sfdisk -q --part-label "$IMG" 3 swap
	run "$UEXPORTD" --partition=name:swap "$IMG" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"partitions 2 and 3 both have the name 'swap'"* ]]
}

@test "GPT with 4096-byte sectors (a 4Kn disk's image) and GPT by sgdisk" {
	require_root
	require_cmd sfdisk
	# sfdisk writes the table through a loop device of 4096-byte sectors.
	random_file "$IMG" 64M
	LOOP=$(losetup --find --show -b 4096 "$IMG") || skip "no loop devices"
	sfdisk -q "$LOOP" <<-EOF
		label: gpt
		start=256, size=1024, name="root fs"
		start=2560, size=512, name=swap
		size=300, name=data
	EOF
	diff <(list_table "$IMG") <(sfdisk_table "$LOOP" 4096)
	diff <(list_table "$LOOP") <(sfdisk_table "$LOOP" 4096)
	losetup -d "$LOOP"; LOOP=
	start_export --partition=name:swap "$IMG" "$MNT"
	cmp "$MNT" <(bytes "$IMG" $((2560 * 4096)) $((512 * 4096)))
	stop_export
	command -v sgdisk >/dev/null || skip "needs sgdisk (apt-get install gdisk) for the rest"
	random_file "$W/sg" 32M
	sgdisk -o -n 1:2048:+4M -c 1:boot -t 1:ef00 -n 2:0:+8M -c 2:root -n 5:0:+1M -c 5:"my data" "$W/sg" >/dev/null 2>&1
	diff <(list_table "$W/sg") <(sfdisk_table "$W/sg")
	"$UEXPORTD" --list-partitions "$W/sg" | tail -n +2 | cut -d' ' -f1,6- > "$W/names"
	diff "$W/names" <(printf '1 boot\n2 root\n5 my data\n')
	uuid=$(sgdisk -i 2 "$W/sg" | awk '/unique GUID/ { print $4 }')
	start_export --partition=uuid:$uuid "$W/sg" "$MNT"
	cmp "$MNT" <(bytes "$W/sg" $((4 * MiB + MiB)) $((8 * MiB)))
	stop_export
	start_export --partition="name:my data" "$W/sg" "$MNT"
	[ "$(stat -c %s "$MNT")" = $MiB ]
	stop_export
}

# gpt_patch IMAGE PYTHON: run PYTHON on the bytes b of IMAGE's first 17
# KiB (MBR, GPT header, entries), then recompute the CRCs.
gpt_patch() {
	python3 - "$1" "$2" <<-'PY'
		import struct, sys, zlib
		path, code = sys.argv[1:3]
		f = open(path, "r+b"); b = bytearray(f.read(34 * 512))
		exec(code)
		n, es = struct.unpack_from("<II", b, 512 + 80)
		struct.pack_into("<I", b, 512 + 88, zlib.crc32(bytes(b[1024:1024 + n * es])))
		struct.pack_into("<I", b, 512 + 16, 0)
		struct.pack_into("<I", b, 512 + 16, zlib.crc32(bytes(b[512:512 + 92])))
		f.seek(0); f.write(b)
	PY
}

# refused IMAGE WORDS: --list-partitions and --partition=1 both exit 4
# with one line holding WORDS.
refused() {
	run "$UEXPORTD" --list-partitions "$1"
	[ "$status" -eq 4 ] && [[ "$output" == *"$2"* ]] && [ "${#lines[@]}" -eq 1 ] ||
		{ echo "--list-partitions: $status: $output"; return 1; }
	run "$UEXPORTD" --partition=1 "$1" "$MNT"
	[ "$status" -eq 4 ] && [[ "$output" == *"$2"* ]] ||
		{ echo "--partition=1: $status: $output"; return 1; }
	not_mounted "$MNT"
}

@test "damaged tables: CRCs, overlaps, entries past the end, EBR loop -> exit 4 naming it" {
	require_root
	require_cmd sfdisk
	gpt_image "$IMG"; cp "$IMG" "$W/good"
	printf '\x01' | dd of="$IMG" bs=1 seek=$((512 + 40)) conv=notrunc status=none
	refused "$IMG" "GPT header: bad CRC32"
	cp "$W/good" "$IMG"
	printf 'X' | dd of="$IMG" bs=1 seek=$((1024 + 56)) conv=notrunc status=none
	refused "$IMG" "GPT entries: bad CRC32"
	cp "$W/good" "$IMG"
	gpt_patch "$IMG" 'struct.pack_into("<Q", b, 1024 + 128 + 32, 9000)'
	refused "$IMG" "partitions 1 and 2 overlap"
	cp "$W/good" "$IMG"
	gpt_patch "$IMG" 'struct.pack_into("<Q", b, 1024 + 40, 200000)'
	refused "$IMG" "partition 1: LBA 2048-200000 is not inside the usable LBAs"
	cp "$W/good" "$IMG"
	gpt_patch "$IMG" 'struct.pack_into("<Q", b, 512 + 48, 200000)'
	refused "$IMG" "usable LBAs 2048-200000 are not inside"
	truncate -s 8M "$W/good"
	refused "$W/good" "are not inside LBA 2-16383 of the image (8388608 bytes)"
	# A protective MBR and no GPT: never read as an MBR.
	gpt_image "$IMG"
	dd if=/dev/zero of="$IMG" bs=512 seek=1 count=1 conv=notrunc status=none
	refused "$IMG" "protective MBR (type 0xee) but no GPT header"
	# MBR: a partition past the end of a truncated image; an EBR loop.
	mbr_image "$IMG"
	truncate -s 20M "$IMG"
	refused "$IMG" "partition 3 (bytes 20480000+512000) ends past the image's end (20971520 bytes)"
	mbr_image "$IMG"
	# The last EBR (LBA 14336) links back to the first (extended start + 0).
	printf '\x05\0\0\0\0\0\0\0\0\x08\0\0' | dd of="$IMG" bs=1 seek=$((14336 * 512 + 446 + 16 + 4)) conv=notrunc status=none
	refused "$IMG" "the chain of EBRs loops back to LBA 10240"
	random_file "$IMG" 1M
	refused "$IMG" "no partition table (no MBR signature 0x55AA at byte 510)"
}

@test "two partitions of one image exported at once, each written, nothing else touched" {
	require_root
	require_cmd sfdisk
	gpt_image "$IMG"; cp "$IMG" "$W/orig"
	touch "$W/two.file"
	start_export -w --partition=1 "$IMG" "$MNT"
	start_second -w --partition=3 "$IMG" "$W/two.file"
	random_file "$W/a" 4M; random_file "$W/b" $((3000 * 512))
	dd if="$W/a" of="$MNT" bs=1M conv=notrunc status=none &
	dd if="$W/b" of="$W/two.file" bs=64K conv=notrunc status=none
	wait $!
	cmp "$MNT" "$W/a"; cmp "$W/two.file" "$W/b"
	stop_second "$W/two.file"
	stop_export
	cmp <(bytes "$IMG" $((2048 * 512)) $((4 * MiB))) "$W/a"
	start3=$("$UEXPORTD" --list-partitions "$IMG" | awk '$1 == 3 { print $2 }')
	cmp <(bytes "$IMG" "$start3" $((3000 * 512))) "$W/b"
	# Everything else as it was: before 1, between 1 and 3, after 3.
	cmp <(bytes "$IMG" 0 $((2048 * 512))) <(bytes "$W/orig" 0 $((2048 * 512)))
	gap=$((2048 * 512 + 4 * MiB))
	cmp <(bytes "$IMG" $gap $((start3 - gap))) <(bytes "$W/orig" $gap $((start3 - gap)))
	end3=$((start3 + 3000 * 512))
	cmp <(tail -c +$((end3 + 1)) "$IMG") <(tail -c +$((end3 + 1)) "$W/orig")
}

# diff_in_window DIR OFF SIZE [OPTIONS]: the differential test inside a
# window: fsops' random operations on a window [OFF, OFF + SIZE) of
# DIR/img, whose other bytes hold a pattern, and on a whole-image export
# of DIR/ref (those SIZE bytes alone) side by side: both fixed-size
# exports, so they must answer alike.  Then the window's bytes equal ref
# and every byte outside the window still holds the pattern.
diff_in_window() {
	local dir=$1 off=$2 size=$3 count=${DIFF_OPS:-3000}; shift 3
	[ -n "${LONG:-}" ] && count=30000
	# The pattern: each 512-byte block holds its own number.
	python3 -c '
import sys
n = int(sys.argv[1]) // 512
sys.stdout.buffer.write(b"".join(b"%-15d|" % i * 32 for i in range(n)))' 16777216 > "$dir/img"
	cp "$dir/img" "$dir/pattern"
	random_file "$dir/ref" "$size"
	dd if="$dir/ref" of="$dir/img" bs=1M iflag=fullblock oflag=seek_bytes seek="$off" conv=notrunc status=none
	touch "$dir/ref.file"
	start_export -w "$@" --offset="$off" --size="$size" "$dir/img" "$MNT"
	start_second -w "$@" "$dir/ref" "$dir/ref.file"
	run "$FSOPS" diff "${DIFF_SEED:-4242}" "$count" $((size + size / 8)) "$MNT" "$dir/ref.file"
	echo "window $off+$size $*: $output"
	[ "$status" -eq 0 ]
	stop_second "$dir/ref.file"
	stop_export
	cmp <(bytes "$dir/img" "$off" "$size") "$dir/ref"
	outside_same "$dir/img" "$dir/pattern" "$off" "$size"
	echo "outside the window: $(( $(stat -c %s "$dir/img") - size )) bytes unchanged"
}

@test "safety: the differential test inside a window (tmpfs, page-aligned) never touches a byte outside" {
	require_root
	[ -d /dev/shm ] || skip "needs /dev/shm"
	dir=$(mktemp -d /dev/shm/uexportd-win.XXXXXX)
	diff_in_window "$dir" $((3 * MiB)) $((6 * MiB))
	diff_in_window "$dir" $((3 * MiB)) $((6 * MiB)) --direct
	rm -rf "$dir"
}

@test "safety: the differential test inside an unaligned window (disk fs, --direct too)" {
	require_root
	# ext4 places unwritten extents per file and the window's blocks
	# straddle the image's: seeks run, but only their errors are compared.
	FSOPS_SEEK_ERRORS_ONLY=1 diff_in_window "$W" 1234567 6000001
	FSOPS_SEEK_ERRORS_ONLY=1 diff_in_window "$W" 1234567 6000001 --direct
}

@test "fallocate at the window's edges, SEEK_DATA/SEEK_HOLE and st_blocks relative to it" {
	require_root
	[ -d /dev/shm ] || skip "needs /dev/shm"
	dir=$(mktemp -d /dev/shm/uexportd-win.XXXXXX)
	# A sparse image: data [1M, 7M), holes around it.  Window [2M, 6M).
	truncate -s 8M "$dir/img"
	random_file "$dir/data" 6M
	dd if="$dir/data" of="$dir/img" bs=1M seek=1 conv=notrunc status=none
	cp "$dir/img" "$dir/orig"
	start_export -w --offset=2M --size=4M "$dir/img" "$MNT"
	run "$FSOPS" seek "$MNT"
	[ "$output" = "$(printf 'data 0 4194304\nend')" ]
	[ "$(stat -c %b "$MNT")" = $((4 * MiB / 512)) ]
	# Punch the first and the last 64 KiB, zero 4 KiB in the middle.
	run "$FSOPS" fallocate "$MNT" punch 0 65536
	[ "$output" = "ok 0" ]
	run "$FSOPS" fallocate "$MNT" punch $((4 * MiB - 65536)) 65536
	[ "$output" = "ok 0" ]
	run "$FSOPS" seek "$MNT"
	[ "$output" = "$(printf 'data 65536 4128768\nend')" ]
	run "$FSOPS" lseek "$MNT" hole $((4 * MiB - 65536 - 1))
	[ "$output" = "ok $((4 * MiB - 65536))" ]
	run "$FSOPS" lseek "$MNT" data $((4 * MiB - 65536))
	[ "$output" = "err ENXIO" ]
	[ "$(stat -c %b "$MNT")" = $(((4 * MiB - 131072) / 512)) ]
	# Past the window: clipped with KEEP_SIZE, ENOSPC without; no growth.
	run "$FSOPS" fallocate "$MNT" keep $((4 * MiB - 10)) 1000000
	[ "$output" = "ok 0" ]
	run "$FSOPS" fallocate "$MNT" 0 $((4 * MiB - 10)) 100
	[ "$output" = "err ENOSPC" ]
	run "$FSOPS" truncate "$MNT" $((4 * MiB + 1))
	[ "$output" = "err EFBIG" ]
	# Truncating zeroes to the window's end, not the image's.
	run "$FSOPS" truncate "$MNT" $((3 * MiB))
	[ "$output" = "ok 0" ]
	[ "$(stat -c %s "$MNT")" = $((4 * MiB)) ]
	stop_export
	[ "$(stat -c %s "$dir/img")" = $((8 * MiB)) ]
	outside_same "$dir/img" "$dir/orig" $((2 * MiB)) $((4 * MiB))
	cmp <(bytes "$dir/img" $((2 * MiB)) 65536) <(head -c 65536 /dev/zero)
	cmp <(bytes "$dir/img" $((2 * MiB + 65536)) $((3 * MiB - 65536))) \
	    <(bytes "$dir/orig" $((2 * MiB + 65536)) $((3 * MiB - 65536)))
	cmp <(bytes "$dir/img" $((5 * MiB)) $MiB) <(head -c $MiB /dev/zero)
	# Unaligned edges: the partial pages next to the window keep their bytes.
	cp "$dir/orig" "$dir/img"
	start_export -w --offset=$((2 * MiB + 100)) --size=$((MiB + 1)) "$dir/img" "$MNT"
	run "$FSOPS" fallocate "$MNT" punch 0 $((MiB + 1))
	[ "$output" = "ok 0" ]
	run "$FSOPS" fallocate "$MNT" zero 0 $((MiB + 1))
	[[ "$output" == "ok 0" || "$output" == "err EOPNOTSUPP" ]]
	stop_export
	outside_same "$dir/img" "$dir/orig" $((2 * MiB + 100)) $((MiB + 1))
	cmp <(bytes "$dir/img" $((2 * MiB + 100)) $((MiB + 1))) <(head -c $((MiB + 1)) /dev/zero)
	rm -rf "$dir"
}

@test "block device: a partition of a loop device, and a window with an unaligned base" {
	require_root
	require_cmd sfdisk
	gpt_image "$W/backing"
	cp "$W/backing" "$W/orig"
	LOOP=$(losetup --find --show "$W/backing") || skip "no loop devices"
	"$UEXPORTD" --list-partitions "$LOOP" > "$W/list"
	diff <(awk 'NR > 1 { print $1, $2, $3 }' "$W/list") <(list_table "$W/orig" | cut -d' ' -f1-3)
	start_export -w --partition=name:swap "$LOOP" "$MNT"
	random_file "$W/chunk" 12345
	dd if="$W/chunk" of="$MNT" bs=12345 seek=3 conv=notrunc status=none
	run "$FSOPS" fallocate "$MNT" zero 1000 5000
	[ "$output" = "ok 0" ]
	run "$FSOPS" truncate "$MNT" $((2 * MiB - 700))
	[ "$output" = "ok 0" ]
	stop_export
	start=$((20480 * 512))
	outside_same "$W/backing" "$W/orig" $start $((2 * MiB))
	cmp <(bytes "$W/backing" $((start + 3 * 12345)) 12345) "$W/chunk"
	cmp <(bytes "$W/backing" $((start + 1000)) 5000) <(head -c 5000 /dev/zero)
	cmp <(bytes "$W/backing" $((start + 2 * MiB - 700)) 700) <(head -c 700 /dev/zero)
	# A byte window at an odd offset of the device, with --direct.
	cp "$W/backing" "$W/orig"
	start_export -w --direct --offset=777 --size=100000 "$LOOP" "$MNT"
	run "$FSOPS" fallocate "$MNT" punch 0 100000
	[ "$output" = "ok 0" ]
	dd if="$W/chunk" of="$MNT" bs=4096 count=2 iflag=fullblock conv=notrunc status=none
	stop_export
	outside_same "$W/backing" "$W/orig" 777 100000
	cmp <(bytes "$W/backing" 777 8192) <(head -c 8192 "$W/chunk")
	cmp <(bytes "$W/backing" $((777 + 8192)) $((100000 - 8192))) <(head -c $((100000 - 8192)) /dev/zero)
}
