// SPDX-License-Identifier: BSD-2-Clause
/*
 * faultfs: a failing disk for the uexportd tests.
 *
 *   faultfs BACKING MOUNTFILE CONTROL     (root; MOUNTFILE an existing file)
 *
 * It mounts one regular file on MOUNTFILE and serves it from BACKING (a
 * regular file), failing the requests CONTROL names.  CONTROL is re-read
 * before a request whenever its inode, size or mtime changed, so a test
 * changes the faults between two requests by replacing it:
 *
 *   printf 'read-eio 1048576 65536\n' > ctl.new && mv ctl.new ctl
 *
 * One rule a line; blank lines and lines starting with '#' are ignored; a
 * missing or empty CONTROL fails nothing.  OFF and LEN are bytes (C
 * notation: 4096, 0x1000).  A request fails whole when it overlaps a range
 * (nothing of it is read or written), never partly:
 *
 *   read-eio OFF LEN       READ overlapping [OFF, OFF + LEN): EIO
 *   write-eio OFF LEN      WRITE or FALLOCATE overlapping it: EIO
 *   write-enospc OFF LEN   WRITE or FALLOCATE overlapping it: ENOSPC
 *   fsync-eio              FSYNC (fsync and fdatasync): EIO
 *   all-eio                READ, WRITE, FALLOCATE, FSYNC: EIO (GETATTR,
 *                          OPEN and the rest keep working, as a dead disk's
 *                          inode does)
 *   clear                  no effect: the file as a whole replaces the rules
 *
 * A malformed CONTROL is fatal (a typo must not pass as "no faults"): the
 * mount is detached and faultfs exits 1.  Every failed request is logged on
 * stderr as "faultfs: READ 4096 at 8192: EIO" (WRITE, FALLOCATE, FSYNC),
 * so a test can count what the layer above really sent.
 *
 * OPEN is answered with FOPEN_DIRECT_IO: every read and write of the file,
 * buffered or O_DIRECT (open(2) with O_DIRECT works on any FUSE file), is a
 * request here, synchronously, with the caller's offset and length (split
 * at 1 MiB).  Nothing is cached, so an error reaches the caller of that
 * very read or write.  One thread serves all requests in order; attributes
 * are never cached (the size follows BACKING).  SIGTERM or SIGINT detaches
 * the mount; faultfs exits 0 when the kernel ends the connection.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>
#include "../fuse_kernel.h"

#define MAX_WRITE	(1u << 20)
#define MAX_RULES	64

#ifndef RWF_DSYNC
#define RWF_DSYNC	0x02
#endif

enum rule_kind { READ_EIO, WRITE_EIO, WRITE_ENOSPC };

struct rule {
	enum rule_kind kind;
	uint64_t off, len;
};

static struct {
	struct rule r[MAX_RULES];
	unsigned n;
	bool fsync_eio, all_eio;
	/* What CONTROL was when last read: reload on any change. */
	bool present;
	ino_t ino;
	off_t size;
	struct timespec mtime;
} rules;

static const char *mountfile, *control;
static int fuse_fd = -1, backing_fd = -1;
static volatile sig_atomic_t mounted;

static void die(const char *what, int err)
{
	fprintf(stderr, "faultfs: %s: %s\n", what, strerror(err));
	if (mounted)
		umount2(mountfile, MNT_DETACH);
	exit(1);
}

static void on_signal(int sig)
{
	(void)sig;
	if (mounted)
		umount2(mountfile, MNT_DETACH);
	else
		_exit(1);
}

/* ---- rules ---- */

static bool parse_u64(const char *s, uint64_t *out)
{
	char *end;

	if (!s || *s == '-')
		return false;
	errno = 0;
	*out = strtoull(s, &end, 0);
	return !errno && end != s && !*end;
}

/* Parse one line into 'rules'; false if malformed. */
static bool parse_rule(char *line)
{
	char *save, *word = strtok_r(line, " \t", &save);
	char *a = strtok_r(NULL, " \t", &save), *b = strtok_r(NULL, " \t", &save);
	struct rule r;

	if (!word || *word == '#')
		return true;
	if (strtok_r(NULL, " \t", &save))
		return false;
	if (!strcmp(word, "clear"))
		return !a;
	if (!strcmp(word, "fsync-eio") || !strcmp(word, "all-eio")) {
		if (a)
			return false;
		if (word[0] == 'f')
			rules.fsync_eio = true;
		else
			rules.all_eio = true;
		return true;
	}
	if (!strcmp(word, "read-eio"))
		r.kind = READ_EIO;
	else if (!strcmp(word, "write-eio"))
		r.kind = WRITE_EIO;
	else if (!strcmp(word, "write-enospc"))
		r.kind = WRITE_ENOSPC;
	else
		return false;
	if (!parse_u64(a, &r.off) || !parse_u64(b, &r.len) || r.len == 0 ||
	    r.off + r.len < r.off || rules.n == MAX_RULES)
		return false;
	rules.r[rules.n++] = r;
	return true;
}

