// SPDX-License-Identifier: BSD-2-Clause
/*
 * unit - table-driven tests of uexportd's pure parsers and planners, built
 * with ASan/UBSan by the Makefile:
 *
 *   parse_cpu_list()   a kernel CPU list ("0-3,8-11\n") -> number of CPUs
 *   parse_size()       "64K", "1G", ... -> bytes, overflow rejected
 *   memory_plan()      queue depth and payload size fitted to a budget
 *   pt_parse(), pt_find()  MBR and GPT tables, sound and damaged; picking
 *                      a partition by number, name, UUID; crc32_ieee()
 *
 *   unit                          run every case; one line per failure
 *                                 (input, got, expected), "ok N cases" and
 *                                 exit 0 when all pass
 *   unit plan BUDGET UNITS DEPTH  print memory_plan()'s "DEPTH PAYLOAD", for
 *                                 the bats helpers to check their copy of it
 */
#define main uexportd_main
#include "../uexportd.c"
#undef main

static unsigned u_cases, u_failed;

/* s as a C string literal, for failure lines ("0-1\n" stays readable). */
static const char *u_quote(const char *s)
{
	static char buf[4][256];
	static unsigned k;
	char *b = buf[k++ % 4], *p = b, *end = b + sizeof(buf[0]) - 8;

	*p++ = '"';
	for (; *s && p < end; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '\n')
			p += sprintf(p, "\\n");
		else if (c == '"' || c == '\\')
			p += sprintf(p, "\\%c", c);
		else if (c < 0x20 || c >= 0x7f)
			p += sprintf(p, "\\x%02x", c);
		else
			*p++ = (char)c;
	}
	*p++ = '"';
	*p = 0;
	return b;
}

static void __attribute__((format(printf, 1, 2))) u_fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("FAIL ", stdout);
	vprintf(fmt, ap);
	putchar('\n');
	va_end(ap);
	u_failed++;
}

/* ---- parse_cpu_list ---------------------------------------------------- */

static const struct {
	const char *in;
	int want;			/* CPU count, or -EINVAL */
} cpu_list_cases[] = {
	{ "0", 1 },
	{ "7", 1 },
	{ "0-0", 1 },
	{ "0-1", 2 },
	{ "0-1\n", 2 },			/* as read from sysfs */
	{ "0,2-5", 5 },
	{ "0-3,8-11", 8 },		/* gaps: a count, not highest id + 1 */
	{ "0-3,8-11\n", 8 },
	{ "0,1,2,3", 4 },
	{ "1-1,3-3", 2 },
	{ "2-3", 2 },			/* CPU 0 need not be possible */
	{ "0-4095", 4096 },
	{ "", -EINVAL },
	{ "\n", -EINVAL },
	{ "3-1", -EINVAL },		/* reversed */
	{ "1-", -EINVAL },		/* open ranges */
	{ "0-\n", -EINVAL },
	{ "-1", -EINVAL },
	{ "a", -EINVAL },
	{ "0,,1", -EINVAL },
	{ "0-1,", -EINVAL },
	{ ",0", -EINVAL },
	{ "0 1", -EINVAL },
	{ " 0", -EINVAL },
	{ "0-1 ", -EINVAL },
	{ "1-2-3", -EINVAL },
	{ "0--1", -EINVAL },
	{ "0x1", -EINVAL },
	{ "+1", -EINVAL },
	{ "99999999999999999999", -EINVAL },	/* overflows long */
	{ "0-99999999999999999999", -EINVAL },
};

static void test_parse_cpu_list(void)
{
	for (size_t i = 0; i < sizeof(cpu_list_cases) / sizeof(cpu_list_cases[0]); i++) {
		const char *in = cpu_list_cases[i].in;
		int want = cpu_list_cases[i].want, got = parse_cpu_list(in);

		u_cases++;
		if (got != want)
			u_fail("parse_cpu_list(%s): got %d, expected %d", u_quote(in), got, want);
	}
}

/* ---- parse_size -------------------------------------------------------- */

