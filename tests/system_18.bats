#!/usr/bin/env bats
# Driven as a system tool: mount(8) and fstab, the mount.fuse3 calling
# convention, readiness (--notify-fd, systemd's NOTIFY_SOCKET), the
# working directory, exit statuses and messages.

load helpers

HELPER=/sbin/mount.fuse.uexportd

# The mount(8) helper link, for this test only (teardown_hook removes
# it); an installed one is left alone and the test skips.
install_helper() {
	require_root
	require_cmd mount
	[ ! -e "$HELPER" ] && [ ! -L "$HELPER" ] || skip "$HELPER exists: not replacing an installed helper"
	ln -s "$UEXPORTD" "$HELPER"
	HELPER_OURS=1
}

teardown_hook() {
	[ -n "${HELPER_OURS:-}" ] && rm -f "$HELPER"
	[ -n "${CWD_FS:-}" ] && umount -l "$CWD_FS" 2>/dev/null
	[ -n "${NOTIFY_PID:-}" ] && kill "$NOTIFY_PID" 2>/dev/null
	true
}

# -o's spelling of the transport under test.
io_uring_o() { if [ "$UEXPORTD_TRANSPORT" = uring ]; then echo io-uring=on; else echo io-uring=off; fi; }

# mount_line MNT: the /proc/mounts line of MNT.
mount_line() { grep " $1 fuse" /proc/mounts; }

# daemon_of_pidfile: DPID from PIDFILE, once it is there.
pidfile_written() { [ -s "$PIDFILE" ]; }

@test "mount -t fuse.uexportd -o ...: the helper mounts, the table shows the source and ro/rw, umount stops it" {
	install_helper
	random_file "$IMG" 1M
	cp "$IMG" "$W/ref"
	ln -s "$IMG" "$W/img.link"	# the table shows the image's real path
	mount -t fuse.uexportd "$W/img.link" "$MNT" -o "rw,nofail,_netdev,x-test=1,$(io_uring_o),pidfile=$PIDFILE"
	DPID=$(cat "$PIDFILE")
	line=$(mount_line "$MNT")
	[[ "$line" == "$IMG $MNT fuse.uexportd rw,"* ]] || { echo "$line"; false; }
	printf 'through mount(8)' | dd of="$MNT" conv=notrunc status=none
	umount "$MNT"
	wait_until 20 pid_gone "$DPID"
	[ "$(head -c 16 "$IMG")" = "through mount(8)" ]
	# ro: the table says so and writes fail with EROFS.
	mount -t fuse.uexportd "$IMG" "$MNT" -o "ro,$(io_uring_o),pidfile=$PIDFILE"
	DPID=$(cat "$PIDFILE")
	[[ "$(mount_line "$MNT")" == "$IMG $MNT fuse.uexportd ro,"* ]]
	run "$FSOPS" open-rw "$MNT"
	[ "$output" = "err EROFS" ]
	umount "$MNT"
	wait_until 20 pid_gone "$DPID"
	# mount(8) takes offset= for a loop device of its own: uexportd.offset=
	# reaches us, and the source stays the image.
	mount -t fuse.uexportd "$IMG" "$MNT" -o "rw,uexportd.offset=4096,size=8192,$(io_uring_o),pidfile=$PIDFILE"
	DPID=$(cat "$PIDFILE")
	[[ "$(mount_line "$MNT")" == "$IMG $MNT fuse.uexportd rw,"* ]]
	cmp "$MNT" <(dd if="$IMG" bs=4096 skip=1 count=2 status=none)
	umount "$MNT"
	wait_until 20 pid_gone "$DPID"
}

