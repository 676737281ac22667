// SPDX-License-Identifier: BSD-2-Clause
/*
 * libfuzz - coverage-guided fuzzing of uexportd's request path with clang's
 * libFuzzer (built with -fsanitize=fuzzer,address,undefined by the Makefile).
 * Like tests/fuzz.c it includes uexportd.c; each input is decoded into a
 * configuration and a short sequence of steps that drive, through the
 * daemon's own functions:
 *
 *   - the /dev/fuse transport: devfuse_serve_one() on a request "read" into
 *     its buffer, its reply written to a pipe standing in for /dev/fuse;
 *   - the io_uring transport without a kernel ring: a struct ring_queue over
 *     a fake struct ring whose SQ, SQEs and CQ are plain memory.  The harness
 *     plays the kernel: it writes a request into an entry, posts its CQE and
 *     calls ring_queue_reap(); the SQEs the queue writes (commits with their
 *     payload size from ring_queue_commit(), image reads and writes) are
 *     checked, and image I/O is completed later, in full, short, with an
 *     error or with 0 bytes, through ring_queue_reap() again.  Nothing calls
 *     an io_uring syscall;
 *   - fuse_init() on a fuzzed INIT request and arguments, and on every INIT
 *     request a transport delivers;
 *   - the null, regular-file (tmpfs) and block-device backends, each also
 *     opened with O_DIRECT, read-only, writable, growable, with passthrough
 *     (a fake backing id), in-memory or not, RWF_NOWAIT working or not.
 *
 * Every reply is checked: its error (0 or -1..-4095, ENOSYS for an unknown
 * opcode, EINVAL for a short argument), its size for the opcode, READ and
 * WRITE byte counts, the fixed size of a non-growable export and the file's
 * size; every image I/O stays inside the transport's buffer and, with
 * O_DIRECT, aligned.  A failed check aborts (a crash for libFuzzer).
 *
 * Input layout (all little-endian; bytes past the end read as 0):
 *
 *   image     variant (% 5: null, file, file O_DIRECT, blkdev, blkdev O_DIRECT)
 *   flags     bit 0 writable, 1 growable, 2 passthrough, 3 allow_chown,
 *             4 in_memory, 5 RWF_NOWAIT reads off, 6 writes off, 7 stopping
 *   transport bits 0-1 ring payload (8K, 132K, 256K, 256K), 2 ring offload,
 *             3-4 /dev/fuse max_write (4K, 64K, 256K, 256K), 5 misaligned
 *             /dev/fuse buffers, 6 entries start with REGISTER
 *   steps     up to FZ_MAX_STEPS of
 *     kind 0  /dev/fuse request:  op flags arglen arg[arglen] datalen:3 fill
 *             [len:4 if flags & 1]
 *     kind 1  ring request:       op flags arglen arg[arglen] datalen:3 fill
 *             entry iomode [len:4 if flags & 1] [payload_sz:4 if flags & 2]
 *     kind 2  ring event:         sub entry|iomode (see fz_ring_event)
 *     kind 3  fuse_init():        init_in:64 params:1 max_pages_limit:2 threads:2
 *   request flags: bit 2 sets a WRITE's size to its data length.
 *   iomode: bits 0-1 complete in full, short, with an error, with 0 bytes;
 *   bit 2 leave the I/O in flight; bits 3-7 how short / which error.
 *
 * Environment: UEXPORTD_FUZZ_DIR (default /dev/shm, else $TMPDIR, /tmp): where
 * the file image is created (and unlinked at once); UEXPORTD_FUZZ_BLKDEV: a
 * scratch block device (a loop device; it is overwritten) for the blkdev
 * variants, else they use the file; UEXPORTD_FUZZ_SEEDS=DIR: write the seed
 * corpus (a valid request for every opcode of fuse_opcodes[] in both
 * framings, INIT, a few I/O sequences) to DIR and exit.
 */
#define main uexportd_main
#include "../uexportd.c"
#undef main

#include <sanitizer/asan_interface.h>

/* The coverage build (tests/libfuzz-cov) has no ASan: nothing is poisoned. */
#if defined(__SANITIZE_ADDRESS__)
#define FZ_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FZ_ASAN 1
#endif
#endif

static bool fz_poisoned(const void *p, size_t len)
{
#ifdef FZ_ASAN
	return __asan_region_is_poisoned((void *)p, len) != NULL;
#else
	(void)p;
	(void)len;
	return false;
#endif
}

#define FZ_MAX_STEPS	16
#define FZ_DEPTH	4			/* ring entries (a power of two) */
#define FZ_FILE_SIZE	(1u << 20)
#define FZ_GROW_LIMIT	(16ull << 20)		/* fallocate may not reach past */
#define FZ_ALLOC_LIMIT	(32ll << 20)		/* what a growable image may hold */
#define FZ_BACKING_ID	42

enum { FZ_NULL, FZ_FILE, FZ_FILE_DIRECT, FZ_BLK, FZ_BLK_DIRECT, FZ_NR_IMAGES };

static const uint32_t fz_ring_payloads[4] = { 8192, 132 << 10, 256 << 10, 256 << 10 };
static const uint32_t fz_dev_writes[4] = { 4096, 64 << 10, 256 << 10, 256 << 10 };
#define FZ_MAX_PAYLOAD	(256u << 10)

static void fz_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void fz_fail(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "libfuzz: check failed: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	abort();
}

/* UEXPORTD_FUZZ_TRACE=1: one line per step and reply on stderr (triage). */
static bool fz_trace;
#define FZ_TRACE(...)	do { if (fz_trace) fprintf(stderr, "libfuzz: " __VA_ARGS__); } while (0)

#define FZ_CHECK(cond, ...)	do { if (!(cond)) fz_fail(__VA_ARGS__); } while (0)

/* ---- Input ---- */

struct fz_in {
	const uint8_t *p;
	size_t n;
};

static unsigned fz_u8(struct fz_in *in)
{
	if (!in->n)
		return 0;
	in->n--;
	return *in->p++;
}

static uint64_t fz_uint(struct fz_in *in, unsigned bytes)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < bytes; i++)
		v |= (uint64_t)fz_u8(in) << (8 * i);
	return v;
}

static void fz_bytes(struct fz_in *in, void *dst, size_t n)
{
	size_t k = n < in->n ? n : in->n;

	memcpy(dst, in->p, k);
	memset((char *)dst + k, 0, n - k);
	in->p += k;
	in->n -= k;
}

/* ---- Images ---- */

struct fz_image {
	struct export exp;
	struct export opened;		/* exp as image_open() left it */
	const struct image_ops *real;	/* the backend's table */
	struct image_ops ops;		/* the same, through the checks below */
	uint64_t base_size;
};

static struct fz_image fz_images[FZ_NR_IMAGES];
static char fz_file_path[PATH_MAX];
static const char *fz_blk_path;

static struct fz_image *fz_image_of(struct image *img)
{
	return (struct fz_image *)((char *)img - offsetof(struct export, img) -
				   offsetof(struct fz_image, exp));
}

/* Where the transport's buffers are: an image I/O must stay inside. */
static const char *fz_rd_lo, *fz_rd_hi, *fz_wr_lo, *fz_wr_hi;