static const struct {
	const char *in;
	bool ok;
	uint64_t want;
} size_cases[] = {
	{ "0", true, 0 },
	{ "1", true, 1 },
	{ "4096", true, 4096 },
	{ "64K", true, 64ull << 10 },
	{ "64k", true, 64ull << 10 },
	{ "1M", true, 1ull << 20 },
	{ "256m", true, 256ull << 20 },
	{ "1G", true, 1ull << 30 },
	{ "1g", true, 1ull << 30 },
	{ "1T", true, 1ull << 40 },
	{ "1t", true, 1ull << 40 },
	{ "0K", true, 0 },
	{ "007", true, 7 },		/* decimal, not octal */
	{ "8388607T", true, 8388607ull << 40 },	/* INT64_MAX >> 40 */
	{ "9223372036854775807", true, 9223372036854775807ull },
	{ "", false, 0 },
	{ "K", false, 0 },
	{ "-1", false, 0 },
	{ "+1", false, 0 },
	{ "1X", false, 0 },
	{ "1KK", false, 0 },
	{ "1KB", false, 0 },
	{ "1.5G", false, 0 },
	{ "0x10", false, 0 },
	{ " 1", false, 0 },
	{ "1 ", false, 0 },
	{ "1\n", false, 0 },
	{ "8388608T", false, 0 },	/* above INT64_MAX once shifted */
	{ "16777216T", false, 0 },	/* 2^64: wraps to 0 if unchecked */
	{ "9223372036854775808", false, 0 },
	{ "18446744073709551615", false, 0 },
	{ "18446744073709551616", false, 0 },	/* strtoull ERANGE */
	{ "99999999999999999999999K", false, 0 },
};

static void test_parse_size(void)
{
	for (size_t i = 0; i < sizeof(size_cases) / sizeof(size_cases[0]); i++) {
		const char *in = size_cases[i].in;
		uint64_t got = 0xdeadbeef;
		int rc = parse_size(in, &got);

		u_cases++;
		if (size_cases[i].ok && rc != 0)
			u_fail("parse_size(%s): got rc %d, expected %llu", u_quote(in), rc,
			       (unsigned long long)size_cases[i].want);
		else if (size_cases[i].ok && got != size_cases[i].want)
			u_fail("parse_size(%s): got %llu, expected %llu", u_quote(in),
			       (unsigned long long)got, (unsigned long long)size_cases[i].want);
		else if (!size_cases[i].ok && rc >= 0)
			u_fail("parse_size(%s): got rc %d (value %llu), expected an error",
			       u_quote(in), rc, (unsigned long long)got);
	}
}

/* ---- memory_plan ------------------------------------------------------- */

#define MiB (1ull << 20)
#define KiB (1ull << 10)

static const struct {
	uint64_t budget;
	unsigned units, depth;		/* in */
	unsigned want_depth;
	uint32_t want_payload;
} plan_cases[] = {
	/* The io_uring defaults (256M, depth 64) by possible-CPU count. */
	{ 256 * MiB,    1, 64, 64, 1 * MiB },
	{ 256 * MiB,    2, 64, 64, 1 * MiB },
	{ 256 * MiB,    4, 64, 64, 1 * MiB },	/* exactly the budget */
	{ 256 * MiB,    5, 64, 32, 1 * MiB },	/* depth halves first */
	{ 256 * MiB,    8, 64, 32, 1 * MiB },
	{ 256 * MiB,    9, 64, 16, 1 * MiB },
	{ 256 * MiB,   16, 64, 16, 1 * MiB },	/* depth floor 16 */
	{ 256 * MiB,   17, 64, 16, 512 * KiB },	/* then the payload halves */
	{ 256 * MiB,   32, 64, 16, 512 * KiB },
	{ 256 * MiB,   64, 64, 16, 256 * KiB },
	{ 256 * MiB,  128, 64, 16, 128 * KiB },	/* payload floor MIN_PAYLOAD */
	{ 256 * MiB,  256, 64,  8, 128 * KiB },	/* then depth by one: 256 x 8 x 128K */
	{ 256 * MiB,  200, 64, 10, 128 * KiB },	/* 200 x 10 x 128K = 250M */
	{ 256 * MiB, 2048, 64,  1, 128 * KiB },
	{ 256 * MiB, 4096, 64,  1, 128 * KiB },	/* over budget at the minimum */
	{ 0,            1, 64,  1, 128 * KiB },
	/* Other depths: halving stops at 16, never below what was asked. */
	{ 256 * MiB,    1, 1024, 256, 1 * MiB },
	{ 256 * MiB,    1, 1000, 250, 1 * MiB },
	{ 256 * MiB,   16,   20,  16, 1 * MiB },	/* 20 -> 16, not 10 */
	{ 256 * MiB,   64,    8,   8, 512 * KiB },	/* below 16: payload first */
	{ 256 * MiB,    1,    1,   1, 1 * MiB },
	/* /dev/fuse: two buffers per thread. */
	{ 256 * MiB,    2,    2,   2, 1 * MiB },
	{ 256 * MiB,  256,    2,   2, 512 * KiB },
	{ 256 * MiB, 1024,    2,   2, 128 * KiB },
	{ 256 * MiB, 2048,    2,   1, 128 * KiB },
	/* The smallest --max-memory, 1M. */
	{ 1 * MiB,      2,   64,   4, 128 * KiB },
	{ 1 * MiB,      1,   64,   8, 128 * KiB },
	/* Large budgets leave the request alone. */
	{ 16384 * MiB, 256,  64,  64, 1 * MiB },
	{ UINT64_MAX, 4096, 1024, 1024, 1 * MiB },
};

