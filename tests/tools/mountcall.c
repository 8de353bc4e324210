/*
 * mountcall: one raw mount-related system call per command, for the integration tests.
 *
 * The tests run it inside containers (including minimal busybox roots, hence a static
 * binary) so that exactly the call under test reaches the supervisor, with no mount(8)
 * rewriting options on the way.  Each command prints one line, "OK" (perhaps with a value)
 * or the errno name, and the exit status is 0 for OK and 1 otherwise (2 for bad usage).
 *
 *   mountcall CMD ARGS...                      one command
 *   mountcall seq CMD ARGS... ';' CMD ARGS...  several, in order, in this one process
 *
 * An argument "-" means NULL.  Build: gcc -O2 -static -Wall -Wextra -o mountcall mountcall.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <grp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Our own copy of struct mount_attr and its bits: the test is of the raw ABI, not of headers. */
struct mc_mount_attr {
	uint64_t attr_set;
	uint64_t attr_clr;
	uint64_t propagation;
	uint64_t userns_fd;
};
#define MC_ATTR_NOSUID 0x2ULL
#define MC_ATTR_NODEV 0x4ULL
#define MC_NR_FSOPEN 430
#define MC_NR_MOUNT_SETATTR 442
#define MC_NR_MOUNT_I386 21
#define MC_UNTERMINATED 8192

struct flag_name {
	const char *name;
	unsigned long value;
};

static const struct flag_name mount_flags[] = {
	{"ro", MS_RDONLY}, {"nosuid", MS_NOSUID}, {"nodev", MS_NODEV}, {"noexec", MS_NOEXEC},
	{"remount", MS_REMOUNT}, {"bind", MS_BIND}, {"rec", MS_REC}, {"private", MS_PRIVATE},
	{"noatime", MS_NOATIME}, {NULL, 0},
};

static const struct flag_name umount_flags[] = {
	{"force", MNT_FORCE}, {"detach", MNT_DETACH}, {"expire", MNT_EXPIRE},
	{"nofollow", UMOUNT_NOFOLLOW}, {NULL, 0},
};

static void usage_error(const char *fmt, const char *what)
{
	fprintf(stderr, "mountcall: ");
	fprintf(stderr, fmt, what);
	fputc('\n', stderr);
	exit(2);
}

static const char *arg(const char *s)
{
	return strcmp(s, "-") == 0 ? NULL : s;
}

/* A number (strtoul base 0) or a comma list of names from `table`. */
static unsigned long parse_flags(const char *text, const struct flag_name *table)
{
	unsigned long value = 0;
	char *end;

	if (text[0] >= '0' && text[0] <= '9') {
		errno = 0;
		value = strtoul(text, &end, 0);
		if (errno || *end)
			usage_error("bad flags number '%s'", text);
		return value;
	}
	char *copy = strdup(text);
	for (char *save = NULL, *name = strtok_r(copy, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
		const struct flag_name *f = table;
		while (f->name && strcmp(f->name, name) != 0)
			f++;
		if (!f->name)
			usage_error("unknown flag '%s'", name);
		value |= f->value;
	}
	free(copy);
	return value;
}

static unsigned long parse_id(const char *text)
{
	char *end;

	errno = 0;
	unsigned long id = strtoul(text, &end, 10);
	if (errno || *end || !*text || id > UINT32_MAX - 1)
		usage_error("bad id '%s'", text);
	return id;
}

static int fail(int err)
{
	const char *name = strerrorname_np(err);

	if (name)
		printf("%s\n", name);
	else
		printf("E%d\n", err);
	return 1;
}

/* One output line for a libc-style result: OK, or the name of errno. */
static int report(long rc)
{
	if (rc < 0)
		return fail(errno);
	printf("OK\n");
	return 0;
}

static int report_value(long rc)
{
	if (rc < 0)
		return fail(errno);
	printf("OK %ld\n", rc);
	return 0;
}

static int cmd_mount(int argc, char **argv)
{
	return report(mount(arg(argv[0]), arg(argv[1]), arg(argv[2]), parse_flags(argv[3], mount_flags),
			    argc > 4 ? arg(argv[4]) : NULL));
}

#ifdef __x86_64__
/* Static non-PIE binary: .bss lies below 4 GiB, so these addresses fit i386 registers. */
static char src32[4096], tgt32[4096], type32[256];

static const char *copy32(char *buf, size_t size, const char *s)
{
	if (!s)
		return NULL;
	if (strlen(s) >= size)
		usage_error("argument too long for mount32: '%s'", s);
	strcpy(buf, s);
	if ((uintptr_t)buf > UINT32_MAX - size)
		usage_error("%s: static buffers above 4 GiB (built as PIE?)", "mount32");
	return buf;
}

static int cmd_mount32(int argc, char **argv)
{
	const char *src = copy32(src32, sizeof(src32), arg(argv[0]));
	const char *tgt = copy32(tgt32, sizeof(tgt32), arg(argv[1]));
	const char *type = copy32(type32, sizeof(type32), arg(argv[2]));
	unsigned long flags = parse_flags(argv[3], mount_flags);
	long rc;

	(void)argc;
	if (flags > UINT32_MAX)
		usage_error("flags '%s' do not fit 32 bits", argv[3]);
	/* The 64-bit kernel may clobber r8-r11 on int $0x80 (it did before 4.17). */
	__asm__ volatile("int $0x80"
			 : "=a"(rc)
			 : "0"((long)MC_NR_MOUNT_I386), "b"(src), "c"(tgt), "d"(type), "S"(flags), "D"(0L)
			 : "memory", "r8", "r9", "r10", "r11", "cc");
	if ((int)rc < 0) /* the compat ABI's result is a 32-bit -errno */
		return fail(-(int)rc);
	return report(0);
}
#else
static int cmd_mount32(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	return fail(ENOSYS);
}
#endif

static int cmd_umount(int argc, char **argv)
{
	return report(umount2(arg(argv[0]), argc > 1 ? (int)parse_flags(argv[1], umount_flags) : 0));
}

static int cmd_setattr_clear(int argc, char **argv)
{
	struct mc_mount_attr attr = {.attr_clr = MC_ATTR_NOSUID | MC_ATTR_NODEV};

	(void)argc;
	return report(syscall(MC_NR_MOUNT_SETATTR, AT_FDCWD, arg(argv[0]), 0, &attr, sizeof(attr)));
}

static int cmd_fsopen(int argc, char **argv)
{
	(void)argc;
	return report_value(syscall(MC_NR_FSOPEN, arg(argv[0]), 0));
}

static int cmd_badptr(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	return report(mount((const char *)1, "/mnt", "ext4", MS_RDONLY, NULL));
}

/* A target of 8192 'a' bytes running into an unmapped page: no NUL anywhere to find. */
static int cmd_unterminated(int argc, char **argv)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t len = ((MC_UNTERMINATED + page - 1) / page + 1) * page;
	char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	(void)argc;
	(void)argv;
	if (buf == MAP_FAILED)
		return fail(errno);
	if (munmap(buf + len - page, page) < 0)
		return fail(errno);
	memset(buf, 'a', len - page);
	return report(mount("none", buf, "ext4", MS_RDONLY, NULL));
}