static void fz_check_range(const char *what, const void *p, size_t len, const char *lo,
			   const char *hi)
{
	const char *c = p;

	FZ_CHECK(c >= lo && len <= (size_t)(hi - c), "%s: buffer %p+%zu outside [%p, %p)",
		 what, p, len, (const void *)lo, (const void *)hi);
	FZ_CHECK(!fz_poisoned(c, len), "%s: buffer %p+%zu poisoned",
		 what, p, len);
}

/* O_DIRECT I/O must be aligned, or the kernel fails it with EINVAL. */
static void fz_check_direct(const struct image *img, unsigned role, uint64_t buf,
			    uint64_t off, uint64_t len)
{
	if (img->direct && role == IMAGE_FD_MAIN)
		FZ_CHECK(((buf | off | len) & (img->align - 1)) == 0,
			 "O_DIRECT I/O not aligned: buf %#llx off %llu len %llu (align %u)",
			 (unsigned long long)buf, (unsigned long long)off,
			 (unsigned long long)len, img->align);
}

static void fz_check_io(struct image *img, const struct image_io *io)
{
	FZ_CHECK(io->len > 0, "image I/O of 0 bytes");
	FZ_CHECK(!io->write || img->writable, "image write on a read-only export");
	FZ_CHECK(io->off <= (uint64_t)INT64_MAX - io->len, "image I/O past INT64_MAX");
	FZ_CHECK(img->growable || io->off + io->len <= img->size,
		 "image I/O [%llu, +%u) past EOF %llu of a fixed-size export",
		 (unsigned long long)io->off, io->len, (unsigned long long)img->size);
	FZ_CHECK(img->nr_fds == 0 || io->fd_role < img->nr_fds, "fd role %u", io->fd_role);
	if (io->write)
		fz_check_range("image write", io->buf, io->len, fz_wr_lo, fz_wr_hi);
	else
		fz_check_range("image read", io->buf, io->len, fz_rd_lo, fz_rd_hi);
	fz_check_direct(img, io->fd_role, (uintptr_t)io->buf, io->off, io->len);
}

static ssize_t fz_rw(struct image *img, struct image_io *io)
{
	fz_check_io(img, io);
	return fz_image_of(img)->real->rw(img, io);
}

static ssize_t fz_rw_nowait(struct image *img, struct image_io *io)
{
	fz_check_io(img, io);
	return fz_image_of(img)->real->rw_nowait(img, io);
}

/* A growable export preallocates what it is asked (KEEP_SIZE past EOF is
 * not clipped): a quota keeps the host's memory out of reach. */
static int fz_fallocate(struct image *img, int mode, uint64_t off, uint64_t len)
{
	if (off > FZ_GROW_LIMIT || len > FZ_GROW_LIMIT - off)
		return -EFBIG;
	return fz_image_of(img)->real->fallocate(img, mode, off, len);
}

static bool fz_is_file(int v)
{
	return fz_images[v].real == &file_ops;
}

static void fz_image_open(int v, const char *path, bool direct)
{
	struct fz_image *f = &fz_images[v];
	struct image *img = &f->exp.img;
	int err;

	f->exp.dev_fd = -1;
	img->writable = true;		/* O_RDWR; read-only is a flag per input */
	img->direct = direct;
	img->mode = 0600;
	err = image_open(img, path);
	if (err < 0) {
		fprintf(stderr, "libfuzz: open %s%s: %s\n", path, direct ? " (O_DIRECT)" : "",
			strerror(-err));
		exit(2);
	}
	f->real = img->ops;
	f->ops = *img->ops;
	f->ops.rw = fz_rw;
	f->ops.rw_nowait = fz_rw_nowait;
	f->ops.fallocate = fz_fallocate;
	img->ops = &f->ops;
	f->base_size = img->size;
	memcpy(&f->opened, &f->exp, sizeof(f->opened));
}

static void fz_images_open(void)
{
	const char *dir = getenv("UEXPORTD_FUZZ_DIR");
	struct statfs sfs;
	int fd;

	if (!dir)
		dir = statfs("/dev/shm", &sfs) == 0 && sfs.f_type == TMPFS_MAGIC ? "/dev/shm" :
		      getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
	snprintf(fz_file_path, sizeof(fz_file_path), "%s/uexportd-libfuzz.XXXXXX", dir);
	fd = mkstemp(fz_file_path);
	if (fd < 0 || ftruncate(fd, FZ_FILE_SIZE) < 0) {
		perror(fz_file_path);
		exit(2);
	}
	close(fd);
	fz_blk_path = getenv("UEXPORTD_FUZZ_BLKDEV");
	fz_image_open(FZ_NULL, "null:1M", false);
	fz_image_open(FZ_FILE, fz_file_path, false);
	fz_image_open(FZ_FILE_DIRECT, fz_file_path, true);
	fz_image_open(FZ_BLK, fz_blk_path ? fz_blk_path : fz_file_path, false);
	fz_image_open(FZ_BLK_DIRECT, fz_blk_path ? fz_blk_path : fz_file_path, true);
	unlink(fz_file_path);		/* nothing left behind, whatever happens */
	if (fz_blk_path && fz_images[FZ_BLK].real != &blkdev_ops) {
		fprintf(stderr, "libfuzz: %s is not a block device\n", fz_blk_path);
		exit(2);
	}
	if (fz_blk_path && fz_images[FZ_BLK].base_size > (64u << 20)) {
		fprintf(stderr, "libfuzz: %s: more than 64 MiB, not a scratch device?\n",
			fz_blk_path);
		exit(2);
	}
}

/* The state an input starts from: the export as opened (whatever state the
 * daemon keeps there, e.g. for open files), the image's size, contents (all
 * hole) and page cache, and this input's settings. */
static struct image *fz_image_reset(int v, unsigned flags)
{
	struct fz_image *f = &fz_images[v];
	struct image *img = &f->exp.img;
	int fd = img->fds[IMAGE_FD_MAIN];

	/* The open-file table is the one thing the daemon allocates per
	 * input (OPEN): free it, the copy has none. */
	free(f->exp.img.files.slots);
	memcpy(&f->exp, &f->opened, sizeof(f->exp));

	if (fz_is_file(v)) {
		if (ftruncate(fd, 0) < 0 || ftruncate(fd, (off_t)f->base_size) < 0)
			fz_fail("reset %s: %s", fz_file_path, strerror(errno));
	} else if (fd >= 0) {
		/* RWF_NOWAIT succeeds only on cached pages: start uncached. */
		fdatasync(fd);
		posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	}
	img->size = f->base_size;
	img->writable = flags & 1;
	img->growable = (flags & 2) && img->writable && !img->ops->fixed_size;
	img->passthrough = (flags & 4) && img->ops->backing_file && !img->direct &&
			   (!img->writable || img->growable);
	img->allow_chown = flags & 8;
	img->in_memory = flags & 16;
	img->nowait_read_ok = !(flags & 32);
	img->nowait_write_ok = !(flags & 64);
	img->backing_id = img->passthrough ? FZ_BACKING_ID : 0;
	img->mode = img->writable ? 0600 : 0400;
	img->uid = 1000;
	img->gid = 1000;
	img->atime = img->mtime = img->ctime = (struct timespec){ 1700000000, 0 };
	f->exp.stopping = flags & 128;
	return img;
}

