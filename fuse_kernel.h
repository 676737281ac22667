/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * fuse_kernel.h - the part of the kernel's FUSE wire protocol that uexportd
 * speaks, as of protocol 7.45 (Linux 6.18).
 *
 * The layouts below are the kernel ABI (include/uapi/linux/fuse.h); they are
 * restated here, trimmed to what a single-file export uses, because Debian 12
 * ships protocol 7.38, which lacks the FUSE-over-io_uring structures.  Every
 * structure is padded to 8 bytes so 32-bit builds see the same layout;
 * uexportd.c asserts the sizes the protocol promises.
 */
#ifndef UEXPORTD_FUSE_KERNEL_H
#define UEXPORTD_FUSE_KERNEL_H

#include <stdint.h>

#define FUSE_KERNEL_VERSION		7
#define FUSE_KERNEL_MINOR_VERSION	45
#define FUSE_ROOT_ID			1
#define FUSE_MIN_READ_BUFFER		8192

/* Opcodes (enum fuse_opcode). */
enum fuse_opcode {
	FUSE_LOOKUP		= 1,
	FUSE_FORGET		= 2,	/* no reply */
	FUSE_GETATTR		= 3,
	FUSE_SETATTR		= 4,
	FUSE_READLINK		= 5,
	FUSE_SYMLINK		= 6,
	FUSE_MKNOD		= 8,
	FUSE_MKDIR		= 9,
	FUSE_UNLINK		= 10,
	FUSE_RMDIR		= 11,
	FUSE_RENAME		= 12,
	FUSE_LINK		= 13,
	FUSE_OPEN		= 14,
	FUSE_READ		= 15,
	FUSE_WRITE		= 16,
	FUSE_STATFS		= 17,
	FUSE_RELEASE		= 18,
	FUSE_FSYNC		= 20,
	FUSE_SETXATTR		= 21,
	FUSE_GETXATTR		= 22,
	FUSE_LISTXATTR		= 23,
	FUSE_REMOVEXATTR	= 24,
	FUSE_FLUSH		= 25,
	FUSE_INIT		= 26,
	FUSE_OPENDIR		= 27,
	FUSE_READDIR		= 28,
	FUSE_RELEASEDIR		= 29,
	FUSE_FSYNCDIR		= 30,
	FUSE_GETLK		= 31,
	FUSE_SETLK		= 32,
	FUSE_SETLKW		= 33,
	FUSE_ACCESS		= 34,
	FUSE_CREATE		= 35,
	FUSE_INTERRUPT		= 36,	/* no reply */
	FUSE_BMAP		= 37,
	FUSE_DESTROY		= 38,
	FUSE_IOCTL		= 39,
	FUSE_POLL		= 40,
	FUSE_NOTIFY_REPLY	= 41,
	FUSE_BATCH_FORGET	= 42,	/* no reply */
	FUSE_FALLOCATE		= 43,
	FUSE_READDIRPLUS	= 44,
	FUSE_RENAME2		= 45,
	FUSE_LSEEK		= 46,
	FUSE_COPY_FILE_RANGE	= 47,
	FUSE_SETUPMAPPING	= 48,
	FUSE_REMOVEMAPPING	= 49,
	FUSE_SYNCFS		= 50,
	FUSE_TMPFILE		= 51,
	FUSE_STATX		= 52,
	FUSE_COPY_FILE_RANGE_64	= 53,
};

/* INIT flags; bits 32..63 travel in fuse_init_{in,out}.flags2. */
#define FUSE_ASYNC_READ			(1ULL << 0)
#define FUSE_BIG_WRITES			(1ULL << 5)
#define FUSE_ASYNC_DIO			(1ULL << 15)
#define FUSE_PARALLEL_DIROPS		(1ULL << 18)
#define FUSE_MAX_PAGES			(1ULL << 22)
#define FUSE_INIT_EXT			(1ULL << 30)
#define FUSE_DIRECT_IO_ALLOW_MMAP	(1ULL << 36)
#define FUSE_PASSTHROUGH		(1ULL << 37)
#define FUSE_OVER_IO_URING		(1ULL << 41)