static void test_memory_plan_table(void)
{
	for (size_t i = 0; i < sizeof(plan_cases) / sizeof(plan_cases[0]); i++) {
		unsigned depth = plan_cases[i].depth;
		uint32_t payload = 0;

		memory_plan(plan_cases[i].budget, plan_cases[i].units, &depth, &payload);
		u_cases++;
		if (depth != plan_cases[i].want_depth || payload != plan_cases[i].want_payload)
			u_fail("memory_plan(budget %llu, units %u, depth %u): got depth %u "
			       "payload %u, expected depth %u payload %u",
			       (unsigned long long)plan_cases[i].budget, plan_cases[i].units,
			       plan_cases[i].depth, depth, payload, plan_cases[i].want_depth,
			       plan_cases[i].want_payload);
	}
}

static uint64_t u_state = 0x9e3779b97f4a7c15ull;

static uint64_t u_rand(void)
{
	u_state ^= u_state << 13;
	u_state ^= u_state >> 7;
	u_state ^= u_state << 17;
	return u_state;
}

/*
 * Properties over many budgets, unit counts and depths:
 *   - depth in [1, asked], payload a power of two in [MIN_PAYLOAD, MAX_PAYLOAD];
 *   - units x depth x payload fits the budget, unless at the minimum
 *     (depth 1, payload MIN_PAYLOAD);
 *   - what fits as asked is left alone;
 *   - the order: the payload shrinks only once depth is down to 16 (or was
 *     asked lower), depth goes below that only at MIN_PAYLOAD;
 *   - nothing is shrunk more than needed: a payload twice as large, or one
 *     more entry at MIN_PAYLOAD, would not fit.
 */
