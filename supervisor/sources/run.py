"""`mountwarden run`'s own container as a listener source: start it, serve it, release it.

The supervisor is one process per container here: it starts the container (container.py),
adopts its listener into a session set up before the command runs (so the landing, the /dev
and /sys views and the pool exist from the start), serves it on the event loop until the
container exits, forwards the operator's signals, and releases everything in one place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

from .. import audit, cgroup, idmap
from .. import syscalls as s
from ..console import Console
from ..container import FORWARDED, Container, ContainerError, Spec, name_process
from ..policy import ContainerInfo, MountRequest, Policy, learn, reload_policy
from ..seccomp import notify
from ..server import run_until_exit
from ..session import Session

AUDIT_DIR: Final = "/run/mountwarden/audit"
CONTAINER_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Options:
    """What `mountwarden run` was asked for, checked by the command line."""

    command: list[str]
    name: str
    policy_paths: list[str]
    policy: Policy
    rootfs: str | None
    env: dict[str, str]
    net_host: bool = False
    learn: str | None = None
    audit_log: str | None = None
    verbose: bool = False


def start(opts: Options) -> int:
    """Run the command in a new container under the supervisor; its exit code (126: not started)."""
    name_process("supervisor", opts.name)
    with _audit_stream(opts.audit_log, opts.name) as stream:
        audit.configure(stream, logging.DEBUG if opts.verbose else logging.INFO)
        notify.check_sizes()
        cgroup.collect_stale()
        console = Console.open(merge_stderr=opts.audit_log == "-")
        env = dict(opts.env)
        if console.term:
            env["TERM"] = console.term
        spec = Spec(
            opts.command, opts.name, idmap.reserve("/etc/subuid"), idmap.reserve("/etc/subgid"), opts.rootfs,
            env=env, net_host=opts.net_host, stdio=console.stdio, pty=console.pty,
        )  # fmt: skip
        try:
            return _supervise(spec, opts.policy_paths, opts.policy, opts.learn, console)
        finally:
            console.finish()


def container_env(passed: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The command's whole environment: a fixed base and only what `--env` names.

    The supervisor's own environment (a CI runner's tokens, say) never reaches the container.
    """
    env = {"PATH": CONTAINER_PATH, "HOME": "/root", "container": "mountwarden"}
    for item in passed:
        name, sep, value = item.partition("=")
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"--env {item!r}: give NAME or NAME=VALUE, NAME of letters, digits and '_'")
        if sep:
            env[name] = value
        elif name in environ:
            env[name] = environ[name]
    return env


def _supervise(spec: Spec, policy_paths: list[str], policy: Policy, learn: str | None, console: Console) -> int:
    log = audit.logger(container=spec.name)
    handled: list[int] = [*FORWARDED, signal.SIGHUP]
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    sigfd = s.signalfd(handled)
    try:
        container = Container.start(spec)
    except ContainerError as exc:
        print(f"mountwarden run: {exc}", file=sys.stderr)
        os.close(sigfd)
        return 126
    master, container.pty_master = container.pty_master, -1
    console.started(master)
    session = Session(spec.name, container.listener, container.init_pid, policy, log)
    session.learned = [] if learn else None
    session.info = ContainerInfo(name=spec.name, host_uid=spec.uids.start)

    def on_signal() -> None:
        while (sig := s.read_signal(sigfd)) is not None:
            signo, _ = sig
            if signo == signal.SIGHUP:
                _reload(session, policy_paths)
            else:  # also a terminal's ^C: the container has a session of its own, so only we got it
                container.signal(signo)

    try:
        session.start((spec.uids.start, spec.gids.start), container.cgroups, staging_pid=container.pid)
        container.go()
        run_until_exit(session, container.pidfd, {sigfd: on_signal})
    except BaseException:
        container.kill()
        raise
    finally:
        code = container.wait()
        try:
            if learn and session.learned is not None:
                _write_learned(learn, session.learned, log)
            session.close()
        finally:
            container.release()
            os.close(sigfd)
    return code


def _reload(session: Session, paths: list[str]) -> None:
    """SIGHUP: swap in the policy as it now is on disk, or keep the running one if it is broken."""
    new = reload_policy(paths, session.policy, session.log)
    if new is not None:
        session.reload(new)


def _write_learned(path: str, requests: list[MountRequest], log: Any) -> None:
    """Learn mode: a policy allowing exactly what the workload asked for, for a human to review.

    Never raises: it runs before the session's release, which must happen whatever it meets.
    """
    learnable, skipped = learn.partition(requests)
    for req, reason in skipped:
        log.warning("learn-request-skipped", source=req.source, target=req.target, reason=reason)
    try:
        with open(path, "w") as f:
            f.write(learn.suggest(learnable))
    except (OSError, ValueError) as exc:
        log.error("learned-policy-not-written", path=path, error=str(exc))
        return
    log.info("learned-policy-written", path=path, requests=len(learnable), skipped=len(skipped))


@contextlib.contextmanager
def _audit_stream(path: str | None, name: str) -> Iterator[TextIO]:
    """Where audit records go: never a stream the container writes to.

    By default a per-container file under AUDIT_DIR, announced on stderr before the container
    starts; `-` is stderr, which the container then does not share (see Console.open).
    """
    if path == "-":
        yield sys.stderr
        return
    if path is None:
        os.makedirs(AUDIT_DIR, mode=0o700, exist_ok=True)
        path = os.path.join(AUDIT_DIR, f"{name}.log")
        print(f"mountwarden run: audit records go to {path}", file=sys.stderr)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    with open(os.open(path, flags, 0o600), "a", buffering=1) as f:
        yield f
