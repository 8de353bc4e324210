"""The `mountwarden` command."""

from __future__ import annotations

import argparse
import contextlib
import grp
import hashlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, TextIO

from . import audit, cgroup, daemon, fuse, idmap, mountopts
from . import syscalls as s
from .console import Console
from .container import FORWARDED, Container, ContainerError, Spec, name_process
from .errors import KernelError
from .policy import ContainerInfo, MountRequest, Policy, PolicyError, learn, load_policy
from .probe import probe_fd
from .seccomp import notify
from .server import run_until_exit
from .session import Session
from .sources import lxc, oci

AUDIT_DIR: Final = "/run/mountwarden/audit"
CONTAINER_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
    run.add_argument(
        "--audit-log",
        metavar="FILE",
        help=f"append audit records to FILE (default: {AUDIT_DIR}/NAME.log); '-' for stderr, and then the "
        "container's stderr goes where its stdout goes, so it cannot forge audit lines",
    )
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="pass NAME (from this environment, or set to VALUE) to the command; nothing else is passed "
        "but PATH, HOME, TERM (interactive only) and container=mountwarden",
    )
    run.add_argument(
        "--net",
        choices=("none", "host"),
        default="none",
        help="none (default): a network namespace of its own with only loopback, up; host: share the host's",
    )
    run.add_argument(
        "--learn",
        metavar="FILE",
        help="learn mode: serve what the policy would deny read-only (nosuid,nodev,noexec), log it as would-deny, "
        "and write a policy allowing everything requested to FILE at exit",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="also log mount data (may hold credentials)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG]...")
    run.set_defaults(func=cmd_run)
    serve = sub.add_parser("serve", help="serve the containers of container runtimes (OCI listenerPath)")
    serve.add_argument(
        "--policy", action="append", default=[], metavar="FILE", help="policy file or directory (repeatable)"
    )
    serve.add_argument(
        "--oci-socket", default=oci.DEFAULT_SOCKET, metavar="PATH",
        help=f"the socket OCI runtimes connect to: the profile's listenerPath (default {oci.DEFAULT_SOCKET})",
    )  # fmt: skip
    serve.add_argument(
        "--lxc-socket", metavar="PATH",
        help="also listen for LXC monitors here: the path of lxc.seccomp.notify.proxy (unix:PATH)",
    )  # fmt: skip
    serve.add_argument("--socket-group", metavar="GROUP", help="let GROUP reach the sockets too (default: root only)")
    serve.add_argument("--audit-log", metavar="FILE", help="append audit records to FILE (default: stderr)")
    serve.add_argument("-v", "--verbose", action="store_true", help="also log mount data (may hold credentials)")
    serve.set_defaults(func=cmd_serve)
    profile = sub.add_parser("profile", help="seccomp profiles for runtimes").add_subparsers()
    oci_profile = profile.add_parser("oci", help="print the linux.seccomp section (JSON) for an OCI config")
    oci_profile.add_argument(
        "--base", metavar="FILE", help="merge into this seccomp section (JSON) instead of allow-all"
    )
    oci_profile.add_argument("--listener-path", default=oci.DEFAULT_SOCKET, metavar="PATH")
    oci_profile.add_argument("--metadata", default="", help="listenerMetadata to send with each listener")
    oci_profile.add_argument("--runtime", choices=("runc", "crun"), default="runc")
    oci_profile.set_defaults(func=cmd_profile_oci)
    lxc_profile = profile.add_parser("lxc", help="print an lxc.seccomp.profile with mountwarden's notify rules")
    lxc_profile.add_argument("--base", default=lxc.DEBIAN_BASE, metavar="FILE", help=f"default {lxc.DEBIAN_BASE}")
    lxc_profile.set_defaults(func=cmd_profile_lxc)
    gc = sub.add_parser("gc", help="remove what killed supervisors left behind")
    gc.set_defaults(func=cmd_gc)
    policy = sub.add_parser("policy", help="policy tools").add_subparsers()
    check = policy.add_parser("check", help="validate policy files")
    check.add_argument("paths", nargs="+")
    check.set_defaults(func=cmd_policy_check)
    explain = policy.add_parser(
        "explain",
        help="which rule decides a mount, and why the earlier ones did not",
        usage="mountwarden policy explain --policy PATH [--container NAME] -- mount [-t TYPE] [-o OPTS] SOURCE TARGET",
    )
    explain.add_argument("--policy", action="append", required=True, metavar="PATH")
    explain.add_argument("--container", default="", metavar="NAME", help="the container name rules select on")
    explain.add_argument("mount", nargs=argparse.REMAINDER, help="-- mount [-t TYPE] [-o OPTS] SOURCE TARGET")
    explain.set_defaults(func=cmd_policy_explain)
    return parser


