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
)
from pydantic_core import PydanticCustomError

from .matcher import Glob, GlobSyntaxError

VersionNumber = Literal[1]
ActionName = Literal["kernel", "deny"]
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


def _fstype(value: str) -> str:
    if not _FSTYPE_NAME.fullmatch(value):
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


class _Model(BaseModel):
    """Unknown keys are errors: a misspelt "match" key must not widen a rule to match all."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Model):
    """Conditions that must all hold; a missing key places no condition."""

    source: Globs | None = None
    target: Globs | None = None
    fstype: FsTypes | None = None


class Rule(_Model):
    """One policy rule. Field order matters: validators below read the already-checked action."""

    name: RuleName
    match: Match | None = None
    action: Action
    options: Options = ()
    errno: ErrnoName | None = None

    @field_validator("options")
    @classmethod
    def _options_need_kernel(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("action") == "deny":
            raise PydanticCustomError(
                "options_on_deny",
                "options only apply to action: kernel; remove them from this deny rule",
            )
        return value

    @field_validator("errno")
    @classmethod
    def _errno_needs_deny(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("action") == "kernel":
            raise PydanticCustomError(
                "errno_on_kernel",
                "errno only applies to action: deny; remove it or change the action to deny",
            )
        return value


class Limits(_Model):
    """How many loop devices a container may hold at once, and all containers of one host uid."""

    loop_devices: Annotated[int, Field(ge=0, le=1024)] = 8
    loop_devices_per_host_uid: Annotated[int, Field(ge=0, le=65536)] = 64


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