@test "an fstab line mounts with mount -a, bad -o options fail with the usage status" {
	install_helper
	random_file "$IMG" 1M
	printf '%s %s fuse.uexportd rw,nofail,defaults,noatime,sync,noexec,%s,pidfile=%s,queue-depth=8 0 0\n' \
		"$IMG" "$MNT" "$(io_uring_o)" "$PIDFILE" > "$W/fstab"
	mount -T "$W/fstab" -a
	DPID=$(cat "$PIDFILE")
	line=$(mount_line "$MNT")
	# The mount flags -o names are the mount's.
	[[ "$line" == "$IMG $MNT fuse.uexportd rw,sync,nosuid,nodev,noexec,"* ]] || { echo "$line"; false; }
	cmp "$IMG" "$MNT"
	umount "$MNT"
	wait_until 20 pid_gone "$DPID"
	# mount -f (fake) reaches the helper as -f: nothing is mounted.
	run "$HELPER" "$IMG" "$MNT" -f -o rw
	[ "$status" -eq 0 ]; not_mounted "$MNT"
	# An unknown option, a value missing or given to a flag: exit 2, one line.
	run "$HELPER" "$IMG" "$MNT" -o rw,bogus
	[ "$status" -eq 2 ]; [ "$output" = "uexportd: -o bogus: unknown option (see --help)" ]
	run "$UEXPORTD" "$IMG" "$MNT" -o queue-depth
	[ "$status" -eq 2 ]; [ "$output" = "uexportd: -o queue-depth: needs =VALUE" ]
	run "$UEXPORTD" "$IMG" "$MNT" -o direct=yes
	[ "$status" -eq 2 ]; [ "$output" = "uexportd: -o direct: takes no value" ]
	run "$UEXPORTD" "$IMG" "$MNT" -o queue-depth=0
	[ "$status" -eq 2 ]; [ "$output" = "uexportd: invalid --queue-depth '0' (expected 1-1024)" ]
	# ro with rw or writable, in either order: refused, not decided by order.
	for o in ro,writable writable,ro rw,ro; do
		run "$HELPER" "$IMG" "$MNT" -o "$o"
		[ "$status" -eq 2 ]; [ "$output" = "uexportd: -o ro conflicts with --writable (-w, -o rw, -o writable)" ]
	done
	not_mounted "$MNT"
	# Options mount(8) passes along are taken; argv is left as it was.
	"$UEXPORTD" "$IMG" "$MNT" -o "ro,nosymfollow,iversion,$(io_uring_o),pidfile=$PIDFILE"
	DPID=$(cat "$PIDFILE")
	[ "$(tr '\0' ' ' < "/proc/$DPID/cmdline")" = "$UEXPORTD $IMG $MNT -o ro,nosymfollow,iversion,$(io_uring_o),pidfile=$PIDFILE " ]
	stop_export
}

@test "mount.fuse3 runs uexportd SOURCE MOUNTPOINT -o OPTS" {
	require_root
	require_cmd mount.fuse3
	random_file "$IMG" 1M
	mkdir "$W/bin"
	ln -s "$UEXPORTD" "$W/bin/uexportd"
	PATH=$W/bin:$PATH mount.fuse3 "$IMG" "$MNT" -t fuse.uexportd \
		-o "rw,allow_other,$(io_uring_o),pidfile=$PIDFILE"
	DPID=$(cat "$PIDFILE")
	[[ "$(mount_line "$MNT")" == "$IMG $MNT fuse.uexportd rw,"*allow_other* ]]
	cmp "$IMG" "$MNT"
	umount "$MNT"
	wait_until 20 pid_gone "$DPID"
}

# notify_through_fifo OPTIONS...: start uexportd with --notify-fd=5 on a
# FIFO and read it to EOF: the daemon must write one newline, live by
# then, and close it (else the read hangs until timeout).
notify_through_fifo() {
	mkfifo "$W/notify"
	"$UEXPORTD" $(transport_opt) --notify-fd=5 -p "$PIDFILE" "$@" "$IMG" "$MNT" \
		5>"$W/notify" 2>"$LOG" &
	BGPID=$!
	timeout 20 od -An -c "$W/notify" > "$W/notified"
	is_mounted "$MNT" || { echo "notified before live" >&2; cat "$LOG" >&2; return 1; }
	[ "$(tr -d ' ' < "$W/notified")" = '\n' ] || { cat "$W/notified" >&2; return 1; }
	cmp <(head -c 4096 "$IMG") <(head -c 4096 "$MNT")
}

@test "--notify-fd: one newline once live, then closed; daemonized and in the foreground" {
	random_file "$IMG" 1M
	require_root
	notify_through_fifo
	wait "$BGPID"			# the parent returned, the daemon lives on
	DPID=$(cat "$PIDFILE")
	stop_export
	rm "$W/notify"
	notify_through_fifo -f
	DPID=$BGPID
	stop_fg 0
	# Descriptor 1 in the foreground: written, then /dev/null, so the
	# reader sees EOF while the daemon serves on.
	rm "$W/notify"; mkfifo "$W/notify"
	"$UEXPORTD" $(transport_opt) -f --notify-fd=1 -p "$PIDFILE" "$IMG" "$MNT" >"$W/notify" 2>"$LOG" &
	DPID=$!
	[ "$(timeout 20 od -An -c "$W/notify" | tr -d ' ')" = '\n' ]
	is_mounted "$MNT"
	stop_fg 0
	# Not an open descriptor: a usage error.
	run "$UEXPORTD" --notify-fd=9 "$IMG" "$MNT" 9>&-
	[ "$status" -eq 2 ]; [ "$output" = "uexportd: --notify-fd=9: Bad file descriptor" ]
	run "$UEXPORTD" --notify-fd=-1 "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [[ "$output" == "uexportd: invalid --notify-fd '-1'"* ]]
}

