"""The event loop: one epoll over every container's listeners and the sockets runtimes talk on.

Nothing slow runs on the loop. Each session has one worker thread, which does all of that
container's work in order: RECV, the handler (helper calls, a FUSE daemon starting, a digest),
SEND, the audit record, and at the end the session's release. The loop only sees readiness: a
listener is registered one-shot, handed to its session's worker when readable and re-armed
when the worker is done with it, so a container whose request takes seconds delays its own
next answers and no one else's. Workers report back through a queue and an eventfd; every
epoll registration is changed on the loop's thread alone.

A session ends when its owner says so (`end`: the container of `run` exited, a runtime closed
its connection) or when every listener it has hung up (no task uses its filters any more).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import audit, dispatch
from .session import Session

Ready = Callable[[int, int], None]  # (fd, epoll events), run on the loop's thread


@dataclass
class _Entry:
    """A session as the loop sees it: its worker and which of its fds are watched, and how."""

    session: Session
    worker: ThreadPoolExecutor
    on_end: Callable[[Session], None]
    listeners: set[int] = field(default_factory=set)  # armed or busy; gone once hung up
    daemons: dict[int, str] = field(default_factory=dict)  # FUSE daemon fds: "pidfd" or "listener"
    ending: bool = False


class Server:
    """The loop. `watch` plain fds, `add` sessions, `run` until told to stop."""

    def __init__(self) -> None:
        self.poller = select.epoll()
        self._ready: dict[int, Ready] = {}
        self._owner: dict[int, _Entry] = {}  # every session fd registered -> its session's entry
        self._entries: dict[int, _Entry] = {}  # id(session) -> entry
        self._done: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.poller.register(self._wake, select.EPOLLIN)
        self._stopping = False

    # --- plain fds (sockets, signal fds, pidfds), served on the loop's thread ----------------

    def watch(self, fd: int, ready: Ready, events: int = select.EPOLLIN) -> None:
        self.poller.register(fd, events)
        self._ready[fd] = ready

    def unwatch(self, fd: int) -> None:
        if self._ready.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self.poller.unregister(fd)

    # --- sessions ----------------------------------------------------------------------------

    @property
    def sessions(self) -> list[Session]:
        return [entry.session for entry in self._entries.values()]

    def add(self, session: Session, on_end: Callable[[Session], None] = lambda session: None) -> None:
        """Serve `session` from now on; `on_end` runs on the loop once it has been released."""
        worker = ThreadPoolExecutor(1, thread_name_prefix=f"mw-{session.name}"[:15])
        entry = _Entry(session, worker, on_end)
        self._entries[id(session)] = entry
        for fd in session.listeners():
            self._arm_listener(entry, fd)

    def add_listener(self, session: Session, fd: int) -> None:
        """A further listener of a served session (a process a runtime exec'd into it)."""
        session.extra_listeners.append(fd)
        self._arm_listener(self._entries[id(session)], fd)

    def submit(self, session: Session, work: Callable[[], None]) -> bool:
        """Run `work` on the session's worker, after what it is doing now; False (and `work`
        never runs) if the session is no longer served."""
        entry = self._entries.get(id(session))
        if entry is None or entry.ending:
            return False
        entry.worker.submit(self._guarded, entry, work)
        return True

    def end(self, session: Session) -> None:
        """Release the session on its worker (after its pending work), then forget it."""
        entry = self._entries.get(id(session))
        if entry is None or entry.ending:
            return
        entry.ending = True
        for fd in [*entry.listeners, *entry.daemons]:
            self._forget(fd)
        entry.worker.submit(self._release, entry)

    def end_soon(self, session: Session) -> None:
        """`end`, from a worker thread: the loop does it next."""
        self._post(lambda: self.end(session))

    def call_soon(self, work: Callable[[], None]) -> None:
        """Run `work` on the loop's thread next (from a worker)."""
        self._post(work)

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Serve until `until()` is true or `stop` was called, checking after every event."""
        while not self._stopping and not until():
            timeouts = [t for t in (e.session.audit.tick() for e in self._entries.values()) if t >= 0]
            for fd, events in self.poller.poll(min(timeouts, default=-1)):
                if fd == self._wake:
                    self._drain()
                elif fd in self._owner:
                    self._session_ready(self._owner[fd], fd, events)
                elif fd in self._ready:
                    self._call(fd, events)

    def stop(self) -> None:
        self._stopping = True

    def _call(self, fd: int, events: int) -> None:
        """One socket's callback; its failure is logged and the fd dropped, never the loop's end."""
        try:
            self._ready[fd](fd, events)
        except Exception:
            audit.logger().exception("loop-callback-failed", fd=fd, effect="the fd is no longer watched")
            self.unwatch(fd)

    def close(self, *, release: bool = True) -> None:
        """Wait for every worker, ending (releasing) every session first unless `release` is
        False (its owner releases it); then drop the loop."""
        entries = list(self._entries.values())
        if release:
            for entry in entries:
                self.end(entry.session)
        for entry in entries:
            entry.worker.shutdown(wait=True)
        self._drain()
        self.poller.close()
        os.close(self._wake)

    # --- the loop's side of the workers -------------------------------------------------------

    def _session_ready(self, entry: _Entry, fd: int, events: int) -> None:
        kind = entry.daemons.get(fd, "listener")
        if kind == "pidfd":  # a FUSE daemon ended
            self._forget(fd)
            del entry.daemons[fd]
            self.submit(entry.session, entry.session.reap_daemons)
        elif events & select.EPOLLIN:
            caller = "fuse-daemon" if fd in entry.daemons else None
            self.submit(entry.session, lambda: self._serve(entry, fd, caller))
        else:  # hung up: no task uses this filter any more
            self._forget(fd)
            entry.listeners.discard(fd)
            entry.daemons.pop(fd, None)
            if not entry.listeners:
                self.end(entry.session)

    def _serve(self, entry: _Entry, fd: int, caller: str | None) -> None:
        try:
            if not entry.session.closed:
                dispatch.serve_one(entry.session, fd, caller)
        finally:
            self._post(lambda: self._rearm(entry, fd))

    def _rearm(self, entry: _Entry, fd: int) -> None:
        if fd in self._owner and not entry.ending:
            self.poller.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)

    def _arm_listener(self, entry: _Entry, fd: int) -> None:
        entry.listeners.add(fd)
        self._owner[fd] = entry
        self.poller.register(fd, select.EPOLLIN | select.EPOLLONESHOT)

    def _sync_daemons(self, entry: _Entry) -> None:
        """Watch each live FUSE daemon's pidfd and listener (a closed fd leaves epoll by itself)."""
        if entry.ending:
            return
        current = {fd: kind for d in entry.session.daemons.values()
                   for fd, kind in ((d.pidfd, "pidfd"), (d.listener, "listener")) if fd >= 0}  # fmt: skip
        for fd in list(entry.daemons):
            if fd not in current:
                self._owner.pop(fd, None)
                del entry.daemons[fd]
        for fd, kind in current.items():
            if fd not in entry.daemons:
                entry.daemons[fd] = kind
                self._owner[fd] = entry
                self.poller.register(fd, select.EPOLLIN | (select.EPOLLONESHOT if kind == "listener" else 0))

    def _forget(self, fd: int) -> None:
        if self._owner.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self.poller.unregister(fd)

    def _guarded(self, entry: _Entry, work: Callable[[], None]) -> None:
        """Run session work on its worker; a failure is logged, never lost in a future."""
        try:
            work()
        except Exception:
            entry.session.log.exception("session-work-failed")
        finally:
            self._post(lambda: self._sync_daemons(entry))

    def _release(self, entry: _Entry) -> None:
        try:
            entry.session.close()
        except Exception:
            entry.session.log.exception("session-release-failed")
        self._post(lambda: self._forget_session(entry))

    def _forget_session(self, entry: _Entry) -> None:
        self._entries.pop(id(entry.session), None)
        entry.worker.shutdown(wait=False)
        entry.on_end(entry.session)

    def _post(self, done: Callable[[], None]) -> None:
        self._done.put(done)
        os.eventfd_write(self._wake, 1)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                return
            done()


def run_until_exit(session: Session, child_pidfd: int, extra: dict[int, Callable[[], None]] | None = None) -> None:
    """Serve one session until the process behind `child_pidfd` exits (`run`'s own container).

    `extra` maps further fds to callbacks (the signal fd); they run when readable.
    """
    server = Server()
    exited = threading.Event()
    server.watch(child_pidfd, lambda fd, events: exited.set())
    for fd, callback in (extra or {}).items():
        server.watch(fd, _ignoring_events(callback))
    server.add(session)
    try:
        server.run(until=exited.is_set)
    finally:
        server.close(release=False)


def _ignoring_events(callback: Callable[[], None]) -> Ready:
    return lambda fd, events: callback()