static int cmd_open(int argc, char **argv)
{
	static const struct flag_name modes[] = {{"r", O_RDONLY}, {"w", O_WRONLY}, {"rw", O_RDWR}, {NULL, 0}};
	const struct flag_name *m = modes;

	(void)argc;
	while (m->name && strcmp(m->name, argv[1]) != 0)
		m++;
	if (!m->name)
		usage_error("open mode must be r, w or rw, not '%s'", argv[1]);
	int fd = open(arg(argv[0]), (int)m->value | O_CLOEXEC);
	if (fd >= 0)
		close(fd);
	return report(fd);
}

static int cmd_exec_as(int argc, char **argv)
{
	uid_t id = (uid_t)parse_id(argv[0]);

	fflush(stdout);
	if (setgroups(0, NULL) < 0 || setresgid(id, id, id) < 0 || setresuid(id, id, id) < 0)
		return fail(errno);
	char **args = calloc((size_t)argc, sizeof(*args)); /* argv[1..], NULL-terminated */
	for (int i = 1; i < argc; i++)
		args[i - 1] = argv[i];
	execv(argv[1], args);
	int err = errno;
	free(args);
	return fail(err);
}

/* A raw ioctl with a full 64-bit request word on PATH: the filter must look at the low 32 bits only. */
static int cmd_ioctl(int argc, char **argv)
{
	char *end;
	(void)argc;
	int fd = open(argv[0], O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return fail(errno);
	errno = 0;
	unsigned long long request = strtoull(argv[1], &end, 0);
	if (errno || *end)
		usage_error("bad request '%s'", argv[1]);
	long rc = syscall(SYS_ioctl, fd, request, 0);
	int err = errno;
	close(fd);
	errno = err;
	return report_value(rc);
}

static int cmd_euid(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	return report_value(geteuid());
}

/* READY, then block until a line (or EOF) on stdin: the test acts while we sit in the container. */
static int cmd_wait(int argc, char **argv)
{
	char c;
	ssize_t n;

	(void)argc;
	(void)argv;
	printf("READY\n");
	fflush(stdout);
	/* Byte by byte, so nothing past the line is taken from a program exec'd later. */
	while ((n = read(STDIN_FILENO, &c, 1)) == 1 && c != '\n')
		;
	return report(n < 0 ? -1 : 0);
}

/* --- tree attacks (tests/test_tree_attacks.py) ------------------------------------------- */
#include <signal.h>
#include <sys/wait.h>
#include <time.h>

/* ioctl(PATH, REQUEST, ARG) with an integer argument, e.g. LOOP_CTL_REMOVE 3. */
static int cmd_ioctl_arg(int argc, char **argv)
{
	(void)argc;
	int fd = open(argv[0], O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return fail(errno);
	long rc = syscall(SYS_ioctl, fd, strtoul(argv[1], NULL, 0), strtoul(argv[2], NULL, 0));
	int err = errno;
	close(fd);
	errno = err;
	return report_value(rc);
}

static double mc_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Bind SRC over TGT (a name that comes and goes) as often as it can for SECONDS; undo each bind. */
static int cmd_bind_race(int argc, char **argv)
{
	double end = mc_now() + strtod(argv[2], NULL);
	long binds = 0;

	(void)argc;
	while (mc_now() < end) {
		if (mount(argv[0], argv[1], NULL, MS_BIND, NULL) == 0) {
			binds++;
			umount2(argv[1], MNT_DETACH);
		}
	}
	printf("OK binds=%ld\n", binds);
	return 0;
}

/* Run `call` COUNT times on TGT while a child swaps directories A and B (RENAME_EXCHANGE), so the
 * path the supervisor judged is not the one the kernel may walk again; prints the tally. */
static int exchange_race(char **argv, int (*call)(const char *target, unsigned long flags), unsigned long flags,
			 const char *done)
{
	long count = strtol(argv[4], NULL, 10), ok = 0, other = 0;
	pid_t child = fork();

	if (child < 0)
		return fail(errno);
	if (child == 0) {
		for (;;)
			syscall(SYS_renameat2, AT_FDCWD, argv[2], AT_FDCWD, argv[3], 2 /* RENAME_EXCHANGE */);
	}
	for (long i = 0; i < count; i++) {
		if (call(argv[0], flags) == 0)
			ok++;
		else
			other++;
	}
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	printf("OK %s=%ld refused=%ld\n", done, ok, other);
	return 0;
}

static int race_umount(const char *target, unsigned long flags)
{
	return umount2(target, (int)flags);
}

static int race_remount(const char *target, unsigned long flags)
{
	return mount(NULL, target, NULL, flags, NULL);
}

/* umount-race TGT FLAGS DIR_A DIR_B COUNT */
static int cmd_umount_race(int argc, char **argv)
{
	(void)argc;
	return exchange_race(argv, race_umount, parse_flags(argv[1], umount_flags), "unmounted");
}

/* --- loop limits and live mounts (issue 9, limits) ------------------------------------------- */
#include <linux/loop.h>
#include <sys/ioctl.h>

/* COUNT times: bind a free device to FILE, keep an fd on the bound device, clear it; "HELD i" each. */
static int cmd_loophold(int argc, char **argv)
{
	char path[64];
	int count = atoi(argv[0]);

	(void)argc;
	int backing = open(argv[1], O_RDONLY | O_CLOEXEC);
	int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
	if (backing < 0 || ctl < 0)
		return fail(errno);
	for (int i = 0; i < count; i++) {
		int n = ioctl(ctl, LOOP_CTL_GET_FREE);
		if (n < 0)
			return fail(errno);
		snprintf(path, sizeof(path), "/dev/loop%d", n);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || ioctl(fd, LOOP_SET_FD, backing) < 0)
			return fail(errno);
		close(fd);
		int held = open(path, O_RDONLY | O_CLOEXEC); /* the bound device's node now; kept open */
		if (held < 0 || ioctl(held, LOOP_CLR_FD, 0) < 0)
			return fail(errno);
		printf("HELD %d\n", i + 1);
	}
	return report(0);
}

/* LOOP_CHANGE_FD of DEV to FILE. */
static int cmd_loopchangefd(int argc, char **argv)
{
	(void)argc;
	int fd = open(argv[0], O_RDONLY | O_CLOEXEC);
	int file = open(argv[1], O_RDONLY | O_CLOEXEC);
	if (fd < 0 || file < 0)
		return fail(errno);
	return report(ioctl(fd, LOOP_CHANGE_FD, file));
}

/* LOOP_SET_STATUS64 of DEV with its offset and sizelimit set to OFFSET and SIZELIMIT. */
static int cmd_loopstatus(int argc, char **argv)
{
	struct loop_info64 info;

	(void)argc;
	int fd = open(argv[0], O_RDONLY | O_CLOEXEC);
	if (fd < 0 || ioctl(fd, LOOP_GET_STATUS64, &info) < 0)
		return fail(errno);
	info.lo_offset = strtoull(argv[1], NULL, 0);
	info.lo_sizelimit = strtoull(argv[2], NULL, 0);
	return report(ioctl(fd, LOOP_SET_STATUS64, &info));
}

/* --- filter, memory and capability probes (issue 9: filter part) ------------------------------ */

/* Up to five raw syscall arguments: a number (strtoll base 0) or "s:TEXT", a pointer to a copy
 * of TEXT in .bss (below 4 GiB in this static non-PIE binary, so it also fits i386 registers). */
static char raw_pool[8192];
static size_t raw_used;

static unsigned long raw_arg(const char *text)
{
	if (strncmp(text, "s:", 2) == 0) {
		size_t len = strlen(text + 2) + 1;
		if (raw_used + len > sizeof(raw_pool))
			usage_error("raw string arguments too long: '%s'", text);
		char *copy = memcpy(raw_pool + raw_used, text + 2, len);
		raw_used += len;
		return (unsigned long)copy;
	}
	char *end;
	errno = 0;
	long long value = strtoll(text, &end, 0);
	if (errno || *end)
		usage_error("bad raw argument '%s'", text);
	return (unsigned long)value;
}

static void raw_args(int argc, char **argv, unsigned long a[5])
{
	if (argc > 6)
		usage_error("%s: at most five arguments", "raw");
	for (int i = 0; i < 5; i++)
		a[i] = i + 1 < argc ? raw_arg(argv[i + 1]) : 0;
}

/* syscall(NR, ARGS...) on the native ABI; "rawx32" sets x32's bit 30 on the number. */
static int raw_call(int argc, char **argv, unsigned long bit)
{
	unsigned long a[5];

	raw_args(argc, argv, a);
	return report_value(syscall((long)(raw_arg(argv[0]) | bit), a[0], a[1], a[2], a[3], a[4]));
}

static int cmd_raw(int argc, char **argv)
{
	return raw_call(argc, argv, 0);
}

static int cmd_rawx32(int argc, char **argv)
{
	return raw_call(argc, argv, 0x40000000UL);
}

#ifdef __x86_64__
static int cmd_raw32(int argc, char **argv)
{
	unsigned long a[5];
	long rc;

	raw_args(argc, argv, a);
	__asm__ volatile("int $0x80"
			 : "=a"(rc)
			 : "0"((long)raw_arg(argv[0])), "b"(a[0]), "c"(a[1]), "d"(a[2]), "S"(a[3]), "D"(a[4])
			 : "memory", "r8", "r9", "r10", "r11", "cc");
	if ((int)rc < 0)
		return fail(-(int)rc);
	printf("OK %d\n", (int)rc);
	return 0;
}
#else
static int cmd_raw32(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	return fail(ENOSYS);
}
#endif

/* One page with protection PROT (none|ro|rw), for pointers the kernel must refuse with EFAULT. */
static void *page_with(const char *prot)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	int p = strcmp(prot, "none") == 0 ? PROT_NONE : strcmp(prot, "ro") == 0 ? PROT_READ : -1;
	if (strcmp(prot, "rw") == 0)
		p = PROT_READ | PROT_WRITE;
	if (p < 0)
		usage_error("page protection must be none, ro or rw, not '%s'", prot);
	char *buf = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		exit(fail(errno));
	strcpy(buf, "/mnt"); /* a valid string, were the page readable */
	if (mprotect(buf, page, p) < 0)
		exit(fail(errno));
	return buf;
}

