/*
 * nullfloor: the smallest FUSE-over-io_uring server there can be, for
 * `make bench` to measure the transport's own floor beside uexportd.
 *
 *   nullfloor MOUNTPOINT [DEPTH]     (root; MOUNTPOINT an existing file)
 *
 * It exports a 1 GiB file whose READs are answered from whatever the
 * entry's buffer holds and whose WRITEs are dropped: no storage work, no
 * checks beyond what it needs to run, one pinned thread and ring per CPU,
 * DEPTH (default 16) entries of 1 MiB each.  It is written apart from
 * uexportd.c on purpose, so that the floor does not inherit uexportd's
 * choices.  SIGTERM unmounts it; it exits when the kernel ends the
 * connection.  Not a model for anything but a measurement.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/io_uring.h>
#include "../fuse_kernel.h"

#define PAYLOAD		(1u << 20)
#define FILE_SIZE	(1ull << 30)
#define SQE_SIZE	128		/* IORING_SETUP_SQE128 */

struct entry {
	struct fuse_uring_req_header hdr;
	struct iovec iov[2];		/* header, payload: read by REGISTER */
};

struct queue {
	unsigned qid;
	int ring_fd;
	_Atomic unsigned *sq_tail, *cq_head, *cq_tail;
	unsigned sq_mask, cq_mask, sq_local;
	struct io_uring_cqe *cqes;
	char *sqes;
	struct entry *ents;
};

static int fuse_fd;
static unsigned depth = 16;
static const char *mountpoint;
static volatile sig_atomic_t mounted;	/* ours to detach on SIGTERM or a fatal error */

/* Fatal: leave no dead mount behind. */
static void die(const char *what)
{
	fprintf(stderr, "nullfloor: %s: %s\n", what, strerror(errno));
	if (mounted)
		umount2(mountpoint, MNT_DETACH);
	exit(1);
}

/* ---- replies, the same for both transports ---- */

static uint32_t answer(const struct fuse_in_header *in, const void *arg, void *out, int *err)
{
	*err = 0;
	switch (in->opcode) {
	case FUSE_GETATTR: {
		struct fuse_attr_out *a = memset(out, 0, sizeof(struct fuse_attr_out));

		a->attr.ino = 1;
		a->attr.mode = 0100644;
		a->attr.nlink = 1;
		a->attr.size = FILE_SIZE;
		return sizeof(*a);
	}
	case FUSE_OPEN: {
		struct fuse_open_out *o = memset(out, 0, sizeof(struct fuse_open_out));

		o->open_flags = FOPEN_DIRECT_IO;
		return sizeof(*o);
	}
	case FUSE_READ:
		return ((const struct fuse_read_in *)arg)->size;
	case FUSE_WRITE: {
		struct fuse_write_out *o = memset(out, 0, sizeof(struct fuse_write_out));

		o->size = ((const struct fuse_write_in *)arg)->size;
		return sizeof(*o);
	}
	case FUSE_FLUSH:
	case FUSE_RELEASE:
	case FUSE_FSYNC:
		return 0;
	default:
		*err = -ENOSYS;
		return 0;
	}
}

/* ---- one io_uring queue per CPU ---- */

static void queue_cmd(struct queue *q, unsigned i, unsigned op)
{
	struct io_uring_sqe *sqe = (void *)(q->sqes + (size_t)(q->sq_local++ & q->sq_mask) * SQE_SIZE);
	struct fuse_uring_cmd_req *cmd = (void *)sqe->cmd;

	memset(sqe, 0, SQE_SIZE);
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->flags = IOSQE_FIXED_FILE;
	sqe->fd = 0;			/* /dev/fuse, registered */
	sqe->user_data = i;
	sqe->cmd_op = op;
	cmd->qid = (uint16_t)q->qid;
	if (op == FUSE_IO_URING_CMD_REGISTER) {
		sqe->addr = (uintptr_t)q->ents[i].iov;
		sqe->len = 2;
	} else {
		cmd->commit_id = q->ents[i].hdr.ring_ent_in_out.commit_id;
	}
}