def cmd_policy_check(args: argparse.Namespace) -> int:
    try:
        loaded = load_policy(args.paths)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    for warning in fuse.missing_daemons(loaded):
        print(f"warning: {warning}")
    print(f"ok: {len(loaded.rules)} rules from {len(loaded.files)} files")
    return 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    """Exit 0 when the mount would be served, 1 when denied, 2 on bad input."""
    words = args.mount[1:] if args.mount[:1] == ["--"] else args.mount
    if words[:1] != ["mount"]:
        print(
            "mountwarden policy explain: give the mount command after --, e.g. -- mount -o ro IMG DIR", file=sys.stderr
        )
        return 2
    parser = argparse.ArgumentParser(prog="mount", add_help=False)
    parser.add_argument("-t", dest="fstype")
    parser.add_argument("-o", dest="options", default="")
    parser.add_argument("-r", dest="ro", action="store_true")
    parser.add_argument("source")
    parser.add_argument("target")
    try:
        policy = load_policy(args.policy)
        mount = parser.parse_args(words[1:])
        request = explain_request(policy, mount, args.container)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"mountwarden policy explain: {exc}", file=sys.stderr)
        return 2
    result = policy.explain(request)
    for step in result.steps:
        print(f"rule {step.rule!r}: {'matches' if step.matched else 'no match'}: {step.why}")
    d = result.decision
    forced = ",".join(["nosuid", "nodev", *d.options])
    extra = f", options {forced}, idmap {'on' if d.idmap else 'off'}" if d.action != "deny" else ""
    print(f"decision: {d.action} by {('rule ' + repr(d.rule)) if d.rule else 'default'}{extra}: {d.reason}")
    return 1 if d.action == "deny" else 0


def explain_request(policy: Policy, mount: argparse.Namespace, container: str) -> MountRequest:
    """The request `mount` would make, with the facts probed from the image when it is readable."""
    opts = mountopts.parse(0, mount.options)
    fstype, size, digest = mount.fstype, None, None
    try:
        fd = os.open(mount.source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            facts = probe_fd(fd)
            fstype, size = facts.fstype or fstype, facts.size
            digest = _file_digest(fd) if policy.needs_digest else None
        finally:
            os.close(fd)
    if not fstype:
        raise ValueError(f"cannot read {mount.source} to probe its type; pass -t TYPE")
    return MountRequest(
        os.path.abspath(mount.source), os.path.normpath(os.path.abspath(mount.target)), fstype,
        opts.read_only or mount.ro, opts.fs_options, size=size, sha256=digest,
        container=ContainerInfo(name=container),
    )  # fmt: skip


def _file_digest(fd: int) -> str:
    h = hashlib.sha256()
    while data := os.read(fd, 1 << 20):
        h.update(data)
    return h.hexdigest()


def cmd_serve(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("mountwarden serve: the supervisor must run as root (it mounts for the containers)", file=sys.stderr)
        return 2
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(f"mountwarden serve: the policy is invalid, nothing was started:\n{exc}", file=sys.stderr)
        return 2
    try:
        gid = grp.getgrnam(args.socket_group).gr_gid if args.socket_group else None
    except KeyError:
        print(f"mountwarden serve: --socket-group {args.socket_group}: no such group", file=sys.stderr)
        return 2
    name_process("supervisor", "serve")
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    with contextlib.ExitStack() as stack:
        stream = (
            stack.enter_context(open(os.open(args.audit_log, flags, 0o600), "a", buffering=1))
            if args.audit_log
            else sys.stderr
        )
        audit.configure(stream, logging.DEBUG if args.verbose else logging.INFO)
        notify.check_sizes()
        return daemon.serve(
            args.policy, policy, audit.logger(), oci_socket=args.oci_socket, lxc_socket=args.lxc_socket, gid=gid
        )


def cmd_profile_oci(args: argparse.Namespace) -> int:
    try:
        base = None
        if args.base:
            with open(args.base) as f:
                base = json.load(f)
        section = oci.profile(base, args.listener_path, runtime=args.runtime, metadata=args.metadata)
    except (OSError, ValueError) as exc:
        print(f"mountwarden profile oci: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(section, indent=2))
    return 0


def cmd_profile_lxc(args: argparse.Namespace) -> int:
    try:
        with open(args.base) as f:
            print(lxc.profile(f.read()), end="")
    except (OSError, KernelError) as exc:
        print(f"mountwarden profile lxc: {exc}", file=sys.stderr)
        return 1
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
    if not _NAME.fullmatch(name):
        print(f"mountwarden run: --name {name!r}: use up to 63 letters, digits, '.', '_' or '-'", file=sys.stderr)
        return 2
    try:
        env = container_env(args.env, os.environ)
    except ValueError as exc:
        print(f"mountwarden run: {exc}", file=sys.stderr)
        return 2
    name_process("supervisor", name)
    with _audit_stream(args.audit_log, name) as stream:
        audit.configure(stream, logging.DEBUG if args.verbose else logging.INFO)
        notify.check_sizes()
        cgroup.collect_stale()
        console = Console.open(merge_stderr=args.audit_log == "-")
        if console.term:
            env["TERM"] = console.term
        spec = Spec(
            command,
            name,
            idmap.reserve("/etc/subuid"),
            idmap.reserve("/etc/subgid"),
            os.path.abspath(args.rootfs) if args.rootfs else None,
            env=env,
            net_host=args.net == "host",
            stdio=console.stdio,
            pty=console.pty,
        )
        try:
            return _supervise(spec, args.policy, policy, args.learn, console)
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
    try:
        new = load_policy(paths)
    except PolicyError as exc:
        session.log.error("policy-reload-failed", error=str(exc), kept=list(session.policy.files))
        return
    session.reload(new)
    session.log.info("policy-reloaded", files=list(new.files), rules=len(new.rules))


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
