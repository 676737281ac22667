// SPDX-License-Identifier: BSD-2-Clause
/*
 * fuzz - feed malformed and random FUSE requests straight to uexportd's
 * request parsers and handlers (built with ASan/UBSan by the Makefile), so
 * anything that reads or writes outside a request or reply buffer, or a
 * reply of the wrong size, fails loudly.
 *
 *   fuzz SEED ITERATIONS IMAGE-PATH
 *
 * The image is exported writable but not growable, so no request can make
 * the test file larger than it starts.
 */
#define main uexportd_main
#include "../uexportd.c"
#undef main

static uint64_t fz_state;

static uint64_t fz_rand(void)
{
	fz_state ^= fz_state << 13;
	fz_state ^= fz_state >> 7;
	fz_state ^= fz_state << 17;
	return fz_state;
}

static struct image img;

/* Opcodes to send: every one the daemon's table lists, and some it does not
 * (a hole in the table, one past it, a large one). */
static uint32_t fz_ops[FUSE_NR_OPCODES + 3];
static unsigned fz_nr_ops;

static void fz_ops_init(void)
{
	for (uint32_t op = 0; op < FUSE_NR_OPCODES; op++)
		if (fuse_opcode(op))
			fz_ops[fz_nr_ops++] = op;
	fz_ops[fz_nr_ops++] = 0;
	fz_ops[fz_nr_ops++] = FUSE_NR_OPCODES;
	fz_ops[fz_nr_ops++] = 9999;
}

/* Handle a parsed request the way a transport does: dispatch, then the
 * image I/O in this thread. */
static void fz_handle(const struct fuse_req *req, struct fuse_reply *rep)
{
	if (fuse_dispatch(&img, req, rep) == FUSE_IMAGE_IO)
		fuse_io_complete(&img, rep, img.ops->rw(&img, &rep->io));
}

/* Random bytes, but argument fields biased towards the interesting values:
 * offsets and sizes around the image size, and small ones. */
static void fz_fill(char *p, size_t n, uint64_t size)
{
	for (size_t i = 0; i + 8 <= n; i += 8) {
		uint64_t v;

		switch (fz_rand() % 6) {
		case 0: v = fz_rand(); break;
		case 1: v = fz_rand() % 4096; break;
		case 2: v = size + fz_rand() % 9000 - 4500; break;
		case 3: v = fz_rand() % (size + 1); break;
		case 4: v = 0; break;
		default: v = (uint64_t)1 << (fz_rand() % 64); break;
		}
		memcpy(p + i, &v, 8);
	}
}

/* One /dev/fuse-framed request of n bytes through devfuse_parse + handler. */
static int fz_one(char *in, size_t n, char *out, size_t out_cap)
{
	struct fuse_in_header *h = (void *)in;
	struct fuse_req req;
	struct fuse_reply rep = { .out = out, .out_cap = out_cap };
	size_t fixed;

	if (devfuse_parse(in, n, &req) < 0)
		return 0;
	fz_handle(&req, &rep);
	fixed = fuse_arg_size(h->opcode);
	if (rep.out_len > out_cap || rep.error > 0 || rep.error < -4095) {
		fprintf(stderr, "op %u: bad reply error=%d len=%zu\n", h->opcode, rep.error,
			rep.out_len);
		return 1;
	}
	/* A request shorter than its opcode's argument must get EINVAL. */
	if (fixed && req.arg_len < fixed && rep.error != -EINVAL) {
		fprintf(stderr, "op %u: short argument (%zu < %zu) answered %d\n",
			h->opcode, req.arg_len, fixed, rep.error);
		return 1;
	}
	return 0;
}

/* The same request as the io_uring transport sees it: header and first
 * argument in the entry header, the rest in the payload buffer. */
static int fz_one_ring(const char *in, size_t n, char *payload, size_t cap)
{
	static struct fuse_uring_req_header hdr;
	struct ring_entry e = { .hdr = &hdr, .payload = payload };
	const struct fuse_in_header *h = (const void *)in;
	size_t body = n - sizeof(*h), arg = body < 128 ? body : fz_rand() % 129;
	struct fuse_req req;
	struct fuse_reply rep = { .out = payload, .out_cap = cap };

	if (arg > body)
		arg = body;
	if (body - arg > cap)
		return 0;
	memcpy(hdr.in_out, h, sizeof(*h));
	memcpy(hdr.op_in, in + sizeof(*h), arg);
	memcpy(payload, in + sizeof(*h) + arg, body - arg);
	hdr.ring_ent_in_out.payload_sz = fz_rand() % 16 ? (uint32_t)(body - arg) : (uint32_t)fz_rand();
	if (ring_queue_parse(&e, cap, &req) < 0)
		return 0;
	if (req.data_len > cap)
		return fprintf(stderr, "ring parse: payload %zu > %zu\n", req.data_len, cap), 1;
	fz_handle(&req, &rep);
	return rep.out_len > cap;
}

int main(int argc, char **argv)
{
	size_t in_cap = 80 + 65536, out_cap = 65536;
	char *in, *out;
	unsigned long iters;
	int failed = 0;
	struct stat st;

	if (argc != 4) {
		fprintf(stderr, "usage: fuzz SEED ITERATIONS IMAGE-PATH\n");
		return 2;
	}
	fz_state = strtoull(argv[1], NULL, 0) * 2654435761u + 1;
	iters = strtoul(argv[2], NULL, 0);
	img.writable = true;
	img.mode = 0600;
	if (image_open(&img, argv[3]) < 0) {
		perror(argv[3]);
		return 2;
	}
	fz_ops_init();
	in = malloc(in_cap);
	out = malloc(out_cap);
	for (unsigned long i = 0; i < iters && !failed; i++) {
		struct fuse_in_header *h = (void *)in;

		/* Truncates shrink the image; give the data paths room again. */
		if (i % 1000 == 0 && ftruncate(img.fds[IMAGE_FD_MAIN], 1 << 20) == 0)
			img.size = 1 << 20;
		size_t n = sizeof(*h) + fz_rand() % (fz_rand() % 4 ? 128 : in_cap - sizeof(*h));

		fz_fill(in, n, img.size);
		h->opcode = fz_ops[fz_rand() % fz_nr_ops];
		h->len = fz_rand() % 8 ? (uint32_t)n : (uint32_t)fz_rand();
		h->nodeid = FUSE_ROOT_ID;
		if (h->opcode == FUSE_WRITE && n >= sizeof(*h) + sizeof(struct fuse_write_in) &&
		    fz_rand() % 2) {
			/* Mostly well-formed writes, so the data path runs too. */
			struct fuse_write_in *w = (void *)(h + 1);

			w->size = (uint32_t)(n - sizeof(*h) - sizeof(*w));
		}
		failed = fz_rand() % 2 ? fz_one(in, n, out, out_cap) : fz_one_ring(in, n, out, out_cap);
	}
	/* Nothing may have allocated beyond the 1 MiB the image can have. */
	if (!failed && fstat(img.fds[IMAGE_FD_MAIN], &st) == 0 && st.st_blocks * 512 > (2 << 20)) {
		fprintf(stderr, "image allocates %lld bytes\n", (long long)st.st_blocks * 512);
		failed = 1;
	}
	printf("%s after %lu requests, image size %llu\n", failed ? "FAILED" : "ok", iters,
	       (unsigned long long)img.size);
	free(in);
	free(out);
	return failed;
}