@test "NOTIFY_SOCKET: READY=1 with STATUS= once live, STOPPING=1 at the stop" {
	require_root
	require_cmd python3
	random_file "$IMG" 1M
	python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
open(sys.argv[2], "w").close()
with open(sys.argv[2], "a") as out:
    while True:
        out.write(s.recv(4096).decode() + "\n--\n"); out.flush()
' "$W/notify.sock" "$W/messages" & NOTIFY_PID=$!
	wait_until 10 test -S "$W/notify.sock"
	NOTIFY_SOCKET=$W/notify.sock start_fg -w "$IMG" "$MNT"
	wait_until 10 grep -q '^READY=1$' "$W/messages"
	grep -q "^STATUS=serving: transport=$UEXPORTD_TRANSPORT " "$W/messages"
	! grep -q STOPPING "$W/messages"
	stop_fg 0
	wait_until 10 grep -q '^STOPPING=1$' "$W/messages"
}

@test "the daemon holds no directory: the one it was started from can be unmounted; relative paths keep working" {
	require_root
	random_file "$IMG" 1M
	mkdir "$W/cwd"
	mount -t tmpfs tmpfs "$W/cwd"
	CWD_FS=$W/cwd
	(cd "$W/cwd" && "$UEXPORTD" $(transport_opt) -p ../uexportd.pid ../disk.raw ../disk.file)
	DPID=$(cat "$PIDFILE")
	is_mounted "$MNT"
	umount "$W/cwd" || { ls -l "/proc/$DPID/cwd" >&2; false; }
	CWD_FS=
	[ "$(readlink "/proc/$DPID/cwd")" = / ]
	cmp "$IMG" "$MNT"
	# The relative pidfile path still names the file: removed at the stop.
	stop_export
}

@test "exit statuses: usage 2, image 4, mount point 5; an empty image, a read-only device with -w are refused" {
	random_file "$IMG" 64K
	run "$UEXPORTD" --bogus "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [ "$output" = "uexportd: unknown option '--bogus' (see --help)" ]
	run "$UEXPORTD" -x "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [ "$output" = "uexportd: unknown option -x (see --help)" ]
	run "$UEXPORTD" "$IMG" "$MNT" --pidfile
	[ "$status" -eq 2 ]; [ "$output" = "uexportd: option '--pidfile' needs a value (see --help)" ]
	run "$UEXPORTD" -f null:0 "$MNT"
	[ "$status" -eq 4 ]; [ "$output" = "uexportd: null:0: empty, and not --growable: nothing to export" ]
	: > "$W/empty.raw"
	run "$UEXPORTD" -f "$W/empty.raw" "$MNT"
	[ "$status" -eq 4 ]; [[ "$output" == *"empty, and not --growable"* ]]
	run "$UEXPORTD" -f "$W/missing.raw" "$MNT"
	[ "$status" -eq 4 ]
	# A read-only block device opens O_RDWR all the same: -w is refused.
	if [ "$(id -u)" = 0 ] && LOOP=$(losetup -r -f --show "$IMG" 2>/dev/null); then
		run "$UEXPORTD" -f -w "$LOOP" "$MNT"
		[ "$status" -eq 4 ]; [ "$output" = "uexportd: open $LOOP: Read-only file system" ]
	fi
	run "$UEXPORTD" -f "$IMG" "$W/missing.file"
	[ "$status" -eq 5 ]
	# A malformed --partition or an empty --pidfile is a usage error, found
	# before the image is even opened.
	for p in 0 -1 1x "" abc name: uuid:; do
		run "$UEXPORTD" --partition="$p" "$W/missing.raw" "$MNT"
		[ "$status" -eq 2 ]; [ "$output" = "uexportd: invalid --partition '$p' (expected a number from 1, name:LABEL or uuid:UUID)" ]
	done
	run "$UEXPORTD" --pidfile= "$IMG" "$MNT"
	[ "$status" -eq 2 ]; [ "$output" = "uexportd: invalid --pidfile '' (expected a file name)" ]
	# mount.fuse3's drop_privileges hands over /dev/fd/N, mounted already.
	run "$UEXPORTD" -f "$IMG" /dev/fd/1
	[ "$status" -eq 5 ]; [[ "$output" == "uexportd: mount point /dev/fd/1: a mount made by someone else (mount.fuse3's drop_privileges) is not supported"* ]]
	not_mounted "$MNT"
}