/* Re-read CONTROL if it changed since last time. */
static void rules_refresh(void)
{
	struct stat st;
	char line[256];
	unsigned lineno = 0;
	FILE *f;

	if (stat(control, &st) < 0) {
		if (errno != ENOENT)
			die(control, errno);
		if (rules.present)
			fprintf(stderr, "faultfs: %s gone: no faults\n", control);
		memset(&rules, 0, sizeof(rules));
		return;
	}
	if (rules.present && st.st_ino == rules.ino && st.st_size == rules.size &&
	    st.st_mtim.tv_sec == rules.mtime.tv_sec && st.st_mtim.tv_nsec == rules.mtime.tv_nsec)
		return;
	memset(&rules, 0, sizeof(rules));
	f = fopen(control, "r");
	if (!f)
		die(control, errno);
	while (fgets(line, sizeof(line), f)) {
		lineno++;
		line[strcspn(line, "\n")] = 0;
		if (!parse_rule(line)) {
			fprintf(stderr, "faultfs: %s:%u: bad rule\n", control, lineno);
			die("malformed control file", EINVAL);
		}
	}
	fclose(f);
	/* The stat before the read: a change during it is seen next time. */
	rules.present = true;
	rules.ino = st.st_ino;
	rules.size = st.st_size;
	rules.mtime = st.st_mtim;
	fprintf(stderr, "faultfs: %u range rules%s%s\n", rules.n,
		rules.fsync_eio ? ", fsync-eio" : "", rules.all_eio ? ", all-eio" : "");
}

/* The error a READ (write false) or WRITE/FALLOCATE of [off, off + len) gets. */
static int rules_check(bool write, uint64_t off, uint64_t len)
{
	if (rules.all_eio)
		return -EIO;
	for (unsigned i = 0; i < rules.n; i++) {
		const struct rule *r = &rules.r[i];

		if ((r->kind == READ_EIO) == write)
			continue;
		if (off < r->off + r->len && r->off < off + len)
			return r->kind == WRITE_ENOSPC ? -ENOSPC : -EIO;
	}
	return 0;
}

/* Log a request failed on purpose; returns 'err'. */
static int fail(const char *op, uint64_t off, uint64_t len, int err)
{
	fprintf(stderr, "faultfs: %s %llu at %llu: %s\n", op, (unsigned long long)len,
		(unsigned long long)off, strerrorname_np(-err));
	return err;
}

/* ---- requests ---- */

static size_t fill_attr(struct fuse_attr_out *o, int *err)
{
	struct stat st;

	memset(o, 0, sizeof(*o));
	if (fstat(backing_fd, &st) < 0) {
		*err = -errno;
		return 0;
	}
	o->attr.ino = FUSE_ROOT_ID;
	o->attr.size = (uint64_t)st.st_size;
	o->attr.blocks = (uint64_t)st.st_blocks;
	o->attr.atime = (uint64_t)st.st_atim.tv_sec;
	o->attr.atimensec = (uint32_t)st.st_atim.tv_nsec;
	o->attr.mtime = (uint64_t)st.st_mtim.tv_sec;
	o->attr.mtimensec = (uint32_t)st.st_mtim.tv_nsec;
	o->attr.ctime = (uint64_t)st.st_ctim.tv_sec;
	o->attr.ctimensec = (uint32_t)st.st_ctim.tv_nsec;
	o->attr.mode = S_IFREG | 0600;
	o->attr.nlink = 1;
	o->attr.uid = getuid();
	o->attr.gid = getgid();
	o->attr.blksize = 4096;
	return sizeof(*o);			/* attr_valid 0: never cached */
}

