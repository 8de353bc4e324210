"""Deciding a mount request against loaded rules: pure functions, no I/O.

Globs are translated to regular expressions here rather than with fnmatch, because fnmatch
lets ``*`` cross ``/`` and has no ``**``; a policy that says ``/srv/img/*`` must never admit
``/srv/img/../../etc`` lookalikes or files in subdirectories the operator did not name.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .schema import Limits, Rule

DEFAULT_ERRNO: Final = "EPERM"

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


def _translate_component(part: str) -> Iterator[str]:
    """Regex pieces for one component; nothing it yields can match '/'."""
    i = 0
    while i < len(part):
        char = part[i]
        if char == "*":
            yield "[^/]*"
        elif char == "?":
            yield "[^/]"
        elif char == "[":
            body, i = _character_class(part, i)
            yield body
            continue
        else:
            yield re.escape(char)
        i += 1


def _character_class(part: str, start: int) -> tuple[str, int]:
    """Translate the class opening at `start`; returns its regex and the index after ']'.

    '!' first negates (as in the shell) and a ']' right after the opening is literal. The
    lookahead keeps ranges such as "[!-0]" and negations from ever matching '/'.
    """
    i = start + 1
    negate = part.startswith("!", i)
    if negate:
        i += 1
    end = part.find("]", i + 1 if part.startswith("]", i) else i)
    if end < 0:
        raise GlobSyntaxError(f"{part!r} opens '[' without a closing ']'; close it or remove it")
    members = "".join(c if c == "-" else re.escape(c) for c in part[i:end])
    return f"(?!/)[{'^' if negate else ''}{members}]", end + 1


@dataclass(frozen=True)
class MountRequest:
    """What the container asked for, after paths were resolved and the image probed."""

    source: str
    target: str
    fstype: str
    read_only: bool
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """The verdict plus the sentence the audit log and the user see."""

    rule: str | None
    action: str
    errno: int
    options: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Policy:
    """Rules from all loaded files, in order; the first rule that matches decides."""

    files: tuple[str, ...]
    rules: tuple[Rule, ...]
    limits: Limits

    def evaluate(self, req: MountRequest) -> Decision:
        """Decide `req`; anything no rule mentions is denied, so a policy only ever widens."""
        for rule in self.rules:
            if _rule_matches(rule, req):
                return _decide(rule, req)
        return Decision(
            rule=None,
            action="deny",
            errno=errno.EPERM,
            options=(),
            reason=f"no rule matched {_describe(req)}; add a rule to the policy",
        )


def _rule_matches(rule: Rule, req: MountRequest) -> bool:
    """Whether every condition the rule states holds; absent conditions match anything."""
    match = rule.match
    if match is None:
        return True
    return (
        _any_glob(match.source, req.source)
        and _any_glob(match.target, req.target)
        and (match.fstype is None or req.fstype in match.fstype)
    )


def _any_glob(globs: tuple[Glob, ...] | None, path: str) -> bool:
    return globs is None or any(glob.matches(path) for glob in globs)


def _decide(rule: Rule, req: MountRequest) -> Decision:
    if rule.action == "kernel":
        return Decision(
            rule=rule.name,
            action="kernel",
            errno=0,
            options=rule.options,
            reason=f"rule {rule.name!r} allows it",
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
    return f"{req.source} on {req.target} ({req.fstype})"