/* After every step: what no request may change. */
static void fz_image_check(int v)
{
	struct fz_image *f = &fz_images[v];
	struct image *img = &f->exp.img;
	struct stat st;

	if (!img->growable && !img->passthrough)
		FZ_CHECK(img->size == f->base_size, "fixed-size export changed size: %llu -> %llu",
			 (unsigned long long)f->base_size, (unsigned long long)img->size);
	if (!fz_is_file(v))
		return;
	if (fstat(img->fds[IMAGE_FD_MAIN], &st) < 0)
		fz_fail("fstat: %s", strerror(errno));
	FZ_CHECK((uint64_t)st.st_size == img->size, "file size %lld, export size %llu",
		 (long long)st.st_size, (unsigned long long)img->size);
	/* Nothing may allocate beyond what the export can hold. */
	FZ_CHECK(st.st_blocks * 512 <= (img->growable ? FZ_ALLOC_LIMIT : 2 * FZ_FILE_SIZE),
		 "image allocates %lld bytes", (long long)st.st_blocks * 512);
}

/* ---- Requests and their replies ---- */

/* One request as sent, for checking its reply. */
struct fz_req {
	uint32_t op;
	uint64_t unique;
	bool parsed;			/* the transport's parser accepted it */
	size_t arg_len;			/* as parsed */
	_Alignas(8) uint8_t arg[FUSE_URING_OP_IN_OUT_SZ + 128];
	size_t data_len;
	uint64_t size_before;		/* the export's size when it arrived */
	bool exact;			/* the I/O ran in full, alone: exact counts */
};

/* Reply payload size of a successful request, -1 if it varies (READ),
 * -2 if there is no reply. */
static long fz_reply_size(uint32_t op)
{
	switch (op) {
	case FUSE_GETATTR: case FUSE_SETATTR: return sizeof(struct fuse_attr_out);
	case FUSE_OPEN: return sizeof(struct fuse_open_out);
	case FUSE_WRITE: return sizeof(struct fuse_write_out);
	case FUSE_STATFS: return sizeof(struct fuse_statfs_out);
	case FUSE_LSEEK: return sizeof(struct fuse_lseek_out);
	case FUSE_READ: return -1;
	case FUSE_FORGET: case FUSE_BATCH_FORGET: case FUSE_INTERRUPT: return -2;
	default: return 0;
	}
}

static void fz_check_reply(struct image *img, const struct fz_req *r, int error,
			   const void *payload, size_t len, size_t cap)
{
	const struct fuse_op_desc *o = fuse_opcode(r->op);
	long want = fz_reply_size(r->op);

	FZ_TRACE("  reply op %u unique %llu: error %d, %zu bytes, size %llu\n", r->op,
		 (unsigned long long)r->unique, error, len, (unsigned long long)img->size);
	FZ_CHECK(error <= 0 && error >= -4095, "op %u: error %d", r->op, error);
	FZ_CHECK(!error || !len, "op %u: error %d with %zu bytes", r->op, error, len);
	FZ_CHECK(len <= cap, "op %u: reply of %zu bytes > %zu", r->op, len, cap);
	if (!r->parsed) {
		FZ_CHECK(error == -EINVAL, "op %u: unparsable request answered %d", r->op, error);
		return;
	}
	if (!o || !o->handler) {
		FZ_CHECK(error == -ENOSYS, "op %u: unknown opcode answered %d", r->op, error);
		return;
	}
	if (r->arg_len < o->arg_size) {
		FZ_CHECK(error == -EINVAL, "op %s: short argument (%zu < %zu) answered %d",
			 o->name, r->arg_len, o->arg_size, error);
		return;
	}
	if (r->op == FUSE_INIT)
		FZ_CHECK(error == -EPROTO, "INIT after start-up answered %d", error);
	if (r->op == FUSE_LOOKUP)
		FZ_CHECK(error == -ENOENT, "LOOKUP answered %d", error);
	if (error)
		return;
	if (want >= 0)
		FZ_CHECK(len == (size_t)want, "op %s: reply of %zu bytes, not %ld", o->name, len,
			 want);
	switch (r->op) {
	case FUSE_GETATTR:
	case FUSE_SETATTR: {
		const struct fuse_attr_out *a = payload;

		FZ_CHECK(a->attr.ino == FUSE_ROOT_ID && S_ISREG(a->attr.mode) &&
			 a->attr.size == img->size, "attr: ino %llu mode %o size %llu (export %llu)",
			 (unsigned long long)a->attr.ino, a->attr.mode,
			 (unsigned long long)a->attr.size, (unsigned long long)img->size);
		FZ_CHECK(img->writable || !(a->attr.mode & 0222), "read-only export mode %o",
			 a->attr.mode);
		break;
	}
	case FUSE_OPEN: {
		const struct fuse_open_out *out = payload;
		const struct fuse_open_in *in = (const void *)r->arg;

		FZ_CHECK(img->writable || (in->flags & O_ACCMODE) == O_RDONLY,
			 "read-only export opened with flags %#x", in->flags);
		if (img->passthrough)
			FZ_CHECK((out->open_flags & FOPEN_PASSTHROUGH) &&
				 out->backing_id == FZ_BACKING_ID, "passthrough OPEN: %#x %d",
				 out->open_flags, out->backing_id);
		else
			FZ_CHECK(out->open_flags & FOPEN_DIRECT_IO, "OPEN without DIRECT_IO: %#x",
				 out->open_flags);
		break;
	}
	case FUSE_READ: {
		const struct fuse_read_in *in = (const void *)r->arg;
		uint64_t want_len = 0;

		if (in->offset < r->size_before) {
			want_len = r->size_before - in->offset;
			if (want_len > in->size)
				want_len = in->size;
			if (want_len > cap)
				want_len = cap;
		}
		FZ_CHECK(len <= in->size, "READ of %u answered %zu bytes", in->size, len);
		/* null: reads zeros, whatever the buffer held before. */
		for (size_t k = 0; fz_image_of(img)->real == &null_ops && k < len; k++)
			FZ_CHECK(!((const char *)payload)[k], "null: READ byte %zu of %zu not zero",
				 k, len);
		FZ_CHECK(!r->exact || len == want_len, "READ [%llu, +%u) of %llu: %zu bytes, not %llu",
			 (unsigned long long)in->offset, in->size,
			 (unsigned long long)r->size_before, len, (unsigned long long)want_len);
		break;
	}
	case FUSE_WRITE: {
		const struct fuse_write_in *in = (const void *)r->arg;
		const struct fuse_write_out *out = payload;
		uint64_t want_len = in->size;

		FZ_CHECK(img->writable, "WRITE on a read-only export succeeded");
		if (!img->growable && in->offset + want_len > r->size_before)
			want_len = in->offset < r->size_before ? r->size_before - in->offset : 0;
		FZ_CHECK(out->size <= in->size, "WRITE of %u answered %u", in->size, out->size);
		FZ_CHECK(!r->exact || out->size == want_len, "WRITE [%llu, +%u) of %llu: %u, not %llu",
			 (unsigned long long)in->offset, in->size,
			 (unsigned long long)r->size_before, out->size, (unsigned long long)want_len);
		break;
	}
	case FUSE_LSEEK: {
		const struct fuse_lseek_in *in = (const void *)r->arg;
		const struct fuse_lseek_out *out = payload;

		FZ_CHECK(out->offset >= in->offset && out->offset <= img->size,
			 "LSEEK %u from %llu: %llu (size %llu)", in->whence,
			 (unsigned long long)in->offset, (unsigned long long)out->offset,
			 (unsigned long long)img->size);
		break;
	}
	case FUSE_SETXATTR: case FUSE_FALLOCATE: case FUSE_FSYNC:
		break;
	}
	if (!img->writable)
		FZ_CHECK(r->op != FUSE_FALLOCATE && !(r->op == FUSE_SETATTR &&
			 (((const struct fuse_setattr_in *)(const void *)r->arg)->valid &
			  (FATTR_SIZE | FATTR_ATIME | FATTR_MTIME))),
			 "op %s changed a read-only export", o->name);
}