/* mount(SRC, <a string on a page of PROT>, FSTYPE, ro) */
static int cmd_mount_page(int argc, char **argv)
{
	(void)argc;
	return report(mount(argv[0], page_with(argv[1]), argv[2], MS_RDONLY, NULL));
}

/* ioctl(open(PATH), REQUEST, <a page of PROT>): a result written there must be EFAULT unless rw. */
static int cmd_ioctl_page(int argc, char **argv)
{
	(void)argc;
	int fd = open(argv[0], O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return fail(errno);
	long rc = ioctl(fd, (unsigned long)raw_arg(argv[1]), page_with(argv[2]));
	int err = errno;
	close(fd);
	errno = err;
	return report_value(rc);
}

/* open_tree_attr(2) of TGT, cloned with nosuid,nodev cleared, then moved back over TGT: the
 * attack on forced flags that the filter must refuse (Linux 6.15+, nr 467 everywhere). */
static int cmd_open_tree_attr_clear(int argc, char **argv)
{
	struct mc_mount_attr attr = {.attr_clr = MC_ATTR_NOSUID | MC_ATTR_NODEV};

	(void)argc;
	long fd = syscall(467, AT_FDCWD, argv[0], 1 /* OPEN_TREE_CLONE */, &attr, sizeof(attr));
	if (fd < 0)
		return fail(errno);
	long rc = syscall(429, (int)fd, "", AT_FDCWD, argv[0], 4 /* MOVE_MOUNT_F_EMPTY_PATH */);
	close((int)fd);
	return report(rc);
}

/* A new user namespace (and with "mnt" a mount namespace owned by it), then the next command. */
static int cmd_userns(int argc, char **argv)
{
	int flags = CLONE_NEWUSER;

	if (argc > 0 && strcmp(argv[0], "mnt") == 0)
		flags |= CLONE_NEWNS;
	else if (argc > 0)
		usage_error("userns takes nothing or 'mnt', not '%s'", argv[0]);
	return report(unshare(flags));
}

/* --- isolation: what the container can see and reach (terminals, processes, sockets) --- */
#include <signal.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/un.h>

/* An fd number as given, or PATH opened read-write without becoming our controlling terminal. */
static int fd_or_open(const char *what)
{
	char *end;
	long fd = strtol(what, &end, 10);

	if (*what && !*end)
		return (int)fd;
	return open(what, O_RDWR | O_NOCTTY | O_CLOEXEC);
}

/* Push TEXT (and a newline) into the input queue of the terminal on FD|PATH. */
static int cmd_tiocsti(int argc, char **argv)
{
	(void)argc;
	int fd = fd_or_open(argv[0]);
	if (fd < 0)
		return fail(errno);
	for (const char *c = argv[1];; c++) {
		char ch = *c ? *c : '\n';
		if (ioctl(fd, TIOCSTI, &ch) < 0)
			return fail(errno);
		if (!*c)
			break;
	}
	return report(0);
}

static long parse_pid(const char *text)
{
	char *end;
	long pid = strtol(text, &end, 10);

	if (!*text || *end || pid <= 0)
		usage_error("bad pid '%s'", text);
	return pid;
}

static int cmd_kill0(int argc, char **argv)
{
	(void)argc;
	return report(kill((pid_t)parse_pid(argv[0]), 0));
}

static int cmd_pidfd(int argc, char **argv)
{
	(void)argc;
	return report(syscall(SYS_pidfd_open, parse_pid(argv[0]), 0));
}

static int cmd_ptrace(int argc, char **argv)
{
	(void)argc;
	pid_t pid = (pid_t)parse_pid(argv[0]);
	long rc = ptrace(PTRACE_SEIZE, pid, 0, 0);
	int err = errno;
	if (rc == 0)
		ptrace(PTRACE_DETACH, pid, 0, 0);
	errno = err;
	return report(rc);
}

/* Connect to the abstract unix socket NAME ("@NAME" in ss). */
static int cmd_connect_abstract(int argc, char **argv)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	size_t len = strlen(argv[0]);
	(void)argc;
	if (len + 1 > sizeof(addr.sun_path))
		usage_error("abstract name too long: '%s'", argv[0]);
	memcpy(addr.sun_path + 1, argv[0], len);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return fail(errno);
	return report(connect(fd, (struct sockaddr *)&addr, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len)));
}

