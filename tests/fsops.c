// SPDX-License-Identifier: BSD-2-Clause
/*
 * fsops - file operations for the uexportd tests, each printing its result
 * so a test can assert exact return values and errno names.
 *
 *   fsops seek FILE                      data/hole map via SEEK_DATA/SEEK_HOLE
 *   fsops pwrite FILE OFF LEN [SYNC]     write LEN bytes of 0xab at OFF; SYNC:
 *                                        o-dsync, o-sync (open flags),
 *                                        rwf-dsync, rwf-sync (pwritev2 flags)
 *   fsops pread FILE OFF LEN             one pread of LEN bytes at OFF
 *   fsops fd-pwrite FD OFF LEN           pwrite of 0xab, and fsync, on a
 *   fsops fd-fsync FD                    FD inherited from the caller (bash:
 *                                        exec {fd}<>FILE): one open file
 *                                        across several fsops runs
 *   fsops mmap-store FILE OFF TEXT       store TEXT at OFF through a shared
 *                                        mapping, print "stored", keep the
 *                                        mapping (no msync) for 60 s
 *   fsops open-rw FILE                   open O_RDWR
 *   fsops truncate FILE SIZE
 *   fsops fallocate FILE MODE OFF LEN    MODE: 0 keep punch zero zero-keep
 *   fsops fsync FILE
 *   fsops lseek FILE data|hole OFF
 *   fsops diff SEED COUNT MAXSIZE A B    the same random operations on A and
 *                                        B; exits 1 at the first difference
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE	0x01
#define FALLOC_FL_PUNCH_HOLE	0x02
#endif
#ifndef RWF_DSYNC
#define RWF_DSYNC		0x02
#define RWF_SYNC		0x04
#endif
#ifndef FALLOC_FL_ZERO_RANGE
#define FALLOC_FL_ZERO_RANGE	0x10
#endif

static int report(long long r)
{
	if (r < 0) {
		printf("err %s\n", strerrorname_np(errno));
		return 1;
	}
	printf("ok %lld\n", r);
	return 0;
}

static int open_or_die(const char *path, int flags)
{
	int fd = open(path, flags);

	if (fd < 0) {
		printf("err %s\n", strerrorname_np(errno));
		exit(1);
	}
	return fd;
}

static int fallocate_mode(const char *s)
{
	if (!strcmp(s, "keep")) return FALLOC_FL_KEEP_SIZE;
	if (!strcmp(s, "punch")) return FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
	if (!strcmp(s, "zero")) return FALLOC_FL_ZERO_RANGE;
	if (!strcmp(s, "zero-keep")) return FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
	if (!strcmp(s, "collapse")) return 0x08;
	return atoi(s);
}

/* A page-aligned buffer of LEN bytes of 0xab: one FUSE request carries up to
 * max_pages whole pages, so an unaligned buffer would split a 1 MiB write. */
static char *ab_buffer(size_t len)
{
	char *buf = aligned_alloc(4096, (len + 4096) / 4096 * 4096);

	if (!buf) {
		perror("aligned_alloc");
		exit(2);
	}
	return memset(buf, 0xab, len);
}

/* A descriptor number given on the command line, inherited from the caller. */
static int inherited_fd(const char *s)
{
	int fd = atoi(s);

	if (fcntl(fd, F_GETFD) < 0) {
		printf("err %s\n", strerrorname_np(errno));
		exit(1);
	}
	return fd;
}

/* pwrite with a synchronous-write intent of the open file or of the call. */
static int cmd_pwrite(const char *path, off_t off, size_t len, const char *sync)
{
	int oflags = O_WRONLY, rwf = 0, fd;
	char *buf = ab_buffer(len);
	struct iovec iov = { buf, len };

	if (!strcmp(sync, "o-dsync"))
		oflags |= O_DSYNC;
	else if (!strcmp(sync, "o-sync"))
		oflags |= O_SYNC;
	else if (!strcmp(sync, "rwf-dsync"))
		rwf = RWF_DSYNC;
	else if (!strcmp(sync, "rwf-sync"))
		rwf = RWF_SYNC;
	else if (*sync)
		return 2;
	fd = open_or_die(path, oflags);
	return report(pwritev2(fd, &iov, 1, off, rwf));
}