static int queue_enter(struct queue *q, unsigned wait)
{
	unsigned n = q->sq_local - *q->sq_tail;

	__atomic_store_n(q->sq_tail, q->sq_local, __ATOMIC_RELEASE);
	return (int)syscall(__NR_io_uring_enter, q->ring_fd, n, wait,
			    wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
}

static void queue_setup(struct queue *q)
{
	struct io_uring_params p = {
		.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE |
			 IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
		.cq_entries = 2 * depth,
	};
	size_t len;
	char *map;

	q->ring_fd = (int)syscall(__NR_io_uring_setup, depth, &p);
	if (q->ring_fd < 0)
		die("io_uring_setup");
	if (syscall(__NR_io_uring_register, q->ring_fd, IORING_REGISTER_FILES, &fuse_fd, 1) < 0)
		die("IORING_REGISTER_FILES");
	len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	if (len < p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe))
		len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
		   q->ring_fd, IORING_OFF_SQ_RING);
	q->sqes = mmap(NULL, p.sq_entries * SQE_SIZE, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_POPULATE, q->ring_fd, IORING_OFF_SQES);
	if (map == MAP_FAILED || q->sqes == MAP_FAILED)
		die("mmap ring");
	q->sq_tail = (void *)(map + p.sq_off.tail);
	q->sq_mask = *(unsigned *)(map + p.sq_off.ring_mask);
	q->cq_head = (void *)(map + p.cq_off.head);
	q->cq_tail = (void *)(map + p.cq_off.tail);
	q->cq_mask = *(unsigned *)(map + p.cq_off.ring_mask);
	q->cqes = (void *)(map + p.cq_off.cqes);
	for (unsigned i = 0; i < p.sq_entries; i++)
		((unsigned *)(map + p.sq_off.array))[i] = i;
	q->ents = calloc(depth, sizeof(*q->ents));
	if (!q->ents)
		die("calloc");
	for (unsigned i = 0; i < depth; i++) {
		struct entry *e = &q->ents[i];
		void *payload = mmap(NULL, PAYLOAD, PROT_READ | PROT_WRITE,
				     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (payload == MAP_FAILED)
			die("mmap payload");
		memset(payload, 0, PAYLOAD);	/* real pages, not the zero page */
		e->iov[0] = (struct iovec){ &e->hdr, sizeof(e->hdr) };
		e->iov[1] = (struct iovec){ payload, PAYLOAD };
	}
}

/* Answer one CQE; false once the kernel has ended the connection. */
static bool queue_complete(struct queue *q, const struct io_uring_cqe *cqe)
{
	unsigned i = (unsigned)cqe->user_data;
	struct entry *e = &q->ents[i];
	const struct fuse_in_header *in = (const void *)e->hdr.in_out;
	struct fuse_out_header out;
	uint32_t n;
	int err;

	if (cqe->res == -EAGAIN) {		/* REGISTER before INIT was done */
		queue_cmd(q, i, FUSE_IO_URING_CMD_REGISTER);
		return true;
	}
	if (cqe->res == -ENOTCONN || cqe->res == -ENODEV || cqe->res == -ECANCELED)
		return false;			/* unmounted */
	if (cqe->res < 0) {
		errno = -cqe->res;
		die("FUSE io_uring command (is enable_uring on?)");
	}
	n = answer(in, e->hdr.op_in, e->iov[1].iov_base, &err);
	out = (struct fuse_out_header){ .len = (uint32_t)sizeof(out) + n, .error = err,
					.unique = in->unique };
	e->hdr.ring_ent_in_out.payload_sz = n;
	memcpy(e->hdr.in_out, &out, sizeof(out));
	queue_cmd(q, i, FUSE_IO_URING_CMD_COMMIT_AND_FETCH);
	return true;
}