/* Connect to 127.0.0.1:PORT over TCP. */
static int cmd_connect_tcp(int argc, char **argv)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	(void)argc;
	addr.sin_port = htons((uint16_t)parse_pid(argv[0]));
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return fail(errno);
	return report(connect(fd, (struct sockaddr *)&addr, sizeof(addr)));
}
/* --- end isolation --- */

/* ---- taking over a FUSE daemon (tests/test_fuse_attacks.py) ---------------------------------- */
#include <sched.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>

/* Copy `len` bytes into task `pid` at `addr`, one word at a time. */
static int poke(pid_t pid, unsigned long addr, const char *data, size_t len)
{
	for (size_t i = 0; i < len; i += sizeof(long)) {
		long word = 0;
		memcpy(&word, data + i, len - i < sizeof(long) ? len - i : sizeof(long));
		if (ptrace(PTRACE_POKEDATA, pid, addr + i, word) < 0)
			return -1;
	}
	return 0;
}

/*
 * inject PID NR [ARG...]: make task PID itself run system call NR (x86-64), through ptrace, then
 * let it go on as it was. "s:TEXT" arguments are copied below its stack pointer and passed as
 * pointers; the others are numbers. Prints the task's own result (OK VALUE, or its errno name).
 */
static int cmd_inject(int argc, char **argv)
{
	pid_t pid = (pid_t)parse_id(argv[0]);
	struct user_regs_struct saved, regs;
	unsigned long long a[6] = {0};
	int status, err = 0;
	long rc;

	if (ptrace(PTRACE_SEIZE, pid, 0, 0) < 0 || ptrace(PTRACE_INTERRUPT, pid, 0, 0) < 0)
		return fail(errno);
	if (waitpid(pid, &status, __WALL) < 0 || ptrace(PTRACE_GETREGS, pid, 0, &saved) < 0)
		return fail(errno);
	/* Stopped in a system call, rip follows its two-byte `syscall` (0f 05): run that one again. */
	long insn = ptrace(PTRACE_PEEKTEXT, pid, saved.rip - 2, 0);
	if ((long long)saved.orig_rax < 0 || (insn & 0xffff) != 0x050f)
		usage_error("%s: the task is not stopped in a system call", argv[0]);
	regs = saved;
	unsigned long sp = (saved.rsp - 4096) & ~15UL;
	for (int i = 2; i < argc && i < 8; i++) {
		if (strncmp(argv[i], "s:", 2) == 0) {
			size_t len = strlen(argv[i] + 2) + 1;
			sp -= (len + 15) & ~15UL;
			if (poke(pid, sp, argv[i] + 2, len) < 0)
				return fail(errno);
			a[i - 2] = sp;
		} else {
			a[i - 2] = strtoull(argv[i], NULL, 0);
		}
	}
	regs.rip = saved.rip - 2;
	regs.rax = strtoull(argv[1], NULL, 0);
	regs.orig_rax = (unsigned long long)-1; /* no restart of the interrupted call on resume */
	regs.rdi = a[0], regs.rsi = a[1], regs.rdx = a[2], regs.r10 = a[3], regs.r8 = a[4], regs.r9 = a[5];
	regs.rsp = sp - 128;
	if (ptrace(PTRACE_SETREGS, pid, 0, &regs) < 0)
		return fail(errno);
	for (int stop = 0; stop < 2; stop++) /* syscall entry, then exit */
		if (ptrace(PTRACE_SYSCALL, pid, 0, 0) < 0 || waitpid(pid, &status, __WALL) < 0)
			return fail(errno);
	if (ptrace(PTRACE_GETREGS, pid, 0, &regs) < 0)
		return fail(errno);
	rc = (long)regs.rax;
	if (ptrace(PTRACE_SETREGS, pid, 0, &saved) < 0 || ptrace(PTRACE_DETACH, pid, 0, 0) < 0)
		err = errno;
	if (rc < 0 && rc > -4096)
		return fail((int)-rc);
	if (err)
		return fail(err);
	printf("OK %ld\n", rc);
	return 0;
}

