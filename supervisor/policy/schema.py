"""The policy file format, version 1, as pydantic models.

The models are the single definition of what a policy may say: the loader only turns their
errors into "file:line:col" sentences. Every custom check raises a PydanticCustomError whose
message already says what is allowed instead, so the loader never needs to know the rules.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .matcher import Glob, GlobSyntaxError, NameGlob, show_size

VersionNumber = Literal[1]
ActionName = Literal["kernel", "fuse", "deny"]
OptionName = Literal[
    "ro",
    "noexec",
    "nosuid",
    "nodev",
    "noatime",
    "nodiratime",
    "relatime",
    "strictatime",
    "sync",
    "dirsync",
]

# Kernel filesystem type names: "ext4", "9p", "fuse.sshfs". Rejecting anything else catches
# "ext4, squashfs" written as one string, which would otherwise silently never match.
_FSTYPE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# A FUSE daemon is named, never given as a path: the supervisor decides where programs live.
_PROGRAM_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
_DIGEST: Final = re.compile(r"[0-9a-fA-F]{64}")
_SIZE: Final = re.compile(r"([0-9]+)([KMGT]?)", re.IGNORECASE)
_SIZE_SHIFT: Final = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
MAX_HOST_UID: Final = 0xFFFFFFFE  # (uid_t)-1 means "no uid" to the kernel


def show_value(value: object) -> str:
    """The offending input as a user would recognise it in their YAML."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


def _one_of(literal: Any) -> BeforeValidator:
    """A check listing the allowed values, instead of pydantic's "Input should be ..."."""
    allowed = get_args(literal)

    def check(value: object) -> object:
        # Compare types too: YAML's `true` must not pass for 1, nor "1" for 1.
        if not any(type(value) is type(choice) and value == choice for choice in allowed):
            raise PydanticCustomError(
                "not_allowed",
                "{value} is not allowed; use one of: {allowed}",
                {"value": show_value(value), "allowed": ", ".join(map(str, allowed))},
            )
        return value

    return BeforeValidator(check)


def _as_list(value: object) -> object:
    """Let a single glob or type stand for a one-element list, and refuse empty lists."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise PydanticCustomError(
            "str_or_list",
            "{value} is neither a string nor a list; write one value or a list like [a, b]",
            {"value": show_value(value)},
        )
    if not value:
        raise PydanticCustomError("empty_list", "an empty list matches nothing; remove the key to match anything")
    return value


def _as_list_or_empty(value: object) -> object:
    """Like _as_list, but [] is meaningful: options_allowed: [] allows no options at all."""
    return value if value == [] else _as_list(value)


def _as_int_list(value: object) -> object:
    """Let a single number stand for a one-element list (host uids)."""
    if type(value) is int:
        return [value]
    if not isinstance(value, list):
        raise PydanticCustomError(
            "int_or_list",
            "{value} is neither a number nor a list; write one number or a list like [100000, 200000]",
            {"value": show_value(value)},
        )
    if not value:
        raise PydanticCustomError("empty_list", "an empty list matches nothing; remove the key to match anything")
    return value


def _glob(value: object) -> Glob:
    if not isinstance(value, str):
        raise PydanticCustomError(
            "glob_type",
            '{value} is not a path glob; write an absolute path like "/mnt/**"',
            {"value": show_value(value)},
        )
    try:
        return Glob.compile(value)
    except GlobSyntaxError as exc:
        raise PydanticCustomError("glob_syntax", "{message}", {"message": str(exc)}) from None


def _name_glob(value: object) -> NameGlob:
    if not isinstance(value, str):
        raise PydanticCustomError(
            "name_glob_type",
            '{value} is not a glob; write a string like "ci-*" (quote it if needed)',
            {"value": show_value(value)},
        )
    if not value:
        raise PydanticCustomError("empty_glob", 'an empty glob matches only empty values; write one like "ci-*"')
    try:
        return NameGlob.compile(value)
    except GlobSyntaxError as exc:
        raise PydanticCustomError("glob_syntax", "{message}", {"message": str(exc)}) from None


def _option_glob(value: object) -> NameGlob:
    if isinstance(value, str) and "," in value:
        raise PydanticCustomError(
            "option_comma",
            '{value} holds a comma; write one option per list item, like [noload, "errors=*"]',
            {"value": repr(value)},
        )
    return _name_glob(value)


def _digest(value: object) -> str:
    if not (isinstance(value, str) and _DIGEST.fullmatch(value)):
        raise PydanticCustomError(
            "sha256_digest",
            "{value} is not a SHA-256 digest; write the 64 hex digits sha256sum prints, in quotes",
            {"value": show_value(value)},
        )
    return value.lower()


def _size(value: object) -> int:
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is not None:
        return int(match[1]) << _SIZE_SHIFT[match[2].upper()]
    if type(value) is int and value >= 0:
        return value
    raise PydanticCustomError(
        "size",
        "{value} is not a size; write a number of bytes, or one with a K, M, G or T suffix (1K = 1024) like 512M",
        {"value": show_value(value)},
    )


def _strict_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise PydanticCustomError(
            "bool", "{value} is not true or false; write true or false", {"value": show_value(value)}
        )
    return value


def _loop_count(value: object) -> int:
    if not (type(value) is int and 1 <= value <= 1024):
        raise PydanticCustomError(
            "loop_count",
            "{value} is not a loop device count; write a whole number from 1 to 1024 "
            "(the rule matches while the container holds fewer)",
            {"value": show_value(value)},
        )
    return value


def _host_uid(value: object) -> int:
    if not (type(value) is int and 0 <= value <= MAX_HOST_UID):
        raise PydanticCustomError(
            "host_uid",
            "{value} is not a host uid; write a whole number from 0 to {most}",
            {"value": show_value(value), "most": MAX_HOST_UID},
        )
    return value


def _cookie(value: object) -> str:
    if not (isinstance(value, str) and value):
        raise PydanticCustomError(
            "lxc_cookie",
            "{value} is not an LXC cookie; write the cookie as a string, in quotes",
            {"value": show_value(value)},
        )
    return value


def _program(value: object) -> str:
    if not (isinstance(value, str) and _PROGRAM_NAME.fullmatch(value)):
        raise PydanticCustomError(
            "program_name",
            "{value} is not a program name; write a name without '/', like fuse2fs, squashfuse or erofsfuse",
            {"value": show_value(value)},
        )
    return value


def _annotation_map(value: object) -> object:
    if not isinstance(value, dict):
        raise PydanticCustomError(
            "annotation_map",
            '{value} is not a mapping; write annotations like {"org.example/mounts": "allowed"}',
            {"value": show_value(value)},
        )
    if not value:
        raise PydanticCustomError("empty_map", "an empty mapping requires nothing; remove the key")
    return value


def is_fstype_name(value: str) -> bool:
    """Whether `value` may appear in a rule's fstype list."""
    return _FSTYPE_NAME.fullmatch(value) is not None