static void test_memory_plan_properties(void)
{
	static const unsigned depths[] = { 1, 2, 15, 16, 17, 31, 64, 100, 1024 };
	unsigned n = 0, nbad = 0;

	for (unsigned iter = 0; iter < 20000; iter++) {
		uint64_t budget;
		unsigned units, asked, depth;
		uint32_t payload = 0;
		const char *bad = NULL;

		switch (iter % 4) {
		case 0: budget = (1 + u_rand() % 65536) * MiB; break;	/* 1M..64G, MiB steps */
		case 1: budget = u_rand() % (64 * 1024 * MiB); break;	/* any byte count */
		case 2: budget = (uint64_t)1 << (u_rand() % 40); break;
		default: budget = 256 * MiB; break;
		}
		units = iter % 3 ? 1 + (unsigned)(u_rand() % 512) : 1 + (unsigned)(u_rand() % 8192);
		asked = iter % 2 ? depths[u_rand() % (sizeof(depths) / sizeof(depths[0]))]
				 : 1 + (unsigned)(u_rand() % MAX_QUEUE_DEPTH);
		depth = asked;
		memory_plan(budget, units, &depth, &payload);

		uint64_t total = (uint64_t)units * depth * payload;
		bool at_min = depth == 1 && payload == MIN_PAYLOAD;
		unsigned floor16 = asked < 16 ? asked : 16;

		if (depth < 1 || depth > asked)
			bad = "depth out of [1, asked]";
		else if (payload < MIN_PAYLOAD || payload > MAX_PAYLOAD || (payload & (payload - 1)))
			bad = "payload not a power of two in [MIN_PAYLOAD, MAX_PAYLOAD]";
		else if (total > budget && !at_min)
			bad = "over budget above the minimum";
		else if ((uint64_t)units * asked * MAX_PAYLOAD <= budget &&
			 (depth != asked || payload != MAX_PAYLOAD))
			bad = "shrunk although the request fits";
		else if (payload < MAX_PAYLOAD && depth > floor16)
			bad = "payload shrunk before depth reached 16";
		else if (depth < floor16 && payload != MIN_PAYLOAD)
			bad = "depth below 16 before the payload reached MIN_PAYLOAD";
		else if (payload < MAX_PAYLOAD && depth == floor16 &&
			 (uint64_t)units * depth * payload * 2 <= budget)
			bad = "payload shrunk more than needed";
		else if (depth < floor16 && (uint64_t)units * (depth + 1) * MIN_PAYLOAD <= budget)
			bad = "depth cut more than needed";
		n++;
		if (bad && ++nbad > 20)
			u_failed++;	/* counted, not printed: one broken rule fails thousands */
		else if (bad)
			u_fail("memory_plan(budget %llu, units %u, depth %u): got depth %u payload %u "
			       "(total %llu): %s", (unsigned long long)budget, units, asked,
			       depth, payload, (unsigned long long)total, bad);
	}
	u_cases += n;
	if (nbad > 20)
		printf("FAIL memory_plan: %u more property failures not shown\n", nbad - 20);
}

/* ---- partition tables: pt_parse, pt_find, crc32_ieee ------------------- */

/* An image in memory, built by the cases below; reads past 'size' fail
 * as a short read would. */
#define U_IMG_SIZE	(32u << 20)	/* 65536 sectors of 512 */

struct u_img {
	uint8_t *buf;
	uint64_t size;
};

static int u_img_read(void *ctx, void *buf, size_t len, uint64_t off)
{
	struct u_img *m = ctx;

	if (off > m->size || len > m->size - off)
		return -EIO;
	memcpy(buf, m->buf + off, len);
	return 0;
}

static void u_put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void u_put64(uint8_t *p, uint64_t v)
{
	u_put32(p, (uint32_t)v);
	u_put32(p + 4, (uint32_t)(v >> 32));
}

/* MBR-style entry k of the table in the sector at 'sec'. */
static void u_mbr_entry(uint8_t *sec, unsigned k, uint8_t boot, uint8_t type, uint32_t start,
			uint32_t n)
{
	uint8_t *e = sec + 446 + 16 * k;

	e[0] = boot;
	e[4] = type;
	u_put32(e + 8, start);
	u_put32(e + 12, n);
	sec[510] = 0x55;
	sec[511] = 0xAA;
}

/* The MBR of tests/window_19's sfdisk script: 1 (83), 2 extended, 3 (0c),
 * logicals 5 and 6 chained by EBRs at 10240 and 14336. */
static void u_build_mbr(struct u_img *m)
{
	uint8_t *b = m->buf;

	memset(b, 0, U_IMG_SIZE);
	m->size = U_IMG_SIZE;
	u_put32(b + 440, 0x4f4e42bf);
	u_mbr_entry(b, 0, 0x80, 0x83, 2048, 8192);
	u_mbr_entry(b, 1, 0, 0x05, 10240, 20000);
	u_mbr_entry(b, 2, 0, 0x0c, 40000, 1000);
	u_mbr_entry(b + 10240 * 512, 0, 0, 0x83, 2048, 2048);
	u_mbr_entry(b + 10240 * 512, 1, 0, 0x05, 4096, 6144);
	u_mbr_entry(b + 14336 * 512, 0, 0, 0x82, 2048, 4096);
}

