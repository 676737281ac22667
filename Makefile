# uexportd - see README.  Plain make: no configure step, no libraries.
CC      ?= cc
CFLAGS  ?= -O2 -g
CFLAGS  += -std=gnu11 -Wall -Wextra -D_FILE_OFFSET_BITS=64
LDLIBS  += -lpthread
PREFIX  ?= /usr/local
MANDIR  ?= $(PREFIX)/share/man
SBINDIR ?= /sbin
DESTDIR ?=

all: uexportd tests/fsops tests/faultfs

# Handlers under ASan/UBSan, fed random and malformed requests (tests/fuzz.c).
FUZZ_SAN ?= -fsanitize=address,undefined -fno-sanitize-recover=all
tests/fuzz: tests/fuzz.c uexportd.c fuse_kernel.h
	$(CC) $(CFLAGS) $(FUZZ_SAN) -o $@ tests/fuzz.c $(LDLIBS)

# The same path, coverage-guided: libFuzzer drives both transports (a fake
# ring, a pipe for /dev/fuse), fuse_init() and every backend (tests/libfuzz.c).
# Needs clang and its libFuzzer runtime (Debian: clang-14, libclang-rt-14-dev).
FUZZ_CC    ?= $(if $(shell command -v clang-14 2>/dev/null),clang-14,clang)
LIBFUZZ_SAN ?= -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
tests/libfuzz: tests/libfuzz.c uexportd.c fuse_kernel.h
	$(FUZZ_CC) -g -O1 -std=gnu11 -Wall -Wextra -D_FILE_OFFSET_BITS=64 $(LIBFUZZ_SAN) \
		-o $@ tests/libfuzz.c $(LDLIBS)

# The seed corpus (tests/fuzz-corpus/), as the harness writes it.
fuzz-seeds: tests/libfuzz
	rm -rf tests/fuzz-corpus
	UEXPORTD_FUZZ_SEEDS=tests/fuzz-corpus tests/libfuzz

# Coverage of uexportd.c by the fuzzers (clang source-based coverage, read
# with llvm-14's llvm-profdata and llvm-cov): see tests/fuzz-cov.sh.
COV_FLAGS ?= -g -O1 -fprofile-instr-generate -fcoverage-mapping
tests/libfuzz-cov: tests/libfuzz.c uexportd.c fuse_kernel.h
	$(FUZZ_CC) $(COV_FLAGS) -std=gnu11 -Wall -Wextra -D_FILE_OFFSET_BITS=64 \
		-fsanitize=fuzzer -o $@ tests/libfuzz.c $(LDLIBS)
tests/fuzz-cov: tests/fuzz.c uexportd.c fuse_kernel.h
	$(FUZZ_CC) $(COV_FLAGS) -std=gnu11 -Wall -Wextra -D_FILE_OFFSET_BITS=64 \
		-o $@ tests/fuzz.c $(LDLIBS)

# Table-driven tests of the pure parsers (tests/unit.c), under the same sanitizers.
tests/unit: tests/unit.c uexportd.c fuse_kernel.h
	$(CC) $(CFLAGS) $(FUZZ_SAN) -o $@ tests/unit.c $(LDLIBS)

# The daemon under sanitizers, for the sanitizer passes of make check
# (tests/run.sh): ASan with UBSan and LSan, and TSan.
SAN_CFLAGS ?= -O1 -g -fno-omit-frame-pointer
SAN_CFLAGS += -std=gnu11 -Wall -Wextra -D_FILE_OFFSET_BITS=64
tests/uexportd-asan: uexportd.c fuse_kernel.h
	$(CC) $(SAN_CFLAGS) -fsanitize=address,undefined -fno-sanitize-recover=all \
		-o $@ uexportd.c $(LDLIBS)
tests/uexportd-tsan: uexportd.c fuse_kernel.h
	$(CC) $(SAN_CFLAGS) -fsanitize=thread -o $@ uexportd.c $(LDLIBS)

uexportd: uexportd.c fuse_kernel.h
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ uexportd.c $(LDLIBS)

# Fully static binaries for initramfs and minimal images (tests/bare_16.bats
# runs both in a chroot holding nothing else); rebuilt only when stale.
static: uexportd-static
uexportd-static: uexportd.c fuse_kernel.h
	$(CC) $(CFLAGS) -static -o $@ uexportd.c $(LDLIBS)

# musl-gcc does not search the system's kernel headers; point it at them only.
MUSL_KHDR := $(firstword $(wildcard /usr/include/$(shell $(CC) -dumpmachine 2>/dev/null)/asm) /usr/include/asm)
static-musl: uexportd-musl
uexportd-musl: uexportd.c fuse_kernel.h
	rm -rf .musl-include && mkdir -p .musl-include
	ln -s /usr/include/linux /usr/include/asm-generic .musl-include/
	ln -s $(MUSL_KHDR) .musl-include/asm
	musl-gcc $(CFLAGS) -isystem .musl-include -static -o $@ uexportd.c
	rm -rf .musl-include

tests/fsops: tests/fsops.c
	$(CC) $(CFLAGS) -o $@ $<

# A FUSE file that fails chosen requests: the failing disk of tests/faults_12.bats.
tests/faultfs: tests/faultfs.c fuse_kernel.h
	$(CC) $(CFLAGS) -o $@ tests/faultfs.c

# The transport's floor for make bench: a minimal null server over io_uring.
tests/nullfloor: tests/nullfloor.c fuse_kernel.h
	$(CC) $(CFLAGS) -o $@ tests/nullfloor.c $(LDLIBS)

check: all tests/fuzz tests/unit
	tests/run.sh

check-long: all tests/fuzz tests/unit
	LONG=1 tests/run.sh

demo: uexportd
	tests/demo.sh

bench: all tests/nullfloor
	tests/bench.sh

# The stripped binary, its man page, and the helpers mount(8) runs for the
# types fuse.uexportd and uexportd: it looks for them in /sbin, not in PREFIX.
# The links name the installed binary absolutely: /sbin may be a link to
# /usr/sbin, which a relative link would not survive.
install: uexportd
	install -D -m 0755 -s uexportd $(DESTDIR)$(PREFIX)/bin/uexportd
	install -D -m 0644 uexportd.8 $(DESTDIR)$(MANDIR)/man8/uexportd.8
	install -d $(DESTDIR)$(SBINDIR)
	ln -sfn $(PREFIX)/bin/uexportd $(DESTDIR)$(SBINDIR)/mount.fuse.uexportd
	ln -sfn $(PREFIX)/bin/uexportd $(DESTDIR)$(SBINDIR)/mount.uexportd

# Exactly the files install put there; the directories stay (they are shared).
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/uexportd $(DESTDIR)$(MANDIR)/man8/uexportd.8 \
		$(DESTDIR)$(SBINDIR)/mount.fuse.uexportd $(DESTDIR)$(SBINDIR)/mount.uexportd

clean:
	rm -rf uexportd uexportd-static uexportd-musl tests/fsops tests/fuzz tests/unit tests/nullfloor tests/faultfs tests/libfuzz \
		tests/libfuzz-cov tests/fuzz-cov tests/uexportd-asan tests/uexportd-tsan .musl-include

.PHONY: all static static-musl check check-long demo bench install uninstall clean fuzz-seeds