/* ---- fuse_init() ---- */

struct fz_init_args {
	bool passthrough;
	uint32_t max_payload;
	unsigned max_pages_limit, nr_threads;
};

static void fz_init_check(const struct fuse_init_in *in, const struct fz_init_args *a)
{
	struct fuse_init_out out;
	uint64_t offered = in->flags, granted;
	size_t ps = page_size();
	int err;

	memset(&out, 0xa5, sizeof(out));
	err = fuse_init(in, &out, a->passthrough, a->max_payload, a->max_pages_limit,
			a->nr_threads);
	if (offered & FUSE_INIT_EXT)
		offered |= (uint64_t)in->flags2 << 32;
	FZ_CHECK(out.major == FUSE_KERNEL_VERSION && out.minor == FUSE_KERNEL_MINOR_VERSION,
		 "INIT reply version %u.%u", out.major, out.minor);
	if (in->major != FUSE_KERNEL_VERSION) {
		FZ_CHECK(err == -EPROTO, "INIT major %u: %d", in->major, err);
		return;
	}
	if (a->passthrough && !(offered & FUSE_PASSTHROUGH)) {
		FZ_CHECK(err == -EOPNOTSUPP, "INIT passthrough not offered: %d", err);
		return;
	}
	FZ_CHECK(err == 0, "INIT: %d", err);
	granted = out.flags | (uint64_t)out.flags2 << 32;
	FZ_CHECK((granted & ~offered) == 0, "INIT grants %#llx, offered %#llx",
		 (unsigned long long)granted, (unsigned long long)offered);
	FZ_CHECK(!a->passthrough || ((granted & FUSE_PASSTHROUGH) && out.max_stack_depth == 1),
		 "INIT passthrough: flags %#llx depth %u", (unsigned long long)granted,
		 out.max_stack_depth);
	FZ_CHECK(out.max_pages >= 1 && out.max_write == out.max_pages * ps &&
		 out.max_write <= a->max_payload,
		 "INIT max_pages %u max_write %u (payload %u)", out.max_pages, out.max_write,
		 a->max_payload);
	FZ_CHECK(!(granted & FUSE_MAX_PAGES) || !a->max_pages_limit ||
		 out.max_pages <= a->max_pages_limit, "INIT max_pages %u > limit %u",
		 out.max_pages, a->max_pages_limit);
	FZ_CHECK(out.max_background >= 1 && out.congestion_threshold <= out.max_background,
		 "INIT background %u congestion %u", out.max_background,
		 out.congestion_threshold);
	FZ_CHECK(out.max_readahead == in->max_readahead && out.time_gran == 1,
		 "INIT readahead %u (asked %u), time_gran %u", out.max_readahead,
		 in->max_readahead, out.time_gran);
}

/* The settings an INIT request that reaches a transport is checked with. */
static void fz_init_default(const struct image *img, const struct fz_req *r)
{
	struct fz_init_args a = { img->passthrough, MAX_PAYLOAD, 256, 2 };

	if (r->op == FUSE_INIT && r->arg_len >= sizeof(struct fuse_init_in))
		fz_init_check((const void *)r->arg, &a);
}

static void fz_init_step(struct fz_in *in)
{
	struct fuse_init_in init;
	struct fz_init_args a;
	unsigned p;

	fz_bytes(in, &init, sizeof(init));
	p = fz_u8(in);
	a.passthrough = p & 1;
	/* What memory_plan() can give: MIN_PAYLOAD to MAX_PAYLOAD, by halves. */
	a.max_payload = MAX_PAYLOAD >> ((p >> 1) & 3);
	a.max_pages_limit = (unsigned)fz_uint(in, 2);
	a.nr_threads = (unsigned)fz_uint(in, 2) % CPU_SETSIZE + 1;
	fz_init_check(&init, &a);
}

/* ---- Buffers ---- */

/* A buffer whose last byte ends its allocation (ASan sees any overrun),
 * its start 'lead' bytes before a page boundary (plus 'mis') so that the
 * data after a header of 'lead' bytes is page-aligned, as the daemon lays
 * it out; the bytes before it are poisoned. */
struct fz_buf {
	char *base, *p;
	size_t cap;
};

static void fz_buf_alloc(struct fz_buf *b, size_t lead, size_t cap, size_t mis)
{
	size_t ps = page_size(), front = ps - lead + mis;

	if (posix_memalign((void **)&b->base, ps, front + cap)) {
		perror("posix_memalign");
		exit(2);
	}
	b->p = b->base + front;
	b->cap = cap;
	ASAN_POISON_MEMORY_REGION(b->base, front);
}

/* ---- /dev/fuse transport ---- */

static struct devfuse_worker fz_dev;
static struct fz_buf fz_dev_in[4][2], fz_dev_out[4][2];	/* [max_write][misaligned] */
static int fz_pipe[2];

static void fz_dev_init(void)
{
	size_t hdr_in = sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in);
	size_t hdr_out = sizeof(struct fuse_out_header);

	for (unsigned k = 0; k < 4; k++)
		for (unsigned m = 0; m < 2; m++) {
			size_t in_cap = hdr_in + fz_dev_writes[k];

			if (in_cap < FUSE_MIN_READ_BUFFER)
				in_cap = FUSE_MIN_READ_BUFFER;
			fz_buf_alloc(&fz_dev_in[k][m], hdr_in, in_cap, m * 8);
			fz_buf_alloc(&fz_dev_out[k][m], hdr_out, hdr_out + fz_dev_writes[k], m * 8);
		}
	/* The reply is written whole: the pipe must hold the largest. */
	if (pipe2(fz_pipe, O_CLOEXEC) < 0 ||
	    fcntl(fz_pipe[0], F_SETFL, O_NONBLOCK) < 0 ||
	    fcntl(fz_pipe[1], F_SETPIPE_SZ, 1 << 20) < (int)(hdr_out + FZ_MAX_PAYLOAD)) {
		perror("libfuzz: reply pipe");
		exit(2);
	}
}

static void fz_dev_reset(struct export *exp, unsigned transport)
{
	unsigned k = (transport >> 3) & 3, m = (transport >> 5) & 1;

	fz_dev = (struct devfuse_worker){
		.exp = exp, .cpu = -1, .fd = fz_pipe[1],
		.in = fz_dev_in[k][m].p, .in_cap = fz_dev_in[k][m].cap,
		.out = fz_dev_out[k][m].p, .out_cap = fz_dev_out[k][m].cap,
	};
}

static uint64_t fz_unique;

/* The first bytes of a request: opcode, its fixed argument (arglen bytes
 * from the input), the length of its data (3 bytes) and its fill byte. */