/* Recompute the GPT header's and entries' CRC32s (sector 'ss'). */
static void u_gpt_crcs(struct u_img *m, unsigned ss)
{
	uint8_t *h = m->buf + ss;
	uint32_t n = le32(h + 80), es = le32(h + 84);

	u_put32(h + 88, crc32_ieee(m->buf + le64(h + 72) * ss, (size_t)n * es));
	u_put32(h + 16, 0);
	u_put32(h + 16, crc32_ieee(h, le32(h + 12)));
}

static void u_gpt_entry(struct u_img *m, unsigned ss, unsigned i, uint8_t type_byte,
			uint8_t uuid_byte, uint64_t first, uint64_t last, const char *name)
{
	uint8_t *e = m->buf + 2 * ss + 128 * i;

	memset(e, 0, 128);
	if (!type_byte)
		return;
	for (int k = 0; k < 16; k++) {
		e[k] = (uint8_t)(type_byte + k);
		e[16 + k] = (uint8_t)(uuid_byte + k);
	}
	u_put64(e + 32, first);
	u_put64(e + 40, last);
	for (unsigned k = 0; name[k] && k < 36; k++)
		e[56 + 2 * k] = (uint8_t)name[k];	/* ASCII as UTF-16LE */
}

/* A GPT of 128 entries at LBA 2 in 'ss'-byte sectors: 1 "root", 2
 * unused, 3 "swap", 4 "root 2"; usable LBAs 34..nsec-34 (512) or
 * 6..nsec-6 (4096). */
static void u_build_gpt(struct u_img *m, unsigned ss)
{
	uint8_t *h = m->buf + ss;
	uint64_t nsec = U_IMG_SIZE / ss, first = ss == 512 ? 34 : 6;

	memset(m->buf, 0, U_IMG_SIZE);
	m->size = U_IMG_SIZE;
	u_mbr_entry(m->buf, 0, 0, 0xEE, 1, (uint32_t)(nsec - 1));
	memcpy(h, "EFI PART", 8);
	u_put32(h + 8, 0x00010000);
	u_put32(h + 12, 92);
	u_put64(h + 24, 1);
	u_put64(h + 32, nsec - 1);
	u_put64(h + 40, first);
	u_put64(h + 48, nsec - first);
	u_put64(h + 72, 2);
	u_put32(h + 80, 128);
	u_put32(h + 84, 128);
	u_gpt_entry(m, ss, 0, 0x10, 0xa0, 2048 * 512 / ss, 10239 * 512 / ss, "root");
	u_gpt_entry(m, ss, 2, 0x20, 0xb0, 20480 * 512 / ss, 24575 * 512 / ss, "swap");
	u_gpt_entry(m, ss, 3, 0x10, 0xc0, 30720 * 512 / ss, 32767 * 512 / ss, "root 2");
	u_gpt_crcs(m, ss);
}

enum u_pt_build { U_MBR, U_GPT, U_GPT4K };

