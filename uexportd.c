// SPDX-License-Identifier: BSD-2-Clause
/*
 * uexportd - export a raw disk image as one regular file through FUSE.
 *
 * The image (a regular file, a block device, or the "null:SIZE" test backend)
 * appears at MOUNTPOINT, itself an existing regular file the export is mounted
 * on top of, byte for byte.  Requests are answered by transport-independent
 * handlers; the transports only move bytes between the kernel and them:
 *
 *   - FUSE-over-io_uring (Linux 6.14+, fuse.enable_uring=Y): one ring and one
 *     pinned thread per possible CPU, image I/O submitted to the same ring;
 *   - classic /dev/fuse read()/write(): one pinned thread per CPU, each with
 *     its own cloned device fd where the kernel allows it.
 *
 * With --passthrough the kernel does READ/WRITE on a regular-file image
 * itself and only metadata reaches the daemon.
 *
 * Only libc and kernel uapi headers are used; the FUSE wire structures come
 * from our own fuse_kernel.h.  Sections, bottom-up:
 *
 *   platform wrappers -> io_uring rings -> types -> FUSE request handlers ->
 *   image backend -> /dev/fuse transport -> io_uring transport ->
 *   mount/unmount -> lifecycle -> options and main
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <stddef.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <linux/io_uring.h>

#include "fuse_kernel.h"

#define UEXPORTD_VERSION	"0.1"

/* Kernel uapi values not every libc exports (linux/fs.h, linux/falloc.h). */
#ifndef BLKGETSIZE64
#define BLKGETSIZE64		_IOR(0x12, 114, size_t)
#endif
#ifndef BLKSSZGET
#define BLKSSZGET		_IO(0x12, 104)
#endif
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE	0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE	0x02
#endif
#ifndef FALLOC_FL_ZERO_RANGE
#define FALLOC_FL_ZERO_RANGE	0x10
#endif
#ifndef TMPFS_MAGIC
#define TMPFS_MAGIC		0x01021994
#endif
#ifndef FUSE_SUPER_MAGIC
#define FUSE_SUPER_MAGIC	0x65735546
#endif
#ifndef RAMFS_MAGIC
#define RAMFS_MAGIC		0x858458f6
#endif
#ifndef SEEK_DATA
#define SEEK_DATA		3
#define SEEK_HOLE		4
#endif

#define MAX_PAYLOAD		(1u << 20)	/* largest READ/WRITE we negotiate */
#define MIN_PAYLOAD		(128u << 10)	/* smallest a memory budget may force */
#define MAX_QUEUE_DEPTH		1024
#define DEFAULT_QUEUE_DEPTH	64
#define DEFAULT_MAX_MEMORY	(256ull << 20)	/* payload buffers, all queues */
#define RING_READY_TIMEOUT_MS	10000
#define SHUTDOWN_GRACE_MS	3000	/* clients still holding the file */

_Static_assert(sizeof(struct fuse_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct fuse_out_header) == 16, "fuse_out_header");
_Static_assert(sizeof(struct fuse_init_in) == 64, "fuse_init_in");
_Static_assert(sizeof(struct fuse_init_out) == 64, "fuse_init_out");
_Static_assert(sizeof(struct fuse_attr_out) == 104, "fuse_attr_out");
_Static_assert(sizeof(struct fuse_setattr_in) == 88, "fuse_setattr_in");
_Static_assert(sizeof(struct fuse_read_in) == 40, "fuse_read_in");
_Static_assert(sizeof(struct fuse_write_in) == 40, "fuse_write_in");
_Static_assert(sizeof(struct fuse_kstatfs) == 80, "fuse_kstatfs");
_Static_assert(sizeof(struct fuse_fallocate_in) == 32, "fuse_fallocate_in");
_Static_assert(sizeof(struct fuse_lseek_in) == 24, "fuse_lseek_in");

/* ======================================================================
 * Platform: logging, small syscall helpers, parsing
 *
 * Everything below returns -errno on failure; only the boundary (main, a
 * thread's top level) logs, once, with context.
 * ====================================================================== */

static bool log_syslog;		/* stderr is gone once daemonized */
static bool log_verbose;
static bool log_debug;

static void log_vmsg(int prio, const char *fmt, va_list ap)
{
	char line[512];

	vsnprintf(line, sizeof(line), fmt, ap);
	if (log_syslog)
		syslog(prio, "%s", line);
	else
		fprintf(stderr, "uexportd: %s\n", line);
}

static void __attribute__((format(printf, 1, 2))) log_err(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_vmsg(LOG_ERR, fmt, ap);
	va_end(ap);
}

static void __attribute__((format(printf, 1, 2))) log_info(const char *fmt, ...)
{
	va_list ap;

	if (!log_verbose)
		return;
	va_start(ap, fmt);
	log_vmsg(LOG_INFO, fmt, ap);
	va_end(ap);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

#ifndef RWF_DSYNC
#define RWF_DSYNC	0x00000002
#endif
#ifndef RWF_SYNC
#define RWF_SYNC	0x00000004
#endif
#ifndef RWF_NOWAIT
#define RWF_NOWAIT	0x00000008
#endif

/* preadv2/pwritev2 by raw syscall (musl 1.2.3 has no wrappers), so a write
 * can carry RWF_DSYNC/RWF_SYNC/RWF_NOWAIT.  The offset travels as two
 * longs; on 64-bit the high one is 0.  Returns bytes moved or -errno. */
static ssize_t sys_rw2(bool write, int fd, const struct iovec *iov, uint64_t off, int rwf)
{
	unsigned long lo = (unsigned long)off;
	unsigned long hi = (unsigned long)((off >> 16) >> (sizeof(long) * 8 - 16));
	long n = syscall(write ? SYS_pwritev2 : SYS_preadv2, fd, iov, 1, lo, hi, rwf);

	return n < 0 ? -errno : n;
}

/* Full pread/pwrite of 'len' bytes at byte offset 'off': a regular file may
 * return short counts before EOF.  'rwf' (RWF_DSYNC, RWF_SYNC) applies to
 * every piece.  Returns the bytes moved (short only at EOF for reads), or
 * -errno when nothing was. */
static ssize_t rw_full(bool write, int fd, void *buf, size_t len, uint64_t off, int rwf)
{
	size_t done = 0;

	while (done < len) {
		struct iovec iov = { (char *)buf + done, len - done };
		ssize_t n = sys_rw2(write, fd, &iov, off + done, rwf);

		if (n == -EINTR)
			continue;
		if (n < 0)
			return done ? (ssize_t)done : n;
		if (n == 0)
			break;
		done += (size_t)n;
	}
	return (ssize_t)done;
}

/* flock(LOCK_EX), waiting until 'deadline' (now_ns()) for the holder to
 * let go.  Returns 0, -EWOULDBLOCK if still held then, or -errno. */
static int flock_until(int fd, uint64_t deadline)
{
	while (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		int err = errno;

		if (err != EWOULDBLOCK || now_ns() > deadline)
			return -err;
		sleep_ms(20);
	}
	return 0;
}

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = write(fd, text, strlen(text));
	n = n < 0 ? -errno : 0;
	close(fd);
	return (int)n;
}

static int read_small_file(const char *path, char *buf, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = read(fd, buf, cap - 1);
	close(fd);
	if (n < 0)
		return -errno;
	buf[n] = '\0';
	return (int)n;
}

/* Anonymous memory, faulted in on first touch: payload buffers cost RSS only
 * when a request that large actually arrives. */
static void *buffer_alloc(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

static size_t page_size(void)
{
	static size_t ps;

	if (!ps)
		ps = (size_t)sysconf(_SC_PAGESIZE);
	return ps;
}

static size_t round_up(size_t v, size_t to)
{
	return (v + to - 1) / to * to;
}

/* "4096", "64K", "1G": binary suffixes K M G T.  Rejects overflow. */
static int parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	int shift = 0;

	if (!isdigit((unsigned char)*s))
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno)
		return -EINVAL;
	switch (toupper((unsigned char)*end)) {
	case 'K': shift = 10; end++; break;
	case 'M': shift = 20; end++; break;
	case 'G': shift = 30; end++; break;
	case 'T': shift = 40; end++; break;
	}
	if (*end || v > ((uint64_t)INT64_MAX >> shift))
		return -EINVAL;
	*out = (uint64_t)v << shift;
	return 0;
}

/* ======================================================================
 * io_uring rings, by raw syscalls
 *
 * Memory ordering on the shared ring indices (the kernel is the other side):
 *   - SQ tail: we write it with a release store after the SQE is complete,
 *     so the kernel never sees a half-written SQE;
 *   - SQ head: the kernel's; we only compare against it, relaxed;
 *   - CQ tail: the kernel's; an acquire load orders it before reading CQEs;
 *   - CQ head: ours; a release store after we are done with the CQEs hands
 *     their slots back.
 * Each ring is used by exactly one thread (SINGLE_ISSUER when granted).
 * ====================================================================== */

#ifndef IORING_SETUP_NO_SQARRAY
#define IORING_SETUP_NO_SQARRAY	(1U << 16)
#endif

static int sys_io_uring_setup(unsigned entries, struct io_uring_params *p)
{
	long r = syscall(__NR_io_uring_setup, entries, p);

	return r < 0 ? -errno : (int)r;
}

static int sys_io_uring_enter(int fd, unsigned submit, unsigned wait, unsigned flags)
{
	long r = syscall(__NR_io_uring_enter, fd, submit, wait, flags, NULL, 0);

	return r < 0 ? -errno : (int)r;
}

static int sys_io_uring_register(int fd, unsigned op, const void *arg, unsigned n)
{
	long r = syscall(__NR_io_uring_register, fd, op, arg, n);

	return r < 0 ? -errno : (int)r;
}

struct ring {
	int fd;
	unsigned flags;			/* IORING_SETUP_* granted */
	unsigned sq_entries, sq_mask, cq_mask;
	_Atomic unsigned *sq_head, *sq_tail, *sq_flags, *cq_head, *cq_tail;
	struct io_uring_cqe *cqes;
	char *sqes;			/* 128-byte slots (SQE128) */
	unsigned sq_local_tail;		/* SQEs written, not yet published */
	void *map;			/* SQ+CQ rings, one mapping */
	size_t map_len, sqes_len;
};

#define RING_SQE_SIZE	128

/* Optional setup flags, dropped one at a time (last first) on EINVAL. */
static const unsigned ring_optional_flags[] = {
	IORING_SETUP_CQSIZE, IORING_SETUP_SUBMIT_ALL, IORING_SETUP_COOP_TASKRUN,
	IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
	IORING_SETUP_NO_SQARRAY,
};
#define RING_NR_OPTIONAL (sizeof(ring_optional_flags) / sizeof(ring_optional_flags[0]))

static int ring_create(unsigned entries, struct io_uring_params *p)
{
	unsigned n = RING_NR_OPTIONAL;
	int fd;

	do {
		unsigned flags = IORING_SETUP_SQE128;	/* FUSE commands need it */

		for (unsigned i = 0; i < n; i++)
			flags |= ring_optional_flags[i];
		/* COOP_TASKRUN and DEFER_TASKRUN are exclusive: prefer DEFER. */
		if (flags & IORING_SETUP_DEFER_TASKRUN)
			flags &= ~IORING_SETUP_COOP_TASKRUN;
		memset(p, 0, sizeof(*p));
		p->flags = flags;
		p->cq_entries = entries * 2;
		fd = sys_io_uring_setup(entries, p);
	} while (fd == -EINVAL && n-- > 0);
	return fd;
}