static void fz_read_request(struct fz_in *in, struct fz_req *r, unsigned *flags,
			    size_t arg_max, size_t *datalen, unsigned *fill)
{
	size_t arglen;

	memset(r, 0, sizeof(*r));
	r->op = fz_u8(in);
	*flags = fz_u8(in);
	arglen = fz_u8(in);
	if (arglen > arg_max)
		arglen = arg_max;
	fz_bytes(in, r->arg, arglen);
	r->arg_len = arglen;
	*datalen = (size_t)fz_uint(in, 3);
	*fill = fz_u8(in);
	r->unique = ++fz_unique;
	FZ_TRACE("  request op %u (%s) unique %llu flags %#x arglen %zu datalen %zu\n", r->op,
		 fuse_opcode_name(r->op), (unsigned long long)r->unique, *flags, arglen, *datalen);
	if (fz_trace && r->op == FUSE_WRITE && arglen >= 24)
		FZ_TRACE("  write off %llu size %u\n",
			 (unsigned long long)((struct fuse_write_in *)(void *)r->arg)->offset,
			 ((struct fuse_write_in *)(void *)r->arg)->size);
}

/* A WRITE whose size matches its data, so the data path runs. */
static void fz_fix_write(struct fz_req *r, unsigned flags, size_t datalen)
{
	if (r->op == FUSE_WRITE && (flags & 4) && r->arg_len >= sizeof(struct fuse_write_in))
		((struct fuse_write_in *)(void *)r->arg)->size = (uint32_t)datalen;
}

static void fz_header(struct fuse_in_header *h, const struct fz_req *r, uint32_t len)
{
	*h = (struct fuse_in_header){ .len = len, .opcode = r->op, .unique = r->unique,
				      .nodeid = FUSE_ROOT_ID, .uid = 1000, .gid = 1000,
				      .pid = 4242 };
}

static void fz_dev_step(struct fz_in *in, struct image *img)
{
	static char reply[sizeof(struct fuse_out_header) + FZ_MAX_PAYLOAD + 1];
	struct devfuse_worker *w = &fz_dev;
	struct fuse_in_header *h = (void *)w->in;
	const struct fuse_out_header *out = (const void *)reply;
	size_t hdr = sizeof(*h), datalen, n, got = 0;
	unsigned flags, fill;
	struct fz_req r;
	struct fuse_req req = { 0 };

	fz_read_request(in, &r, &flags, 255, &datalen, &fill);
	if (datalen > w->in_cap - hdr - r.arg_len)
		datalen = w->in_cap - hdr - r.arg_len;
	n = hdr + r.arg_len + datalen;
	fz_fix_write(&r, flags, datalen);
	fz_header(h, &r, (uint32_t)n);
	if (flags & 1)
		h->len = (uint32_t)fz_uint(in, 4);
	memcpy(h + 1, r.arg, r.arg_len);
	memset((char *)(h + 1) + r.arg_len, (int)fill, datalen);

	r.parsed = devfuse_parse(w->in, n, &req) == 0;
	if (r.parsed)		/* the argument may run into the data bytes */
		memcpy(r.arg, req.arg, req.arg_len);
	r.arg_len = req.arg_len;
	r.data_len = req.data_len;
	r.size_before = img->size;
	r.exact = true;
	fz_rd_lo = w->out + sizeof(*out);
	fz_rd_hi = w->out + w->out_cap;
	fz_wr_lo = w->in;
	fz_wr_hi = w->in + n;
	devfuse_serve_one(w, n);

	/* What the daemon wrote to "/dev/fuse": one reply, or none. */
	for (;;) {
		ssize_t k = read(fz_pipe[0], reply + got, sizeof(reply) - got);

		if (k <= 0)
			break;
		got += (size_t)k;
	}
	if (got == 0) {
		FZ_CHECK(r.parsed && fz_reply_size(r.op) == -2, "op %u: no reply", r.op);
		return;
	}
	FZ_CHECK(fz_reply_size(r.op) != -2 || !r.parsed, "op %u: reply to a request without one",
		 r.op);
	FZ_CHECK(got >= sizeof(*out) && out->len == got,
		 "op %u: reply of %zu bytes, header says %u", r.op, got, out->len);
	FZ_CHECK(out->unique == r.unique, "op %u: reply unique %llu, not %llu", r.op,
		 (unsigned long long)out->unique, (unsigned long long)r.unique);
	fz_check_reply(img, &r, out->error, out + 1, got - sizeof(*out),
		       w->out_cap - sizeof(*out));
	fz_init_default(img, &r);
}

/* ---- io_uring transport, with the harness as the kernel ---- */

enum fz_entry_state { FZ_IDLE, FZ_BUSY, FZ_IO, FZ_ENDED };

struct fz_entry {
	enum fz_entry_state state;
	struct fz_req req;
	uint64_t commit_id;
	/* The image I/O in flight (FZ_IO). */
	bool write;
	int fd;
	char *addr;
	uint32_t len;
	uint64_t off;
	int rwf;
	unsigned seq;			/* order of issue */
};

static struct ring_pool fz_pool;
static struct ring_queue fz_q;
static struct ring_entry fz_ents[FZ_DEPTH];
static struct fz_entry fz_st[FZ_DEPTH];
static struct fuse_uring_req_header *fz_hdrs[FZ_DEPTH];
static char *fz_payloads[4][FZ_DEPTH];
static _Atomic unsigned fz_sq_head, fz_sq_tail, fz_sq_flags, fz_cq_head, fz_cq_tail;
static char fz_sqes[FZ_DEPTH * RING_SQE_SIZE];
static struct io_uring_cqe fz_cqes[2 * FZ_DEPTH];
static unsigned fz_sq_seen, fz_seq;
static uint64_t fz_commit_id;

static void fz_ring_init(void)
{
	for (unsigned i = 0; i < FZ_DEPTH; i++) {
		fz_hdrs[i] = malloc(sizeof(*fz_hdrs[i]));
		for (unsigned k = 0; k < 4; k++)
			if (posix_memalign((void **)&fz_payloads[k][i], page_size(),
					   fz_ring_payloads[k]))
				fz_hdrs[i] = NULL;
		if (!fz_hdrs[i]) {
			perror("libfuzz: ring buffers");
			exit(2);
		}
	}
}

/* Pass SQEs the queue wrote to the "kernel": check each, and note what
 * entry it is for. */