/* fuse_setattr_in.valid */
#define FATTR_MODE		(1 << 0)
#define FATTR_UID		(1 << 1)
#define FATTR_GID		(1 << 2)
#define FATTR_SIZE		(1 << 3)
#define FATTR_ATIME		(1 << 4)
#define FATTR_MTIME		(1 << 5)
#define FATTR_FH		(1 << 6)
#define FATTR_ATIME_NOW		(1 << 7)
#define FATTR_MTIME_NOW		(1 << 8)
#define FATTR_LOCKOWNER		(1 << 9)
#define FATTR_CTIME		(1 << 10)
#define FATTR_KILL_SUIDGID	(1 << 11)

/* fuse_open_out.open_flags */
#define FOPEN_DIRECT_IO			(1 << 0)
#define FOPEN_KEEP_CACHE		(1 << 1)
#define FOPEN_NOFLUSH			(1 << 5)
#define FOPEN_PARALLEL_DIRECT_WRITES	(1 << 6)
#define FOPEN_PASSTHROUGH		(1 << 7)	/* kernel does READ/WRITE */

/* fuse_fsync_in.fsync_flags */
#define FUSE_FSYNC_FDATASYNC	(1 << 0)

struct fuse_in_header {
	uint32_t	len;		/* header + all arguments */
	uint32_t	opcode;
	uint64_t	unique;
	uint64_t	nodeid;
	uint32_t	uid;
	uint32_t	gid;
	uint32_t	pid;
	uint16_t	total_extlen;	/* extension bytes / 8, at the end */
	uint16_t	padding;
};

struct fuse_out_header {
	uint32_t	len;		/* header + reply payload */
	int32_t		error;		/* 0 or -errno */
	uint64_t	unique;
};

struct fuse_attr {
	uint64_t	ino;
	uint64_t	size;
	uint64_t	blocks;		/* 512-byte units */
	uint64_t	atime;
	uint64_t	mtime;
	uint64_t	ctime;
	uint32_t	atimensec;
	uint32_t	mtimensec;
	uint32_t	ctimensec;
	uint32_t	mode;
	uint32_t	nlink;
	uint32_t	uid;
	uint32_t	gid;
	uint32_t	rdev;
	uint32_t	blksize;
	uint32_t	flags;
};

struct fuse_kstatfs {
	uint64_t	blocks;
	uint64_t	bfree;
	uint64_t	bavail;
	uint64_t	files;
	uint64_t	ffree;
	uint32_t	bsize;
	uint32_t	namelen;
	uint32_t	frsize;
	uint32_t	padding;
	uint32_t	spare[6];
};

struct fuse_init_in {
	uint32_t	major;
	uint32_t	minor;
	uint32_t	max_readahead;
	uint32_t	flags;
	uint32_t	flags2;
	uint32_t	unused[11];
};

struct fuse_init_out {
	uint32_t	major;
	uint32_t	minor;
	uint32_t	max_readahead;
	uint32_t	flags;
	uint16_t	max_background;
	uint16_t	congestion_threshold;
	uint32_t	max_write;
	uint32_t	time_gran;
	uint16_t	max_pages;
	uint16_t	map_alignment;
	uint32_t	flags2;
	uint32_t	max_stack_depth;
	uint16_t	request_timeout;
	uint16_t	unused[11];
};

struct fuse_getattr_in {
	uint32_t	getattr_flags;
	uint32_t	dummy;
	uint64_t	fh;
};

struct fuse_attr_out {
	uint64_t	attr_valid;
	uint32_t	attr_valid_nsec;
	uint32_t	dummy;
	struct fuse_attr attr;
};

struct fuse_setattr_in {
	uint32_t	valid;
	uint32_t	padding;
	uint64_t	fh;
	uint64_t	size;
	uint64_t	lock_owner;
	uint64_t	atime;
	uint64_t	mtime;
	uint64_t	ctime;
	uint32_t	atimensec;
	uint32_t	mtimensec;
	uint32_t	ctimensec;
	uint32_t	mode;
	uint32_t	unused4;
	uint32_t	uid;
	uint32_t	gid;
	uint32_t	unused5;
};