static int ring_init(struct ring *r, unsigned entries)
{
	struct io_uring_params p;
	size_t sq_len, cq_len;
	char *base;

	memset(r, 0, sizeof(*r));
	r->fd = ring_create(entries, &p);
	if (r->fd < 0)
		return r->fd;
	r->flags = p.flags;
	if (!(p.features & IORING_FEAT_SINGLE_MMAP)) {
		close(r->fd);
		return -EOPNOTSUPP;	/* 5.4+; every FUSE-uring kernel has it */
	}
	cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	sq_len = (p.flags & IORING_SETUP_NO_SQARRAY) ? 0 :
		 p.sq_off.array + p.sq_entries * sizeof(unsigned);
	r->map_len = sq_len > cq_len ? sq_len : cq_len;
	r->map = mmap(NULL, r->map_len, PROT_READ | PROT_WRITE,
		      MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
	r->sqes_len = p.sq_entries * RING_SQE_SIZE;
	r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
	if (r->map == MAP_FAILED || r->sqes == MAP_FAILED) {
		int err = -errno;

		if (r->map != MAP_FAILED)
			munmap(r->map, r->map_len);
		close(r->fd);
		return err;
	}
	base = r->map;
	r->sq_head = (void *)(base + p.sq_off.head);
	r->sq_tail = (void *)(base + p.sq_off.tail);
	r->sq_flags = (void *)(base + p.sq_off.flags);
	r->sq_mask = *(unsigned *)(base + p.sq_off.ring_mask);
	r->sq_entries = p.sq_entries;
	r->cq_head = (void *)(base + p.cq_off.head);
	r->cq_tail = (void *)(base + p.cq_off.tail);
	r->cq_mask = *(unsigned *)(base + p.cq_off.ring_mask);
	r->cqes = (void *)(base + p.cq_off.cqes);
	if (!(p.flags & IORING_SETUP_NO_SQARRAY)) {
		unsigned *array = (void *)(base + p.sq_off.array);

		for (unsigned i = 0; i < p.sq_entries; i++)
			array[i] = i;	/* identity: slot i is SQE i */
	}
	r->sq_local_tail = atomic_load_explicit(r->sq_tail, memory_order_relaxed);
	return 0;
}

static void ring_exit(struct ring *r)
{
	munmap(r->sqes, r->sqes_len);
	munmap(r->map, r->map_len);
	close(r->fd);
}

/* Next free SQE, zeroed.  Callers keep at most sq_entries SQEs outstanding,
 * so this cannot run out (see ring_queue for the counting argument). */
static struct io_uring_sqe *ring_sqe(struct ring *r)
{
	struct io_uring_sqe *sqe =
		(void *)(r->sqes + (size_t)(r->sq_local_tail & r->sq_mask) * RING_SQE_SIZE);

	r->sq_local_tail++;
	memset(sqe, 0, RING_SQE_SIZE);
	return sqe;
}

/* Publish written SQEs, submit them, and wait for at least 'wait' CQEs. */
static int ring_submit_wait(struct ring *r, unsigned wait)
{
	unsigned pending;
	int ret;

	atomic_store_explicit(r->sq_tail, r->sq_local_tail, memory_order_release);
	pending = r->sq_local_tail - atomic_load_explicit(r->sq_head, memory_order_relaxed);
	ret = sys_io_uring_enter(r->fd, pending, wait, wait ? IORING_ENTER_GETEVENTS : 0);
	if (ret == -EINTR || ret == -EAGAIN || ret == -EBUSY)
		return 0;	/* retried by the caller's loop */
	return ret < 0 ? ret : 0;
}

static const char *ring_flags_string(unsigned f, char *buf, size_t cap)
{
	snprintf(buf, cap, "SQE128%s%s%s%s%s%s",
		 f & IORING_SETUP_CQSIZE ? ",CQSIZE" : "",
		 f & IORING_SETUP_SUBMIT_ALL ? ",SUBMIT_ALL" : "",
		 f & IORING_SETUP_COOP_TASKRUN ? ",COOP_TASKRUN" : "",
		 f & IORING_SETUP_SINGLE_ISSUER ? ",SINGLE_ISSUER" : "",
		 f & IORING_SETUP_DEFER_TASKRUN ? ",DEFER_TASKRUN" : "",
		 f & IORING_SETUP_NO_SQARRAY ? ",NO_SQARRAY" : "");
	return buf;
}

/* ======================================================================
 * Types shared by the layers below
 * ====================================================================== */

enum backend { BACKEND_FILE, BACKEND_BLOCKDEV, BACKEND_NULL };

/*
 * The exported image.  Fields above the line are set before the first
 * request and never change; below it, state shared by all serving threads.
 */
struct image {
	const char *path;		/* as given, for messages */
	enum backend backend;
	bool writable, growable, direct;
	bool in_memory;			/* tmpfs/ramfs: I/O never blocks */
	bool passthrough;		/* the kernel reads and writes the file */
	int backing_id;			/* from FUSE_DEV_IOC_BACKING_OPEN */
	int fd;				/* O_DIRECT when --direct */
	int fd_buffered;		/* for I/O that O_DIRECT cannot do; == fd otherwise */
	uint32_t align;			/* O_DIRECT alignment of offset, length, buffer */
	uint32_t block_size;		/* a block device's logical block (fallocate unit) */
	bool allow_chown;		/* uid/gid may change: only with allow_other */
	/* ---- */
	_Atomic uint64_t size;		/* authoritative file size */
	_Atomic uint32_t mode;		/* permission bits of the exported file */
	_Atomic uint32_t uid, gid;
	pthread_mutex_t times_lock;	/* times of non-file backends */
	struct timespec atime, mtime, ctime;
};

/*
 * One request, as parsed by a transport.  'arg' is the opcode's fixed
 * argument struct; 'data' holds what follows it (the WRITE payload).  Both
 * point into the transport's buffers and are valid until the reply is sent.
 */
struct fuse_req {
	const struct fuse_in_header *in;
	const void *arg;
	size_t arg_len;
	const void *data;
	size_t data_len;
};

/*
 * The reply a handler fills: 'out' is the transport's buffer for everything
 * after the fuse_out_header (READ data lands there directly), 'out_cap' its
 * size.  A nonzero error means no payload is sent.
 */
struct fuse_reply {
	int error;
	bool none;		/* FORGET, INTERRUPT: the kernel expects no reply */
	void *out;
	size_t out_cap;
	size_t out_len;
	size_t out_zeroed;	/* leading bytes of 'out' known to be zero */
};

/* A READ or WRITE against the image, prepared by the protocol layer and run
 * synchronously or through a ring by the transport. */
struct image_io {
	bool write;
	int fd;
	int rw_flags;		/* RWF_DSYNC/RWF_SYNC: durable before the reply */
	uint64_t off;
	uint32_t len;
	uint32_t done;		/* bytes already transferred (see image_io_nowait) */
	void *buf;
};

static struct image img;

/* Negotiated at INIT; fixed afterwards. */
static uint32_t fuse_max_write;
static uint32_t fuse_proto_minor;

/* Image backend entry points used by the handlers (defined further down). */
static int image_getattr(struct fuse_attr *attr);
static int image_truncate(uint64_t size);
static int image_set_times(const struct fuse_setattr_in *in);
static int image_fallocate(uint32_t mode, uint64_t off, uint64_t len);
static int64_t image_seek(uint64_t off, uint32_t whence);
static int image_statfs(struct fuse_kstatfs *st);
static int image_sync(bool datasync);
static int image_fd_for(uint64_t off, uint32_t len, const void *buf);
static void image_size_grow(uint64_t end);
static ssize_t image_io_sync(const struct image_io *io);
static ssize_t image_io_nowait(struct image_io *io);

/* ======================================================================
 * FUSE protocol: transport-independent request handlers
 *
 * Each handler checks its argument sizes (a short request gets EINVAL and
 * nothing outside the request buffer is ever read), does the work and fills
 * 'rep'.  Reply sizes are exact: the io_uring transport sends out_len bytes
 * and the kernel rejects a mismatch.
 * ====================================================================== */

static const char *fuse_opcode_name(uint32_t op)
{
	static const char *const names[] = {
		[FUSE_LOOKUP] = "LOOKUP", [FUSE_FORGET] = "FORGET",
		[FUSE_GETATTR] = "GETATTR", [FUSE_SETATTR] = "SETATTR",
		[FUSE_OPEN] = "OPEN", [FUSE_READ] = "READ", [FUSE_WRITE] = "WRITE",
		[FUSE_STATFS] = "STATFS", [FUSE_RELEASE] = "RELEASE",
		[FUSE_FSYNC] = "FSYNC", [FUSE_SETXATTR] = "SETXATTR",
		[FUSE_GETXATTR] = "GETXATTR", [FUSE_LISTXATTR] = "LISTXATTR",
		[FUSE_REMOVEXATTR] = "REMOVEXATTR", [FUSE_FLUSH] = "FLUSH",
		[FUSE_INIT] = "INIT", [FUSE_ACCESS] = "ACCESS",
		[FUSE_INTERRUPT] = "INTERRUPT", [FUSE_DESTROY] = "DESTROY",
		[FUSE_IOCTL] = "IOCTL", [FUSE_POLL] = "POLL",
		[FUSE_BATCH_FORGET] = "BATCH_FORGET", [FUSE_FALLOCATE] = "FALLOCATE",
		[FUSE_LSEEK] = "LSEEK", [FUSE_COPY_FILE_RANGE] = "COPY_FILE_RANGE",
		[FUSE_STATX] = "STATX", [FUSE_COPY_FILE_RANGE_64] = "COPY_FILE_RANGE_64",
	};

	if (op < sizeof(names) / sizeof(names[0]) && names[op])
		return names[op];
	return "?";
}

/* Size of the fixed argument struct that starts each opcode's request. */
static size_t fuse_arg_size(uint32_t op)
{
	switch (op) {
	case FUSE_INIT:		return sizeof(struct fuse_init_in);
	case FUSE_GETATTR:	return sizeof(struct fuse_getattr_in);
	case FUSE_SETATTR:	return sizeof(struct fuse_setattr_in);
	case FUSE_OPEN:		return sizeof(struct fuse_open_in);
	case FUSE_READ:		return sizeof(struct fuse_read_in);
	case FUSE_WRITE:	return sizeof(struct fuse_write_in);
	case FUSE_RELEASE:	return sizeof(struct fuse_release_in);
	case FUSE_FSYNC:	return sizeof(struct fuse_fsync_in);
	case FUSE_FLUSH:	return sizeof(struct fuse_flush_in);
	case FUSE_ACCESS:	return sizeof(struct fuse_access_in);
	case FUSE_FALLOCATE:	return sizeof(struct fuse_fallocate_in);
	case FUSE_LSEEK:	return sizeof(struct fuse_lseek_in);
	default:		return 0;
	}
}

static void *fuse_reply_buf(struct fuse_reply *rep, size_t len)
{
	if (len > rep->out_cap) {
		rep->error = -EIO;
		return NULL;
	}
	memset(rep->out, 0, len);
	rep->out_len = len;
	return rep->out;
}

#define FUSE_ARG(req, type) \
	((req)->arg_len >= sizeof(type) ? (const type *)(req)->arg : NULL)

static void fuse_reply_attr(struct fuse_reply *rep)
{
	struct fuse_attr_out *out = fuse_reply_buf(rep, sizeof(*out));

	if (!out)
		return;
	/* attr_valid 0: the size and st_blocks change behind the kernel's back
	 * (fallocate, growth); a GETATTR is cheap next to a stale stat. */
	rep->error = image_getattr(&out->attr);
}

/* GETATTR: the one inode; size authoritative, st_blocks from the image. */
static void fuse_getattr(const struct fuse_req *req, struct fuse_reply *rep)
{
	(void)req;
	fuse_reply_attr(rep);
}

/*
 * SETATTR: size (fixed unless --growable, see image_truncate), mode (never
 * +w on a read-only export), uid/gid (only with allow_other, as QEMU does,
 * so an owner cannot lock itself out), atime/mtime (the image's own, so not
 * on a read-only export: EROFS).  FH, LOCKOWNER and CTIME carry no request
 * of their own.
 */
static void fuse_setattr(const struct fuse_req *req, struct fuse_reply *rep)
{
	const struct fuse_setattr_in *in = FUSE_ARG(req, struct fuse_setattr_in);
	uint32_t v;
	int err = 0;

	if (!in) {
		rep->error = -EINVAL;
		return;
	}
	v = in->valid;
	if ((v & FATTR_SIZE) && !img.writable)
		err = -EROFS;
	else if ((v & FATTR_MODE) && !img.writable && (in->mode & 0222))
		err = -EROFS;
	else if ((v & (FATTR_ATIME | FATTR_MTIME)) && !img.writable)
		err = -EROFS;		/* they would be written to the image */
	else if ((v & FATTR_UID) && in->uid != img.uid && !img.allow_chown)
		err = -EPERM;
	else if ((v & FATTR_GID) && in->gid != img.gid && !img.allow_chown)
		err = -EPERM;
	if (!err && (v & FATTR_SIZE))
		err = image_truncate(in->size);
	if (!err && (v & (FATTR_ATIME | FATTR_MTIME)))
		err = image_set_times(in);
	if (err) {
		rep->error = err;
		return;
	}
	if (v & FATTR_MODE)
		img.mode = in->mode & 07777;
	if (v & FATTR_KILL_SUIDGID)
		img.mode &= ~(uint32_t)(S_ISUID | S_ISGID);
	if (v & FATTR_UID)
		img.uid = in->uid;
	if (v & FATTR_GID)
		img.gid = in->gid;
	fuse_reply_attr(rep);
}

/* OPEN: direct I/O to the daemon so the image is not cached twice (the host
 * caches it already), or with --passthrough the kernel's own I/O on the
 * image; opening for write on a read-only export is EROFS, as on a
 * read-only file system. */
static void fuse_open(const struct fuse_req *req, struct fuse_reply *rep)
{
	const struct fuse_open_in *in = FUSE_ARG(req, struct fuse_open_in);
	struct fuse_open_out *out;

	if (!in) {
		rep->error = -EINVAL;
		return;
	}
	if ((in->flags & O_ACCMODE) != O_RDONLY && !img.writable) {
		rep->error = -EROFS;
		return;
	}
	out = fuse_reply_buf(rep, sizeof(*out));
	if (out && img.passthrough) {
		out->open_flags = FOPEN_PASSTHROUGH;
		out->backing_id = img.backing_id;
	} else if (out) {
		out->open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
	}
}

/*
 * READ and WRITE are split in two so a transport can run the image I/O
 * asynchronously: fuse_io_prepare() validates and clamps the request and
 * either answers it (error, EOF, null backend) and returns false, or fills
 * 'io' and returns true; fuse_io_done() turns the I/O result into the reply.
 *
 * READ: short only at EOF.  WRITE: EROFS on a read-only export; a write
 * reaching past EOF grows the image with --growable, is cut short at EOF
 * without it, and fails with ENOSPC when it starts at or after EOF (what a
 * full block device does).
 */
static bool fuse_read_prepare(const struct fuse_req *req, struct fuse_reply *rep,
			      struct image_io *io)
{
	const struct fuse_read_in *in = FUSE_ARG(req, struct fuse_read_in);
	uint64_t size = img.size, len;

	if (!in) {
		rep->error = -EINVAL;
		return false;
	}
	len = in->size;
	if (len > rep->out_cap)
		len = rep->out_cap;
	if (in->offset >= size)
		len = 0;
	else if (len > size - in->offset)
		len = size - in->offset;
	rep->out_len = len;
	if (len == 0)
		return false;
	if (img.backend == BACKEND_NULL) {
		/* Zeroing 1 MiB per read would dominate what null: measures:
		 * the transport tells us what is still zero from last time. */
		if (len > rep->out_zeroed)
			memset((char *)rep->out + rep->out_zeroed, 0, len - rep->out_zeroed);
		return false;
	}
	*io = (struct image_io){ .write = false, .off = in->offset,
				 .len = (uint32_t)len, .buf = rep->out };
	io->fd = image_fd_for(io->off, io->len, io->buf);
	return true;
}

static void fuse_reply_written(struct fuse_reply *rep, uint32_t n)
{
	struct fuse_write_out *out = fuse_reply_buf(rep, sizeof(*out));

	if (out)
		out->size = n;
}

/*
 * The writer's durability intent, as RWF_* flags for the image write.  The
 * kernel folds O_DSYNC/O_SYNC of the open file, RWF_DSYNC/RWF_SYNC of the
 * call and a sync mount or inode (IS_SYNC) into fuse_write_in.flags as
 * O_DSYNC and O_SYNC (fs/fuse/file.c, fuse_write_flags()); O_SYNC includes
 * the O_DSYNC bit.  Page-cache write-back (FUSE_WRITE_CACHE, shared mmap)
 * carries no intent: its durability comes with the FSYNC that follows.
 */
static int fuse_write_sync_flags(uint32_t open_flags)
{
	if ((open_flags & O_SYNC) == O_SYNC)
		return RWF_SYNC;
	return open_flags & O_DSYNC ? RWF_DSYNC : 0;
}

static bool fuse_write_prepare(const struct fuse_req *req, struct fuse_reply *rep,
			       struct image_io *io)
{
	const struct fuse_write_in *in = FUSE_ARG(req, struct fuse_write_in);
	uint64_t size = img.size, len;

	if (!in || req->data_len != in->size || in->offset > INT64_MAX) {
		rep->error = -EINVAL;
		return false;
	}
	if (!img.writable) {
		rep->error = -EROFS;
		return false;
	}
	len = in->size;
	if (len > INT64_MAX - in->offset) {
		rep->error = -EFBIG;
		return false;
	}
	if (!img.growable && len && in->offset + len > size) {
		if (in->offset >= size) {
			rep->error = -ENOSPC;
			return false;
		}
		len = size - in->offset;
	}
	if (len == 0 || img.backend == BACKEND_NULL) {
		if (img.backend == BACKEND_NULL)
			image_size_grow(in->offset + len);
		fuse_reply_written(rep, (uint32_t)len);
		return false;
	}
	*io = (struct image_io){ .write = true, .off = in->offset,
				 .len = (uint32_t)len, .buf = (void *)req->data,
				 .rw_flags = fuse_write_sync_flags(in->flags) };
	io->fd = image_fd_for(io->off, io->len, io->buf);
	return true;
}

static bool fuse_io_prepare(const struct fuse_req *req, struct fuse_reply *rep,
			    struct image_io *io)
{
	if (req->in->opcode == FUSE_READ)
		return fuse_read_prepare(req, rep, io);
	return fuse_write_prepare(req, rep, io);
}

static void fuse_io_done(const struct image_io *io, ssize_t res, struct fuse_reply *rep)
{
	if (res < 0) {
		rep->error = (int)res;
		rep->out_len = 0;
		return;
	}
	if (!io->write) {
		rep->out_len = (size_t)res;
		return;
	}
	if (img.growable)
		image_size_grow(io->off + (uint64_t)res);
	fuse_reply_written(rep, (uint32_t)res);
}

static void fuse_read_write(const struct fuse_req *req, struct fuse_reply *rep)
{
	struct image_io io;

	if (fuse_io_prepare(req, rep, &io))
		fuse_io_done(&io, image_io_sync(&io), rep);
}

static void fuse_statfs(const struct fuse_req *req, struct fuse_reply *rep)
{
	struct fuse_statfs_out *out = fuse_reply_buf(rep, sizeof(*out));

	(void)req;
	if (out)
		rep->error = image_statfs(&out->st);
}

/* FSYNC: after fsync(2) on the export returns, the data is on stable storage. */
static void fuse_fsync(const struct fuse_req *req, struct fuse_reply *rep)
{
	const struct fuse_fsync_in *in = FUSE_ARG(req, struct fuse_fsync_in);

	rep->error = in ? image_sync(in->fsync_flags & FUSE_FSYNC_FDATASYNC) : -EINVAL;
}

/* ACCESS is only sent without default_permissions; answer it anyway. */
static void fuse_access(const struct fuse_req *req, struct fuse_reply *rep)
{
	const struct fuse_access_in *in = FUSE_ARG(req, struct fuse_access_in);

	if (!in)
		rep->error = -EINVAL;
	else if ((in->mask & W_OK) && !img.writable)
		rep->error = -EROFS;
}

/* FALLOCATE: mode 0 and KEEP_SIZE preallocate, PUNCH_HOLE|KEEP_SIZE and
 * ZERO_RANGE[|KEEP_SIZE] zero; anything else EOPNOTSUPP. */
static void fuse_fallocate(const struct fuse_req *req, struct fuse_reply *rep)
{
	const struct fuse_fallocate_in *in = FUSE_ARG(req, struct fuse_fallocate_in);

	if (!in)
		rep->error = -EINVAL;
	else if (!img.writable)
		rep->error = -EROFS;
	else
		rep->error = image_fallocate(in->mode, in->offset, in->length);
}

/* LSEEK: only SEEK_DATA/SEEK_HOLE reach us; ENXIO at or past EOF, or when no
 * data follows (a wrong answer makes cp loop forever). */
static void fuse_lseek(const struct fuse_req *req, struct fuse_reply *rep)
{
	const struct fuse_lseek_in *in = FUSE_ARG(req, struct fuse_lseek_in);
	struct fuse_lseek_out *out;
	int64_t pos;

	if (!in || (in->whence != SEEK_DATA && in->whence != SEEK_HOLE)) {
		rep->error = -EINVAL;
		return;
	}
	pos = image_seek(in->offset, in->whence);
	if (pos < 0) {
		rep->error = (int)pos;
		return;
	}
	out = fuse_reply_buf(rep, sizeof(*out));
	if (out)
		out->offset = (uint64_t)pos;
}

/* Dispatch one request (INIT excepted: fuse_init() needs the transport). */
static void fuse_handle(const struct fuse_req *req, struct fuse_reply *rep)
{
	rep->error = 0;
	rep->none = false;
	rep->out_len = 0;

	/* Every opcode with a fixed argument needs all of it. */
	if (req->arg_len < fuse_arg_size(req->in->opcode)) {
		rep->error = -EINVAL;
		return;
	}
	switch (req->in->opcode) {
	case FUSE_GETATTR:	fuse_getattr(req, rep); break;
	case FUSE_SETATTR:	fuse_setattr(req, rep); break;
	case FUSE_OPEN:		fuse_open(req, rep); break;
	case FUSE_READ:
	case FUSE_WRITE:	fuse_read_write(req, rep); break;
	case FUSE_STATFS:	fuse_statfs(req, rep); break;
	case FUSE_FSYNC:	fuse_fsync(req, rep); break;
	case FUSE_ACCESS:	fuse_access(req, rep); break;
	case FUSE_FALLOCATE:	fuse_fallocate(req, rep); break;
	case FUSE_LSEEK:	fuse_lseek(req, rep); break;
	case FUSE_RELEASE:	/* nothing is kept per open file */
	case FUSE_FLUSH:	/* close(2) of a regular file does not sync either */
	case FUSE_DESTROY:	break;
	case FUSE_LOOKUP:	rep->error = -ENOENT; break;	/* the root has no names */
	case FUSE_FORGET:
	case FUSE_BATCH_FORGET:
	case FUSE_INTERRUPT:	rep->none = true; break;	/* I/O is never cancelled */
	default:		rep->error = -ENOSYS; break;
	}
}

/*
 * Compute the INIT reply.  max_write is the largest the kernel will take
 * (fs.fuse.max_pages_limit), up to 'max_payload'.
 */
static int fuse_init(const struct fuse_init_in *in, struct fuse_init_out *out,
		     uint32_t max_payload, unsigned nr_threads)
{
	uint64_t offered = in->flags, wanted;
	unsigned max_pages = 32, limit = 256, bg;
	char buf[32];

	memset(out, 0, sizeof(*out));
	out->major = FUSE_KERNEL_VERSION;
	out->minor = FUSE_KERNEL_MINOR_VERSION;
	if (in->major != FUSE_KERNEL_VERSION)
		return -EPROTO;
	if (offered & FUSE_INIT_EXT)
		offered |= (uint64_t)in->flags2 << 32;
	fuse_proto_minor = in->minor;

	wanted = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES |
		 FUSE_INIT_EXT | FUSE_DIRECT_IO_ALLOW_MMAP;
	if (img.passthrough) {
		if (!(offered & FUSE_PASSTHROUGH))
			return -EOPNOTSUPP;
		wanted |= FUSE_PASSTHROUGH;
		out->max_stack_depth = 1;	/* the image's file system + us */
	}
	wanted &= offered;
	if (read_small_file("/proc/sys/fs/fuse/max_pages_limit", buf, sizeof(buf)) > 0)
		limit = (unsigned)atoi(buf);
	if (wanted & FUSE_MAX_PAGES) {
		max_pages = (unsigned)(max_payload / page_size());
		if (max_pages > limit && limit > 0)
			max_pages = limit;
	}
	fuse_max_write = (uint32_t)(max_pages * page_size());

	/* Async direct I/O requests are background requests: the kernel caps
	 * them at max_background (12 if left 0), which would throttle a deep
	 * client queue long before the daemon does. */
	bg = nr_threads * MAX_QUEUE_DEPTH;
	if (bg > 65535)
		bg = 65535;
	out->max_readahead = in->max_readahead;
	out->flags = (uint32_t)wanted;
	out->flags2 = (uint32_t)(wanted >> 32);
	out->max_background = (uint16_t)bg;
	out->congestion_threshold = (uint16_t)(bg * 3 / 4);
	out->max_write = fuse_max_write;
	out->time_gran = 1;
	out->max_pages = (uint16_t)max_pages;
	return 0;
}

static void fuse_log_request(const char *who, unsigned idx, const struct fuse_req *req,
			     const struct fuse_reply *rep)
{
	const struct fuse_in_header *in = req->in;
	uint64_t off = 0, len = 0;

	if (!log_debug)
		return;
	if (in->opcode == FUSE_READ || in->opcode == FUSE_WRITE) {
		const struct fuse_read_in *rw = FUSE_ARG(req, struct fuse_read_in);

		if (rw) {
			off = rw->offset;
			len = rw->size;
		}
	}
	fprintf(stderr, "uexportd: [%s%u] %s unique=%llu off=%llu len=%llu -> %d/%zu\n",
		who, idx, fuse_opcode_name(in->opcode), (unsigned long long)in->unique,
		(unsigned long long)off, (unsigned long long)len, rep->error,
		rep->out_len);
}

/*
 * Zero tracking for null: reads, shared by the transports.  A payload buffer
 * stays zero after a null READ reply; anything the kernel delivered into it
 * or any other reply may have dirtied it.
 */
static void payload_track_zero(size_t *zeroed, struct fuse_reply *rep, size_t delivered)
{
	if (delivered)
		*zeroed = 0;
	rep->out_zeroed = *zeroed;
}

static void payload_track_reply(size_t *zeroed, const struct fuse_req *req,
				const struct fuse_reply *rep)
{
	if (img.backend == BACKEND_NULL && req->in->opcode == FUSE_READ && !rep->error) {
		if (rep->out_len > *zeroed)
			*zeroed = rep->out_len;
	} else if (rep->out_len || rep->error) {
		*zeroed = 0;
	}
}

/* ======================================================================
 * Image backend
 *
 * Three backends behind one set of calls: a regular file, a block device
 * (fixed size; fallocate maps to the device's discard/zero-out), and null
 * (reads are zeros, writes vanish, nothing allocated).  img.size is the
 * authoritative size; only truncate and growing writes change it.
 * ====================================================================== */

static int image_open_null(const char *spec)
{
	uint64_t size;

	if (parse_size(spec + 5, &size) < 0)
		return -EINVAL;
	img.backend = BACKEND_NULL;
	img.fd = img.fd_buffered = -1;
	img.size = size;
	return 0;
}

static int image_open_path(const char *path)
{
	struct stat st;
	int flags = (img.writable ? O_RDWR : O_RDONLY) | O_CLOEXEC;
	/* O_NONBLOCK until the type is known: opening a FIFO would wait for
	 * a writer forever. */
	int fd = open(path, flags | O_NONBLOCK | (img.direct ? O_DIRECT : 0));

	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0 || (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) ||
	    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0) {
		int err = S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL;

		close(fd);
		return err;
	}
	img.fd = img.fd_buffered = fd;
	img.align = 1;
	img.backend = S_ISBLK(st.st_mode) ? BACKEND_BLOCKDEV : BACKEND_FILE;
	if (img.backend == BACKEND_BLOCKDEV) {
		uint64_t size;
		int ssz = 512;

		if (ioctl(fd, BLKGETSIZE64, &size) < 0)
			return -errno;
		ioctl(fd, BLKSSZGET, &ssz);
		img.size = size;
		img.align = img.block_size = (uint32_t)ssz;
	} else {
		img.size = (uint64_t)st.st_size;
	}
	if (img.direct) {
		/* Unaligned requests (dd bs=7) cannot use O_DIRECT; they go
		 * through a second, buffered descriptor.  Linux keeps the two
		 * coherent: direct writes invalidate the cached range and direct
		 * reads write dirty pages back first. */
		img.fd_buffered = open(path, flags);
		if (img.fd_buffered < 0)
			return -errno;
		if (img.align < page_size())
			img.align = (uint32_t)page_size();
	}
	{
		struct statfs sfs;

		img.in_memory = fstatfs(fd, &sfs) == 0 &&
			(sfs.f_type == TMPFS_MAGIC || sfs.f_type == RAMFS_MAGIC);
	}
	img.atime = st.st_atim;
	img.mtime = st.st_mtim;
	img.ctime = st.st_ctim;
	return 0;
}

