// SPDX-License-Identifier: BSD-2-Clause
/*
 * uexportd - export a raw disk image as one regular file through FUSE.
 *
 * The image (a regular file, a block device, or the "null:SIZE" test backend),
 * or a window of it (a byte range, an MBR or GPT partition), appears at
 * MOUNTPOINT, itself an existing regular file the export is mounted on top
 * of, byte for byte.  Requests are answered by transport-independent
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
 * from our own fuse_kernel.h.  Sections, bottom-up (each uses only those
 * above it):
 *
 *   platform -> io_uring rings -> partition tables -> image backends ->
 *   FUSE protocol -> transports (/dev/fuse, io_uring) -> mount ->
 *   start-up -> lifecycle -> options and main
 *
 * State: main() creates one struct export (the image, the connection, the
 * serving threads) and passes it down; the io_uring side is its own struct
 * ring_pool.  The only file-scope variables are the log's settings.
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
#include <sys/prctl.h>
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
#ifndef STATX_TYPE		/* musl declares no statx(): the uapi's struct */
#include <linux/stat.h>
#endif

#include "fuse_kernel.h"

#define UEXPORTD_VERSION	"0.1"

/* Kernel uapi values not every libc exports (linux/fs.h, linux/falloc.h). */
#ifndef BLKGETSIZE64
#define BLKGETSIZE64		_IOR(0x12, 114, size_t)
#endif
#ifndef BLKSSZGET
#define BLKSSZGET		_IO(0x12, 104)
#endif
#ifndef BLKROGET
#define BLKROGET		_IO(0x12, 94)
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

/* Exit statuses (README, "Exit status"; uexportd.8).  The reason is
 * always logged. */
enum {
	EXIT_FAILED = 1,	/* anything else: pidfile, fork, serving machinery */
	EXIT_USAGE = 2,		/* bad command line */
	EXIT_DATA_LOST = 3,	/* served, but acknowledged writes may be lost */
	EXIT_IMAGE = 4,		/* IMAGE cannot be opened or used */
	EXIT_MOUNTPOINT = 5,	/* MOUNTPOINT unusable: missing, wrong type, busy, dead */
	EXIT_MOUNT = 6,		/* mounting or the FUSE handshake failed */
};

/* Wire layouts the protocol promises (include/uapi/linux/fuse.h). */
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
 * Platform: logging, small syscall helpers, parsing, CPUs
 *
 * Everything below returns -errno on failure; only the boundary (main, a
 * start-up phase's caller, a thread's top level) logs, once, with context.
 * The log's settings are the program's only file-scope variables: fixed by
 * the options, except where messages go, set once by log_detach() in a
 * process that lets its caller's stderr go (the daemon, its watcher).
 * ====================================================================== */

static const char *log_ident = "uexportd";
static bool log_syslog;		/* detached: to syslog */
static int log_fd = STDERR_FILENO;	/* else here; -1: nowhere */
static bool log_kmsg;		/* log_fd is /dev/kmsg: one record per write */
static bool log_verbose;
static bool log_debug;

static void log_vmsg(int prio, const char *fmt, va_list ap)
{
	char line[512], rec[600];
	int n;

	vsnprintf(line, sizeof(line), fmt, ap);
	if (log_syslog) {
		syslog(prio, "%s", line);
		return;
	}
	if (log_fd < 0)
		return;
	if (log_kmsg)	/* the record's priority in front: Documentation/ABI/testing/dev-kmsg */
		n = snprintf(rec, sizeof(rec), "<%d>%s[%d]: %s\n", LOG_DAEMON | prio, log_ident,
			     (int)getpid(), line);
	else
		n = snprintf(rec, sizeof(rec), "%s: %s\n", log_ident, line);
	/* One write: a line is never torn among other writers' output. */
	if (write(log_fd, rec, n < (int)sizeof(rec) ? (size_t)n : sizeof(rec) - 1) < 0)
		return;		/* nowhere left to say so */
}

static void __attribute__((format(printf, 1, 2))) log_err(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_vmsg(LOG_ERR, fmt, ap);
	va_end(ap);
}

