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
import sys
from collections.abc import Sequence
from typing import Final

from . import audit, cgroup, daemon, fuse, mountopts
from .container import name_process
from .errors import KernelError
from .policy import ContainerInfo, MountRequest, Policy, PolicyError, load_policy
from .probe import probe_fd
from .seccomp import notify
from .sources import client, control, lxc, oci
from .sources import run as runner

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


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
        help=f"append audit records to FILE (default: {runner.AUDIT_DIR}/NAME.log); '-' for stderr, and then the "
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
    run.add_argument(
        "--control-socket", default=control.DEFAULT_SOCKET, metavar="PATH",
        help=f"as an ordinary user: the control socket of `mountwarden serve` (default {control.DEFAULT_SOCKET})",
    )  # fmt: skip
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
    serve.add_argument(
        "--control-socket", default=control.DEFAULT_SOCKET, metavar="PATH",
        help="where ordinary users' `mountwarden run` hands over its containers (default "
        f"{control.DEFAULT_SOCKET}, reachable by every user; '' for none)",
    )  # fmt: skip
    serve.add_argument(
        "--oci-users", action="store_true",
        help="let ordinary users' runtimes (rootless podman) use the OCI socket too, each for the containers it "
        "owns, under the rules for its uid",
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


def _name_and_env(args: argparse.Namespace) -> tuple[str, dict[str, str]] | None:
    """run's container name and the command's environment, or None (said why on stderr)."""
    name = args.name or f"mw-{os.getpid()}"
    if not _NAME.fullmatch(name):
        print(f"mountwarden run: --name {name!r}: use up to 63 letters, digits, '.', '_' or '-'", file=sys.stderr)
        return None
    try:
        return name, runner.container_env(args.env, os.environ)
    except ValueError as exc:
        print(f"mountwarden run: {exc}", file=sys.stderr)
        return None


def _run_as_user(args: argparse.Namespace, command: list[str]) -> int:
    """An ordinary user's run: the container is the user's own, a running `serve` serves it."""
    refused = [opt for opt, given in (("--policy", args.policy), ("--rootfs", args.rootfs), ("--learn", args.learn),
                                       ("--audit-log", args.audit_log)) if given]  # fmt: skip
    if refused:
        print(
            f"mountwarden run: {', '.join(refused)} need root; as an ordinary user, `mountwarden serve`'s policy "
            "applies and its audit log records the container",
            file=sys.stderr,
        )
        return 2
    checked = _name_and_env(args)
    if checked is None:
        return 2
    name, env = checked
    return client.start(client.Options(command, name, env, args.control_socket, net_host=args.net == "host"))


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
        cgroup.collect_stale()  # a killed serve's, whose containers have ended since
        return daemon.serve(
            args.policy,
            policy,
            audit.logger(),
            oci_socket=args.oci_socket,
            lxc_socket=args.lxc_socket,
            control_socket=args.control_socket,
            gid=gid,
            oci_users=args.oci_users,
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
        return _run_as_user(args, command)
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(f"mountwarden run: the policy is invalid, nothing was started:\n{exc}", file=sys.stderr)
        return 2
    if args.rootfs and not os.path.isdir(args.rootfs):
        print(f"mountwarden run: --rootfs {args.rootfs}: not a directory", file=sys.stderr)
        return 2
    checked = _name_and_env(args)
    if checked is None:
        return 2
    name, env = checked
    return runner.start(
        runner.Options(
            command, name, args.policy, policy, os.path.abspath(args.rootfs) if args.rootfs else None, env,
            net_host=args.net == "host", learn=args.learn, audit_log=args.audit_log, verbose=args.verbose,
        )
    )  # fmt: skip