static int image_open(const char *path)
{
	img.path = path;
	pthread_mutex_init(&img.times_lock, NULL);
	clock_gettime(CLOCK_REALTIME, &img.mtime);
	img.atime = img.ctime = img.mtime;
	if (strncmp(path, "null:", 5) == 0)
		return image_open_null(path);
	return image_open_path(path);
}

static int image_fd_for(uint64_t off, uint32_t len, const void *buf)
{
	uint64_t mask = img.align - 1;

	if (((off | len | (uintptr_t)buf) & mask) == 0)
		return img.fd;
	return img.fd_buffered;
}

/* The I/O in the calling thread; returns bytes moved or -errno. */
static ssize_t image_io_sync(const struct image_io *io)
{
	return rw_full(io->write, io->fd, io->buf, io->len, io->off, io->rw_flags);
}

/*
 * Try the I/O without blocking: when the data is in the host page cache, a
 * copy here is far cheaper than a trip through the ring.  A tmpfs image
 * never blocks, and tmpfs cannot do non-blocking ring I/O (every request
 * would go to an io-wq worker thread), so it is always done here.  Other
 * files use RWF_NOWAIT.  Returns the byte count when complete, or -EAGAIN
 * with io->done set to what was transferred, so the ring does the rest.
 * Never used for O_DIRECT I/O, nor for a synchronous write (its flush would
 * block the queue's thread: it goes to the ring, see ring_queue_image_io).
 */
static bool nowait_read_ok = true, nowait_write_ok = true;

/* O_DIRECT I/O: the device moves the data, no CPU copy to place. */
static bool image_io_direct(const struct image_io *io)
{
	return img.direct && io->fd == img.fd;
}

static ssize_t image_io_nowait(struct image_io *io)
{
	bool *ok = io->write ? &nowait_write_ok : &nowait_read_ok;
	struct iovec iov = { io->buf, io->len };
	ssize_t n;

	io->done = 0;
	if (img.in_memory)
		return image_io_sync(io);
	if (!*ok || image_io_direct(io) || io->rw_flags)
		return -EAGAIN;
	n = sys_rw2(io->write, io->fd, &iov, io->off, RWF_NOWAIT);
	if (n == -EOPNOTSUPP)
		*ok = false;		/* this file system cannot: stop trying */
	if (n < 0)
		return n == -EOPNOTSUPP ? -EAGAIN : n;
	if ((size_t)n == io->len || (n == 0 && !io->write))
		return n;
	io->done = (uint32_t)n;
	return -EAGAIN;
}

/* Raise img.size to 'end' if smaller (concurrent growing writes race here). */
static void image_size_grow(uint64_t end)
{
	uint64_t cur = img.size;

	while (cur < end && !atomic_compare_exchange_weak(&img.size, &cur, end))
		;
}

static void ts_to_attr(const struct timespec *ts, uint64_t *sec, uint32_t *nsec)
{
	*sec = (uint64_t)ts->tv_sec;
	*nsec = (uint32_t)ts->tv_nsec;
}

static int image_getattr(struct fuse_attr *a)
{
	uint64_t size = img.size;
	struct stat st;

	a->ino = FUSE_ROOT_ID;
	a->size = size;
	a->mode = S_IFREG | img.mode;
	a->nlink = 1;
	a->uid = img.uid;
	a->gid = img.gid;
	a->blksize = 4096;
	if (img.backend == BACKEND_FILE) {
		if (fstat(img.fd, &st) < 0)
			return -errno;
		if (img.passthrough)	/* the kernel may have grown it */
			img.size = a->size = (uint64_t)st.st_size;
		a->blocks = (uint64_t)st.st_blocks;
		ts_to_attr(&st.st_atim, &a->atime, &a->atimensec);
		ts_to_attr(&st.st_mtim, &a->mtime, &a->mtimensec);
		ts_to_attr(&st.st_ctim, &a->ctime, &a->ctimensec);
		return 0;
	}
	a->blocks = img.backend == BACKEND_NULL ? 0 : (size + 511) / 512;
	pthread_mutex_lock(&img.times_lock);
	ts_to_attr(&img.atime, &a->atime, &a->atimensec);
	ts_to_attr(&img.mtime, &a->mtime, &a->mtimensec);
	ts_to_attr(&img.ctime, &a->ctime, &a->ctimensec);
	pthread_mutex_unlock(&img.times_lock);
	return 0;
}

/* With --passthrough, writes past EOF grow the file behind our back. */
static void image_refresh_size(void)
{
	struct stat st;

	if (img.passthrough && fstat(img.fd, &st) == 0)
		img.size = (uint64_t)st.st_size;
}

/* Write zeros over [off, off + len) with plain buffered writes: for what
 * fallocate cannot do.  Returns 0 or -errno. */
static int image_write_zeroes(uint64_t off, uint64_t len)
{
	static const char zeros[64 << 10];

	while (len > 0) {
		size_t n = len < sizeof(zeros) ? (size_t)len : sizeof(zeros);
		ssize_t r = rw_full(true, img.fd_buffered, (void *)zeros, n, off, 0);

		if (r < 0)
			return (int)r;
		if ((size_t)r < n)
			return -EIO;
		off += n;
		len -= n;
	}
	return 0;
}

/* Zero whole blocks in place, cheapest first: PUNCH_HOLE deallocates (a
 * hole in a file; on a device a write-zeroes with unmap, refused unless the
 * device does it efficiently, block/fops.c), ZERO_RANGE writes zeroes the
 * device's way, and plain writes cover file systems with neither. */
