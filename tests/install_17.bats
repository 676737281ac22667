#!/usr/bin/env bats
# Installed like a system tool: make install/uninstall, the man page, and
# --help and --version agreeing with it.  Nothing here mounts: each test
# runs once, in the dev-fuse pass.

load helpers

MAN=$TOP/uexportd.8

once() {
	[ "$UEXPORTD_TRANSPORT" = dev-fuse ] || skip "transport-independent: runs once, in the dev-fuse pass"
}

# make_in DESTDIR [VAR=VALUE...] TARGET: make in the tree, never rebuilding
# the binary other tests run (-o uexportd), with only the given variables
# (none from the environment, nor from a make check PREFIX=... above us).
make_in() {
	local dest=$1; shift
	env -u PREFIX -u SBINDIR -u MANDIR -u DESTDIR -u MAKEFLAGS -u MFLAGS -u MAKELEVEL \
		make -s -C "$TOP" -o uexportd DESTDIR="$dest" "$@"
}

# installed DESTDIR: every non-directory under DESTDIR, one path a line.
installed() { (cd "$1" && find . ! -type d | sed 's|^\.||' | LC_ALL=C sort); }

# help_options: the options --help text on stdin lists, one a line, sorted:
# the first column of each line starting with "-", cut at two spaces.
help_options() {
	sed -nE 's/^ +(-[^ ].*)$/\1/p' | sed -E 's/  .*//' |
		tr ' ,=[' '\n\n\n\n' | grep -E '^(-[A-Za-z]|--[a-z][a-z-]*)$' | sort -u
}

# man_options FILE: the options in the tags (the line after each .TP) of
# the OPTIONS section of man page FILE, one a line, sorted.
man_options() {
	awk '/^\.SH/ { in_opts = ($2 == "OPTIONS") } in_opts && tag { print } { tag = in_opts && /^\.TP/ }' "$1" |
		sed -E 's/\\-/-/g; s/\\f[BIRP]//g; s/\\%//g; s/^\.[A-Z]+ //' |
		tr ' ,="[' '\n\n\n\n\n' | grep -E '^(-[A-Za-z]|--[a-z][a-z-]*)$' | sort -u
}

# mount_o_words FILE: the text of the -o paragraph naming the long options
# (the .TP "a long option, by its name" up to the next .TP), de-escaped.
mount_o_words() {
	awk '/^\.TP/ { if (in_p) exit; take = 1; next } take { take = 0; in_p = /long option, by its name/ } in_p' "$1" |
		sed -E 's/\\-/-/g; s/\\f[BIRP]//g; s/\\%//g'
}

check_installed() {
	local D=$1 prefix=$2 sbin=$3 bin
	bin=$D$prefix/bin/uexportd
	diff <(LC_ALL=C sort <<-EOF
		$prefix/bin/uexportd
		$prefix/share/man/man8/uexportd.8
		$sbin/mount.fuse.uexportd
		$sbin/mount.uexportd
	EOF
	) <(installed "$D")
	# The binary: executable, stripped, and the one built here.
	[ "$(stat -c %a "$bin")" = 755 ]
	sections=$(readelf -SW "$bin")
	[[ "$sections" != *" .symtab "* && "$sections" != *" .debug_info "* ]] ||
		{ echo "$sections"; false; }
	if command -v file >/dev/null; then
		[[ "$(file -b "$bin")" == *", stripped"* ]] || { file "$bin"; false; }
	fi
	[ "$("$bin" --version)" = "$("$TOP/uexportd" --version)" ]
	# The man page as shipped.
	[ "$(stat -c %a "$D$prefix/share/man/man8/uexportd.8")" = 644 ]
	cmp "$MAN" "$D$prefix/share/man/man8/uexportd.8"
	# The helpers name the installed binary (absolute: it is where it will be).
	for h in mount.fuse.uexportd mount.uexportd; do
		[ -L "$D$sbin/$h" ]
		[ "$(readlink "$D$sbin/$h")" = "$prefix/bin/uexportd" ]
		[ "$D$(readlink "$D$sbin/$h")" -ef "$bin" ]
	done
}

@test "make install: stripped binary, man page and mount helpers, under PREFIX and DESTDIR" {
	once
	require_cmd make
	require_cmd readelf
	[ -x "$TOP/uexportd" ] || skip "uexportd not built (make)"
	make_in "$W/default" install
	check_installed "$W/default" /usr/local /sbin
	make_in "$W/usr" PREFIX=/usr install
	check_installed "$W/usr" /usr /sbin
	make_in "$W/opt" PREFIX=/opt/ue SBINDIR=/opt/ue/sbin install
	check_installed "$W/opt" /opt/ue /opt/ue/sbin
	# Again over an existing installation: same files, links replaced.
	make_in "$W/usr" PREFIX=/usr install
	check_installed "$W/usr" /usr /sbin
}

@test "make uninstall removes exactly what make install put there" {
	once
	require_cmd make
	[ -x "$TOP/uexportd" ] || skip "uexportd not built (make)"
	local D=$W/root
	# Someone else's files in the same directories stay.
	mkdir -p "$D/usr/bin" "$D/usr/share/man/man8" "$D/sbin"
	echo other > "$D/usr/bin/other"
	echo other > "$D/usr/share/man/man8/other.8"
	ln -s /usr/bin/other "$D/sbin/mount.other"
	before=$(installed "$D")
	make_in "$D" PREFIX=/usr install
	[ "$(installed "$D" | wc -l)" -eq 7 ]
	make_in "$D" PREFIX=/usr uninstall
	[ "$(installed "$D")" = "$before" ]
	# Nothing installed: uninstall succeeds and removes nothing.
	make_in "$D" PREFIX=/usr uninstall
	[ "$(installed "$D")" = "$before" ]
	make_in "$W/none" uninstall
	[ -z "$(installed "$W/none" 2>/dev/null)" ]
}

