"""The `mountwarden` command."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

from . import audit, cgroup, idmap
from . import syscalls as s
from .container import FORWARDED, Container, ContainerError, Spec
from .policy import Policy, PolicyError, load_policy
from .seccomp import notify
from .server import run_until_exit
from .session import Session


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mountwarden", description="Mount disk images for unprivileged containers.")
    sub = parser.add_subparsers()
    run = sub.add_parser("run", help="run a command in a new container under the supervisor")
    run.add_argument(
        "--policy", action="append", default=[], metavar="FILE", help="policy file or directory (repeatable)"
    )
    run.add_argument("--rootfs", metavar="DIR", help="pivot the container into DIR")
    run.add_argument("--name", default=None, help="container name (hostname, audit records)")
    run.add_argument("--audit-log", metavar="FILE", help="append audit records here instead of stderr")
    run.add_argument("-v", "--verbose", action="store_true", help="also log mount data (may hold credentials)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG]...")
    run.set_defaults(func=cmd_run)
    gc = sub.add_parser("gc", help="remove what killed supervisors left behind")
    gc.set_defaults(func=cmd_gc)
    policy = sub.add_parser("policy", help="policy tools").add_subparsers()
    check = policy.add_parser("check", help="validate policy files")
    check.add_argument("paths", nargs="+")
    check.set_defaults(func=cmd_policy_check)
    return parser


def cmd_policy_check(args: argparse.Namespace) -> int:
    try:
        loaded = load_policy(args.paths)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"ok: {len(loaded.rules)} rules from {len(loaded.files)} files")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    for entry in cgroup.collect_stale():
        print(f"removed device cgroup {entry}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("mountwarden run: no command given (mountwarden run [OPTIONS] -- CMD [ARG]...)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("mountwarden run: the supervisor must run as root (it mounts for the container)", file=sys.stderr)
        return 2
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(f"mountwarden run: the policy is invalid, nothing was started:\n{exc}", file=sys.stderr)
        return 2
    if args.rootfs and not os.path.isdir(args.rootfs):
        print(f"mountwarden run: --rootfs {args.rootfs}: not a directory", file=sys.stderr)
        return 2
    name = args.name or f"mw-{os.getpid()}"
    with _audit_stream(args.audit_log) as stream:
        audit.configure(stream, logging.DEBUG if args.verbose else logging.INFO)
        notify.check_sizes()
        cgroup.collect_stale()
        spec = Spec(
            command,
            name,
            idmap.reserve("/etc/subuid"),
            idmap.reserve("/etc/subgid"),
            os.path.abspath(args.rootfs) if args.rootfs else None,
        )
        return _supervise(spec, policy)


def _supervise(spec: Spec, policy: Policy) -> int:
    log = audit.logger(container=spec.name)
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    sigfd = s.signalfd(list(FORWARDED))
    try:
        container = Container.start(spec)
    except ContainerError as exc:
        print(f"mountwarden run: {exc}", file=sys.stderr)
        os.close(sigfd)
        return 126
    session = Session(spec.name, container.listener, container.init_pid, policy, log)

    def forward() -> None:
        while (sig := s.read_signal(sigfd)) is not None:
            signo, code = sig
            if code != s.SI_KERNEL:  # a terminal's signal reached the container's processes already
                container.signal(signo)

    try:
        session.start((spec.uids.start, spec.gids.start), container.cgroups)
        container.go()
        run_until_exit(session, container.pidfd, {sigfd: forward})
    except BaseException:
        container.kill()
        raise
    finally:
        code = container.wait()
        try:
            session.close()
        finally:
            container.release()
            os.close(sigfd)
    return code


@contextlib.contextmanager
def _audit_stream(path: str | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stderr
        return
    with open(path, "a", buffering=1) as f:
        yield f
