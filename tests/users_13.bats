#!/usr/bin/env bats
# Unprivileged use: two users (uexportd-a, uexportd-b, created if missing)
# export only what they may read and write, mount only over files they may
# write, see each other's exports only through allow_other, and get
# nosuid,nodev mounts; root refuses a mount point that is a symbolic link.

load helpers

USER_A=uexportd-a
USER_B=uexportd-b

# add_user NAME: a system user with its own group, no home, no shell.
# Another run may hold /etc/passwd's lock: retried by the caller.
add_user() {
	id -u "$1" >/dev/null 2>&1 ||
		useradd --system --user-group --no-create-home --home-dir /nonexistent \
			--shell /usr/sbin/nologin "$1" 2>/dev/null
}

setup_file() {
	[ "$(id -u)" = 0 ] && command -v useradd >/dev/null || return 0
	wait_until 10 add_user "$USER_A" || true
	wait_until 10 add_user "$USER_B" || true
}

# require_users: root, setpriv, both users, a /dev/fuse they can open
# (restored by teardown), and the test's directory tree D (D/a and D/b
# owned by each user), outside BATS_TEST_TMPDIR, which they cannot reach.
require_users() {
	require_root
	require_cmd setpriv
	local u
	for u in "$USER_A" "$USER_B"; do
		id -u "$u" >/dev/null 2>&1 || skip "user $u missing and useradd failed"
	done
	fuse_dev_for_users
	D=$(mktemp -d /tmp/uexportd-users.XXXXXX)
	USERS_DIR=$D	# removed by teardown_hook
	chmod 0755 "$D"
	mkdir "$D/a" "$D/b"
	chown "$USER_A:$USER_A" "$D/a"
	chown "$USER_B:$USER_B" "$D/b"
}

# as USER CMD...: run CMD as USER (uid, gid and no supplementary groups).
as() {
	local u=$1; shift
	setpriv --reuid="$(id -u "$u")" --regid="$(id -g "$u")" --clear-groups "$@"
}

# own USER FILE...: FILE belongs to USER.
own() { local u=$1; shift; chown "$u:$u" "$@"; }

# user_image USER PATH SIZE: PATH, SIZE random bytes, owned by USER.
user_image() { random_file "$2" "$3"; own "$1" "$2"; }

