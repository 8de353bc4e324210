"""Deciding a mount request against loaded rules: pure functions, no I/O.

Globs are translated to regular expressions here rather than with fnmatch, because fnmatch
lets ``*`` cross ``/`` and has no ``**``; a policy that says ``/srv/img/*`` must never admit
``/srv/img/../../etc`` lookalikes or files in subdirectories the operator did not name.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from .schema import Containers, Limits, Match, Rule

DEFAULT_ERRNO: Final = "EPERM"

# Whose file a source path names (supervisor/origin.py decides): "host" when it was reached
# through mounts the container already had when it started, at their original places, so it is
# the file the host (or the runtime's rootfs) has at that path; "container" when a mount the
# container made, moved or had the supervisor make leads there; "deleted" when the loop
# device's backing file no longer has the name it had.
SourceOrigin = Literal["host", "container", "deleted"]

# "**" as a whole component: zero or more further components.
_ANY_COMPONENTS: Final = "(?:/[^/]+)*"


class GlobSyntaxError(ValueError):
    """A glob that could never match a canonical path, or cannot be parsed.

    Raised at load time so a typo in a policy is reported with its position instead of
    silently matching nothing.
    """


@dataclass(frozen=True)
class Glob:
    """A path glob compiled once, so evaluating a request never re-parses the policy."""

    pattern: str
    regex: re.Pattern[str]

    @classmethod
    def compile(cls, pattern: str) -> Glob:
        """Compile `pattern`; raises GlobSyntaxError with a sentence saying how to fix it."""
        try:
            regex = re.compile(_translate(pattern))
        except re.error as exc:
            raise GlobSyntaxError(f"{pattern!r} is not a valid glob ({exc.msg})") from None
        return cls(pattern, regex)

    def matches(self, path: str) -> bool:
        """Whether the canonical absolute `path` matches; "/" is the path with no components."""
        return self.regex.fullmatch("" if path == "/" else path) is not None


def _components(pattern: str) -> list[str]:
    """Split an absolute glob into components, rejecting ones no canonical path contains."""
    if not pattern.startswith("/"):
        raise GlobSyntaxError(f"{pattern!r} is not an absolute path; start it with '/'")
    if pattern == "/":
        return []
    parts = pattern[1:].split("/")
    if "" in parts:
        raise GlobSyntaxError(f"{pattern!r} has an empty component; remove the extra '/'")
    if "." in parts or ".." in parts:
        raise GlobSyntaxError(f"{pattern!r} contains '.' or '..', which canonical paths never do; write the path out")
    return parts


def _translate(pattern: str) -> str:
    """Regex source for `pattern`, matching a path with "/" written as the empty string."""
    return "".join(
        _ANY_COMPONENTS if part == "**" else "/" + "".join(_translate_component(part)) for part in _components(pattern)
    )


def _translate_component(part: str, *, any_char: str = "[^/]") -> Iterator[str]:
    """Regex pieces for one component; nothing it yields can match '/' unless `any_char` can."""
    i = 0
    while i < len(part):
        char = part[i]
        if char == "*":
            yield any_char + "*"
        elif char == "?":
            yield any_char
        elif char == "[":
            body, i = _character_class(part, i, exclude="/" if any_char == "[^/]" else "")
            yield body
            continue
        else:
            yield re.escape(char)
        i += 1


def _character_class(part: str, start: int, exclude: str = "/") -> tuple[str, int]:
    """Translate the class opening at `start`; returns its regex and the index after ']'.

    '!' first negates (as in the shell) and a ']' right after the opening is literal. The
    lookahead keeps ranges such as "[!-0]" and negations from ever matching `exclude`.
    """
    i = start + 1
    negate = part.startswith("!", i)
    if negate:
        i += 1
    end = part.find("]", i + 1 if part.startswith("]", i) else i)
    if end < 0:
        raise GlobSyntaxError(f"{part!r} opens '[' without a closing ']'; close it or remove it")
    members = "".join(c if c == "-" else re.escape(c) for c in part[i:end])
    guard = f"(?!{re.escape(exclude)})" if exclude else ""
    return f"{guard}[{'^' if negate else ''}{members}]", end + 1


@dataclass(frozen=True)
class NameGlob:
    """A glob over a name rather than a path: container names, ids, annotation values, options.

    Same syntax as path globs ("*", "?", "[...]", no escapes) but "*" and "?" match any
    character, '/' included, since these names have no components.
    """

    pattern: str
    regex: re.Pattern[str]

    @classmethod
    def compile(cls, pattern: str) -> NameGlob:
        """Compile `pattern`; raises GlobSyntaxError with a sentence saying how to fix it."""
        try:
            regex = re.compile("".join(_translate_component(pattern, any_char="(?s:.)")))
        except re.error as exc:
            raise GlobSyntaxError(f"{pattern!r} is not a valid glob ({exc.msg})") from None
        return cls(pattern, regex)

    def matches(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None


def literal_glob(text: str) -> str:
    """A glob matching exactly `text`: the metacharacters become one-character classes.

    Globs have no escape character, so "[*]" is how a policy spells a literal '*'.
    """
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


@dataclass(frozen=True)
class ContainerInfo:
    """Who is asking: what the runtime told the supervisor about the container.

    Every field may be unknown (empty or None); a rule whose selector names an unknown field
    does not apply to the container.
    """

    name: str = ""
    host_uid: int | None = None
    lxc_cookie: str | None = None
    oci_id: str | None = None
    oci_annotations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class MountRequest:
    """What the container asked for, after paths were resolved and the image probed."""

    source: str
    target: str
    fstype: str
    read_only: bool
    options: tuple[str, ...] = ()
    size: int | None = None  # image size in bytes
    sha256: str | None = None  # hex digest of the image, supplied only when Policy.needs_digest
    container: ContainerInfo = ContainerInfo()
    loop_devices: int = 0  # loop devices the container holds right now
    source_origin: SourceOrigin = "host"  # whose file `source` is (see SourceOrigin)


@dataclass(frozen=True)
class Decision:
    """The verdict plus the sentence the audit log and the user see.

    `idmap` and `daemon` carry the deciding rule's settings for actions kernel and fuse
    respectively; other actions leave them at their defaults.
    """

    rule: str | None
    action: str
    errno: int
    options: tuple[str, ...]
    reason: str
    idmap: bool = True  # idmap the kernel mount with the container's user namespace
    daemon: str | None = None  # for action "fuse": the daemon the rule names (None = default for the type)


@dataclass(frozen=True)
class Step:
    """One rule tried: whether it matched and, in one sentence, why or why not."""

    rule: str
    matched: bool
    why: str


@dataclass(frozen=True)
class Explanation:
    """How a request was decided: the rules tried in order, up to and including the deciding one."""

    steps: tuple[Step, ...]
    decision: Decision


MATCHES: Final = "matches"


@dataclass(frozen=True)
class Policy:
    """Rules from all loaded files, in order; the first rule that matches decides."""

    files: tuple[str, ...]
    rules: tuple[Rule, ...]
    limits: Limits

    @property
    def needs_digest(self) -> bool:
        """Whether some rule matches on sha256, so requests must carry the image's digest."""
        return any(rule.match is not None and rule.match.sha256 is not None for rule in self.rules)

    def digest_could_match(self, req: MountRequest) -> bool:
        """Whether some digest rule matches `req` in everything but the digest: only then is an
        image worth hashing (and copying), so an image no digest rule could take costs nothing."""
        return any(
            rule.match is not None and rule.match.sha256 is not None
            and mismatch(rule, replace(req, sha256=rule.match.sha256[0])) is None
            for rule in self.rules
        )  # fmt: skip

    def evaluate(self, req: MountRequest) -> Decision:
        """Decide `req`; anything no rule mentions is denied, so a policy only ever widens."""
        return self.explain(req).decision

    def explain(self, req: MountRequest) -> Explanation:
        """Decide `req` and say which rules were tried and why each did or did not match."""
        steps: list[Step] = []
        for rule in self.rules:
            why = mismatch(rule, req)
            steps.append(Step(rule.name, why is None, MATCHES if why is None else why))
            if why is None:
                return Explanation(tuple(steps), _decide(rule, req))
        decision = Decision(
            rule=None,
            action="deny",
            errno=errno.EPERM,
            options=(),
            reason=f"no rule matched {_describe(req)}; add a rule to the policy",
        )
        return Explanation(tuple(steps), decision)