static size_t do_setattr(const struct fuse_setattr_in *in, void *out, int *err)
{
	struct timespec ts[2] = { { .tv_nsec = UTIME_OMIT }, { .tv_nsec = UTIME_OMIT } };

	if (in->valid & FATTR_SIZE) {
		if (rules.all_eio) {
			*err = fail("TRUNCATE", in->size, 0, -EIO);
			return 0;
		}
		if (ftruncate(backing_fd, (off_t)in->size) < 0) {
			*err = -errno;
			return 0;
		}
	}
	if (in->valid & FATTR_ATIME)
		ts[0] = (struct timespec){ (time_t)in->atime, in->atimensec };
	if (in->valid & FATTR_MTIME)
		ts[1] = (struct timespec){ (time_t)in->mtime, in->mtimensec };
	if (in->valid & FATTR_ATIME_NOW)
		ts[0].tv_nsec = UTIME_NOW;
	if (in->valid & FATTR_MTIME_NOW)
		ts[1].tv_nsec = UTIME_NOW;
	if ((ts[0].tv_nsec != UTIME_OMIT || ts[1].tv_nsec != UTIME_OMIT) &&
	    futimens(backing_fd, ts) < 0) {
		*err = -errno;
		return 0;
	}
	return fill_attr(out, err);		/* mode, uid, gid: fixed */
}

static size_t do_read(const struct fuse_read_in *in, void *out, int *err)
{
	size_t done = 0;

	if (in->size > MAX_WRITE) {		/* max_pages bounds it: never */
		*err = -EINVAL;
		return 0;
	}
	if ((*err = rules_check(false, in->offset, in->size)))
		return fail("READ", in->offset, in->size, *err), 0;
	while (done < in->size) {
		ssize_t n = pread(backing_fd, (char *)out + done, in->size - done,
				  (off_t)(in->offset + done));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			*err = -errno;
			return 0;
		}
		if (n == 0)
			break;			/* EOF: a short reply */
		done += (size_t)n;
	}
	return done;
}

static size_t do_write(const struct fuse_write_in *in, const char *data, void *out, int *err)
{
	struct fuse_write_out *o = memset(out, 0, sizeof(struct fuse_write_out));
	int rwf = in->flags & O_DSYNC ? RWF_DSYNC : 0;	/* O_SYNC includes the bit */
	size_t done = 0;

	if ((*err = rules_check(true, in->offset, in->size)))
		return fail("WRITE", in->offset, in->size, *err), 0;
	while (done < in->size) {
		struct iovec iov = { (char *)data + done, in->size - done };
		ssize_t n = pwritev2(backing_fd, &iov, 1, (off_t)(in->offset + done), rwf);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && !done) {
			*err = -errno;
			return 0;
		}
		if (n <= 0)
			break;
		done += (size_t)n;
	}
	o->size = (uint32_t)done;
	return sizeof(*o);
}

static void do_fsync(const struct fuse_fsync_in *in, int *err)
{
	bool data = in->fsync_flags & FUSE_FSYNC_FDATASYNC;

	if (rules.fsync_eio || rules.all_eio) {
		fprintf(stderr, "faultfs: FSYNC%s: EIO\n", data ? " (fdatasync)" : "");
		*err = -EIO;
	} else if ((data ? fdatasync(backing_fd) : fsync(backing_fd)) < 0) {
		*err = -errno;
	}
}

static void do_fallocate(const struct fuse_fallocate_in *in, int *err)
{
	if ((*err = rules_check(true, in->offset, in->length)))
		fail("FALLOCATE", in->offset, in->length, *err);
	else if (fallocate(backing_fd, (int)in->mode, (off_t)in->offset, (off_t)in->length) < 0)
		*err = -errno;
}

static size_t do_lseek(const struct fuse_lseek_in *in, void *out, int *err)
{
	struct fuse_lseek_out *o = out;
	off_t r = lseek(backing_fd, (off_t)in->offset, (int)in->whence);

	if (r < 0) {
		*err = -errno;
		return 0;
	}
	o->offset = (uint64_t)r;
	return sizeof(*o);
}

static size_t do_statfs(void *out, int *err)
{
	struct fuse_statfs_out *o = memset(out, 0, sizeof(struct fuse_statfs_out));
	struct statvfs sv;

	if (fstatvfs(backing_fd, &sv) < 0) {
		*err = -errno;
		return 0;
	}
	o->st.blocks = sv.f_blocks;
	o->st.bfree = sv.f_bfree;
	o->st.bavail = sv.f_bavail;
	o->st.files = sv.f_files;
	o->st.ffree = sv.f_ffree;
	o->st.bsize = (uint32_t)sv.f_bsize;
	o->st.frsize = (uint32_t)sv.f_frsize;
	o->st.namelen = (uint32_t)sv.f_namemax;
	return sizeof(*o);
}