static const struct {
	const char *what;
	enum u_pt_build build;
	/* Damage: 'at' bytes into the image, set to 'val' (len 1), or write
	 * a 32-bit 'val' with 'put32'; then recompute the GPT CRCs if 'crc'. */
	uint64_t at;
	uint32_t val;
	bool put32, crc;
	uint64_t truncate_to;		/* the image's size, 0: whole */
	const char *want;		/* "N:start+size,..." or "error substring" */
} pt_cases[] = {
	{ "MBR: primaries, extended, logicals", U_MBR, 0, 0, 0, 0, 0,
	  "1:1048576+4194304,2:5242880+10240000,3:20480000+512000,5:6291456+1048576,"
	  "6:8388608+2097152" },
	{ "MBR: no signature", U_MBR, 510, 0, 0, 0, 0, "no MBR signature" },
	{ "MBR: boot flag 0x12", U_MBR, 446, 0x12, 0, 0, 0, "boot flag 0x12" },
	{ "MBR: EBR loop", U_MBR, 0, 0, 0, 0, 0, "loops back to LBA 10240" },	/* below */
	{ "MBR: EBR link to itself", U_MBR, 10240 * 512 + 446 + 16 + 8, 0, 1, 0, 0,
	  "loops back" },
	{ "MBR: EBR unsigned", U_MBR, 14336 * 512 + 510, 0, 0, 0, 0,
	  "EBR at LBA 14336: no signature" },
	{ "MBR: logical past the extended", U_MBR, 14336 * 512 + 446 + 12, 20000, 1, 0, 0,
	  "not inside the extended" },
	{ "MBR: link outside the extended", U_MBR, 10240 * 512 + 446 + 16 + 8, 30000, 1,
	  0, 0, "outside the extended" },
	{ "MBR: logical over its EBR", U_MBR, 14336 * 512 + 446 + 8, 0, 1, 0, 0,
	  "not inside the extended" },
	{ "MBR: primaries overlap", U_MBR, 446 + 32 + 8, 9000, 1, 0, 0,
	  "partitions 1 and 3 overlap" },
	{ "MBR: primary over the MBR", U_MBR, 446 + 8, 0, 1, 0, 0,
	  "covers the partition table at LBA 0" },
	{ "MBR: primary over an EBR", U_MBR, 446 + 32 + 8, 14000, 1, 0, 0,
	  "covers the partition table at LBA 14336" },
	{ "MBR: two extended", U_MBR, 446 + 32 + 4, 0x0f, 0, 0, 0, "two extended" },
	{ "MBR: partition past the end", U_MBR, 0, 0, 0, 0, 40500 * 512,
	  "partition 3 (bytes 20480000+512000) ends past the image's end" },
	{ "MBR: EBR past the end", U_MBR, 0, 0, 0, 0, 12000 * 512, "past the image's end" },
	{ "MBR: empty table", U_MBR, 446 + 12, 0, 0, 0, 0, "" },	/* patched below */
	{ "GPT 512: entries 1, 3, 4 (2 unused)", U_GPT, 0, 0, 0, 0, 0,
	  "1:1048576+4194304,3:10485760+2097152,4:15728640+1048576" },
	{ "GPT 4096: the same bytes", U_GPT4K, 0, 0, 0, 0, 0,
	  "1:1048576+4194304,3:10485760+2097152,4:15728640+1048576" },
	{ "GPT: header CRC", U_GPT, 512 + 40, 35, 0, false, 0, "GPT header: bad CRC32" },
	{ "GPT: entries CRC", U_GPT, 1024 + 56, 'R', 0, false, 0, "GPT entries: bad CRC32" },
	{ "GPT: no header", U_GPT, 512, 'X', 0, false, 0, "no GPT header" },
	{ "GPT: header at LBA 2", U_GPT, 512 + 24, 2, 1, true, 0, "not 1" },
	{ "GPT: entry size 100", U_GPT, 512 + 84, 100, 1, true, 0, "entry size 100" },
	{ "GPT: entry outside usable", U_GPT, 1024 + 40, 65535, 1, true, 0,
	  "partition 1: LBA 2048-65535 is not inside the usable LBAs 34-65502" },
	{ "GPT: reversed entry", U_GPT, 1024 + 40, 100, 1, true, 0,
	  "partition 1: LBA 2048-100" },
	{ "GPT: overlapping entries", U_GPT, 1024 + 128 * 2 + 32, 10000, 1, true, 0,
	  "partitions 1 and 3 overlap" },
	{ "GPT: usable over the entries", U_GPT, 512 + 40, 20, 1, true, 0,
	  "overlap the header or the usable LBAs" },
	{ "GPT: truncated image", U_GPT, 0, 0, 0, 0, 16u << 20,
	  "usable LBAs 34-65502 are not inside" },
	{ "GPT: too small for a header", U_GPT, 0, 0, 0, 0, 600, "no GPT header" },
	{ "GPT: 0 entries", U_GPT, 512 + 80, 0, 1, true, 0, "header: 0 entries" },
};

/* "N:start+size,..." for the table, or its error. */
static void u_pt_describe(int err, const struct pt_table *t, char *out, size_t cap)
{
	size_t len = 0;

	out[0] = '\0';
	if (err) {
		snprintf(out, cap, "%s", t->error);
		return;
	}
	for (unsigned i = 0; i < t->nr && len < cap; i++)
		len += (size_t)snprintf(out + len, cap - len, "%s%u:%llu+%llu", i ? "," : "",
					t->parts[i].number,
					(unsigned long long)t->parts[i].start,
					(unsigned long long)t->parts[i].size);
}

