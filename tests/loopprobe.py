"""Loop and block ioctls, one output line per step, for tests/test_parity_loop.py.

Run with the system python3 (standard library only) natively as root and in a container;
the two outputs must match. Steps are separated by ";" in argv:

  bind IMG ro|rw[+p]        LOOP_CTL_GET_FREE, LOOP_CONFIGURE (autoclear, +p partscan, the path as
                            its name); the device is open O_RDWR as "dev" (or O_RDONLY when ro)
  open NAME r|rw|rwx        another fd on the device (x: O_EXCL)
  close NAME
  ioctl NAME REQUEST [ARG]  ARG: a number, "null" (a NULL pointer), or a file for LOOP_CHANGE_FD
  status NAME               LOOP_GET_STATUS64 without lo_number and lo_rdevice (host numbers)
  sys ATTR...               /sys/block/<the device>/ATTR, or the errno of reading it
  truncate IMG BYTES
  hammer IMG ROUNDS         a child reads the sysfs view while this grows the file, LOOP_SET_CAPACITY
                            and moves the offset; "OK bad=N" counts reads that failed or were empty

Device numbers never appear in the output: natively they are the host's, in a container the
pool's.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import sys

LIBC = ctypes.CDLL(None, use_errno=True)
LOOP = {"LOOP_SET_STATUS64": 0x4C04, "LOOP_GET_STATUS64": 0x4C05, "LOOP_CHANGE_FD": 0x4C06,
        "LOOP_SET_CAPACITY": 0x4C07, "LOOP_CONFIGURE": 0x4C0A, "LOOP_CTL_GET_FREE": 0x4C82}  # fmt: skip
# requests whose argument is a pointer to an int the kernel reads (w) or writes (r)
INT_IN = {"BLKROSET": 0x125D, "BLKBSZSET": 0x40081271, "BLKBSZSET_32": 0x40041271}
INT_OUT = {"BLKROGET": 0x125E, "BLKBSZGET": 0x80081270, "BLKSSZGET": 0x1268}
LONG_OUT = {"BLKRAGET": 0x1263, "BLKGETSIZE64": 0x80081272}
VALUE = {"BLKFLSBUF": 0x1261, "BLKRASET": 0x1262, "BLKFRASET": 0x1264, "BLKRRPART": 0x125F,
         "LOOP_SET_CAPACITY": 0x4C07, "LOOP_SET_DIRECT_IO": 0x4C08, "LOOP_SET_BLOCK_SIZE": 0x4C09}  # fmt: skip
INFO64 = struct.Struct("<5Q4I64s64s32s2Q")
fds: dict[str, int] = {}
state = {"dev": ""}


def ioctl(fd: int, request: int, arg: int | ctypes.Array[ctypes.c_char]) -> None:
    raw = ctypes.c_ulong(arg) if isinstance(arg, int) else arg
    if LIBC.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), raw) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def info(fd: int) -> tuple[int, ...]:
    buf = ctypes.create_string_buffer(INFO64.size)
    ioctl(fd, LOOP["LOOP_GET_STATUS64"], buf)
    return INFO64.unpack(buf.raw)


def bind(img: str, mode: str) -> str:
    ctl = os.open("/dev/loop-control", os.O_RDWR)
    number = fcntl.ioctl(ctl, LOOP["LOOP_CTL_GET_FREE"])
    os.close(ctl)
    state["dev"] = f"/dev/loop{number}"
    ro = mode == "ro"
    fd = os.open(state["dev"], os.O_RDONLY if ro else os.O_RDWR)
    backing = os.open(img, os.O_RDONLY if ro else os.O_RDWR)
    flags = 4 | (1 if ro else 0) | (8 if mode.endswith("+p") else 0)  # autoclear, read-only, partscan
    config = struct.pack("<II", backing, 0) + INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, img.encode(), b"", b"", 0, 0)
    buf = ctypes.create_string_buffer(config + bytes(64), len(config) + 64)
    try:
        ioctl(fd, LOOP["LOOP_CONFIGURE"], buf)
        # opened anew, as tools do: in a container an fd opened before the bind is on the pool's
        # placeholder, and only its size queries are answered for the bound device
        fds["dev"] = os.open(state["dev"], os.O_RDONLY if ro else os.O_RDWR)
    finally:
        os.close(backing)
        os.close(fd)
    return "OK"


def do_ioctl(name: str, request: str, arg: str = "0") -> str:
    fd = fds[name]
    if request == "LOOP_CHANGE_FD":
        new = os.open(arg, os.O_RDONLY)
        try:
            ioctl(fd, LOOP[request], new)
        finally:
            os.close(new)
        return "OK"
    if request == "LOOP_SET_STATUS64":
        offset, sizelimit = (int(x) for x in arg.split(","))
        now = list(info(fd))
        now[3], now[4] = offset, sizelimit
        ioctl(fd, LOOP[request], ctypes.create_string_buffer(INFO64.pack(*now), INFO64.size))
        return "OK"
    if request in INT_IN:
        if arg == "null":
            ioctl(fd, INT_IN[request], 0)
        else:
            ioctl(fd, INT_IN[request], ctypes.create_string_buffer(struct.pack("<i", int(arg, 0)), 4))
        return "OK"
    if request in INT_OUT or request in LONG_OUT:
        size = 4 if request in INT_OUT else 8
        buf = ctypes.create_string_buffer(size)
        ioctl(fd, {**INT_OUT, **LONG_OUT}[request], buf)
        return f"OK {int.from_bytes(buf.raw, 'little', signed=True)}"
    ioctl(fd, VALUE[request], int(arg, 0))
    return "OK"


def sysfs(attrs: list[str]) -> str:
    out = []
    for attr in attrs:
        try:
            with open(f"/sys/block/{os.path.basename(state['dev'])}/{attr}") as f:
                out.append(f"{attr}={f.read().strip()}")
        except OSError as exc:
            out.append(f"{attr}={errno.errorcode[exc.errno or 0]}")
    return " ".join(out)


def hammer(img: str, rounds: int) -> str:
    base = f"/sys/block/{os.path.basename(state['dev'])}"
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the reader: until the parent closes the pipe
        os.close(write_end)
        bad = 0
        os.set_blocking(read_end, False)
        while True:
            for attr in ("size", "ro", "loop/offset", "loop/backing_file", "queue/logical_block_size"):
                try:
                    with open(f"{base}/{attr}") as f:
                        bad += not f.read().strip()
                except OSError:
                    bad += 1
            try:
                if os.read(read_end, 1) == b"":
                    break
            except BlockingIOError:
                continue
        print(f"OK bad={bad}", flush=True)
        os._exit(0)
    os.close(read_end)
    size = os.stat(img).st_size
    for i in range(rounds):
        os.truncate(img, size + (i + 1) * 65536)
        ioctl(fds["dev"], LOOP["LOOP_SET_CAPACITY"], 0)
        do_ioctl("dev", "LOOP_SET_STATUS64", f"{(i % 2) * 4096},0")
    os.truncate(img, size)
    ioctl(fds["dev"], LOOP["LOOP_SET_CAPACITY"], 0)
    os.close(write_end)
    os.waitpid(child, 0)
    return sysfs(["size", "loop/offset"])


def step(words: list[str]) -> str:
    cmd, args = words[0], words[1:]
    if cmd == "bind":
        return bind(*args)
    if cmd == "open":
        flags = {"r": os.O_RDONLY, "rw": os.O_RDWR, "rwx": os.O_RDWR | os.O_EXCL}[args[1]]
        fds[args[0]] = os.open(state["dev"], flags)
        return "OK"
    if cmd == "close":
        os.close(fds.pop(args[0]))
        return "OK"
    if cmd == "ioctl":
        return do_ioctl(*args)
    if cmd == "status":
        device, inode, _rdevice, offset, sizelimit, _number, _, _, flags, name, *_ = info(fds[args[0]])
        label = name.split(b"\0")[0].decode()
        return f"OK dev={device} ino={inode} offset={offset} sizelimit={sizelimit} flags={flags:#x} name={label}"
    if cmd == "sys":
        return sysfs(args)
    if cmd == "truncate":
        os.truncate(args[0], int(args[1]))
        return "OK"
    if cmd == "hammer":
        return hammer(args[0], int(args[1]))
    raise SystemExit(f"unknown step {cmd}")


def main() -> None:
    steps: list[list[str]] = [[]]
    for word in sys.argv[1:]:
        if word == ";":
            steps.append([])
        else:
            steps[-1].append(word)
    for words in steps:
        try:
            line = step(words)
        except OSError as exc:
            line = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        print(f"{' '.join(words[:3])}: {line}", flush=True)


if __name__ == "__main__":
    main()