/* enter-mnt PID: join the mount namespace of task PID (the rest of a seq runs there). */
static int cmd_enter_mnt(int argc, char **argv)
{
	(void)argc;
	int fd = (int)syscall(434 /* pidfd_open */, (pid_t)parse_id(argv[0]), 0);
	if (fd < 0)
		return fail(errno);
	long rc = setns(fd, CLONE_NEWNS);
	close(fd);
	return report(rc);
}
/* ---- end of the FUSE daemon block ------------------------------------------------------------ */

/* --- red team: a detached clone kept across commands of one seq ----------------------------- */
static int rt_clone_fd = -1;

/* clone PATH: open_tree(OPEN_TREE_CLONE) of the mount at PATH, kept for a later "attach". */
static int cmd_clone(int argc, char **argv)
{
	(void)argc;
	long fd = syscall(428 /* open_tree */, AT_FDCWD, argv[0], 1 /* OPEN_TREE_CLONE */ | O_CLOEXEC);
	if (fd < 0)
		return fail(errno);
	rt_clone_fd = (int)fd;
	return report(0);
}

/* attach PATH: move_mount the clone kept by "clone" onto PATH. */
static int cmd_attach(int argc, char **argv)
{
	(void)argc;
	long rc = syscall(429 /* move_mount */, rt_clone_fd, "", AT_FDCWD, argv[0], 4 /* MOVE_MOUNT_F_EMPTY_PATH */);
	return report(rc);
}
/* remount-race TGT FLAGS DIR_A DIR_B COUNT: a superblock remount raced with a path swap. */
static int cmd_remount_race(int argc, char **argv)
{
	(void)argc;
	return exchange_race(argv, race_remount, parse_flags(argv[1], mount_flags), "remounted");
}

