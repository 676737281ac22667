#!/usr/bin/env bats
# Concurrency, real file systems on the export, shutdown under load.

load helpers

# The unprivileged test works in its own /tmp directory (nobody must be able
# to reach it), outside what helpers' teardown cleans: after a failure
# its daemon, its mount and the directory would stay behind.
teardown_hook() {
	local pid
	[ -n "${USER_DIR:-}" ] || return 0
	[ -f "$USER_DIR/pid" ] && pid=$(cat "$USER_DIR/pid") && kill -9 "$pid" 2>/dev/null &&
		wait_until 5 pid_gone "$pid"
	umount -l "$USER_DIR/mnt" 2>/dev/null
	rm -rf "$USER_DIR"
}

@test "fio: concurrent verified writers on every CPU" {
	require_root
	require_cmd fio
	jobs=$(nproc)
	# A 64M region per job (32M written in each): the export cannot grow.
	truncate -s $(( jobs > 4 ? jobs * 64 : 256 ))M "$IMG"
	start_export -w "$IMG" "$MNT"
	run fio --name=verify --filename="$MNT" --direct=1 --ioengine=libaio --iodepth=32 \
		--rw=randwrite --bs=4k --bsrange=512-64k --numjobs="$jobs" --size=32M \
		--offset_increment=64M --verify=crc32c --verify_state_save=0 --verify_fatal=1 --do_verify=1 \
		--randrepeat=0 --group_reporting
	echo "$output" | tail -5
	[ "$status" -eq 0 ]
	[[ "$output" != *"verify: bad"* ]]
	stop_export
}

@test "fio: psync and io_uring engines, mixed rw with verify" {
	require_root
	require_cmd fio
	truncate -s 64M "$IMG"
	start_export -w "$IMG" "$MNT"
	for engine in psync io_uring; do
		run fio --name=mix --filename="$MNT" --direct=1 --ioengine=$engine --iodepth=16 \
			--rw=randrw --bs=16k --size=16M --verify=crc32c --verify_state_save=0 --verify_fatal=1
		[ "$status" -eq 0 ] || { echo "$output"; false; }
	done
	stop_export
}

# Requests of 128 KiB and more are copied by io-wq workers on another CPU.
@test "fio: requests up to 1 MiB with verify, image on disk and on tmpfs" {
	require_root
	require_cmd fio
	local shm jobs
	jobs=$(nproc)
	shm=$(mktemp -d /dev/shm/uexportd-test.XXXXXX)
	for img in "$IMG" "$shm/disk.raw"; do
		# A 32M region per job (24M used in each): the export cannot grow.
		truncate -s $(( jobs > 2 ? jobs * 32 : 64 ))M "$img"
		start_export -w "$img" "$MNT"
		run fio --name=big --filename="$MNT" --direct=1 --ioengine=io_uring --iodepth=8 \
			--rw=randrw --bsrange=4k-1M --numjobs="$jobs" --size=24M \
			--offset_increment=32M --verify=crc32c --verify_state_save=0 --verify_fatal=1 \
			--randrepeat=0 --group_reporting
		[ "$status" -eq 0 ] || { echo "$output"; rm -rf "$shm"; false; }
		stop_export
	done
	rm -rf "$shm"
}

@test "mkfs.ext4 on the export, loop-mounted, filled, e2fsck clean" {
	require_root
	require_cmd mkfs.ext4
	truncate -s 128M "$IMG"
	start_export -w "$IMG" "$MNT"
	mkfs.ext4 -q -F "$MNT"
	mkdir "$W/fs"
	mount -o loop "$MNT" "$W/fs" || skip "loop devices unavailable"
	random_file "$W/big" 20M
	cp "$W/big" "$W/fs/a"
	for i in $(seq 1 200); do echo "file $i" > "$W/fs/small.$i"; done
	sync
	umount "$W/fs"
	e2fsck -fn "$MNT"
	stop_export
	e2fsck -fn "$IMG"
	mount -o loop,ro "$IMG" "$W/fs"
	cmp "$W/big" "$W/fs/a"
	[ "$(cat "$W/fs/small.200")" = "file 200" ]
	umount "$W/fs"
}

