"""Writing a policy from the mounts a container was seen to make (learn mode).

The result is a starting point for review, not a policy to deploy blindly: it allows what
the container did while it was watched, generalised only as far as an operator would (an
image's siblings with the same extension), and denies everything else. Pure: text out,
no I/O, the same text for the same set of requests in any order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import yaml

from .matcher import Glob, GlobSyntaxError, MountRequest, literal_glob
from .schema import is_fstype_name

RULE_PREFIX: Final = "learned-"
DELETED: Final = " (deleted)"  # what the kernel appends to the name of an unlinked file
DENY_RULE: Final = "learned-deny-all"

HEADER: Final = """\
# Learned by mountwarden from {count} mount request(s). REVIEW BEFORE USE: every rule
# allows what the container was seen to do, widened to sibling images with the same
# extension ("*.ext4") in the same directory; filesystem options are limited to those
# seen. Anything else is denied by the last rule.
"""

# Scalars written without quotes when YAML reads them back as the same string.
_PLAIN: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


@dataclass
class _Group:
    """Requests that generalise to one rule: same source pattern and target."""

    count: int = 0
    read_only: bool = True
    options: set[str] = field(default_factory=set)


def suggest(requests: Sequence[MountRequest]) -> str:
    """A version 1 policy allowing every request in `requests` through the kernel.

    Raises ValueError for a request no policy could allow (a path that is not canonical,
    an fstype that is not a type name, an empty option or one holding a comma).
    """
    groups: dict[tuple[str, str], _Group] = {}
    fstypes: dict[str, set[str]] = {}
    for req in requests:
        _check(req)
        pattern = source_pattern(req.source)
        group = groups.setdefault((pattern, literal_glob(req.target)), _Group())
        group.count += 1
        group.read_only = group.read_only and req.read_only
        group.options.update(req.options)
        fstypes.setdefault(pattern, set()).add(req.fstype)
    parts = [HEADER.format(count=len(requests)), "version: 1\n", "rules:\n"]
    for number, ((source, target), group) in enumerate(sorted(groups.items(), key=lambda item: item[0]), start=1):
        parts.append(_rule(f"{RULE_PREFIX}{number}", source, target, sorted(fstypes[source]), group))
    parts.append(f"  # Everything not learned above.\n  - name: {DENY_RULE}\n    action: deny\n    errno: EPERM\n")
    return "".join(parts)


def partition(requests: Sequence[MountRequest]) -> tuple[list[MountRequest], list[tuple[MountRequest, str]]]:
    """Split `requests` into those `suggest` accepts and the others, each with the reason why not.

    A container sees its requests written only at its end, when nothing can be asked again:
    one request no policy could allow (its backing file deleted, an fd on something that has
    no path) must cost that request, not the whole learned policy.
    """
    learnable: list[MountRequest] = []
    skipped: list[tuple[MountRequest, str]] = []
    for req in requests:
        try:
            _check(req)
        except ValueError as exc:
            skipped.append((req, str(exc)))
        else:
            learnable.append(req)
    return learnable, skipped


def source_pattern(source: str) -> str:
    """The source glob a rule learns: <dir>/*.<ext> when the file has an extension, else the path."""
    directory, _, base = source.rpartition("/")
    ext = os.path.splitext(base)[1][1:]
    if not ext:
        return literal_glob(source)
    return f"{literal_glob(directory)}/*.{literal_glob(ext)}"


def _check(req: MountRequest) -> None:
    for what, path in (("source", req.source), ("target", req.target)):
        if not path:
            raise ValueError(f"cannot learn from {what} {path!r}: it has no path (deleted, or outside the container)")
        try:
            canonical = Glob.compile(literal_glob(path)).matches(path)
        except GlobSyntaxError:
            canonical = False
        if not canonical:
            raise ValueError(f"cannot learn from {what} {path!r}: policies match canonical absolute paths only")
        if path.endswith(DELETED):
            raise ValueError(f"cannot learn from {what} {path!r}: the file was deleted before the mount")
    if not is_fstype_name(req.fstype):
        raise ValueError(f"cannot learn from fstype {req.fstype!r}: it is not a filesystem type name")
    for option in req.options:
        if not option or "," in option:
            raise ValueError(f"cannot learn from option {option!r}: write one non-empty option per item")


def _rule(name: str, source: str, target: str, fstypes: list[str], group: _Group) -> str:
    mode = "all read-only, so ro is forced" if group.read_only else "read-write"
    lines = [
        f"  # {group.count} request(s), {mode}.",
        f"  - name: {name}",
        "    match:",
        f"      source: {_scalar(source)}",
        f"      target: {_scalar(target)}",
        f"      fstype: {_flow(fstypes)}",
        f"      options_allowed: {_flow(sorted(literal_glob(option) for option in group.options))}",
        "    action: kernel",
    ]
    if group.read_only:
        lines.append("    options: [ro]")
    return "\n".join(lines) + "\n\n"


def _flow(values: list[str]) -> str:
    return "[" + ", ".join(map(_scalar, values)) + "]"


def _scalar(value: str) -> str:
    """`value` as a YAML scalar: plain when that reads back unchanged, else double-quoted."""
    if _PLAIN.fullmatch(value):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return _quoted(value)


def _quoted(value: str) -> str:
    """A double-quoted YAML scalar in printable ASCII, whatever `value` holds.

    Every other character is escaped by code point (YAML's \\x, \\u and \\U): a path may hold
    control characters, which YAML refuses raw, and lone surrogates from undecodable bytes.
    """
    out = []
    for char in value:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code <= 0x7E:
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'