static void fz_ring_consume(struct image *img)
{
	size_t cap = fz_pool.payload_size;

	while (fz_sq_seen != fz_q.ring.sq_local_tail) {
		const struct io_uring_sqe *sqe =
			(const void *)(fz_sqes + (fz_sq_seen & fz_q.ring.sq_mask) * RING_SQE_SIZE);
		unsigned i = (unsigned)sqe->user_data;
		struct ring_entry *e = &fz_ents[i];
		struct fz_entry *s = &fz_st[i];

		fz_sq_seen++;
		FZ_CHECK(i < FZ_DEPTH && (sqe->flags & IOSQE_FIXED_FILE),
			 "SQE user_data %#llx flags %#x", (unsigned long long)sqe->user_data,
			 sqe->flags);
		if (!(sqe->user_data & UD_IMAGE_IO)) {
			const struct fuse_uring_cmd_req *cmd = (const void *)sqe->cmd;

			FZ_CHECK(sqe->opcode == IORING_OP_URING_CMD && sqe->fd == FIXED_FUSE &&
				 cmd->qid == 0, "FUSE command SQE: opcode %u fd %d qid %u",
				 sqe->opcode, sqe->fd, cmd->qid);
			if (sqe->cmd_op == FUSE_IO_URING_CMD_REGISTER) {
				FZ_CHECK(e->registering && sqe->addr == (uintptr_t)e->iov &&
					 sqe->len == 2, "REGISTER SQE for entry %u", i);
				continue;
			}
			FZ_CHECK(sqe->cmd_op == FUSE_IO_URING_CMD_COMMIT_AND_FETCH &&
				 cmd->commit_id == s->commit_id && !e->registering,
				 "entry %u: COMMIT op %u commit_id %llu, not %llu", i, sqe->cmd_op,
				 (unsigned long long)cmd->commit_id,
				 (unsigned long long)s->commit_id);
			if (s->state == FZ_IDLE)
				continue;	/* resubmitted after EAGAIN */
			FZ_CHECK(s->state == FZ_BUSY, "entry %u: commit in state %d", i, s->state);
			{
				const struct fuse_out_header *out = (const void *)e->hdr->in_out;
				uint32_t psz = e->hdr->ring_ent_in_out.payload_sz;

				FZ_CHECK(out->len == sizeof(*out) + psz && psz <= cap,
					 "entry %u: out len %u, payload_sz %u (cap %zu)", i, out->len,
					 psz, cap);
				FZ_CHECK(out->unique == s->req.unique, "entry %u: unique %llu, not %llu",
					 i, (unsigned long long)out->unique,
					 (unsigned long long)s->req.unique);
				if (fz_reply_size(s->req.op) != -2 || !s->req.parsed)
					fz_check_reply(img, &s->req, out->error, e->payload, psz, cap);
				fz_init_default(img, &s->req);
			}
			s->state = FZ_IDLE;
			continue;
		}
		FZ_CHECK(s->state == FZ_BUSY, "entry %u: image I/O in state %d", i, s->state);
		FZ_CHECK(sqe->opcode == IORING_OP_READ || sqe->opcode == IORING_OP_WRITE,
			 "image SQE opcode %u", sqe->opcode);
		s->write = sqe->opcode == IORING_OP_WRITE;
		FZ_CHECK(!s->write || img->writable, "ring write on a read-only export");
		FZ_CHECK(sqe->fd >= FIXED_IMAGE(0) && sqe->fd < FIXED_IMAGE((int)img->nr_fds),
			 "image SQE fixed file %d of %u", sqe->fd, img->nr_fds);
		FZ_CHECK(sqe->rw_flags == 0 || sqe->rw_flags == RWF_DSYNC ||
			 sqe->rw_flags == RWF_SYNC, "image SQE rw_flags %#x", sqe->rw_flags);
		FZ_CHECK(sqe->len > 0 && sqe->off <= (uint64_t)INT64_MAX - sqe->len,
			 "image SQE off %llu len %u", (unsigned long long)sqe->off, sqe->len);
		FZ_CHECK(img->growable || sqe->off + sqe->len <= img->size,
			 "image SQE [%llu, +%u) past EOF %llu", (unsigned long long)sqe->off,
			 sqe->len, (unsigned long long)img->size);
		s->addr = (char *)(uintptr_t)sqe->addr;
		s->len = sqe->len;
		s->off = sqe->off;
		s->rwf = (int)sqe->rw_flags;
		s->fd = img->fds[sqe->fd - FIXED_IMAGE(0)];
		fz_check_range("ring image I/O", s->addr, s->len, e->payload,
			       (char *)e->payload + cap);
		fz_check_direct(img, (unsigned)(sqe->fd - FIXED_IMAGE(0)), sqe->addr, sqe->off,
				sqe->len);
		s->seq = ++fz_seq;
		s->state = FZ_IO;
		FZ_TRACE("  entry %u: ring %s [%llu, +%u) role %d\n", i, s->write ? "write" : "read",
			 (unsigned long long)s->off, s->len, sqe->fd - FIXED_IMAGE(0));
	}
	atomic_store(&fz_sq_head, fz_sq_seen);
}

/* Post one CQE and let the queue reap it. */
static void fz_ring_cqe(struct image *img, uint64_t user_data, int res)
{
	unsigned tail = atomic_load(&fz_cq_tail);

	fz_cqes[tail & fz_q.ring.cq_mask] = (struct io_uring_cqe){ .user_data = user_data,
								     .res = res };
	atomic_store(&fz_cq_tail, tail + 1);
	FZ_CHECK(ring_queue_reap(&fz_q) == 1 && atomic_load(&fz_cq_head) == tail + 1,
		 "ring_queue_reap did not take the CQE");
	fz_ring_consume(img);
}

static void fz_ring_check_live(void)
{
	unsigned live = 0;

	for (unsigned i = 0; i < FZ_DEPTH; i++)
		live += fz_st[i].state != FZ_ENDED;
	FZ_CHECK(fz_q.live == live, "queue live %u, entries not ended %u", fz_q.live, live);
}

static const int fz_io_errors[8] = {
	-EIO, -ENOSPC, -EAGAIN, -EINTR, -EFBIG, -ECANCELED, -EINVAL, -EOPNOTSUPP,
};

/* Complete entry i's image I/O as iomode says: in full, short, failed or
 * with 0 bytes (the I/O really runs for the bytes it reports). */
static void fz_ring_complete(struct image *img, unsigned i, unsigned mode)
{
	struct fz_entry *s = &fz_st[i];
	uint32_t len = s->len;
	int res;

	/* A write of len > 0 moves at least a byte or fails: 0 is EOF, reads only. */
	if ((mode & 3) == 3 && s->write)
		mode = 2 | (1 << 3);		/* -ENOSPC */
	switch (mode & 3) {
	case 1:
		len = (uint32_t)((uint64_t)s->len * (mode >> 3) / 32);
		if (s->write && len == 0)
			len = 1;
		break;
	case 2:
	case 3:
		len = 0;
		break;
	}
	res = 0;
	if (len) {
		struct iovec iov = { s->addr, len };
		long n = syscall(s->write ? SYS_pwritev2 : SYS_preadv2, s->fd, &iov, 1,
				 (long)s->off, 0L, s->rwf);

		res = n < 0 ? -errno : (int)n;
	}
	if ((mode & 3) == 2)
		res = fz_io_errors[(mode >> 3) & 7];
	FZ_TRACE("  entry %u: %s [%llu, +%u) completes with %d\n", i, s->write ? "write" : "read",
		 (unsigned long long)s->off, s->len, res);
	s->state = FZ_BUSY;
	if ((mode & 3) != 0 || len != s->len)
		s->req.exact = false;
	fz_ring_cqe(img, UD_IMAGE_IO | i, res);
	FZ_CHECK(s->state == FZ_IDLE, "entry %u: no commit after its I/O (state %d)", i,
		 s->state);
}

/* The entry with I/O in flight issued first (oldest) or last. */
static int fz_ring_pending(bool newest)
{
	int best = -1;

	for (unsigned i = 0; i < FZ_DEPTH; i++)
		if (fz_st[i].state == FZ_IO &&
		    (best < 0 || (fz_st[i].seq < fz_st[best].seq) != newest))
			best = (int)i;
	return best;
}