/* Dirty the page cache through a shared mapping and hold it: whoever stops
 * the export must write it back first. */
static int cmd_mmap_store(const char *path, off_t off, const char *text)
{
	int fd = open_or_die(path, O_RDWR);
	off_t base = off & ~(off_t)4095;
	size_t len = (size_t)(off - base) + strlen(text);
	char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, base);

	if (m == MAP_FAILED)
		return report(-1);
	memcpy(m + (off - base), text, strlen(text));
	printf("stored\n");
	fflush(stdout);
	sleep(60);
	return 0;
}

static int cmd_seek(const char *path)
{
	int fd = open_or_die(path, O_RDONLY);
	off_t pos = 0, data, hole;

	for (;;) {
		data = lseek(fd, pos, SEEK_DATA);
		if (data < 0)
			break;
		hole = lseek(fd, data, SEEK_HOLE);
		if (hole < 0)
			return report(-1);
		printf("data %lld %lld\n", (long long)data, (long long)hole);
		pos = hole;
	}
	if (errno != ENXIO)
		return report(-1);
	printf("end\n");
	return 0;
}

/* ---- differential test ---- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static uint64_t rnd_below(uint64_t n)
{
	return n ? rnd() % n : 0;
}

/* Lengths: mostly small and odd, sometimes across 4 KiB and 1 MiB. */
static uint64_t rnd_len(void)
{
	switch (rnd_below(4)) {
	case 0: return rnd_below(64);
	case 1: return rnd_below(9000);
	case 2: return rnd_below(300000);
	default: return rnd_below(1500000);
	}
}

struct result {
	long long ret;
	int err;
};

static int diff_fail(unsigned long i, const char *op, struct result a, struct result b)
{
	fprintf(stderr, "step %lu %s: A ret=%lld errno=%s, B ret=%lld errno=%s\n", i, op,
		a.ret, a.ret < 0 ? strerrorname_np(a.err) : "-",
		b.ret, b.ret < 0 ? strerrorname_np(b.err) : "-");
	return 1;
}

#define RUN(res, expr) do { errno = 0; (res).ret = (long long)(expr); (res).err = errno; } while (0)