static void *queue_main(void *arg)
{
	struct queue *q = arg;
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(q->qid, &set);
	sched_setaffinity(0, sizeof(set), &set);
	queue_setup(q);
	for (unsigned i = 0; i < depth; i++)
		queue_cmd(q, i, FUSE_IO_URING_CMD_REGISTER);
	for (;;) {
		unsigned head, tail;

		if (queue_enter(q, 1) < 0 && errno != EINTR)
			die("io_uring_enter");
		head = *q->cq_head;
		tail = __atomic_load_n(q->cq_tail, __ATOMIC_ACQUIRE);
		for (; head != tail; head++)
			if (!queue_complete(q, &q->cqes[head & q->cq_mask]))
				exit(0);
		__atomic_store_n(q->cq_head, head, __ATOMIC_RELEASE);
	}
	return NULL;
}

/* ---- /dev/fuse: INIT, and whatever comes before the rings are up ---- */

static void start_queues(void)
{
	long n = sysconf(_SC_NPROCESSORS_CONF);	/* the kernel's queue count */

	for (long k = 0; k < n; k++) {
		struct queue *q = calloc(1, sizeof(*q));
		pthread_t t;

		if (!q)
			die("calloc");
		q->qid = (unsigned)k;
		if (pthread_create(&t, NULL, queue_main, q))
			die("pthread_create");
	}
}

static uint32_t answer_init(void *out)
{
	struct fuse_init_out *o = memset(out, 0, sizeof(struct fuse_init_out));
	uint64_t flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES |
			 FUSE_INIT_EXT | FUSE_OVER_IO_URING;

	o->major = FUSE_KERNEL_VERSION;
	o->minor = FUSE_KERNEL_MINOR_VERSION;
	o->flags = (uint32_t)flags;
	o->flags2 = (uint32_t)(flags >> 32);
	o->max_write = PAYLOAD;
	o->max_pages = PAYLOAD / 4096;
	o->max_background = 4096;		/* async direct I/O would stall at 12 */
	o->congestion_threshold = 3072;
	o->time_gran = 1;
	return sizeof(*o);
}

static void on_sigterm(int sig)
{
	(void)sig;
	if (mounted)
		umount2(mountpoint, MNT_DETACH);
	else
		_exit(1);
}

int main(int argc, char **argv)
{
	static char in_buf[PAYLOAD + 4096], out_buf[4096];
	char opts[128];

	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: nullfloor MOUNTPOINT [DEPTH]\n");
		return 2;
	}
	mountpoint = argv[1];
	if (argc == 3)
		depth = (unsigned)atoi(argv[2]);
	signal(SIGTERM, on_sigterm);
	fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	if (fuse_fd < 0)
		die("/dev/fuse");
	snprintf(opts, sizeof(opts), "fd=%d,rootmode=100000,user_id=0,group_id=0", fuse_fd);
	if (mount("nullfloor", mountpoint, "fuse.nullfloor", MS_NOSUID | MS_NODEV, opts) < 0)
		die(mountpoint);
	mounted = 1;
	for (;;) {
		ssize_t r = read(fuse_fd, in_buf, sizeof(in_buf));
		const struct fuse_in_header *in = (const void *)in_buf;
		struct fuse_out_header *out = (void *)out_buf;
		uint32_t n;
		int err = 0;

		if (r < 0 && errno == EINTR)
			continue;
		if (r < (ssize_t)sizeof(*in))
			return 0;		/* ENODEV: unmounted */
		if (in->opcode == FUSE_FORGET || in->opcode == FUSE_BATCH_FORGET)
			continue;
		n = in->opcode == FUSE_INIT ? answer_init(out + 1)
					    : answer(in, in + 1, out + 1, &err);
		*out = (struct fuse_out_header){ .len = (uint32_t)sizeof(*out) + n, .error = err,
						 .unique = in->unique };
		if (write(fuse_fd, out, out->len) < 0 && errno != ENOENT)
			die("write /dev/fuse");
		if (in->opcode == FUSE_INIT)
			start_queues();
	}
}