static void fz_ring_reset(struct export *exp, unsigned transport)
{
	unsigned k = transport & 3;

	fz_pool = (struct ring_pool){ .exp = exp, .queues = &fz_q, .nr_queues = 1,
				      .depth = FZ_DEPTH, .payload_size = fz_ring_payloads[k],
				      .offload = transport & 4 };
	fz_q = (struct ring_queue){ .pool = &fz_pool, .qid = 0, .cpu = -1, .live = FZ_DEPTH };
	fz_q.ring = (struct ring){
		.fd = -1, .flags = IORING_SETUP_SQE128, .sq_entries = FZ_DEPTH,
		.sq_mask = FZ_DEPTH - 1, .cq_mask = 2 * FZ_DEPTH - 1,
		.sq_head = &fz_sq_head, .sq_tail = &fz_sq_tail, .sq_flags = &fz_sq_flags,
		.cq_head = &fz_cq_head, .cq_tail = &fz_cq_tail, .cqes = fz_cqes,
		.sqes = fz_sqes,
	};
	fz_q.ents = fz_ents;
	fz_sq_head = fz_sq_tail = fz_cq_head = fz_cq_tail = 0;
	fz_sq_seen = fz_seq = 0;
	for (unsigned i = 0; i < FZ_DEPTH; i++) {
		struct ring_entry *e = &fz_ents[i];

		*e = (struct ring_entry){ .hdr = fz_hdrs[i], .payload = fz_payloads[k][i] };
		e->iov[0] = (struct iovec){ e->hdr, sizeof(*e->hdr) };
		e->iov[1] = (struct iovec){ e->payload, fz_pool.payload_size };
		memset(e->hdr, 0, sizeof(*e->hdr));
		fz_st[i] = (struct fz_entry){ .state = FZ_IDLE };
	}
	if (transport & 64) {		/* as ring_queue_register() starts */
		for (unsigned i = 0; i < FZ_DEPTH; i++) {
			fz_ents[i].registering = true;
			ring_queue_fuse_cmd(&fz_q, i);
		}
		fz_ring_consume(&exp->img);
	}
}

static void fz_ring_step(struct fz_in *in, struct image *img)
{
	size_t cap = fz_pool.payload_size, hdr = sizeof(struct fuse_in_header), datalen;
	unsigned flags, fill, i, mode;
	struct fz_req r;
	struct fuse_req req = { 0 };
	struct ring_entry *e;
	struct fz_entry *s;
	uint32_t psz;
	int pending;

	fz_read_request(in, &r, &flags, FUSE_URING_OP_IN_OUT_SZ, &datalen, &fill);
	i = fz_u8(in) % FZ_DEPTH;
	mode = fz_u8(in);
	if (datalen > cap)
		datalen = cap;
	fz_fix_write(&r, flags, datalen);
	/* The kernel delivers only into a parked entry: make room. */
	for (unsigned k = 0; k < FZ_DEPTH && fz_st[i].state != FZ_IDLE; k++)
		i = (i + 1) % FZ_DEPTH;
	if (fz_st[i].state != FZ_IDLE) {
		if ((pending = fz_ring_pending(false)) < 0)
			return;		/* every entry ended */
		fz_ring_complete(img, (unsigned)pending, 0);
		i = (unsigned)pending;
	}
	e = &fz_ents[i];
	s = &fz_st[i];
	fz_header((void *)e->hdr->in_out, &r, (uint32_t)(hdr + r.arg_len + datalen));
	if (flags & 1)
		((struct fuse_in_header *)(void *)e->hdr->in_out)->len = (uint32_t)fz_uint(in, 4);
	psz = (uint32_t)datalen;
	if (flags & 2)
		psz = (uint32_t)fz_uint(in, 4);
	memcpy(e->hdr->op_in, r.arg, r.arg_len);
	memset(e->payload, (int)fill, datalen);
	e->hdr->ring_ent_in_out.payload_sz = psz;
	e->hdr->ring_ent_in_out.commit_id = s->commit_id = ++fz_commit_id;

	r.parsed = ring_queue_parse(e, cap, &req) == 0;
	if (r.parsed) {
		memcpy(r.arg, req.arg, req.arg_len);	/* op_in holds older bytes too */
		r.arg_len = req.arg_len;
	}
	r.data_len = req.data_len;
	r.size_before = img->size;
	r.exact = true;
	s->req = r;
	s->state = FZ_BUSY;
	fz_rd_lo = fz_wr_lo = e->payload;
	fz_rd_hi = fz_wr_hi = (char *)e->payload + cap;
	fz_ring_cqe(img, i, 0);
	FZ_CHECK(s->state == FZ_IDLE || s->state == FZ_IO, "entry %u: no SQE for its request", i);
	if (s->state == FZ_IO) {
		s->req.exact = !(mode & 4);
		if (!(mode & 4))
			fz_ring_complete(img, i, mode);
	}
}

/* sub bits 0-1: 0 complete the oldest I/O in flight, 1 the newest (the next
 * byte is its iomode); 2 fail entry (next byte % depth)'s parked FUSE
 * command with errno (sub >> 2) % 8; 3 nothing. */
static void fz_ring_event(struct fz_in *in, struct image *img)
{
	static const int errs[8] = {
		-EAGAIN, -EINTR, -ENOTCONN, -ECANCELED, -ENODEV, -EAGAIN, -ENOTCONN, -EIO,
	};
	unsigned sub = fz_u8(in), arg = fz_u8(in);
	int pending;

	switch (sub & 3) {
	case 0:
	case 1:
		if ((pending = fz_ring_pending(sub & 1)) >= 0)
			fz_ring_complete(img, (unsigned)pending, arg & ~4u);
		break;
	case 2: {
		unsigned i = arg % FZ_DEPTH, seen = fz_sq_seen;
		int res = errs[(sub >> 2) & 7];

		if (fz_st[i].state != FZ_IDLE)
			break;
		fz_ring_cqe(img, i, res);
		if (res == -EAGAIN || res == -EINTR)
			FZ_CHECK(fz_sq_seen == seen + 1, "entry %u: not resubmitted after %d", i, res);
		else
			fz_st[i].state = FZ_ENDED;
		break;
	}
	}
}

/* ---- One input ---- */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
static void fz_write_seeds(const char *dir);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	signal(SIGPIPE, SIG_IGN);
	fz_trace = getenv("UEXPORTD_FUZZ_TRACE") != NULL;
	fz_images_open();
	fz_dev_init();
	fz_ring_init();
	if (getenv("UEXPORTD_FUZZ_SEEDS")) {
		fz_write_seeds(getenv("UEXPORTD_FUZZ_SEEDS"));
		exit(0);
	}
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz_in in = { data, size };
	int v = (int)(fz_u8(&in) % FZ_NR_IMAGES);
	unsigned flags = fz_u8(&in), transport = fz_u8(&in);
	struct image *img = fz_image_reset(v, flags);
	int pending;

	fz_dev_reset(&fz_images[v].exp, transport);
	fz_ring_reset(&fz_images[v].exp, transport);
	FZ_TRACE("input: image %d flags %#x transport %#x: writable %d growable %d "
		 "passthrough %d direct %d\n", v, flags, transport, img->writable, img->growable,
		 img->passthrough, img->direct);
	for (unsigned step = 0; step < FZ_MAX_STEPS && in.n > 0; step++) {
		unsigned kind = fz_u8(&in) & 3;

		FZ_TRACE("step %u: %s\n", step, (const char *[]){ "dev", "ring", "event", "init" }[kind]);
		switch (kind) {
		case 0: fz_dev_step(&in, img); break;
		case 1: fz_ring_step(&in, img); break;
		case 2: fz_ring_event(&in, img); break;
		case 3: fz_init_step(&in); break;
		}
		fz_ring_check_live();
		fz_image_check(v);
	}
	/* The kernel completes what is in flight before the input ends. */
	while ((pending = fz_ring_pending(false)) >= 0) {
		fz_ring_complete(img, (unsigned)pending, 0);
		fz_image_check(v);
	}
	return 0;
}

