/*
 * abi32: loop and block ioctls as a 32-bit program makes them, for the ABI tests.
 *
 * Built with gcc -m32 -static (i386) and, where the kernel runs x32, -mx32 -static. Each
 * result struct sits in a buffer filled with 0xA5 bytes, and "tail=clean" means the bytes past
 * the struct's 32-bit size were left alone: an answer written in a 64-bit layout overruns them.
 *
 *   abi32 loop DEV IMAGE       bind IMAGE to DEV, then query and change it through the same fd
 *   abi32 mount SRC TGT FSTYPE a read-only mount(2) through this ABI's entry point
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <unistd.h>

#define GUARD 64

static unsigned char buf[sizeof(struct loop_info64) + GUARD];

static const char *errname(int err)
{
	const char *name = strerrorname_np(err);
	return name ? name : "E?";
}

static void *fresh(void)
{
	memset(buf, 0xA5, sizeof(buf));
	return buf;
}

static const char *tail(size_t size)
{
	for (size_t i = size; i < size + GUARD; i++)
		if (buf[i] != 0xA5)
			return "overrun";
	return "clean";
}

static int step(const char *what, int rc)
{
	if (rc < 0) {
		printf("%s %s\n", what, errname(errno));
		return 0;
	}
	return 1;
}

static int cmd_loop(const char *dev, const char *image)
{
	int fd = open(dev, O_RDWR | O_CLOEXEC), img = open(image, O_RDONLY | O_CLOEXEC);

	if (fd < 0 || img < 0) {
		printf("open %s\n", errname(errno));
		return 1;
	}
	printf("sizeof loop_info=%zu long=%zu\n", sizeof(struct loop_info), sizeof(long));
	if (step("set-fd", ioctl(fd, LOOP_SET_FD, img)))
		printf("set-fd OK\n");
	struct loop_info *info = fresh();
	if (step("get-status", ioctl(fd, LOOP_GET_STATUS, info)))
		printf("get-status OK number=%d flags=%d offset=%d name=%.64s tail=%s\n", info->lo_number,
		       info->lo_flags, info->lo_offset, info->lo_name, tail(sizeof(*info)));
	unsigned long *sectors = fresh();
	if (step("blkgetsize", ioctl(fd, BLKGETSIZE, sectors)))
		printf("blkgetsize OK %lu tail=%s\n", *sectors, tail(sizeof(*sectors)));
	uint64_t *bytes = fresh();
	if (step("blkgetsize64", ioctl(fd, BLKGETSIZE64, bytes)))
		printf("blkgetsize64 OK %llu tail=%s\n", (unsigned long long)*bytes, tail(sizeof(*bytes)));
	struct loop_info set;
	if (step("set-status", ioctl(fd, LOOP_GET_STATUS, &set))) {
		set.lo_offset = 1024;
		if (step("set-status", ioctl(fd, LOOP_SET_STATUS, &set))) {
			struct loop_info64 *info64 = fresh();
			if (step("get-status64", ioctl(fd, LOOP_GET_STATUS64, info64)))
				printf("set-status OK offset=%llu sizelimit=%llu\n",
				       (unsigned long long)info64->lo_offset,
				       (unsigned long long)info64->lo_sizelimit);
		}
	}
	if (step("clear", ioctl(fd, LOOP_CLR_FD, 0)))
		printf("clear OK\n");
	close(img);
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 4 && strcmp(argv[1], "loop") == 0)
		return cmd_loop(argv[2], argv[3]);
	if (argc == 5 && strcmp(argv[1], "mount") == 0) {
		if (mount(argv[2], argv[3], argv[4], MS_RDONLY, NULL) < 0) {
			printf("%s\n", errname(errno));
			return 1;
		}
		printf("OK\n");
		return 0;
	}
	fprintf(stderr, "usage: abi32 loop DEV IMAGE | abi32 mount SRC TGT FSTYPE\n");
	return 2;
}