/* clone-rec PATH: like clone, with AT_RECURSIVE (the mounts below PATH come along). */
static int cmd_clone_rec(int argc, char **argv)
{
	(void)argc;
	long fd = syscall(428 /* open_tree */, AT_FDCWD, argv[0], 1 /* OPEN_TREE_CLONE */ | 0x8000 | O_CLOEXEC);
	if (fd < 0)
		return fail(errno);
	rt_clone_fd = (int)fd;
	return report(0);
}
/* ---- end of the red team block ---------------------------------------------------------------- */

/* --- red team 3: the landing and the FUSE daemon's own mount ------------------------------- */
#include <dirent.h>
#include <sys/vfs.h>
#include <time.h>

/* The pid of a process named COMM in our /proc, or -1. */
static int rt3_find(const char *comm)
{
	DIR *proc = opendir("/proc");
	struct dirent *e;
	int found = -1;

	if (!proc)
		return -1;
	while (found < 0 && (e = readdir(proc)) != NULL) {
		char path[300], name[64] = "";
		if (e->d_name[0] < '1' || e->d_name[0] > '9')
			continue;
		snprintf(path, sizeof(path), "/proc/%s/comm", e->d_name);
		FILE *f = fopen(path, "re");
		if (!f)
			continue;
		if (fgets(name, sizeof(name), f) && strcspn(name, "\n") == strlen(comm) && !strncmp(name, comm, strlen(comm)))
			found = atoi(e->d_name);
		fclose(f);
	}
	closedir(proc);
	return found;
}

/* fuse-steal COMM SECONDS: wait for a process named COMM, join its mount namespace and clone the
 * FUSE mount on its /mnt the moment one is there (kept for "attach"), then come back home. */
static int cmd_fuse_steal(int argc, char **argv)
{
	time_t end = time(NULL) + atoi(argv[1]);
	int home = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC), pid = -1, ns = -1;

	(void)argc;
	while (pid < 0 || ns < 0) {
		if (time(NULL) > end)
			return fail(ETIMEDOUT);
		pid = rt3_find(argv[0]);
		if (pid > 0) {
			char path[64];
			snprintf(path, sizeof(path), "/proc/%d/ns/mnt", pid);
			ns = open(path, O_RDONLY | O_CLOEXEC);
		}
	}
	if (setns(ns, CLONE_NEWNS) != 0)
		return fail(errno);
	while (rt_clone_fd < 0) {
		struct statfs sf;
		long fd = syscall(428 /* open_tree */, AT_FDCWD, "/mnt", 1 /* OPEN_TREE_CLONE */ | O_CLOEXEC);
		if (fd >= 0 && fstatfs((int)fd, &sf) == 0 && sf.f_type == 0x65735546 /* FUSE */)
			rt_clone_fd = (int)fd;
		else if (fd >= 0)
			close((int)fd);
		if (rt_clone_fd < 0 && (time(NULL) > end || kill(pid, 0) != 0))
			return fail(ETIMEDOUT);
	}
	return report(setns(home, CLONE_NEWNS));
}

/* setattr-clear-all TGT: mount_setattr clearing ro, nosuid, nodev and noexec. */
static int cmd_setattr_clear_all(int argc, char **argv)
{
	struct mc_mount_attr attr = {.attr_clr = 0x1 | MC_ATTR_NOSUID | MC_ATTR_NODEV | 0x8};

	(void)argc;
	return report(syscall(MC_NR_MOUNT_SETATTR, AT_FDCWD, arg(argv[0]), 0, &attr, sizeof(attr)));
}
/* ---- end of the red team 3 block -------------------------------------------------------------- */

/* --- kernel parity: mount(2)/umount2(2) (tests/parity.py, tests/test_parity_mount.py) ----------- */
#include <sys/statvfs.h>

/* flags PATH: the top mount at PATH as mountinfo shows it, and statvfs's f_flag, as
 * "OK mnt=PER-MOUNT-OPTIONS sb=SUPER-OPTIONS st=ST_NAMES" (mountinfo's own escaping kept). */