def _fstype(value: str) -> str:
    if not is_fstype_name(value):
        raise PydanticCustomError(
            "fstype_name",
            "{value} is not a filesystem type name; write one name per list item, like [ext4, squashfs]",
            {"value": repr(value)},
        )
    return value


def _errno_name(value: object) -> object:
    if not (isinstance(value, str) and value.startswith("E") and isinstance(getattr(errno, value, None), int)):
        raise PydanticCustomError(
            "errno_name",
            "{value} is not an errno name; use one like EPERM, EACCES, EROFS or ENODEV",
            {"value": show_value(value)},
        )
    return value


def _rule_name(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_name", "a rule name must not be empty; give the rule a short unique name")
    return value


def _dedupe(options: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(options))


Version = Annotated[VersionNumber, _one_of(VersionNumber)]
Action = Annotated[ActionName, _one_of(ActionName)]
Option = Annotated[OptionName, _one_of(OptionName)]
Options = Annotated[tuple[Option, ...], AfterValidator(_dedupe)]
Globs = Annotated[tuple[Annotated[Glob, PlainValidator(_glob)], ...], BeforeValidator(_as_list)]
FsTypes = Annotated[tuple[Annotated[str, AfterValidator(_fstype)], ...], BeforeValidator(_as_list)]
ErrnoName = Annotated[str, BeforeValidator(_errno_name)]
RuleName = Annotated[str, AfterValidator(_rule_name)]
NameGlobs = Annotated[tuple[Annotated[NameGlob, PlainValidator(_name_glob)], ...], BeforeValidator(_as_list)]
OptionGlob = Annotated[NameGlob, PlainValidator(_option_glob)]
Digests = Annotated[
    tuple[Annotated[str, PlainValidator(_digest)], ...], BeforeValidator(_as_list), AfterValidator(_dedupe)
]
Size = Annotated[int, PlainValidator(_size)]
StrictBool = Annotated[bool, PlainValidator(_strict_bool)]
HostUids = Annotated[tuple[Annotated[int, PlainValidator(_host_uid)], ...], BeforeValidator(_as_int_list)]
Cookies = Annotated[tuple[Annotated[str, PlainValidator(_cookie)], ...], BeforeValidator(_as_list)]
Annotations = Annotated[dict[str, NameGlobs], BeforeValidator(_annotation_map)]
Program = Annotated[str, PlainValidator(_program)]


class _Model(BaseModel):
    """Unknown keys are errors: a misspelt "match" key must not widen a rule to match all."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Containers(_Model):
    """Which containers a rule applies to; every key given must hold, absent keys allow any."""

    name: NameGlobs | None = None
    host_uid: HostUids | None = None
    lxc_cookie: Cookies | None = None
    oci_id: NameGlobs | None = None
    oci_annotations: Annotations | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Containers:
        if not self.model_fields_set:
            raise PydanticCustomError(
                "empty_selector",
                "an empty selector selects every container; remove 'containers' or name some of: {keys}",
                {"keys": ", ".join(type(self).model_fields)},
            )
        return self

    def __hash__(self) -> int:
        # The annotation dict keeps error positions per key while loading; hash it as items.
        annotations = None if self.oci_annotations is None else tuple(self.oci_annotations.items())
        return hash((self.name, self.host_uid, self.lxc_cookie, self.oci_id, annotations))


class SizeRange(_Model):
    """Inclusive bounds on the image size in bytes; either may be left out."""

    min: Size | None = None
    max: Size | None = None

    @field_validator("max")
    @classmethod
    def _max_not_below_min(cls, value: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("min")
        if value is not None and low is not None and value < low:
            raise PydanticCustomError(
                "size_order",
                "max {high} is smaller than min {low}; make min at most max",
                {"high": show_size(value), "low": show_size(low)},
            )
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> SizeRange:
        if not self.model_fields_set:
            raise PydanticCustomError("empty_size", "an empty size range limits nothing; give min, max or both")
        return self


class Match(_Model):
    """Conditions that must all hold; a missing key places no condition.

    `source` globs name the host's files (or the runtime's rootfs): a path the container made
    lead elsewhere, by a bind, move or mount of its own (the supervisor's mounts included),
    matches only with `container_sources: true`, for rules that trust the image's bytes (a
    digest, a FUSE daemon) rather than where it lies.
    """

    source: Globs | None = None
    container_sources: StrictBool = False
    target: Globs | None = None
    fstype: FsTypes | None = None
    size: SizeRange | None = None
    sha256: Digests | None = None
    read_only: StrictBool | None = None
    options_allowed: Annotated[tuple[OptionGlob, ...], BeforeValidator(_as_list_or_empty)] | None = None
    options_forbidden: Annotated[tuple[OptionGlob, ...], BeforeValidator(_as_list)] | None = None
    max_loop_devices: Annotated[int, PlainValidator(_loop_count)] | None = None

    @field_validator("container_sources")
    @classmethod
    def _widens_a_source(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("source") is None:
            raise PydanticCustomError(
                "container_sources_without_source",
                "container_sources only widens a source glob, and this match has none (it accepts any source "
                "already); add a source glob or remove container_sources",
            )
        return value


class Rule(_Model):
    """One policy rule. Field order matters: validators below read the already-checked action."""

    name: RuleName
    containers: Containers | None = None
    match: Match | None = None
    action: Action
    options: Options = ()
    idmap: StrictBool = True
    daemon: Program | None = None
    errno: ErrnoName | None = None

    @field_validator("options")
    @classmethod
    def _options_need_a_mount(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("action") == "deny":
            raise PydanticCustomError(
                "options_on_deny",
                "options only apply to actions kernel and fuse; remove them from this deny rule",
            )
        return value

    @field_validator("idmap")
    @classmethod
    def _idmap_needs_kernel(cls, value: bool, info: ValidationInfo) -> bool:
        action = info.data.get("action")
        if action is not None and action != "kernel":
            raise PydanticCustomError(
                "idmap_not_kernel",
                "idmap only applies to action: kernel; remove it from this {action} rule",
                {"action": action},
            )
        return value

    @field_validator("daemon")
    @classmethod
    def _daemon_needs_fuse(cls, value: str | None, info: ValidationInfo) -> str | None:
        action = info.data.get("action")
        if action is not None and action != "fuse":
            raise PydanticCustomError(
                "daemon_not_fuse",
                "daemon only applies to action: fuse; remove it or change the action to fuse",
            )
        return value

    @field_validator("errno")
    @classmethod
    def _errno_needs_deny(cls, value: str | None, info: ValidationInfo) -> str | None:
        action = info.data.get("action")
        if action is not None and action != "deny":
            raise PydanticCustomError(
                "errno_not_deny",
                "errno only applies to action: deny; remove it or change the action to deny",
            )
        return value


class Limits(_Model):
    """How many loop devices a container may hold at once, and all containers of one host uid;
    how large an image a digest rule may hash."""

    loop_devices: Annotated[int, Field(ge=0, le=1024)] = 8
    loop_devices_per_host_uid: Annotated[int, Field(ge=0, le=65536)] = 64
    # A digest rule hashes (and copies into sealed memory) at most this much of an image, unless
    # its own size.max is lower: the check never costs more than the policy says.
    digest_max_size: Size = 1 << 30


class PolicyFile(_Model):
    """One policy file; the loader concatenates the rules of several (later files' limits win)."""

    version: Version
    limits: Limits = Limits()
    rules: tuple[Rule, ...]


def allowed_keys(loc: Sequence[str | int]) -> tuple[str, ...]:
    """Keys the mapping at pydantic location `loc` may hold, to list in "unknown key" errors.

    `loc` is the location of the mapping itself, not of the unknown key in it.
    """
    model: type[BaseModel] | None = PolicyFile
    for part in loc:
        if isinstance(part, str) and model is not None:
            field = model.model_fields.get(part)
            model = _model_in(field.annotation) if field is not None else None
    return tuple(model.model_fields) if model is not None else ()


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The model nested in an annotation such as `tuple[Rule, ...]` or `Match | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, get_args(annotation))), None)