static int image_zero_blocks(uint64_t off, uint64_t len)
{
	static const int modes[] = { FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE };

	for (unsigned i = 0; i < 2; i++) {
		if (fallocate(img.fd, modes[i] | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
			return 0;
		if (errno != EOPNOTSUPP)
			return -errno;
	}
	return image_write_zeroes(off, len);
}

/*
 * Make [off, off + len) read back as zeros without changing the size and
 * without touching a byte outside it.  A block device takes fallocate only
 * in whole logical blocks: partial blocks at either end are written.
 * Returns 0 or -errno.
 */
static int image_zero(uint64_t off, uint64_t len)
{
	uint64_t bs = img.backend == BACKEND_BLOCKDEV ? img.block_size : 1;
	uint64_t end = off + len;
	uint64_t first = (off + bs - 1) / bs * bs, last = end / bs * bs;
	int err;

	if (img.backend == BACKEND_NULL || len == 0)
		return 0;
	if (first >= last)
		return image_write_zeroes(off, len);
	err = image_write_zeroes(off, first - off);
	if (!err)
		err = image_write_zeroes(last, end - last);
	return err ? err : image_zero_blocks(first, last - first);
}

/*
 * SETATTR size.  A growable export (a file or null:) takes any size up to
 * INT64_MAX.  A fixed-size export never changes size, like the block device
 * it stands for: growing is EFBIG (its file-size limit), and a smaller size
 * zeroes the bytes from there to the end instead -- what truncating and
 * extending back leaves -- so that the tools that truncate before writing
 * (open with O_TRUNC, cp, qemu-img convert, dd seek=) and then skip what
 * should be zero leave no stale data behind.  Returns 0 or -errno.
 */
static int image_truncate(uint64_t size)
{
	uint64_t cur;

	image_refresh_size();
	cur = img.size;
	if (size == cur)
		return 0;
	if (size > INT64_MAX || (size > cur && !img.growable))
		return -EFBIG;
	if (!img.growable)
		return image_zero(size, cur - size);
	if (img.backend == BACKEND_FILE && ftruncate(img.fd, (off_t)size) < 0)
		return -errno;
	img.size = size;
	return 0;
}

static struct timespec setattr_time(bool set, bool now, uint64_t sec, uint32_t nsec)
{
	struct timespec ts = { .tv_sec = (time_t)sec, .tv_nsec = nsec };

	if (!set)
		ts.tv_nsec = UTIME_OMIT;
	else if (now)
		ts.tv_nsec = UTIME_NOW;
	return ts;
}

static int image_set_times(const struct fuse_setattr_in *in)
{
	struct timespec ts[2] = {
		setattr_time(in->valid & FATTR_ATIME, in->valid & FATTR_ATIME_NOW,
			     in->atime, in->atimensec),
		setattr_time(in->valid & FATTR_MTIME, in->valid & FATTR_MTIME_NOW,
			     in->mtime, in->mtimensec),
	};
	struct timespec now;

	if (img.backend == BACKEND_FILE)
		return futimens(img.fd, ts) < 0 ? -errno : 0;
	clock_gettime(CLOCK_REALTIME, &now);
	pthread_mutex_lock(&img.times_lock);
	if (ts[0].tv_nsec != UTIME_OMIT)
		img.atime = ts[0].tv_nsec == UTIME_NOW ? now : ts[0];
	if (ts[1].tv_nsec != UTIME_OMIT)
		img.mtime = ts[1].tv_nsec == UTIME_NOW ? now : ts[1];
	img.ctime = now;
	pthread_mutex_unlock(&img.times_lock);
	return 0;
}

static int image_fallocate(uint32_t mode, uint64_t off, uint64_t len)
{
	bool keep = mode & FALLOC_FL_KEEP_SIZE;
	uint32_t kind = mode & ~(uint32_t)FALLOC_FL_KEEP_SIZE;
	uint64_t end;

	if (kind != 0 && kind != FALLOC_FL_ZERO_RANGE &&
	    !(kind == FALLOC_FL_PUNCH_HOLE && keep))
		return -EOPNOTSUPP;
	image_refresh_size();
	if (off > INT64_MAX || len == 0 || len > INT64_MAX - off)
		return len == 0 ? -EINVAL : -EFBIG;
	end = off + len;
	if (!keep && end > img.size && !img.growable)
		return -ENOSPC;
	/* A fixed-size export has nothing past EOF: KEEP_SIZE requests are
	 * clipped there, or a client could make the host preallocate without
	 * limit beyond the image (and fill its disk). */
	if (!img.growable && end > img.size) {
		if (off >= img.size)
			return 0;
		len = img.size - off;
		end = img.size;
	}
	switch (img.backend) {
	case BACKEND_NULL:
		break;
	case BACKEND_BLOCKDEV:
		/* Preallocation is a no-op on a device; punching and zeroing
		 * both leave zeros, at any byte offset. */
		if (kind != 0) {
			int err = image_zero(off, len);

			if (err)
				return err;
		}
		break;
	case BACKEND_FILE:
		if (fallocate(img.fd, (int)mode, (off_t)off, (off_t)len) < 0)
			return -errno;
		break;
	}
	if (!keep)
		image_size_grow(end);
	return 0;
}

/* SEEK_DATA/SEEK_HOLE within [0, size): a device is all data, null all hole. */
static int64_t image_seek(uint64_t off, uint32_t whence)
{
	uint64_t size;
	off_t pos;

	image_refresh_size();
	size = img.size;
	if (off >= size)
		return -ENXIO;
	if (img.backend == BACKEND_BLOCKDEV)
		return whence == SEEK_DATA ? (int64_t)off : (int64_t)size;
	if (img.backend == BACKEND_NULL)
		return whence == SEEK_DATA ? -ENXIO : (int64_t)off;
	pos = lseek(img.fd, (off_t)off, (int)whence);
	if (pos < 0 && errno == ENXIO && whence == SEEK_HOLE)
		return (int64_t)size;
	if (pos < 0)
		return -errno;
	if ((uint64_t)pos >= size)
		return whence == SEEK_DATA ? -ENXIO : (int64_t)size;
	return pos;
}

static int image_statfs(struct fuse_kstatfs *st)
{
	struct statfs sfs;

	st->namelen = 255;
	if (img.backend == BACKEND_FILE) {
		if (fstatfs(img.fd, &sfs) < 0)
			return -errno;
		st->blocks = (uint64_t)sfs.f_blocks;
		st->bfree = (uint64_t)sfs.f_bfree;
		st->bavail = (uint64_t)sfs.f_bavail;
		st->files = (uint64_t)sfs.f_files;
		st->ffree = (uint64_t)sfs.f_ffree;
		st->bsize = (uint32_t)sfs.f_bsize;
		st->frsize = (uint32_t)(sfs.f_frsize ? sfs.f_frsize : sfs.f_bsize);
		return 0;
	}
	st->bsize = st->frsize = 4096;
	st->blocks = (img.size + 4095) / 4096;
	st->files = 1;
	return 0;
}

static int image_sync(bool datasync)
{
	if (img.backend == BACKEND_NULL)
		return 0;
	if ((datasync ? fdatasync(img.fd) : fsync(img.fd)) < 0)
		return -errno;
	return 0;
}

/* ======================================================================
 * Transport: classic /dev/fuse
 *
 * One thread per CPU, pinned, each blocked in read() on its own clone of the
 * device fd (replies must go to the fd that delivered the request).  Each
 * thread owns one request buffer and one reply buffer; a request is answered
 * before the next read(), so the buffers are never shared.
 * ====================================================================== */

struct devfuse_worker {
	pthread_t thread;
	unsigned idx;
	int cpu;			/* -1: not pinned */
	int fd;
	char *in;			/* request: header + arguments */
	size_t in_cap;
	char *out;			/* reply: out_header + payload */
	size_t out_cap;
	size_t out_zeroed;		/* reply payload bytes known zero (null:) */
};

static int fuse_dev_fd = -1;		/* the mount's /dev/fuse fd */
static atomic_int workers_live;
static atomic_bool stopping;		/* unmount under way: ENODEV is expected */
static pthread_t main_thread;

/* Tell the main thread a serving thread ended (unmount, or a fatal error). */
static void worker_exited(void)
{
	atomic_fetch_sub(&workers_live, 1);
	pthread_kill(main_thread, SIGUSR1);
}

static void pin_to_cpu(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

/* Buffers are offset so that WRITE data (after the in-header and write_in)
 * and READ data (after the out-header) start page-aligned: O_DIRECT images
 * then take them without a bounce. */
static int devfuse_alloc(struct devfuse_worker *w)
{
	size_t ps = page_size();
	size_t hdr_in = sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in);
	size_t hdr_out = sizeof(struct fuse_out_header);
	char *a, *b;

	w->in_cap = hdr_in + fuse_max_write;
	if (w->in_cap < FUSE_MIN_READ_BUFFER)
		w->in_cap = FUSE_MIN_READ_BUFFER;
	w->out_cap = hdr_out + fuse_max_write;
	a = buffer_alloc(round_up(w->in_cap + ps, ps));
	b = buffer_alloc(round_up(w->out_cap + ps, ps));
	if (!a || !b)
		return -ENOMEM;
	w->in = a + ps - hdr_in;
	w->out = b + ps - hdr_out;
	return 0;
}

static void devfuse_reply(struct devfuse_worker *w, const struct fuse_in_header *in,
			  const struct fuse_reply *rep)
{
	struct fuse_out_header *out = (struct fuse_out_header *)w->out;
	size_t len = sizeof(*out) + (rep->error ? 0 : rep->out_len);

	out->len = (uint32_t)len;
	out->error = rep->error;
	out->unique = in->unique;
	/* ENOENT: the request was interrupted or aborted meanwhile. */
	while (write(w->fd, out, len) < 0 && errno == EINTR)
		;
}

/* Split a read()-framed request into header, fixed argument and payload. */
static int devfuse_parse(const char *buf, size_t n, struct fuse_req *req)
{
	const struct fuse_in_header *in = (const void *)buf;
	size_t body, argsz;

	req->in = in;
	if (in->len != n)
		return -EINVAL;
	body = n - sizeof(*in);
	argsz = fuse_arg_size(in->opcode);
	req->arg = buf + sizeof(*in);
	req->arg_len = body < argsz ? body : argsz;
	req->data = buf + sizeof(*in) + req->arg_len;
	req->data_len = body - req->arg_len;
	return 0;
}

static void devfuse_serve_one(struct devfuse_worker *w, size_t n)
{
	struct fuse_req req;
	struct fuse_reply rep = { .out = w->out + sizeof(struct fuse_out_header),
				  .out_cap = w->out_cap - sizeof(struct fuse_out_header) };

	if (devfuse_parse(w->in, n, &req) < 0) {
		rep.error = -EINVAL;
	} else if (req.in->opcode == FUSE_INIT) {
		rep.error = -EPROTO;		/* INIT is answered once, at mount */
	} else {
		payload_track_zero(&w->out_zeroed, &rep, 0);
		fuse_handle(&req, &rep);
		fuse_log_request("dev", w->idx, &req, &rep);
		payload_track_reply(&w->out_zeroed, &req, &rep);
	}
	if (!rep.none)
		devfuse_reply(w, req.in, &rep);
}

static void *devfuse_worker_main(void *arg)
{
	struct devfuse_worker *w = arg;

	pin_to_cpu(w->cpu);
	for (;;) {
		ssize_t n = read(w->fd, w->in, w->in_cap);

		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
				continue;
			if (errno != ENODEV && !stopping)
				log_err("thread %u: read /dev/fuse: %s", w->idx, strerror(errno));
			break;
		}
		if ((size_t)n < sizeof(struct fuse_in_header)) {
			log_err("thread %u: short request (%zd bytes) dropped", w->idx, n);
			continue;
		}
		devfuse_serve_one(w, (size_t)n);
	}
	worker_exited();
	return NULL;
}

/* A clone gets its own processing list, so threads never contend on one fd.
 * Unprivileged daemons cannot open /dev/fuse (often 0600): they share. */
static int devfuse_clone(void)
{
	uint32_t src = (uint32_t)fuse_dev_fd;
	int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return fuse_dev_fd;
	if (ioctl(fd, FUSE_DEV_IOC_CLONE, &src) < 0) {
		close(fd);
		return fuse_dev_fd;
	}
	return fd;
}

static struct devfuse_worker *devfuse_workers;
static unsigned nr_workers;

/* The CPUs this process may run on, in order; one serving thread each. */
static unsigned cpu_list(int *cpus, unsigned max)
{
	cpu_set_t set;
	unsigned n = 0;

	if (sched_getaffinity(0, sizeof(set), &set) < 0) {
		cpus[0] = -1;
		return 1;
	}
	for (int c = 0; c < CPU_SETSIZE && n < max; c++)
		if (CPU_ISSET(c, &set))
			cpus[n++] = c;
	return n ? n : 1;
}

static int devfuse_start(void)
{
	static int cpus[CPU_SETSIZE];
	unsigned n = cpu_list(cpus, CPU_SETSIZE);

	devfuse_workers = calloc(n, sizeof(*devfuse_workers));
	if (!devfuse_workers)
		return -ENOMEM;
	for (unsigned i = 0; i < n; i++) {
		struct devfuse_worker *w = &devfuse_workers[i];
		int err;

		w->idx = i;
		w->cpu = cpus[i];
		w->fd = i == 0 ? fuse_dev_fd : devfuse_clone();
		err = devfuse_alloc(w);
		if (!err)
			err = -pthread_create(&w->thread, NULL, devfuse_worker_main, w);
		if (err)
			return err;
		nr_workers++;
		atomic_fetch_add(&workers_live, 1);
	}
	return 0;
}

static void devfuse_join(void)
{
	for (unsigned i = 0; i < nr_workers; i++)
		pthread_join(devfuse_workers[i].thread, NULL);
}

/* ======================================================================
 * Transport: FUSE-over-io_uring
 *
 * The kernel (6.14+) wants one queue per *possible* CPU and routes each
 * request to the queue of the CPU its caller runs on; the ring only becomes
 * ready once every queue has an entry registered.  Thread k owns queue k:
 * its own ring, pinned to CPU k when that CPU is ours to run on.
 *
 * A queue has 'depth' entries.  Each entry owns a request header and a
 * payload buffer, registered once (REGISTER) and reused by every
 * COMMIT_AND_FETCH; the kernel writes a request into them and completes the
 * entry's SQE.  An entry is always in one of three states, told apart by
 * its one outstanding operation (see user_data below): parked in the kernel
 * waiting for a request (a FUSE command), image I/O in flight into/from its
 * payload (an image op), or ended by the kernel on unmount or abort (none;
 * never reused, counted out of ring_queue.live).
 *
 * Counting invariant: every live entry has exactly one SQE or CQE
 * outstanding, so a queue never has more than 'depth' SQEs to write or
 * CQEs to reap; the SQ holds depth entries and the CQ twice that, so
 * neither can overflow.  A queue's memory is freed only when all its
 * entries are DONE, i.e. when the kernel can no longer write into them.
 *
 * user_data: bit 63 set for image I/O, clear for FUSE commands; the low 32
 * bits are the entry index.
 * ====================================================================== */

#define UD_IMAGE_IO	(1ULL << 63)
_Static_assert(MAX_QUEUE_DEPTH <= UINT32_MAX, "entry index fits user_data");
_Static_assert(sizeof(struct fuse_uring_cmd_req) <= 80, "fits the SQE128 command area");
_Static_assert(sizeof(struct fuse_uring_req_header) == 288, "fuse_uring_req_header");

enum { FIXED_FUSE = 0, FIXED_IMAGE = 1, FIXED_IMAGE_BUFFERED = 2 };

struct ring_entry {
	struct fuse_uring_req_header *hdr;	/* kernel writes the request here */
	void *payload;				/* and the data; we reply in place */
	struct iovec iov[2];			/* read by REGISTER at issue time */
	bool registering;			/* REGISTER not yet accepted */
	size_t zeroed;				/* payload bytes known zero (null:) */
	struct image_io io;
	struct fuse_reply rep;
};

struct ring_queue {
	pthread_t thread;
	unsigned qid;
	int cpu;				/* -1: not pinned */
	unsigned depth;
	size_t payload_size;
	struct ring ring;
	struct ring_entry *ents;
	void *hdr_mem, *payload_mem;
	unsigned live;				/* entries not DONE */
	int setup_err, register_err;
	uint64_t served;			/* requests taken from the ring */
};

static struct ring_queue *ring_queues;
static unsigned nr_ring_queues;
static unsigned uring_depth;			/* entries per queue, after memory_plan */
static char uring_flags_granted[128];

/* The CPUs this process may use.  A queue's io-wq workers run on these less
 * the queue's own CPU; with only one there is nowhere to offload to. */
static cpu_set_t ring_allowed_cpus;
static bool ring_offload_cpus;

/* Start-up rendezvous between main and the queue threads. */
static pthread_mutex_t uring_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t uring_cond = PTHREAD_COND_INITIALIZER;
static unsigned uring_reported;			/* threads done with a phase */
static int uring_go = -1;			/* -1 wait, 0 abandon, 1 register */

static void uring_report(void)
{
	pthread_mutex_lock(&uring_lock);
	uring_reported++;
	pthread_cond_broadcast(&uring_cond);
	pthread_mutex_unlock(&uring_lock);
}

static void uring_wait_reports(unsigned n)
{
	pthread_mutex_lock(&uring_lock);
	while (uring_reported < n)
		pthread_cond_wait(&uring_cond, &uring_lock);
	pthread_mutex_unlock(&uring_lock);
}

static int uring_wait_go(void)
{
	int go;

	pthread_mutex_lock(&uring_lock);
	while (uring_go < 0)
		pthread_cond_wait(&uring_cond, &uring_lock);
	go = uring_go;
	pthread_mutex_unlock(&uring_lock);
	return go;
}

static void uring_set_go(int go)
{
	pthread_mutex_lock(&uring_lock);
	uring_reported = 0;
	uring_go = go;
	pthread_cond_broadcast(&uring_cond);
	pthread_mutex_unlock(&uring_lock);
}

/* Count the CPUs in a kernel CPU list ("0-1", "0,2-5", "0-3,8-11\n", the
 * format of /sys/devices/system/cpu/possible).  Returns the count, or
 * -EINVAL for anything else (empty, reversed or open ranges, junk). */
static int parse_cpu_list(const char *s)
{
	int n = 0;

	while (*s && *s != '\n') {
		char *end;
		long a, b;

		if (!isdigit((unsigned char)*s))
			return -EINVAL;
		a = b = strtol(s, &end, 10);
		if (*end == '-') {
			if (!isdigit((unsigned char)end[1]))
				return -EINVAL;
			b = strtol(end + 1, &end, 10);
		}
		if (b < a || b >= CPU_SETSIZE * 64L)
			return -EINVAL;
		n += (int)(b - a + 1);
		if (*end == ',' && isdigit((unsigned char)end[1]))
			end++;
		else if (*end && *end != '\n')
			return -EINVAL;
		s = end;
	}
	return n > 0 ? n : -EINVAL;
}

/* Number of possible CPUs: the kernel's queue count.  Never guessed. */
static int possible_cpus(void)
{
	char buf[256];

	if (read_small_file("/sys/devices/system/cpu/possible", buf, sizeof(buf)) <= 0)
		return -ENOENT;
	return parse_cpu_list(buf);
}

static int ring_queue_setup(struct ring_queue *q)
{
	size_t hdr_size = round_up(sizeof(struct fuse_uring_req_header), 64);
	int files[3] = { fuse_dev_fd, img.fd, img.fd_buffered };
	int err;

	err = ring_init(&q->ring, q->depth);
	if (err)
		return err;
	err = sys_io_uring_register(q->ring.fd, IORING_REGISTER_FILES, files,
				    img.backend == BACKEND_NULL ? 1 : 3);
	if (err < 0)
		return err;
	if (ring_offload_cpus && q->cpu >= 0) {
		cpu_set_t set = ring_allowed_cpus;

		/* Best effort: without it the workers may share our CPU. */
		CPU_CLR(q->cpu, &set);
		sys_io_uring_register(q->ring.fd, IORING_REGISTER_IOWQ_AFF, &set, sizeof(set));
	}
	q->ents = calloc(q->depth, sizeof(*q->ents));
	q->hdr_mem = buffer_alloc(round_up(hdr_size * q->depth, page_size()));
	q->payload_mem = buffer_alloc(q->payload_size * q->depth);
	if (!q->ents || !q->hdr_mem || !q->payload_mem)
		return -ENOMEM;
	for (unsigned i = 0; i < q->depth; i++) {
		struct ring_entry *e = &q->ents[i];

		e->hdr = (void *)((char *)q->hdr_mem + hdr_size * i);
		e->payload = (char *)q->payload_mem + q->payload_size * i;
		e->iov[0] = (struct iovec){ e->hdr, sizeof(*e->hdr) };
		e->iov[1] = (struct iovec){ e->payload, q->payload_size };
	}
	return 0;
}

static void ring_queue_free(struct ring_queue *q)
{
	size_t hdr_size = round_up(sizeof(struct fuse_uring_req_header), 64);

	if (q->payload_mem)
		munmap(q->payload_mem, q->payload_size * q->depth);
	if (q->hdr_mem)
		munmap(q->hdr_mem, round_up(hdr_size * q->depth, page_size()));
	free(q->ents);
	if (q->ring.map)
		ring_exit(&q->ring);
}

/* Queue the FUSE command that parks entry i: REGISTER the first time,
 * COMMIT_AND_FETCH (carrying the reply now in its buffers) afterwards. */
static void ring_queue_fuse_cmd(struct ring_queue *q, unsigned i)
{
	struct ring_entry *e = &q->ents[i];
	struct io_uring_sqe *sqe = ring_sqe(&q->ring);
	struct fuse_uring_cmd_req *cmd = (void *)sqe->cmd;

	sqe->opcode = IORING_OP_URING_CMD;
	sqe->flags = IOSQE_FIXED_FILE;
	sqe->fd = FIXED_FUSE;
	sqe->user_data = i;
	cmd->qid = (uint16_t)q->qid;
	if (e->registering) {
		sqe->cmd_op = FUSE_IO_URING_CMD_REGISTER;
		sqe->addr = (uintptr_t)e->iov;
		sqe->len = 2;
	} else {
		sqe->cmd_op = FUSE_IO_URING_CMD_COMMIT_AND_FETCH;
		cmd->commit_id = e->hdr->ring_ent_in_out.commit_id;
	}
}

/* Write the reply into the entry's header and queue its commit.  This
 * overwrites the request header: the request must be finished with. */
static void ring_queue_commit(struct ring_queue *q, unsigned i)
{
	struct ring_entry *e = &q->ents[i];
	struct fuse_in_header *in = (void *)e->hdr->in_out;
	struct fuse_out_header out = {
		.error = e->rep.error,
		.unique = in->unique,
	};

	e->hdr->ring_ent_in_out.payload_sz = e->rep.error ? 0 : (uint32_t)e->rep.out_len;
	out.len = (uint32_t)(sizeof(out) + e->hdr->ring_ent_in_out.payload_sz);
	memcpy(e->hdr->in_out, &out, sizeof(out));
	ring_queue_fuse_cmd(q, i);
}

/* Point 'req' at the request in entry e; -EINVAL if its lengths disagree
 * or claim more payload than the entry's buffer holds. */
static int ring_queue_parse(struct ring_entry *e, size_t cap, struct fuse_req *req)
{
	const struct fuse_in_header *in = (const void *)e->hdr->in_out;
	uint32_t payload = e->hdr->ring_ent_in_out.payload_sz;
	size_t hdr_and_payload = sizeof(*in) + (size_t)payload;

	req->in = in;
	req->arg = e->hdr->op_in;
	req->arg_len = 0;
	req->data = e->payload;
	req->data_len = payload;
	if (payload > cap || in->len < hdr_and_payload ||
	    in->len - hdr_and_payload > FUSE_URING_OP_IN_OUT_SZ)
		return -EINVAL;
	req->arg_len = in->len - hdr_and_payload;
	return 0;
}

/*
 * A copy of OFFLOAD_MIN_BYTES or more between the image and the payload is
 * handed to an io-wq worker on another CPU (see ring_queue_setup) instead
 * of being done in the queue thread.  All requests of one client land on
 * the queue of its CPU, whose thread also does the kernel's copy of every
 * reply into the client (inside COMMIT_AND_FETCH): for large requests the
 * two copies then overlap on two CPUs instead of running back to back on
 * one.  Smaller copies are cheaper inline than the hop to a worker.
 */
#define OFFLOAD_MIN_BYTES	(128 * 1024)

static bool ring_io_offload(const struct image_io *io)
{
	return io->len >= OFFLOAD_MIN_BYTES && !image_io_direct(io) && ring_offload_cpus;
}

/* A synchronous write (RWF_DSYNC/RWF_SYNC) ends in a flush of the image:
 * io-wq waits for it, never the queue's thread, which serves every other
 * request of its CPU meanwhile.  O_DIRECT ones complete asynchronously. */
static bool ring_io_async(const struct image_io *io)
{
	return ring_io_offload(io) || (io->rw_flags && !image_io_direct(io));
}

static void ring_queue_image_io(struct ring_queue *q, unsigned i)
{
	struct ring_entry *e = &q->ents[i];
	struct io_uring_sqe *sqe = ring_sqe(&q->ring);

	sqe->opcode = e->io.write ? IORING_OP_WRITE : IORING_OP_READ;
	sqe->flags = IOSQE_FIXED_FILE | (ring_io_async(&e->io) ? IOSQE_ASYNC : 0);
	sqe->rw_flags = e->io.rw_flags;
	sqe->fd = e->io.fd == img.fd ? FIXED_IMAGE : FIXED_IMAGE_BUFFERED;
	sqe->addr = (uintptr_t)e->io.buf + e->io.done;
	sqe->len = e->io.len - e->io.done;
	sqe->off = e->io.off + e->io.done;
	sqe->user_data = UD_IMAGE_IO | i;
}

/* A request arrived in entry i: answer it now, or start its image I/O. */
static void ring_queue_request(struct ring_queue *q, unsigned i)
{
	struct ring_entry *e = &q->ents[i];
	struct fuse_req req;

	e->rep = (struct fuse_reply){ .out = e->payload, .out_cap = q->payload_size };
	__atomic_store_n(&q->served, q->served + 1, __ATOMIC_RELAXED);
	payload_track_zero(&e->zeroed, &e->rep, e->hdr->ring_ent_in_out.payload_sz);
	if (ring_queue_parse(e, q->payload_size, &req) < 0) {
		e->rep.error = -EINVAL;
	} else if (req.in->opcode == FUSE_READ || req.in->opcode == FUSE_WRITE) {
		if (fuse_io_prepare(&req, &e->rep, &e->io)) {
			/* fuse_io_prepare() left io.done at 0. */
			ssize_t n = ring_io_offload(&e->io) ? -EAGAIN : image_io_nowait(&e->io);

			if (n == -EAGAIN) {
				ring_queue_image_io(q, i);
				return;
			}
			fuse_io_done(&e->io, n, &e->rep);
		}
	} else {
		fuse_handle(&req, &e->rep);
	}
	fuse_log_request("q", q->qid, &req, &e->rep);
	payload_track_reply(&e->zeroed, &req, &e->rep);
	ring_queue_commit(q, i);
}

static void ring_queue_io_done(struct ring_queue *q, unsigned i, int res)
{
	struct ring_entry *e = &q->ents[i];
	struct fuse_req req;

	/* A failure after a partial transfer is a short transfer. */
	if (res >= 0 || e->io.done)
		res = (res < 0 ? 0 : res) + (int)e->io.done;
	fuse_io_done(&e->io, res, &e->rep);
	if (log_debug && ring_queue_parse(e, q->payload_size, &req) == 0)
		fuse_log_request("q", q->qid, &req, &e->rep);
	e->zeroed = 0;		/* image data is in the payload now */
	ring_queue_commit(q, i);
}

static void ring_queue_fuse_done(struct ring_queue *q, unsigned i, int res)
{
	struct ring_entry *e = &q->ents[i];

	if (res == 0) {
		e->registering = false;
		ring_queue_request(q, i);
		return;
	}
	if (res == -EAGAIN || res == -EINTR) {	/* e.g. REGISTER racing INIT */
		ring_queue_fuse_cmd(q, i);
		return;
	}
	/* -ENOTCONN/-ECANCELED/-ENODEV: the connection is gone (normal end). */
	if (e->registering && !q->register_err)
		q->register_err = res;
	else if (res != -ENOTCONN && res != -ECANCELED && res != -ENODEV && !stopping)
		log_err("queue %u: entry %u: %s", q->qid, i, strerror(-res));
	q->live--;
}

static int ring_queue_reap(struct ring_queue *q)
{
	struct ring *r = &q->ring;
	unsigned head = atomic_load_explicit(r->cq_head, memory_order_relaxed);
	unsigned tail = atomic_load_explicit(r->cq_tail, memory_order_acquire);
	int n = 0;

	for (; head != tail; head++, n++) {
		const struct io_uring_cqe *cqe = &r->cqes[head & r->cq_mask];
		unsigned i = (unsigned)cqe->user_data;

		if (cqe->user_data & UD_IMAGE_IO)
			ring_queue_io_done(q, i, cqe->res);
		else
			ring_queue_fuse_done(q, i, cqe->res);
	}
	atomic_store_explicit(r->cq_head, head, memory_order_release);
	return n;
}

/* Submit every REGISTER; report failures the kernel gives back at once. */
static void ring_queue_register(struct ring_queue *q)
{
	for (unsigned i = 0; i < q->depth; i++) {
		q->ents[i].registering = true;
		ring_queue_fuse_cmd(q, i);
	}
	q->live = q->depth;
	q->register_err = ring_submit_wait(&q->ring, 0);
	/* A REGISTER the kernel accepts stays parked without a CQE; one it
	 * refuses completes at once.  Collect those (and resubmit EAGAIN). */
	while (!q->register_err) {
		if (ring_submit_wait(&q->ring, 0) < 0 || ring_queue_reap(q) == 0)
			break;
	}
}

static void ring_queue_serve(struct ring_queue *q)
{
	while (q->live > 0) {
		int err = ring_submit_wait(&q->ring, 1);

		if (err < 0) {
			log_err("queue %u: io_uring_enter: %s", q->qid, strerror(-err));
			sleep_ms(10);
		}
		ring_queue_reap(q);
	}
}

static void *ring_queue_main(void *arg)
{
	struct ring_queue *q = arg;

	pin_to_cpu(q->cpu);
	q->setup_err = ring_queue_setup(q);
	uring_report();
	if (uring_wait_go() == 1 && !q->setup_err) {
		ring_queue_register(q);
		uring_report();
		ring_queue_serve(q);
	}
	ring_queue_free(q);
	worker_exited();
	return NULL;
}

static void uring_join(void)
{
	for (unsigned k = 0; k < nr_ring_queues; k++)
		pthread_join(ring_queues[k].thread, NULL);
}

/*
 * Create the queue threads and wait until each has its ring and buffers.
 * Returns 0 when all are ready; otherwise the threads are told to quit.
 */
static int uring_setup(unsigned nq, const char **why)
{
	int cpus[CPU_SETSIZE];
	unsigned nallowed = cpu_list(cpus, CPU_SETSIZE);
	int err = 0;

	ring_queues = calloc(nq, sizeof(*ring_queues));
	if (!ring_queues)
		return -ENOMEM;
	CPU_ZERO(&ring_allowed_cpus);
	for (unsigned j = 0; j < nallowed; j++)
		if (cpus[j] >= 0)
			CPU_SET(cpus[j], &ring_allowed_cpus);
	ring_offload_cpus = CPU_COUNT(&ring_allowed_cpus) > 1;
	for (unsigned k = 0; k < nq; k++) {
		struct ring_queue *q = &ring_queues[k];
		bool allowed = false;

		for (unsigned j = 0; j < nallowed; j++)
			allowed |= cpus[j] == (int)k;
		q->qid = k;
		q->cpu = allowed ? (int)k : -1;	/* offline or not ours: unpinned */
		q->depth = uring_depth;
		q->payload_size = round_up(fuse_max_write > FUSE_MIN_READ_BUFFER ?
					   fuse_max_write : FUSE_MIN_READ_BUFFER, page_size());
		if (pthread_create(&q->thread, NULL, ring_queue_main, q)) {
			err = -EAGAIN;
			break;
		}
		nr_ring_queues++;
		atomic_fetch_add(&workers_live, 1);
	}
	uring_wait_reports(nr_ring_queues);
	for (unsigned k = 0; k < nr_ring_queues && !err; k++)
		err = ring_queues[k].setup_err;
	if (!err && nr_ring_queues)
		ring_flags_string(ring_queues[0].ring.flags, uring_flags_granted,
				  sizeof(uring_flags_granted));
	if (err) {
		*why = "io_uring setup failed";
		uring_set_go(0);
		uring_join();
		nr_ring_queues = 0;
	}
	return err;
}

/* After the INIT reply: let the queues REGISTER and collect the verdict. */
static int uring_register_all(void)
{
	int err = 0;

	uring_set_go(1);
	uring_wait_reports(nr_ring_queues);
	for (unsigned k = 0; k < nr_ring_queues && !err; k++)
		err = ring_queues[k].register_err;
	return err;
}

static uint64_t uring_served(void)
{
	uint64_t n = 0;

	for (unsigned k = 0; k < nr_ring_queues; k++)
		n += __atomic_load_n(&ring_queues[k].served, __ATOMIC_RELAXED);
	return n;
}

/* ======================================================================
 * Mount and unmount
 *
 * Root mounts with mount(2) directly; anyone else goes through the setuid
 * fusermount3, which opens /dev/fuse, mounts, and passes the fd back over
 * the socket named in _FUSE_COMMFD.  The export's root is a regular file
 * (rootmode=100000), grafted onto the regular file MOUNTPOINT.
 * ====================================================================== */

struct mount_opts {
	const char *source;		/* image path, shown in /proc/mounts */
	const char *target;		/* absolute path of the mount point */
	bool allow_other;
	bool privileged;		/* mount(2) vs fusermount3 */
	dev_t dev;			/* the live export's st_dev, 0 before */
};

/* Decode the octal escapes (\040 for space) of a /proc/self/mountinfo field. */
static void mountinfo_unescape(char *s)
{
	char *d = s;

	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] && s[3]) {
			*d++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
			s += 3;
		} else {
			*d++ = *s;
		}
	}
	*d = '\0';
}