def mismatch(rule: Rule, req: MountRequest) -> str | None:
    """The first condition of `rule` that `req` fails, as a sentence; None if all hold.

    Absent conditions match anything. The container selector is checked before the match.
    """
    if rule.containers is not None:
        why = _container_mismatch(rule.containers, req.container)
        if why is not None:
            return why
    if rule.match is None:
        return None
    return next((why for check in _MATCH_CHECKS if (why := check(rule.match, req)) is not None), None)


def _container_mismatch(sel: Containers, info: ContainerInfo) -> str | None:
    if sel.name is not None and not _any_name(sel.name, info.name):
        if not info.name:
            return f"the container has no name; the rule needs one matching {_alternatives(sel.name)}"
        return f"container name {info.name!r} does not match {_alternatives(sel.name)}"
    if sel.host_uid is not None:
        if info.host_uid is None:
            return "the container's host uid is unknown; the rule names host uids"
        if info.host_uid not in sel.host_uid:
            return f"container host uid {info.host_uid} is not {_alternatives(sel.host_uid, 'one of')}"
    if sel.lxc_cookie is not None:
        # Cookies identify containers to the supervisor; they are not repeated in logs.
        if info.lxc_cookie is None:
            return "the container has no LXC cookie; the rule names LXC cookies"
        if info.lxc_cookie not in sel.lxc_cookie:
            return "the container's LXC cookie is not one the rule names"
    if sel.oci_id is not None:
        if info.oci_id is None:
            return f"the container has no OCI id; the rule needs one matching {_alternatives(sel.oci_id)}"
        if not _any_name(sel.oci_id, info.oci_id):
            return f"container OCI id {info.oci_id!r} does not match {_alternatives(sel.oci_id)}"
    if sel.oci_annotations is not None:
        present = dict(info.oci_annotations)
        for key, globs in sel.oci_annotations.items():
            value = present.get(key)
            if value is None:
                return f"the container has no annotation {key!r}"
            if not _any_name(globs, value):
                return f"container annotation {key!r} is {value!r}, which does not match {_alternatives(globs)}"
    return None