/* Always logged, not an error: the start-up line, the watcher's work. */
static void __attribute__((format(printf, 1, 2))) log_notice(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_vmsg(LOG_NOTICE, fmt, ap);
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

/* Is a syslog daemon listening on /dev/log (what syslog(3) writes to)? */
static bool syslog_reachable(void)
{
	static const int types[] = { SOCK_DGRAM, SOCK_STREAM };
	struct sockaddr_un sa = { .sun_family = AF_UNIX, .sun_path = "/dev/log" };
	bool ok = false;

	for (unsigned i = 0; i < 2 && !ok; i++) {
		int fd = socket(AF_UNIX, types[i] | SOCK_CLOEXEC, 0);

		ok = fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
		if (fd >= 0)
			close(fd);
	}
	return ok;
}

/*
 * Where a detached process -- the daemon once live, its crash watcher --
 * logs, now that it lets its caller's stderr go: syslog, when a daemon
 * listens on /dev/log.  A bare root or an initramfs has none; then the
 * caller's stderr if it is a terminal or a file, which the process may
 * keep (not a pipe or a socket: their reader would wait for our EOF), else
 * the kernel's log (/dev/kmsg), else nowhere, which 'warn' says on stderr
 * while it still is the caller's.  Returns true if stderr is to be kept.
 */
static bool log_detach(const char *ident, bool warn)
{
	struct stat st;
	int kmsg;

	log_ident = ident;
	if (syslog_reachable()) {
		openlog(ident, LOG_PID, LOG_DAEMON);
		log_syslog = true;
		return false;
	}
	if (isatty(STDERR_FILENO) || (fstat(STDERR_FILENO, &st) == 0 && S_ISREG(st.st_mode)))
		return true;
	kmsg = open("/dev/kmsg", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (kmsg < 0 && warn)
		log_err("warning: no syslog (/dev/log), no /dev/kmsg, and stderr is a pipe: "
			"later messages are lost (send stderr to a file, or run with -f)");
	log_fd = kmsg;
	log_kmsg = kmsg >= 0;
	return false;
}

/* /dev/null, or, in a bare root without one, the root directory: reads and
 * writes fail on it (EISDIR, EBADF) as harmlessly as /dev/null swallows
 * them.  For dup2() over descriptors 0-2.  Returns it or -errno. */
static int open_null(void)
{
	int fd = open("/dev/null", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	return fd < 0 ? -errno : fd;
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

/* Close descriptors lo..hi (close_range(2), or one by one before 5.9). */
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

/*
 * The new mount API (Linux 5.2), by raw syscalls: musl 1.2.3 has no
 * wrappers, glibc only since 2.36.  It makes a file system instance without
 * any directory to mount it on: a bare root has none to spare.  Numbers
 * and values from include/uapi/linux/mount.h (syscall numbers are the same
 * on every architecture since 5.1).
 */
#ifndef SYS_fsopen
#define SYS_fsopen		430
#define SYS_fsconfig		431
#define SYS_fsmount		432
#endif
#ifndef FSOPEN_CLOEXEC
#define FSOPEN_CLOEXEC		0x00000001
#endif
#ifndef FSMOUNT_CLOEXEC
#define FSMOUNT_CLOEXEC		0x00000001
#endif
#ifndef FSCONFIG_SET_STRING
#define FSCONFIG_SET_STRING	1
#endif
#ifndef FSCONFIG_CMD_CREATE
#define FSCONFIG_CMD_CREATE	6
#endif

/*
 * A new instance (or the single one) of file system 'type', configured
 * with 'opts' (key, value, ..., NULL; NULL for none): fsopen, fsconfig,
 * FSCONFIG_CMD_CREATE.  Returns its file system context -- closing it lets
 * the instance go unless a mount holds it -- or -errno (-ENOSYS before
 * Linux 5.2, -EPERM without CAP_SYS_ADMIN).
 */
static int fs_context_create(const char *type, const char *const *opts)
{
	int fs = (int)syscall(SYS_fsopen, type, FSOPEN_CLOEXEC);
	int err = 0;

	if (fs < 0)
		return -errno;
	for (; opts && opts[0] && !err; opts += 2)
		if (syscall(SYS_fsconfig, fs, FSCONFIG_SET_STRING, opts[0], opts[1], 0) < 0)
			err = -errno;
	if (!err && syscall(SYS_fsconfig, fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0)
		err = -errno;
	if (err) {
		close(fs);
		return err;
	}
	return fs;
}

/* A detached mount of the instance behind 'fs' (fs_context_create): no
 * mount point, gone when the descriptor closes.  Returns it or -errno. */
static int fs_mount_detached(int fs)
{
	int mnt = (int)syscall(SYS_fsmount, fs, FSMOUNT_CLOEXEC, 0);

	return mnt < 0 ? -errno : mnt;
}

/* Write 'text' into the existing file 'path', relative to 'dirfd' (a
 * directory or mount descriptor, or AT_FDCWD).  Returns 0 or -errno. */
static int write_file_at(int dirfd, const char *path, const char *text)
{
	int fd = openat(dirfd, path, O_WRONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = write(fd, text, strlen(text));
	n = n < 0 ? -errno : 0;
	close(fd);
	return (int)n;
}

static int write_file(const char *path, const char *text)
{
	return write_file_at(AT_FDCWD, path, text);
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
	return (size_t)sysconf(_SC_PAGESIZE);
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

static void pin_to_cpu(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

/*
 * The absolute path of 'path' with its directory resolved (realpath) and
 * its last component kept as given: resolving that too would stat it,
 * which blocks on a hung FUSE mount, fails on a dead one and follows a
 * symbolic link the caller wants to see.  A last component of "", "." or
 * ".." is resolved whole.  Returns 0 or -errno.
 */
static int path_abs_dir(const char *path, char *abs, size_t cap)
{
	char dir[PATH_MAX], res[PATH_MAX];
	const char *slash = strrchr(path, '/');
	const char *base = slash ? slash + 1 : path;

	if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
		if (cap < PATH_MAX)
			return -ENAMETOOLONG;
		return realpath(path, abs) ? 0 : -errno;
	}
	snprintf(dir, sizeof(dir), "%.*s", slash ? (int)(slash - path) + 1 : 1,
		 slash ? path : ".");
	if (!realpath(dir, res))
		return -errno;
	if ((size_t)snprintf(abs, cap, "%s%s%s", res, strcmp(res, "/") ? "/" : "", base) >= cap)
		return -ENAMETOOLONG;
	return 0;
}

/*
 * stat(2) ('follow') or lstat(2) of 'path', waiting at most 'ms'.  A path
 * on a FUSE mount whose daemon does not answer blocks the caller in the
 * kernel, killable only until the daemon has read the request and not at
 * all after (fs/fuse/dev.c, request_wait_answer()): a thread stuck there
 * would keep the whole process from exiting.  So the stat runs in a child
 * process holding nothing of ours (not even stdio: a caller capturing our
 * output would wait for it), which is left behind, killed, when late.
 * Only async-signal-safe calls after fork: any thread may be running.
 * Returns 0 with *st filled, the stat's -errno, -ETIMEDOUT, or the -errno
 * of pipe/fork.
 */
static int stat_within(const char *path, bool follow, unsigned ms, struct stat *st)
{
	struct { int err; struct stat st; } r;
	struct pollfd pfd = { .events = POLLIN };
	uint64_t deadline = now_ns() + (uint64_t)ms * 1000000u;
	int p[2], null;
	ssize_t n = -1;
	pid_t pid;

	if (pipe2(p, O_CLOEXEC) < 0)
		return -errno;
	pid = fork();
	if (pid == 0) {
		null = open_null();
		for (int fd = STDIN_FILENO; fd <= STDERR_FILENO; fd++)
			null >= 0 ? dup2(null, fd) : close(fd);
		close_fd_range(STDERR_FILENO + 1, (unsigned)p[1] - 1);
		close_fd_range((unsigned)p[1] + 1, ~0U);
		r.err = (follow ? stat(path, &r.st) : lstat(path, &r.st)) < 0 ? -errno : 0;
		_exit(write(p[1], &r, sizeof(r)) == sizeof(r) ? 0 : 1);
	}
	close(p[1]);
	if (pid < 0) {
		int err = -errno;

		close(p[0]);
		return err;
	}
	pfd.fd = p[0];
	while (n < 0) {
		uint64_t now = now_ns();
		int left = now < deadline ? (int)((deadline - now) / 1000000u) + 1 : 0;

		int ready = poll(&pfd, 1, left);

		if (ready < 0 && errno == EINTR)
			continue;
		if (ready <= 0)
			break;
		n = read(p[0], &r, sizeof(r));
		if (n < 0 && errno != EINTR)
			break;
	}
	close(p[0]);
	if (n != sizeof(r)) {
		kill(pid, SIGKILL);	/* it goes once the kernel lets it */
		return n < 0 ? -ETIMEDOUT : -EIO;
	}
	waitpid(pid, NULL, 0);		/* it has written: it is exiting */
	if (!r.err)
		*st = r.st;
	return r.err;
}

/* ======================================================================
 * io_uring rings, by raw syscalls
 *
 * Memory ordering on the shared ring indices (the kernel is the other side):
 *   - SQ tail: we write it with a release store after the SQE is complete,
 *     so the kernel never sees a half-written SQE;
 *   - SQ head: the kernel's; an acquire load before reusing the slots it
 *     has consumed;
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
		if (r->sqes != MAP_FAILED)
			munmap(r->sqes, r->sqes_len);
		close(r->fd);
		memset(r, 0, sizeof(*r));	/* map NULL: nothing to ring_exit() */
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

/*
 * Next free SQE, zeroed.  Its owner keeps at most sq_entries SQEs written
 * and not yet consumed by the kernel (the transport's counting invariant,
 * see the io_uring transport), so the SQ cannot be full here.  If it is,
 * that invariant is broken: returns NULL, and the caller stops loudly
 * rather than overwrite an SQE the kernel has not read.
 */
static struct io_uring_sqe *ring_sqe(struct ring *r)
{
	unsigned head = atomic_load_explicit(r->sq_head, memory_order_acquire);
	struct io_uring_sqe *sqe;

	if (r->sq_local_tail - head >= r->sq_entries)
		return NULL;
	sqe = (void *)(r->sqes + (size_t)(r->sq_local_tail & r->sq_mask) * RING_SQE_SIZE);
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
 * Partition tables: MBR and GPT, read-only parsers
 *
 * Pure functions over what a reader returns (the image; a buffer in the
 * unit tests).  A table is taken only when every check passes; anything
 * damaged or ambiguous fails with words naming what is wrong (in
 * pt_table.error), never with a guess:
 *
 *   - MBR: signature 0x55AA at byte 510, boot flags 0x00 or 0x80, four
 *     primary entries numbered 1-4 (size 0: unused, as the kernel reads
 *     them); one extended partition whose chain of EBRs (each signed,
 *     inside the extended partition, no loop, at most PT_MAX_PARTS)
 *     gives the logical partitions, numbered from 5 in chain order as the
 *     kernel and sfdisk number them.
 *   - GPT, when an MBR entry has type 0xEE (protective or hybrid MBR: then
 *     nothing else of the MBR is used): the header at LBA 1 with 512-byte
 *     sectors, else 4096 (a 4Kn disk's image; a block device's own
 *     logical block size only), its signature, its CRC32 and that of the
 *     entries array, the usable LBAs clear of both and inside the image,
 *     every used entry inside the usable LBAs.  Entry i is partition
 *     i + 1; unused entries (type GUID all zero) keep their number.  The
 *     backup table is never used instead: a damaged primary is an error
 *     (sgdisk -v says more; fdisk or sgdisk -e repair it).
 *
 * Then for both: every partition inside the image, none overlapping
 * another (a logical partition lies inside its extended one) nor a table
 * sector (MBR, EBR).
 * ====================================================================== */

#define PT_MAX_PARTS	256
#define PT_NAME_MAX	(36 * 3 + 1)	/* 36 UTF-16 units as UTF-8, NUL */
#define PT_GPT_MAX_ARRAY (1u << 20)	/* bytes of GPT entries we read */

struct pt_part {
	unsigned number;		/* as the kernel numbers it */
	uint64_t start, size;		/* bytes */
	bool container;			/* MBR extended partition: not data */
	char type[40];			/* MBR "0x83", GPT the type GUID */
	char uuid[40];			/* GPT PARTUUID, MBR "<disk id>-NN" */
	char name[PT_NAME_MAX];		/* GPT name in UTF-8, MBR "" */
};

struct pt_table {
	const char *label;		/* "dos" or "gpt" */
	unsigned sector;		/* bytes per LBA */
	unsigned nr;
	struct pt_part parts[PT_MAX_PARTS];
	uint64_t tables[PT_MAX_PARTS + 1];	/* MBR/EBR sectors (LBA) */
	unsigned nr_tables;
	char error[256];		/* what is wrong, when a call fails */
};

/* Reads 'len' bytes at byte 'off' of the image: 0 or -errno. */
typedef int pt_read_fn(void *ctx, void *buf, size_t len, uint64_t off);

struct pt_source {
	pt_read_fn *read;
	void *ctx;
	uint64_t size;			/* the image's, bytes */
};

static int __attribute__((format(printf, 2, 3)))
pt_fail(struct pt_table *t, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(t->error, sizeof(t->error), fmt, ap);
	va_end(ap);
	return -EINVAL;
}

/* CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), as GPT uses it. */
static uint32_t crc32_ieee(const void *data, size_t len)
{
	const uint8_t *p = data;
	uint32_t crc = ~0u;

	while (len--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1)));
	}
	return ~crc;
}

static uint32_t le16(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }
static uint32_t le32(const uint8_t *p) { return le16(p) | le16(p + 2) << 16; }
static uint64_t le64(const uint8_t *p) { return le32(p) | (uint64_t)le32(p + 4) << 32; }

/* A GUID as blkid and lsblk print it: the first three fields are
 * little-endian on disk, the last two big-endian. */
static void pt_guid_text(const uint8_t *g, char out[40])
{
	snprintf(out, 40, "%08x-%04x-%04x-%02x%02x-%02x%02x%02x%02x%02x%02x",
		 le32(g), le16(g + 4), le16(g + 6), g[8], g[9], g[10], g[11], g[12], g[13],
		 g[14], g[15]);
}

/* GPT's name: UTF-16LE, up to 'units' units or a NUL; to UTF-8, with
 * U+FFFD for a broken surrogate. */
static void pt_utf16_to_utf8(const uint8_t *in, unsigned units, char *out, size_t cap)
{
	size_t o = 0;

	for (unsigned i = 0; i < units; i++) {
		uint32_t c = le16(in + 2 * i);

		if (c == 0)
			break;
		if (c >= 0xD800 && c < 0xDC00 && i + 1 < units &&
		    le16(in + 2 * i + 2) >= 0xDC00 && le16(in + 2 * i + 2) < 0xE000)
			c = 0x10000 + ((c - 0xD800) << 10) + (le16(in + 2 * ++i) - 0xDC00);
		else if (c >= 0xD800 && c < 0xE000)
			c = 0xFFFD;
		if (o + 5 > cap)
			break;
		if (c < 0x80) {
			out[o++] = (char)c;
		} else if (c < 0x800) {
			out[o++] = (char)(0xC0 | c >> 6);
			out[o++] = (char)(0x80 | (c & 0x3F));
		} else if (c < 0x10000) {
			out[o++] = (char)(0xE0 | c >> 12);
			out[o++] = (char)(0x80 | (c >> 6 & 0x3F));
			out[o++] = (char)(0x80 | (c & 0x3F));
		} else {
			out[o++] = (char)(0xF0 | c >> 18);
			out[o++] = (char)(0x80 | (c >> 12 & 0x3F));
			out[o++] = (char)(0x80 | (c >> 6 & 0x3F));
			out[o++] = (char)(0x80 | (c & 0x3F));
		}
	}
	out[o] = '\0';
}

/* Read LBA range [lba, lba + n) of 'sector'-byte sectors into buf;
 * -EINVAL (with the words) when it lies past the image's end. */
static int pt_read(struct pt_table *t, const struct pt_source *src, void *buf,
		   uint64_t lba, uint64_t n, unsigned sector, const char *what)
{
	int err;

	if (lba > src->size / sector || n > src->size / sector - lba)
		return pt_fail(t, "%s at LBA %llu is past the image's end (%llu bytes): "
			       "truncated image?", what, (unsigned long long)lba,
			       (unsigned long long)src->size);
	err = src->read(src->ctx, buf, (size_t)(n * sector), lba * sector);
	if (err)
		return pt_fail(t, "read %s at LBA %llu: %s", what, (unsigned long long)lba,
			       strerror(-err));
	return 0;
}

static struct pt_part *pt_add(struct pt_table *t, unsigned number, uint64_t lba, uint64_t n)
{
	struct pt_part *p;

	if (t->nr == PT_MAX_PARTS) {
		pt_fail(t, "more than %d partitions", PT_MAX_PARTS);
		return NULL;
	}
	p = &t->parts[t->nr++];
	memset(p, 0, sizeof(*p));
	p->number = number;
	p->start = lba * t->sector;
	p->size = n * t->sector;
	return p;
}

static bool mbr_is_extended(uint8_t type)
{
	return type == 0x05 || type == 0x0F || type == 0x85;
}

static void mbr_describe(struct pt_part *p, uint8_t type, uint32_t disk_id)
{
	snprintf(p->type, sizeof(p->type), "0x%x", type);
	/* No disk id, no PARTUUID: blkid and partx print none either. */
	if (disk_id)
		snprintf(p->uuid, sizeof(p->uuid), "%08x-%02x", disk_id, p->number);
	p->container = mbr_is_extended(type);
}

/* The logical partitions in the extended partition [ext, ext + ext_n). */
static int mbr_parse_logical(struct pt_table *t, const struct pt_source *src, uint8_t *sec,
			     uint64_t ext, uint64_t ext_n, uint32_t disk_id)
{
	uint64_t ebr = ext;
	unsigned number = 5;

	for (;;) {
		const uint8_t *data = NULL, *link = NULL;
		int err;

		for (unsigned k = 0; k < t->nr_tables; k++)
			if (t->tables[k] == ebr)
				return pt_fail(t, "the chain of EBRs loops back to LBA %llu",
					       (unsigned long long)ebr);
		if (t->nr_tables > PT_MAX_PARTS)
			return pt_fail(t, "more than %d EBRs", PT_MAX_PARTS);
		if ((err = pt_read(t, src, sec, ebr, 1, t->sector, "EBR")) < 0)
			return err;
		t->tables[t->nr_tables++] = ebr;
		if (sec[510] != 0x55 || sec[511] != 0xAA)
			return pt_fail(t, "EBR at LBA %llu: no signature 0x55AA",
				       (unsigned long long)ebr);
		for (unsigned i = 0; i < 4; i++) {
			const uint8_t *e = sec + 446 + 16 * i;

			if (le32(e + 12) == 0)
				continue;
			if (mbr_is_extended(e[4]) ? link != NULL : data != NULL)
				return pt_fail(t, "EBR at LBA %llu: more than one %s entry",
					       (unsigned long long)ebr,
					       mbr_is_extended(e[4]) ? "link" : "partition");
			*(mbr_is_extended(e[4]) ? &link : &data) = e;
		}
		if (data) {
			uint64_t start = ebr + le32(data + 8), n = le32(data + 12);
			struct pt_part *p;

			if (start == ebr || start + n > ext + ext_n)
				return pt_fail(t, "logical partition %u (LBA %llu+%llu) is not "
					       "inside the extended partition (LBA %llu+%llu) after "
					       "its EBR", number, (unsigned long long)start,
					       (unsigned long long)n, (unsigned long long)ext,
					       (unsigned long long)ext_n);
			if (!(p = pt_add(t, number++, start, n)))
				return -EINVAL;
			mbr_describe(p, data[4], disk_id);
		}
		if (!link)
			return 0;
		ebr = ext + le32(link + 8);
		if (ebr >= ext + ext_n)
			return pt_fail(t, "EBR at LBA %llu links to LBA %llu, outside the "
				       "extended partition", (unsigned long long)t->tables[t->nr_tables - 1],
				       (unsigned long long)ebr);
	}
}

/* GPT behind a protective MBR.  'sector' 0: try 512, then 4096. */
static int gpt_parse(struct pt_table *t, const struct pt_source *src, unsigned sector)
{
	static const unsigned sizes[] = { 512, 4096 };
	uint8_t hdr[4096], *arr;
	uint64_t first, last, elba, nsec, alen;
	uint32_t hsize, n, esize, crc;
	int err;

	t->label = "gpt";
	t->sector = 0;
	for (unsigned i = 0; i < 2 && !t->sector; i++) {
		unsigned s = sector ? sector : sizes[i];

		if (s > sizeof(hdr) || (uint64_t)2 * s > src->size)
			break;
		if ((err = src->read(src->ctx, hdr, s, s)) < 0)
			return pt_fail(t, "read the GPT header: %s", strerror(-err));
		if (memcmp(hdr, "EFI PART", 8) == 0)
			t->sector = s;
		if (sector)
			break;
	}
	if (!t->sector)
		return pt_fail(t, "protective MBR (type 0xee) but no GPT header (\"EFI PART\") "
			       "at LBA 1 of %s-byte sectors", sector ? "its" : "512- or 4096");
	sector = t->sector;
	nsec = src->size / sector;
	hsize = le32(hdr + 12);
	if (hsize < 92 || hsize > sector)
		return pt_fail(t, "GPT header: size %u is not within 92-%u", hsize, sector);
	crc = le32(hdr + 16);
	memset(hdr + 16, 0, 4);
	if (crc32_ieee(hdr, hsize) != crc)
		return pt_fail(t, "GPT header: bad CRC32 (damaged; the backup table is not "
			       "used without a repair, e.g. sgdisk -v)");
	first = le64(hdr + 40);
	last = le64(hdr + 48);
	elba = le64(hdr + 72);
	n = le32(hdr + 80);
	esize = le32(hdr + 84);
	if (le64(hdr + 24) != 1)
		return pt_fail(t, "GPT header: it says it is at LBA %llu, not 1",
			       (unsigned long long)le64(hdr + 24));
	if (esize < 128 || esize > 4096 || (esize & (esize - 1)))
		return pt_fail(t, "GPT header: entry size %u is not a power of 2 in 128-4096",
			       esize);
	if (n == 0 || (uint64_t)n * esize > PT_GPT_MAX_ARRAY)
		return pt_fail(t, "GPT header: %u entries of %u bytes (0 or over %u bytes)",
			       n, esize, PT_GPT_MAX_ARRAY);
	alen = ((uint64_t)n * esize + sector - 1) / sector;
	if (first < 2 || first > last || last >= nsec)
		return pt_fail(t, "GPT header: usable LBAs %llu-%llu are not inside LBA 2-%llu "
			       "of the image (%llu bytes): truncated image?",
			       (unsigned long long)first, (unsigned long long)last,
			       (unsigned long long)(nsec ? nsec - 1 : 0),
			       (unsigned long long)src->size);
	if (elba < 2 || (elba <= last && elba + alen > first))
		return pt_fail(t, "GPT header: entries at LBA %llu+%llu overlap the header or "
			       "the usable LBAs %llu-%llu", (unsigned long long)elba,
			       (unsigned long long)alen, (unsigned long long)first,
			       (unsigned long long)last);
	arr = malloc(alen * sector);
	if (!arr)
		return pt_fail(t, "GPT entries: %s", strerror(ENOMEM));
	err = pt_read(t, src, arr, elba, alen, sector, "GPT entries");
	if (!err && crc32_ieee(arr, (size_t)n * esize) != le32(hdr + 88))
		err = pt_fail(t, "GPT entries: bad CRC32 (damaged; the backup table is not "
			      "used without a repair, e.g. sgdisk -v)");
	for (uint32_t i = 0; i < n && !err; i++) {
		const uint8_t *e = arr + (size_t)i * esize;
		static const uint8_t unused[16];
		uint64_t a = le64(e + 32), b = le64(e + 40);
		struct pt_part *p;

		if (memcmp(e, unused, 16) == 0)
			continue;
		if (a > b || a < first || b > last) {
			err = pt_fail(t, "partition %u: LBA %llu-%llu is not inside the usable "
				      "LBAs %llu-%llu", i + 1, (unsigned long long)a,
				      (unsigned long long)b, (unsigned long long)first,
				      (unsigned long long)last);
			break;
		}
		if (!(p = pt_add(t, i + 1, a, b - a + 1))) {
			err = -EINVAL;
			break;
		}
		pt_guid_text(e, p->type);
		pt_guid_text(e + 16, p->uuid);
		pt_utf16_to_utf8(e + 56, (esize - 56) / 2 < 36 ? (esize - 56) / 2 : 36,
				 p->name, sizeof(p->name));
	}
	free(arr);
	return err;
}

/* Every partition inside the image, none over a table sector or over
 * another (but a logical one inside its extended partition). */
static int pt_check(struct pt_table *t, uint64_t size)
{
	for (unsigned i = 0; i < t->nr; i++) {
		const struct pt_part *p = &t->parts[i];

		if (p->start > size || p->size > size - p->start)
			return pt_fail(t, "partition %u (bytes %llu+%llu) ends past the image's "
				       "end (%llu bytes): truncated image?", p->number,
				       (unsigned long long)p->start, (unsigned long long)p->size,
				       (unsigned long long)size);
		for (unsigned k = 0; k < t->nr_tables && !p->container; k++) {
			uint64_t at = t->tables[k] * t->sector;

			if (at >= p->start && at - p->start < p->size)
				return pt_fail(t, "partition %u covers the partition table at "
					       "LBA %llu", p->number,
					       (unsigned long long)t->tables[k]);
		}
		for (unsigned j = 0; j < i; j++) {
			const struct pt_part *q = &t->parts[j];

			if ((p->container && q->number >= 5) || (q->container && p->number >= 5))
				continue;	/* a logical inside its extended */
			if (p->start < q->start + q->size && q->start < p->start + p->size)
				return pt_fail(t, "partitions %u and %u overlap", q->number,
					       p->number);
		}
	}
	return 0;
}

/*
 * Read the partition table of an image of src->size bytes: 'sector' is a
 * block device's logical block size, 0 for a file (MBR in 512-byte
 * sectors, GPT's found at 512 or 4096).  Returns 0 with *t filled, or
 * -EINVAL with t->error saying what is wrong, or missing.
 */
static int pt_parse(struct pt_table *t, const struct pt_source *src, unsigned sector)
{
	uint8_t sec[4096];
	const uint8_t *ext = NULL;
	uint32_t disk_id;
	int err;

	t->nr = t->nr_tables = 0;
	t->error[0] = '\0';
	t->label = "dos";
	t->sector = sector ? sector : 512;
	if (t->sector < 512 || t->sector > sizeof(sec))
		return pt_fail(t, "unsupported sector size %u", t->sector);
	if (src->size < t->sector)
		return pt_fail(t, "no partition table: the image (%llu bytes) is smaller than "
			       "one sector", (unsigned long long)src->size);
	if ((err = pt_read(t, src, sec, 0, 1, t->sector, "MBR")) < 0)
		return err;
	if (sec[510] != 0x55 || sec[511] != 0xAA)
		return pt_fail(t, "no partition table (no MBR signature 0x55AA at byte 510)");
	for (unsigned i = 0; i < 4; i++)
		if (sec[446 + 16 * i + 4] == 0xEE)
			return (err = gpt_parse(t, src, sector)) < 0 ? err : pt_check(t, src->size);
	t->tables[t->nr_tables++] = 0;
	disk_id = le32(sec + 440);
	for (unsigned i = 0; i < 4; i++) {
		const uint8_t *e = sec + 446 + 16 * i;
		struct pt_part *p;

		if (e[0] != 0x00 && e[0] != 0x80)
			return pt_fail(t, "no partition table: MBR entry %u has boot flag 0x%02x "
				       "(a file system's boot sector?)", i + 1, e[0]);
		if (le32(e + 12) == 0)
			continue;
		if (mbr_is_extended(e[4]) && ext)
			return pt_fail(t, "two extended partitions (%u and %u)",
				       (unsigned)((ext - sec - 446) / 16 + 1), i + 1);
		if (mbr_is_extended(e[4]))
			ext = e;
		p = pt_add(t, i + 1, le32(e + 8), le32(e + 12));
		mbr_describe(p, e[4], disk_id);
	}
	if (ext && (err = mbr_parse_logical(t, src, sec, le32(ext + 8), le32(ext + 12),
					    disk_id)) < 0)
		return err;
	return pt_check(t, src->size);
}

/* A case-insensitive match of ASCII letters (UUIDs). */
static bool pt_same_uuid(const char *a, const char *b)
{
	return strcasecmp(a, b) == 0;
}

/* Is 'spec' a well-formed --partition value: a number from 1, or
 * name:LABEL / uuid:UUID with something after the colon?  (Whether the
 * table has it is pt_find's question.) */
static bool pt_spec_valid(const char *spec)
{
	unsigned long number;
	char *end;

	if (strncmp(spec, "name:", 5) == 0 || strncmp(spec, "uuid:", 5) == 0)
		return spec[5] != '\0';
	errno = 0;
	number = strtoul(spec, &end, 10);
	return isdigit((unsigned char)*spec) && !*end && !errno && number >= 1 &&
	       number <= UINT_MAX;
}

/*
 * The partition 'spec' names: "N", "name:LABEL" (GPT), "uuid:UUID" (GPT
 * PARTUUID, or MBR's "<disk id>-NN"; any case).  NULL with t->error saying
 * why: none, two of that name or UUID, the extended partition.
 */
static const struct pt_part *pt_find(struct pt_table *t, const char *spec)
{
	bool by_name = strncmp(spec, "name:", 5) == 0, by_uuid = strncmp(spec, "uuid:", 5) == 0;
	const struct pt_part *found = NULL;
	const char *key = spec + 5;
	char numbers[128] = "";
	size_t len = 0;
	unsigned long number = by_name || by_uuid ? 0 : strtoul(spec, NULL, 10);

	if (!by_name && !by_uuid && !pt_spec_valid(spec)) {
		pt_fail(t, "'%s' is not a partition number, name:LABEL or uuid:UUID", spec);
		return NULL;
	}
	if (by_name && strcmp(t->label, "gpt") != 0) {
		pt_fail(t, "an MBR names no partitions (by number or uuid: instead)");
		return NULL;
	}
	for (unsigned i = 0; i < t->nr; i++) {
		const struct pt_part *p = &t->parts[i];
		bool match = by_name ? strcmp(p->name, key) == 0 :
			     by_uuid ? pt_same_uuid(p->uuid, key) : p->number == number;

		if (len < sizeof(numbers))
			len += (size_t)snprintf(numbers + len, sizeof(numbers) - len, "%s%u",
						len ? ", " : "", p->number);
		if (!match)
			continue;
		if (found) {
			pt_fail(t, "partitions %u and %u both have %s '%s'", found->number,
				p->number, by_name ? "the name" : "the UUID", key);
			return NULL;
		}
		found = p;
	}
	if (!found)
		pt_fail(t, "no partition %s%s (%s table: %s)", by_name ? "named " :
			by_uuid ? "with UUID " : "", by_name || by_uuid ? key : spec,
			t->label, t->nr ? numbers : "empty");
	else if (found->container)
		pt_fail(t, "partition %u is the extended partition, a container of the "
			"logical ones (5 and up)", found->number);
	return found && !found->container ? found : NULL;
}

/* ======================================================================
 * Image backends
 *
 * The exported image is one struct image; what differs between a regular
 * file, a block device (fixed size; fallocate maps to the device's
 * discard/zero-out) and null (reads are zeros, writes vanish, nothing is
 * allocated) is its struct image_ops table.  The generic image_*() calls
 * at the end of this section apply the rules every backend shares (the
 * size, growing, clipping at EOF) and call the table for the rest; the
 * protocol layer uses only those.  A new backend is one new table; a
 * window is not (ring I/O bypasses the table), see below.
 *
 * image.size is the authoritative size; only truncate and growing writes
 * change it.
 *
 * A window (--offset/--size, --partition) exports bytes [base, base + size)
 * of the image as a fixed-size file.  Offsets stay the export's own
 * everywhere above the backends; each place that hands an offset to the
 * kernel -- fd_rw, fd_rw_nowait, the ring's READ/WRITE SQE
 * (ring_queue_image_io), fd_zero (fallocate and zero writes),
 * file_fallocate, file_seek -- adds base with image_pos(), and judges
 * O_DIRECT alignment there too (image_io_route).  Size rules keep every
 * request inside [0, size), so no path reaches a byte outside the window.
 * ====================================================================== */

/* Descriptors of an image, by role; ring transports register them in this
 * order as fixed files. */
enum {
	IMAGE_FD_MAIN,		/* O_DIRECT with --direct */
	IMAGE_FD_BUFFERED,	/* for I/O O_DIRECT cannot do; same file otherwise */
	IMAGE_NR_FDS
};

/*
 * One READ or WRITE against the image, prepared by the protocol layer and
 * run in the calling thread (image_ops.rw), without blocking
 * (image_ops.rw_nowait), or through a ring on image.fds[fd_role].  'buf'
 * belongs to the transport and stays valid until the reply is sent.
 */
struct image_io {
	bool write;
	unsigned fd_role;	/* IMAGE_FD_* this I/O must use */
	int rw_flags;		/* RWF_DSYNC/RWF_SYNC: durable before the reply */
	uint64_t off;		/* bytes */
	uint32_t len;
	uint32_t done;		/* bytes already transferred (see rw_nowait) */
	void *buf;
	size_t buf_zeroed;	/* in: leading bytes of buf known to be zero */
	bool zeros;		/* out: the read produced zeros only (null:) */
};

/*
 * Write-back errors per open file, as the kernel keeps them for a file
 * opened directly (errseq_t, include/linux/errseq.h): an error is reported
 * once to every file that was open when it happened, at its next fsync.
 * The daemon has one descriptor for all clients, whose first fsync would
 * consume the error; so each error is recorded here (a count and the
 * error) and every FUSE open file (fh = slot + 1) keeps the count it has
 * been told of.
 */
struct image_files {
	pthread_mutex_t lock;
	uint32_t errors;		/* write-back errors recorded */
	int err;			/* the last one */
	struct image_file {
		bool open;
		uint32_t seen;		/* errors already reported to it */
	} *slots;
	size_t nr_slots;
};

/* Failed image I/O is logged, at most IO_LOG_BURST lines a second; what is
 * held back is counted and said with the next line that gets out. */
#define IO_LOG_BURST	10

struct image_log {
	pthread_mutex_t lock;
	uint64_t window;		/* now_ns() / 1 s of the current burst */
	unsigned lines;			/* logged in that second */
	unsigned held;			/* not logged since the last line */
};

struct image;

/*
 * A backend.  Every call returns 0 (or a count, a position) or -errno.
 * Offsets and lengths are bytes, already inside [0, size) unless said.
 */
struct image_ops {
	const char *kind;		/* for messages: "block device" */
	bool fixed_size;		/* never resized: --growable refused */
	bool backing_file;		/* the kernel can do its I/O (--passthrough) */
	/* The I/O in the calling thread: bytes moved (short only at EOF for
	 * reads), or -errno when nothing was. */
	ssize_t (*rw)(struct image *, struct image_io *);
	/* The same without blocking, or -EAGAIN with io->done set to what was
	 * moved, for a ring to do the rest on image.fds[io->fd_role]. */
	ssize_t (*rw_nowait)(struct image *, struct image_io *);
	/* st_blocks and the three times. */
	int (*getattr)(struct image *, struct fuse_attr *);
	/* atime, mtime as utimensat(2) takes them (UTIME_NOW, UTIME_OMIT). */
	int (*set_times)(struct image *, const struct timespec ts[2]);
	/* The backing store's size, for a growable truncate. */
	int (*resize)(struct image *, uint64_t size);
	/* Read back as zeros, size unchanged, no byte outside touched. */
	int (*zero)(struct image *, uint64_t off, uint64_t len);
	/* fallocate(2) modes the protocol lets through (see image_fallocate). */
	int (*fallocate)(struct image *, int mode, uint64_t off, uint64_t len);
	/* SEEK_DATA/SEEK_HOLE from 'off' < 'size'; may return >= size. */
	int64_t (*seek)(struct image *, uint64_t off, int whence, uint64_t size);
	int (*statfs)(struct image *, struct fuse_kstatfs *);
	int (*sync)(struct image *, bool datasync);
};

/*
 * The exported image.  Fields above the line are set before the first
 * request and never change; below it, state shared by all serving threads.
 */
struct image {
	const char *path;		/* as given, for messages */
	const struct image_ops *ops;
	bool writable, growable, direct;
	bool in_memory;			/* tmpfs/ramfs: I/O never blocks */
	bool passthrough;		/* the kernel reads and writes the file */
	bool allow_chown;		/* uid/gid may change: only with allow_other */
	int backing_id;			/* from FUSE_DEV_IOC_BACKING_OPEN */
	int fds[IMAGE_NR_FDS];		/* see IMAGE_FD_*; -1 for null: */
	unsigned nr_fds;		/* 0 for null: */
	uint32_t align;			/* O_DIRECT alignment of offset, length, buffer */
	uint32_t zero_unit;		/* smallest unit fallocate zeroes: a device's
					 * logical block, 1 for a file */
	bool window;			/* only [base, base + size) is exported */
	uint64_t base;			/* the window's first byte; 0 without one */
	/* ---- */
	_Atomic uint64_t size;		/* authoritative file size */
	_Atomic uint32_t mode;		/* permission bits of the exported file */
	_Atomic uint32_t uid, gid;
	atomic_bool nowait_read_ok, nowait_write_ok;	/* RWF_NOWAIT works */
	struct image_files files;	/* write-back errors per open file */
	struct image_log log;		/* I/O failures, rate-limited */
	pthread_mutex_t times_lock;	/* times of non-file backends */
	struct timespec atime, mtime, ctime;
};

/* Raise img->size to 'end' if smaller (concurrent growing writes race here). */
static void image_size_grow(struct image *img, uint64_t end)
{
	uint64_t cur = img->size;

	while (cur < end && !atomic_compare_exchange_weak(&img->size, &cur, end))
		;
}

static void ts_to_attr(const struct timespec *ts, uint64_t *sec, uint32_t *nsec)
{
	*sec = (uint64_t)ts->tv_sec;
	*nsec = (uint32_t)ts->tv_nsec;
}

/* ---- Shared by the file and block-device backends ---- */

/* The position in the image of the export's byte 'off': every offset
 * handed to the kernel goes through here (see the section's comment). */
static uint64_t image_pos(const struct image *img, uint64_t off)
{
	return img->base + off;
}

static ssize_t fd_rw(struct image *img, struct image_io *io)
{
	return rw_full(io->write, img->fds[io->fd_role], io->buf, io->len,
		       image_pos(img, io->off), io->rw_flags);
}

/* O_DIRECT I/O: the device moves the data, no CPU copy to place. */
static bool image_io_direct(const struct image *img, const struct image_io *io)
{
	return img->direct && io->fd_role == IMAGE_FD_MAIN;
}

/*
 * Try the I/O without blocking: when the data is in the host page cache, a
 * copy here is far cheaper than a trip through the ring.  A tmpfs image
 * never blocks, and tmpfs cannot do non-blocking ring I/O (every request
 * would go to an io-wq worker thread), so it is always done here.  Other
 * files use RWF_NOWAIT.  Never used for O_DIRECT I/O, nor for a synchronous
 * write (its flush would block the queue's thread: it goes to the ring).
 */
static ssize_t fd_rw_nowait(struct image *img, struct image_io *io)
{
	atomic_bool *ok = io->write ? &img->nowait_write_ok : &img->nowait_read_ok;
	struct iovec iov = { io->buf, io->len };
	ssize_t n;

	io->done = 0;
	if (img->in_memory)
		return fd_rw(img, io);
	if (!atomic_load_explicit(ok, memory_order_relaxed) || image_io_direct(img, io) ||
	    io->rw_flags)
		return -EAGAIN;
	n = sys_rw2(io->write, img->fds[io->fd_role], &iov, image_pos(img, io->off), RWF_NOWAIT);
	if (n == -EOPNOTSUPP)	/* this file system cannot: stop trying */
		atomic_store_explicit(ok, false, memory_order_relaxed);
	if (n < 0)
		return n == -EOPNOTSUPP ? -EAGAIN : n;
	if ((size_t)n == io->len || (n == 0 && !io->write))
		return n;
	io->done = (uint32_t)n;
	return -EAGAIN;
}

/* Write zeros over image positions [pos, pos + len) with plain buffered
 * writes: for what fallocate cannot do. */
static int fd_write_zeroes(struct image *img, uint64_t pos, uint64_t len)
{
	static const char zeros[64 << 10];

	while (len > 0) {
		size_t n = len < sizeof(zeros) ? (size_t)len : sizeof(zeros);
		ssize_t r = rw_full(true, img->fds[IMAGE_FD_BUFFERED], (void *)zeros, n, pos, 0);

		if (r < 0)
			return (int)r;
		if ((size_t)r < n)
			return -EIO;
		pos += n;
		len -= n;
	}
	return 0;
}

/* Zero whole zero_units at image positions [pos, pos + len), cheapest
 * first: PUNCH_HOLE deallocates (a hole in a file; on a device a
 * write-zeroes with unmap, refused unless the device does it efficiently,
 * block/fops.c), ZERO_RANGE writes zeroes the device's way, and plain
 * writes cover file systems with neither. */
static int fd_zero_units(struct image *img, uint64_t pos, uint64_t len)
{
	static const int modes[] = { FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE };

	for (unsigned i = 0; i < 2; i++) {
		if (fallocate(img->fds[IMAGE_FD_MAIN], modes[i] | FALLOC_FL_KEEP_SIZE,
			      (off_t)pos, (off_t)len) == 0)
			return 0;
		if (errno != EOPNOTSUPP)
			return -errno;
	}
	return fd_write_zeroes(img, pos, len);
}

/* image_ops.zero: fallocate takes whole zero_units only; the partial units
 * at either end are written.  Units are the device's, so they are counted
 * from the image's start, not the window's. */
static int fd_zero(struct image *img, uint64_t off, uint64_t len)
{
	uint64_t unit = img->zero_unit, pos = image_pos(img, off), end = pos + len;
	uint64_t first = (pos + unit - 1) / unit * unit, last = end / unit * unit;
	int err;

	if (len == 0)
		return 0;
	if (first >= last)
		return fd_write_zeroes(img, pos, len);
	err = fd_write_zeroes(img, pos, first - pos);
	if (!err)
		err = fd_write_zeroes(img, last, end - last);
	return err ? err : fd_zero_units(img, first, last - first);
}

static int fd_sync(struct image *img, bool datasync)
{
	int fd = img->fds[IMAGE_FD_MAIN];

	return (datasync ? fdatasync(fd) : fsync(fd)) < 0 ? -errno : 0;
}

/* Times kept in memory, for backends whose inode is not the image's:
 * a device node's times are not the disk's. */
static void mem_get_times(struct image *img, struct fuse_attr *a)
{
	pthread_mutex_lock(&img->times_lock);
	ts_to_attr(&img->atime, &a->atime, &a->atimensec);
	ts_to_attr(&img->mtime, &a->mtime, &a->mtimensec);
	ts_to_attr(&img->ctime, &a->ctime, &a->ctimensec);
	pthread_mutex_unlock(&img->times_lock);
}

static int mem_set_times(struct image *img, const struct timespec ts[2])
{
	struct timespec now;

	clock_gettime(CLOCK_REALTIME, &now);
	pthread_mutex_lock(&img->times_lock);
	if (ts[0].tv_nsec != UTIME_OMIT)
		img->atime = ts[0].tv_nsec == UTIME_NOW ? now : ts[0];
	if (ts[1].tv_nsec != UTIME_OMIT)
		img->mtime = ts[1].tv_nsec == UTIME_NOW ? now : ts[1];
	img->ctime = now;
	pthread_mutex_unlock(&img->times_lock);
	return 0;
}

/* A synthetic statfs for backends with no file system of their own. */
static int mem_statfs(struct image *img, struct fuse_kstatfs *st)
{
	st->bsize = st->frsize = 4096;
	st->blocks = (img->size + 4095) / 4096;
	st->files = 1;
	return 0;
}

/* ---- Regular file ---- */

/*
 * st_blocks of a window over a regular file: its bytes that SEEK_DATA
 * finds (written data; a hole or a preallocated, unwritten extent is not),
 * in 512-byte units, over at most WINDOW_EXTENTS data extents; the rest of
 * a window with more counts as data, and so does everything when the file
 * system cannot say.  Never below the truth, so neither du nor cp --sparse
 * is misled, and a GETATTR costs at most 2 x WINDOW_EXTENTS lseeks.
 */
#define WINDOW_EXTENTS	64

static uint64_t file_window_blocks(struct image *img)
{
	int fd = img->fds[IMAGE_FD_MAIN];
	uint64_t pos = img->base, end = img->base + img->size, bytes = 0;

	for (unsigned n = 0; pos < end; n++) {
		off_t data = n < WINDOW_EXTENTS ? lseek(fd, (off_t)pos, SEEK_DATA) : -1;
		off_t hole;

		if (data < 0 && n < WINDOW_EXTENTS && errno == ENXIO)
			break;		/* no data after pos */
		if (data < 0) {
			bytes += end - pos;
			break;
		}
		if ((uint64_t)data >= end)
			break;
		hole = lseek(fd, data, SEEK_HOLE);
		if (hole < 0 || (uint64_t)hole > end)
			hole = (off_t)end;
		bytes += (uint64_t)(hole - data);
		pos = (uint64_t)hole;
	}
	return (bytes + 511) / 512;
}

/* st_blocks and times are the file's own: cp --sparse and du see holes. */
static int file_getattr(struct image *img, struct fuse_attr *a)
{
	struct stat st;

	if (fstat(img->fds[IMAGE_FD_MAIN], &st) < 0)
		return -errno;
	if (img->passthrough)	/* the kernel may have grown it */
		img->size = a->size = (uint64_t)st.st_size;
	a->blocks = img->window ? file_window_blocks(img) : (uint64_t)st.st_blocks;
	ts_to_attr(&st.st_atim, &a->atime, &a->atimensec);
	ts_to_attr(&st.st_mtim, &a->mtime, &a->mtimensec);
	ts_to_attr(&st.st_ctim, &a->ctime, &a->ctimensec);
	return 0;
}

static int file_set_times(struct image *img, const struct timespec ts[2])
{
	return futimens(img->fds[IMAGE_FD_MAIN], ts) < 0 ? -errno : 0;
}

static int file_resize(struct image *img, uint64_t size)
{
	return ftruncate(img->fds[IMAGE_FD_MAIN], (off_t)size) < 0 ? -errno : 0;
}

static int file_fallocate(struct image *img, int mode, uint64_t off, uint64_t len)
{
	return fallocate(img->fds[IMAGE_FD_MAIN], mode, (off_t)image_pos(img, off),
			 (off_t)len) < 0 ? -errno : 0;
}

/* In a window the answer is made relative to it; one past its end is
 * clipped by image_seek. */
static int64_t file_seek(struct image *img, uint64_t off, int whence, uint64_t size)
{
	off_t pos = lseek(img->fds[IMAGE_FD_MAIN], (off_t)image_pos(img, off), whence);

	if (pos < 0 && errno == ENXIO && whence == SEEK_HOLE)
		return (int64_t)size;
	return pos < 0 ? -errno : pos - (off_t)img->base;
}

static int file_statfs(struct image *img, struct fuse_kstatfs *st)
{
	struct statfs sfs;

	if (fstatfs(img->fds[IMAGE_FD_MAIN], &sfs) < 0)
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

static const struct image_ops file_ops = {
	.kind = "regular file", .backing_file = true,
	.rw = fd_rw, .rw_nowait = fd_rw_nowait,
	.getattr = file_getattr, .set_times = file_set_times,
	.resize = file_resize, .zero = fd_zero, .fallocate = file_fallocate,
	.seek = file_seek, .statfs = file_statfs, .sync = fd_sync,
};

/* ---- Block device: fixed size, all data ---- */

static int blkdev_getattr(struct image *img, struct fuse_attr *a)
{
	a->blocks = (img->size + 511) / 512;
	mem_get_times(img, a);
	return 0;
}

static int blkdev_resize(struct image *img, uint64_t size)
{
	(void)img;
	(void)size;
	return -EFBIG;		/* fixed_size: never asked */
}

/* Preallocation is a no-op on a device; punching and zeroing both leave
 * zeros, at any byte offset. */
static int blkdev_fallocate(struct image *img, int mode, uint64_t off, uint64_t len)
{
	return (mode & ~FALLOC_FL_KEEP_SIZE) ? fd_zero(img, off, len) : 0;
}

static int64_t blkdev_seek(struct image *img, uint64_t off, int whence, uint64_t size)
{
	(void)img;
	return whence == SEEK_DATA ? (int64_t)off : (int64_t)size;
}

static const struct image_ops blkdev_ops = {
	.kind = "block device", .fixed_size = true,
	.rw = fd_rw, .rw_nowait = fd_rw_nowait,
	.getattr = blkdev_getattr, .set_times = mem_set_times,
	.resize = blkdev_resize, .zero = fd_zero, .fallocate = blkdev_fallocate,
	.seek = blkdev_seek, .statfs = mem_statfs, .sync = fd_sync,
};

/* ---- null: reads are zeros, writes vanish, all hole ---- */

/* Zeroing 1 MiB per read would dominate what null: measures: the transport
 * says in buf_zeroed what is still zero from last time. */
static ssize_t null_rw(struct image *img, struct image_io *io)
{
	(void)img;
	if (!io->write && io->len > io->buf_zeroed)
		memset((char *)io->buf + io->buf_zeroed, 0, io->len - io->buf_zeroed);
	io->zeros = !io->write;
	return io->len;
}

static int null_getattr(struct image *img, struct fuse_attr *a)
{
	a->blocks = 0;
	mem_get_times(img, a);
	return 0;
}

static int null_nothing(struct image *img, uint64_t off, uint64_t len)
{
	(void)img;
	(void)off;
	(void)len;
	return 0;
}

static int null_resize(struct image *img, uint64_t size)
{
	return null_nothing(img, size, 0);
}

static int null_fallocate(struct image *img, int mode, uint64_t off, uint64_t len)
{
	(void)mode;
	return null_nothing(img, off, len);
}

static int64_t null_seek(struct image *img, uint64_t off, int whence, uint64_t size)
{
	(void)img;
	(void)size;
	return whence == SEEK_DATA ? -ENXIO : (int64_t)off;
}

static int null_sync(struct image *img, bool datasync)
{
	(void)datasync;
	return null_nothing(img, 0, 0);
}

static const struct image_ops null_ops = {
	.kind = "null", .rw = null_rw, .rw_nowait = null_rw,
	.getattr = null_getattr, .set_times = mem_set_times,
	.resize = null_resize, .zero = null_nothing, .fallocate = null_fallocate,
	.seek = null_seek, .statfs = mem_statfs, .sync = null_sync,
};

/* ---- Opening ---- */

/* "null:SIZE".  -EINVAL for a malformed size. */
static int image_open_null(struct image *img, const char *spec)
{
	uint64_t size;

	if (parse_size(spec + 5, &size) < 0)
		return -EINVAL;
	img->ops = &null_ops;
	img->size = size;
	return 0;
}

/* A block device's size and logical block size (BLKGETSIZE64, BLKSSZGET). */
static int image_probe_blkdev(struct image *img, int fd)
{
	uint64_t size;
	int ssz = 512, ro = 0;

	if (ioctl(fd, BLKGETSIZE64, &size) < 0)
		return -errno;
	/* A read-only device opens O_RDWR all the same; every write would
	 * then fail (EPERM): refuse -w as a read-only file system is. */
	if (img->writable && ioctl(fd, BLKROGET, &ro) == 0 && ro)
		return -EROFS;
	ioctl(fd, BLKSSZGET, &ssz);
	img->size = size;
	img->align = img->zero_unit = (uint32_t)ssz;
	return 0;
}

/* A regular file or block device.  -EISDIR, -EINVAL (any other type), or
 * the -errno of open/ioctl. */
static int image_open_path(struct image *img, const char *path)
{
	struct stat st;
	struct statfs sfs;
	int flags = (img->writable ? O_RDWR : O_RDONLY) | O_CLOEXEC;
	/* O_NONBLOCK until the type is known: opening a FIFO would wait for
	 * a writer forever. */
	int fd = open(path, flags | O_NONBLOCK | (img->direct ? O_DIRECT : 0));
	int err;

	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0 || (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) ||
	    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0) {
		err = S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL;
		close(fd);
		return err;
	}
	img->fds[IMAGE_FD_MAIN] = img->fds[IMAGE_FD_BUFFERED] = fd;
	img->nr_fds = IMAGE_NR_FDS;
	img->align = img->zero_unit = 1;
	img->ops = S_ISBLK(st.st_mode) ? &blkdev_ops : &file_ops;
	if (S_ISBLK(st.st_mode) && (err = image_probe_blkdev(img, fd)) < 0)
		return err;
	if (S_ISREG(st.st_mode))
		img->size = (uint64_t)st.st_size;
	if (img->direct) {
		/* Unaligned requests (dd bs=7) cannot use O_DIRECT; they go
		 * through a second, buffered descriptor.  Linux keeps the two
		 * coherent: direct writes invalidate the cached range and direct
		 * reads write dirty pages back first. */
		img->fds[IMAGE_FD_BUFFERED] = open(path, flags);
		if (img->fds[IMAGE_FD_BUFFERED] < 0)
			return -errno;
		if (img->align < page_size())
			img->align = (uint32_t)page_size();
	}
	/* A device node's file system (devtmpfs) says nothing of the device. */
	img->in_memory = S_ISREG(st.st_mode) && fstatfs(fd, &sfs) == 0 &&
		(sfs.f_type == TMPFS_MAGIC || sfs.f_type == RAMFS_MAGIC);
	img->atime = st.st_atim;
	img->mtime = st.st_mtim;
	img->ctime = st.st_ctim;
	return 0;
}

/* Open 'path' ("null:SIZE", a regular file, a block device) with the
 * writable and direct settings already in *img.  Returns 0 or -errno
 * (-EINVAL: a malformed null: size or an unsupported file type). */
static int image_open(struct image *img, const char *path)
{
	img->path = path;
	img->fds[IMAGE_FD_MAIN] = img->fds[IMAGE_FD_BUFFERED] = -1;
	img->nowait_read_ok = img->nowait_write_ok = true;
	pthread_mutex_init(&img->times_lock, NULL);
	pthread_mutex_init(&img->files.lock, NULL);
	pthread_mutex_init(&img->log.lock, NULL);
	clock_gettime(CLOCK_REALTIME, &img->mtime);
	img->atime = img->ctime = img->mtime;
	if (strncmp(path, "null:", 5) == 0)
		return image_open_null(img, path);
	return image_open_path(img, path);
}

/* ---- What the protocol layer calls ---- */

/* Pick the descriptor for an I/O: O_DIRECT needs offset, length and buffer
 * aligned. */
static void image_io_route(const struct image *img, struct image_io *io)
{
	uint64_t mask = img->align - 1;

	io->fd_role = ((image_pos(img, io->off) | io->len | (uintptr_t)io->buf) & mask) == 0 ?
		      IMAGE_FD_MAIN : IMAGE_FD_BUFFERED;
}

/* With --passthrough, writes past EOF grow the file behind our back. */
static void image_refresh_size(struct image *img)
{
	struct stat st;

	if (img->passthrough && fstat(img->fds[IMAGE_FD_MAIN], &st) == 0)
		img->size = (uint64_t)st.st_size;
}

static int image_getattr(struct image *img, struct fuse_attr *a)
{
	a->ino = FUSE_ROOT_ID;
	a->size = img->size;
	a->mode = S_IFREG | img->mode;
	a->nlink = 1;
	a->uid = img->uid;
	a->gid = img->gid;
	a->blksize = 4096;
	return img->ops->getattr(img, a);
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
static int image_truncate(struct image *img, uint64_t size)
{
	uint64_t cur;
	int err;

	image_refresh_size(img);
	cur = img->size;
	if (size == cur)
		return 0;
	if (size > INT64_MAX || (size > cur && !img->growable))
		return -EFBIG;
	if (!img->growable)
		return img->ops->zero(img, size, cur - size);
	if ((err = img->ops->resize(img, size)) < 0)
		return err;
	img->size = size;
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

static int image_set_times(struct image *img, const struct fuse_setattr_in *in)
{
	struct timespec ts[2] = {
		setattr_time(in->valid & FATTR_ATIME, in->valid & FATTR_ATIME_NOW,
			     in->atime, in->atimensec),
		setattr_time(in->valid & FATTR_MTIME, in->valid & FATTR_MTIME_NOW,
			     in->mtime, in->mtimensec),
	};

	return img->ops->set_times(img, ts);
}

/*
 * fallocate(2) on the image: mode 0 and KEEP_SIZE preallocate,
 * PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE[|KEEP_SIZE] zero; anything else is
 * EOPNOTSUPP.  Without KEEP_SIZE a fixed-size export cannot reach past EOF
 * (ENOSPC); a growable one grows.
 */
static int image_fallocate(struct image *img, uint32_t mode, uint64_t off, uint64_t len)
{
	bool keep = mode & FALLOC_FL_KEEP_SIZE;
	uint32_t kind = mode & ~(uint32_t)FALLOC_FL_KEEP_SIZE;
	uint64_t end;
	int err;

	if (kind != 0 && kind != FALLOC_FL_ZERO_RANGE &&
	    !(kind == FALLOC_FL_PUNCH_HOLE && keep))
		return -EOPNOTSUPP;
	image_refresh_size(img);
	if (off > INT64_MAX || len == 0 || len > INT64_MAX - off)
		return len == 0 ? -EINVAL : -EFBIG;
	end = off + len;
	if (!keep && end > img->size && !img->growable)
		return -ENOSPC;
	/* A fixed-size export has nothing past EOF: KEEP_SIZE requests are
	 * clipped there, or a client could make the host preallocate without
	 * limit beyond the image (and fill its disk). */
	if (!img->growable && end > img->size) {
		if (off >= img->size)
			return 0;
		len = img->size - off;
		end = img->size;
	}
	if ((err = img->ops->fallocate(img, (int)mode, off, len)) < 0)
		return err;
	if (!keep)
		image_size_grow(img, end);
	return 0;
}

/* SEEK_DATA/SEEK_HOLE within [0, size): ENXIO at or past EOF, or when no
 * data follows. */
static int64_t image_seek(struct image *img, uint64_t off, uint32_t whence)
{
	uint64_t size;
	int64_t pos;

	image_refresh_size(img);
	size = img->size;
	if (off >= size)
		return -ENXIO;
	pos = img->ops->seek(img, off, (int)whence, size);
	if (pos >= 0 && (uint64_t)pos >= size)
		return whence == SEEK_DATA ? -ENXIO : (int64_t)size;
	return pos;
}

static int image_statfs(struct image *img, struct fuse_kstatfs *st)
{
	st->namelen = 255;
	return img->ops->statfs(img, st);
}

static int image_sync(struct image *img, bool datasync)
{
	return img->ops->sync(img, datasync);
}

/* Log a failed I/O on the image ("IMAGE: read of 4096 bytes at 0: ..."),
 * rate-limited (struct image_log). */
static void __attribute__((format(printf, 2, 3)))
image_log_failure(struct image *img, const char *fmt, ...)
{
	struct image_log *l = &img->log;
	uint64_t window = now_ns() / 1000000000u;
	unsigned held = 0;
	char what[256];
	va_list ap;

	pthread_mutex_lock(&l->lock);
	if (window != l->window) {
		l->window = window;
		l->lines = 0;
	}
	if (l->lines >= IO_LOG_BURST) {
		l->held++;
		pthread_mutex_unlock(&l->lock);
		return;
	}
	l->lines++;
	held = l->held;
	l->held = 0;
	pthread_mutex_unlock(&l->lock);
	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	if (held)
		log_err("%s: %u more I/O errors not logged", img->path, held);
	log_err("%s: %s", img->path, what);
}

/* Say how many failures the rate limit held back since the last line. */
static void image_log_flush(struct image *img)
{
	unsigned held;

	pthread_mutex_lock(&img->log.lock);
	held = img->log.held;
	img->log.held = 0;
	pthread_mutex_unlock(&img->log.lock);
	if (held)
		log_err("%s: %u more I/O errors not logged", img->path, held);
}

/* A new open file: *fh for the OPEN reply.  It will be told of write-back
 * errors from now on.  Returns 0 or -ENOMEM. */
static int image_file_open(struct image *img, uint64_t *fh)
{
	struct image_files *f = &img->files;
	size_t i;
	int err = 0;

	pthread_mutex_lock(&f->lock);
	for (i = 0; i < f->nr_slots && f->slots[i].open; i++)
		;
	if (i == f->nr_slots) {
		size_t n = f->nr_slots ? f->nr_slots * 2 : 16;
		struct image_file *slots = realloc(f->slots, n * sizeof(*slots));

		if (slots) {
			memset(slots + f->nr_slots, 0, (n - f->nr_slots) * sizeof(*slots));
			f->slots = slots;
			f->nr_slots = n;
		} else {
			err = -ENOMEM;
		}
	}
	if (!err) {
		f->slots[i] = (struct image_file){ .open = true, .seen = f->errors };
		*fh = i + 1;
	}
	pthread_mutex_unlock(&f->lock);
	return err;
}

/* RELEASE of 'fh'; an fh we did not hand out is ignored. */
static void image_file_release(struct image *img, uint64_t fh)
{
	struct image_files *f = &img->files;

	pthread_mutex_lock(&f->lock);
	if (fh >= 1 && fh <= f->nr_slots)
		f->slots[fh - 1].open = false;
	pthread_mutex_unlock(&f->lock);
}

/* Record a write-back error of the image ('err' < 0): every open file
 * will be told at its next fsync. */
static void image_wb_error(struct image *img, int err)
{
	pthread_mutex_lock(&img->files.lock);
	img->files.errors++;
	img->files.err = err;
	pthread_mutex_unlock(&img->files.lock);
}

/* Write-back errors recorded so far: acknowledged writes lost. */
static uint32_t image_wb_errors(struct image *img)
{
	uint32_t n;

	pthread_mutex_lock(&img->files.lock);
	n = img->files.errors;
	pthread_mutex_unlock(&img->files.lock);
	return n;
}

/*
 * fsync(2) for the open file 'fh': sync the image, then report the first
 * write-back error this file has not been told of yet (errseq semantics).
 * Returns 0 or -errno.
 */
static int image_file_sync(struct image *img, uint64_t fh, bool datasync)
{
	struct image_files *f = &img->files;
	int err = image_sync(img, datasync);

	if (err) {
		image_log_failure(img, "fsync: %s", strerror(-err));
		image_wb_error(img, err);
	}
	pthread_mutex_lock(&f->lock);
	if (fh >= 1 && fh <= f->nr_slots && f->slots[fh - 1].open) {
		struct image_file *file = &f->slots[fh - 1];

		if (file->seen != f->errors) {
			err = f->err;
			file->seen = f->errors;
		}
	}
	pthread_mutex_unlock(&f->lock);
	return err;
}

/* ======================================================================
 * FUSE protocol: transport-independent request handlers
 *
 * One table, fuse_opcodes[], gives each opcode its name, the size of the
 * fixed argument struct that starts its request, and its handler.
 * fuse_dispatch() checks the argument size (a short request gets EINVAL
 * and nothing outside the request buffer is ever read) and calls the
 * handler, which fills 'rep' and says what happens next: reply now, send
 * no reply, or run rep->io against the image first and then complete the
 * reply with fuse_io_complete().  How the I/O is run is the transport's
 * choice.  Reply sizes are exact: the io_uring transport sends out_len
 * bytes and the kernel rejects a mismatch.
 * ====================================================================== */

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
 * size.  A nonzero error means no payload is sent.  'io' is the image I/O
 * of a READ or WRITE (FUSE_IMAGE_IO).
 */
struct fuse_reply {
	int error;
	void *out;
	size_t out_cap;
	size_t out_len;
	size_t out_zeroed;	/* in: leading bytes of 'out' known to be zero */
	bool out_zeros;		/* out: the payload is zeros only (null: READ) */
	struct image_io io;
};

enum fuse_verdict {
	FUSE_REPLY,		/* send rep now */
	FUSE_NO_REPLY,		/* FORGET, INTERRUPT: the kernel expects none */
	FUSE_IMAGE_IO,		/* run rep->io, then fuse_io_complete() */
};

typedef enum fuse_verdict fuse_handler(struct image *img, const struct fuse_req *req,
				       struct fuse_reply *rep);

static enum fuse_verdict fuse_fail(struct fuse_reply *rep, int err)
{
	rep->error = err;
	return FUSE_REPLY;
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

static enum fuse_verdict fuse_reply_attr(struct image *img, struct fuse_reply *rep)
{
	struct fuse_attr_out *out = fuse_reply_buf(rep, sizeof(*out));

	/* attr_valid 0: the size and st_blocks change behind the kernel's back
	 * (fallocate, growth); a GETATTR is cheap next to a stale stat. */
	if (out)
		rep->error = image_getattr(img, &out->attr);
	return FUSE_REPLY;
}

/* LOOKUP: the root is a regular file, it has no names: ENOENT. */
static enum fuse_verdict fuse_lookup(struct image *img, const struct fuse_req *req,
				     struct fuse_reply *rep)
{
	(void)img;
	(void)req;
	return fuse_fail(rep, -ENOENT);
}

/* FORGET, BATCH_FORGET, INTERRUPT: no reply; I/O is never cancelled. */
static enum fuse_verdict fuse_no_reply(struct image *img, const struct fuse_req *req,
				       struct fuse_reply *rep)
{
	(void)img;
	(void)req;
	(void)rep;
	return FUSE_NO_REPLY;
}

/* GETATTR: the one inode; size authoritative, st_blocks from the image. */
static enum fuse_verdict fuse_getattr(struct image *img, const struct fuse_req *req,
				      struct fuse_reply *rep)
{
	(void)req;
	return fuse_reply_attr(img, rep);
}

/*
 * SETATTR: size (fixed unless --growable, see image_truncate), mode (never
 * +w on a read-only export), uid/gid (only with allow_other, as QEMU does,
 * so an owner cannot lock itself out), atime/mtime (the image's own, so not
 * on a read-only export: EROFS).  FH, LOCKOWNER and CTIME carry no request
 * of their own.
 */
static enum fuse_verdict fuse_setattr(struct image *img, const struct fuse_req *req,
				      struct fuse_reply *rep)
{
	const struct fuse_setattr_in *in = req->arg;
	uint32_t v = in->valid;
	int err = 0;

	if ((v & FATTR_SIZE) && !img->writable)
		err = -EROFS;
	else if ((v & FATTR_MODE) && !img->writable && (in->mode & 0222))
		err = -EROFS;
	else if ((v & (FATTR_ATIME | FATTR_MTIME)) && !img->writable)
		err = -EROFS;		/* they would be written to the image */
	else if ((v & FATTR_UID) && in->uid != img->uid && !img->allow_chown)
		err = -EPERM;
	else if ((v & FATTR_GID) && in->gid != img->gid && !img->allow_chown)
		err = -EPERM;
	if (!err && (v & FATTR_SIZE))
		err = image_truncate(img, in->size);
	if (!err && (v & (FATTR_ATIME | FATTR_MTIME)))
		err = image_set_times(img, in);
	if (err)
		return fuse_fail(rep, err);
	if (v & FATTR_MODE)
		img->mode = in->mode & 07777;
	if (v & FATTR_KILL_SUIDGID)
		img->mode &= ~(uint32_t)(S_ISUID | S_ISGID);
	if (v & FATTR_UID)
		img->uid = in->uid;
	if (v & FATTR_GID)
		img->gid = in->gid;
	return fuse_reply_attr(img, rep);
}

/* OPEN: direct I/O to the daemon so the image is not cached twice (the host
 * caches it already), or with --passthrough the kernel's own I/O on the
 * image; opening for write on a read-only export is EROFS, as on a
 * read-only file system. */
static enum fuse_verdict fuse_open(struct image *img, const struct fuse_req *req,
				   struct fuse_reply *rep)
{
	const struct fuse_open_in *in = req->arg;
	struct fuse_open_out *out;

	if ((in->flags & O_ACCMODE) != O_RDONLY && !img->writable)
		return fuse_fail(rep, -EROFS);
	out = fuse_reply_buf(rep, sizeof(*out));
	if (out && (rep->error = image_file_open(img, &out->fh)) < 0)
		return FUSE_REPLY;
	if (out && img->passthrough) {
		out->open_flags = FOPEN_PASSTHROUGH;
		out->backing_id = img->backing_id;
	} else if (out) {
		out->open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
	}
	return FUSE_REPLY;
}

/* READ: short only at EOF; the data lands in rep->out. */
static enum fuse_verdict fuse_read(struct image *img, const struct fuse_req *req,
				   struct fuse_reply *rep)
{
	const struct fuse_read_in *in = req->arg;
	uint64_t size = img->size, len = in->size;

	if (len > rep->out_cap)
		len = rep->out_cap;
	if (in->offset >= size)
		len = 0;
	else if (len > size - in->offset)
		len = size - in->offset;
	rep->out_len = len;
	if (len == 0)
		return FUSE_REPLY;
	rep->io = (struct image_io){ .write = false, .off = in->offset, .len = (uint32_t)len,
				     .buf = rep->out, .buf_zeroed = rep->out_zeroed };
	image_io_route(img, &rep->io);
	return FUSE_IMAGE_IO;
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

/*
 * WRITE: EROFS on a read-only export; a write reaching past EOF grows the
 * image with --growable, is cut short at EOF without it, and fails with
 * ENOSPC when it starts at or after EOF (what a full block device does).
 */
static enum fuse_verdict fuse_write(struct image *img, const struct fuse_req *req,
				    struct fuse_reply *rep)
{
	const struct fuse_write_in *in = req->arg;
	uint64_t size = img->size, len = in->size;

	if (req->data_len != in->size || in->offset > INT64_MAX)
		return fuse_fail(rep, -EINVAL);
	if (!img->writable)
		return fuse_fail(rep, -EROFS);
	if (len > INT64_MAX - in->offset)
		return fuse_fail(rep, -EFBIG);
	if (!img->growable && len && in->offset + len > size) {
		if (in->offset >= size)
			return fuse_fail(rep, -ENOSPC);
		len = size - in->offset;
	}
	if (len == 0) {
		fuse_reply_written(rep, 0);
		return FUSE_REPLY;
	}
	rep->io = (struct image_io){ .write = true, .off = in->offset, .len = (uint32_t)len,
				     .buf = (void *)req->data,
				     .rw_flags = fuse_write_sync_flags(in->flags) };
	image_io_route(img, &rep->io);
	return FUSE_IMAGE_IO;
}

/* The end of a READ or WRITE: 'res' is what the image I/O returned (bytes,
 * or -errno). */
static void fuse_io_complete(struct image *img, struct fuse_reply *rep, ssize_t res)
{
	const struct image_io *io = &rep->io;

	if (res < 0) {
		image_log_failure(img, "%s of %u bytes at %llu: %s", io->write ? "write" : "read",
				  io->len, (unsigned long long)image_pos(img, io->off),
				  strerror((int)-res));
		/* A synchronous write flushes: its EIO is a write-back error,
		 * which the other open files must hear of too. */
		if (io->write && io->rw_flags && res == -EIO)
			image_wb_error(img, -EIO);
		rep->error = (int)res;
		rep->out_len = 0;
		return;
	}
	if (!io->write) {
		rep->out_len = (size_t)res;
		rep->out_zeros = io->zeros;
		return;
	}
	if (img->growable && res > 0)
		image_size_grow(img, io->off + (uint64_t)res);
	fuse_reply_written(rep, (uint32_t)res);
}

static enum fuse_verdict fuse_statfs(struct image *img, const struct fuse_req *req,
				     struct fuse_reply *rep)
{
	struct fuse_statfs_out *out = fuse_reply_buf(rep, sizeof(*out));

	(void)req;
	if (out)
		rep->error = image_statfs(img, &out->st);
	return FUSE_REPLY;
}

/* FLUSH: close(2) of a regular file does not sync either.  DESTROY: the
 * stop follows the unmount. */
static enum fuse_verdict fuse_nothing(struct image *img, const struct fuse_req *req,
				      struct fuse_reply *rep)
{
	(void)img;
	(void)req;
	(void)rep;
	return FUSE_REPLY;
}

/* RELEASE: the open file is gone (its write-back error state with it). */
static enum fuse_verdict fuse_release(struct image *img, const struct fuse_req *req,
				      struct fuse_reply *rep)
{
	const struct fuse_release_in *in = req->arg;

	(void)rep;
	image_file_release(img, in->fh);
	return FUSE_REPLY;
}

/* FSYNC: after fsync(2) on the export returns, the data is on stable
 * storage; a write-back error is reported to every open file once, as on
 * the image itself (image_file_sync). */
static enum fuse_verdict fuse_fsync(struct image *img, const struct fuse_req *req,
				    struct fuse_reply *rep)
{
	const struct fuse_fsync_in *in = req->arg;

	return fuse_fail(rep, image_file_sync(img, in->fh, in->fsync_flags & FUSE_FSYNC_FDATASYNC));
}

/* INIT is answered once, at mount (start-up reads it off /dev/fuse). */
static enum fuse_verdict fuse_init_again(struct image *img, const struct fuse_req *req,
					 struct fuse_reply *rep)
{
	(void)img;
	(void)req;
	return fuse_fail(rep, -EPROTO);
}

/* ACCESS is only sent without default_permissions; answer it anyway. */
static enum fuse_verdict fuse_access(struct image *img, const struct fuse_req *req,
				     struct fuse_reply *rep)
{
	const struct fuse_access_in *in = req->arg;

	return fuse_fail(rep, (in->mask & W_OK) && !img->writable ? -EROFS : 0);
}

/* FALLOCATE: see image_fallocate. */
static enum fuse_verdict fuse_fallocate(struct image *img, const struct fuse_req *req,
					struct fuse_reply *rep)
{
	const struct fuse_fallocate_in *in = req->arg;

	if (!img->writable)
		return fuse_fail(rep, -EROFS);
	return fuse_fail(rep, image_fallocate(img, in->mode, in->offset, in->length));
}

/* LSEEK: only SEEK_DATA/SEEK_HOLE reach us; ENXIO at or past EOF, or when no
 * data follows (a wrong answer makes cp loop forever). */
static enum fuse_verdict fuse_lseek(struct image *img, const struct fuse_req *req,
				    struct fuse_reply *rep)
{
	const struct fuse_lseek_in *in = req->arg;
	struct fuse_lseek_out *out;
	int64_t pos;

	if (in->whence != SEEK_DATA && in->whence != SEEK_HOLE)
		return fuse_fail(rep, -EINVAL);
	pos = image_seek(img, in->offset, in->whence);
	if (pos < 0)
		return fuse_fail(rep, (int)pos);
	out = fuse_reply_buf(rep, sizeof(*out));
	if (out)
		out->offset = (uint64_t)pos;
	return FUSE_REPLY;
}

/*
 * Every opcode of fuse_kernel.h: its name, the fixed argument struct its
 * request starts with, its handler.  No handler: ENOSYS, which the kernel
 * remembers for the opcodes it may fall back from (xattrs, COPY_FILE_RANGE,
 * STATX, POLL).
 */
struct fuse_op_desc {
	const char *name;
	size_t arg_size;
	fuse_handler *handler;
};

#define OP(name, arg, fn)	[FUSE_##name] = { #name, arg, fn }
static const struct fuse_op_desc fuse_opcodes[] = {
	OP(LOOKUP, 0, fuse_lookup),
	OP(FORGET, 0, fuse_no_reply),
	OP(GETATTR, sizeof(struct fuse_getattr_in), fuse_getattr),
	OP(SETATTR, sizeof(struct fuse_setattr_in), fuse_setattr),
	OP(OPEN, sizeof(struct fuse_open_in), fuse_open),
	OP(READ, sizeof(struct fuse_read_in), fuse_read),
	OP(WRITE, sizeof(struct fuse_write_in), fuse_write),
	OP(STATFS, 0, fuse_statfs),
	OP(RELEASE, sizeof(struct fuse_release_in), fuse_release),
	OP(FSYNC, sizeof(struct fuse_fsync_in), fuse_fsync),
	OP(SETXATTR, 0, NULL),
	OP(GETXATTR, 0, NULL),
	OP(LISTXATTR, 0, NULL),
	OP(REMOVEXATTR, 0, NULL),
	OP(FLUSH, sizeof(struct fuse_flush_in), fuse_nothing),
	OP(INIT, sizeof(struct fuse_init_in), fuse_init_again),
	OP(ACCESS, sizeof(struct fuse_access_in), fuse_access),
	OP(INTERRUPT, 0, fuse_no_reply),
	OP(DESTROY, 0, fuse_nothing),
	OP(IOCTL, 0, NULL),
	OP(POLL, 0, NULL),
	OP(BATCH_FORGET, 0, fuse_no_reply),
	OP(FALLOCATE, sizeof(struct fuse_fallocate_in), fuse_fallocate),
	OP(LSEEK, sizeof(struct fuse_lseek_in), fuse_lseek),
	OP(COPY_FILE_RANGE, 0, NULL),
	OP(STATX, 0, NULL),
	OP(COPY_FILE_RANGE_64, 0, NULL),
};
#undef OP
#define FUSE_NR_OPCODES	(sizeof(fuse_opcodes) / sizeof(fuse_opcodes[0]))

/* The table's entry for 'op', or NULL for an opcode it does not list. */
static const struct fuse_op_desc *fuse_opcode(uint32_t op)
{
	return op < FUSE_NR_OPCODES && fuse_opcodes[op].name ? &fuse_opcodes[op] : NULL;
}

static const char *fuse_opcode_name(uint32_t op)
{
	const struct fuse_op_desc *o = fuse_opcode(op);

	return o ? o->name : "?";
}

/* Size of the fixed argument struct that starts an opcode's request. */
static size_t fuse_arg_size(uint32_t op)
{
	const struct fuse_op_desc *o = fuse_opcode(op);

	return o ? o->arg_size : 0;
}

/* Answer one request, or say which image I/O it needs first. */
static enum fuse_verdict fuse_dispatch(struct image *img, const struct fuse_req *req,
				       struct fuse_reply *rep)
{
	const struct fuse_op_desc *o = fuse_opcode(req->in->opcode);

	rep->error = 0;
	rep->out_len = 0;
	rep->out_zeros = false;
	if (!o || !o->handler)
		return fuse_fail(rep, -ENOSYS);
	/* Every opcode with a fixed argument needs all of it. */
	if (req->arg_len < o->arg_size)
		return fuse_fail(rep, -EINVAL);
	return o->handler(img, req, rep);
}

/*
 * Compute the INIT reply (include/uapi/linux/fuse.h, "INIT request and
 * reply").  max_write is the largest the kernel will take ('max_pages_limit'
 * pages, fs.fuse.max_pages_limit; 0 if unknown), up to 'max_payload' bytes.
 * 'nr_threads' serving threads size the background queue.  Returns 0, or
 * -EPROTO (a major version we do not speak), -EOPNOTSUPP (--passthrough
 * and the kernel does not offer it).
 */
static int fuse_init(const struct fuse_init_in *in, struct fuse_init_out *out,
		     bool passthrough, uint32_t max_payload, unsigned max_pages_limit,
		     unsigned nr_threads)
{
	uint64_t offered = in->flags, wanted;
	unsigned max_pages = 32, bg;

	memset(out, 0, sizeof(*out));
	out->major = FUSE_KERNEL_VERSION;
	out->minor = FUSE_KERNEL_MINOR_VERSION;
	if (in->major != FUSE_KERNEL_VERSION)
		return -EPROTO;
	if (offered & FUSE_INIT_EXT)
		offered |= (uint64_t)in->flags2 << 32;

	wanted = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES |
		 FUSE_INIT_EXT | FUSE_DIRECT_IO_ALLOW_MMAP;
	if (passthrough) {
		if (!(offered & FUSE_PASSTHROUGH))
			return -EOPNOTSUPP;
		wanted |= FUSE_PASSTHROUGH;
		out->max_stack_depth = 1;	/* the image's file system + us */
	}
	wanted &= offered;
	if (wanted & FUSE_MAX_PAGES) {
		max_pages = (unsigned)(max_payload / page_size());
		if (max_pages > max_pages_limit && max_pages_limit > 0)
			max_pages = max_pages_limit;
	}

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
	out->max_write = (uint32_t)(max_pages * page_size());
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
	if ((in->opcode == FUSE_READ || in->opcode == FUSE_WRITE) &&
	    req->arg_len >= sizeof(struct fuse_read_in)) {
		const struct fuse_read_in *rw = req->arg;

		off = rw->offset;
		len = rw->size;
	}
	fprintf(stderr, "uexportd: [%s%u] %s unique=%llu off=%llu len=%llu -> %d/%zu\n",
		who, idx, fuse_opcode_name(in->opcode), (unsigned long long)in->unique,
		(unsigned long long)off, (unsigned long long)len, rep->error,
		rep->out_len);
}

/*
 * Zero tracking for null: reads, shared by the transports.  A payload buffer
 * stays zero after a reply of zeros; anything the kernel delivered into it
 * or any other reply may have dirtied it.
 */
static void payload_track_zero(size_t *zeroed, struct fuse_reply *rep, size_t delivered)
{
	if (delivered)
		*zeroed = 0;
	rep->out_zeroed = *zeroed;
}

static void payload_track_reply(size_t *zeroed, const struct fuse_reply *rep)
{
	if (rep->out_zeros && !rep->error) {
		if (rep->out_len > *zeroed)
			*zeroed = rep->out_len;
	} else if (rep->out_len || rep->error) {
		*zeroed = 0;
	}
}

/* ======================================================================
 * Transports: the export every serving thread shares
 *
 * struct export is the one object main() creates and passes down: the
 * image, the FUSE connection as negotiated, and the serving threads of both
 * transports, which count themselves out and wake the main thread when
 * they end.
 * ====================================================================== */

struct devfuse_pool;
struct ring_pool;

struct export {
	struct image img;
	int dev_fd;			/* the mount's /dev/fuse fd, -1 before */
	uint32_t max_write;		/* negotiated at INIT; fixed afterwards */
	struct devfuse_pool *devfuse;	/* /dev/fuse threads, NULL before */
	struct ring_pool *rings;	/* io_uring queues, NULL when not used */
	atomic_int threads_live;	/* serving threads not yet ended */
	atomic_bool stopping;		/* unmount under way: ENODEV is expected */
	atomic_bool failed;		/* a serving thread cannot go on: stop */
	pthread_t main_thread;		/* woken with SIGUSR1 by ending threads */
};

/* A serving thread cannot go on (logged): ask the main thread to stop
 * the export cleanly. */
static void export_fail(struct export *exp)
{
	atomic_store(&exp->failed, true);
	pthread_kill(exp->main_thread, SIGUSR1);
}

/* A serving thread is about to return: count it out and tell the main
 * thread (an unmount, or a fatal error). */
static void export_thread_exited(struct export *exp)
{
	atomic_fetch_sub(&exp->threads_live, 1);
	pthread_kill(exp->main_thread, SIGUSR1);
}

/* ======================================================================
 * Transport: classic /dev/fuse
 *
 * One thread per CPU, pinned, each blocked in read() on its own clone of the
 * device fd (replies must go to the fd that delivered the request).  Each
 * thread owns one request buffer and one reply buffer; a request is answered
 * before the next read(), so the buffers are never shared.  Image I/O is
 * done in the thread.
 * ====================================================================== */

struct devfuse_worker {
	struct export *exp;
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

struct devfuse_pool {
	unsigned nr_workers;		/* started */
	struct devfuse_worker workers[];
};

/* Buffers for requests of up to 'max_write' bytes of payload, offset so
 * that WRITE data (after the in-header and write_in) and READ data (after
 * the out-header) start page-aligned: O_DIRECT images then take them
 * without a bounce.  Returns 0 or -ENOMEM. */
static int devfuse_alloc(struct devfuse_worker *w, uint32_t max_write)
{
	size_t ps = page_size();
	size_t hdr_in = sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in);
	size_t hdr_out = sizeof(struct fuse_out_header);
	char *a, *b;

	w->in_cap = hdr_in + max_write;
	if (w->in_cap < FUSE_MIN_READ_BUFFER)
		w->in_cap = FUSE_MIN_READ_BUFFER;
	w->out_cap = hdr_out + max_write;
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

/* Split a read()-framed request of 'n' bytes into header, fixed argument
 * and payload.  -EINVAL if the header's length disagrees with 'n'. */
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
	struct image *img = &w->exp->img;
	struct fuse_req req;
	struct fuse_reply rep = { .out = w->out + sizeof(struct fuse_out_header),
				  .out_cap = w->out_cap - sizeof(struct fuse_out_header) };
	enum fuse_verdict v = FUSE_REPLY;

	if (devfuse_parse(w->in, n, &req) < 0) {
		rep.error = -EINVAL;
	} else {
		payload_track_zero(&w->out_zeroed, &rep, 0);
		v = fuse_dispatch(img, &req, &rep);
		if (v == FUSE_IMAGE_IO)
			fuse_io_complete(img, &rep, img->ops->rw(img, &rep.io));
		fuse_log_request("dev", w->idx, &req, &rep);
		payload_track_reply(&w->out_zeroed, &rep);
	}
	if (v != FUSE_NO_REPLY)
		devfuse_reply(w, req.in, &rep);
}

static void *devfuse_worker_main(void *arg)
{
	struct devfuse_worker *w = arg;

	pin_to_cpu(w->cpu);
	for (;;) {
		ssize_t n = read(w->fd, w->in, w->in_cap);
		int err = n < 0 ? errno : 0;

		if (err == EINTR || err == EAGAIN || err == ENOENT)
			continue;
		if (err) {
			if (err != ENODEV && !w->exp->stopping)
				log_err("thread %u: read /dev/fuse: %s", w->idx, strerror(err));
			break;
		}
		if ((size_t)n < sizeof(struct fuse_in_header)) {
			log_err("thread %u: short request (%zd bytes) dropped", w->idx, n);
			continue;
		}
		devfuse_serve_one(w, (size_t)n);
	}
	export_thread_exited(w->exp);
	return NULL;
}

/* A clone gets its own processing list, so threads never contend on one fd.
 * Unprivileged daemons cannot open /dev/fuse (often 0600): they share. */
static int devfuse_clone(int dev_fd)
{
	uint32_t src = (uint32_t)dev_fd;
	int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return dev_fd;
	if (ioctl(fd, FUSE_DEV_IOC_CLONE, &src) < 0) {
		close(fd);
		return dev_fd;
	}
	return fd;
}

/* Start one serving thread per CPU we may run on.  Returns 0, -ENOMEM, or
 * the pthread_create error; threads already started keep serving (they end
 * with the connection). */
static int devfuse_start(struct export *exp)
{
	int cpus[CPU_SETSIZE];
	unsigned n = cpu_list(cpus, CPU_SETSIZE);
	struct devfuse_pool *pool = calloc(1, sizeof(*pool) + n * sizeof(pool->workers[0]));

	if (!pool)
		return -ENOMEM;
	exp->devfuse = pool;
	for (unsigned i = 0; i < n; i++) {
		struct devfuse_worker *w = &pool->workers[i];
		int err;

		w->exp = exp;
		w->idx = i;
		w->cpu = cpus[i];
		w->fd = i == 0 ? exp->dev_fd : devfuse_clone(exp->dev_fd);
		err = devfuse_alloc(w, exp->max_write);
		if (!err)
			err = -pthread_create(&w->thread, NULL, devfuse_worker_main, w);
		if (err)
			return err;
		pool->nr_workers++;
		atomic_fetch_add(&exp->threads_live, 1);
	}
	return 0;
}

static void devfuse_join(struct export *exp)
{
	for (unsigned i = 0; exp->devfuse && i < exp->devfuse->nr_workers; i++)
		pthread_join(exp->devfuse->workers[i].thread, NULL);
	free(exp->devfuse);	/* the threads are gone: nothing points into it */
	exp->devfuse = NULL;
}

/* ======================================================================
 * Transport: FUSE-over-io_uring
 *
 * The kernel (6.14+) wants one queue per *possible* CPU (without /sys the
 * count is the kernel's answer, ring_probe_queues()) and routes each
 * request to the queue of the CPU its caller runs on; the ring only becomes
 * ready once every queue has an entry registered (fs/fuse/dev_uring.c).
 * Thread k owns queue k: its own ring, pinned to CPU k when that CPU is
 * ours to run on.  The queues together are one struct ring_pool.
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
 * neither can overflow (ring_sqe() checks it).  A queue's memory is freed
 * only when all its entries are ended, i.e. when the kernel can no longer
 * write into them.
 *
 * user_data: bit 63 set for image I/O, clear for FUSE commands; the low 32
 * bits are the entry index.
 * ====================================================================== */

#define UD_IMAGE_IO	(1ULL << 63)
_Static_assert(sizeof(struct fuse_uring_cmd_req) <= 80, "fits the SQE128 command area");
_Static_assert(sizeof(struct fuse_uring_req_header) == 288, "fuse_uring_req_header");

/* Fixed files of every ring: the connection, then image.fds[] in order. */
#define FIXED_FUSE	0
#define FIXED_IMAGE(role)	(1 + (role))

struct ring_entry {
	struct fuse_uring_req_header *hdr;	/* kernel writes the request here */
	void *payload;				/* and the data; we reply in place */
	struct iovec iov[2];			/* read by REGISTER at issue time */
	bool registering;			/* REGISTER not yet accepted */
	size_t zeroed;				/* payload bytes known zero (null:) */
	struct fuse_reply rep;			/* with rep.io the image I/O */
};

struct ring_queue {
	struct ring_pool *pool;
	pthread_t thread;
	unsigned qid;
	int cpu;				/* -1: not pinned */
	struct ring ring;
	struct ring_entry *ents;
	void *hdr_mem, *payload_mem;
	unsigned live;				/* entries not ended */
	int setup_err, register_err;		/* read by main after each report */
	bool registered;			/* register_err reported: now main's */
	int end_err;				/* last unexpected end of an entry */
	_Atomic uint64_t served;		/* requests taken from the ring */
};

/* Where start-up stands; each queue thread waits for the next phase. */
enum ring_pool_phase {
	RING_POOL_SETUP,	/* threads build their rings and buffers */
	RING_POOL_REGISTER,	/* INIT reply sent: REGISTER, then serve */
	RING_POOL_ABANDON,	/* start-up failed: free everything and end */
};

struct ring_pool {
	struct export *exp;
	struct ring_queue *queues;
	unsigned nr_queues;		/* threads started */
	unsigned depth;			/* entries per queue */
	size_t payload_size;		/* bytes per entry */
	/* The CPUs this process may use.  A queue's io-wq workers run on
	 * these less the queue's own CPU; with only one there is nowhere to
	 * offload to (offload false). */
	cpu_set_t allowed_cpus;
	bool offload;
	/* Start-up rendezvous between main and the queue threads. */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	enum ring_pool_phase phase;
	unsigned reported;		/* threads done with the phase */
};

static void ring_pool_report(struct ring_pool *pool)
{
	pthread_mutex_lock(&pool->lock);
	pool->reported++;
	pthread_cond_broadcast(&pool->cond);
	pthread_mutex_unlock(&pool->lock);
}

/* Wait until every started queue thread has reported on the phase. */
static void ring_pool_wait_reports(struct ring_pool *pool)
{
	pthread_mutex_lock(&pool->lock);
	while (pool->reported < pool->nr_queues)
		pthread_cond_wait(&pool->cond, &pool->lock);
	pthread_mutex_unlock(&pool->lock);
}

static enum ring_pool_phase ring_pool_wait_phase(struct ring_pool *pool)
{
	enum ring_pool_phase phase;

	pthread_mutex_lock(&pool->lock);
	while (pool->phase == RING_POOL_SETUP)
		pthread_cond_wait(&pool->cond, &pool->lock);
	phase = pool->phase;
	pthread_mutex_unlock(&pool->lock);
	return phase;
}

static void ring_pool_set_phase(struct ring_pool *pool, enum ring_pool_phase phase)
{
	pthread_mutex_lock(&pool->lock);
	pool->reported = 0;
	pool->phase = phase;
	pthread_cond_broadcast(&pool->cond);
	pthread_mutex_unlock(&pool->lock);
}

/* The queue's ring, its fixed files and its entries' buffers.  Returns 0,
 * -ENOMEM, or the -errno of io_uring_setup/register/mmap. */
static int ring_queue_setup(struct ring_queue *q)
{
	struct ring_pool *pool = q->pool;
	struct image *img = &pool->exp->img;
	size_t hdr_size = round_up(sizeof(struct fuse_uring_req_header), 64);
	int files[1 + IMAGE_NR_FDS] = { pool->exp->dev_fd };
	int err;

	for (unsigned i = 0; i < img->nr_fds; i++)
		files[FIXED_IMAGE(i)] = img->fds[i];
	err = ring_init(&q->ring, pool->depth);
	if (err)
		return err;
	err = sys_io_uring_register(q->ring.fd, IORING_REGISTER_FILES, files, 1 + img->nr_fds);
	if (err < 0)
		return err;
	if (pool->offload && q->cpu >= 0) {
		cpu_set_t set = pool->allowed_cpus;

		/* Best effort: without it the workers may share our CPU. */
		CPU_CLR(q->cpu, &set);
		sys_io_uring_register(q->ring.fd, IORING_REGISTER_IOWQ_AFF, &set, sizeof(set));
	}
	q->ents = calloc(pool->depth, sizeof(*q->ents));
	q->hdr_mem = buffer_alloc(round_up(hdr_size * pool->depth, page_size()));
	q->payload_mem = buffer_alloc(pool->payload_size * pool->depth);
	if (!q->ents || !q->hdr_mem || !q->payload_mem)
		return -ENOMEM;
	for (unsigned i = 0; i < pool->depth; i++) {
		struct ring_entry *e = &q->ents[i];

		e->hdr = (void *)((char *)q->hdr_mem + hdr_size * i);
		e->payload = (char *)q->payload_mem + pool->payload_size * i;
		e->iov[0] = (struct iovec){ e->hdr, sizeof(*e->hdr) };
		e->iov[1] = (struct iovec){ e->payload, pool->payload_size };
	}
	return 0;
}

static void ring_queue_free(struct ring_queue *q)
{
	struct ring_pool *pool = q->pool;
	size_t hdr_size = round_up(sizeof(struct fuse_uring_req_header), 64);

	if (q->payload_mem)
		munmap(q->payload_mem, pool->payload_size * pool->depth);
	if (q->hdr_mem)
		munmap(q->hdr_mem, round_up(hdr_size * pool->depth, page_size()));
	free(q->ents);
	if (!q->ring.map)
		return;
	/* Closing a ring tears it down asynchronously (io_ring_exit_work),
	 * and its fixed files -- the image among them -- stay open until
	 * that runs, after we may have exited: a script that waited for us
	 * could not unmount the image's file system or remove its device
	 * yet.  Unregistering drops them now; the ring has nothing in flight
	 * (every entry has ended). */
	sys_io_uring_register(q->ring.fd, IORING_UNREGISTER_FILES, NULL, 0);
	ring_exit(&q->ring);
}

/* An SQE for the queue; the counting invariant says there always is one. */
static struct io_uring_sqe *ring_queue_sqe(struct ring_queue *q, unsigned i)
{
	struct io_uring_sqe *sqe = ring_sqe(&q->ring);

	if (!sqe) {
		log_err("queue %u: entry %u: no free SQE: counting invariant broken", q->qid, i);
		abort();
	}
	return sqe;
}

/* Queue the FUSE command that parks entry i: REGISTER the first time,
 * COMMIT_AND_FETCH (carrying the reply now in its buffers) afterwards. */
static void ring_queue_fuse_cmd(struct ring_queue *q, unsigned i)
{
	struct ring_entry *e = &q->ents[i];
	struct io_uring_sqe *sqe = ring_queue_sqe(q, i);
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
 * or claim more payload than the entry's buffer ('cap' bytes) holds. */
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

static bool ring_io_offload(const struct ring_pool *pool, const struct image_io *io)
{
	return io->len >= OFFLOAD_MIN_BYTES && pool->offload &&
	       !image_io_direct(&pool->exp->img, io);
}

/* A synchronous write (RWF_DSYNC/RWF_SYNC) ends in a flush of the image:
 * io-wq waits for it, never the queue's thread, which serves every other
 * request of its CPU meanwhile.  O_DIRECT ones complete asynchronously. */
static bool ring_io_async(const struct ring_pool *pool, const struct image_io *io)
{
	return ring_io_offload(pool, io) ||
	       (io->rw_flags && !image_io_direct(&pool->exp->img, io));
}

static void ring_queue_image_io(struct ring_queue *q, unsigned i)
{
	struct image_io *io = &q->ents[i].rep.io;
	struct io_uring_sqe *sqe = ring_queue_sqe(q, i);

	sqe->opcode = io->write ? IORING_OP_WRITE : IORING_OP_READ;
	sqe->flags = IOSQE_FIXED_FILE | (ring_io_async(q->pool, io) ? IOSQE_ASYNC : 0);
	sqe->rw_flags = io->rw_flags;
	sqe->fd = FIXED_IMAGE(io->fd_role);
	sqe->addr = (uintptr_t)io->buf + io->done;
	sqe->len = io->len - io->done;
	sqe->off = image_pos(&q->pool->exp->img, io->off + io->done);
	sqe->user_data = UD_IMAGE_IO | i;
}

/*
 * Start the image I/O of entry i: through the ring when it is large enough
 * to offload, else tried without blocking first.  Returns true if it went
 * to the ring, false if done (its result is in the reply).  An image
 * without descriptors (null:) is always done here.
 */
static bool ring_queue_start_io(struct ring_queue *q, unsigned i)
{
	struct image *img = &q->pool->exp->img;
	struct ring_entry *e = &q->ents[i];
	ssize_t n = -EAGAIN;

	e->rep.io.done = 0;
	if (!img->nr_fds || !ring_io_offload(q->pool, &e->rep.io))
		n = img->ops->rw_nowait(img, &e->rep.io);
	if (n == -EAGAIN && img->nr_fds) {
		ring_queue_image_io(q, i);
		return true;
	}
	fuse_io_complete(img, &e->rep, n);
	return false;
}

/* A request arrived in entry i: answer it now, or start its image I/O. */
static void ring_queue_request(struct ring_queue *q, unsigned i)
{
	struct ring_entry *e = &q->ents[i];
	size_t cap = q->pool->payload_size;
	struct fuse_req req;

	e->rep = (struct fuse_reply){ .out = e->payload, .out_cap = cap };
	atomic_store_explicit(&q->served,
			      atomic_load_explicit(&q->served, memory_order_relaxed) + 1,
			      memory_order_relaxed);	/* one writer: this thread */
	payload_track_zero(&e->zeroed, &e->rep, e->hdr->ring_ent_in_out.payload_sz);
	if (ring_queue_parse(e, cap, &req) < 0)
		e->rep.error = -EINVAL;
	else if (fuse_dispatch(&q->pool->exp->img, &req, &e->rep) == FUSE_IMAGE_IO &&
		 ring_queue_start_io(q, i))
		return;
	fuse_log_request("q", q->qid, &req, &e->rep);
	payload_track_reply(&e->zeroed, &e->rep);
	ring_queue_commit(q, i);
}

static void ring_queue_io_done(struct ring_queue *q, unsigned i, int res)
{
	struct ring_entry *e = &q->ents[i];
	struct fuse_req req;

	/* A failure after a partial transfer is a short transfer. */
	if (res >= 0 || e->rep.io.done)
		res = (res < 0 ? 0 : res) + (int)e->rep.io.done;
	fuse_io_complete(&q->pool->exp->img, &e->rep, res);
	if (log_debug && ring_queue_parse(e, q->pool->payload_size, &req) == 0)
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
	/* -ENOTCONN/-ECANCELED/-ENODEV: the connection is gone (normal end).
	 * Anything else ends this entry only: the kernel has not re-armed it
	 * and its commit_id is spent.  The queue serves on with the others
	 * (ring_queue_main says so if none is left). */
	if (e->registering && !q->registered) {
		if (!q->register_err)
			q->register_err = res;
	} else if (res != -ENOTCONN && res != -ECANCELED && res != -ENODEV &&
		   !q->pool->exp->stopping) {
		log_err("queue %u: entry %u: %s: entry retired", q->qid, i, strerror(-res));
		q->end_err = res;
	}
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
	unsigned depth = q->pool->depth;

	for (unsigned i = 0; i < depth; i++) {
		q->ents[i].registering = true;
		ring_queue_fuse_cmd(q, i);
	}
	q->live = depth;
	q->register_err = ring_submit_wait(&q->ring, 0);
	/* A REGISTER the kernel accepts stays parked without a CQE; one it
	 * refuses completes at once.  Collect those (and resubmit EAGAIN). */
	while (!q->register_err) {
		if (ring_submit_wait(&q->ring, 0) < 0 || ring_queue_reap(q) == 0)
			break;
	}
	/* Entries still parked in REGISTER end (ENOTCONN) only at the stop,
	 * long after main has read register_err: not REGISTER errors. */
	q->registered = true;
}

/*
 * Serve until every entry has ended.  io_uring_enter failing (EINTR,
 * EAGAIN and EBUSY are retried at once by ring_submit_wait) is retried
 * every 10 ms; after ENTER_MAX_FAILURES in a row the export is stopped
 * (one line), and the thread keeps reaping at a slower pace for the
 * stop to end its entries.
 */
#define ENTER_MAX_FAILURES	100

static void ring_queue_serve(struct ring_queue *q)
{
	unsigned failures = 0;

	while (q->live > 0) {
		int err = ring_submit_wait(&q->ring, 1);

		if (err < 0 && ++failures == ENTER_MAX_FAILURES) {
			log_err("queue %u: io_uring_enter: %s, %u times in a row: stopping the export",
				q->qid, strerror(-err), failures);
			export_fail(q->pool->exp);
		}
		if (err < 0)
			sleep_ms(failures < ENTER_MAX_FAILURES ? 10 : 100);
		else
			failures = 0;
		ring_queue_reap(q);
	}
}

static void *ring_queue_main(void *arg)
{
	struct ring_queue *q = arg;
	struct ring_pool *pool = q->pool;

	pin_to_cpu(q->cpu);
	q->setup_err = ring_queue_setup(q);
	ring_pool_report(pool);
	if (ring_pool_wait_phase(pool) == RING_POOL_REGISTER && !q->setup_err) {
		ring_queue_register(q);
		ring_pool_report(pool);
		ring_queue_serve(q);
		if (q->end_err && !pool->exp->stopping)
			log_err("queue %u: every entry has ended (last: %s): stopping the export",
				q->qid, strerror(-q->end_err));
	}
	ring_queue_free(q);
	export_thread_exited(pool->exp);
	return NULL;
}

/* Join the queue threads (each frees its own queue as it ends), then free
 * the pool.  NULL is a no-op. */
static void ring_pool_destroy(struct ring_pool *pool)
{
	for (unsigned k = 0; pool && k < pool->nr_queues; k++)
		pthread_join(pool->queues[k].thread, NULL);
	if (pool)
		free(pool->queues);
	free(pool);
}

/* Which CPUs io-wq may use, and whether there is another CPU to offload
 * to at all. */
static void ring_pool_cpus(struct ring_pool *pool)
{
	int cpus[CPU_SETSIZE];
	unsigned n = cpu_list(cpus, CPU_SETSIZE);

	CPU_ZERO(&pool->allowed_cpus);
	for (unsigned j = 0; j < n; j++)
		if (cpus[j] >= 0)
			CPU_SET(cpus[j], &pool->allowed_cpus);
	pool->offload = CPU_COUNT(&pool->allowed_cpus) > 1;
}

/*
 * Create 'nq' queues of 'depth' entries of 'payload_size' bytes: start
 * their threads and wait until each has its ring and buffers (phase
 * RING_POOL_SETUP).  Returns the pool, its threads waiting for
 * ring_pool_register() or ring_pool_abandon(); or NULL with *err (-ENOMEM,
 * the first thread's setup error, a pthread_create error) and every thread
 * already ended.
 */
static struct ring_pool *ring_pool_create(struct export *exp, unsigned nq, unsigned depth,
					  size_t payload_size, int *err)
{
	struct ring_pool *pool = calloc(1, sizeof(*pool));

	*err = -ENOMEM;
	if (!pool || !(pool->queues = calloc(nq, sizeof(*pool->queues)))) {
		free(pool);
		return NULL;
	}
	*pool = (struct ring_pool){ .exp = exp, .queues = pool->queues, .depth = depth,
				    .payload_size = payload_size, .phase = RING_POOL_SETUP };
	pthread_mutex_init(&pool->lock, NULL);
	pthread_cond_init(&pool->cond, NULL);
	ring_pool_cpus(pool);
	*err = 0;
	for (unsigned k = 0; k < nq && !*err; k++) {
		struct ring_queue *q = &pool->queues[k];

		q->pool = pool;
		q->qid = k;
		/* Offline or not ours: unpinned. */
		q->cpu = CPU_ISSET(k, &pool->allowed_cpus) ? (int)k : -1;
		*err = -pthread_create(&q->thread, NULL, ring_queue_main, q);
		if (!*err) {
			pool->nr_queues++;
			atomic_fetch_add(&exp->threads_live, 1);
		}
	}
	ring_pool_wait_reports(pool);
	for (unsigned k = 0; k < pool->nr_queues && !*err; k++)
		*err = pool->queues[k].setup_err;
	if (*err) {
		ring_pool_set_phase(pool, RING_POOL_ABANDON);
		ring_pool_destroy(pool);
		return NULL;
	}
	return pool;
}

/* Start-up failed after ring_pool_create: let the threads free their
 * queues and end, then free the pool. */
static void ring_pool_abandon(struct ring_pool *pool)
{
	ring_pool_set_phase(pool, RING_POOL_ABANDON);
	ring_pool_destroy(pool);
}

/* After the INIT reply: let the queues REGISTER and collect the verdict:
 * 0, or the first queue's REGISTER error (the kernel has then downgraded
 * the connection to /dev/fuse; the queues end by themselves). */
static int ring_pool_register(struct ring_pool *pool)
{
	int err = 0;

	ring_pool_set_phase(pool, RING_POOL_REGISTER);
	ring_pool_wait_reports(pool);
	for (unsigned k = 0; k < pool->nr_queues && !err; k++)
		err = pool->queues[k].register_err;
	return err;
}

/* Requests taken from all rings so far. */
static uint64_t ring_pool_served(const struct ring_pool *pool)
{
	uint64_t n = 0;

	for (unsigned k = 0; pool && k < pool->nr_queues; k++)
		n += atomic_load_explicit(&pool->queues[k].served, memory_order_relaxed);
	return n;
}

/*
 * How many queues the kernel wants, when /sys cannot say (a bare root).
 * It makes one per possible CPU (fs/fuse/dev_uring.c, fuse_uring_create():
 * nr_queues = num_possible_cpus()) and refuses a REGISTER for a qid >=
 * nr_queues with EINVAL before creating anything (fuse_uring_register()):
 * so it is asked, with REGISTERs on a connection of our own -- a FUSE
 * instance made with the new mount API and mounted nowhere (root only:
 * fsopen wants CAP_SYS_ADMIN).  Never on the export's connection: a
 * refused REGISTER turns its io_uring mode off (fuse_uring_cmd() clears
 * fc->io_uring, and requests go to /dev/fuse until the ring is ready), and
 * an accepted one parks an entry there that the kernel would hand requests
 * to, on a ring no queue thread reaps.
 *
 * qid 0, which every ring has, goes first: accepted, it proves the
 * REGISTER well formed (the kernel checks the qid before the buffers), so
 * a later EINVAL can only be the qid's.  Then doubling and bisecting: about
 * 2 log2(n) REGISTERs, all on one pair of buffers the kernel never writes:
 * nothing can send a request to an instance that is mounted nowhere, even
 * once its ring is ready.  Closing the instance aborts the connection,
 * which ends the parked entries (fuse_uring_stop_queues()).  The kernel
 * logs the first refusal ("Invalid ring qid").
 */
#define PROBE_MAX_QID	65535	/* fuse_uring_cmd_req.qid is 16 bits */

struct queue_probe {
	int dev_fd;			/* the probe connection's /dev/fuse */
	int fs_fd;			/* its instance: closing it ends the connection */
	struct ring ring;
	struct fuse_uring_req_header hdr;
	void *payload;
	struct iovec iov[2];		/* hdr, payload: what every REGISTER names */
};

/* A FUSE instance on a fresh /dev/fuse fd; the kernel queues INIT on it
 * while creating it (fs/fuse/inode.c, fuse_fill_super()).  Returns 0 or
 * -errno. */
static int probe_connect(struct queue_probe *p)
{
	char fd[16], uid[16], gid[16];
	const char *const opts[] = { "fd", fd, "rootmode", "100000",
				     "user_id", uid, "group_id", gid, NULL };

	p->dev_fd = open("/dev/fuse", O_RDWR | O_NONBLOCK | O_CLOEXEC);
	if (p->dev_fd < 0)
		return -errno;
	snprintf(fd, sizeof(fd), "%d", p->dev_fd);
	snprintf(uid, sizeof(uid), "%u", getuid());
	snprintf(gid, sizeof(gid), "%u", getgid());
	p->fs_fd = fs_context_create("fuse", opts);
	return p->fs_fd < 0 ? p->fs_fd : 0;
}

/* Answer the probe connection's INIT: requests of at most the probe's
 * payload buffer, which is what REGISTER then checks the buffer against.
 * Returns 0 or -errno. */
static int probe_init(struct queue_probe *p)
{
	char buf[FUSE_MIN_READ_BUFFER];
	const struct fuse_in_header *in = (const void *)buf;
	struct {
		struct fuse_out_header hdr;
		struct fuse_init_out init;
	} reply;
	ssize_t n = read(p->dev_fd, buf, sizeof(buf));
	int err;

	if (n < 0)
		return -errno;
	if ((size_t)n < sizeof(*in) + sizeof(struct fuse_init_in) || in->opcode != FUSE_INIT)
		return -EPROTO;
	err = fuse_init((const void *)(in + 1), &reply.init, false,
			(uint32_t)p->iov[1].iov_len, 0, 1);
	if (err)
		return err;
	reply.init.flags2 |= (uint32_t)(FUSE_OVER_IO_URING >> 32);
	reply.hdr = (struct fuse_out_header){ .len = sizeof(reply), .unique = in->unique };
	return write(p->dev_fd, &reply, sizeof(reply)) < 0 ? -errno : 0;
}

/* One REGISTER for 'qid'.  An accepted REGISTER stays parked without a
 * CQE; a refused one completes at once (as in ring_queue_register).
 * Returns 0 if accepted, else the refusal's or io_uring_enter's -errno. */
static int probe_register(struct queue_probe *p, unsigned qid)
{
	struct ring *r = &p->ring;
	struct io_uring_sqe *sqe = ring_sqe(r);	/* each is consumed before the next */
	struct fuse_uring_cmd_req *cmd;
	unsigned head;
	int n, res;

	if (!sqe)
		return -EBUSY;
	cmd = (void *)sqe->cmd;
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = p->dev_fd;
	sqe->cmd_op = FUSE_IO_URING_CMD_REGISTER;
	sqe->addr = (uintptr_t)p->iov;
	sqe->len = 2;
	sqe->user_data = qid;
	cmd->qid = (uint16_t)qid;
	atomic_store_explicit(r->sq_tail, r->sq_local_tail, memory_order_release);
	do {
		n = sys_io_uring_enter(r->fd, 1, 0, IORING_ENTER_GETEVENTS);
	} while (n == -EINTR);
	if (n != 1)
		return n < 0 ? n : -EAGAIN;
	head = atomic_load_explicit(r->cq_head, memory_order_relaxed);
	if (head == atomic_load_explicit(r->cq_tail, memory_order_acquire))
		return 0;
	res = r->cqes[head & r->cq_mask].res;
	atomic_store_explicit(r->cq_head, head + 1, memory_order_release);
	return res < 0 ? res : 0;
}

/* Does the ring have queue 'qid'?  1 yes, 0 no, or -errno.  EAGAIN is the
 * connection not yet initialized (fuse_uring_cmd()): retried, bounded. */
static int probe_has_queue(struct queue_probe *p, unsigned qid)
{
	int err = probe_register(p, qid);

	for (unsigned i = 0; err == -EAGAIN && i < 100; i++) {
		sleep_ms(10);
		err = probe_register(p, qid);
	}
	if (err == -EINVAL && qid > 0)
		return 0;
	return err < 0 ? err : 1;
}

/* The number of queues: the first qid refused.  Returns it or -errno. */
static int probe_count(struct queue_probe *p)
{
	unsigned lo = 1, hi = PROBE_MAX_QID + 1;	/* qids < lo exist, hi does not */
	int has = probe_has_queue(p, 0);

	for (unsigned q = 1; has > 0 && q <= PROBE_MAX_QID; q *= 2) {
		has = probe_has_queue(p, q);
		if (has > 0)
			lo = q + 1;
		else if (has == 0)
			hi = q;
	}
	while (has >= 0 && lo < hi) {
		unsigned mid = lo + (hi - lo) / 2;

		has = probe_has_queue(p, mid);
		if (has > 0)
			lo = mid + 1;
		else if (has == 0)
			hi = mid;
	}
	if (has < 0)
		return has;
	return lo > PROBE_MAX_QID ? -ERANGE : (int)lo;
}

/* Ask the kernel how many io_uring queues a FUSE connection has (see
 * above).  Returns the count, or -errno (-EPERM for a user). */
static int ring_probe_queues(void)
{
	struct queue_probe p = { .dev_fd = -1, .fs_fd = -1 };
	size_t len = round_up(FUSE_MIN_READ_BUFFER, page_size());
	int n;

	p.payload = buffer_alloc(len);
	if (!p.payload)
		return -ENOMEM;
	p.iov[0] = (struct iovec){ &p.hdr, sizeof(p.hdr) };
	p.iov[1] = (struct iovec){ p.payload, len };
	n = probe_connect(&p);
	if (!n)
		n = probe_init(&p);
	if (!n)
		n = ring_init(&p.ring, 4);
	if (!n)
		n = probe_count(&p);
	/* The instance first: its end ends the entries parked on the ring. */
	if (p.fs_fd >= 0)
		close(p.fs_fd);
	if (p.ring.map)
		ring_exit(&p.ring);
	if (p.dev_fd >= 0)
		close(p.dev_fd);
	munmap(p.payload, len);
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
	bool read_only;			/* "ro" in the mount table */
	unsigned long flags;		/* MS_NOEXEC, MS_SYNCHRONOUS from -o */
	bool privileged;		/* mount(2) vs fusermount3 */
	dev_t dev;			/* the live export's st_dev, 0 before */
	uint64_t mnt_id;		/* mount_unique_id() of ours, 0 unknown */
	unsigned minor;			/* our connection's device minor, 0 unknown */
	int watch_fd;			/* crash cleanup: see watcher_start() */
	char why[256];			/* fusermount3's reason for failing */
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
 * Is 'path' a mount point, by /proc/self/mountinfo (mount_point() without
 * statx's answer)?  Returns 1 and the device minor of the topmost mount
 * there, 0 if not mounted, -errno if mountinfo is unreadable (-ENOENT
 * without /proc).  Reading mountinfo sends no request to any FUSE file
 * system.
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

#ifndef STATX_MNT_ID_UNIQUE
#define STATX_MNT_ID_UNIQUE	0x00004000U	/* linux/stat.h, Linux 6.8 */
#endif
#ifndef STATX_ATTR_MOUNT_ROOT
#define STATX_ATTR_MOUNT_ROOT	0x00002000	/* linux/stat.h, Linux 5.8 */
#endif

/*
 * statx of what is on top of 'path', asking for 'mask'.  No /proc needed,
 * and no request sent to a FUSE file system there: AT_STATX_DONT_SYNC
 * makes a FUSE mount answer from cached attributes (fs/fuse/dir.c,
 * fuse_update_get_attr()), so a dead or hung one cannot block the caller.
 * Returns 0 or -errno.
 */
static int mount_statx(const char *path, unsigned mask, struct statx *stx)
{
	memset(stx, 0, sizeof(*stx));
	if (syscall(SYS_statx, AT_FDCWD, path,
		    AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT | AT_STATX_DONT_SYNC, mask, stx) < 0)
		return -errno;
	return 0;
}

/*
 * The unique ID of the mount on top of 'path': never reused while the
 * system runs, unlike the device minor of a FUSE connection or the mount
 * ID of mountinfo, which the next mount may take over.  0 when the kernel
 * cannot tell (before 6.8) or statx fails.
 */
static uint64_t mount_unique_id(const char *path, unsigned *minor_out)
{
	struct statx stx;

	if (mount_statx(path, STATX_MNT_ID_UNIQUE, &stx) < 0 ||
	    !(stx.stx_mask & STATX_MNT_ID_UNIQUE))
		return 0;
	if (minor_out)
		*minor_out = stx.stx_dev_minor;
	return stx.stx_mnt_id;
}

/*
 * Is 'path' a mount point?  Returns 1 and the device minor of the topmost
 * mount there, 0 if not mounted, -errno if neither statx nor mountinfo can
 * tell.  statx says whether the path is the root of a mount
 * (STATX_ATTR_MOUNT_ROOT, fs/stat.c; Linux 5.8), which needs no /proc;
 * /proc/self/mountinfo is the fallback before that.
 */
static int mount_point(const char *path, unsigned *minor_out)
{
	struct statx stx;

	if (mount_statx(path, 0, &stx) == 0 &&
	    (stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT)) {
		if (minor_out)
			*minor_out = stx.stx_dev_minor;
		return (stx.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
	}
	return mount_lookup(path, minor_out);
}

/*
 * Is our export still the mount on top of mo->target?  By the unique ID
 * when the kernel has one.  Before 6.8, by the connection's device minor:
 * once our connection is gone, the next FUSE mount there may have been
 * given the same minor, and would be taken for ours.
 */
static bool mount_is_ours(const struct mount_opts *mo)
{
	unsigned top = 0;

	if (mo->mnt_id)
		return mount_unique_id(mo->target, NULL) == mo->mnt_id;
	return mount_point(mo->target, &top) == 1 && top == mo->minor;
}

/* Just mounted, nothing stacked on it yet: note who we are (mnt_id,
 * minor) for the checks at the stop and after a crash. */
static void mount_note_identity(struct mount_opts *mo)
{
	mo->mnt_id = mount_unique_id(mo->target, &mo->minor);
	if (!mo->mnt_id && mount_point(mo->target, &mo->minor) != 1)
		mo->minor = 0;
}

static void mount_opts_string(char *buf, size_t cap, const struct mount_opts *mo,
			      int fd)
{
	int n = 0;

	if (fd >= 0)
		n = snprintf(buf, cap, "fd=%d,rootmode=100000,user_id=%u,group_id=%u,",
			     fd, getuid(), getgid());
	/* fusermount3 takes the flags by name; mount(2) as flags. */
	snprintf(buf + n, cap - (size_t)n, "default_permissions,max_read=%u%s%s%s%s",
		 MAX_PAYLOAD, mo->allow_other ? ",allow_other" : "",
		 fd < 0 && mo->read_only ? ",ro" : "",
		 fd < 0 && (mo->flags & MS_NOEXEC) ? ",noexec" : "",
		 fd < 0 && (mo->flags & MS_SYNCHRONOUS) ? ",sync" : "");
}

static int mount_kernel(const struct mount_opts *mo)
{
	char opts[256];
	int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	mount_opts_string(opts, sizeof(opts), mo, fd);
	if (mount(mo->source, mo->target, "fuse.uexportd",
		  MS_NOSUID | MS_NODEV | mo->flags | (mo->read_only ? MS_RDONLY : 0), opts) < 0) {
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

/* Start fusermount3 with 'argv', passing 'commfd' (-1: none), its stderr
 * on 'errfd' (-1: /dev/null).  It gets none of our other descriptors, nor
 * our stdin and stdout: with auto_unmount it outlives start-up, and must
 * not hold a caller's pipe open.  Returns its pid or -errno. */
static pid_t fusermount_spawn(char *const argv[], int commfd, int errfd)
{
	pid_t pid = fork();

	if (pid < 0)
		return -errno;
	if (pid == 0) {
		int null = open_null();
		char env[32];

		if (commfd >= 0) {
			snprintf(env, sizeof(env), "%d", commfd);
			setenv("_FUSE_COMMFD", env, 1);
		}
		if (null >= 0) {
			dup2(null, STDIN_FILENO);
			dup2(null, STDOUT_FILENO);
		}
		dup2(errfd >= 0 ? errfd : null, STDERR_FILENO);
		execvp("fusermount3", argv);
		_exit(127);
	}
	return pid;
}

/* Reap fusermount3: 0 if it succeeded, -ENOENT if it could not be run,
 * -EPERM for any failure it reported (on its stderr). */
static int fusermount_wait(pid_t pid)
{
	int status;

	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -errno;
	if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
		return -ENOENT;
	return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EPERM;
}

/* Run fusermount3 to the end, its stderr on ours unless 'quiet'. */
static int fusermount_run(char *const argv[], bool quiet)
{
	pid_t pid = fusermount_spawn(argv, -1, quiet ? -1 : STDERR_FILENO);

	return pid < 0 ? (int)pid : fusermount_wait(pid);
}

/* The first line fusermount3 wrote on the pipe 'fd' (its reason for
 * failing), without its "fusermount3: " prefix, into 'buf'. */
static void fusermount_reason(int fd, char *buf, size_t cap)
{
	ssize_t n = read(fd, buf, cap - 1);
	const char *p = "fusermount3: ";

	buf[n > 0 ? n : 0] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
	if (strncmp(buf, p, strlen(p)) == 0)
		memmove(buf, buf + strlen(p), strlen(buf + strlen(p)) + 1);
}

/* 'src' as one value of fusermount3's -o: a comma would end the option and
 * a backslash escapes the next character, so both get a backslash
 * (fusermount3 unescapes them, util/fusermount.c).  Returns 0, or
 * -ENAMETOOLONG when it does not fit in 'cap' bytes. */
static int mount_opt_escape(const char *src, char *out, size_t cap)
{
	size_t n = 0;

	for (; *src; src++) {
		if (n + 3 > cap)
			return -ENAMETOOLONG;
		if (*src == ',' || *src == '\\')
			out[n++] = '\\';
		out[n++] = *src;
	}
	out[n] = '\0';
	return 0;
}

/*
 * Mount through fusermount3 with auto_unmount: it sends the /dev/fuse fd
 * and then stays, waiting for its socket to close, and unmounts lazily if
 * the mount is still there then -- our crash cleanup for users who cannot
 * abort a connection (see watcher_start).  The socket becomes
 * mo->watch_fd.  Returns the /dev/fuse fd or -errno.
 */
static int mount_fusermount(struct mount_opts *mo)
{
	char opts[2 * PATH_MAX + 512], fsname[2 * PATH_MAX + 1];
	int sv[2], ep[2] = { -1, -1 }, fd, n;
	pid_t pid;

	/* The source in the mount table is the image, whatever its name. */
	if (mount_opt_escape(mo->source, fsname, sizeof(fsname)) < 0)
		return -ENAMETOOLONG;
	mount_opts_string(opts, sizeof(opts), mo, -1);
	n = (int)strlen(opts);
	n += snprintf(opts + n, sizeof(opts) - (size_t)n,
		      ",auto_unmount,fsname=%s,subtype=uexportd", fsname);
	if (n >= (int)sizeof(opts))
		return -ENAMETOOLONG;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return -errno;
	/* Its stderr is read back, not passed through: it says why it failed. */
	mo->why[0] = '\0';
	if (pipe2(ep, O_CLOEXEC) < 0)
		ep[0] = ep[1] = -1;
	/* The child end must survive exec: clear its CLOEXEC flag. */
	fcntl(sv[0], F_SETFD, 0);
	{
		char *argv[] = { "fusermount3", "-o", opts, "--", (char *)mo->target, NULL };

		pid = fusermount_spawn(argv, sv[0], ep[1]);
	}
	close(sv[0]);
	if (ep[1] >= 0)
		close(ep[1]);
	fd = pid < 0 ? (int)pid : fusermount_recv_fd(sv[1]);
	if (fd < 0) {
		/* It failed and exited; its status and stderr say how. */
		if (pid > 0) {
			int err = fusermount_wait(pid);

			fd = err ? err : fd;
		}
		if (ep[0] >= 0)
			fusermount_reason(ep[0], mo->why, sizeof(mo->why));
		close(sv[1]);
	} else {
		mo->watch_fd = sv[1];
	}
	if (ep[0] >= 0)
		close(ep[0]);
	return fd;
}

/* Mount; returns the /dev/fuse fd.  allow_other "auto" retries without it. */
static int mount_export(struct mount_opts *mo, bool allow_other_auto)
{
	int fd;

	if (mo->privileged) {
		fd = mount_kernel(mo);
	} else {
		fd = mount_fusermount(mo);
		if (fd < 0 && allow_other_auto && mo->allow_other) {
			log_info("--allow-other=auto: fusermount3 refused allow_other (%s): "
				 "mounting without it, for this user only",
				 mo->why[0] ? mo->why : strerror(-fd));
			mo->allow_other = false;
			fd = mount_fusermount(mo);
		}
	}
	if (fd >= 0)
		mount_note_identity(mo);
	return fd;
}

static int unmount_export(const struct mount_opts *mo, bool lazy)
{
	char *eager[] = { "fusermount3", "-u", "-q", "--", (char *)mo->target, NULL };
	char *detach[] = { "fusermount3", "-u", "-q", "-z", "--", (char *)mo->target, NULL };

	if (mo->privileged)
		return umount2(mo->target, lazy ? MNT_DETACH : 0) < 0 ? -errno : 0;
	return fusermount_run(lazy ? detach : eager, !lazy);
}

/*
 * Abort the connection through a fusectl mount of our own that is mounted
 * nowhere (fs_context_create, fs_mount_detached): fusectl has a single
 * instance listing every connection (fs/fuse/control.c), so this needs
 * neither /sys nor any directory.  Returns 0 or -errno.
 */
static int fuse_abort_detached(unsigned minor)
{
	char name[32];
	int fs = fs_context_create("fusectl", NULL), mnt, err;

	if (fs < 0)
		return fs;
	mnt = fs_mount_detached(fs);
	close(fs);
	if (mnt < 0)
		return mnt;
	snprintf(name, sizeof(name), "%u/abort", minor);
	err = write_file_at(mnt, name, "1");
	close(mnt);
	return err;
}

/*
 * Abort the connection whose device minor is 'minor' (the export's st_dev
 * names it: fusectl's directory <minor>, fs/fuse/control.c): every request
 * fails at once, the daemon's threads see the connection end.  The last
 * resort when clients still hold the file after a lazy unmount, and the
 * crash watcher's first step; root only.  Through
 * /sys/fs/fuse/connections/<minor>/abort when fusectl is mounted there,
 * else through a detached fusectl mount (a bare root has no /sys), else,
 * before Linux 5.2, by mounting fusectl on /sys/fs/fuse/connections.
 * Returns 0, -ENOENT if the connection is gone already, or -errno.
 */
static int fuse_abort_connection(unsigned minor)
{
	char path[64];
	int err;

	snprintf(path, sizeof(path), "/sys/fs/fuse/connections/%u/abort", minor);
	err = write_file(path, "1");
	if (err == -ENOENT)
		err = fuse_abort_detached(minor);
	if (err == -ENOSYS) {
		if (mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0, NULL) < 0)
			return -errno;
		err = write_file(path, "1");
	}
	return err;
}

/*
 * Crash cleanup, with no library: a watcher process, forked right after
 * the mount while the daemon is still one thread, holds the read end of a
 * pipe whose write end only the daemon holds.  When the daemon ends -- a
 * crash, SIGKILL, the OOM killer -- the pipe reads EOF; unless the daemon
 * wrote WATCH_STOPPED first (its own stop is complete), the watcher
 * cleans up.  As root it aborts the connection, so clients fail at once
 * instead of waiting on a dead daemon, and detaches the mount if it is
 * still ours on top, so the mount point is free for the next start.  A
 * user's watcher waits for the connection to be dead -- with io_uring
 * some time after the daemon is gone: the rings hold the device -- and
 * detaches it with fusermount3; it also holds fusermount3's auto_unmount
 * socket (mount_fusermount), which covers allow_other mounts if the
 * watcher is killed too.
 */
#define WATCH_STOPPED	'S'
#define WATCH_DEAD_MS	10000	/* a user's connection to die after a crash */

/* Wait, bounded, until the connection behind mo->target is dead: true if
 * it is, and the dead mount there is ours. */
static bool watcher_wait_dead(const struct mount_opts *mo)
{
	uint64_t deadline = now_ns() + WATCH_DEAD_MS * 1000000ull;
	struct stat st;

	while (now_ns() < deadline) {
		if (stat(mo->target, &st) < 0 && (errno == ENOTCONN || errno == ECONNABORTED))
			return !mo->mnt_id || mount_is_ours(mo);
		sleep_ms(20);
	}
	return false;
}

/* As root, after daemon 'daemon' died: abort its connection and detach
 * its mount, if the mount on top is still its own.  Logs what it did. */
static void watcher_clean_up(const struct mount_opts *mo, pid_t daemon)
{
	int err;

	/* Only while our mount is there does the minor name our connection:
	 * once it is gone, a successor's may have the same one.  Gone or
	 * covered, the kernel aborts ours when its last fd closes anyway. */
	if (!mount_is_ours(mo)) {
		log_notice("daemon %d died; %s is no longer its mount: left alone",
			   (int)daemon, mo->target);
		return;
	}
	log_notice("daemon %d died: aborting connection %u, detaching %s", (int)daemon,
		   mo->minor, mo->target);
	if ((err = fuse_abort_connection(mo->minor)) < 0 && err != -ENOENT)
		log_err("abort connection %u: %s", mo->minor, strerror(-err));
	if (umount2(mo->target, MNT_DETACH | UMOUNT_NOFOLLOW) < 0)
		log_err("detach %s: %s", mo->target, strerror(errno));
}

/* 'mo' is daemon 'daemon''s, as it was at the fork. */
static void watcher_main(int rfd, const struct mount_opts *mo, int sock, pid_t daemon)
{
	bool stopped = false;
	char c;
	ssize_t n;

	while ((n = read(rfd, &c, 1)) != 0) {
		if (n < 0 && errno != EINTR)
			break;
		if (n == 1 && c == WATCH_STOPPED)
			stopped = true;
	}
	/* A user's dead mount: fusermount3's auto_unmount (Debian's 3.14)
	 * cannot see that it is dead unless it was mounted allow_other (it
	 * gets EACCES), so detach it with fusermount3 -u -z ourselves. */
	if (!stopped && sock >= 0 && watcher_wait_dead(mo)) {
		char *argv[] = { "fusermount3", "-u", "-z", "-q", "--", (char *)mo->target, NULL };

		log_notice("daemon %d died: detaching %s with fusermount3", (int)daemon,
			   mo->target);
		close(sock);
		execvp("fusermount3", argv);
		log_err("fusermount3: %s", strerror(errno));
	}
	if (!stopped && mo->privileged && mo->minor)
		watcher_clean_up(mo, daemon);
	_exit(0);
}

/* Start the watcher for the mount just made on mo->target (topmost
 * there); mo->watch_fd (fusermount3's socket for a user, handed to the
 * watcher) becomes the pipe's write end.  Call it while the process has
 * one thread.  Returns 0 or -errno. */
static int watcher_start(struct mount_opts *mo)
{
	int sock = mo->watch_fd, p[2], null;
	pid_t daemon = getpid(), pid;
	bool keep_stderr;

	if (mo->privileged && !mo->minor)
		return -ENOENT;
	if (pipe2(p, O_CLOEXEC) < 0)
		return -errno;
	pid = fork();
	if (pid < 0) {
		int err = -errno;

		close(p[0]);
		close(p[1]);
		return err;
	}
	if (pid == 0) {
		/* Hold nothing of the daemon's -- its /dev/fuse fd would keep
		 * the connection alive -- nor the caller's pipes.  Its log
		 * (log_detach) is opened once the rest is closed. */
		if (sock >= 0 && sock != p[0] + 1)
			sock = dup2(sock, p[0] + 1);
		close_fd_range(STDERR_FILENO + 1, (unsigned)p[0] - 1);
		close_fd_range((unsigned)p[0] + (sock >= 0 ? 2 : 1), ~0U);
		keep_stderr = log_detach("uexportd-watch", false);
		null = open_null();
		for (int fd = STDIN_FILENO; null >= 0 && fd <= STDERR_FILENO; fd++)
			if (fd != STDERR_FILENO || !keep_stderr)
				dup2(null, fd);
		if (null > STDERR_FILENO)
			close(null);
		setsid();
		if (chdir("/") < 0) {
			/* Hold no directory busy; failing, keep the one held. */
		}
		prctl(PR_SET_NAME, "uexportd-watch");
		if (sock < 0)	/* a user's watcher runs the setuid fusermount3 */
			prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
		watcher_main(p[0], mo, sock, daemon);
	}
	close(p[0]);
	if (sock >= 0)
		close(sock);		/* the watcher's alone now */
	mo->watch_fd = p[1];
	return 0;
}

/* The stop is complete: the watcher (or fusermount3's auto_unmount) has
 * nothing left to clean up.  Closing fusermount3's socket makes it look at
 * the mount point at once, while it is still free of a successor. */
static void watcher_stopped(struct mount_opts *mo)
{
	if (mo->watch_fd < 0)
		return;
	if (write(mo->watch_fd, (char[]){ WATCH_STOPPED }, 1) < 0)
		log_info("crash watcher: %s", strerror(errno));
	close(mo->watch_fd);
	mo->watch_fd = -1;
}

/* ======================================================================
 * Start-up: the image, the mount point, the FUSE handshake
 *
 * start_export() runs the phases in order, each a function that returns
 * -errno and leaves the words for its failure in struct startup; the one
 * log line is written by start_export:
 *
 *   mount          mount_export(): the /dev/fuse fd of a new connection
 *   read INIT      startup_read_init()
 *   plan           startup_plan_rings(), else startup_plan_devfuse(): the
 *                  transport, the memory plan, the INIT reply; the rings
 *                  are created here, since FUSE_OVER_IO_URING may be
 *                  offered only once every ring and buffer exists (the
 *                  kernel blocks all requests until the rings are ready)
 *   reply INIT     startup_reply_init()
 *   passthrough    startup_passthrough(): register the backing file
 *   register       startup_register_rings(): REGISTERs may go out only
 *                  after the INIT reply is written
 *   serve          devfuse_start(): /dev/fuse threads run in io_uring mode
 *                  too (FORGET and INTERRUPT always arrive there, and so
 *                  does everything after a downgrade)
 *   confirm        startup_confirm_rings(): a request came through a ring
 *   stat           the live export's st_dev
 * ====================================================================== */

struct options {
	const char *image;
	char image_abs[PATH_MAX];		/* the mount's source: realpath */
	const char *mountpoint;
	char mountpoint_abs[PATH_MAX];
	struct stat mountpoint_st;		/* the file underneath, before mounting */
	int mountpoint_lock;			/* start-up lock, see mountpoint_lock() */
	bool writable, growable, direct, foreground, passthrough;
	bool clean_stale;			/* detach a dead mount on MOUNTPOINT */
	enum { TRI_AUTO, TRI_ON, TRI_OFF } allow_other, io_uring;
	unsigned queue_depth;
	uint64_t max_memory;
	const char *pidfile;
	int notify_fd;				/* --notify-fd, -1: none */
	bool mount_ro;				/* -o ro */
	char *o_lists[16];			/* copies of the -o lists, split */
	unsigned nr_o_lists;
	unsigned long mount_flags;		/* -o noexec, sync: MS_* */
	/* A window: --offset/--size (set: given), or --partition. */
	uint64_t offset, size;
	bool offset_set, size_set;
	const char *partition;			/* N, name:LABEL, uuid:UUID */
	bool list_partitions;			/* --list-partitions IMAGE */
	char window_desc[96];			/* " [partition 2: START+SIZE]" */
};

static bool options_window(const struct options *o)
{
	return o->offset_set || o->size_set || o->partition;
}

/* pt_read_fn over the image's buffered descriptor (absolute offsets). */
static int image_pt_read(void *ctx, void *buf, size_t len, uint64_t off)
{
	struct image *img = ctx;
	ssize_t n = rw_full(false, img->fds[IMAGE_FD_BUFFERED], buf, len, off, 0);

	return n < 0 ? (int)n : (size_t)n < len ? -EIO : 0;
}

/* The partition table of an open image (not null:, not yet windowed).
 * Returns 0 or -EINVAL with t->error. */
static int image_partitions(struct image *img, struct pt_table *t)
{
	struct pt_source src = { image_pt_read, img, img->size };

	if (!img->nr_fds) {
		pt_fail(t, "null: has no partition table");
		return -EINVAL;
	}
	/* A block device's LBAs are its logical blocks; a file's are 512
	 * bytes for an MBR, and a GPT says by where its header is. */
	return pt_parse(t, &src, img->ops->fixed_size ? img->zero_unit : 0);
}

/*
 * Narrow the open image to the window the options name: --partition, or
 * --offset/--size (size defaults to the rest of the image).  The window
 * must lie inside the image and not be empty.  Logs its failure; returns
 * 0 or -EINVAL.
 */
static int open_window(struct image *img, struct options *o)
{
	uint64_t whole = img->size, off = o->offset, len;
	struct pt_table *t;
	const struct pt_part *p;

	if (o->partition) {
		if (!(t = malloc(sizeof(*t)))) {
			log_err("%s: %s", o->image, strerror(ENOMEM));
			return -ENOMEM;
		}
		p = image_partitions(img, t) < 0 ? NULL : pt_find(t, o->partition);
		if (!p) {
			log_err("%s: --partition=%s: %s", o->image, o->partition, t->error);
			free(t);
			return -EINVAL;
		}
		off = p->start;
		len = p->size;
		snprintf(o->window_desc, sizeof(o->window_desc), " [partition %u: %llu+%llu]",
			 p->number, (unsigned long long)off, (unsigned long long)len);
		free(t);
	} else {
		if (off > whole) {
			log_err("%s: --offset=%llu is past the image's end (%llu bytes)", o->image,
				(unsigned long long)off, (unsigned long long)whole);
			return -EINVAL;
		}
		len = o->size_set ? o->size : whole - off;
		if (len > whole - off) {
			log_err("%s: the window %llu+%llu ends past the image's end (%llu bytes)",
				o->image, (unsigned long long)off, (unsigned long long)len,
				(unsigned long long)whole);
			return -EINVAL;
		}
		snprintf(o->window_desc, sizeof(o->window_desc), " [%llu+%llu]",
			 (unsigned long long)off, (unsigned long long)len);
	}
	if (len == 0) {
		log_err("%s: the window%s is empty: nothing to export", o->image, o->window_desc);
		return -EINVAL;
	}
	img->window = true;
	img->base = off;
	img->size = len;
	return 0;
}

/* Open the image into exp->img with the options' settings; the boundary
 * for its errors (logged here, once).  Returns 0 or -errno. */
static int open_image(struct export *exp, struct options *o)
{
	struct image *img = &exp->img;
	int err;

	img->writable = o->writable;
	img->growable = o->growable;
	img->direct = o->direct;
	img->passthrough = o->passthrough;
	img->mode = o->writable ? 0600 : 0400;
	img->uid = getuid();
	img->gid = getgid();
	img->allow_chown = o->allow_other != TRI_OFF;
	err = image_open(img, o->image);
	if (err == -EINVAL && strncmp(o->image, "null:", 5) == 0)
		log_err("invalid image '%s' (expected null:SIZE, e.g. null:1G)", o->image);
	else if (err == -EINVAL)
		log_err("%s: not a regular file or block device", o->image);
	else if (err)
		log_err("open %s: %s", o->image, strerror(-err));
	else if (o->passthrough && !img->ops->backing_file)
		err = -EINVAL, log_err("--passthrough needs a regular-file image");
	/* The export's size is always what the image can hold. */
	else if (o->growable && img->ops->fixed_size)
		err = -EINVAL, log_err("--growable: %s is a %s, whose size is fixed",
				       o->image, img->ops->kind);
	else if (options_window(o))
		err = open_window(img, o);
	else if (img->size == 0 && !o->growable)
		err = -EINVAL, log_err("%s: empty, and not --growable: nothing to export",
				       o->image);
	if (!err && (strncmp(o->image, "null:", 5) == 0 || !realpath(o->image, o->image_abs)))
		snprintf(o->image_abs, sizeof(o->image_abs), "%s", o->image);
	return err;
}

/* Detach the dead FUSE mount an earlier daemon left on the mount point
 * (--clean-stale).  Returns 0 or -errno. */
static int unmount_stale(const struct options *o)
{
	struct mount_opts mo = { .target = o->mountpoint_abs, .privileged = geteuid() == 0 };
	int err = unmount_export(&mo, true);

	if (!err)
		log_info("mount point %s: detached a dead FUSE mount", o->mountpoint);
	return err;
}

/*
 * The mount point must be an existing regular file, named directly: a
 * symbolic link is refused (whoever can write its directory could point
 * root's export over any file), as fusermount3 does.  A dead FUSE mount
 * left there by a daemon that died is detected: detached with
 * --clean-stale, else refused with what to run.  Every look at it is
 * bounded (MOUNTPOINT_STAT_MS): it may sit on a FUSE mount whose daemon
 * hangs.  Logs its failure.  Returns 0 or -errno.
 */
#define MOUNTPOINT_STAT_MS	5000

static int check_mountpoint(struct options *o)
{
	struct stat *st = &o->mountpoint_st;
	int err = path_abs_dir(o->mountpoint, o->mountpoint_abs, sizeof(o->mountpoint_abs));
	bool dead;

	if (!err)
		err = stat_within(o->mountpoint_abs, false, MOUNTPOINT_STAT_MS, st);
	dead = err == -ENOTCONN || err == -ECONNABORTED;
	if (dead && o->clean_stale && (err = unmount_stale(o)) == 0)
		err = stat_within(o->mountpoint_abs, false, MOUNTPOINT_STAT_MS, st);
	if (!err && S_ISLNK(st->st_mode))
		err = -ELOOP;
	else if (!err && !S_ISREG(st->st_mode))
		err = S_ISDIR(st->st_mode) ? -EISDIR : -EINVAL;
	/* mount.fuse3's drop_privileges mounts first and passes /dev/fd/N
	 * (libfuse's convention): not ours -- we mount ourselves. */
	if (err == -ELOOP && strncmp(o->mountpoint, "/dev/fd/", 8) == 0)
		log_err("mount point %s: a mount made by someone else (mount.fuse3's "
			"drop_privileges) is not supported: mount without it", o->mountpoint);
	else if (err == -ELOOP)
		log_err("mount point %s: is a symbolic link", o->mountpoint);
	else if (err == -EISDIR)
		log_err("mount point %s: is a directory (it must be a regular file)", o->mountpoint);
	else if (err == -EINVAL)
		log_err("mount point %s: not a regular file", o->mountpoint);
	else if (dead && err && !o->clean_stale)
		log_err("mount point %s: a dead FUSE mount is still there (its daemon died): "
			"run '%s %s', or start with --clean-stale", o->mountpoint,
			geteuid() == 0 ? "umount -l" : "fusermount3 -u -z", o->mountpoint_abs);
	else if (err == -ETIMEDOUT)
		log_err("mount point %s: no answer in %d s (on a FUSE mount whose daemon hangs?)",
			o->mountpoint, MOUNTPOINT_STAT_MS / 1000);
	else if (err)
		log_err("mount point %s: %s", o->mountpoint, strerror(-err));
	return err;
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

/* Take the mount point: locked against other start-ups, not mounted yet.
 * Logs its failure.  Returns 0 or -EBUSY. */
static int claim_mountpoint(struct options *o)
{
	if (mountpoint_lock(o) < 0) {
		log_err("mount point %s: another uexportd is still starting on it", o->mountpoint);
		return -EBUSY;
	}
	if (mount_point(o->mountpoint_abs, NULL) == 1) {
		log_err("mount point %s: already a mount point", o->mountpoint);
		return -EBUSY;
	}
	return 0;
}

/*
 * Fit the request buffers in the memory budget (bytes).  io_uring needs
 * 'depth' payload buffers of max_write bytes for each of 'units' queues
 * (one per possible CPU: 256 CPUs x 64 x 1 MiB would be 16 GiB); /dev/fuse
 * threads need two each.  Shrink depth to 16 first, then the payload down
 * to MIN_PAYLOAD, then depth again.  Buffers are faulted in only when used,
 * so this bounds the worst case, not the usual RSS.
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

/*
 * The kernel's bound on pages per request (fs.fuse.max_pages_limit); 256,
 * its default (fuse_max_pages_limit, fs/fuse/inode.c) and the fixed bound
 * of kernels without the setting, when it cannot be read (no /proc).  A
 * guess too high costs nothing but buffer room: the kernel clamps
 * max_pages to its limit at INIT (fs/fuse/inode.c, process_init_reply()).
 */
static unsigned max_pages_limit(void)
{
	char buf[32];
	int n = read_small_file("/proc/sys/fs/fuse/max_pages_limit", buf, sizeof(buf));

	if (n > 0)
		return (unsigned)atoi(buf);
	if (n == -ENOENT && access("/proc/sys", F_OK) < 0)
		log_info("no /proc: taking fs.fuse.max_pages_limit for its default, 256");
	return 256;
}

/* Why the kernel did not offer FUSE_OVER_IO_URING. */
static const char *uring_unavailable_reason(void)
{
	char v[8];
	int n = read_small_file("/sys/module/fuse/parameters/enable_uring", v, sizeof(v));

	if (n == -ENOENT && access("/sys/module", F_OK) < 0)
		return "kernel did not offer FUSE_OVER_IO_URING (no /sys to tell why: "
		       "needs Linux 6.14+ and fuse.enable_uring=Y)";
	if (n <= 0)
		return "kernel has no FUSE-over-io_uring (needs Linux 6.14+)";
	if (v[0] != 'Y')
		return "enable_uring is off";
	return "kernel did not offer FUSE_OVER_IO_URING";
}

/* What the handshake phases share. */
struct startup {
	const struct options *o;
	unsigned nr_cpus;			/* /dev/fuse threads */
	char *buf;				/* the INIT request */
	ssize_t len;				/* its size, -1 before */
	const struct fuse_in_header *in;
	const struct fuse_init_in *init;
	struct {
		struct fuse_out_header hdr;
		struct fuse_init_out init;
	} reply;
	const char *reason;			/* why /dev/fuse serves; NULL: rings */
	char why[128];				/* room for a composed reason */
	char error[256];			/* what failed, for the one log line */
};

static int __attribute__((format(printf, 3, 4)))
startup_fail(struct startup *st, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(st->error, sizeof(st->error), fmt, ap);
	va_end(ap);
	return err;
}

/* Read FUSE_INIT off the fresh connection.  Returns 0, -EPROTO for
 * anything else, -ENOMEM or the read's -errno. */
static int startup_read_init(struct export *exp, struct startup *st)
{
	int err;

	st->buf = malloc(FUSE_MIN_READ_BUFFER);
	if (!st->buf)
		return startup_fail(st, -ENOMEM, "FUSE handshake: %s", strerror(ENOMEM));
	do {
		st->len = read(exp->dev_fd, st->buf, FUSE_MIN_READ_BUFFER);
	} while (st->len < 0 && errno == EINTR);
	err = st->len < 0 ? -errno : 0;
	st->in = (const void *)st->buf;
	st->init = (const void *)(st->in + 1);
	if (!err && ((size_t)st->len < sizeof(*st->in) + sizeof(*st->init) ||
		     st->in->opcode != FUSE_INIT))
		err = -EPROTO;
	if (err)
		return startup_fail(st, err, "FUSE handshake: read INIT: %s", strerror(-err));
	return 0;
}

/* Compute the INIT reply for payloads of up to 'payload' bytes; sets
 * exp->max_write.  Returns 0 or fuse_init()'s -errno. */
static int startup_init_reply(struct export *exp, struct startup *st, uint32_t payload)
{
	int err = fuse_init(st->init, &st->reply.init, exp->img.passthrough, payload,
			    max_pages_limit(), st->nr_cpus);

	if (err == -EOPNOTSUPP && exp->img.passthrough)
		return startup_fail(st, err, "--passthrough: the kernel does not offer FUSE "
				    "passthrough (needs Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)");
	if (err)
		return startup_fail(st, err, "FUSE handshake: %s", strerror(-err));
	exp->max_write = st->reply.init.max_write;
	return 0;
}

/*
 * Try io_uring: if wanted and offered, plan its memory, compute the INIT
 * reply and create the rings (exp->rings), offering FUSE_OVER_IO_URING.
 * Anything missing leaves exp->rings NULL and st->reason saying why.
 * Returns 0, or the INIT reply's -errno.
 */
static int startup_plan_rings(struct export *exp, struct startup *st)
{
	const struct options *o = st->o;
	bool offered = (st->init->flags & FUSE_INIT_EXT) &&
		       ((uint64_t)st->init->flags2 << 32 & FUSE_OVER_IO_URING);
	unsigned depth = o->queue_depth;
	uint32_t payload;
	int nq, err;

	st->reason = "--io-uring=off";
	if (o->io_uring == TRI_OFF)
		return 0;
	st->reason = uring_unavailable_reason();
	if (!offered)
		return 0;
	nq = possible_cpus();
	if (nq < 0 && (nq = ring_probe_queues()) > 0)
		log_info("io_uring: no /sys/devices/system/cpu/possible: the kernel "
			 "takes %d queues", nq);
	if (nq < 0) {
		snprintf(st->why, sizeof(st->why), "no /sys/devices/system/cpu/possible, "
			 "and asking the kernel failed: %s", strerror(-nq));
		st->reason = st->why;
		return 0;
	}
	memory_plan(o->max_memory, (unsigned)nq, &depth, &payload);
	memory_plan_log(o->max_memory, (unsigned)nq, depth, payload);
	if ((err = startup_init_reply(exp, st, payload)) < 0)
		return err;
	exp->rings = ring_pool_create(exp, (unsigned)nq, depth,
				      round_up(exp->max_write > FUSE_MIN_READ_BUFFER ?
					       exp->max_write : FUSE_MIN_READ_BUFFER,
					       page_size()), &err);
	if (!exp->rings) {
		snprintf(st->why, sizeof(st->why), "io_uring setup failed: %s", strerror(-err));
		st->reason = st->why;
		return 0;
	}
	st->reply.init.flags2 |= (uint32_t)(FUSE_OVER_IO_URING >> 32);
	return 0;
}

/* /dev/fuse only: two buffers per thread. */
static int startup_plan_devfuse(struct export *exp, struct startup *st)
{
	unsigned two = 2;
	uint32_t payload;

	memory_plan(st->o->max_memory, st->nr_cpus, &two, &payload);
	memory_plan_log(st->o->max_memory, st->nr_cpus, two, payload);
	return startup_init_reply(exp, st, payload);
}

/* Answer INIT: the reply, or 'err' if planning failed.  Returns 'err', or
 * the write's -errno. */
static int startup_reply_init(struct export *exp, struct startup *st, int err)
{
	st->reply.hdr.len = err ? sizeof(st->reply.hdr) : sizeof(st->reply);
	st->reply.hdr.error = err;
	st->reply.hdr.unique = st->in->unique;
	if (write(exp->dev_fd, &st->reply, st->reply.hdr.len) < 0 && !err)
		err = startup_fail(st, -errno, "FUSE handshake: write INIT reply: %s",
				   strerror(errno));
	return err;
}

/* Register the image as the backing file every OPEN will name (root only:
 * the kernel wants CAP_SYS_ADMIN).  Returns 0 or -errno. */
static int startup_passthrough(struct export *exp, struct startup *st)
{
	struct fuse_backing_map map = { .fd = exp->img.fds[IMAGE_FD_MAIN] };
	int id = ioctl(exp->dev_fd, FUSE_DEV_IOC_BACKING_OPEN, &map);
	int err = id < 0 ? -errno : 0;

	if (err)
		return startup_fail(st, err, "--passthrough: register %s as backing file: %s%s",
				    exp->img.path, strerror(-err),
				    err == -EPERM ? " (needs root)" : "");
	exp->img.backing_id = id;
	return 0;
}

/* Let the rings REGISTER; a refusal leaves /dev/fuse serving, with why. */
static void startup_register_rings(struct export *exp, struct startup *st)
{
	int err = ring_pool_register(exp->rings);

	st->reason = NULL;
	if (err) {
		snprintf(st->why, sizeof(st->why), "io_uring REGISTER failed: %s", strerror(-err));
		st->reason = st->why;
	}
}

/*
 * The FUSE handshake on exp->dev_fd: read INIT, plan, answer, then
 * passthrough and the rings' REGISTER.  On return st->reason is NULL if
 * the rings are registered, else why the export runs on /dev/fuse.
 * Returns 0 or -errno (st->error says what failed); rings created and not
 * registered are abandoned.
 */
static int startup_handshake(struct export *exp, struct startup *st)
{
	int err = startup_read_init(exp, st);

	if (!err)
		err = startup_plan_rings(exp, st);
	if (!err && !exp->rings)
		err = startup_plan_devfuse(exp, st);
	if (st->len > 0)
		err = startup_reply_init(exp, st, err);
	if (!err && exp->img.passthrough)
		err = startup_passthrough(exp, st);
	if (!err && exp->rings) {
		startup_register_rings(exp, st);
	} else if (exp->rings) {
		ring_pool_abandon(exp->rings);
		exp->rings = NULL;
	}
	return err;
}

/*
 * Ask for our own attributes: the GETATTR must come through a ring, else
 * the kernel is not using them (a silent downgrade we must not hide).  A
 * ring that never becomes ready would block every request in the kernel:
 * the stat is bounded.  Returns 1 if a ring served it, 0 if not, -errno.
 */
static int startup_confirm_rings(struct export *exp, struct startup *st)
{
	struct stat sb;
	int err = stat_within(st->o->mountpoint_abs, true, RING_READY_TIMEOUT_MS, &sb);

	if (err == -ETIMEDOUT)
		return startup_fail(st, err, "io_uring: the kernel did not make the "
				    "rings ready in %d s", RING_READY_TIMEOUT_MS / 1000);
	return ring_pool_served(exp->rings) > 0;
}

/* Where the mount failed, with what the user can do about it. */
static int startup_mount_error(struct startup *st, const struct mount_opts *mo, int err)
{
	if (err == -ENOENT && mo->privileged)
		return startup_fail(st, err, "open /dev/fuse: %s (is the fuse module loaded?)",
				    strerror(-err));
	if (err == -ENOENT)
		return startup_fail(st, err, "fusermount3 not found: install fuse3 or run as root");
	return startup_fail(st, err, "mount on %s: %s", st->o->mountpoint,
			    mo->why[0] ? mo->why : strerror(-err));
}

/* Mount, negotiate, start the transports: the phases above, in order. */
static int startup_run(struct export *exp, struct startup *st, struct mount_opts *mo)
{
	const struct options *o = st->o;
	struct stat sb;
	int err, ok;

	if (o->io_uring == TRI_ON && strcmp(uring_unavailable_reason(), "enable_uring is off") == 0)
		return startup_fail(st, -EOPNOTSUPP, "--io-uring=on: FUSE-over-io_uring is off "
				    "(echo Y > /sys/module/fuse/parameters/enable_uring)");
	exp->dev_fd = mount_export(mo, o->allow_other == TRI_AUTO);
	if (exp->dev_fd < 0)
		return startup_mount_error(st, mo, exp->dev_fd);
	if ((err = watcher_start(mo)) < 0)
		log_info("no crash cleanup for %s: %s", o->mountpoint, strerror(-err));
	if ((err = startup_handshake(exp, st)) < 0)
		return err;
	if ((err = devfuse_start(exp)) < 0)
		return startup_fail(st, err, "start on %s: %s", o->mountpoint, strerror(-err));
	if (!st->reason) {
		if ((ok = startup_confirm_rings(exp, st)) < 0)
			return ok;
		if (ok == 0)
			st->reason = "kernel did not deliver requests through the rings";
	}
	if (st->reason && o->io_uring == TRI_ON)
		return startup_fail(st, -EOPNOTSUPP, "--io-uring=on: FUSE-over-io_uring "
				    "unavailable: %s", st->reason);
	/* Served now: the stat cannot hang. */
	if (stat(mo->target, &sb) < 0)
		return startup_fail(st, -errno, "stat %s: %s", o->mountpoint, strerror(errno));
	mo->dev = sb.st_dev;
	return 0;
}

/*
 * Mount, negotiate, start the transports; returns once serving, with
 * st->reason NULL if the rings serve, else why /dev/fuse does.  The
 * boundary of start-up errors: logs the failure once.  Returns 0 or -errno.
 */
static int start_export(struct export *exp, struct startup *st, struct mount_opts *mo)
{
	int cpus[CPU_SETSIZE];
	int err;

	st->nr_cpus = cpu_list(cpus, CPU_SETSIZE);
	st->len = -1;
	err = startup_run(exp, st, mo);
	if (err)
		log_err("%s", st->error[0] ? st->error : strerror(-err));
	free(st->buf);
	st->buf = NULL;
	return err;
}

/* "transport=... queues=..." of a live export: the start-up line's end
 * and systemd's STATUS=.  'reason': why /dev/fuse serves, NULL for rings. */
static void export_transport_desc(const struct export *exp, const char *reason,
				  char *buf, size_t cap)
{
	if (reason)
		snprintf(buf, cap, "transport=dev-fuse threads=%u reason=%s",
			 exp->devfuse->nr_workers, reason);
	else
		snprintf(buf, cap, "transport=uring queues=%u depth=%u",
			 exp->rings->nr_queues, exp->rings->depth);
}

/* The one line that says what is served and how, into 'line'; on stderr
 * in the foreground or with -v (serve() logs it again once daemonized). */
static void log_startup(const struct export *exp, const struct options *o, const char *reason,
			char *line, size_t cap)
{
	const struct image *img = &exp->img;
	char how[256], flags[128];

	export_transport_desc(exp, reason, how, sizeof(how));
	snprintf(line, cap, "%s%s (%llu bytes, %s%s%s) on %s: %s",
		 o->image, o->window_desc, (unsigned long long)img->size,
		 img->writable ? "rw" : "ro",
		 img->growable ? ",growable" : "", img->passthrough ? ",passthrough" : "",
		 o->mountpoint, how);
	if (o->foreground || log_verbose)
		fprintf(stderr, "uexportd: %s\n", line);
	if (!reason)
		log_info("io_uring: setup flags %s, payload %u bytes per entry, "
			 "copies of %u KiB+ on io-wq: %s",
			 ring_flags_string(exp->rings->queues[0].ring.flags, flags, sizeof(flags)),
			 exp->max_write, OFFLOAD_MIN_BYTES >> 10,
			 exp->rings->offload ? "other CPUs" : "off (one CPU)");
}

/* ======================================================================
 * Lifecycle: descriptors, pidfile, daemonizing, readiness, signals, stop
 *
 * Signals are blocked in every thread and taken synchronously by the main
 * thread with sigwaitinfo(); serving threads wake it with SIGUSR1 when they
 * end.  Without -f the parent waits on a pipe and exits 0 only once the
 * mount is live and serving, so "uexportd img f && cat f" has no race.
 * ====================================================================== */

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

/* A daemon keeps no descriptor its caller gave it (a script's pipe held
 * open by us would make the script wait forever for EOF), except keep_a
 * and keep_b (-1: none): the pidfile, opened before daemonizing, and the
 * --notify-fd it was given for that. */
static void close_inherited_fds(int keep_a, int keep_b)
{
	unsigned lo = STDERR_FILENO + 1;
	int keep[2] = { keep_a < keep_b ? keep_a : keep_b, keep_a < keep_b ? keep_b : keep_a };

	for (unsigned i = 0; i < 2; i++) {
		if (keep[i] < (int)lo)
			continue;
		close_fd_range(lo, (unsigned)keep[i] - 1);
		lo = (unsigned)keep[i] + 1;
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

struct pidfile {
	const char *path;		/* absolute: the daemon changes to / */
	char abs[PATH_MAX];
	int fd;				/* -1: none */
	struct stat st;			/* of fd */
	bool ours;			/* we created it or wrote our PID in it */
};

/* Same file: the same inode, or the same block device through any node. */
static bool same_file(const struct stat *a, const struct stat *b)
{
	if (S_ISBLK(a->st_mode) && S_ISBLK(b->st_mode))
		return a->st_rdev == b->st_rdev;
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

/* Open an existing pidfile or create a new one (then pf->ours); never
 * truncate.  O_NONBLOCK: a FIFO without a reader must not hang us.  A
 * dangling symbolic link is not followed (ENOENT): whoever can plant one
 * must not choose what root creates.  Returns the descriptor or -errno. */
static int pidfile_open_path(struct pidfile *pf)
{
	int flags = O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC;
	struct stat st;

	for (;;) {
		int fd = open(pf->path, flags);

		if (fd >= 0 || errno != ENOENT)
			return fd < 0 ? -errno : fd;
		fd = open(pf->path, flags | O_CREAT | O_EXCL, 0644);
		pf->ours = fd >= 0;
		if (fd >= 0 || errno != EEXIST)
			return fd < 0 ? -errno : fd;
		/* Created by someone else meanwhile, or a dangling link. */
		if (lstat(pf->path, &st) == 0 && S_ISLNK(st.st_mode))
			return -ENOENT;
	}
}

/* Lock the regular file open as pf->fd, waiting until 'deadline'.
 * Returns 1 if locked and still linked at its path, 0 if its owner removed
 * it meanwhile (open it again), -EWOULDBLOCK if another daemon still holds
 * it, -errno. */
static int pidfile_lock(struct pidfile *pf, uint64_t deadline)
{
	struct stat st;
	int err = flock_until(pf->fd, deadline);

	if (err)
		return err;
	return stat(pf->path, &st) == 0 && same_file(&st, &pf->st);
}

/* The first line of the pidfile, for "in use by process N". */
static void pidfile_holder(const struct pidfile *pf, char *buf, size_t cap)
{
	int fd = open(pf->path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, cap - 1);

	buf[n > 0 ? n : 0] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
	if (fd >= 0)
		close(fd);
}

/* A regular file we may overwrite: empty, or a PID and a newline (a
 * stale pidfile).  Anything else -- a log, the image's backing file, a
 * user's data -- is not ours to truncate. */
static bool pidfile_overwritable(const struct pidfile *pf)
{
	char buf[32];

	if (pf->st.st_size == 0)
		return true;
	if (pf->st.st_size >= (off_t)sizeof(buf))
		return false;
	pidfile_holder(pf, buf, sizeof(buf));
	return *buf && strspn(buf, "0123456789") == strlen(buf) &&
	       (off_t)strlen(buf) >= pf->st.st_size - 1;
}

/* Open and, if it is a regular file, lock 'path'.  Returns 0, -EBUSY when
 * another daemon holds it past PIDFILE_WAIT_MS (its PID in 'holder'),
 * -EEXIST when it holds something else than a PID, or -errno. */
static int pidfile_open(struct pidfile *pf, const char *path, char *holder, size_t cap)
{
	uint64_t deadline = now_ns() + PIDFILE_WAIT_MS * 1000000ull;
	size_t n;
	int ret;

	pf->path = path;
	if (*path != '/') {
		if (!getcwd(pf->abs, sizeof(pf->abs)))
			return -errno;
		n = strlen(pf->abs);
		if (snprintf(pf->abs + n, sizeof(pf->abs) - n, "/%s", path) >=
		    (int)(sizeof(pf->abs) - n))
			return -ENAMETOOLONG;
		pf->path = pf->abs;
	}
	do {
		pf->ours = false;
		pf->fd = pidfile_open_path(pf);
		if (pf->fd < 0)
			return pf->fd;
		if (fstat(pf->fd, &pf->st) < 0 || fcntl(pf->fd, F_SETFL, 0) < 0)
			ret = -errno;
		else
			ret = S_ISREG(pf->st.st_mode) ? pidfile_lock(pf, deadline) : 1;
		if (ret == -EWOULDBLOCK) {
			pidfile_holder(pf, holder, cap);
			ret = -EBUSY;
		} else if (ret == 1 && S_ISREG(pf->st.st_mode) && !pidfile_overwritable(pf)) {
			ret = -EEXIST;
		}
		if (ret <= 0) {
			close(pf->fd);
			pf->fd = -1;
		}
	} while (ret == 0);
	return ret < 0 ? ret : 0;
}

/* Write our PID; a regular file holds nothing else.  Returns 0 or -errno. */
static int pidfile_write(struct pidfile *pf)
{
	char buf[32];
	int len = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
	ssize_t n;

	if (pf->fd < 0)
		return 0;
	if (S_ISREG(pf->st.st_mode)) {
		if (ftruncate(pf->fd, 0) < 0)
			return -errno;
		pf->ours = true;
		n = pwrite(pf->fd, buf, (size_t)len, 0);
	} else {
		n = write(pf->fd, buf, (size_t)len);
	}
	n = n < 0 ? -errno : n == len ? 0 : -EIO;
	/* A pipe or FIFO: its reader waits for EOF after the PID. */
	if (!S_ISREG(pf->st.st_mode)) {
		close(pf->fd);
		pf->fd = -1;
	}
	return (int)n;
}

/* Remove the pidfile if it is ours and still there, then release it. */
static void pidfile_remove(struct pidfile *pf)
{
	struct stat st;

	if (pf->fd < 0)
		return;
	if (pf->ours && S_ISREG(pf->st.st_mode) && stat(pf->path, &st) == 0 &&
	    same_file(&st, &pf->st))
		unlink(pf->path);
	close(pf->fd);
	pf->fd = -1;
}

/* The daemon died before it could unmount: do not leave its dead mount.
 * realpath() of the mount point itself would stat the dead mount, so
 * resolve its directory only. */
static void unmount_dead(const char *mountpoint)
{
	char abs[PATH_MAX];

	if (geteuid() == 0 && path_abs_dir(mountpoint, abs, sizeof(abs)) == 0 &&
	    mount_point(abs, NULL) == 1)
		umount2(abs, MNT_DETACH);
}

#define START_KILL_MS	5000	/* a signalled start-up that does not stop */

/*
 * The parent's side of start-up: wait on 'rfd' for the child's "live" byte
 * and return the exit status to leave with.  The signals main() blocked
 * are taken here too: SIGINT, SIGTERM or SIGHUP (Ctrl-C, timeout(1), a
 * supervisor) are passed on to the child, which stops as soon as it can,
 * and the start counts as failed -- a caller that gave up never gets a
 * daemon it did not wait for, nor a parent that ignores it.  A child that
 * has not stopped START_KILL_MS later is killed.
 */
static int daemonize_wait(pid_t child, int rfd, const char *mountpoint, struct pidfile *pf)
{
	static const struct timespec now = { 0, 0 };
	struct pollfd pfd = { .fd = rfd, .events = POLLIN };
	bool interrupted = false;
	uint64_t kill_at = UINT64_MAX;
	sigset_t set;
	int status;
	char ok;

	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	for (;;) {
		/* The pipe wakes us at once; the blocked signals do not, so
		 * they are looked at every 100 ms, and first. */
		int ready = poll(&pfd, 1, 100);
		int sig = sigtimedwait(&set, NULL, &now);

		if (sig > 0 && !interrupted) {
			log_err("start-up interrupted by signal %d: stopping the daemon", sig);
			kill(child, SIGTERM);
			interrupted = true;
			kill_at = now_ns() + START_KILL_MS * 1000000ull;
		}
		if (ready == 1) {
			if (read(rfd, &ok, 1) == 1 && !interrupted)
				return 0;
			if (!interrupted)
				break;	/* EOF: the child failed */
			pfd.fd = -1;	/* EOF after a signal: poll only paces */
		}
		if (interrupted && waitpid(child, &status, WNOHANG) == child)
			return EXIT_FAILED;
		/* A child stuck in the kernel (a mount point on a hung FUSE
		 * mount) does not see SIGTERM: do not wait for it forever. */
		if (interrupted && now_ns() > kill_at) {
			kill(child, SIGKILL);
			kill_at = UINT64_MAX;
		}
	}
	/* The child failed; it has printed why, unless it was killed. */
	if (waitpid(child, &status, 0) == child && WIFEXITED(status))
		return WEXITSTATUS(status) ? WEXITSTATUS(status) : 1;
	if (WIFSIGNALED(status)) {
		log_err("daemon killed by signal %d during start-up", WTERMSIG(status));
		unmount_dead(mountpoint);
	}
	pidfile_remove(pf);
	return 1;
}

/* Fork; the parent waits for the child's verdict and exits with it.  In
 * the child, *ready_fd is the pipe daemonize_finish() releases the parent
 * through.  The boundary of its errors: logs them.  Returns 0 in the
 * child, -errno if the pipe or the fork failed. */
static int daemonize_begin(const char *mountpoint, struct pidfile *pf, int *ready_fd,
			   int notify_fd)
{
	pid_t parent = getpid(), pid;
	int p[2];

	close_inherited_fds(pf->fd, notify_fd);
	if (pipe2(p, O_CLOEXEC) < 0) {
		int err = -errno;

		log_err("daemonize: pipe: %s", strerror(-err));
		return err;
	}
	pid = fork();
	if (pid < 0) {
		int err = -errno;

		log_err("daemonize: fork: %s", strerror(-err));
		return err;
	}
	if (pid > 0) {
		close(p[1]);
		_exit(daemonize_wait(pid, p[0], mountpoint, pf));
	}
	close(p[0]);
	*ready_fd = p[1];
	/* Until live, the parent speaks for us: if it is killed, its caller
	 * has given up (and may wait on our copy of its stdout), so stop. */
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	if (getppid() != parent)
		raise(SIGTERM);
	setsid();
	return 0;
}

/* Start-up succeeded: release the parent waiting on 'ready_fd' (closed
 * here; -1 in the foreground) and let the caller's stdio go, stderr too
 * unless it is where the daemon logs from now on (log_detach). */
static void daemonize_finish(int ready_fd)
{
	bool keep_stderr;
	int null;

	if (ready_fd < 0)
		return;
	prctl(PR_SET_PDEATHSIG, 0);
	keep_stderr = log_detach("uexportd", true);
	null = open_null();
	if (null >= 0) {
		dup2(null, STDIN_FILENO);
		dup2(null, STDOUT_FILENO);
		if (!keep_stderr)
			dup2(null, STDERR_FILENO);
		if (null > STDERR_FILENO)
			close(null);
	}
	if (write(ready_fd, "", 1) < 0)
		log_err("start-up handshake with the parent: %s", strerror(errno));
	close(ready_fd);
}

/* One message (NAME=VALUE lines) to $NOTIFY_SOCKET, systemd's readiness
 * protocol (sd_notify(3)), no library needed.  Best effort. */
static void notify_systemd(const char *msg)
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
	sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa, len);
	close(fd);
}

/* Live: a newline to --notify-fd (s6's readiness protocol), closed then
 * (one of 0-2 becomes /dev/null), and READY=1 with a STATUS= line
 * ('status') to systemd. */
static void notify_live(struct options *o, const char *status)
{
	char msg[512];
	int null;

	if (o->notify_fd >= 0) {
		if (write(o->notify_fd, "\n", 1) < 0)
			log_err("--notify-fd=%d: %s", o->notify_fd, strerror(errno));
		/* Closed, so that a reader sees EOF; one of 0-2 becomes
		 * /dev/null instead (in the foreground nothing else would). */
		if (o->notify_fd > STDERR_FILENO) {
			close(o->notify_fd);
		} else if ((null = open_null()) >= 0) {
			dup2(null, o->notify_fd);
			close(null);
		}
		o->notify_fd = -1;
	}
	snprintf(msg, sizeof(msg), "READY=1\nSTATUS=serving: %s", status);
	notify_systemd(msg);
}

/* Wait up to 'ms' for every serving thread to end. */
static bool export_threads_wait(struct export *exp, unsigned ms)
{
	uint64_t deadline = now_ns() + (uint64_t)ms * 1000000u;

	while (atomic_load(&exp->threads_live) > 0) {
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
static void shutdown_export(struct export *exp, struct mount_opts *mo, bool flush)
{
	int err;

	if (flush && (err = export_flush(mo)) < 0)
		log_err("flush of %s before unmounting: %s", mo->target, strerror(-err));
	exp->stopping = true;
	/* Still mounted even if every thread is gone (an abort): a dead mount
	 * must not outlive us.  Unmount only our own mount: one made over it
	 * since (a bind mount), or a successor's after ours was unmounted
	 * from outside, is not ours to take down. */
	if (mount_is_ours(mo)) {
		if (unmount_export(mo, false) < 0) {
			log_info("%s is busy: detaching lazily", mo->target);
			unmount_export(mo, true);
		}
	} else if (mount_point(mo->target, NULL) == 1) {
		log_info("%s is no longer our mount on top: not unmounting it", mo->target);
	}
	if (!mo->privileged)
		watcher_stopped(mo);	/* before a successor can mount there */
	/* Threads still serving: the connection, and so its minor, is ours. */
	if (!export_threads_wait(exp, SHUTDOWN_GRACE_MS) && mo->privileged && mo->minor) {
		log_info("clients still hold %s: aborting the connection", mo->target);
		err = fuse_abort_connection(mo->minor);
		if (err && err != -ENOENT)
			log_err("abort connection %u of %s: %s", mo->minor, mo->target,
				strerror(-err));
	}
	watcher_stopped(mo);
}

/*
 * Stop and flush the image.  The pidfile goes first: once the mount is
 * gone, a successor may start and take the same path.  Serving threads
 * that do not end within SHUTDOWN_GRACE_MS after the connection is gone
 * (a ring the kernel keeps failing) are left to the process exit.
 * Returns 0, or -EIO when acknowledged writes may be lost: the image's
 * final fsync failed, or a write-back error was seen while serving (both
 * logged).
 */
static int stop_export(struct export *exp, struct mount_opts *mo, struct pidfile *pf,
		       bool flush)
{
	struct image *img = &exp->img;
	bool joined;
	int err = 0;

	pidfile_remove(pf);
	shutdown_export(exp, mo, flush);
	joined = export_threads_wait(exp, SHUTDOWN_GRACE_MS);
	if (joined) {
		devfuse_join(exp);
		ring_pool_destroy(exp->rings);	/* no request can come any more */
		exp->rings = NULL;
	} else {
		log_err("%d serving threads did not end: exiting without them",
			atomic_load(&exp->threads_live));
	}
	image_log_flush(img);
	if (img->writable && (err = image_sync(img, false)) < 0)
		log_err("flush %s: %s", img->path, strerror(-err));
	if (err || image_wb_errors(img))
		log_err("%s: acknowledged writes may be lost (%u write-back errors while "
			"serving, final flush: %s)", img->path, image_wb_errors(img),
			err ? strerror(-err) : "ok");
	err = err || image_wb_errors(img) ? -EIO : 0;
	if (joined) {		/* no request can come any more */
		free(img->files.slots);
		img->files.slots = NULL;
		img->files.nr_slots = 0;
	}
	return err;
}

/* Wait for a stop signal, or for a serving thread to end (an unmount, a
 * fatal error).  Returns true if every thread still serves. */
static bool export_wait_stop(struct export *exp)
{
	int threads = atomic_load(&exp->threads_live);
	siginfo_t si;
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	sigaddset(&set, SIGUSR1);
	for (;;) {
		if (sigwaitinfo(&set, &si) < 0)
			continue;
		if (si.si_signo != SIGUSR1) {
			log_info("signal %d: shutting down", si.si_signo);
			break;
		}
		if (atomic_load(&exp->threads_live) < threads || atomic_load(&exp->failed))
			break;		/* unmounted, or a thread failed */
	}
	return atomic_load(&exp->threads_live) == threads && !atomic_load(&exp->failed);
}

/*
 * Start the export, go live (pidfile, the parent released through
 * 'ready_fd', --notify-fd, READY=1), serve until stopped, stop.  Returns
 * the exit status: 0; EXIT_MOUNT (a failed start) or EXIT_FAILED (the
 * pidfile, or the serving machinery failed); EXIT_DATA_LOST.  Logged.
 */
static int serve(struct export *exp, struct options *o, struct pidfile *pf, int ready_fd)
{
	struct mount_opts mo = {
		.source = o->image_abs, .target = o->mountpoint_abs,
		.allow_other = o->allow_other != TRI_OFF, .privileged = geteuid() == 0,
		.read_only = !o->writable, .flags = o->mount_flags, .watch_fd = -1,
	};
	struct startup st = { .o = o };
	char status[256], line[1024];
	bool serving;
	int err = start_export(exp, &st, &mo), failed = EXIT_MOUNT;

	if (!err && (err = pidfile_write(pf)) < 0) {
		log_err("pidfile %s: %s", o->pidfile, strerror(-err));
		failed = EXIT_FAILED;
	}
	if (!err)
		log_startup(exp, o, st.reason, line, sizeof(line));
	if (o->mountpoint_lock >= 0)
		close(o->mountpoint_lock);
	if (err) {
		if (exp->dev_fd >= 0)
			stop_export(exp, &mo, pf, false);
		return failed;
	}
	export_transport_desc(exp, st.reason, status, sizeof(status));
	notify_live(o, status);
	daemonize_finish(ready_fd);
	/* The daemon's log has the start-up line too, once. */
	if (!o->foreground && !(log_verbose && !log_syslog && log_fd == STDERR_FILENO))
		log_notice("%s", line);
	/* Hold no directory busy: "umount" of where we were started works.
	 * Every path kept from here on is absolute. */
	if (chdir("/") < 0)
		log_info("chdir /: %s", strerror(errno));
	/* Nothing is executed from here on as root (umount2, not fusermount3),
	 * so nothing may gain privileges through exec either.  A user's
	 * daemon needs the setuid fusermount3 to unmount: not for it. */
	if (mo.privileged)
		prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
	/* After an unmount the kernel has written its page cache back; a
	 * read-only export has none to write. */
	serving = export_wait_stop(exp);
	notify_systemd("STOPPING=1");
	err = stop_export(exp, &mo, pf, serving && exp->img.writable);
	if (err)
		return EXIT_DATA_LOST;
	return atomic_load(&exp->failed) ? EXIT_FAILED : 0;
}

/* ======================================================================
 * Options and main
 * ====================================================================== */

static void usage(FILE *f)
{
	fprintf(f,
"Usage: uexportd [OPTIONS] IMAGE MOUNTPOINT [-o OPT[,OPT...]]\n"
"Export IMAGE (a regular file, a block device, or null:SIZE, e.g. null:1G) or\n"
"a part of it as the existing regular file MOUNTPOINT through FUSE, until\n"
"SIGTERM or umount.  Exit status, semantics and examples: see uexportd(8).\n"
"\n"
"  -w, --writable          allow writes (default: read-only)\n"
"  -g, --growable          writes past EOF and truncate grow the image (with -w)\n"
"      --offset=SIZE, --size=SIZE  export only those bytes of IMAGE (a window)\n"
"      --partition=N|name:LABEL|uuid:UUID  only that MBR or GPT partition\n"
"      --list-partitions   print IMAGE's partition table, export nothing\n"
"      --allow-other=MODE  auto|on|off: other users may access it (default auto)\n"
"      --io-uring=MODE     auto|on|off: FUSE-over-io_uring (default auto)\n"
"  -q, --queue-depth=N     requests in flight per queue, 1-%d (default %d)\n"
"      --max-memory=SIZE   request buffers over all queues (default 256M)\n"
"      --direct            open the image with O_DIRECT (no host page cache)\n"
"      --passthrough       the kernel does the image I/O (root, Linux 6.9+)\n"
"      --clean-stale       detach a dead mount left on MOUNTPOINT, then start\n"
"  -f, --foreground        do not daemonize; log to stderr\n"
"  -p, --pidfile=FILE      write the daemon's PID once the export is live\n"
"      --notify-fd=N       write a newline to descriptor N once live, close it\n"
"  -v, --verbose           log start-up details to stderr\n"
"  -d, --debug             log one line per request (implies -f -v)\n"
"  -o OPT[,OPT...]         as mount(8) passes them: rw, ro, long options by name\n"
"  -h, --help, -V, --version  this help; the version, protocol and transports\n",
		MAX_QUEUE_DEPTH, DEFAULT_QUEUE_DEPTH);
}

/* --version: what this build is and speaks (both transports are always in). */
static void version(void)
{
	printf("uexportd %s\n"
	       "FUSE protocol %d.%d\n"
	       "transports: io_uring, /dev/fuse\n",
	       UEXPORTD_VERSION, FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION);
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

enum { OPT_ALLOW_OTHER = 256, OPT_IO_URING, OPT_DIRECT, OPT_MAX_MEMORY, OPT_PASSTHROUGH,
       OPT_CLEAN_STALE, OPT_NOTIFY_FD, OPT_OFFSET, OPT_SIZE, OPT_PARTITION,
       OPT_LIST_PARTITIONS };

static const struct option longopts[] = {
	{ "writable", no_argument, NULL, 'w' },
	{ "growable", no_argument, NULL, 'g' },
	{ "offset", required_argument, NULL, OPT_OFFSET },
	{ "size", required_argument, NULL, OPT_SIZE },
	{ "partition", required_argument, NULL, OPT_PARTITION },
	{ "list-partitions", no_argument, NULL, OPT_LIST_PARTITIONS },
	{ "allow-other", required_argument, NULL, OPT_ALLOW_OTHER },
	{ "io-uring", required_argument, NULL, OPT_IO_URING },
	{ "queue-depth", required_argument, NULL, 'q' },
	{ "direct", no_argument, NULL, OPT_DIRECT },
	{ "max-memory", required_argument, NULL, OPT_MAX_MEMORY },
	{ "passthrough", no_argument, NULL, OPT_PASSTHROUGH },
	{ "clean-stale", no_argument, NULL, OPT_CLEAN_STALE },
	{ "foreground", no_argument, NULL, 'f' },
	{ "pidfile", required_argument, NULL, 'p' },
	{ "notify-fd", required_argument, NULL, OPT_NOTIFY_FD },
	{ "verbose", no_argument, NULL, 'v' },
	{ "debug", no_argument, NULL, 'd' },
	{ "help", no_argument, NULL, 'h' },
	{ "version", no_argument, NULL, 'V' },
	{ NULL, 0, NULL, 0 },
};

/* A decimal in [lo, hi], range-checked on its full value before any
 * narrowing.  Returns 0 or -EINVAL. */
static int parse_long_in(const char *s, long lo, long hi, long *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *end || end == s || v < lo || v > hi)
		return -EINVAL;
	*out = v;
	return 0;
}

/* --notify-fd=N: an open descriptor the daemon keeps (close-on-exec, so
 * fusermount3 does not hold it) until it writes the newline. */
static int parse_notify_fd(const char *arg, struct options *o)
{
	long fd;
	int flags;

	if (parse_long_in(arg, 0, INT_MAX, &fd) < 0) {
		log_err("invalid --notify-fd '%s' (expected a descriptor number)", arg);
		return -EINVAL;
	}
	flags = fcntl((int)fd, F_GETFD);
	if (flags < 0) {
		log_err("--notify-fd=%ld: %s", fd, strerror(errno));
		return -EINVAL;
	}
	if (fd > STDERR_FILENO)
		fcntl((int)fd, F_SETFD, flags | FD_CLOEXEC);
	o->notify_fd = (int)fd;
	return 0;
}

/* Apply one option, as getopt_long returns it (c) with its argument.
 * Logs and returns -EINVAL for a bad value; exits for --help, --version. */
static int option_apply(struct options *o, int c, const char *arg)
{
	static const char *const aw[3] = { "auto", "on", "off" };
	long depth;
	int v;

	switch (c) {
	case 'w': o->writable = true; break;
	case 'g': o->growable = true; break;
	case 'f': o->foreground = true; break;
	case 'p':
		if (!*arg) {
			log_err("invalid --pidfile '' (expected a file name)");
			return -EINVAL;
		}
		o->pidfile = arg;
		break;
	case 'v': log_verbose = true; break;
	case 'd': log_debug = log_verbose = o->foreground = true; break;
	case OPT_DIRECT: o->direct = true; break;
	case OPT_PASSTHROUGH: o->passthrough = true; break;
	case OPT_CLEAN_STALE: o->clean_stale = true; break;
	case OPT_NOTIFY_FD: return parse_notify_fd(arg, o);
	case OPT_PARTITION:
		if (!pt_spec_valid(arg)) {
			log_err("invalid --partition '%s' (expected a number from 1, "
				"name:LABEL or uuid:UUID)", arg);
			return -EINVAL;
		}
		o->partition = arg;
		break;
	case OPT_LIST_PARTITIONS: o->list_partitions = true; break;
	case OPT_OFFSET:
	case OPT_SIZE:
		/* Full range: parse_size refuses more than INT64_MAX. */
		if (parse_size(arg, c == OPT_OFFSET ? &o->offset : &o->size) < 0) {
			log_err("invalid --%s '%s' (expected bytes, or K, M, G, T)",
				c == OPT_OFFSET ? "offset" : "size", arg);
			return -EINVAL;
		}
		*(c == OPT_OFFSET ? &o->offset_set : &o->size_set) = true;
		break;
	case OPT_MAX_MEMORY:
		if (parse_size(arg, &o->max_memory) < 0 || o->max_memory < (1u << 20)) {
			log_err("invalid --max-memory '%s' (expected a size of at least 1M, "
				"e.g. 256M)", arg);
			return -EINVAL;
		}
		break;
	case OPT_ALLOW_OTHER:
		if (parse_tristate("allow-other", arg, &v, aw) < 0)
			return -EINVAL;
		o->allow_other = v;
		break;
	case OPT_IO_URING:
		if (parse_tristate("io-uring", arg, &v, aw) < 0)
			return -EINVAL;
		o->io_uring = v;
		break;
	case 'q':
		if (parse_long_in(arg, 1, MAX_QUEUE_DEPTH, &depth) < 0) {
			log_err("invalid --queue-depth '%s' (expected 1-%d)", arg, MAX_QUEUE_DEPTH);
			return -EINVAL;
		}
		o->queue_depth = (unsigned)depth;
		break;
	case 'h': usage(stdout); exit(0);
	case 'V': version(); exit(0);
	default:
		return -EINVAL;
	}
	return 0;
}

/* getopt's complaint, in our words and with our prefix (opterr is 0):
 * 'c' is what getopt returned, ':' (missing value) or '?'. */
static void option_error(int c, char *const argv[])
{
	const char *arg = argv[optind - 1];

	if (c == ':')
		log_err("option '%s' needs a value (see --help)", arg);
	else if (optopt && strncmp(arg, "--", 2) != 0)
		log_err("unknown option -%c (see --help)", optopt);
	else
		log_err("unknown option '%s' (see --help)", arg);
}

/*
 * Options mount(8) passes along or that are always in force here: taken
 * and ignored.  The mount is always nosuid,nodev and default_permissions.
 */
static bool mount_option_ignored(const char *name)
{
	static const char *const ignored[] = {
		"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "nofail",
		"_netdev", "default_permissions", "nosuid", "nodev", "suid", "dev",
		"atime", "noatime", "relatime", "strictatime", "diratime", "nodiratime",
		"lazytime", "nolazytime", "dirsync", "loud", "silent", "nosymfollow",
		"symfollow", "iversion", "noiversion", NULL,
	};

	if (strncmp(name, "x-", 2) == 0 || strncmp(name, "comment=", 8) == 0)
		return true;
	for (unsigned i = 0; ignored[i]; i++)
		if (strcmp(name, ignored[i]) == 0)
			return true;
	return false;
}

/* The mount flags -o sets and clears (the last one named wins). */
static const struct {
	const char *name;
	unsigned long flag;
	bool set;
} mount_flag_opts[] = {
	{ "noexec", MS_NOEXEC, true }, { "exec", MS_NOEXEC, false },
	{ "sync", MS_SYNCHRONOUS, true }, { "async", MS_SYNCHRONOUS, false },
};

/*
 * One item of -o (the mount(8) convention): a long option by its name,
 * NAME=VALUE when it takes an argument; rw, ro, allow_other, noexec, sync
 * (the mount flags, kept in o->mount_flags); or one mount_option_ignored().  'sloppy' (mount -s) ignores unknown names.
 * 'item' is modified (split at '=').  Returns 0 or -EINVAL (logged).
 */
static int mount_option_apply(struct options *o, char *item, bool sloppy)
{
	char *value = strchr(item, '=');

	/* uexportd.NAME: the option NAME where mount(8) would take NAME for
	 * itself (libmount sets up a loop device for offset=).  It passes
	 * names it does not know to the helper; x- ones it keeps. */
	if (strncmp(item, "uexportd.", 9) == 0)
		item += 9;
	else if (!*item || mount_option_ignored(item))
		return 0;
	if (strcmp(item, "rw") == 0)
		return option_apply(o, 'w', NULL);
	if (strcmp(item, "ro") == 0) {
		o->mount_ro = true;	/* a conflict with rw is refused at the end */
		return 0;
	}
	if (strcmp(item, "allow_other") == 0)
		return option_apply(o, OPT_ALLOW_OTHER, "on");
	for (unsigned i = 0; i < sizeof(mount_flag_opts) / sizeof(mount_flag_opts[0]); i++) {
		if (strcmp(item, mount_flag_opts[i].name) == 0) {
			o->mount_flags = (o->mount_flags & ~mount_flag_opts[i].flag) |
					 (mount_flag_opts[i].set ? mount_flag_opts[i].flag : 0);
			return 0;
		}
	}
	if (value)
		*value++ = '\0';
	for (const struct option *lo = longopts; lo->name; lo++) {
		if (strcmp(lo->name, item) != 0 || lo->val == 'h' || lo->val == 'V' ||
		    lo->val == OPT_LIST_PARTITIONS)
			continue;
		if ((lo->has_arg == required_argument) != (value != NULL)) {
			log_err("-o %s: %s", item, value ? "takes no value" : "needs =VALUE");
			return -EINVAL;
		}
		return option_apply(o, lo->val, value);
	}
	if (sloppy)
		return 0;
	log_err("-o %s: unknown option (see --help)", item);
	return -EINVAL;
}

/* -o OPT[,OPT...], split in a copy: argv stays as ps(1) shows it.  The
 * values kept in *o point into the copy, in o->o_lists until
 * options_free().  Returns 0 or -EINVAL (logged). */
static int mount_options_apply(struct options *o, const char *list, bool sloppy)
{
	char *copy, *save = NULL;

	if (o->nr_o_lists == sizeof(o->o_lists) / sizeof(o->o_lists[0])) {
		log_err("-o %s: more than %u -o options", list, o->nr_o_lists);
		return -EINVAL;
	}
	copy = strdup(list);
	if (!copy) {
		log_err("-o %s: %s", list, strerror(ENOMEM));
		return -EINVAL;
	}
	o->o_lists[o->nr_o_lists++] = copy;
	for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save))
		if (mount_option_apply(o, item, sloppy) < 0)
			return -EINVAL;
	return 0;
}

/*
 * Called as a mount(8) helper (mount.uexportd, mount.fuse.uexportd):
 * "SOURCE TARGET [-sfnv] [-N NS] [-o OPTS] [-t TYPE]" (mount(8), "External
 * helpers").  -f is mount's fake: do nothing.  Returns 0, 1 for a fake
 * mount, -EINVAL (logged).
 */
static int parse_mount_helper(int argc, char **argv, struct options *o)
{
	bool sloppy = false, fake = false;
	char *list = NULL;
	int c;

	static const struct option none[] = { { NULL, 0, NULL, 0 } };

	/* getopt_long, not getopt: it takes options after the operands
	 * (musl's getopt stops at the first operand). */
	while ((c = getopt_long(argc, argv, ":sfnvN:o:t:", none, NULL)) != -1) {
		switch (c) {
		case 's': sloppy = true; break;
		case 'f': fake = true; break;
		case 'v': log_verbose = true; break;
		case 'n': case 't': break;
		case 'o': list = optarg; break;
		case 'N':
			log_err("-N %s: mounting in another namespace is not supported", optarg);
			return -EINVAL;
		default:
			option_error(c, argv);
			return -EINVAL;
		}
	}
	if (list && mount_options_apply(o, list, sloppy) < 0)
		return -EINVAL;
	return fake ? 1 : 0;
}

static void options_free(struct options *o)
{
	while (o->nr_o_lists > 0)
		free(o->o_lists[--o->nr_o_lists]);
}

static int parse_options(int argc, char **argv, struct options *o)
{
	const char *name = strrchr(argv[0], '/');
	int c, err = 0;

	o->queue_depth = DEFAULT_QUEUE_DEPTH;
	o->max_memory = DEFAULT_MAX_MEMORY;
	o->notify_fd = -1;
	opterr = 0;
	name = name ? name + 1 : argv[0];
	if (strncmp(name, "mount.", 6) == 0) {
		err = parse_mount_helper(argc, argv, o);
	} else {
		while ((c = getopt_long(argc, argv, ":wgq:fp:vdhVo:", longopts, NULL)) != -1) {
			if (c == ':' || c == '?') {
				option_error(c, argv);
				return -EINVAL;
			}
			err = c == 'o' ? mount_options_apply(o, optarg, false)
				       : option_apply(o, c, optarg);
			if (err < 0)
				return err;
		}
	}
	if (err < 0)
		return err;
	if (o->list_partitions) {
		if (argc - optind != 1) {
			log_err("--list-partitions takes one IMAGE (see --help)");
			return -EINVAL;
		}
		o->image = argv[optind];
		return 0;
	}
	if (argc - optind != 2) {
		log_err("expected IMAGE and MOUNTPOINT (see --help)");
		return -EINVAL;
	}
	o->image = argv[optind];
	o->mountpoint = argv[optind + 1];
	if (o->partition && (o->offset_set || o->size_set)) {
		log_err("--partition and --offset/--size exclude each other");
		return -EINVAL;
	}
	if (o->offset + o->size > (uint64_t)INT64_MAX) {
		log_err("--offset + --size is past the largest file size (2^63 - 1)");
		return -EINVAL;
	}
	if (options_window(o) && o->growable) {
		log_err("--growable: a window (--offset, --size, --partition) has a fixed size");
		return -EINVAL;
	}
	if (options_window(o) && o->passthrough) {
		log_err("--passthrough cannot export a window (--offset, --size, --partition): "
			"the kernel would do the image I/O at the export's own offsets, "
			"which FUSE passthrough cannot shift");
		return -EINVAL;
	}
	/* mount(8) may pass -o ro,writable in any order: no order decides. */
	if (o->mount_ro && o->writable) {
		log_err("-o ro conflicts with --writable (-w, -o rw, -o writable)");
		return -EINVAL;
	}
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
	return err;	/* 1: mount -f, nothing to do */
}

/* The daemon writes its pidfile: it must be neither the image nor the
 * mount point, by whatever name (a link, /dev/fd/N, another device node),
 * nor a disk or another export (the root file of a FUSE mount). */
static int pidfile_check(const struct pidfile *pf, const struct options *o,
			 const struct image *img)
{
	struct statfs sfs;
	struct stat st;

	if (pf->fd < 0)
		return 0;
	if (S_ISBLK(pf->st.st_mode) ||
	    (pf->st.st_ino == FUSE_ROOT_ID && fstatfs(pf->fd, &sfs) == 0 &&
	     sfs.f_type == FUSE_SUPER_MAGIC)) {
		log_err("pidfile %s: is a %s", o->pidfile,
			S_ISBLK(pf->st.st_mode) ? "block device" : "FUSE export");
		return -EINVAL;
	}
	if (img->nr_fds && fstat(img->fds[IMAGE_FD_MAIN], &st) == 0 && same_file(&st, &pf->st)) {
		log_err("pidfile %s: is the image %s", o->pidfile, o->image);
		return -EINVAL;
	}
	if (same_file(&o->mountpoint_st, &pf->st)) {
		log_err("pidfile %s: is the mount point %s", o->pidfile, o->mountpoint);
		return -EINVAL;
	}
	return 0;
}

/* Open the pidfile given with -p; the boundary of its errors.  Returns 0
 * or -errno. */
static int open_pidfile(struct pidfile *pf, const char *path)
{
	char holder[32];
	int err = pidfile_open(pf, path, holder, sizeof(holder));

	if (err == -EBUSY)
		log_err("pidfile %s: in use by process %s", path, *holder ? holder : "(unknown)");
	else if (err == -EEXIST)
		log_err("pidfile %s: holds something other than a PID; not overwritten", path);
	else if (err)
		log_err("pidfile %s: %s", path, strerror(-err));
	return err;
}

/*
 * --list-partitions IMAGE: the table, for scripts.  A header line, then
 * one line per partition: number, start and size in bytes, type (MBR
 * "0x83", "0x5" as partx prints them; GPT the type GUID), UUID (GPT
 * PARTUUID, MBR "<disk id>-NN"), and last the GPT name (may hold spaces;
 * control characters and backslashes as \xNN).  Returns the exit status: 0, or EXIT_IMAGE with
 * one line saying what is wrong.
 */
static int list_partitions(const char *path)
{
	static struct image img;
	static struct pt_table t;
	int err = image_open(&img, path);

	if (err) {
		log_err("%s: %s", path, err == -EINVAL ? "not a regular file or block device" :
			strerror(-err));
		return EXIT_IMAGE;
	}
	if (image_partitions(&img, &t) < 0) {
		log_err("%s: %s", path, t.error);
		return EXIT_IMAGE;
	}
	printf("NR START SIZE TYPE UUID NAME\n");
	for (unsigned i = 0; i < t.nr; i++) {
		const struct pt_part *p = &t.parts[i];

		printf("%u %llu %llu %s %s%s", p->number, (unsigned long long)p->start,
		       (unsigned long long)p->size, p->type, *p->uuid ? p->uuid : "-",
		       *p->name ? " " : "");
		for (const char *c = p->name; *c; c++) {
			unsigned char u = (unsigned char)*c;

			if (u < 0x20 || u == 0x7f || u == '\\')
				printf("\\x%02x", u);
			else
				putchar(u);
		}
		putchar('\n');
	}
	return fflush(stdout) == 0 ? 0 : EXIT_FAILED;
}

/* Block the signals taken with sigwaitinfo, before any thread exists:
 * threads inherit the mask. */
static void block_signals(void)
{
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGPIPE);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
}

/* The checks before mounting, each failure (logged) with its exit
 * status; 0 when the export may start. */
static int prepare_export(struct export *exp, struct options *o, const struct pidfile *pf)
{
	if (open_image(exp, o) < 0)
		return EXIT_IMAGE;
	if (check_mountpoint(o) < 0)
		return EXIT_MOUNTPOINT;
	if (pidfile_check(pf, o, &exp->img) < 0)
		return EXIT_FAILED;
	if (claim_mountpoint(o) < 0)
		return EXIT_MOUNTPOINT;
	return 0;
}

/* The export's whole life, from the pidfile to the stop: its exit status. */
static int export_main(struct options *o)
{
	struct pidfile pf = { .fd = -1 };
	struct export exp = { .dev_fd = -1 };
	int ready_fd = -1, status;

	block_signals();
	exp.main_thread = pthread_self();
	if (o->pidfile && open_pidfile(&pf, o->pidfile) < 0)
		return EXIT_FAILED;
	if (!o->foreground && daemonize_begin(o->mountpoint, &pf, &ready_fd, o->notify_fd) < 0)
		status = EXIT_FAILED;
	else
		status = prepare_export(&exp, o, &pf);
	if (!status)
		status = serve(&exp, o, &pf, ready_fd);
	pidfile_remove(&pf);
	return status;
}

int main(int argc, char **argv)
{
	struct options o = { .mountpoint_lock = -1 };
	int err, status;

	stdio_reserve();
	/* The pidfile is the only file we create: never group/world-writable. */
	umask(umask(0) | 022);
	err = parse_options(argc, argv, &o);
	if (err)
		status = err < 0 ? EXIT_USAGE : 0;	/* 1: mount -f */
	else if (o.list_partitions)
		status = list_partitions(o.image);
	else
		status = export_main(&o);
	options_free(&o);
	return status;
}