/*
 * Is 'path' a mount point?  Returns 1 and the device minor of the topmost
 * mount there, 0 if not mounted, -errno if mountinfo is unreadable.
 * Reading mountinfo sends no request to any FUSE file system.
 */
static int mount_lookup(const char *path, unsigned *minor_out)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char *line = NULL;
	size_t cap = 0;
	int found = 0;

	if (!f)
		return -errno;
	while (getline(&line, &cap, f) > 0) {
		unsigned maj, min;
		char mnt[PATH_MAX + 1];

		if (sscanf(line, "%*u %*u %u:%u %*s %4096s", &maj, &min, mnt) != 3)
			continue;
		mountinfo_unescape(mnt);
		if (strcmp(mnt, path) == 0) {
			found = 1;
			if (minor_out)
				*minor_out = min;
		}
	}
	free(line);
	fclose(f);
	return found;
}

static void mount_opts_string(char *buf, size_t cap, const struct mount_opts *mo,
			      int fd)
{
	int n = 0;

	if (fd >= 0)
		n = snprintf(buf, cap, "fd=%d,rootmode=100000,user_id=%u,group_id=%u,",
			     fd, getuid(), getgid());
	snprintf(buf + n, cap - (size_t)n, "default_permissions,max_read=%u%s",
		 MAX_PAYLOAD, mo->allow_other ? ",allow_other" : "");
}