def _source_mismatch(match: Match, req: MountRequest) -> str | None:
    """Globs name the host's files: a container-made source matches only where the rule says so."""
    if match.source is None:
        return None
    if req.source_origin == "deleted":
        return f"source {req.source} was deleted; a source glob matches only files that still have their name"
    if not _any_glob(match.source, req.source):
        return f"source {req.source} does not match {_alternatives(match.source)}"
    if req.source_origin == "container" and not match.container_sources:
        return (
            f"source {req.source} is the container's (reached through a mount it made or moved, not the host's "
            "file at that path); add container_sources: true to the match to accept such sources"
        )
    return None


def _target_mismatch(match: Match, req: MountRequest) -> str | None:
    if match.target is None or _any_glob(match.target, req.target):
        return None
    return f"target {req.target} does not match {_alternatives(match.target)}"


def _fstype_mismatch(match: Match, req: MountRequest) -> str | None:
    if match.fstype is None or req.fstype in match.fstype:
        return None
    return f"fstype {req.fstype} is not {_alternatives(match.fstype, 'one of')}"


def _size_mismatch(match: Match, req: MountRequest) -> str | None:
    bounds = match.size
    if bounds is None:
        return None
    if req.size is None:
        return "the image size is unknown; the rule limits it"
    if bounds.min is not None and req.size < bounds.min:
        return f"size {show_size(req.size)} is below the minimum {show_size(bounds.min)}"
    if bounds.max is not None and req.size > bounds.max:
        return f"size {show_size(req.size)} is above the maximum {show_size(bounds.max)}"
    return None