static int cmd_flags(int argc, char **argv)
{
	static const struct flag_name st_names[] = {
		{"ro", ST_RDONLY}, {"nosuid", ST_NOSUID}, {"nodev", ST_NODEV}, {"noexec", ST_NOEXEC},
		{"sync", ST_SYNCHRONOUS}, {"mand", ST_MANDLOCK}, {"noatime", ST_NOATIME},
		{"nodiratime", ST_NODIRATIME}, {"relatime", ST_RELATIME}, {"nosymfollow", 0x2000},
		{NULL, 0},
	};
	char line[4096], mnt[1024] = "", sb[1024] = "", st[256] = "";
	struct statvfs sv;
	FILE *f = fopen("/proc/self/mountinfo", "re");

	(void)argc;
	if (!f)
		return fail(errno);
	while (fgets(line, sizeof(line), f)) {
		char *save = NULL, *fields[64];
		int n = 0;
		for (char *tok = strtok_r(line, " \n", &save); tok && n < 64; tok = strtok_r(NULL, " \n", &save))
			fields[n++] = tok;
		int dash = 6;
		while (dash < n && strcmp(fields[dash], "-") != 0)
			dash++;
		if (n < 7 || dash + 3 >= n || strcmp(fields[4], argv[0]) != 0)
			continue;
		snprintf(mnt, sizeof(mnt), "%s", fields[5]); /* the last match is the top mount */
		snprintf(sb, sizeof(sb), "%s", fields[dash + 3]);
	}
	fclose(f);
	if (!*mnt)
		return fail(ENOENT);
	if (statvfs(argv[0], &sv) < 0)
		return fail(errno);
	for (const struct flag_name *s = st_names; s->name; s++)
		if (sv.f_flag & s->value)
			snprintf(st + strlen(st), sizeof(st) - strlen(st), "%s%s", *st ? "," : "", s->name);
	printf("OK mnt=%s sb=%s st=%s\n", mnt, sb, *st ? st : "-");
	return 0;
}

/* mount-on WHICH PROT SRC TGT FSTYPE FLAGS [DATA]: mount(2) with argument WHICH (src|type|data)
 * copied onto a page of PROT (none|ro|rw), e.g. a source the kernel must refuse with EFAULT. */
static int cmd_mount_on(int argc, char **argv)
{
	const char *args[4] = {arg(argv[2]), arg(argv[3]), arg(argv[4]), argc > 6 ? arg(argv[6]) : NULL};
	int which = strcmp(argv[0], "src") == 0 ? 0 : strcmp(argv[0], "type") == 0 ? 2 : strcmp(argv[0], "data") == 0 ? 3 : -1;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	if (which < 0)
		usage_error("mount-on: which argument, src, type or data, not '%s'", argv[0]);
	int prot = strcmp(argv[1], "none") == 0 ? PROT_NONE : strcmp(argv[1], "ro") == 0 ? PROT_READ : PROT_READ | PROT_WRITE;
	char *buf = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		return fail(errno);
	snprintf(buf, page, "%s", args[which] ? args[which] : "");
	if (mprotect(buf, page, prot) < 0)
		return fail(errno);
	args[which] = buf;
	return report(mount(args[0], args[1], args[2], parse_flags(argv[5], mount_flags), args[3]));
}

/* symlink TARGET LINK */
static int cmd_symlink(int argc, char **argv)
{
	(void)argc;
	return report(symlink(argv[0], argv[1]));
}
/* ---- end of the kernel parity: mount block ------------------------------------------------- */

struct command {
	const char *name;
	int min_args;
	int max_args; /* -1: any number */
	int (*run)(int argc, char **argv);
	const char *usage;
};

/* audit flood control: repeat N CMD ARGS... runs CMD N times in this process and prints one
 * line per distinct outcome, "OUTCOME COUNT" (OK, or an errno name), instead of one per call. */
static const struct command *lookup(int argc, char **argv);

static int cmd_repeat(int argc, char **argv)
{
	const struct command *cmd = lookup(argc - 1, argv + 1);
	unsigned long n = parse_id(argv[0]);
	int status = 0, saved = dup(STDOUT_FILENO), devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
	unsigned long ok = 0, failed[4096] = {0};

	if (cmd->run == cmd_exec_as || cmd->run == cmd_wait || cmd->run == cmd_repeat)
		usage_error("repeat: %s cannot be repeated", argv[1]);
	if (saved < 0 || devnull < 0)
		return fail(errno);
	fflush(stdout);
	for (unsigned long i = 0; i < n; i++) {
		dup2(devnull, STDOUT_FILENO); /* the command's own line; only its errno is kept */
		errno = 0;
		int rc = cmd->run(argc - 2, argv + 2);
		int err = errno;
		fflush(stdout);
		dup2(saved, STDOUT_FILENO);
		status |= rc;
		if (rc == 0)
			ok++;
		else
			failed[err > 0 && err < 4096 ? err : 0]++;
	}
	close(devnull);
	close(saved);
	if (ok)
		printf("OK %lu\n", ok);
	for (int e = 0; e < 4096; e++) {
		if (!failed[e])
			continue;
		const char *name = e ? strerrorname_np(e) : NULL;
		if (name)
			printf("%s %lu\n", name, failed[e]);
		else
			printf("E%d %lu\n", e, failed[e]);
	}
	return status;
}

