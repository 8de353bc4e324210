"""The container's terminal: never the operator's.

A container holding the operator's terminal can push input into it (TIOCSTI) that the
operator's shell runs after `run` exits, change its modes or read what is typed. So the
container runs in a session of its own with no controlling terminal, and:

- interactive (stdin is a terminal): it gets a pty of its own as stdin, stdout, stderr and
  controlling terminal; a relay process copies the operator's keystrokes in (the operator's
  terminal in raw mode, so ^C reaches the container's pty as a byte) and the output out,
  follows window-size changes, and the terminal's modes are restored when `run` ends;
- otherwise: stdout or stderr that are terminals are replaced by pipes the relay copies to
  them; files and pipes are handed over as they are.

The relay is a process of its own so a slow terminal never delays the supervisor's answers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import termios
import tty
from dataclasses import dataclass, field
from typing import Any, Final

import prctl

_CHUNK: Final = 65536
_WINSIZE: Final = 8  # struct winsize


@dataclass
class Console:
    """Which stdio the container gets, and the relay that connects it to the operator's."""

    stdio: tuple[int, int, int] | None = None
    pty: bool = False
    term: str | None = None  # the operator's TERM, for an interactive container
    _pairs: list[tuple[int, int]] = field(default_factory=list)  # (from, to) the relay copies
    _container_ends: list[int] = field(default_factory=list)
    _saved: list[Any] | None = None
    _relay: int = -1

    @classmethod
    def open(cls, merge_stderr: bool = False) -> Console:
        """Decide the container's stdio. `merge_stderr`: its stderr goes where its stdout goes
        (the supervisor's stderr then carries only the supervisor's own lines, audit records)."""
        if os.isatty(0):
            return cls(pty=True, term=os.environ.get("TERM", "xterm"))
        ends: list[int] = [0, 1, 1 if merge_stderr else 2]
        console = cls()
        for target in (1, 2):
            if os.isatty(target) and target in ends:
                r, w = os.pipe()
                ends = [w if end == target else end for end in ends]
                console._pairs.append((r, target))
                console._container_ends.append(w)
        if console._pairs or merge_stderr:
            console.stdio = (ends[0], ends[1], ends[2])
        return console

    def started(self, master: int) -> None:
        """The container holds its ends now: drop ours, go raw, and start relaying.

        `master` is the master of the container's pty (interactive only); this closes it.
        """
        for fd in self._container_ends:
            os.close(fd)
        self._container_ends.clear()
        if master >= 0:
            os.set_blocking(master, False)
            _copy_size(master)
            self._pairs = [(0, master), (master, 1)]
            self._saved = termios.tcgetattr(0)
            tty.setraw(0)
        if self._pairs:
            keep = {fd for pair in self._pairs for fd in pair}
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the relay process
                _relay(self._pairs, keep, os.getppid(), master)
            self._relay = pid
        for src, _ in self._pairs:
            if src > 2:
                os.close(src)

    def finish(self) -> None:
        """After the container's end: let the relay flush what is left, then restore the terminal."""
        for fd in self._container_ends:
            os.close(fd)
        self._container_ends.clear()
        if self._relay > 0:
            os.waitpid(self._relay, 0)
            self._relay = -1
        if self._saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, self._saved)
            self._saved = None


def _copy_size(master: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(master, termios.TIOCSWINSZ, fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(_WINSIZE)))


def _relay(pairs: list[tuple[int, int]], keep: set[int], parent: int, master: int) -> None:  # pragma: no cover
    """Copy each pair's bytes until every output source is at its end, then exit."""
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)
    prctl.set_name("mw-relay")
    low = 3
    for fd in sorted(fd for fd in keep if fd >= low):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    if master >= 0:
        signal.signal(signal.SIGWINCH, lambda *_: _copy_size(master))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGWINCH})
    outputs = {src for src, dst in pairs if dst in (1, 2)}
    live = dict(pairs)
    pending: dict[int, bytes] = {}  # src -> bytes its destination could not take yet (the pty)
    while outputs & live.keys():
        events: dict[int, int] = {}
        for src, dst in live.items():
            if src in pending:
                events[dst] = events.get(dst, 0) | select.POLLOUT
            else:
                events[src] = events.get(src, 0) | select.POLLIN
        poller = select.poll()
        for fd, mask in events.items():
            poller.register(fd, mask)
        ready = dict(poller.poll())
        for src, dst in list(live.items()):
            if src in pending:
                if ready.get(dst, 0) & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                    rest = _write_some(dst, pending.pop(src))
                    if rest:
                        pending[src] = rest
                continue
            if not ready.get(src, 0) & (select.POLLIN | select.POLLERR | select.POLLHUP):
                continue
            try:
                data = os.read(src, _CHUNK)
            except BlockingIOError:
                continue
            except OSError as exc:  # EIO: the pty's last terminal end closed
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                del live[src]
                continue
            rest = _write_some(dst, data)
            if rest:
                pending[src] = rest
    os._exit(0)


def _write_some(fd: int, data: bytes) -> bytes:
    """Write what `fd` takes now (the pty is non-blocking, the operator's fds block); return the rest."""
    try:
        return data[os.write(fd, data) :]
    except BlockingIOError:
        return data
    except OSError:
        return b""