static int mount_kernel(const struct mount_opts *mo)
{
	char opts[256];
	int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	mount_opts_string(opts, sizeof(opts), mo, fd);
	if (mount(mo->source, mo->target, "fuse.uexportd", MS_NOSUID | MS_NODEV, opts) < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	return fd;
}

/* Receive the /dev/fuse fd fusermount3 sends as SCM_RIGHTS. */
static int fusermount_recv_fd(int sock)
{
	char byte;
	struct iovec iov = { &byte, 1 };
	union {
		struct cmsghdr hdr;
		char buf[CMSG_SPACE(sizeof(int))];
	} ctl;
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = &ctl, .msg_controllen = sizeof(ctl) };
	struct cmsghdr *c;
	ssize_t n;
	int fd;

	do {
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	} while (n < 0 && errno == EINTR);
	if (n <= 0)
		return -EIO;
	c = CMSG_FIRSTHDR(&msg);
	if (!c || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(sizeof(int)))
		return -EIO;
	memcpy(&fd, CMSG_DATA(c), sizeof(fd));
	return fd;
}

/* Run fusermount3 with 'argv'; 'quiet' sends its stderr to /dev/null. */
static int fusermount_run(char *const argv[], int commfd, bool quiet)
{
	pid_t pid = fork();
	int status;

	if (pid < 0)
		return -errno;
	if (pid == 0) {
		char env[32];

		if (commfd >= 0) {
			snprintf(env, sizeof(env), "%d", commfd);
			setenv("_FUSE_COMMFD", env, 1);
		}
		if (quiet) {
			int null = open("/dev/null", O_WRONLY);

			if (null >= 0)
				dup2(null, STDERR_FILENO);
		}
		execvp("fusermount3", argv);
		_exit(127);
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -errno;
	if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
		return -ENOENT;
	return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EPERM;
}

static int mount_fusermount(const struct mount_opts *mo, bool quiet)
{
	char opts[256], fsname[300];
	int sv[2], err, fd;

	mount_opts_string(opts, sizeof(opts), mo, -1);
	/* fsname may not contain a comma: it would end the option. */
	snprintf(fsname, sizeof(fsname), ",fsname=%s,subtype=uexportd", mo->source);
	if (strchr(mo->source, ',') == NULL)
		strncat(opts, fsname, sizeof(opts) - strlen(opts) - 1);
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return -errno;
	/* The child end must survive exec: clear its CLOEXEC flag. */
	fcntl(sv[0], F_SETFD, 0);
	{
		char *argv[] = { "fusermount3", "-o", opts, "--", (char *)mo->target, NULL };

		err = fusermount_run(argv, sv[0], quiet);
	}
	close(sv[0]);
	fd = err ? err : fusermount_recv_fd(sv[1]);
	close(sv[1]);
	return fd;
}

/* Mount; returns the /dev/fuse fd.  allow_other "auto" retries without it. */
static int mount_export(struct mount_opts *mo, bool allow_other_auto)
{
	int fd;

	if (mo->privileged)
		return mount_kernel(mo);
	fd = mount_fusermount(mo, allow_other_auto && mo->allow_other);
	if (fd < 0 && allow_other_auto && mo->allow_other) {
		mo->allow_other = false;
		fd = mount_fusermount(mo, false);
	}
	return fd;
}

static int unmount_export(const struct mount_opts *mo, bool lazy)
{
	char *eager[] = { "fusermount3", "-u", "-q", "--", (char *)mo->target, NULL };
	char *detach[] = { "fusermount3", "-u", "-q", "-z", "--", (char *)mo->target, NULL };

	if (mo->privileged)
		return umount2(mo->target, lazy ? MNT_DETACH : 0) < 0 ? -errno : 0;
	return fusermount_run(lazy ? detach : eager, -1, !lazy);
}

/* Abort the connection through fusectl: the last resort when clients still
 * hold the file after a lazy unmount (root only). */
static void fuse_abort_connection(unsigned minor)
{
	char path[64];

	snprintf(path, sizeof(path), "/sys/fs/fuse/connections/%u/abort", minor);
	if (write_file(path, "1") == -ENOENT) {
		mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0, NULL);
		write_file(path, "1");
	}
}

/* ======================================================================
 * Lifecycle: daemonizing, readiness, signals, shutdown
 *
 * Signals are blocked in every thread and taken synchronously by the main
 * thread with sigwaitinfo(); serving threads wake it with SIGUSR1 when they
 * end.  Without -f the parent waits on a pipe and exits 0 only once the
 * mount is live and serving, so "uexportd img f && cat f" has no race.
 * ====================================================================== */

struct options {
	const char *image;
	const char *mountpoint;
	char mountpoint_abs[PATH_MAX];
	struct stat mountpoint_st;		/* the file underneath, before mounting */
	int mountpoint_lock;			/* start-up lock, see mountpoint_lock() */
	bool writable, growable, direct, foreground, passthrough;
	enum { TRI_AUTO, TRI_ON, TRI_OFF } allow_other, io_uring;
	unsigned queue_depth;
	uint64_t max_memory;
	const char *pidfile;
};

static int ready_pipe = -1;		/* write end; the parent waits on it */

/*
 * Descriptors 0-2 must be open before the daemon opens anything: started
 * with them closed, the image or the start-up pipe would land there, and
 * daemonizing would then replace them with /dev/null.  A bare root may
 * have no /dev/null: a directory descriptor fails every read and write
 * just as harmlessly.
 */
static void stdio_reserve(void)
{
	int fd;

	do {
		fd = open("/dev/null", O_RDWR);
		if (fd < 0)
			fd = open("/", O_RDONLY | O_DIRECTORY);
	} while (fd >= 0 && fd <= STDERR_FILENO);
	if (fd > STDERR_FILENO)
		close(fd);
}

static void close_fd_range(unsigned lo, unsigned hi)
{
	if (lo > hi)
		return;
#ifdef SYS_close_range
	if (syscall(SYS_close_range, lo, hi, 0) == 0)
		return;
#endif
	for (unsigned fd = lo; fd <= hi && fd < 1024; fd++)
		close((int)fd);
}

/* A daemon keeps no descriptor its caller gave it (a script's pipe held
 * open by us would make the script wait forever for EOF), except 'keep'
 * (-1: none), one of its own opened before daemonizing. */
static void close_inherited_fds(int keep)
{
	unsigned lo = STDERR_FILENO + 1;

	if (keep >= (int)lo) {
		close_fd_range(lo, (unsigned)keep - 1);
		lo = (unsigned)keep + 1;
	}
	close_fd_range(lo, ~0U);
}

/*
 * The pidfile is opened and locked (flock) by the first process, before
 * anything else is opened or closed, so that a supervisor's /dev/fd/N names
 * the supervisor's descriptor, and held for the daemon's life: the lock
 * says which daemon owns the file.  The PID goes in once the export is
 * live.  A daemon removes the file only if it is its own -- created by it
 * or holding its PID, a regular file still linked at its path (the inode it
 * locked) -- and before unlocking, so it never removes a file it was wrongly
 * pointed at, nor its successor's pidfile; a successor waits
 * PIDFILE_WAIT_MS for a stopping owner, then opens the path afresh.
 */
#define PIDFILE_WAIT_MS	2000

static struct {
	const char *path;
	int fd;
	struct stat st;			/* of fd */
	bool ours;			/* we created it or wrote our PID in it */
} pidfile = { NULL, -1, { 0 }, false };

/* Same file: the same inode, or the same block device through any node. */
static bool same_file(const struct stat *a, const struct stat *b)
{
	if (S_ISBLK(a->st_mode) && S_ISBLK(b->st_mode))
		return a->st_rdev == b->st_rdev;
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

/* Open an existing pidfile or create a new one (then pidfile.ours); never
 * truncate.  O_NONBLOCK: a FIFO without a reader must not hang us.  A
 * dangling symbolic link is not followed (ENOENT): whoever can plant one
 * must not choose what root creates.  Returns the descriptor or -errno. */
static int pidfile_open_path(void)
{
	int flags = O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC;
	struct stat st;

	for (;;) {
		int fd = open(pidfile.path, flags);

		if (fd >= 0 || errno != ENOENT)
			return fd < 0 ? -errno : fd;
		fd = open(pidfile.path, flags | O_CREAT | O_EXCL, 0644);
		pidfile.ours = fd >= 0;
		if (fd >= 0 || errno != EEXIST)
			return fd < 0 ? -errno : fd;
		/* Created by someone else meanwhile, or a dangling link. */
		if (lstat(pidfile.path, &st) == 0 && S_ISLNK(st.st_mode))
			return -ENOENT;
	}
}

/* Lock the regular file open as pidfile.fd, waiting until 'deadline'.
 * Returns 1 if locked and still linked at its path, 0 if its owner removed
 * it meanwhile (open it again), -EWOULDBLOCK if another daemon still holds
 * it, -errno. */
static int pidfile_lock(uint64_t deadline)
{
	struct stat st;
	int err = flock_until(pidfile.fd, deadline);

	if (err)
		return err;
	return stat(pidfile.path, &st) == 0 && same_file(&st, &pidfile.st);
}

/* The first line of the pidfile, for "in use by process N". */
static void pidfile_holder(char *buf, size_t cap)
{
	int fd = open(pidfile.path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, cap - 1);

	buf[n > 0 ? n : 0] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
	if (fd >= 0)
		close(fd);
}

/* A regular file we may overwrite: empty, or a PID and a newline (a
 * stale pidfile).  Anything else -- a log, the image's backing file, a
 * user's data -- is not ours to truncate. */
static bool pidfile_overwritable(void)
{
	char buf[32];

	if (pidfile.st.st_size == 0)
		return true;
	if (pidfile.st.st_size >= (off_t)sizeof(buf))
		return false;
	pidfile_holder(buf, sizeof(buf));
	return *buf && strspn(buf, "0123456789") == strlen(buf) &&
	       (off_t)strlen(buf) >= pidfile.st.st_size - 1;
}

/* Open and, if it is a regular file, lock 'path'.  Returns 0, -EBUSY when
 * another daemon holds it past PIDFILE_WAIT_MS (its PID in 'holder'),
 * -EEXIST when it holds something else than a PID, or -errno. */
static int pidfile_open(const char *path, char *holder, size_t cap)
{
	uint64_t deadline = now_ns() + PIDFILE_WAIT_MS * 1000000ull;
	int ret;

	pidfile.path = path;
	do {
		pidfile.ours = false;
		pidfile.fd = pidfile_open_path();
		if (pidfile.fd < 0)
			return pidfile.fd;
		if (fstat(pidfile.fd, &pidfile.st) < 0 || fcntl(pidfile.fd, F_SETFL, 0) < 0)
			ret = -errno;
		else
			ret = S_ISREG(pidfile.st.st_mode) ? pidfile_lock(deadline) : 1;
		if (ret == -EWOULDBLOCK) {
			pidfile_holder(holder, cap);
			ret = -EBUSY;
		} else if (ret == 1 && S_ISREG(pidfile.st.st_mode) && !pidfile_overwritable()) {
			ret = -EEXIST;
		}
		if (ret <= 0) {
			close(pidfile.fd);
			pidfile.fd = -1;
		}
	} while (ret == 0);
	return ret < 0 ? ret : 0;
}

/* Write our PID; a regular file holds nothing else.  Returns 0 or -errno. */
static int pidfile_write(void)
{
	char buf[32];
	int len = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
	ssize_t n;

	if (pidfile.fd < 0)
		return 0;
	if (S_ISREG(pidfile.st.st_mode)) {
		if (ftruncate(pidfile.fd, 0) < 0)
			return -errno;
		pidfile.ours = true;
		n = pwrite(pidfile.fd, buf, (size_t)len, 0);
	} else {
		n = write(pidfile.fd, buf, (size_t)len);
	}
	n = n < 0 ? -errno : n == len ? 0 : -EIO;
	/* A pipe or FIFO: its reader waits for EOF after the PID. */
	if (!S_ISREG(pidfile.st.st_mode)) {
		close(pidfile.fd);
		pidfile.fd = -1;
	}
	return (int)n;
}

/* Remove the pidfile if it is ours and still there, then release it. */
static void pidfile_remove(void)
{
	struct stat st;

	if (pidfile.fd < 0)
		return;
	if (pidfile.ours && S_ISREG(pidfile.st.st_mode) && stat(pidfile.path, &st) == 0 &&
	    same_file(&st, &pidfile.st))
		unlink(pidfile.path);
	close(pidfile.fd);
	pidfile.fd = -1;
}

/* The daemon died before it could unmount: do not leave its dead mount.
 * realpath() of the mount point itself would stat the dead mount, so
 * resolve its directory only. */
static void unmount_dead(const char *mountpoint)
{
	char dir[PATH_MAX], abs[PATH_MAX + NAME_MAX + 2];
	const char *slash = strrchr(mountpoint, '/');
	const char *base = slash ? slash + 1 : mountpoint;

	snprintf(dir, sizeof(dir), "%.*s", slash ? (int)(slash - mountpoint) + 1 : 1,
		 slash ? mountpoint : ".");
	if (geteuid() != 0 || !realpath(dir, abs))
		return;
	snprintf(abs + strlen(abs), sizeof(abs) - strlen(abs), "%s%s",
		 strcmp(abs, "/") ? "/" : "", base);
	if (mount_lookup(abs, NULL) == 1)
		umount2(abs, MNT_DETACH);
}

/*
 * The parent's side of start-up: wait on 'rfd' for the child's "live" byte
 * and return the exit status to leave with.  The signals main() blocked
 * are taken here too: SIGINT, SIGTERM or SIGHUP (Ctrl-C, timeout(1), a
 * supervisor) are passed on to the child, which stops as soon as it can,
 * and the start counts as failed -- a caller that gave up never gets a
 * daemon it did not wait for, nor a parent that ignores it.
 */
static int daemonize_wait(pid_t child, int rfd, const char *mountpoint)
{
	static const struct timespec tick = { 0, 100 * 1000000L };
	struct pollfd pfd = { .fd = rfd, .events = POLLIN };
	bool interrupted = false;
	sigset_t set;
	int status;
	char ok;

	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	for (;;) {
		int sig = sigtimedwait(&set, NULL, &tick);

		if (sig > 0 && !interrupted) {
			log_err("start-up interrupted by signal %d: stopping the daemon", sig);
			kill(child, SIGTERM);
			interrupted = true;
		}
		if (poll(&pfd, 1, 0) == 1) {
			if (read(rfd, &ok, 1) == 1 && !interrupted)
				return 0;
			if (!interrupted)
				break;	/* EOF: the child failed */
		}
		if (interrupted && waitpid(child, &status, WNOHANG) == child)
			return 1;
	}
	/* The child failed; it has printed why, unless it was killed. */
	if (waitpid(child, &status, 0) == child && WIFEXITED(status))
		return WEXITSTATUS(status) ? WEXITSTATUS(status) : 1;
	if (WIFSIGNALED(status)) {
		log_err("daemon killed by signal %d during start-up", WTERMSIG(status));
		unmount_dead(mountpoint);
	}
	pidfile_remove();
	return 1;
}

/* Fork; the parent waits for the child's verdict and exits with it.
 * Returns 0 in the child, -errno if the pipe or the fork failed. */
static int daemonize_begin(const char *mountpoint)
{
	int p[2];
	pid_t pid;

	close_inherited_fds(pidfile.fd);
	if (pipe2(p, O_CLOEXEC) < 0)
		return -errno;
	pid = fork();
	if (pid < 0)
		return -errno;
	if (pid > 0) {
		close(p[1]);
		_exit(daemonize_wait(pid, p[0], mountpoint));
	}
	close(p[0]);
	ready_pipe = p[1];
	setsid();
	openlog("uexportd", LOG_PID, LOG_DAEMON);
	return 0;
}

/* Start-up succeeded: release the parent and drop the terminal. */
static void daemonize_finish(void)
{
	int null;

	if (ready_pipe < 0)
		return;
	log_syslog = true;
	null = open("/dev/null", O_RDWR);
	if (null >= 0) {
		dup2(null, STDIN_FILENO);
		dup2(null, STDOUT_FILENO);
		dup2(null, STDERR_FILENO);
		if (null > STDERR_FILENO)
			close(null);
	}
	if (write(ready_pipe, "", 1) != 1)
		log_err("start-up handshake: %s", strerror(errno));
	close(ready_pipe);
	ready_pipe = -1;
}

/* READY=1 to $NOTIFY_SOCKET (systemd Type=notify), no library needed. */
static void notify_ready(void)
{
	const char *path = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	socklen_t len;
	int fd;

	if (!path || !*path || strlen(path) >= sizeof(sa.sun_path))
		return;
	memcpy(sa.sun_path, path, strlen(path));
	if (sa.sun_path[0] == '@')
		sa.sun_path[0] = '\0';
	len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(path));
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return;
	sendto(fd, "READY=1", 7, MSG_NOSIGNAL, (struct sockaddr *)&sa, len);
	close(fd);
}

