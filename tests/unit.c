// SPDX-License-Identifier: BSD-2-Clause
/*
 * unit - table-driven tests of uexportd's pure parsers and planners, built
 * with ASan/UBSan by the Makefile:
 *
 *   parse_cpu_list()   a kernel CPU list ("0-3,8-11\n") -> number of CPUs
 *   parse_size()       "64K", "1G", ... -> bytes, overflow rejected
 *   memory_plan()      queue depth and payload size fitted to a budget
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
	if (u_failed) {
		printf("FAILED %u of %u cases\n", u_failed, u_cases);
		return 1;
	}
	printf("ok %u cases\n", u_cases);
	return 0;
}
