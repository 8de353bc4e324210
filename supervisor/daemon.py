"""`mountwarden serve`: one supervisor for the containers of real runtimes.

The daemon owns the event loop (server.py), the policy, and one Session per container the
runtimes announce, by a key each listener source chooses (`oci:<id>`, `lxc:<monitor pid>`).
A container is adopted on first sight: its session is set up on its own worker (helpers,
pool, views: adopted.py), so the loop goes on serving the others meanwhile, and what arrives
for it queues behind the set-up. It ends when its init exits (a pidfd the loop watches), when
its source says so (`forget`: a runtime's connection closed), or when every listener it had
hung up; everything made for it is released then, in one place (Session.close).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import audit, cgroup
from . import syscalls as s
from .errors import KernelError
from .policy import ContainerInfo, Policy, reload_policy
from .server import Server
from .session import Session


class Daemon:
    """The server, the policy and the adopted containers, by key."""

    def __init__(self, policy_paths: Sequence[str], policy: Policy, log: Any) -> None:
        self.server = Server()
        self.policy_paths, self.policy, self.log = list(policy_paths), policy, log
        self._sessions: dict[str, Session] = {}
        self._pidfds: dict[str, int] = {}

    def find(self, key: str) -> Session | None:
        return self._sessions.get(key)

    def count(self, uid: int) -> int:
        """How many containers an ordinary user `uid` has under serve (its own run's and runtimes')."""
        return sum(1 for key in self._sessions if key.startswith((f"user:{uid}:", f"oci:{uid}:")))

    def adopt(
        self, key: str, init_pid: int, info: ContainerInfo, listener: int = -1, *, own_cgroups: bool = False,
        ready: Callable[[str | None], None] | None = None, pidfd: int = -1,
    ) -> Session:  # fmt: skip
        """The session of the container known as `key`, adopted now if it is new.

        `listener` (the daemon's from now on) is the init's seccomp listener, or -1 where a
        runtime's proxy forwards each notification instead (LXC). With `own_cgroups` the init is
        moved into device cgroups of the daemon's (removed with the session), where no runtime
        made any. `ready` runs on the loop once the set-up is done, with why it failed or None.
        `pidfd` (the daemon's from now on) pins the init where a source checked it already.
        """
        existing = self._sessions.get(key)
        if existing is not None:
            if pidfd >= 0:
                os.close(pidfd)
            if listener >= 0:
                self.server.add_listener(existing, listener)
            return existing
        try:
            pidfd = pidfd if pidfd >= 0 else s.pidfd_open(init_pid)
        except BaseException:
            if listener >= 0:
                os.close(listener)
            raise
        name = info.name or key
        session = Session(name, listener, init_pid, self.policy, audit.logger(container=name))
        session.info = info
        session.pidfd = os.dup(pidfd)  # pinned when the source checked it: its set-up acts on no other process
        self._sessions[key] = session
        self._pidfds[key] = pidfd
        self.server.watch(pidfd, lambda fd, events: self.forget(key))
        self.server.add(session, on_end=lambda ended: self._ended(key, ended))
        self.server.submit(session, lambda: self._start(key, session, own_cgroups, ready))
        return session

    def forget(self, key: str) -> None:
        """The container `key` is gone (or its runtime let go of it): release everything made for it."""
        session = self._sessions.get(key)
        if session is not None:
            self.server.end(session)

    def reload(self) -> None:
        """SIGHUP: the policy as it now is on disk for every container, or the running one if it is broken."""
        new = reload_policy(self.policy_paths, self.policy, self.log)
        if new is None:
            return
        self.policy = new
        for session in self._sessions.values():
            self.server.submit(session, functools.partial(session.reload, new))

    def run(self) -> None:
        self.server.run()

    def stop(self) -> None:
        self.server.stop()

    def close(self) -> None:
        """Release every container (their mount calls then fail ENOSYS, as with no supervisor)."""
        self.server.close()
        for key in list(self._pidfds):
            self._drop_pidfd(key)
        self._sessions.clear()

    def _start(self, key: str, session: Session, own_cgroups: bool, ready: Callable[[str | None], None] | None) -> None:
        """Set the container up on its worker; one that cannot be is let go with a sentence why."""
        try:
            if own_cgroups:
                session.own_cgroups = cgroup.create(f"{session.name}.{session.init_pid}")
                for group in session.own_cgroups:
                    group.add(session.init_pid)
                session.check_alive()  # the pid moved was the init's
                groups = list(session.own_cgroups)
            else:
                groups = cgroup.of_process(session.init_pid)
            session.adopt(groups)
        except Exception as exc:
            why = f"the container could not be adopted: {exc}"
            session.log.error(
                "container-not-adopted", key=key, error=str(exc),
                effect="its mount and loop calls fail with ENOSYS, as with no supervisor",
            )  # fmt: skip
            self.server.end_soon(session)
            if ready is not None:
                self.server.call_soon(lambda: ready(why))
            return
        session.log.info("container-adopted", key=key, init_pid=session.init_pid, host_uid=session.info.host_uid)
        if ready is not None:
            self.server.call_soon(lambda: ready(None))

    def _ended(self, key: str, session: Session) -> None:
        if self._sessions.get(key) is session:
            del self._sessions[key]
            self._drop_pidfd(key)
        session.log.info("container-released", key=key)

    def _drop_pidfd(self, key: str) -> None:
        pidfd = self._pidfds.pop(key, -1)
        if pidfd >= 0:
            self.server.unwatch(pidfd)
            with contextlib.suppress(OSError):
                os.close(pidfd)


def serve(
    policy_paths: Sequence[str], policy: Policy, log: Any, *, oci_socket: str | None, lxc_socket: str | None,
    control_socket: str | None, gid: int | None, oci_users: bool = False,
) -> int:  # fmt: skip
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reloads the policy. Returns the exit code."""
    from .sources import control, lxc, oci

    handled: list[int] = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)  # before any worker thread exists: they inherit it
    sigfd = s.signalfd(handled)
    daemon = Daemon(policy_paths, policy, log)

    def on_signal(fd: int, events: int) -> None:
        while (sig := s.read_signal(sigfd)) is not None:
            if sig[0] == signal.SIGHUP:
                daemon.reload()
            else:
                log.info("serve-stopping", signal=signal.Signals(sig[0]).name)
                daemon.stop()

    daemon.server.watch(sigfd, on_signal)
    sources: list[oci.OciSource | lxc.LxcProxy | control.ControlSource] = []
    try:
        try:
            if oci_socket:
                sources.append(oci.OciSource(daemon, oci_socket, gid=gid, users=oci_users))
            if lxc_socket:
                sources.append(lxc.LxcProxy(daemon, lxc_socket, group=gid).start())
            if control_socket:
                sources.append(control.ControlSource(daemon, control_socket, gid=gid))
        except KernelError as exc:
            log.error("serve-not-started", error=str(exc))
            print(f"mountwarden serve: cannot listen, nothing was started: {exc}", file=sys.stderr)
            return 1
        log.info(
            "serve-ready", oci_socket=oci_socket, lxc_socket=lxc_socket, control_socket=control_socket,
            policy=list(policy.files),
            rules=len(policy.rules),
        )  # fmt: skip
        daemon.run()
    finally:
        for source in sources:
            source.close()
        daemon.close()
        os.close(sigfd)
    return 0