/* Wait up to 'ms' for every serving thread to end. */
static bool workers_wait(unsigned ms)
{
	uint64_t deadline = now_ns() + (uint64_t)ms * 1000000u;

	while (atomic_load(&workers_live) > 0) {
		if (now_ns() > deadline)
			return false;
		sleep_ms(10);
	}
	return true;
}

/*
 * Write back what clients left in the kernel's page cache of the export --
 * stores through a shared mapping -- and fsync the image, by an fsync of
 * the export itself: the kernel first sends every dirty page as a WRITE,
 * then FSYNC (fs/fuse/file.c, fuse_fsync()).  A lazy detach keeps those
 * pages only as long as someone holds the file and an abort drops them, so
 * this comes before either.  The serving threads answer it: call it only
 * while all of them run.  The path must still be our export (st_dev), or
 * it would open the file underneath.  Returns 0 or -errno.
 */
static int export_flush(const struct mount_opts *mo)
{
	struct stat st;
	int fd = open(mo->target, O_RDONLY | O_NOCTTY | O_CLOEXEC);
	int err = 0;

	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0)
		err = -errno;
	else if (st.st_dev != mo->dev)
		err = -ESTALE;
	else if (fsync(fd) < 0)
		err = -errno;
	close(fd);
	return err;
}

/*
 * Stop serving.  Unmount normally; if a client still holds the file, detach
 * lazily and keep serving it for SHUTDOWN_GRACE_MS, then abort the
 * connection (root) so nothing waits on a daemon that is gone.  Requests
 * keep being served throughout: the threads end only when the kernel says
 * the connection is gone (ENODEV), never by being cancelled.  'flush':
 * the export is live and served, write its page cache back first.
 */
static void shutdown_export(const struct mount_opts *mo, bool flush)
{
	unsigned ours = mo->dev ? minor(mo->dev) : 0, top = 0;
	int err;

	if (flush && (err = export_flush(mo)) < 0)
		log_err("write-back of %s before unmounting: %s", mo->target, strerror(-err));
	stopping = true;
	/* Still mounted even if every thread is gone (an abort): a dead mount
	 * must not outlive us.  Unmount only our own connection: something
	 * mounted over it since (a bind mount) is not ours to take down. */
	if (mount_lookup(mo->target, &top) == 1 && (!ours || top == ours)) {
		ours = top;
		if (unmount_export(mo, false) < 0) {
			log_info("%s is busy: detaching lazily", mo->target);
			unmount_export(mo, true);
		}
	} else if (ours) {
		log_info("%s is no longer our mount on top: not unmounting it", mo->target);
	}
	if (!workers_wait(SHUTDOWN_GRACE_MS) && mo->privileged && ours) {
		log_info("clients still hold %s: aborting the connection", mo->target);
		fuse_abort_connection(ours);
	}
}

/* ======================================================================
 * Options and main
 * ====================================================================== */

static void usage(FILE *f)
{
	fprintf(f,
"Usage: uexportd [OPTIONS] IMAGE MOUNTPOINT\n"
"Export IMAGE (a regular file, a block device, or null:SIZE) as the regular\n"
"file MOUNTPOINT (which must exist) through FUSE.\n"
"\n"
"  -w, --writable           allow writes (default: read-only)\n"
"  -g, --growable           writes past EOF and truncate may grow the image\n"
"                           (needs --writable)\n"
"      --allow-other=MODE   on|off|auto: let other users access the export\n"
"                           (default auto: try, fall back without)\n"
"      --io-uring=MODE      auto|on|off: FUSE-over-io_uring transport\n"
"  -q, --queue-depth=N      requests in flight per queue, 1-%d (default %d)\n"
"      --max-memory=SIZE    bound on request buffers over all queues; depth and\n"
"                           request size shrink to fit (default 256M)\n"
"      --direct             open the image with O_DIRECT (no host page cache)\n"
"      --passthrough        the kernel reads and writes a regular-file image\n"
"                           itself (root, Linux 6.9+; needs --growable if -w)\n"
"  -f, --foreground         do not daemonize\n"
"  -p, --pidfile=FILE       write the daemon's pid once the export is live\n"
"  -v, --verbose            log start-up details to stderr\n"
"  -d, --debug              log one line per request (implies -f -v)\n"
"  -h, --help               show this help\n"
"  -V, --version            show the version\n"
"\n"
"SIZE for null: takes K, M, G, T suffixes (null:1G).  Stop with SIGTERM or\n"
"by unmounting MOUNTPOINT.\n", MAX_QUEUE_DEPTH, DEFAULT_QUEUE_DEPTH);
}

static int parse_tristate(const char *name, const char *v, int *out, const char *const words[3])
{
	for (int i = 0; i < 3; i++) {
		if (strcmp(v, words[i]) == 0) {
			*out = i;
			return 0;
		}
	}
	log_err("invalid --%s '%s' (expected %s, %s or %s)", name, v, words[0], words[1], words[2]);
	return -EINVAL;
}

enum { OPT_ALLOW_OTHER = 256, OPT_IO_URING, OPT_DIRECT, OPT_MAX_MEMORY, OPT_PASSTHROUGH };