static const struct command commands[] = {
	{"mount", 4, 5, cmd_mount, "mount SRC TGT FSTYPE FLAGS [DATA]"},
	{"mount32", 4, 4, cmd_mount32, "mount32 SRC TGT FSTYPE FLAGS"},
	{"umount", 1, 2, cmd_umount, "umount TGT [FLAGS]"},
	{"setattr-clear", 1, 1, cmd_setattr_clear, "setattr-clear TGT"},
	{"fsopen", 1, 1, cmd_fsopen, "fsopen FSTYPE"},
	{"badptr", 0, 0, cmd_badptr, "badptr"},
	{"unterminated", 0, 0, cmd_unterminated, "unterminated"},
	{"open", 2, 2, cmd_open, "open PATH r|w|rw"},
	{"exec-as", 2, -1, cmd_exec_as, "exec-as UID PATH [ARGS...]"},
	{"ioctl", 2, 2, cmd_ioctl, "ioctl PATH REQUEST"},
	{"euid", 0, 0, cmd_euid, "euid"},
	{"wait", 0, 0, cmd_wait, "wait"},
	{"ioctl-arg", 3, 3, cmd_ioctl_arg, "ioctl-arg PATH REQUEST ARG"},
	{"bind-race", 3, 3, cmd_bind_race, "bind-race SRC TGT SECONDS"},
	{"umount-race", 5, 5, cmd_umount_race, "umount-race TGT FLAGS DIR_A DIR_B COUNT"},
	{"loophold", 2, 2, cmd_loophold, "loophold COUNT FILE"},
	{"loopchangefd", 2, 2, cmd_loopchangefd, "loopchangefd DEV FILE"},
	{"loopstatus", 3, 3, cmd_loopstatus, "loopstatus DEV OFFSET SIZELIMIT"},
	{"repeat", 2, -1, cmd_repeat, "repeat N CMD ARGS..."},
	{"raw", 1, 6, cmd_raw, "raw NR [ARG...]  (ARG: number or s:TEXT)"},
	{"raw32", 1, 6, cmd_raw32, "raw32 NR [ARG...]  (i386 int $0x80)"},
	{"rawx32", 1, 6, cmd_rawx32, "rawx32 NR [ARG...]  (x32 bit set)"},
	{"mount-page", 3, 3, cmd_mount_page, "mount-page SRC none|ro|rw FSTYPE"},
	{"ioctl-page", 3, 3, cmd_ioctl_page, "ioctl-page PATH REQUEST none|ro|rw"},
	{"userns", 0, 1, cmd_userns, "userns [mnt]"},
	{"open-tree-attr-clear", 1, 1, cmd_open_tree_attr_clear, "open-tree-attr-clear TGT"},
	{"tiocsti", 2, 2, cmd_tiocsti, "tiocsti FD|PATH TEXT"},
	{"kill0", 1, 1, cmd_kill0, "kill0 PID"},
	{"pidfd", 1, 1, cmd_pidfd, "pidfd PID"},
	{"ptrace", 1, 1, cmd_ptrace, "ptrace PID"},
	{"connect-abstract", 1, 1, cmd_connect_abstract, "connect-abstract NAME"},
	{"connect-tcp", 1, 1, cmd_connect_tcp, "connect-tcp PORT"},
	{"inject", 2, 8, cmd_inject, "inject PID NR [ARG...]"},
	{"enter-mnt", 1, 1, cmd_enter_mnt, "enter-mnt PID"},
	{"clone", 1, 1, cmd_clone, "clone PATH"},
	{"attach", 1, 1, cmd_attach, "attach PATH"},
	{"clone-rec", 1, 1, cmd_clone_rec, "clone-rec PATH"},
	{"remount-race", 5, 5, cmd_remount_race, "remount-race TGT FLAGS DIR_A DIR_B COUNT"},
	{"fuse-steal", 2, 2, cmd_fuse_steal, "fuse-steal COMM SECONDS"},
	{"setattr-clear-all", 1, 1, cmd_setattr_clear_all, "setattr-clear-all TGT"},
	{"flags", 1, 1, cmd_flags, "flags PATH"},
	{"mount-on", 6, 7, cmd_mount_on, "mount-on src|type|data none|ro|rw SRC TGT FSTYPE FLAGS [DATA]"},
	{"symlink", 2, 2, cmd_symlink, "symlink TARGET LINK"},
};
#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

static void usage(void)
{
	fprintf(stderr, "usage: mountcall CMD ARGS...  |  mountcall seq CMD ARGS... ';' CMD ARGS...\n");
	for (size_t i = 0; i < N_COMMANDS; i++)
		fprintf(stderr, "  %s\n", commands[i].usage);
	exit(2);
}

/* The command for argv[0] with argc-1 arguments; bad usage exits before anything runs. */
static const struct command *lookup(int argc, char **argv)
{
	for (size_t i = 0; i < N_COMMANDS; i++) {
		const struct command *c = &commands[i];
		if (strcmp(c->name, argv[0]) != 0)
			continue;
		if (argc - 1 < c->min_args || (c->max_args >= 0 && argc - 1 > c->max_args))
			usage_error("usage: mountcall %s", c->usage);
		return c;
	}
	usage_error("unknown command '%s'", argv[0]);
	return NULL;
}

int main(int argc, char **argv)
{
	struct step {
		const struct command *cmd;
		int argc;
		char **argv;
	} steps[argc];
	int n = 0, status = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2)
		usage();
	if (strcmp(argv[1], "seq") != 0)
		return lookup(argc - 1, argv + 1)->run(argc - 2, argv + 2);
	/* Check names and argument counts first, so such a typo cannot leave a half-done sequence. */
	for (int i = 2, start = 2; i <= argc; i++) {
		if (i < argc && strcmp(argv[i], ";") != 0)
			continue;
		if (i == start)
			usage_error("%s: empty command in seq", "seq");
		if (n > 0 && steps[n - 1].cmd->run == cmd_exec_as)
			usage_error("%s: exec-as must be the last command of a seq", "seq");
		steps[n++] = (struct step){lookup(i - start, argv + start), i - start - 1, argv + start + 1};
		start = i + 1;
	}
	for (int i = 0; i < n; i++)
		status |= steps[i].cmd->run(steps[i].argc, steps[i].argv);
	return status;
}