static int u_pt_parse(struct u_img *m, struct pt_table *t)
{
	struct pt_source src = { u_img_read, m, m->size };

	return pt_parse(t, &src, 0);
}

static void test_partition_tables(void)
{
	struct u_img m = { malloc(U_IMG_SIZE), U_IMG_SIZE };
	struct pt_table *t = malloc(sizeof(*t));
	static const char check[] = "123456789";
	char got[512];

	u_cases++;
	if (crc32_ieee(check, 9) != 0xCBF43926u)
		u_fail("crc32_ieee(\"123456789\") = %08x, want cbf43926", crc32_ieee(check, 9));
	for (size_t i = 0; i < sizeof(pt_cases) / sizeof(pt_cases[0]); i++) {
		unsigned ss = pt_cases[i].build == U_GPT4K ? 4096 : 512;
		const char *want = pt_cases[i].want;
		int err;

		if (pt_cases[i].build == U_MBR)
			u_build_mbr(&m);
		else
			u_build_gpt(&m, ss);
		if (pt_cases[i].put32)
			u_put32(m.buf + pt_cases[i].at, pt_cases[i].val);
		else if (pt_cases[i].at)
			m.buf[pt_cases[i].at] = (uint8_t)pt_cases[i].val;
		if (pt_cases[i].crc)
			u_gpt_crcs(&m, ss);
		if (strcmp(pt_cases[i].what, "MBR: empty table") == 0)
			memset(m.buf + 446, 0, 64);
		if (strcmp(pt_cases[i].what, "MBR: EBR loop") == 0)	/* 2nd links to 1st */
			u_mbr_entry(m.buf + 14336 * 512, 1, 0, 0x05, 0, 2048);
		if (pt_cases[i].truncate_to)
			m.size = pt_cases[i].truncate_to;
		err = u_pt_parse(&m, t);
		u_pt_describe(err, t, got, sizeof(got));
		u_cases++;
		if (isdigit((unsigned char)*want) || !*want ? strcmp(got, want) != 0 || err :
		    !err || !strstr(got, want))
			u_fail("pt_parse, %s: got %s (%d), want %s", pt_cases[i].what,
			       u_quote(got), err, u_quote(want));
	}

	/* The fields, and pt_find by number, name and UUID. */
	u_build_gpt(&m, 512);
	u_cases++;
	if (u_pt_parse(&m, t) < 0 || strcmp(t->label, "gpt") || t->sector != 512 ||
	    strcmp(t->parts[0].type, "13121110-1514-1716-1819-1a1b1c1d1e1f") ||
	    strcmp(t->parts[0].uuid, "a3a2a1a0-a5a4-a7a6-a8a9-aaabacadaeaf") ||
	    strcmp(t->parts[2].name, "root 2"))
		u_fail("GPT fields: label %s sector %u type %s uuid %s name %s", t->label,
		       t->sector, t->parts[0].type, t->parts[0].uuid, t->parts[2].name);
	static const struct {
		const char *spec;
		int want;			/* partition number, or 0: error */
		const char *err;
	} finds[] = {
		{ "1", 1, NULL }, { "3", 3, NULL }, { "4", 4, NULL },
		{ "2", 0, "no partition 2 (gpt table: 1, 3, 4)" },
		{ "0", 0, "not a partition number" }, { "1x", 0, "not a partition number" },
		{ "-1", 0, "not a partition number" }, { "", 0, "not a partition number" },
		{ "99999999999999999999", 0, "not a partition number" },
		{ "name:swap", 3, NULL }, { "name:root 2", 4, NULL },
		{ "name:Swap", 0, "no partition named Swap" }, { "name:", 0, "no partition named" },
		{ "uuid:a3a2a1a0-a5a4-a7a6-a8a9-aaabacadaeaf", 1, NULL },
		{ "uuid:B3B2B1B0-B5B4-B7B6-B8B9-BABBBCBDBEBF", 3, NULL },
		{ "uuid:b3b2b1b0", 0, "no partition with UUID" },
	};
	for (size_t i = 0; i < sizeof(finds) / sizeof(finds[0]); i++) {
		const struct pt_part *p = pt_find(t, finds[i].spec);

		u_cases++;
		if (finds[i].want ? !p || p->number != (unsigned)finds[i].want :
		    p || !strstr(t->error, finds[i].err))
			u_fail("pt_find(%s): got %u (%s), want %d (%s)", u_quote(finds[i].spec),
			       p ? p->number : 0, p ? "" : t->error, finds[i].want,
			       finds[i].err ? finds[i].err : "");
	}
	/* Two of one name, two of one UUID: ambiguous, never the first. */
	u_gpt_entry(&m, 512, 3, 0x10, 0xb0, 30720, 32767, "swap");
	u_gpt_crcs(&m, 512);
	u_cases += 2;
	if (u_pt_parse(&m, t) < 0 || pt_find(t, "name:swap") ||
	    !strstr(t->error, "partitions 3 and 4 both have the name 'swap'"))
		u_fail("pt_find(name:swap) of two: %s", t->error);
	if (pt_find(t, "uuid:b3b2b1b0-b5b4-b7b6-b8b9-babbbcbdbebf") ||
	    !strstr(t->error, "both have the UUID"))
		u_fail("pt_find(uuid:) of two: %s", t->error);

	/* MBR: the extended partition is no data; no names; PARTUUIDs. */
	u_build_mbr(&m);
	u_cases += 4;
	if (u_pt_parse(&m, t) < 0 || pt_find(t, "2") || !strstr(t->error, "extended"))
		u_fail("pt_find(2) on MBR: %s", t->error);
	if (pt_find(t, "name:x") || !strstr(t->error, "names no partitions"))
		u_fail("pt_find(name:x) on MBR: %s", t->error);
	if (!pt_find(t, "uuid:4F4E42BF-06") || pt_find(t, "uuid:4f4e42bf-06")->number != 6)
		u_fail("pt_find(uuid:4F4E42BF-06) on MBR: %s", t->error);
	if (strcmp(t->parts[3].type, "0x83") || strcmp(t->parts[4].uuid, "4f4e42bf-06"))
		u_fail("MBR fields: type %s uuid %s", t->parts[3].type, t->parts[4].uuid);

	/* GPT names are UTF-16LE: non-ASCII and surrogate pairs to UTF-8. */
	static const uint8_t utf16[] = { 'a', 0, 0xe9, 0, 0xac, 0x20, 0x3d, 0xd8, 0x00, 0xde,
					 0x00, 0xd8, 'z', 0, 0, 0, 'q', 0 };
	pt_utf16_to_utf8(utf16, sizeof(utf16) / 2, got, sizeof(got));
	u_cases++;
	if (strcmp(got, "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xef\xbf\xbdz"))
		u_fail("pt_utf16_to_utf8: got %s", u_quote(got));
	free(t);
	free(m.buf);
}

/* ---- driver ------------------------------------------------------------ */

int main(int argc, char **argv)
{
	if (argc == 5 && strcmp(argv[1], "plan") == 0) {
		uint64_t budget;
		unsigned depth = (unsigned)strtoul(argv[4], NULL, 10);
		uint32_t payload;

		if (parse_size(argv[2], &budget) < 0)
			return fprintf(stderr, "unit plan: bad budget %s\n", argv[2]), 2;
		memory_plan(budget, (unsigned)strtoul(argv[3], NULL, 10), &depth, &payload);
		printf("%u %u\n", depth, payload);
		return 0;
	}
	if (argc != 1) {
		fprintf(stderr, "usage: unit | unit plan BUDGET UNITS DEPTH\n");
		return 2;
	}
	test_parse_cpu_list();
	test_parse_size();
	test_memory_plan_table();
	test_memory_plan_properties();
	test_partition_tables();
	if (u_failed) {
		printf("FAILED %u of %u cases\n", u_failed, u_cases);
		return 1;
	}
	printf("ok %u cases\n", u_cases);
	return 0;
}