static int parse_options(int argc, char **argv, struct options *o)
{
	static const struct option longopts[] = {
		{ "writable", no_argument, NULL, 'w' },
		{ "growable", no_argument, NULL, 'g' },
		{ "allow-other", required_argument, NULL, OPT_ALLOW_OTHER },
		{ "io-uring", required_argument, NULL, OPT_IO_URING },
		{ "queue-depth", required_argument, NULL, 'q' },
		{ "direct", no_argument, NULL, OPT_DIRECT },
		{ "max-memory", required_argument, NULL, OPT_MAX_MEMORY },
		{ "passthrough", no_argument, NULL, OPT_PASSTHROUGH },
		{ "foreground", no_argument, NULL, 'f' },
		{ "pidfile", required_argument, NULL, 'p' },
		{ "verbose", no_argument, NULL, 'v' },
		{ "debug", no_argument, NULL, 'd' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	static const char *const aw[3] = { "auto", "on", "off" };
	int c, v;
	char *end;

	o->queue_depth = DEFAULT_QUEUE_DEPTH;
	o->max_memory = DEFAULT_MAX_MEMORY;
	while ((c = getopt_long(argc, argv, "wgq:fp:vdhV", longopts, NULL)) != -1) {
		switch (c) {
		case 'w': o->writable = true; break;
		case 'g': o->growable = true; break;
		case 'f': o->foreground = true; break;
		case 'p': o->pidfile = optarg; break;
		case 'v': log_verbose = true; break;
		case 'd': log_debug = log_verbose = o->foreground = true; break;
		case OPT_DIRECT: o->direct = true; break;
		case OPT_PASSTHROUGH: o->passthrough = true; break;
		case OPT_MAX_MEMORY:
			if (parse_size(optarg, &o->max_memory) < 0 || o->max_memory < (1u << 20)) {
				log_err("invalid --max-memory '%s' (expected a size of at least 1M, "
					"e.g. 256M)", optarg);
				return -EINVAL;
			}
			break;
		case OPT_ALLOW_OTHER:
			if (parse_tristate("allow-other", optarg, &v, aw) < 0)
				return -EINVAL;
			o->allow_other = v;
			break;
		case OPT_IO_URING:
			if (parse_tristate("io-uring", optarg, &v, aw) < 0)
				return -EINVAL;
			o->io_uring = v;
			break;
		case 'q': {
			/* Range-checked on the full value, before narrowing. */
			long depth;

			errno = 0;
			depth = strtol(optarg, &end, 10);
			if (errno || *end || end == optarg || depth < 1 || depth > MAX_QUEUE_DEPTH) {
				log_err("invalid --queue-depth '%s' (expected 1-%d)",
					optarg, MAX_QUEUE_DEPTH);
				return -EINVAL;
			}
			o->queue_depth = (unsigned)depth;
			break;
		}
		case 'h': usage(stdout); exit(0);
		case 'V': printf("uexportd %s\n", UEXPORTD_VERSION); exit(0);
		default:
			fprintf(stderr, "Try 'uexportd --help' for more information.\n");
			return -EINVAL;
		}
	}
	if (argc - optind != 2) {
		log_err("expected IMAGE and MOUNTPOINT (see --help)");
		return -EINVAL;
	}
	o->image = argv[optind];
	o->mountpoint = argv[optind + 1];
	if (o->growable && !o->writable) {
		log_err("--growable needs --writable");
		return -EINVAL;
	}
	if (o->passthrough && o->direct) {
		log_err("--passthrough and --direct exclude each other "
			"(the kernel does the image I/O itself)");
		return -EINVAL;
	}
	if (o->passthrough && o->writable && !o->growable) {
		log_err("--passthrough cannot cut writes short at EOF: add --growable, "
			"or drop --writable");
		return -EINVAL;
	}
	return 0;
}

/*
 * Serialize start-ups on one mount point: the check that it is not mounted
 * and our mount are two steps, and two daemons started together would both
 * pass the check and stack.  An flock on the file there (the file
 * underneath, or a winner's export once mounted) is held from the check
 * until the export is live or has failed (see serve).  Best effort when
 * the file cannot be opened for reading.  Returns 0, or -EWOULDBLOCK after
 * MOUNTPOINT_LOCK_MS (longer than any start-up waits).
 */
#define MOUNTPOINT_LOCK_MS	(RING_READY_TIMEOUT_MS + 5000)

static int mountpoint_lock(struct options *o)
{
	int err;

	o->mountpoint_lock = open(o->mountpoint_abs, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	if (o->mountpoint_lock < 0)
		return 0;
	err = flock_until(o->mountpoint_lock, now_ns() + MOUNTPOINT_LOCK_MS * 1000000ull);
	if (err) {
		close(o->mountpoint_lock);
		o->mountpoint_lock = -1;
	}
	return err == -EWOULDBLOCK ? err : 0;
}

/* The mount point must be an existing regular file. */
static int check_mountpoint(struct options *o)
{
	struct stat *st = &o->mountpoint_st;

	if (stat(o->mountpoint, st) < 0) {
		log_err("mount point %s: %s", o->mountpoint, strerror(errno));
		return -errno;
	}
	if (!S_ISREG(st->st_mode)) {
		log_err("mount point %s: %s", o->mountpoint, S_ISDIR(st->st_mode) ?
			"is a directory (it must be a regular file)" : "not a regular file");
		return -EINVAL;
	}
	if (!realpath(o->mountpoint, o->mountpoint_abs)) {
		log_err("mount point %s: %s", o->mountpoint, strerror(errno));
		return -errno;
	}
	return 0;
}

/* Take the mount point: locked against other start-ups, not mounted yet. */
static int claim_mountpoint(struct options *o)
{
	if (mountpoint_lock(o) < 0) {
		log_err("mount point %s: another uexportd is still starting on it", o->mountpoint);
		return -EBUSY;
	}
	if (mount_lookup(o->mountpoint_abs, NULL) == 1) {
		log_err("mount point %s: already a mount point", o->mountpoint);
		return -EBUSY;
	}
	return 0;
}

/* The daemon writes its pidfile: it must be neither the image nor the
 * mount point, by whatever name (a link, /dev/fd/N, another device node),
 * nor a disk or another export (the root file of a FUSE mount). */
static int pidfile_check(const struct options *o)
{
	struct statfs sfs;
	struct stat st;

	if (pidfile.fd < 0)
		return 0;
	if (S_ISBLK(pidfile.st.st_mode) ||
	    (pidfile.st.st_ino == FUSE_ROOT_ID && fstatfs(pidfile.fd, &sfs) == 0 &&
	     sfs.f_type == FUSE_SUPER_MAGIC)) {
		log_err("pidfile %s: is a %s", o->pidfile,
			S_ISBLK(pidfile.st.st_mode) ? "block device" : "FUSE export");
		return -EINVAL;
	}
	if (img.fd >= 0 && fstat(img.fd, &st) == 0 && same_file(&st, &pidfile.st)) {
		log_err("pidfile %s: is the image %s", o->pidfile, o->image);
		return -EINVAL;
	}
	if (same_file(&o->mountpoint_st, &pidfile.st)) {
		log_err("pidfile %s: is the mount point %s", o->pidfile, o->mountpoint);
		return -EINVAL;
	}
	return 0;
}

static int open_image(const struct options *o)
{
	int err;

	img.writable = o->writable;
	img.growable = o->growable;
	img.direct = o->direct;
	img.mode = o->writable ? 0600 : 0400;
	img.uid = getuid();
	img.gid = getgid();
	img.allow_chown = o->allow_other != TRI_OFF;
	err = image_open(o->image);
	if (!err && o->passthrough && img.backend != BACKEND_FILE) {
		log_err("--passthrough needs a regular-file image");
		return -EINVAL;
	}
	/* The export's size is always what the image can hold. */
	if (!err && o->growable && img.backend == BACKEND_BLOCKDEV) {
		log_err("--growable: %s is a block device, whose size is fixed", o->image);
		return -EINVAL;
	}
	img.passthrough = o->passthrough;
	if (err == -EINVAL && strncmp(o->image, "null:", 5) == 0)
		log_err("invalid image '%s' (expected null:SIZE, e.g. null:1G)", o->image);
	else if (err == -EINVAL)
		log_err("%s: not a regular file or block device", o->image);
	else if (err)
		log_err("open %s: %s", o->image, strerror(-err));
	return err;
}

/*
 * Fit the request buffers in the memory budget.  io_uring needs 'depth'
 * payload buffers of max_write bytes for each of 'units' queues (one per
 * possible CPU: 256 CPUs x 64 x 1 MiB would be 16 GiB); /dev/fuse threads
 * need two each.  Shrink depth to 16 first, then the payload down to
 * MIN_PAYLOAD, then depth again.  Buffers are faulted in only when used, so
 * this bounds the worst case, not the usual RSS.
 */
static void memory_plan(uint64_t budget, unsigned units, unsigned *depth, uint32_t *payload)
{
	*payload = MAX_PAYLOAD;
	while ((uint64_t)units * *depth * *payload > budget) {
		if (*depth > 16)
			*depth = *depth / 2 < 16 ? 16 : *depth / 2;
		else if (*payload > MIN_PAYLOAD)
			*payload /= 2;
		else if (*depth > 1)
			(*depth)--;
		else
			break;		/* over budget even at the minimum */
	}
}

static void memory_plan_log(uint64_t budget, unsigned units, unsigned depth, uint32_t payload)
{
	log_info("memory: %u x %u buffers of %u KiB = %llu MiB (budget %llu MiB)",
		 units, depth, payload >> 10,
		 (unsigned long long)((uint64_t)units * depth * payload >> 20),
		 (unsigned long long)(budget >> 20));
}

/* Register the image as the backing file every OPEN will name (root only:
 * the kernel wants CAP_SYS_ADMIN). */
static int passthrough_open(void)
{
	struct fuse_backing_map map = { .fd = img.fd };
	int id = ioctl(fuse_dev_fd, FUSE_DEV_IOC_BACKING_OPEN, &map);

	if (id < 0) {
		log_err("--passthrough: register %s as backing file: %s%s", img.path,
			strerror(errno), errno == EPERM ? " (needs root)" : "");
		return -errno;
	}
	img.backing_id = id;
	return 0;
}

/* Why the kernel did not offer FUSE_OVER_IO_URING. */
static const char *uring_unavailable_reason(void)
{
	char v[8];

	if (read_small_file("/sys/module/fuse/parameters/enable_uring", v, sizeof(v)) <= 0)
		return "kernel has no FUSE-over-io_uring (needs Linux 6.14+)";
	if (v[0] != 'Y')
		return "enable_uring is off";
	return "kernel did not offer FUSE_OVER_IO_URING";
}

/*
 * Read FUSE_INIT from the fresh connection and answer it, setting up the
 * io_uring queues first when wanted: FUSE_OVER_IO_URING may be offered in
 * the reply only once every ring and buffer exists (the kernel blocks all
 * requests until the rings are ready), and REGISTERs may go out only after
 * the reply is written.  On return *reason is NULL if the rings are
 * registered, else why the export runs on /dev/fuse.
 */
static int fuse_handshake(const struct options *o, unsigned nr_cpus, const char **reason)
{
	static char why[128];
	char *buf = malloc(FUSE_MIN_READ_BUFFER);
	struct {
		struct fuse_out_header hdr;
		struct fuse_init_out init;
	} reply;
	const struct fuse_in_header *in = (const void *)buf;
	const struct fuse_init_in *init = (const void *)(in + 1);
	uint32_t payload;
	bool uring = false;
	ssize_t n;
	int err;

	if (!buf)
		return -ENOMEM;
	do {
		n = read(fuse_dev_fd, buf, FUSE_MIN_READ_BUFFER);
	} while (n < 0 && errno == EINTR);
	err = n < 0 ? -errno : 0;
	if (!err && ((size_t)n < sizeof(*in) + sizeof(*init) || in->opcode != FUSE_INIT))
		err = -EPROTO;
	*reason = "--io-uring=off";
	if (!err && o->io_uring != TRI_OFF) {
		bool offered = (init->flags & FUSE_INIT_EXT) &&
			       ((uint64_t)init->flags2 << 32 & FUSE_OVER_IO_URING);
		int nq = possible_cpus(), uerr = -EOPNOTSUPP;

		*reason = uring_unavailable_reason();
		if (offered && nq < 0) {
			*reason = "cannot read /sys/devices/system/cpu/possible";
			offered = false;
		}
		if (offered) {
			memory_plan(o->max_memory, (unsigned)nq, &uring_depth, &payload);
			memory_plan_log(o->max_memory, (unsigned)nq, uring_depth, payload);
			err = fuse_init(init, &reply.init, payload, nr_cpus);
			uerr = err ? err : uring_setup((unsigned)nq, reason);
		}
		if (offered && uerr) {
			snprintf(why, sizeof(why), "%s: %s", *reason, strerror(-uerr));
			*reason = why;
		}
		uring = !uerr;
		if (uring)
			reply.init.flags2 |= (uint32_t)(FUSE_OVER_IO_URING >> 32);
	}
	if (!err && !uring) {
		unsigned two = 2;

		memory_plan(o->max_memory, nr_cpus, &two, &payload);
		memory_plan_log(o->max_memory, nr_cpus, two, payload);
		err = fuse_init(init, &reply.init, payload, nr_cpus);
	}
	reply.hdr.len = err ? sizeof(reply.hdr) : sizeof(reply);
	reply.hdr.error = err;
	reply.hdr.unique = n > 0 ? in->unique : 0;
	if (n > 0 && write(fuse_dev_fd, &reply, reply.hdr.len) < 0 && !err)
		err = -errno;
	free(buf);
	if (err == -EOPNOTSUPP && img.passthrough)
		log_err("--passthrough: the kernel does not offer FUSE passthrough "
			"(needs Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)");
	if (!err && img.passthrough)
		err = passthrough_open();
	if (uring && !err) {
		int rerr = uring_register_all();

		*reason = NULL;
		if (rerr) {
			/* The kernel has downgraded the connection to /dev/fuse. */
			snprintf(why, sizeof(why), "io_uring REGISTER failed: %s", strerror(-rerr));
			*reason = why;
		}
	} else if (uring) {
		uring_set_go(0);
		uring_join();
		nr_ring_queues = 0;
	}
	return err;
}

/*
 * Ask for our own attributes: the GETATTR must come through a ring, else
 * the kernel is not using them (a silent downgrade we must not hide).  The
 * stat runs in a helper thread so a ring that never becomes ready (every
 * request would block in the kernel) fails start-up instead of hanging it;
 * the helper only touches static data, so it may outlive a failed start.
 * Returns 1 if served by a ring, 0 if not, -ETIMEDOUT.
 */
static struct {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	char path[PATH_MAX];
	bool done;
} probe = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, "", false };

static void *probe_main(void *arg)
{
	struct stat st;

	(void)arg;
	stat(probe.path, &st);
	pthread_mutex_lock(&probe.lock);
	probe.done = true;
	pthread_cond_signal(&probe.cond);
	pthread_mutex_unlock(&probe.lock);
	return NULL;
}

static int uring_confirmed(const struct options *o)
{
	struct timespec deadline;
	pthread_t t;
	int err = 0;

	snprintf(probe.path, sizeof(probe.path), "%s", o->mountpoint_abs);
	if (pthread_create(&t, NULL, probe_main, NULL))
		return 0;
	pthread_detach(t);
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += RING_READY_TIMEOUT_MS / 1000;
	pthread_mutex_lock(&probe.lock);
	while (!probe.done && err != ETIMEDOUT)
		err = pthread_cond_timedwait(&probe.cond, &probe.lock, &deadline);
	pthread_mutex_unlock(&probe.lock);
	if (!probe.done)
		return -ETIMEDOUT;
	return uring_served() > 0;
}

static void log_startup(const struct options *o, const char *reason)
{
	char line[1024], how[256];

	if (reason)
		snprintf(how, sizeof(how), "transport=dev-fuse threads=%u reason=%s",
			 nr_workers, reason);
	else
		snprintf(how, sizeof(how), "transport=uring queues=%u depth=%u",
			 nr_ring_queues, uring_depth);
	snprintf(line, sizeof(line), "%s (%llu bytes, %s%s%s) on %s: %s",
		 o->image, (unsigned long long)img.size, img.writable ? "rw" : "ro",
		 img.growable ? ",growable" : "", img.passthrough ? ",passthrough" : "",
		 o->mountpoint, how);
	/* Foreground, or -v: on stderr.  Daemonized: also syslog. */
	if (o->foreground || log_verbose)
		fprintf(stderr, "uexportd: %s\n", line);
	if (!o->foreground)
		syslog(LOG_INFO, "%s", line);
	if (!reason)
		log_info("io_uring: setup flags %s, payload %u bytes per entry, "
			 "copies of %u KiB+ on io-wq: %s", uring_flags_granted, fuse_max_write,
			 OFFLOAD_MIN_BYTES >> 10, ring_offload_cpus ? "other CPUs" : "off (one CPU)");
}

static int mount_error(const struct mount_opts *mo, const struct options *o, int err)
{
	if (err == -ENOENT && mo->privileged)
		log_err("open /dev/fuse: %s (is the fuse module loaded?)", strerror(-err));
	else if (err == -ENOENT)
		log_err("fusermount3 not found: install fuse3 or run as root");
	else
		log_err("mount on %s: %s", o->mountpoint, strerror(-err));
	return err;
}

/* Mount, negotiate, start the transports; returns once serving. */
static int start_export(struct options *o, struct mount_opts *mo)
{
	const char *reason;
	int cpus[CPU_SETSIZE];
	int err;

	uring_depth = o->queue_depth;
	if (o->io_uring == TRI_ON && strcmp(uring_unavailable_reason(), "enable_uring is off") == 0) {
		log_err("--io-uring=on: FUSE-over-io_uring is off "
			"(echo Y > /sys/module/fuse/parameters/enable_uring)");
		return -EOPNOTSUPP;
	}
	fuse_dev_fd = mount_export(mo, o->allow_other == TRI_AUTO);
	if (fuse_dev_fd < 0)
		return mount_error(mo, o, fuse_dev_fd);
	err = fuse_handshake(o, cpu_list(cpus, CPU_SETSIZE), &reason);
	/* /dev/fuse threads run in io_uring mode too: FORGET and INTERRUPT
	 * always arrive there, and so does everything after a downgrade. */
	if (!err)
		err = devfuse_start();
	if (!err && !reason) {
		int ok = uring_confirmed(o);

		if (ok == 0)
			reason = "kernel did not deliver requests through the rings";
		if (ok < 0) {
			log_err("io_uring: the kernel did not make the rings ready in %d s",
				RING_READY_TIMEOUT_MS / 1000);
			err = ok;
		}
	}
	if (!err && reason && o->io_uring == TRI_ON) {
		log_err("--io-uring=on: FUSE-over-io_uring unavailable: %s", reason);
		err = -EOPNOTSUPP;
	} else if (err) {
		log_err("start on %s: %s", o->mountpoint, strerror(-err));
	}
	if (!err) {
		struct stat st;

		/* Served now: the stat cannot hang. */
		err = stat(mo->target, &st) < 0 ? -errno : 0;
		mo->dev = st.st_dev;
		if (err)
			log_err("stat %s: %s", o->mountpoint, strerror(-err));
	}
	if (!err && (err = pidfile_write()) < 0)
		log_err("pidfile %s: %s", o->pidfile, strerror(-err));
	if (!err)
		log_startup(o, reason);
	return err;
}

/*
 * Stop and flush the image.  The pidfile goes first: once the mount is
 * gone, a successor may start and take the same path.  Returns 0, or the
 * -errno of the image's final fsync (acknowledged writes may be lost).
 */
static int stop_export(const struct options *o, const struct mount_opts *mo, bool flush)
{
	int err = 0;

	pidfile_remove();
	shutdown_export(mo, flush);
	devfuse_join();
	uring_join();
	if (img.writable && (err = image_sync(false)) < 0)
		log_err("flush %s: %s", o->image, strerror(-err));
	return err;
}

static int serve(struct options *o)
{
	struct mount_opts mo = {
		.source = o->image, .target = o->mountpoint_abs,
		.allow_other = o->allow_other != TRI_OFF, .privileged = geteuid() == 0,
	};
	siginfo_t si;
	sigset_t set;
	int err, threads;

	err = start_export(o, &mo);
	if (o->mountpoint_lock >= 0)
		close(o->mountpoint_lock);
	if (err) {
		if (fuse_dev_fd >= 0)
			stop_export(o, &mo, false);
		return err;
	}
	daemonize_finish();
	notify_ready();

	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	sigaddset(&set, SIGUSR1);
	threads = atomic_load(&workers_live);
	for (;;) {
		if (sigwaitinfo(&set, &si) < 0)
			continue;
		if (si.si_signo != SIGUSR1) {
			log_info("signal %d: shutting down", si.si_signo);
			break;
		}
		if (atomic_load(&workers_live) < threads)
			break;		/* unmounted, or a thread failed */
	}
	/* After an unmount the kernel has written its page cache back; a
	 * read-only export has none to write. */
	return stop_export(o, &mo, img.writable && atomic_load(&workers_live) == threads);
}

int main(int argc, char **argv)
{
	struct options o = { .mountpoint_lock = -1 };
	char holder[32];
	sigset_t set;
	int err = 0;

	stdio_reserve();
	if (parse_options(argc, argv, &o) < 0)
		return 2;

	/* Block the signals we take with sigwaitinfo before any thread exists:
	 * threads inherit the mask. */
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGPIPE);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	main_thread = pthread_self();

	if (o.pidfile && (err = pidfile_open(o.pidfile, holder, sizeof(holder))) < 0) {
		if (err == -EBUSY)
			log_err("pidfile %s: in use by process %s", o.pidfile,
				*holder ? holder : "(unknown)");
		else if (err == -EEXIST)
			log_err("pidfile %s: holds something other than a PID; not overwritten",
				o.pidfile);
		else
			log_err("pidfile %s: %s", o.pidfile, strerror(-err));
		return 1;
	}
	if (!o.foreground && (err = daemonize_begin(o.mountpoint)) < 0)
		log_err("daemonize: %s", strerror(-err));
	if (!err && (open_image(&o) < 0 || check_mountpoint(&o) < 0 || pidfile_check(&o) < 0 ||
		     claim_mountpoint(&o) < 0))
		err = -EINVAL;
	if (!err)
		err = serve(&o);
	pidfile_remove();
	return err < 0 ? 1 : 0;
}
