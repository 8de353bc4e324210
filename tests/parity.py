"""The differential harness of issue 12: one script, run natively and in a container, compared.

A case is a POSIX shell script whose observations are the lines the static test tool
(tests/tools/mountcall.c) prints: one per call, "OK ..." or the errno's name, and `flags PATH`
for a mount's mountinfo options and statvfs f_flag. The script runs twice:

- natively, as host root in a private mount namespace of the host (`unshare -m --propagation
  private`): the kernel's own answers;
- in an unprivileged `mountwarden run` container (no --rootfs, so the same host paths and
  binaries), where the supervisor answers the calls it serves.

The two outputs must be equal line for line. A loop device comes from `losetup -f --show`
in both worlds (a host device natively, a pool device in the container), so the same mount(2)
of /dev/loopN is judged by the kernel and by the supervisor. What mountwarden does on purpose
differently is taken out of the comparison by name only: `FORCED` (every image mount is
nosuid,nodev, and idmapped), and whatever a test passes as `deliberate`, whose name must then
say so. Native mounts vanish with their namespace; the script detaches its loop devices itself.
"""

from __future__ import annotations

import difflib
import re
import shlex
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from conftest import Run, run_container

FORCED = frozenset({"nosuid", "nodev", "idmapped"})  # README: image mounts are always nosuid,nodev and idmapped
DEV = "DEV"  # in a command, the loop device the script bound (shell "$dev")
_FLAGS_LINE = re.compile(r"^OK mnt=(\S*) sb=(\S*) st=(\S*)$")


def normalise(line: str, ignore: Iterable[str] = FORCED) -> str:
    """`line` with the options in `ignore` left out of a `flags` report; other lines as they are."""
    match = _FLAGS_LINE.match(line)
    if not match:
        return line
    drop = set(ignore)
    mnt, sb, st = (",".join(o for o in part.split(",") if o not in drop) or "-" for part in match.groups())
    return f"OK mnt={mnt} sb={sb} st={st}"


def script(
    mountcall: Path, commands: Sequence[Sequence[str]], image: Path | None = None, ro: bool = True, then: str = ""
) -> str:
    """A script running `commands` in one mountcall process (`seq`), on a loop device of `image`
    (`DEV` in an argument) bound read-only or read-write, then the shell lines `then` (where
    "$mc" is the tool and "$dev" the device); it detaches the device at the end."""
    words: list[str] = []
    for i, command in enumerate(commands):
        words += [";"] * bool(i) + list(command)
    line = " ".join(['"$mc"', *('"$dev"' if w == DEV else shlex.quote(w) for w in ["seq", *words])])
    head = f"mc={shlex.quote(str(mountcall))}\n"
    if image is None:
        return f"{head}{line}\n{then}"
    bind = f"dev=$(losetup -f --show {'-r ' if ro else ''}{shlex.quote(str(image))}) || exit 97"
    return f'{head}{bind}\n{line}\n{then}losetup -d "$dev"\n'


@dataclass(frozen=True)
class Sides:
    """What the kernel and the supervisor answered to the same script."""

    native: list[str]
    contained: list[str]
    run: Run

    def differences(self) -> str:
        return "\n".join(difflib.unified_diff(self.native, self.contained, "native", "container", lineterm=""))


def native(text: str, timeout: float = 60) -> list[str]:
    """Run the script as host root in a private mount namespace; its output lines."""
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", text]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode != 97, f"the native side could not bind a loop device: {proc.stderr}"
    return proc.stdout.splitlines()


def both(
    tmp_path: Path,
    text: str,
    policy: Path | None = None,
    deliberate: Iterable[str] = (),
    reset: Callable[[], None] = lambda: None,
) -> Sides:
    """The script natively and in a `mountwarden run` container, each normalised (FORCED and
    `deliberate` left out of flag reports); `reset` runs before each side (e.g. a fresh copy of
    an image the script writes to)."""
    ignore = FORCED | set(deliberate)
    reset()
    got = native(text)
    reset()
    run = run_container(tmp_path, ["sh", "-c", text], policy=policy)
    assert run.returncode != 97, f"the container could not bind a loop device: {run.stderr}"
    return Sides(
        [normalise(line, ignore) for line in got],
        [normalise(line, ignore) for line in run.stdout.splitlines()],
        run,
    )


def assert_same(
    tmp_path: Path,
    text: str,
    policy: Path | None = None,
    deliberate: Iterable[str] = (),
    reset: Callable[[], None] = lambda: None,
) -> list[str]:
    """Fail with a diff unless the container saw what the kernel answers natively; the lines."""
    sides = both(tmp_path, text, policy, deliberate, reset)
    assert sides.native == sides.contained, f"{sides.differences()}\ncontainer stderr:\n{sides.run.stderr}"
    return sides.native