@test "the man page renders without warnings: groff -ww, man -l, mandoc -Tlint" {
	once
	# man(7) macros, every section the page promises, in order.
	run grep -n '^\.\(Dd\|Dt\|Sh\|Nm\)\b' "$MAN"
	[ "$status" -eq 1 ] || { echo "mdoc macros: $output"; false; }
	diff - <(sed -n 's/^\.SH "\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$MAN") <<-EOF
		NAME
		SYNOPSIS
		DESCRIPTION
		OPTIONS
		SEMANTICS
		EXIT STATUS
		SIGNALS
		FILES
		ENVIRONMENT
		EXAMPLES
		REQUIREMENTS
		SEE ALSO
	EOF
	local ver
	ver=$(sed -n 's/^#define UEXPORTD_VERSION[[:space:]]*"\(.*\)"$/\1/p' "$TOP/uexportd.c")
	grep -q "^\.TH UEXPORTD 8 [0-9-]* \"uexportd $ver\"" "$MAN"
	require_cmd groff
	run groff -man -Tutf8 -ww -z "$MAN"
	[ "$status" -eq 0 ] && [ -z "$output" ] || { echo "$output"; false; }
	if command -v man >/dev/null; then
		warnings=$(MANWIDTH=80 MANPAGER=cat man --warnings -l "$MAN" 2>&1 >"$W/page")
		[ -z "$warnings" ] || { echo "$warnings"; false; }
		grep -q '^OPTIONS' "$W/page"
		grep -q 'uexportd.*export a raw disk image' "$W/page"
	fi
	if command -v mandoc >/dev/null; then
		run mandoc -Tlint "$MAN"
		[ "$status" -eq 0 ] && [ -z "$output" ] || { echo "$output"; false; }
	fi
}

@test "--help lists exactly the options of the man page's OPTIONS section" {
	once
	"$UEXPORTD" --help > "$W/help"
	help_options < "$W/help" > "$W/help.opts"
	man_options "$MAN" > "$W/man.opts"
	diff "$W/help.opts" "$W/man.opts"
	# The parsers find every option, so a missing one shows.
	grep -qx -- --writable "$W/help.opts"
	grep -qx -- --notify-fd "$W/help.opts"
	grep -qx -- -o "$W/help.opts"
	[ "$(grep -c -- '^--' "$W/help.opts")" -ge 15 ]
	grep -v -- --direct "$W/help" | help_options > "$W/help-short.opts"
	run diff "$W/help-short.opts" "$W/man.opts"
	[ "$status" -eq 1 ]
	grep -v '^\.B \\-\\-direct$' "$MAN" > "$W/short.8"
	run diff "$W/help.opts" <(man_options "$W/short.8")
	[ "$status" -eq 1 ]
	# Inside -o, every long option but --help and --version goes by its name.
	mount_o_words "$MAN" > "$W/o.txt"
	grep -q writable "$W/o.txt"
	for opt in $(grep -- '^--' "$W/help.opts"); do
		case $opt in --help|--version) continue ;; esac
		grep -qE "(^|[ (])${opt#--}( |=|,|\)|$)" "$W/o.txt" ||
			{ echo "-o does not name $opt"; false; }
	done
}

@test "--help fits one screen: at most 24 lines of at most 80 columns, plain ASCII" {
	once
	run "$UEXPORTD" --help
	[ "$status" -eq 0 ]
	"$UEXPORTD" --help > "$W/help"
	[ "$(wc -l < "$W/help")" -le 24 ] || { wc -l "$W/help"; false; }
	LC_ALL=C awk 'length > 80 { print FNR": "length": "$0; bad = 1 } END { exit bad }' "$W/help"
	run env LC_ALL=C grep -n '[^ -~]' "$W/help"
	[ "$status" -eq 1 ] || { echo "not plain ASCII: $output"; false; }
}

@test "--version: the version, the FUSE protocol of fuse_kernel.h, the transports" {
	once
	local ver major minor
	ver=$(sed -n 's/^#define UEXPORTD_VERSION[[:space:]]*"\(.*\)"$/\1/p' "$TOP/uexportd.c")
	major=$(awk '$1 == "#define" && $2 == "FUSE_KERNEL_VERSION" { print $3 }' "$TOP/fuse_kernel.h")
	minor=$(awk '$1 == "#define" && $2 == "FUSE_KERNEL_MINOR_VERSION" { print $3 }' "$TOP/fuse_kernel.h")
	[ -n "$ver" ] && [ -n "$major" ] && [ -n "$minor" ]
	run "$UEXPORTD" --version
	[ "$status" -eq 0 ]
	[ "${lines[0]}" = "uexportd $ver" ]
	[ "${lines[1]}" = "FUSE protocol $major.$minor" ]
	[[ "${lines[2]}" == "transports: "*io_uring* ]]
	[[ "${lines[2]}" == "transports: "*/dev/fuse* ]]
	[ "$("$UEXPORTD" -V)" = "$output" ]
}