def _sha256_mismatch(match: Match, req: MountRequest) -> str | None:
    if match.sha256 is None:
        return None
    if req.sha256 is None:
        return "the image's sha256 was not computed; the rule matches only listed digests"
    if req.sha256.lower() not in match.sha256:
        listed = "the one digest" if len(match.sha256) == 1 else f"the {len(match.sha256)} digests"
        return f"sha256 {req.sha256.lower()} is not {listed} the rule lists"
    return None


def _read_only_mismatch(match: Match, req: MountRequest) -> str | None:
    if match.read_only is None or match.read_only == req.read_only:
        return None
    if match.read_only:
        return "the request is read-write; the rule matches only read-only mounts"
    return "the request is read-only; the rule matches only read-write mounts"


def _options_allowed_mismatch(match: Match, req: MountRequest) -> str | None:
    allowed = match.options_allowed
    if allowed is None:
        return None
    for option in req.options:
        if not _any_name(allowed, option):
            if not allowed:
                return f"option {option!r} is not allowed; the rule allows no filesystem options"
            return f"option {option!r} is not allowed; the rule allows only {_listing(allowed)}"
    return None


def _options_forbidden_mismatch(match: Match, req: MountRequest) -> str | None:
    for option in req.options:
        for glob in match.options_forbidden or ():
            if glob.matches(option):
                return f"option {option!r} is forbidden by {glob.pattern}"
    return None


def _loop_devices_mismatch(match: Match, req: MountRequest) -> str | None:
    limit = match.max_loop_devices
    if limit is None or req.loop_devices < limit:
        return None
    return f"the container holds {req.loop_devices} loop devices; the rule matches only below {limit}"


# In the order the schema lists the keys, so the first mismatch reported reads top-down.
_MATCH_CHECKS: Final[tuple[Callable[[Match, MountRequest], str | None], ...]] = (
    _source_mismatch,
    _target_mismatch,
    _fstype_mismatch,
    _size_mismatch,
    _sha256_mismatch,
    _read_only_mismatch,
    _options_allowed_mismatch,
    _options_forbidden_mismatch,
    _loop_devices_mismatch,
)


def _any_glob(globs: tuple[Glob, ...] | None, path: str) -> bool:
    return globs is None or any(glob.matches(path) for glob in globs)


def _any_name(globs: tuple[NameGlob, ...], name: str) -> bool:
    return any(glob.matches(name) for glob in globs)


def _listing(values: tuple[Glob | NameGlob | str | int, ...]) -> str:
    return ", ".join(value.pattern if isinstance(value, Glob | NameGlob) else str(value) for value in values)


def _alternatives(values: tuple[Glob | NameGlob | str | int, ...], several: str = "any of") -> str:
    """The end of "... does not match x" for one value, or of "... does not match any of x, y"."""
    return _listing(values) if len(values) == 1 else f"{several} {_listing(values)}"


_SIZE_UNITS: Final = (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))


def show_size(size: int) -> str:
    """A byte count as a policy would write it: "2G" when that is exact, else "1500 bytes"."""
    for suffix, unit in _SIZE_UNITS:
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return f"{size} bytes"


def _decide(rule: Rule, req: MountRequest) -> Decision:
    if rule.action != "deny":
        via = "" if rule.action == "kernel" else " through FUSE" + (f" with {rule.daemon}" if rule.daemon else "")
        return Decision(
            rule=rule.name,
            action=rule.action,
            errno=0,
            options=rule.options,
            reason=f"rule {rule.name!r} allows it{via}",
            idmap=rule.idmap,
            daemon=rule.daemon,
        )
    name = rule.errno or DEFAULT_ERRNO
    return Decision(
        rule=rule.name,
        action="deny",
        errno=int(getattr(errno, name)),
        options=(),
        reason=(f"rule {rule.name!r} denies {_describe(req)} with {name}; change the policy to allow it"),
    )


def _describe(req: MountRequest) -> str:
    return f"{req.source} on {req.target} ({req.fstype}{_ORIGIN_NOTE[req.source_origin]})"


_ORIGIN_NOTE: Final[dict[str, str]] = {
    "host": "",
    "container": ", source made by the container",
    "deleted": ", source deleted",
}