static int cmd_diff(uint64_t seed, unsigned long count, uint64_t maxsize,
		    const char *pa, const char *pb)
{
	int fa = open_or_die(pa, O_RDWR), fb = open_or_die(pb, O_RDWR);
	static const int modes[] = { 0, FALLOC_FL_KEEP_SIZE,
		FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
		FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE };
	char *wbuf = malloc(1600000), *ra = malloc(1600000), *rb = malloc(1600000);
	struct result a, b;
	struct stat sa, sb;
	bool seek_errors_only = getenv("FSOPS_SEEK_ERRORS_ONLY") != NULL;

	rng_state = seed * 2654435761u + 1;
	for (unsigned long i = 0; i < count; i++) {
		unsigned op = (unsigned)rnd_below(100);
		uint64_t off = rnd_below(maxsize), len = rnd_len();
		const char *name;

		if (op < 40) {
			name = "pwrite";
			for (uint64_t k = 0; k < len; k++)
				wbuf[k] = (char)(i * 31 + k * 7);
			RUN(a, pwrite(fa, wbuf, len, (off_t)off));
			RUN(b, pwrite(fb, wbuf, len, (off_t)off));
		} else if (op < 65) {
			name = "pread";
			RUN(a, pread(fa, ra, len, (off_t)off));
			RUN(b, pread(fb, rb, len, (off_t)off));
			if (a.ret == b.ret && a.ret > 0 && memcmp(ra, rb, (size_t)a.ret)) {
				fprintf(stderr, "step %lu pread off=%llu len=%llu: data differs\n",
					i, (unsigned long long)off, (unsigned long long)len);
				return 1;
			}
		} else if (op < 73) {
			name = "ftruncate";
			RUN(a, ftruncate(fa, (off_t)off));
			RUN(b, ftruncate(fb, (off_t)off));
		} else if (op < 87) {
			int mode = modes[rnd_below(6)];

			name = "fallocate";
			RUN(a, fallocate(fa, mode, (off_t)off, (off_t)len));
			RUN(b, fallocate(fb, mode, (off_t)off, (off_t)len));
		} else if (op < 97) {
			int whence = rnd_below(2) ? SEEK_DATA : SEEK_HOLE;

			name = whence == SEEK_DATA ? "SEEK_DATA" : "SEEK_HOLE";
			RUN(a, lseek(fa, (off_t)off, whence));
			RUN(b, lseek(fb, (off_t)off, whence));
		} else {
			name = "fsync";
			RUN(a, fsync(fa));
			RUN(b, fsync(fb));
		}
		if (seek_errors_only && name[0] == 'S' && a.ret >= 0 && b.ret >= 0)
			a.ret = b.ret;
		if (a.ret != b.ret || (a.ret < 0 && a.err != b.err)) {
			fprintf(stderr, "off=%llu len=%llu\n", (unsigned long long)off,
				(unsigned long long)len);
			return diff_fail(i, name, a, b);
		}
		if (fstat(fa, &sa) || fstat(fb, &sb) || sa.st_size != sb.st_size) {
			fprintf(stderr, "step %lu %s: size %lld vs %lld\n", i, name,
				(long long)sa.st_size, (long long)sb.st_size);
			return 1;
		}
	}
	printf("ok %lu operations, final size %lld\n", count, (long long)sa.st_size);
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";
	int fd;

	if (!strcmp(cmd, "seek") && argc == 3)
		return cmd_seek(argv[2]);
	if (!strcmp(cmd, "open-rw") && argc == 3)
		return report(open(argv[2], O_RDWR));
	if (!strcmp(cmd, "pwrite") && (argc == 5 || argc == 6))
		return cmd_pwrite(argv[2], strtoll(argv[3], NULL, 0), strtoull(argv[4], NULL, 0),
				  argc == 6 ? argv[5] : "");
	if (!strcmp(cmd, "pread") && argc == 5) {
		size_t len = strtoull(argv[4], NULL, 0);

		fd = open_or_die(argv[2], O_RDONLY);
		return report(pread(fd, ab_buffer(len), len, strtoll(argv[3], NULL, 0)));
	}
	if (!strcmp(cmd, "fd-pwrite") && argc == 5) {
		size_t len = strtoull(argv[4], NULL, 0);

		return report(pwrite(inherited_fd(argv[2]), ab_buffer(len), len,
				     strtoll(argv[3], NULL, 0)));
	}
	if (!strcmp(cmd, "fd-fsync") && argc == 3)
		return report(fsync(inherited_fd(argv[2])));
	if (!strcmp(cmd, "mmap-store") && argc == 5)
		return cmd_mmap_store(argv[2], strtoll(argv[3], NULL, 0), argv[4]);
	if (!strcmp(cmd, "truncate") && argc == 4) {
		fd = open_or_die(argv[2], O_WRONLY);
		return report(ftruncate(fd, strtoll(argv[3], NULL, 0)));
	}
	if (!strcmp(cmd, "fallocate") && argc == 6) {
		fd = open_or_die(argv[2], O_WRONLY);
		return report(fallocate(fd, fallocate_mode(argv[3]), strtoll(argv[4], NULL, 0),
					strtoll(argv[5], NULL, 0)));
	}
	if (!strcmp(cmd, "fsync") && argc == 3) {
		fd = open_or_die(argv[2], O_RDWR);
		return report(fsync(fd));
	}
	if (!strcmp(cmd, "lseek") && argc == 5) {
		fd = open_or_die(argv[2], O_RDONLY);
		return report(lseek(fd, strtoll(argv[4], NULL, 0),
				    !strcmp(argv[3], "data") ? SEEK_DATA : SEEK_HOLE));
	}
	if (!strcmp(cmd, "diff") && argc == 7)
		return cmd_diff(strtoull(argv[2], NULL, 0), strtoul(argv[3], NULL, 0),
				strtoull(argv[4], NULL, 0), argv[5], argv[6]);
	fprintf(stderr, "usage: see the comment at the top of tests/fsops.c\n");
	return 2;
}
