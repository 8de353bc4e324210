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

struct command {
	const char *name;
	int min_args;
	int max_args; /* -1: any number */
	int (*run)(int argc, char **argv);
	const char *usage;
};

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
	{"inject", 2, 8, cmd_inject, "inject PID NR [ARG...]"},
	{"enter-mnt", 1, 1, cmd_enter_mnt, "enter-mnt PID"},
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