static size_t do_init(const struct fuse_init_in *in, void *out)
{
	struct fuse_init_out *o = memset(out, 0, sizeof(struct fuse_init_out));

	o->major = FUSE_KERNEL_VERSION;
	o->minor = FUSE_KERNEL_MINOR_VERSION;
	o->max_readahead = in->max_readahead;
	o->flags = (uint32_t)(FUSE_BIG_WRITES | FUSE_MAX_PAGES);
	o->max_write = MAX_WRITE;
	o->max_pages = MAX_WRITE / 4096;
	o->max_background = 16;
	o->congestion_threshold = 12;
	o->time_gran = 1;
	return sizeof(*o);
}

/* Answer one request: the reply's payload length, its error in *err. */
static size_t answer(const struct fuse_in_header *in, const void *arg, void *out, int *err)
{
	*err = 0;
	if (in->opcode != FUSE_INIT)
		rules_refresh();
	switch (in->opcode) {
	case FUSE_INIT:
		return do_init(arg, out);
	case FUSE_GETATTR:
		return fill_attr(out, err);
	case FUSE_SETATTR:
		return do_setattr(arg, out, err);
	case FUSE_OPEN: {
		struct fuse_open_out *o = memset(out, 0, sizeof(struct fuse_open_out));

		o->open_flags = FOPEN_DIRECT_IO;
		return sizeof(*o);
	}
	case FUSE_READ:
		return do_read(arg, out, err);
	case FUSE_WRITE:
		return do_write(arg, (const char *)arg + sizeof(struct fuse_write_in), out, err);
	case FUSE_FSYNC:
		do_fsync(arg, err);
		return 0;
	case FUSE_FALLOCATE:
		do_fallocate(arg, err);
		return 0;
	case FUSE_LSEEK:
		return do_lseek(arg, out, err);
	case FUSE_STATFS:
		return do_statfs(out, err);
	case FUSE_FLUSH:
	case FUSE_RELEASE:
	case FUSE_DESTROY:
		return 0;
	default:
		*err = -ENOSYS;
		return 0;
	}
}

int main(int argc, char **argv)
{
	static char in_buf[MAX_WRITE + 4096], out_buf[MAX_WRITE + 4096];
	struct sigaction sa = { .sa_handler = on_signal };
	struct stat st;
	char opts[128];

	if (argc != 4) {
		fprintf(stderr, "usage: faultfs BACKING MOUNTFILE CONTROL (see tests/faultfs.c)\n");
		return 2;
	}
	mountfile = argv[2];
	control = argv[3];
	backing_fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (backing_fd < 0)
		die(argv[1], errno);
	if (fstat(backing_fd, &st) < 0 || !S_ISREG(st.st_mode))
		die(argv[1], EINVAL);
	rules_refresh();
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	if (fuse_fd < 0)
		die("/dev/fuse", errno);
	snprintf(opts, sizeof(opts), "fd=%d,rootmode=100000,user_id=%u,group_id=%u", fuse_fd,
		 getuid(), getgid());
	if (mount("faultfs", mountfile, "fuse.faultfs", MS_NOSUID | MS_NODEV, opts) < 0)
		die(mountfile, errno);
	mounted = 1;
	for (;;) {
		ssize_t r = read(fuse_fd, in_buf, sizeof(in_buf));
		const struct fuse_in_header *in = (const void *)in_buf;
		struct fuse_out_header *out = (void *)out_buf;
		size_t n;
		int err;

		if (r < 0 && (errno == EINTR || errno == ENOENT))
			continue;		/* a signal; an interrupted request */
		if (r < 0 && errno == ENODEV)
			return 0;		/* unmounted */
		if (r < 0)
			die("read /dev/fuse", errno);
		if ((size_t)r < sizeof(*in))
			die("short request", EINVAL);
		if (in->opcode == FUSE_FORGET || in->opcode == FUSE_BATCH_FORGET ||
		    in->opcode == FUSE_INTERRUPT)
			continue;	/* no reply; we finish every request at once */
		n = answer(in, in + 1, out + 1, &err);
		*out = (struct fuse_out_header){ .len = (uint32_t)(sizeof(*out) + n), .error = err,
						 .unique = in->unique };
		if (write(fuse_fd, out, out->len) < 0 && errno != ENOENT)
			die("write /dev/fuse", errno);
	}
}