struct fuse_open_in {
	uint32_t	flags;
	uint32_t	open_flags;
};

struct fuse_open_out {
	uint64_t	fh;
	uint32_t	open_flags;
	int32_t		backing_id;
};

struct fuse_release_in {
	uint64_t	fh;
	uint32_t	flags;
	uint32_t	release_flags;
	uint64_t	lock_owner;
};

struct fuse_flush_in {
	uint64_t	fh;
	uint32_t	unused;
	uint32_t	padding;
	uint64_t	lock_owner;
};

struct fuse_read_in {
	uint64_t	fh;
	uint64_t	offset;
	uint32_t	size;
	uint32_t	read_flags;
	uint64_t	lock_owner;
	uint32_t	flags;
	uint32_t	padding;
};

struct fuse_write_in {
	uint64_t	fh;
	uint64_t	offset;
	uint32_t	size;
	uint32_t	write_flags;
	uint64_t	lock_owner;
	uint32_t	flags;
	uint32_t	padding;
};

struct fuse_write_out {
	uint32_t	size;
	uint32_t	padding;
};

struct fuse_statfs_out {
	struct fuse_kstatfs st;
};

struct fuse_fsync_in {
	uint64_t	fh;
	uint32_t	fsync_flags;
	uint32_t	padding;
};

struct fuse_access_in {
	uint32_t	mask;
	uint32_t	padding;
};

struct fuse_fallocate_in {
	uint64_t	fh;
	uint64_t	offset;
	uint64_t	length;
	uint32_t	mode;
	uint32_t	padding;
};

struct fuse_lseek_in {
	uint64_t	fh;
	uint64_t	offset;
	uint32_t	whence;
	uint32_t	padding;
};

struct fuse_lseek_out {
	uint64_t	offset;
};

struct fuse_batch_forget_in {
	uint32_t	count;
	uint32_t	dummy;
};

/* ioctls on /dev/fuse */
#define FUSE_DEV_IOC_MAGIC	229
#define FUSE_DEV_IOC_CLONE	_IOR(FUSE_DEV_IOC_MAGIC, 0, uint32_t)
#define FUSE_DEV_IOC_BACKING_OPEN _IOW(FUSE_DEV_IOC_MAGIC, 1, struct fuse_backing_map)

/* FUSE_DEV_IOC_BACKING_OPEN argument: returns a backing id for OPEN. */
struct fuse_backing_map {
	int32_t		fd;
	uint32_t	flags;
	uint64_t	padding;
};

/*
 * FUSE-over-io_uring (7.42+).  Each ring entry owns two buffers registered
 * with FUSE_IO_URING_CMD_REGISTER: a fuse_uring_req_header and a payload
 * buffer of at least max(8192, max_write, max_pages * page size).
 */
#define FUSE_URING_IN_OUT_HEADER_SZ	128
#define FUSE_URING_OP_IN_OUT_SZ		128

struct fuse_uring_ent_in_out {
	uint64_t	flags;
	uint64_t	commit_id;	/* echo in the next COMMIT_AND_FETCH */
	uint32_t	payload_sz;	/* bytes valid in the payload buffer */
	uint32_t	padding;
	uint64_t	reserved;
};

struct fuse_uring_req_header {
	char	in_out[FUSE_URING_IN_OUT_HEADER_SZ];	/* in_header / out_header */
	char	op_in[FUSE_URING_OP_IN_OUT_SZ];		/* first request argument */
	struct fuse_uring_ent_in_out ring_ent_in_out;
};

enum fuse_uring_cmd {
	FUSE_IO_URING_CMD_INVALID		= 0,
	FUSE_IO_URING_CMD_REGISTER		= 1,
	FUSE_IO_URING_CMD_COMMIT_AND_FETCH	= 2,
};

/* Lives in the 80-byte command area of a 128-byte SQE. */
struct fuse_uring_cmd_req {
	uint64_t	flags;
	uint64_t	commit_id;
	uint16_t	qid;
	uint8_t		padding[6];
};

#endif /* UEXPORTD_FUSE_KERNEL_H */
