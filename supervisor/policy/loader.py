"""Reading policy files into a Policy, with every error pinned to file:line:col.

The YAML is composed into a node tree first so that a pydantic error location such as
("rules", 1, "action") can be walked back to the node that caused it: operators edit these
files by hand, and "line 7, column 5" is what lets them fix a policy without guessing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .matcher import Policy
from .schema import Limits, PolicyFile, allowed_keys, show_value

POLICY_SUFFIXES: Final = (".yaml", ".yml")
MAX_DEPTH: Final = 32  # nesting of lists and mappings; the schema itself needs six
MAX_VALUES: Final = 100_000  # values after alias expansion: thousands of rules, not an alias bomb

Loc = tuple[int | str, ...]


class PolicyError(Exception):
    """A policy that cannot be loaded.

    The message is one line per problem, each starting with "file:line:col:" (the format
    compilers use, so editors and terminals can jump to it) and saying what to write instead.
    """


@dataclass(frozen=True)
class _LoadedFile:
    """A validated file plus its node tree, kept to place errors found across files."""

    path: str
    root: yaml.Node
    content: PolicyFile


def load_policy(paths: Sequence[str | os.PathLike[str]]) -> Policy:
    """Load the files in order (a directory stands for its *.yaml/*.yml files by name).

    Rules are concatenated in that order, so earlier files take precedence.
    """
    files = tuple(name for path in paths for name in _expand(path))
    loaded = [_load_file(name) for name in files]
    _check_unique_names(loaded)
    limits = Limits()
    for item in loaded:
        limits = limits.model_copy(update=item.content.limits.model_dump(exclude_unset=True))
    return Policy(files=files, rules=tuple(rule for item in loaded for rule in item.content.rules), limits=limits)


def _expand(path: str | os.PathLike[str]) -> list[str]:
    name = os.fspath(path)
    if not os.path.isdir(name):
        return [name]
    try:
        entries = sorted(os.listdir(name))
    except OSError as exc:
        raise PolicyError(f"{name}: cannot list policy directory: {exc.strerror}") from None
    return [os.path.join(name, entry) for entry in entries if entry.endswith(POLICY_SUFFIXES)]


def _load_file(path: str) -> _LoadedFile:
    root = _compose(path, _read(path))
    try:
        content = PolicyFile.model_validate(_construct(path, root))
    except ValidationError as exc:
        problems = sorted(_explain(path, root, err) for err in exc.errors())
        raise PolicyError("\n".join(text for _, text in problems)) from None
    return _LoadedFile(path, root, content)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: byte {exc.start} is not UTF-8; save the file as UTF-8") from None


def _compose(path: str, text: str) -> yaml.Node:
    """The single YAML document in `text` as nodes, refusing empty files and duplicate keys."""
    try:
        _check_depth(path, text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc, text) from None
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
        raise PolicyError(f"{path}:1:1: the file is empty; write 'version: 1' and a 'rules:' list")
    if _expanded_size(root, {}) > MAX_VALUES:
        raise PolicyError(
            f"{path}:1:1: with its aliases (*name) expanded the file holds more than {MAX_VALUES} values; "
            "write the values out instead of repeating aliases of aliases"
        )
    duplicates = [
        f"{_position(path, key)}: duplicate key {key.value!r}; each key may appear once"
        for key in _duplicate_keys(root)
    ]
    if duplicates:
        raise PolicyError("\n".join(duplicates))
    return root


def _expanded_size(node: yaml.Node, seen: dict[int, int]) -> int:
    """How many values `node` stands for once every alias is expanded, as validation will see it.

    An alias is the very node it names, so counting each node once (`seen`) keeps this linear
    even for "aliases of aliases" that expand exponentially.
    """
    if id(node) not in seen:
        seen[id(node)] = 1  # a recursive alias is refused by the composer; this only guards the walk
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        seen[id(node)] = 1 + sum(_expanded_size(child, seen) for child in children)
    return seen[id(node)]


def _construct(path: str, root: yaml.Node) -> object:
    """Python values built from the very nodes that error locations are later looked up in."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    finally:
        loader.dispose()


def _check_depth(path: str, text: str) -> None:
    """Refuse nesting deeper than any policy needs, before the recursive composer overflows the stack.

    The parser's event stream is produced without recursion, so it can measure any depth.
    """
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
                raise PolicyError(
                    f"{where}: lists and mappings nest more than {MAX_DEPTH} deep here; "
                    "a policy needs a few levels, remove the extra nesting"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _yaml_error(path: str, exc: yaml.YAMLError, text: str = "") -> PolicyError:
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        return PolicyError(
            f"{path}:{line}:{column}: invalid YAML: character U+{exc.character:04X} is not allowed; "
            "remove it, or write it as an escape in a double-quoted string"
        )
    if not isinstance(exc, yaml.MarkedYAMLError):
        return PolicyError(f"{path}: invalid YAML: {' '.join(str(exc).split())}")
    mark = exc.problem_mark or exc.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
    return PolicyError(f"{where}: invalid YAML: {exc.problem}; fix the syntax here")


def _duplicate_keys(node: yaml.Node) -> Iterator[yaml.ScalarNode]:
    """Repeated keys, which YAML loaders silently resolve to the last value.

    In a security policy "action: kernel" followed by "action: deny" must not be a guess.
    Merge keys ("<<") are left alone: overriding merged keys is their purpose.
    """
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    yield key
                seen.add(key.value)
            yield from _duplicate_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _duplicate_keys(item)


def _explain(path: str, root: yaml.Node, err: ErrorDetails) -> tuple[int, str]:
    """One "file:line:col: where: what to do" line for a pydantic error, and its offset.

    The offset lets problems be listed in file order rather than in schema field order.
    """
    loc = err["loc"]
    if err["type"] == "extra_forbidden":
        node, walked = _locate(root, loc[:-1])
        node = _key_node(node, loc[-1]) or node
        walked = (*walked, loc[-1])
    else:
        node, walked = _locate(root, loc)
    where = _position(path, node)
    dotted = _dotted(walked)
    sentence = _sentence(err)
    text = f"{where}: {dotted}: {sentence}" if dotted else f"{where}: {sentence}"
    return node.start_mark.index, text


def _sentence(err: ErrorDetails) -> str:
    """Pydantic's message, reworded for the errors whose wording does not say what to do.

    The schema's own checks already phrase their messages this way and pass through.
    """
    kind, loc, got = err["type"], err["loc"], show_value(err["input"])
    if kind == "missing":
        return f"required key {loc[-1]!r} is missing; add it"
    if kind == "extra_forbidden":
        return f"unknown key {loc[-1]!r}; use one of: {', '.join(allowed_keys(loc[:-1]))}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{got} is not a mapping; write a mapping with keys: {', '.join(allowed_keys(loc))}"
    if kind in ("tuple_type", "list_type"):
        return f"{got} is not a list; write a list like [a, b] (or [] for none)"
    if kind == "string_type":
        return f"{got} is not a string; write a string (quote it if needed)"
    return err["msg"]


def _locate(root: yaml.Node, loc: Loc) -> tuple[yaml.Node, Loc]:
    """The deepest node along `loc` and the part of `loc` that reached it.

    Stops early where the YAML has no such node: at the mapping lacking a required key, or
    at a scalar that the schema accepted in place of a one-element list.
    """
    node: yaml.Node = root
    for depth, part in enumerate(loc):
        child = _child(node, part)
        if child is None:
            return node, loc[:depth]
        node = child
    return node, loc


def _child(node: yaml.Node, part: int | str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        key = _key_node(node, part)
        return next((value for k, value in node.value if k is key), None)
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        item: yaml.Node = node.value[part]
        return item
    return None


def _key_node(node: yaml.Node, part: int | str) -> yaml.Node | None:
    """The key node for `part`; the last one wins, as it does when YAML merges keys."""
    if not isinstance(node, yaml.MappingNode):
        return None
    keys = [k for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)]
    return keys[-1] if keys else None


def _position(path: str, node: yaml.Node) -> str:
    return f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _dotted(loc: Loc) -> str:
    """A location as it reads in the file: rules[1].match.source (a key with control characters quoted).

    Each problem must stay on one line, and a key may hold a line break.
    """
    return "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" if part.isprintable() else f"[{part!r}]" for part in loc
    ).lstrip(".")


def _check_unique_names(loaded: Sequence[_LoadedFile]) -> None:
    """Rule names identify rules in decisions and audit logs, so they must be unique overall."""
    first_seen: dict[str, str] = {}
    problems: list[str] = []
    for item in loaded:
        for index, rule in enumerate(item.content.rules):
            node, _ = _locate(item.root, ("rules", index, "name"))
            where = _position(item.path, node)
            if rule.name in first_seen:
                problems.append(
                    f"{where}: rules[{index}].name: {rule.name!r} is already used at "
                    f"{first_seen[rule.name]}; give each rule a unique name"
                )
            else:
                first_seen[rule.name] = where
    if problems:
        raise PolicyError("\n".join(problems))


def reload_policy(paths: Sequence[str], current: Policy, log: Any) -> Policy | None:
    """The policy at `paths` as it now is on disk (SIGHUP), or None, logged, if it is broken
    (the caller keeps `current`)."""
    try:
        new = load_policy(paths)
    except PolicyError as exc:
        log.error("policy-reload-failed", error=str(exc), kept=list(current.files))
        return None
    log.info("policy-reloaded", files=list(new.files), rules=len(new.rules))
    return new