@test "SIGTERM under a deep-queue fio load: clean exit, mount gone, fio not hung" {
	require_root
	require_cmd fio
	truncate -s 256M "$IMG"
	start_export -w "$IMG" "$MNT"
	fio --name=load --filename="$MNT" --direct=1 --ioengine=libaio --iodepth=64 \
		--rw=randrw --bs=4k --numjobs=2 --time_based --runtime=60 \
		--output="$W/fio.out" >/dev/null 2>&1 &
	fpid=$!
	# Let fio reach steady state: wait until the image shows writes.
	image_written() { [ "$(stat -c %b "$IMG")" -gt 0 ]; }
	wait_until 20 image_written
	kill -TERM "$DPID"
	wait_until 30 pid_gone "$DPID"
	wait_until 10 not_mounted "$MNT"
	# fio must end promptly with I/O errors, not hang on a dead mount.
	wait_until 30 pid_gone "$fpid"
	[ ! -e "$PIDFILE" ]
}

@test "external umount while a client is reading" {
	require_root
	random_file "$IMG" 64M
	start_export "$IMG" "$MNT"
	( while cat "$MNT" > /dev/null 2>&1; do :; done ) &
	cpid=$!
	umount -l "$MNT"
	wait_until 30 pid_gone "$DPID"
	kill "$cpid" 2>/dev/null || true
	wait "$cpid" 2>/dev/null || true
	not_mounted "$MNT"
}

@test "a client holding the file open at shutdown does not block exit" {
	require_root
	random_file "$IMG" 1M
	start_export "$IMG" "$MNT"
	exec 7<"$MNT"
	kill -TERM "$DPID"
	wait_until 30 pid_gone "$DPID"
	not_mounted "$MNT"
	run cat <&7
	exec 7<&-
	[ "$status" -ne 0 ]
}

@test "unprivileged user through fusermount3" {
	require_root
	require_cmd fusermount3
	require_cmd setpriv
	# fusermount3 opens /dev/fuse with the caller's file-system uid; Debian's
	# udev rule makes it 0666, a bare VM may leave it 0600.
	FUSE_DEV_MODE=$(stat -c %a /dev/fuse)	# restored by teardown
	chmod 0666 /dev/fuse
	d=$(mktemp -d /tmp/uexportd-user.XXXXXX)
	USER_DIR=$d	# removed by teardown_hook
	chown 65534:65534 "$d"
	random_file "$d/img" 1M
	touch "$d/mnt"
	chown 65534:65534 "$d/img" "$d/mnt"
	asuser() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
	run asuser "$UEXPORTD" $(transport_opt) -v -w -p "$d/pid" "$d/img" "$d/mnt"
	echo "$output"
	# The kernel may keep io_uring from users (kernel.io_uring_disabled=1
	# without io_uring_group): io_uring_setup() fails with EPERM.
	if [ "$status" -ne 0 ] &&
	   [[ "$output" == *"FUSE-over-io_uring unavailable: "*"Operation not permitted"* ]]; then
		rm -rf "$d"; skip "io_uring refused for an unprivileged user: ${output##*$'\n'}"
	fi
	[ "$status" -eq 0 ]
	[[ "$output" == *"transport=$UEXPORTD_TRANSPORT"* ]]
	is_mounted "$d/mnt"
	grep " $d/mnt " /proc/mounts | grep -q "user_id=65534"
	echo "from nobody" | asuser dd of="$d/mnt" conv=notrunc status=none
	asuser cmp "$d/mnt" "$d/img"
	pid=$(cat "$d/pid")
	kill -TERM "$pid"
	wait_until 20 pid_gone "$pid"
	wait_until 5 not_mounted "$d/mnt"
	[ "$(head -c 11 "$d/img")" = "from nobody" ]
	rm -rf "$d"
}