/* ---- Seed corpus ---- */

struct fz_seed {
	uint8_t b[1024];
	size_t n;
};

static void fz_put(struct fz_seed *s, uint64_t v, unsigned bytes)
{
	for (unsigned i = 0; i < bytes && s->n < sizeof(s->b); i++)
		s->b[s->n++] = (uint8_t)(v >> (8 * i));
}

static void fz_put_bytes(struct fz_seed *s, const void *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		fz_put(s, ((const uint8_t *)p)[i], 1);
}

/* A well-formed fixed argument for op, and data to go with it. */
static size_t fz_seed_arg(uint32_t op, uint8_t *arg, size_t *datalen)
{
	size_t len = fuse_arg_size(op);

	memset(arg, 0, 128);
	*datalen = 0;
	switch (op) {
	case FUSE_LOOKUP:
		memcpy(arg, "name", 5);
		return 5;
	case FUSE_FORGET:
	case FUSE_BATCH_FORGET:
		arg[0] = 1;
		return 8;
	case FUSE_SETATTR: {
		struct fuse_setattr_in *in = (void *)arg;

		in->valid = FATTR_MODE | FATTR_MTIME;
		in->mode = 0644;
		in->mtime = 1700000000;
		break;
	}
	case FUSE_OPEN:
		((struct fuse_open_in *)(void *)arg)->flags = O_RDWR;
		break;
	case FUSE_READ: {
		struct fuse_read_in *in = (void *)arg;

		in->offset = 4096;
		in->size = 4096;
		break;
	}
	case FUSE_WRITE: {
		struct fuse_write_in *in = (void *)arg;

		in->offset = 8192;
		in->size = 4096;
		*datalen = 4096;
		break;
	}
	case FUSE_FSYNC:
		((struct fuse_fsync_in *)(void *)arg)->fsync_flags = FUSE_FSYNC_FDATASYNC;
		break;
	case FUSE_INIT: {
		struct fuse_init_in *in = (void *)arg;

		in->major = FUSE_KERNEL_VERSION;
		in->minor = FUSE_KERNEL_MINOR_VERSION;
		in->max_readahead = 128 << 10;
		in->flags = (uint32_t)(FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO |
				       FUSE_MAX_PAGES | FUSE_INIT_EXT);
		in->flags2 = (uint32_t)((FUSE_DIRECT_IO_ALLOW_MMAP | FUSE_PASSTHROUGH |
					 FUSE_OVER_IO_URING) >> 32);
		break;
	}
	case FUSE_ACCESS:
		((struct fuse_access_in *)(void *)arg)->mask = R_OK | W_OK;
		break;
	case FUSE_FALLOCATE: {
		struct fuse_fallocate_in *in = (void *)arg;

		in->offset = 4096;
		in->length = 8192;
		in->mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
		break;
	}
	case FUSE_LSEEK: {
		struct fuse_lseek_in *in = (void *)arg;

		in->offset = 0;
		in->whence = SEEK_DATA;
		break;
	}
	}
	return len;
}

/* One request step: kind 0 (/dev/fuse) or 1 (ring). */
static void fz_seed_request(struct fz_seed *s, unsigned kind, uint32_t op, unsigned iomode)
{
	uint8_t arg[128];
	size_t datalen, arglen = fz_seed_arg(op, arg, &datalen);

	fz_put(s, kind, 1);
	fz_put(s, op, 1);
	fz_put(s, 4, 1);		/* WRITE size = data length */
	fz_put(s, arglen, 1);
	fz_put_bytes(s, arg, arglen);
	fz_put(s, datalen, 3);
	fz_put(s, 0xab, 1);
	if (kind == 1) {
		fz_put(s, 0, 1);	/* entry */
		fz_put(s, iomode, 1);
	}
}

static void fz_seed_write(const char *dir, const char *name, const struct fz_seed *s)
{
	char path[PATH_MAX];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "w");
	if (!f || fwrite(s->b, 1, s->n, f) != s->n || fclose(f) != 0) {
		perror(path);
		exit(2);
	}
}

static void fz_seed_config(struct fz_seed *s, unsigned image, unsigned flags, unsigned transport)
{
	s->n = 0;
	fz_put(s, image, 1);
	fz_put(s, flags, 1);
	fz_put(s, transport, 1);
}

static void fz_write_seeds(const char *dir)
{
	struct fz_seed s;
	char name[64];

	if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
		perror(dir);
		exit(2);
	}
	/* Every opcode the table names, in both framings, on a writable file. */
	for (uint32_t op = 0; op < FUSE_NR_OPCODES; op++) {
		if (!fuse_opcode(op))
			continue;
		for (unsigned kind = 0; kind < 2; kind++) {
			fz_seed_config(&s, FZ_FILE, 1, 1 << 3);
			fz_seed_request(&s, kind, op, 0);
			snprintf(name, sizeof(name), "%s-%s", kind ? "ring" : "dev",
				 fuse_opcode_name(op));
			fz_seed_write(dir, name, &s);
		}
	}
	/* fuse_init() with the daemon's settings: 1 MiB payload, 256 pages. */
	{
		uint8_t arg[128];
		size_t datalen;

		fz_seed_config(&s, FZ_FILE, 1, 0);
		fz_put(&s, 3, 1);
		fz_seed_arg(FUSE_INIT, arg, &datalen);
		fz_put_bytes(&s, arg, sizeof(struct fuse_init_in));
		fz_put(&s, 0, 1);
		fz_put(&s, 256, 2);
		fz_put(&s, 2, 2);
		fz_seed_write(dir, "init", &s);
	}
	/* Writes then reads through both transports on every image. */
	static const char *const image_names[FZ_NR_IMAGES] = {
		"null", "file", "file-direct", "blkdev", "blkdev-direct",
	};
	for (unsigned v = 0; v < FZ_NR_IMAGES; v++) {
		fz_seed_config(&s, v, 1, 2 | 4 | (1 << 3));
		fz_seed_request(&s, 0, FUSE_WRITE, 0);
		fz_seed_request(&s, 1, FUSE_WRITE, 4);		/* left in flight */
		fz_seed_request(&s, 1, FUSE_READ, 1 | (16 << 3));	/* short */
		fz_put(&s, 2, 1);			/* complete the write */
		fz_put(&s, 0, 1);
		fz_put(&s, 0, 1);
		fz_seed_request(&s, 0, FUSE_READ, 0);
		snprintf(name, sizeof(name), "io-%s", image_names[v]);
		fz_seed_write(dir, name, &s);
	}
	/* Growable and passthrough exports. */
	fz_seed_config(&s, FZ_FILE, 1 | 2 | 4, 2);
	fz_seed_request(&s, 0, FUSE_OPEN, 0);
	fz_seed_request(&s, 1, FUSE_WRITE, 0);
	fz_seed_request(&s, 0, FUSE_GETATTR, 0);
	fz_seed_write(dir, "growable-passthrough", &s);
	/* Entries that REGISTER first, then a failed command. */
	fz_seed_config(&s, FZ_NULL, 0, 64);
	fz_seed_request(&s, 1, FUSE_GETATTR, 0);
	fz_put(&s, 2 | (2 << 2), 1);
	fz_put(&s, 1, 1);
	fz_seed_write(dir, "register", &s);
}