# user_start USER OPTIONS... IMAGE MOUNTPOINT: USER's daemon, pidfile in its
# directory; must come up live on this run's transport.  Sets UPID.
user_start() {
	local u=$1; shift
	local pidfile=$D/${u#uexportd-}/uexportd.pid
	run as "$u" "$UEXPORTD" $(transport_opt) -v -p "$pidfile" "$@"
	echo "$output"
	if [ "$status" -ne 0 ] &&
	   [[ "$output" == *"FUSE-over-io_uring unavailable: "*"Operation not permitted"* ]]; then
		skip "io_uring refused for an unprivileged user: ${output##*$'\n'}"
	fi
	[ "$status" -eq 0 ]
	[[ "$output" == *"transport=$UEXPORTD_TRANSPORT"* ]]
	UPID=$(cat "$pidfile")
	is_mounted "${@: -1}"
}

# user_stop PID MOUNTPOINT: SIGTERM; the daemon ends and the mount goes.
user_stop() {
	kill -TERM "$1"
	wait_until 20 pid_gone "$1"
	wait_until 5 not_mounted "$2"
}

# mount_opts MOUNTPOINT: the options /proc/mounts shows for it, one a line.
mount_opts() { awk -v m="$1" '$2 == m { print $4 }' /proc/mounts | tr , '\n'; }

# /etc/fuse.conf is saved before a test changes it, and restored by
# teardown_hook (removed if it did not exist).
fuse_conf_set() {
	local allow=$1 tmp
	if [ -z "${FUSE_CONF_SAVED:-}" ]; then
		FUSE_CONF_SAVED=$W/fuse.conf.saved
		if [ -e /etc/fuse.conf ]; then cp -p /etc/fuse.conf "$FUSE_CONF_SAVED"
		else : > "$W/fuse.conf.absent"; fi
	fi
	tmp=$(mktemp /etc/fuse.conf.uexportd-test.XXXXXX)
	{ [ ! -e "$FUSE_CONF_SAVED" ] || grep -v '^[[:space:]]*user_allow_other' "$FUSE_CONF_SAVED"
	  [ "$allow" = on ] && echo user_allow_other; true; } > "$tmp"
	chmod 0644 "$tmp"
	mv "$tmp" /etc/fuse.conf	# atomic: fusermount3 reads it any time
}

teardown_hook() {
	local f pid m
	if [ -n "${USERS_DIR:-}" ]; then
		for f in "$USERS_DIR"/*/uexportd.pid; do
			[ -f "$f" ] && pid=$(cat "$f") && kill -9 "$pid" 2>/dev/null &&
				wait_until 5 pid_gone "$pid"
		done
		for m in $(awk -v d="$USERS_DIR/" 'index($2, d) == 1 { print $2 }' /proc/mounts); do
			umount -l "$m" 2>/dev/null
		done
		rm -rf "$USERS_DIR"
	fi
	if [ -e "$W/fuse.conf.absent" ]; then
		rm -f /etc/fuse.conf
	elif [ -n "${FUSE_CONF_SAVED:-}" ] && [ -e "$FUSE_CONF_SAVED" ]; then
		cp -p "$FUSE_CONF_SAVED" /etc/fuse.conf.uexportd-restore &&
			mv /etc/fuse.conf.uexportd-restore /etc/fuse.conf
	fi
	true
}

@test "users: no export of an image the user cannot read (file or device): clear error, exit 1" {
	require_users
	random_file "$D/root.img" 64K
	chmod 0600 "$D/root.img"
	user_image "$USER_A" "$D/a/img" 64K
	chmod 0600 "$D/a/img"
	touch "$D/a/mnt" "$D/b/mnt"
	own "$USER_A" "$D/a/mnt"; own "$USER_B" "$D/b/mnt"
	# Root's image, for either user; user A's image, for user B; read-only
	# or not, daemonized or not.
	for args in "$USER_A $D/root.img $D/a/mnt" "$USER_B $D/root.img $D/b/mnt" \
		    "$USER_B $D/a/img $D/b/mnt"; do
		set -- $args
		for opt in "" -w -f; do
			run as "$1" "$UEXPORTD" $(transport_opt) $opt "$2" "$3"
			[ "$status" = 4 ] || { echo "$args $opt: exit $status: $output"; false; }
			[ "$output" = "uexportd: open $2: Permission denied" ] ||
				{ echo "$args $opt: $output"; false; }
			not_mounted "$3"
		done
	done
	# A block device (root:disk 0660).
	attach_loop 1M
	run as "$USER_A" "$UEXPORTD" $(transport_opt) "$LOOP" "$D/a/mnt"
	[ "$status" = 4 ]
	[ "$output" = "uexportd: open $LOOP: Permission denied" ]
	not_mounted "$D/a/mnt"
}

@test "users: -w on an image the user can only read is refused; read-only works and stays so" {
	require_users
	# Readable by all, writable by root only; and the user's own image
	# with its write bits off.
	random_file "$D/root.img" 64K
	chmod 0644 "$D/root.img"
	user_image "$USER_A" "$D/a/img" 64K
	chmod 0444 "$D/a/img"
	cp "$D/root.img" "$D/root.ref"; cp "$D/a/img" "$D/a.ref"
	touch "$D/a/mnt"; own "$USER_A" "$D/a/mnt"
	for img in "$D/root.img" "$D/a/img"; do
		for opt in -w "-w -g" "-w --direct"; do
			run as "$USER_A" "$UEXPORTD" $(transport_opt) $opt "$img" "$D/a/mnt"
			[ "$status" = 4 ] || { echo "$img $opt: exit $status: $output"; false; }
			[ "$output" = "uexportd: open $img: Permission denied" ] ||
				{ echo "$img $opt: $output"; false; }
			not_mounted "$D/a/mnt"
		done
	done
	cmp "$D/root.img" "$D/root.ref"; cmp "$D/a/img" "$D/a.ref"
	# Without -w the same user exports it read-only: byte-exact, and no
	# route writes to it.
	require_cmd fusermount3
	user_start "$USER_A" "$D/root.img" "$D/a/mnt"
	[[ "$output" == *"(65536 bytes, ro)"* ]]
	as "$USER_A" cmp "$D/a/mnt" "$D/root.ref"
	# A read-only mount ("ro" in the mount table) and mode 0400: no
	# write, and the owner cannot give itself write permission.
	grep -q " $D/a/mnt fuse.uexportd ro," /proc/mounts
	[ "$(as "$USER_A" stat -c %a "$D/a/mnt")" = 400 ]
	run as "$USER_A" "$FSOPS" open-rw "$D/a/mnt"
	[ "$output" = "err EROFS" ]
	run as "$USER_A" "$FSOPS" truncate "$D/a/mnt" 0
	[ "$output" = "err EROFS" ]
	run as "$USER_A" chmod 0600 "$D/a/mnt"
	[ "$status" -ne 0 ]; [[ "$output" == *"Read-only file system"* ]]
	[ "$(as "$USER_A" stat -c %a "$D/a/mnt")" = 400 ]
	user_stop "$UPID" "$D/a/mnt"
	cmp "$D/root.img" "$D/root.ref"
}

@test "users: no mount over a file the user cannot write: fusermount3 refuses, clear error" {
	require_users
	require_cmd fusermount3
	user_image "$USER_A" "$D/a/img" 64K
	# Root's file, readable by all; user B's file; user A's own file with
	# its write bits off.
	touch "$D/root.mnt" "$D/b/mnt" "$D/a/ro.mnt"
	echo "root's file" > "$D/root.mnt"; chmod 0644 "$D/root.mnt"
	own "$USER_B" "$D/b/mnt"; chmod 0644 "$D/b/mnt"
	own "$USER_A" "$D/a/ro.mnt"; chmod 0444 "$D/a/ro.mnt"
	for mnt in "$D/root.mnt" "$D/b/mnt" "$D/a/ro.mnt"; do
		before=$(stat -c '%i %s %a %U %Y' "$mnt")
		for opt in "" --allow-other=off; do
			run as "$USER_A" "$UEXPORTD" $(transport_opt) $opt "$D/a/img" "$mnt"
			[ "$status" = 6 ] || { echo "$mnt $opt: exit $status: $output"; false; }
			# fusermount3's reason, in uexportd's one line.
			[ "$output" = "uexportd: mount on $mnt: failed to open $mnt: Permission denied" ] ||
				{ echo "$mnt $opt: $output"; false; }
			not_mounted "$mnt"
			[ "$(stat -c '%i %s %a %U %Y' "$mnt")" = "$before" ]
		done
	done
	[ "$(cat "$D/root.mnt")" = "root's file" ]
}

@test "users: another user reads an export only with --allow-other=on|auto and user_allow_other" {
	require_users
	require_cmd fusermount3
	user_image "$USER_A" "$D/a/img" 64K
	chmod 0644 "$D/a/img"	# B may read the image itself: only the export is in question
	cp "$D/a/img" "$D/ref"	# 0644: the users compare with it
	touch "$D/a/mnt"; own "$USER_A" "$D/a/mnt"

	# fuse.conf without user_allow_other: "on" is refused, "auto" falls
	# back without allow_other, "off" has none.
	fuse_conf_set off
	run as "$USER_A" "$UEXPORTD" $(transport_opt) --allow-other=on "$D/a/img" "$D/a/mnt"
	[ "$status" = 6 ]
	[ "$output" = "uexportd: mount on $D/a/mnt: option allow_other only allowed if 'user_allow_other' is set in /etc/fuse.conf" ]
	not_mounted "$D/a/mnt"
	for mode in auto off; do
		user_start "$USER_A" -w --allow-other=$mode "$D/a/img" "$D/a/mnt"
		[ -z "$(mount_opts "$D/a/mnt" | grep -x allow_other)" ]
		# -v says why auto went without it.
		if [ "$mode" = auto ]; then
			[[ "$output" == *"uexportd: --allow-other=auto: fusermount3 refused allow_other (option allow_other only allowed if 'user_allow_other' is set in /etc/fuse.conf): mounting without it, for this user only"* ]]
		fi
		# Writable (a read-only mount refuses chmod): the mode bits are
		# not what stops B.
		as "$USER_A" chmod 0644 "$D/a/mnt"
		as "$USER_A" cmp "$D/a/mnt" "$D/ref"
		run as "$USER_B" cat "$D/a/mnt"
		[ "$status" -ne 0 ]; [[ "$output" == *"Permission denied"* ]]
		run as "$USER_B" stat "$D/a/mnt"
		[ "$status" -ne 0 ]; [[ "$output" == *"Permission denied"* ]]
		user_stop "$UPID" "$D/a/mnt"
	done

	# With user_allow_other: "on" and "auto" let B read, "off" still not.
	fuse_conf_set on
	for mode in on auto off; do
		user_start "$USER_A" -w --allow-other=$mode "$D/a/img" "$D/a/mnt"
		as "$USER_A" chmod 0644 "$D/a/mnt"
		if [ "$mode" = off ]; then
			[ -z "$(mount_opts "$D/a/mnt" | grep -x allow_other)" ]
			run as "$USER_B" cat "$D/a/mnt"
			[ "$status" -ne 0 ]; [[ "$output" == *"Permission denied"* ]]
		else
			mount_opts "$D/a/mnt" | grep -qx allow_other
			as "$USER_B" cat "$D/a/mnt" | cmp - "$D/ref"
			# Still only what the mode allows: B may not write.
			run as "$USER_B" "$FSOPS" open-rw "$D/a/mnt"
			[ "$output" = "err EACCES" ] || [ "$output" = "err EROFS" ]
		fi
		# B cannot unmount A's export.
		run as "$USER_B" fusermount3 -u "$D/a/mnt"
		[ "$status" -ne 0 ]
		is_mounted "$D/a/mnt"
		user_stop "$UPID" "$D/a/mnt"
	done
	cmp "$D/a/img" "$D/ref"
}

@test "users: each user's export is mounted nosuid,nodev with its uid; its user unmounts it" {
	require_users
	require_cmd fusermount3
	user_image "$USER_A" "$D/a/img" 64K
	user_image "$USER_B" "$D/b/img" 64K
	touch "$D/a/mnt" "$D/b/mnt"
	own "$USER_A" "$D/a/mnt"; own "$USER_B" "$D/b/mnt"
	user_start "$USER_A" -w "$D/a/img" "$D/a/mnt"; pid_a=$UPID
	user_start "$USER_B" "$D/b/img" "$D/b/mnt"; pid_b=$UPID
	for u in a b; do
		user=uexportd-$u
		opts=$(mount_opts "$D/$u/mnt")
		echo "$u: $(echo $opts)"
		grep -qx nosuid <<<"$opts"
		grep -qx nodev <<<"$opts"
		grep -qx "user_id=$(id -u "$user")" <<<"$opts"
		grep -qx "group_id=$(id -g "$user")" <<<"$opts"
		# Without allow_other even root is kept out: the owner looks.
		[ "$(as "$user" stat -c %U "$D/$u/mnt")" = "$user" ]
		run stat "$D/$u/mnt"
		[ "$status" -ne 0 ]; [[ "$output" == *"Permission denied"* ]]
		as "$user" cmp "$D/$u/mnt" "$D/$u/img"
	done
	# A writes through its export.
	echo "from user a" | as "$USER_A" dd of="$D/a/mnt" conv=notrunc status=none
	[ "$(head -c 11 "$D/a/img")" = "from user a" ]
	# Each user takes its own export down with fusermount3 -u; the daemon
	# then exits by itself.
	as "$USER_A" fusermount3 -u "$D/a/mnt"
	wait_until 20 pid_gone "$pid_a"
	not_mounted "$D/a/mnt"
	[ ! -e "$D/a/uexportd.pid" ]
	as "$USER_B" fusermount3 -u "$D/b/mnt"
	wait_until 20 pid_gone "$pid_b"
	not_mounted "$D/b/mnt"
}

@test "root: a mount point that is a symbolic link is refused, its target left alone" {
	require_root
	random_file "$IMG" 64K
	random_file "$W/target" 4K
	cp "$W/target" "$W/target.ref"
	ln -s "$W/target" "$W/link"
	before=$(stat -c '%i %s %a %Y' "$W/target")
	for opt in "" -f -w; do
		run timeout -k 1 20 "$UEXPORTD" $(transport_opt) $opt -p "$PIDFILE" "$IMG" "$W/link"
		[ "$status" = 5 ] || { echo "$opt: exit $status: $output"; false; }
		[ "$output" = "uexportd: mount point $W/link: is a symbolic link" ] ||
			{ echo "$opt: $output"; false; }
		[ ! -e "$PIDFILE" ]
		[ -z "$(grep " $W/target \| $W/link " /proc/mounts)" ]
		[ "$(stat -c '%i %s %a %Y' "$W/target")" = "$before" ]
		cmp "$W/target" "$W/target.ref"
		[ "$(readlink "$W/link")" = "$W/target" ]
	done
	# A dangling link: refused the same way, nothing created at its target.
	ln -s "$W/nowhere" "$W/dangling"
	run timeout -k 1 20 "$UEXPORTD" $(transport_opt) -p "$PIDFILE" "$IMG" "$W/dangling"
	[ "$status" = 5 ]
	[ "$output" = "uexportd: mount point $W/dangling: is a symbolic link" ]
	[ ! -e "$W/nowhere" ]
	[ ! -e "$PIDFILE" ]
}

@test "users: the mount table names a user's image by its path, commas and backslashes too" {
	require_users
	require_cmd fusermount3
	local img="$D/a/x,y z\\q.img"
	user_image "$USER_A" "$img" 64K
	touch "$D/a/mnt"; own "$USER_A" "$D/a/mnt"
	user_start "$USER_A" "$img" "$D/a/mnt"
	# mountinfo: "... - fuse.uexportd SOURCE ...", octal escapes for space
	# and backslash.
	line=$(grep " $D/a/mnt " /proc/self/mountinfo)
	[[ "${line#* - }" == "fuse.uexportd $D/a/x,y\\040z\\134q.img "* ]] || { echo "$line"; false; }
	as "$USER_A" cmp "$D/a/mnt" "$img"
	user_stop "$UPID" "$D/a/mnt"
}
