"""Policy loading, error positions and rule evaluation, including glob properties."""

from __future__ import annotations

import dataclasses
import errno
import string
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.policy import (
    ContainerInfo,
    Decision,
    Explanation,
    MountRequest,
    Policy,
    PolicyError,
    Rule,
    Step,
    load_policy,
)
from supervisor.policy.matcher import Glob, GlobSyntaxError, NameGlob, literal_glob, show_size
from supervisor.policy.schema import Limits

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return str(path)


def policy_from(tmp_path: Path, text: str) -> Policy:
    return load_policy([write(tmp_path, "policy.yaml", text)])


def request(source: str = "/srv/img/data.ext4", target: str = "/mnt", fstype: str = "ext4") -> MountRequest:
    return MountRequest(source=source, target=target, fstype=fstype, read_only=False)


NO_CONTAINER = ContainerInfo()


def mount(
    source: str = "/srv/img/data.ext4",
    target: str = "/mnt",
    fstype: str = "ext4",
    *,
    read_only: bool = False,
    options: tuple[str, ...] = (),
    size: int | None = None,
    sha256: str | None = None,
    container: ContainerInfo = NO_CONTAINER,
    loop_devices: int = 0,
) -> MountRequest:
    """A request with every field settable by name; defaults match `request()`."""
    return MountRequest(source, target, fstype, read_only, options, size, sha256, container, loop_devices)


def load_error(paths: list[str]) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(paths)
    return str(info.value)


# --- example files -------------------------------------------------------------------------


def test_images_example_loads() -> None:
    policy = load_policy([POLICIES / "examples" / "images.yaml"])
    assert [rule.name for rule in policy.rules] == ["images-read-only", "no-other-mounts"]
    assert policy.files == (str(POLICIES / "examples" / "images.yaml"),)


@pytest.mark.parametrize(
    ("source", "target", "fstype"),
    [
        ("/srv/img/data.ext4", "/mnt", "ext4"),
        ("/srv/img/data.ext4", "/mnt/a/b", "ext2"),
        ("/srv/img/x.sqfs", "/mnt/x", "squashfs"),
        ("/srv/img/x.squashfs", "/mnt/x", "squashfs"),
        ("/srv/img/x.erofs", "/mnt/deep/er/still", "erofs"),
    ],
)
def test_images_example_allows_read_only(source: str, target: str, fstype: str) -> None:
    policy = load_policy([POLICIES / "examples" / "images.yaml"])
    assert policy.evaluate(request(source, target, fstype)) == Decision(
        rule="images-read-only",
        action="kernel",
        errno=0,
        options=("ro",),
        reason="rule 'images-read-only' allows it",
    )


@pytest.mark.parametrize(
    ("source", "target", "fstype"),
    [
        ("/srv/img/sub/data.ext4", "/mnt", "ext4"),  # "*" does not descend
        ("/srv/img/data.ext4", "/mnt2", "ext4"),
        ("/srv/img/data.ext4", "/", "ext4"),
        ("/srv/img/data.ext4", "/mnt", "vfat"),  # probed type not listed
        ("/srv/img/data.img", "/mnt", "ext4"),
        ("/home/u/data.ext4", "/mnt", "ext4"),
    ],
)
def test_images_example_denies_the_rest(source: str, target: str, fstype: str) -> None:
    decision = load_policy([POLICIES / "examples" / "images.yaml"]).evaluate(request(source, target, fstype))
    assert (decision.rule, decision.action, decision.errno) == ("no-other-mounts", "deny", 1)
    assert decision.options == ()
    assert source in decision.reason
    assert "EPERM" in decision.reason


def test_deny_all_example() -> None:
    policy = load_policy([POLICIES / "deny-all.yaml"])
    decision = policy.evaluate(request())
    assert (decision.rule, decision.action, decision.errno) == ("deny-all", "deny", errno.EPERM)


def test_directory_loads_yaml_files_in_name_order(tmp_path: Path) -> None:
    write(tmp_path, "20-b.yml", "version: 1\nrules: [{name: b, action: deny}]\n")
    write(tmp_path, "10-a.yaml", "version: 1\nrules: [{name: a, action: kernel}]\n")
    write(tmp_path, "30-c.txt", "not yaml at all: [\n")
    policy = load_policy([tmp_path])
    assert [rule.name for rule in policy.rules] == ["a", "b"]
    assert policy.files == (str(tmp_path / "10-a.yaml"), str(tmp_path / "20-b.yml"))


def test_files_concatenate_in_given_order(tmp_path: Path) -> None:
    first = write(tmp_path, "z.yaml", "version: 1\nrules: [{name: z, action: deny}]\n")
    second = write(tmp_path, "a.yaml", "version: 1\nrules: [{name: a, action: kernel}]\n")
    policy = load_policy([first, second])
    assert policy.evaluate(request()).rule == "z"


# --- evaluation ----------------------------------------------------------------------------


def test_first_matching_rule_wins(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        """
        version: 1
        rules:
          - name: special
            match: {source: /srv/img/special.ext4}
            action: deny
            errno: EACCES
          - name: images
            match: {source: "/srv/img/*"}
            action: kernel
            options: [ro, noexec, ro]
          - name: never-reached
            match: {source: "/srv/img/*"}
            action: deny
        """,
    )
    special = policy.evaluate(request("/srv/img/special.ext4"))
    assert (special.rule, special.action, special.errno) == ("special", "deny", errno.EACCES)
    other = policy.evaluate(request("/srv/img/other.ext4"))
    assert (other.rule, other.action, other.errno) == ("images", "kernel", 0)
    assert other.options == ("ro", "noexec")


def test_no_match_denies_with_eperm(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        """
        version: 1
        rules:
          - name: only-erofs
            match: {fstype: erofs}
            action: kernel
        """,
    )
    decision = policy.evaluate(request("/x", "/y", "ext4"))
    assert decision == Decision(
        rule=None,
        action="deny",
        errno=errno.EPERM,
        options=(),
        reason="no rule matched /x on /y (ext4); add a rule to the policy",
    )


def test_empty_rules_deny_everything(tmp_path: Path) -> None:
    decision = policy_from(tmp_path, "version: 1\nrules: []\n").evaluate(request())
    assert (decision.rule, decision.errno) == (None, errno.EPERM)


def test_deny_uses_errno_name_and_defaults_to_eperm(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        """
        version: 1
        rules:
          - {name: ro-fs, match: {target: /ro/**}, action: deny, errno: EROFS}
          - {name: rest, action: deny}
        """,
    )
    assert policy.evaluate(request(target="/ro/x")).errno == errno.EROFS
    assert "EROFS" in policy.evaluate(request(target="/ro/x")).reason
    assert policy.evaluate(request(target="/rw")).errno == errno.EPERM


def test_all_conditions_must_hold(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        """
        version: 1
        rules:
          - name: both
            match: {source: [/a/*, /b/*], target: /mnt, fstype: [ext4, erofs]}
            action: kernel
        """,
    )
    assert policy.evaluate(request("/b/x", "/mnt", "erofs")).rule == "both"
    assert policy.evaluate(request("/c/x", "/mnt", "erofs")).rule is None
    assert policy.evaluate(request("/a/x", "/mnt/sub", "ext4")).rule is None
    assert policy.evaluate(request("/a/x", "/mnt", "ext3")).rule is None


# --- glob semantics ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/mnt/**", "/mnt", True),
        ("/mnt/**", "/mnt/a", True),
        ("/mnt/**", "/mnt/a/b", True),
        ("/mnt/**", "/mntx", False),
        ("/mnt/**", "/", False),
        ("/a/**/b", "/a/b", True),
        ("/a/**/b", "/a/x/b", True),
        ("/a/**/b", "/a/x/y/b", True),
        ("/a/**/b", "/a/xb", False),
        ("/a/**/b", "/a/b/c", False),
        ("/**", "/", True),
        ("/**", "/anything/at/all", True),
        ("/", "/", True),
        ("/", "/a", False),
        ("/a/*", "/a/b", True),
        ("/a/*", "/a/b/c", False),
        ("/a/*", "/a", False),
        ("/a*", "/a/b", False),
        ("/a/*.ext4", "/a/.ext4", True),
        ("/a/x**y", "/a/x/y", False),  # "**" inside a component is just "*"
        ("/a/x**y", "/a/xzzy", True),
        ("/a/?", "/a/b", True),
        ("/a/?", "/a/bc", False),
        ("/a?b", "/a/b", False),
        ("/[a-c]", "/b", True),
        ("/[a-c]", "/d", False),
        ("/[!a-c]", "/d", True),
        ("/[!a-c]", "/b", False),
        ("/a[!x]b", "/a/b", False),
        ("/a[!-0]b", "/a/b", False),  # the range covers '/', which must still not match
        ("/[]]", "/]", True),
        ("/a.b", "/axb", False),  # regex metacharacters are literal
        ("/a+(b)", "/a+(b)", True),
        ("/a\\*", "/a\\x", True),  # no escapes: backslash is literal
        ("/srv/img/data.ext4", "/srv/img/data.ext4", True),
        ("/srv/img/data.ext4", "/srv/img/data.ext4/x", False),
    ],
)
def test_glob(pattern: str, path: str, expected: bool) -> None:
    assert Glob.compile(pattern).matches(path) is expected


@pytest.mark.parametrize(
    ("pattern", "complaint"),
    [
        ("mnt/*", "not an absolute path"),
        ("", "not an absolute path"),
        ("/mnt/", "empty component"),
        ("/a//b", "empty component"),
        ("/a/../b", "'..'"),
        ("/a/[bc", "without a closing ']'"),
        ("/a/[]", "without a closing ']'"),
        ("/a/[z-a]", "not a valid glob"),
    ],
)
def test_glob_syntax_errors(pattern: str, complaint: str) -> None:
    with pytest.raises(GlobSyntaxError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        Glob.compile(pattern)


SAFE_COMPONENT = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=8)
COMPONENT = SAFE_COMPONENT.filter(lambda part: part not in (".", ".."))
PATHS = st.lists(st.one_of(st.sampled_from(["prefix", "prefixx", "pre"]), COMPONENT), max_size=5)


def as_path(parts: list[str]) -> str:
    return "/" + "/".join(parts)


@given(PATHS)
def test_double_star_matches_exactly_the_subtree(parts: list[str]) -> None:
    path = as_path(parts)
    expected = path == "/prefix" or path.startswith("/prefix/")
    assert Glob.compile("/prefix/**").matches(path) is expected


@given(PATHS, PATHS.filter(bool))
def test_star_never_crosses_a_slash(head: list[str], tail: list[str]) -> None:
    base = as_path(head).rstrip("/")
    path = base + as_path(tail)
    assert Glob.compile(base + "/*").matches(path) is (len(tail) == 1)


@given(PATHS)
def test_literal_glob_matches_only_itself(parts: list[str]) -> None:
    path = as_path(parts)
    assert Glob.compile(path).matches(path)
    assert not Glob.compile(path).matches(path.rstrip("/") + "/more")


# --- loader errors -------------------------------------------------------------------------


def bad(tmp_path: Path, text: str) -> tuple[str, str]:
    """Load `text` as a policy that must fail; returns the file name and the message."""
    path = write(tmp_path, "bad.yaml", text)
    return path, load_error([path])


def test_bad_version(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 2\nrules: []\n")
    assert message == f"{path}:1:10: version: 2 is not allowed; use one of: 1"


@pytest.mark.parametrize("value", ["'1'", "true", "1.0"])
def test_version_is_strictly_the_integer_one(tmp_path: Path, value: str) -> None:
    path, message = bad(tmp_path, f"version: {value}\nrules: []\n")
    assert message.startswith(f"{path}:1:10: version: ")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules: []\nrule: []\n")
    assert message == f"{path}:3:1: rule: unknown key 'rule'; use one of: version, limits, rules"


def test_unknown_rule_and_match_keys(tmp_path: Path) -> None:
    path, message = bad(
        tmp_path,
        """
        version: 1
        rules:
          - name: a
            action: kernel
            matches: {source: /x}
          - name: b
            match: {source: /x, fs: ext4}
            action: kernel
        """,
    )
    first, second = message.splitlines()
    assert first.startswith(f"{path}:5:5: rules[0].matches: unknown key 'matches'; use one of:")
    assert first.endswith("name, containers, match, action, options, idmap, daemon, errno")
    assert second == (
        f"{path}:7:25: rules[1].match.fs: unknown key 'fs'; use one of: source, container_sources, target, fstype, "
        "size, sha256, read_only, options_allowed, options_forbidden, max_loop_devices"
    )


def test_bad_action(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - name: a\n    action: mount\n")
    assert message == (f"{path}:4:13: rules[0].action: 'mount' is not allowed; use one of: kernel, fuse, deny")


def test_missing_key_points_at_the_mapping(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - name: a\n")
    assert message == f"{path}:3:5: rules[0]: required key 'action' is missing; add it"


def test_bad_errno_name(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - {name: a, action: deny, errno: ENOTREAL}\n")
    assert message.startswith(f"{path}:3:36: rules[0].errno: 'ENOTREAL' is not an errno name")
    assert "EPERM" in message


def test_errno_number_is_not_a_name(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - {name: a, action: deny, errno: 1}\n")
    assert message.startswith(f"{path}:3:36: rules[0].errno: 1 is not an errno name")


def test_options_on_deny(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - name: a\n    action: deny\n    options: [ro]\n")
    assert message.startswith(f"{path}:5:14: rules[0].options: options only apply to action")


def test_errno_on_kernel(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - name: a\n    action: kernel\n    errno: EIO\n")
    assert message.startswith(f"{path}:5:12: rules[0].errno: errno only applies to action: deny")


def test_unknown_mount_option(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - {name: a, action: kernel, options: [ro, rw]}\n")
    assert message.startswith(f"{path}:3:45: rules[0].options[1]: 'rw' is not allowed; use one")
    assert "noexec" in message


def test_duplicate_name_across_two_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", "version: 1\nrules:\n  - name: same\n    action: deny\n")
    second = write(
        tmp_path,
        "b.yaml",
        "version: 1\nrules:\n  - {name: other, action: deny}\n  - {name: same, action: kernel}\n",
    )
    message = load_error([first, second])
    assert message == (
        f"{second}:4:12: rules[1].name: 'same' is already used at {first}:3:11; give each rule a unique name"
    )


def test_relative_glob(tmp_path: Path) -> None:
    path, message = bad(
        tmp_path,
        """
        version: 1
        rules:
          - name: a
            match:
              target: /mnt/**
              source: [/srv/*, srv/img/*]
            action: kernel
        """,
    )
    assert message == (f"{path}:6:24: rules[0].match.source[1]: 'srv/img/*' is not an absolute path; start it with '/'")


def test_glob_given_as_a_single_string_points_at_it(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - name: a\n    match: {target: 'mnt'}\n    action: deny\n")
    assert message.startswith(f"{path}:4:21: rules[0].match.target: 'mnt' is not an absolute")


def test_fstype_list_written_as_one_string(tmp_path: Path) -> None:
    path, message = bad(
        tmp_path,
        "version: 1\nrules:\n  - {name: a, match: {fstype: 'ext4, erofs'}, action: deny}\n",
    )
    assert message.startswith(f"{path}:3:31: rules[0].match.fstype: 'ext4, erofs' is not a")
    assert "[ext4, squashfs]" in message


def test_empty_match_list(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - {name: a, match: {source: []}, action: deny}\n")
    assert message.startswith(f"{path}:3:31: rules[0].match.source: an empty list matches nothing")


def test_empty_rule_name(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - {name: '', action: deny}\n")
    assert message.startswith(f"{path}:3:12: rules[0].name: a rule name must not be empty")


def test_rule_that_is_not_a_mapping(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - deny\n")
    assert message.startswith(f"{path}:3:5: rules[0]: 'deny' is not a mapping; write a mapping")


def test_rules_not_a_list(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules: {name: a}\n")
    assert message.startswith(f"{path}:2:8: rules: a mapping is not a list")


def test_missing_rules(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\n")
    assert message == f"{path}:1:1: required key 'rules' is missing; add it"


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - name: a\n   action: deny\n")
    assert message.startswith(f"{path}:4:")
    assert "invalid YAML" in message


def test_unclosed_flow_sequence(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules: [\n")
    assert message.startswith(f"{path}:3:1: invalid YAML")


def test_yaml_construction_error(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: !!python/name:os.system 1\nrules: []\n")
    assert message.startswith(f"{path}:1:10: invalid YAML")


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path, message = bad(tmp_path, text)
    assert message == f"{path}:1:1: the file is empty; write 'version: 1' and a 'rules:' list"


@pytest.mark.parametrize(("text", "shown"), [("- a\n", "a list"), ("just text\n", "'just text'")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, shown: str) -> None:
    path, message = bad(tmp_path, text)
    assert message == f"{path}:1:1: {shown} is not a mapping; write a mapping with keys: version, limits, rules"


def test_duplicate_key(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - name: a\n    action: kernel\n    action: deny\n")
    assert message == f"{path}:5:5: duplicate key 'action'; each key may appear once"


def test_merge_keys_may_override(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        """
        version: 1
        rules:
          - &base {name: a, match: {target: /a}, action: deny}
          - <<: *base
            name: b
            match: {target: /b}
        """,
    )
    assert [rule.name for rule in policy.rules] == ["a", "b"]
    assert policy.evaluate(request(target="/b")).rule == "b"


def test_every_problem_is_reported_in_file_order(tmp_path: Path) -> None:
    path, message = bad(
        tmp_path,
        """
        version: 1
        rules:
          - {name: a, action: kernel, errno: EIO, options: [rw]}
          - {name: b, action: nope}
        """,
    )
    assert [line.split(": ", 1)[0] for line in message.splitlines()] == [
        f"{path}:3:38",
        f"{path}:3:53",
        f"{path}:4:23",
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    assert load_error([path]) == f"{path}: cannot read policy file: No such file or directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\nrules: []\n# caf\xe9\n")
    assert load_error([str(path)]).startswith(f"{path}: byte ")


# --- every shipped policy ------------------------------------------------------------------

ALL_POLICY_FILES = sorted(POLICIES.rglob("*.y*ml"))
EXAMPLES = POLICIES / "examples"
TRUSTED_DIGEST = "c372149ca3adfe836e4c80e705a2ba3fbd961ae892987c332e8254837c214e98"
MiB = 1 << 20
GiB = 1 << 30


def test_the_shipped_policy_files_are_known() -> None:
    assert [path.relative_to(POLICIES).as_posix() for path in ALL_POLICY_FILES] == [
        "deny-all.yaml",
        "examples/ci-runner.yaml",
        "examples/image-tools.yaml",
        "examples/images.yaml",
        "examples/read-only-images.yaml",
        "examples/trusted-squashfs.yaml",
    ]


@pytest.mark.parametrize("path", ALL_POLICY_FILES, ids=lambda path: path.name)
def test_every_policy_file_loads_and_comments_its_rules(path: Path) -> None:
    policy = load_policy([path])
    assert policy.rules
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#")
    rule_lines = [i for i, line in enumerate(lines) if line.lstrip().startswith("- name:")]
    assert len(rule_lines) == len(policy.rules)
    for i in rule_lines:  # each rule is preceded by its own comment
        assert lines[i - 1].lstrip().startswith("#"), f"{path}:{i + 1}: rule has no comment above it"


# read-only-images.yaml


@pytest.mark.parametrize(
    ("source", "target", "fstype"),
    [
        ("/srv/img/a.ext4", "/mnt", "ext4"),
        ("/srv/img/deep/er/b.img", "/mnt/x/y", "ext2"),
        ("/images/c.sqfs", "/mnt/c", "squashfs"),
        ("/images/team/d", "/mnt/d", "erofs"),
    ],
)
def test_read_only_images_example_forces_ro_noexec(source: str, target: str, fstype: str) -> None:
    policy = load_policy([EXAMPLES / "read-only-images.yaml"])
    decision = policy.evaluate(mount(source, target, fstype, read_only=True))
    assert (decision.rule, decision.action, decision.options) == ("read-only-images", "kernel", ("ro", "noexec"))
    assert decision.idmap is True


def test_read_only_images_example_refuses_read_write_with_erofs() -> None:
    policy = load_policy([EXAMPLES / "read-only-images.yaml"])
    decision = policy.evaluate(mount("/images/a.ext4", "/mnt/a", read_only=False))
    assert (decision.rule, decision.action, decision.errno) == ("images-are-read-only", "deny", errno.EROFS)


@pytest.mark.parametrize(
    ("source", "target", "fstype"),
    [
        ("/srv/imgx/a.ext4", "/mnt", "ext4"),
        ("/home/u/a.ext4", "/mnt", "ext4"),
        ("/images/a.ext4", "/opt", "ext4"),
        ("/images/a.img", "/mnt", "xfs"),
        ("/images/a.img", "/mnt", "btrfs"),
    ],
)
def test_read_only_images_example_denies_the_rest(source: str, target: str, fstype: str) -> None:
    policy = load_policy([EXAMPLES / "read-only-images.yaml"])
    for read_only in (True, False):
        decision = policy.evaluate(mount(source, target, fstype, read_only=read_only))
        assert (decision.rule, decision.errno) == ("no-other-mounts", errno.EPERM)


# trusted-squashfs.yaml


def test_trusted_squashfs_example_sends_listed_digests_to_the_kernel() -> None:
    policy = load_policy([EXAMPLES / "trusted-squashfs.yaml"])
    assert policy.needs_digest
    for digest in (TRUSTED_DIGEST, TRUSTED_DIGEST.upper()):
        decision = policy.evaluate(mount("/srv/img/app.sqfs", "/opt/app", "squashfs", read_only=True, sha256=digest))
        assert decision == Decision(
            rule="trusted-squashfs",
            action="kernel",
            errno=0,
            options=("ro",),
            reason="rule 'trusted-squashfs' allows it",
        )


@pytest.mark.parametrize("digest", ["0" * 64, None])
def test_trusted_squashfs_example_sends_other_squashfs_to_squashfuse(digest: str | None) -> None:
    policy = load_policy([EXAMPLES / "trusted-squashfs.yaml"])
    decision = policy.evaluate(mount("/srv/img/sub/app.sqfs", "/opt/app", "squashfs", sha256=digest))
    assert (decision.rule, decision.action, decision.daemon) == ("other-squashfs-through-fuse", "fuse", "squashfuse")
    assert decision.errno == 0
    assert decision.options == ("ro", "nodev", "nosuid")
    assert decision.reason == "rule 'other-squashfs-through-fuse' allows it through FUSE with squashfuse"


def test_trusted_squashfs_example_sends_other_types_to_the_default_daemon() -> None:
    policy = load_policy([EXAMPLES / "trusted-squashfs.yaml"])
    decision = policy.evaluate(mount("/srv/img/data.ext4", "/data", "ext4", sha256=TRUSTED_DIGEST))
    assert (decision.rule, decision.action, decision.daemon) == ("other-images-through-fuse", "fuse", None)
    assert decision.reason == "rule 'other-images-through-fuse' allows it through FUSE"


def test_trusted_squashfs_example_denies_images_elsewhere() -> None:
    policy = load_policy([EXAMPLES / "trusted-squashfs.yaml"])
    decision = policy.evaluate(mount("/home/u/app.sqfs", "/opt", "squashfs", sha256=TRUSTED_DIGEST))
    assert (decision.rule, decision.action, decision.errno) == ("no-other-mounts", "deny", errno.EPERM)


def test_only_policies_with_digest_rules_need_digests() -> None:
    for path in ALL_POLICY_FILES:
        assert load_policy([path]).needs_digest is (path.name == "trusted-squashfs.yaml")


# ci-runner.yaml

CI = ContainerInfo(name="ci-42", host_uid=100000)


def ci_mount(**changes: Any) -> MountRequest:
    base = mount("/builds/job/out.ext4", "/builds/job/out", "ext4", size=GiB, container=CI, loop_devices=1)
    return dataclasses.replace(base, **changes)


def test_ci_runner_example_allows_ci_build_images_read_write() -> None:
    policy = load_policy([EXAMPLES / "ci-runner.yaml"])
    for req in (
        ci_mount(),
        ci_mount(fstype="squashfs", source="/builds/cache.sqfs", target="/builds/cache"),
        ci_mount(fstype="erofs", read_only=True),
        ci_mount(options=("noload", "errors=remount-ro")),
        ci_mount(size=2 * GiB),
        ci_mount(loop_devices=3),
        ci_mount(container=ContainerInfo(name="ci-")),
    ):
        decision = policy.evaluate(req)
        assert (decision.rule, decision.action, decision.options) == ("ci-build-images", "kernel", ()), req


@pytest.mark.parametrize(
    "changes",
    [
        {"container": ContainerInfo(name="web-1", host_uid=100000)},
        {"container": ContainerInfo()},
        {"loop_devices": 4},
        {"loop_devices": 9},
        {"size": 2 * GiB + 1},
        {"size": None},
        {"options": ("noload", "journal_checksum")},
        {"fstype": "ext2"},
        {"source": "/srv/img/out.ext4"},
        {"target": "/mnt"},
    ],
)
def test_ci_runner_example_denies_the_rest(changes: dict[str, Any]) -> None:
    decision = load_policy([EXAMPLES / "ci-runner.yaml"]).evaluate(ci_mount(**changes))
    assert (decision.rule, decision.action, decision.errno) == ("no-other-mounts", "deny", errno.EPERM)


# --- new rule keys: accepted forms ---------------------------------------------------------


def only_rule(tmp_path: Path, text: str) -> Rule:
    policy = policy_from(tmp_path, "version: 1\nrules:\n" + textwrap.indent(textwrap.dedent(text).lstrip("\n"), "  "))
    (rule,) = policy.rules
    return rule


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("0", 0),
        ("512", 512),
        ("'4096'", 4096),
        ("1K", 1024),
        ("1k", 1024),
        ("3M", 3 * MiB),
        ("2G", 2 * GiB),
        ("1T", 1 << 40),
        ("1_000", 1000),
    ],
)
def test_sizes(tmp_path: Path, written: str, size: int) -> None:
    rule = only_rule(tmp_path, f"- {{name: a, action: deny, match: {{size: {{max: {written}}}}}}}\n")
    assert rule.match is not None and rule.match.size is not None
    assert (rule.match.size.min, rule.match.size.max) == (None, size)


def test_size_bounds_may_be_equal(tmp_path: Path) -> None:
    rule = only_rule(tmp_path, "- {name: a, action: deny, match: {size: {min: 1M, max: 1048576}}}\n")
    assert rule.match is not None and rule.match.size is not None
    assert (rule.match.size.min, rule.match.size.max) == (MiB, MiB)


def test_digests_are_stored_lower_case_once(tmp_path: Path) -> None:
    rule = only_rule(
        tmp_path, f"- {{name: a, action: deny, match: {{sha256: [{TRUSTED_DIGEST.upper()}, {TRUSTED_DIGEST}]}}}}\n"
    )
    assert rule.match is not None
    assert rule.match.sha256 == (TRUSTED_DIGEST,)


def test_single_values_stand_for_lists(tmp_path: Path) -> None:
    rule = only_rule(
        tmp_path,
        f"""
        - name: a
          containers: {{name: "ci-*", host_uid: 100000, lxc_cookie: abc, oci_id: "b-*", oci_annotations: {{k: v*}}}}
          match: {{sha256: {TRUSTED_DIGEST}, options_allowed: noload, options_forbidden: "journal_*"}}
          action: deny
        """,
    )
    assert rule.containers is not None and rule.match is not None
    assert [glob.pattern for glob in rule.containers.name or ()] == ["ci-*"]
    assert rule.containers.host_uid == (100000,)
    assert rule.containers.lxc_cookie == ("abc",)
    assert [glob.pattern for glob in rule.containers.oci_id or ()] == ["b-*"]
    assert {k: [g.pattern for g in v] for k, v in (rule.containers.oci_annotations or {}).items()} == {"k": ["v*"]}
    assert rule.match.sha256 == (TRUSTED_DIGEST,)
    assert [glob.pattern for glob in rule.match.options_allowed or ()] == ["noload"]
    assert [glob.pattern for glob in rule.match.options_forbidden or ()] == ["journal_*"]


def test_defaults_of_the_new_rule_keys(tmp_path: Path) -> None:
    rule = only_rule(tmp_path, "- {name: a, action: kernel}\n")
    assert (rule.containers, rule.idmap, rule.daemon) == (None, True, None)
    decision = Policy(files=(), rules=(rule,), limits=Limits()).evaluate(request())
    assert (decision.idmap, decision.daemon) == (True, None)


def test_rules_are_hashable(tmp_path: Path) -> None:
    rule = only_rule(tmp_path, "- {name: a, action: deny, containers: {oci_annotations: {k: v}}}\n")
    assert hash(rule) == hash(rule.model_copy())


def test_kernel_rule_without_idmap(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, "version: 1\nrules: [{name: a, action: kernel, idmap: false, options: [ro]}]\n")
    assert policy.evaluate(request()) == Decision(
        rule="a", action="kernel", errno=0, options=("ro",), reason="rule 'a' allows it", idmap=False
    )


def test_fuse_rule(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path, "version: 1\nrules: [{name: f, action: fuse, daemon: fuse2fs, options: [ro, noexec]}]\n"
    )
    assert policy.evaluate(request()) == Decision(
        rule="f",
        action="fuse",
        errno=0,
        options=("ro", "noexec"),
        reason="rule 'f' allows it through FUSE with fuse2fs",
        daemon="fuse2fs",
    )


def test_options_allowed_may_be_empty(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, "version: 1\nrules: [{name: a, action: kernel, match: {options_allowed: []}}]\n")
    assert policy.evaluate(mount(options=())).rule == "a"
    assert policy.evaluate(mount(options=("noload",))).rule is None


# --- new rule keys: loader errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "at", "message"),
    [
        ("{name: a, action: deny, idmap: false}", "false", "rules[0].idmap: idmap only applies to action: kernel; "
         "remove it from this deny rule"),
        ("{name: a, action: fuse, idmap: true}", "true", "rules[0].idmap: idmap only applies to action: kernel; "
         "remove it from this fuse rule"),
        ("{name: a, action: kernel, idmap: 1}", "1}", "rules[0].idmap: 1 is not true or false; write true or false"),
        ("{name: a, action: kernel, daemon: fuse2fs}", "fuse2fs", "rules[0].daemon: daemon only applies to action: "
         "fuse; remove it or change the action to fuse"),
        ("{name: a, action: deny, daemon: fuse2fs}", "fuse2fs", "rules[0].daemon: daemon only applies to action: "
         "fuse; remove it or change the action to fuse"),
        ("{name: a, action: fuse, daemon: /bin/fuse2fs}", "/bin", "rules[0].daemon: '/bin/fuse2fs' is not a "
         "program name; write a name without '/', like fuse2fs, squashfuse or erofsfuse"),
        ("{name: a, action: fuse, errno: EIO}", "EIO", "rules[0].errno: errno only applies to action: deny; "
         "remove it or change the action to deny"),
        ("{name: a, action: deny, options: [ro]}", "[ro]", "rules[0].options: options only apply to actions kernel "
         "and fuse; remove them from this deny rule"),
        ("{name: a, action: deny, match: {size: {min: 2G, max: 1M}}}", "1M", "rules[0].match.size.max: max 1M is "
         "smaller than min 2G; make min at most max"),
        ("{name: a, action: deny, match: {size: {min: 1025, max: 1K}}}", "1K", "rules[0].match.size.max: max 1K is "
         "smaller than min 1025 bytes; make min at most max"),
        ("{name: a, action: deny, match: {size: {max: 2X}}}", "2X", "rules[0].match.size.max: '2X' is not a size; "
         "write a number of bytes, or one with a K, M, G or T suffix (1K = 1024) like 512M"),
        ("{name: a, action: deny, match: {size: {max: 2GB}}}", "2GB", "rules[0].match.size.max: '2GB' is not a "
         "size"),
        ("{name: a, action: deny, match: {size: {max: 1.5G}}}", "1.5G", "rules[0].match.size.max: '1.5G' is not a "
         "size"),
        ("{name: a, action: deny, match: {size: {min: -1}}}", "-1", "rules[0].match.size.min: -1 is not a size"),
        ("{name: a, action: deny, match: {size: {min: true}}}", "true", "rules[0].match.size.min: True is not a "
         "size"),
        ("{name: a, action: deny, match: {size: {}}}", "{}", "rules[0].match.size: an empty size range limits "
         "nothing; give min, max or both"),
        ("{name: a, action: deny, match: {size: 2G}}", "2G", "rules[0].match.size: '2G' is not a mapping; write a "
         "mapping with keys: min, max"),
        ("{name: a, action: deny, match: {size: {mx: 2G}}}", "mx", "rules[0].match.size.mx: unknown key 'mx'; use "
         "one of: min, max"),
        ("{name: a, action: deny, match: {sha256: [abc]}}", "abc", "rules[0].match.sha256[0]: 'abc' is not a "
         "SHA-256 digest; write the 64 hex digits sha256sum prints, in quotes"),
        (f"{{name: a, action: deny, match: {{sha256: [{'g' * 64}]}}}}", "ggg", "rules[0].match.sha256[0]: 'ggg"),
        (f"{{name: a, action: deny, match: {{sha256: {'1' * 64}}}}}", "111", "rules[0].match.sha256: 1111"),
        ("{name: a, action: deny, match: {sha256: []}}", "[]", "rules[0].match.sha256: an empty list matches "
         "nothing"),
        ("{name: a, action: deny, match: {read_only: 'yes'}}", "'yes'", "rules[0].match.read_only: 'yes' is not "
         "true or false; write true or false"),
        ("{name: a, action: deny, match: {options_allowed: ['a,b']}}", "'a,b'", "rules[0].match.options_allowed[0]: "
         "'a,b' holds a comma; write one option per list item, like [noload, \"errors=*\"]"),
        ("{name: a, action: deny, match: {options_forbidden: []}}", "[]", "rules[0].match.options_forbidden: an "
         "empty list matches nothing; remove the key to match anything"),
        ("{name: a, action: deny, match: {options_forbidden: [x, '']}}", "''", "rules[0].match.options_forbidden[1]:"
         " an empty glob matches only empty values"),
        ("{name: a, action: deny, match: {max_loop_devices: 0}}", "0}", "rules[0].match.max_loop_devices: 0 is not "
         "a loop device count; write a whole number from 1 to 1024 (the rule matches while the container holds "
         "fewer)"),
        ("{name: a, action: deny, match: {max_loop_devices: '4'}}", "'4'", "rules[0].match.max_loop_devices: '4' is "
         "not a loop device count"),
        ("{name: a, action: deny, containers: {}}", "{}", "rules[0].containers: an empty selector selects every "
         "container; remove 'containers' or name some of: name, host_uid, lxc_cookie, oci_id, oci_annotations"),
        ("{name: a, action: deny, containers: {nam: x}}", "nam:", "rules[0].containers.nam: unknown key 'nam'; use "
         "one of: name, host_uid, lxc_cookie, oci_id, oci_annotations"),
        ("{name: a, action: deny, containers: ci-*}", "ci-*", "rules[0].containers: 'ci-*' is not a mapping; write a "
         "mapping with keys: name, host_uid, lxc_cookie, oci_id, oci_annotations"),
        ("{name: a, action: deny, containers: {name: ''}}", "''", "rules[0].containers.name: an empty glob matches "
         "only empty values; write one like \"ci-*\""),
        ("{name: a, action: deny, containers: {name: [ci-*, 7]}}", "7", "rules[0].containers.name[1]: 7 is not a "
         "glob; write a string like \"ci-*\" (quote it if needed)"),
        ("{name: a, action: deny, containers: {oci_id: 'b-[x'}}", "'b-", "rules[0].containers.oci_id: 'b-[x' opens "
         "'[' without a closing ']'; close it or remove it"),
        ("{name: a, action: deny, containers: {host_uid: -1}}", "-1", "rules[0].containers.host_uid: -1 is not a "
         "host uid; write a whole number from 0 to 4294967294"),
        ("{name: a, action: deny, containers: {host_uid: [1, '2']}}", "'2'", "rules[0].containers.host_uid[1]: '2' "
         "is not a host uid"),
        ("{name: a, action: deny, containers: {host_uid: x}}", "x}", "rules[0].containers.host_uid: 'x' is neither "
         "a number nor a list; write one number or a list like [100000, 200000]"),
        ("{name: a, action: deny, containers: {lxc_cookie: ['']}}", "''", "rules[0].containers.lxc_cookie[0]: '' is "
         "not an LXC cookie; write the cookie as a string, in quotes"),
        ("{name: a, action: deny, containers: {oci_annotations: [k]}}", "[k]", "rules[0].containers.oci_annotations:"
         " a list is not a mapping; write annotations like {\"org.example/mounts\": \"allowed\"}"),
        ("{name: a, action: deny, containers: {oci_annotations: {}}}", "{}}", "rules[0].containers.oci_annotations: "
         "an empty mapping requires nothing; remove the key"),
        ("{name: a, action: deny, containers: {oci_annotations: {k: 1}}}", "1}", "rules[0].containers"
         ".oci_annotations.k: 1 is neither a string nor a list"),
    ],
)  # fmt: skip
def test_new_keys_errors(tmp_path: Path, rule: str, at: str, message: str) -> None:
    """Each error names the line and the column where `at` starts in the one-line rule."""
    path, text = bad(tmp_path, f"version: 1\nrules:\n  - {rule}\n")
    column = len("  - ") + rule.index(at) + 1
    assert text.startswith(f"{path}:3:{column}: {message}")
    assert len(text.splitlines()) == 1


def test_bad_action_lists_fuse(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - {name: a, action: mount, daemon: x}\n")
    assert message == f"{path}:3:23: rules[0].action: 'mount' is not allowed; use one of: kernel, fuse, deny"


def test_new_errors_in_block_style_point_at_the_value(tmp_path: Path) -> None:
    path, message = bad(
        tmp_path,
        """
        version: 1
        rules:
          - name: a
            match:
              size:
                min: 2G
                max: 1G
              sha256:
                - 0123
            action: fuse
            idmap: false
        """,
    )
    assert [line.split(": ", 2)[:2] for line in message.splitlines()] == [
        [f"{path}:7:14", "rules[0].match.size.max"],
        [f"{path}:9:11", "rules[0].match.sha256[0]"],
        [f"{path}:11:12", "rules[0].idmap"],
    ]


# --- container selectors -------------------------------------------------------------------


def selector_policy(tmp_path: Path, selector: str) -> Policy:
    return policy_from(tmp_path, f"version: 1\nrules:\n  - {{name: sel, action: kernel, containers: {selector}}}\n")


def selected(policy: Policy, container: ContainerInfo) -> bool:
    return policy.evaluate(mount(container=container)).rule == "sel"


@pytest.mark.parametrize(
    ("selector", "container", "expected"),
    [
        ('{name: "ci-*"}', ContainerInfo(name="ci-1"), True),
        ('{name: "ci-*"}', ContainerInfo(name="ci-"), True),
        ('{name: "ci-*"}', ContainerInfo(name="ci-a/b"), True),  # no path semantics
        ('{name: "ci-*"}', ContainerInfo(name="xci-1"), False),
        ('{name: "ci-*"}', ContainerInfo(name="CI-1"), False),
        ('{name: "ci-*"}', ContainerInfo(), False),
        ('{name: "*"}', ContainerInfo(), True),
        ('{name: [web, "ci-?"]}', ContainerInfo(name="web"), True),
        ('{name: [web, "ci-?"]}', ContainerInfo(name="ci-12"), False),
        ('{name: "ci-[0-9]"}', ContainerInfo(name="ci-7"), True),
        ('{name: "ci-[!0-9]"}', ContainerInfo(name="ci-7"), False),
        ("{host_uid: 100000}", ContainerInfo(host_uid=100000), True),
        ("{host_uid: [1, 100000]}", ContainerInfo(host_uid=100000), True),
        ("{host_uid: [1, 2]}", ContainerInfo(host_uid=100000), False),
        ("{host_uid: 0}", ContainerInfo(), False),
        ("{lxc_cookie: abc}", ContainerInfo(lxc_cookie="abc"), True),
        ("{lxc_cookie: abc}", ContainerInfo(lxc_cookie="ab*"), False),
        ("{lxc_cookie: 'ab*'}", ContainerInfo(lxc_cookie="abc"), False),  # exact, not a glob
        ("{lxc_cookie: [x, abc]}", ContainerInfo(lxc_cookie="abc"), True),
        ("{lxc_cookie: abc}", ContainerInfo(), False),
        ('{oci_id: "build-*"}', ContainerInfo(oci_id="build-7f3a"), True),
        ('{oci_id: "build-*"}', ContainerInfo(oci_id="test-7f3a"), False),
        ('{oci_id: "*"}', ContainerInfo(), False),
        ("{oci_annotations: {a: x}}", ContainerInfo(oci_annotations=(("a", "x"),)), True),
        ("{oci_annotations: {a: x}}", ContainerInfo(oci_annotations=(("a", "y"),)), False),
        ("{oci_annotations: {a: '*'}}", ContainerInfo(oci_annotations=(("a", ""),)), True),
        ("{oci_annotations: {a: '*'}}", ContainerInfo(oci_annotations=(("b", "x"),)), False),
        ("{oci_annotations: {a: [x, 'y*']}}", ContainerInfo(oci_annotations=(("a", "yes"),)), True),
        ("{oci_annotations: {a: x, b: y}}", ContainerInfo(oci_annotations=(("a", "x"), ("b", "y"))), True),
        ("{oci_annotations: {a: x, b: y}}", ContainerInfo(oci_annotations=(("a", "x"),)), False),
        (
            '{oci_annotations: {"org.example/mounts": allowed}}',
            ContainerInfo(oci_annotations=(("org.example/mounts", "allowed"),)),
            True,
        ),
        ('{name: "ci-*", host_uid: 5}', ContainerInfo(name="ci-1", host_uid=5), True),
        ('{name: "ci-*", host_uid: 5}', ContainerInfo(name="ci-1", host_uid=6), False),
        ('{name: "ci-*", host_uid: 5}', ContainerInfo(name="web", host_uid=5), False),
    ],
)
def test_container_selector(tmp_path: Path, selector: str, container: ContainerInfo, expected: bool) -> None:
    assert selected(selector_policy(tmp_path, selector), container) is expected


def test_selector_skips_to_the_next_rule(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        """
        version: 1
        rules:
          - {name: ci, containers: {name: "ci-*"}, action: kernel}
          - {name: rest, action: deny, errno: EACCES}
        """,
    )
    assert policy.evaluate(mount(container=ContainerInfo(name="ci-1"))).rule == "ci"
    assert policy.evaluate(mount(container=ContainerInfo(name="web"))).errno == errno.EACCES


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("*", "", True),
        ("*", "a/b/c", True),
        ("a?c", "a/c", True),
        ("a*", "a\nb", True),
        ("a.b", "axb", False),
        ("[]]", "]", True),
        ("x[!/]", "x/", False),
        ("errors=*", "errors=remount-ro", True),
        ("errors=*", "errors", False),
    ],
)
def test_name_glob(pattern: str, value: str, expected: bool) -> None:
    assert NameGlob.compile(pattern).matches(value) is expected


# --- new match conditions ------------------------------------------------------------------


def match_policy(tmp_path: Path, match: str) -> Policy:
    return policy_from(tmp_path, f"version: 1\nrules:\n  - {{name: m, action: kernel, match: {match}}}\n")


@pytest.mark.parametrize(
    ("match", "req", "expected"),
    [
        ("{size: {min: 1M}}", mount(size=MiB), True),
        ("{size: {min: 1M}}", mount(size=MiB - 1), False),
        ("{size: {max: 1M}}", mount(size=MiB), True),
        ("{size: {max: 1M}}", mount(size=MiB + 1), False),
        ("{size: {max: 1M}}", mount(size=0), True),
        ("{size: {max: 1M}}", mount(size=None), False),
        ("{size: {min: 0}}", mount(size=None), False),
        ("{size: {min: 1K, max: 2K}}", mount(size=1500), True),
        ("{size: {min: 1K, max: 2K}}", mount(size=2049), False),
        (f"{{sha256: {TRUSTED_DIGEST}}}", mount(sha256=TRUSTED_DIGEST), True),
        (f"{{sha256: {TRUSTED_DIGEST.upper()}}}", mount(sha256=TRUSTED_DIGEST), True),
        (f"{{sha256: {TRUSTED_DIGEST}}}", mount(sha256=TRUSTED_DIGEST.upper()), True),
        (f"{{sha256: ['{'0' * 64}', {TRUSTED_DIGEST}]}}", mount(sha256=TRUSTED_DIGEST), True),
        (f"{{sha256: {TRUSTED_DIGEST}}}", mount(sha256="0" * 64), False),
        (f"{{sha256: {TRUSTED_DIGEST}}}", mount(sha256=None), False),
        ("{read_only: true}", mount(read_only=True), True),
        ("{read_only: true}", mount(read_only=False), False),
        ("{read_only: false}", mount(read_only=False), True),
        ("{read_only: false}", mount(read_only=True), False),
        ('{options_allowed: [noload, "errors=*"]}', mount(options=()), True),
        ('{options_allowed: [noload, "errors=*"]}', mount(options=("noload", "errors=continue")), True),
        ('{options_allowed: [noload, "errors=*"]}', mount(options=("noload", "data=journal")), False),
        ('{options_allowed: [noload, "errors=*"]}', mount(options=("noloadx",)), False),
        ('{options_forbidden: ["journal_*"]}', mount(options=()), True),
        ('{options_forbidden: ["journal_*"]}', mount(options=("noload", "journal_ioprio=1")), False),
        ('{options_forbidden: ["journal_*"]}', mount(options=("nojournal_checksum",)), True),
        ('{options_allowed: ["*"], options_forbidden: [acl]}', mount(options=("acl",)), False),
        ("{max_loop_devices: 4}", mount(loop_devices=0), True),
        ("{max_loop_devices: 4}", mount(loop_devices=3), True),
        ("{max_loop_devices: 4}", mount(loop_devices=4), False),
        ("{max_loop_devices: 1}", mount(loop_devices=1), False),
    ],
)
def test_match_condition(tmp_path: Path, match: str, req: MountRequest, expected: bool) -> None:
    assert (match_policy(tmp_path, match).evaluate(req).rule == "m") is expected


def test_needs_digest(tmp_path: Path) -> None:
    assert not match_policy(tmp_path, "{source: /x}").needs_digest
    assert match_policy(tmp_path, f"{{sha256: {TRUSTED_DIGEST}}}").needs_digest


@pytest.mark.parametrize(("size", "shown"), [(0, "0 bytes"), (1023, "1023 bytes"), (1024, "1K"), (3 * GiB, "3G")])
def test_show_size(size: int, shown: str) -> None:
    assert show_size(size) == shown


# --- explain -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "req", "why"),
    [
        ("match: {source: /srv/img/*.ext4}", mount("/x"), "source /x does not match /srv/img/*.ext4"),
        ("match: {source: [/a/*, /b/*]}", mount("/x"), "source /x does not match any of /a/*, /b/*"),
        ("match: {target: /mnt/**}", mount(target="/opt"), "target /opt does not match /mnt/**"),
        ("match: {fstype: erofs}", mount(fstype="ext4"), "fstype ext4 is not erofs"),
        ("match: {fstype: [erofs, squashfs]}", mount(fstype="ext4"), "fstype ext4 is not one of erofs, squashfs"),
        ("match: {size: {max: 1M}}", mount(size=2 * MiB), "size 2M is above the maximum 1M"),
        ("match: {size: {min: 1M}}", mount(size=1000), "size 1000 bytes is below the minimum 1M"),
        ("match: {size: {min: 1M}}", mount(), "the image size is unknown; the rule limits it"),
        (
            f"match: {{sha256: {TRUSTED_DIGEST}}}",
            mount(sha256="A" * 64),
            f"sha256 {'a' * 64} is not the one digest the rule lists",
        ),
        (
            f"match: {{sha256: [{TRUSTED_DIGEST}, {'b' * 64}]}}",
            mount(sha256="a" * 64),
            f"sha256 {'a' * 64} is not the 2 digests the rule lists",
        ),
        (
            f"match: {{sha256: {TRUSTED_DIGEST}}}",
            mount(),
            "the image's sha256 was not computed; the rule matches only listed digests",
        ),
        (
            "match: {read_only: true}",
            mount(read_only=False),
            "the request is read-write; the rule matches only read-only mounts",
        ),
        (
            "match: {read_only: false}",
            mount(read_only=True),
            "the request is read-only; the rule matches only read-write mounts",
        ),
        (
            'match: {options_allowed: [noload, "errors=*"]}',
            mount(options=("noload", "data=journal")),
            "option 'data=journal' is not allowed; the rule allows only noload, errors=*",
        ),
        (
            "match: {options_allowed: []}",
            mount(options=("noload",)),
            "option 'noload' is not allowed; the rule allows no filesystem options",
        ),
        (
            'match: {options_forbidden: [acl, "journal_*"]}',
            mount(options=("noload", "journal_ioprio=2")),
            "option 'journal_ioprio=2' is forbidden by journal_*",
        ),
        (
            "match: {max_loop_devices: 4}",
            mount(loop_devices=4),
            "the container holds 4 loop devices; the rule matches only below 4",
        ),
        (
            'containers: {name: "ci-*"}',
            mount(container=ContainerInfo(name="web")),
            "container name 'web' does not match ci-*",
        ),
        (
            'containers: {name: ["ci-*", "build-*"]}',
            mount(),
            "the container has no name; the rule needs one matching any of ci-*, build-*",
        ),
        (
            "containers: {host_uid: 100000}",
            mount(container=ContainerInfo(host_uid=5)),
            "container host uid 5 is not 100000",
        ),
        (
            "containers: {host_uid: [1, 2]}",
            mount(container=ContainerInfo(host_uid=5)),
            "container host uid 5 is not one of 1, 2",
        ),
        ("containers: {host_uid: 1}", mount(), "the container's host uid is unknown; the rule names host uids"),
        (
            "containers: {lxc_cookie: secret}",
            mount(container=ContainerInfo(lxc_cookie="guess")),
            "the container's LXC cookie is not one the rule names",
        ),
        ("containers: {lxc_cookie: secret}", mount(), "the container has no LXC cookie; the rule names LXC cookies"),
        (
            'containers: {oci_id: "b-*"}',
            mount(container=ContainerInfo(oci_id="c-1")),
            "container OCI id 'c-1' does not match b-*",
        ),
        ('containers: {oci_id: "b-*"}', mount(), "the container has no OCI id; the rule needs one matching b-*"),
        ("containers: {oci_annotations: {k: v}}", mount(), "the container has no annotation 'k'"),
        (
            "containers: {oci_annotations: {k: [v, w]}}",
            mount(container=ContainerInfo(oci_annotations=(("k", "x"),))),
            "container annotation 'k' is 'x', which does not match any of v, w",
        ),
    ],
)
def test_explain_says_why_a_rule_did_not_match(tmp_path: Path, rule: str, req: MountRequest, why: str) -> None:
    policy = policy_from(tmp_path, f"version: 1\nrules:\n  - {{name: r, action: kernel, {rule}}}\n")
    explanation = policy.explain(req)
    assert explanation.steps == (Step("r", False, why),)
    assert explanation.decision == policy.evaluate(req)
    assert explanation.decision.rule is None


def test_explain_reports_the_first_failing_condition(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        """
        version: 1
        rules:
          - name: r
            containers: {name: "ci-*"}
            match: {source: /a, target: /b, max_loop_devices: 1}
            action: kernel
        """,
    )
    req = mount("/x", "/y", loop_devices=5, container=ContainerInfo(name="web"))
    assert policy.explain(req).steps[0].why == "container name 'web' does not match ci-*"
    req = dataclasses.replace(req, container=ContainerInfo(name="ci-1"))
    assert policy.explain(req).steps[0].why == "source /x does not match /a"
    req = dataclasses.replace(req, source="/a")
    assert policy.explain(req).steps[0].why == "target /y does not match /b"
    req = dataclasses.replace(req, target="/b")
    assert policy.explain(req).steps[0].why == "the container holds 5 loop devices; the rule matches only below 1"


def test_explain_stops_at_the_deciding_rule(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        """
        version: 1
        rules:
          - {name: one, match: {fstype: erofs}, action: kernel}
          - {name: two, match: {target: /mnt}, action: deny, errno: EACCES}
          - {name: three, action: kernel}
        """,
    )
    explanation = policy.explain(request())
    assert explanation == Explanation(
        steps=(Step("one", False, "fstype ext4 is not erofs"), Step("two", True, "matches")),
        decision=Decision(
            rule="two",
            action="deny",
            errno=errno.EACCES,
            options=(),
            reason="rule 'two' denies /srv/img/data.ext4 on /mnt (ext4) with EACCES; change the policy to allow it",
        ),
    )


def test_explain_with_no_rules(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, "version: 1\nrules: []\n")
    assert policy.explain(request()) == Explanation(steps=(), decision=policy.evaluate(request()))


EXAMPLE_POLICIES = [load_policy([path]) for path in ALL_POLICY_FILES]
WORDS = st.sampled_from(["srv", "img", "images", "builds", "mnt", "opt", "job", "a.ext4", "b.sqfs", "c.erofs", "x"])
REQUEST_PATHS = st.builds(as_path, st.lists(WORDS, max_size=4))
OPTIONS = st.sampled_from(["noload", "errors=continue", "errors=remount-ro", "journal_checksum", "acl", "data=journal"])
CONTAINERS = st.builds(
    ContainerInfo,
    name=st.sampled_from(["", "ci-1", "ci-", "web", "xci-1"]),
    host_uid=st.one_of(st.none(), st.sampled_from([0, 100000])),
    oci_id=st.one_of(st.none(), st.sampled_from(["build-1", "x"])),
)
REQUESTS = st.builds(
    MountRequest,
    source=REQUEST_PATHS,
    target=REQUEST_PATHS,
    fstype=st.sampled_from(["ext2", "ext3", "ext4", "squashfs", "erofs", "xfs", "vfat"]),
    read_only=st.booleans(),
    options=st.lists(OPTIONS, max_size=3).map(tuple),
    size=st.one_of(st.none(), st.integers(0, 3 * GiB), st.just(2 * GiB), st.just(2 * GiB + 1)),
    sha256=st.one_of(st.none(), st.sampled_from([TRUSTED_DIGEST, TRUSTED_DIGEST.upper(), "0" * 64])),
    container=CONTAINERS,
    loop_devices=st.integers(0, 6),
    source_origin=st.sampled_from(["host", "container", "deleted"]),
)


@given(st.sampled_from(EXAMPLE_POLICIES), REQUESTS)
def test_explain_and_evaluate_never_disagree(policy: Policy, req: MountRequest) -> None:
    explanation = policy.explain(req)
    assert explanation.decision == policy.evaluate(req)
    names = [step.rule for step in explanation.steps]
    assert names == [rule.name for rule in policy.rules[: len(names)]]
    assert all(not step.matched and step.why != "matches" for step in explanation.steps[:-1])
    if explanation.decision.rule is None:
        assert len(explanation.steps) == len(policy.rules)
        assert not explanation.steps or not explanation.steps[-1].matched
    else:
        assert explanation.steps[-1] == Step(explanation.decision.rule, True, "matches")
    assert explanation.decision.action in ("kernel", "fuse", "deny")
    assert (explanation.decision.errno == 0) is (explanation.decision.action != "deny")


# --- literal globs -------------------------------------------------------------------------

TEXT = st.text(string.ascii_letters + "*?[]!-./\\", max_size=12)


@given(TEXT, TEXT)
def test_literal_glob_matches_only_its_text(text: str, other: str) -> None:
    glob = NameGlob.compile(literal_glob(text))
    assert glob.matches(text)
    assert glob.matches(other) is (other == text)


@given(PATHS, PATHS)
def test_literal_path_glob_matches_only_its_path(parts: list[str], others: list[str]) -> None:
    path, other = as_path(parts), as_path(others)
    glob = Glob.compile(literal_glob(path))
    assert glob.matches(path)
    assert glob.matches(other) is (other == path)


# --- source origin: globs mean the host's files ----------------------------------------------

ORIGIN_POLICY = """
    version: 1
    rules:
      - name: host-images
        match: {source: /srv/img/*.ext4}
        action: kernel
      - name: container-images
        match: {source: /home/**, container_sources: true}
        action: fuse
      - name: by-digest
        match: {sha256: "%s"}
        action: kernel
""" % ("ab" * 32)


def _origin(source: str, origin: str, sha256: str | None = None) -> MountRequest:
    return dataclasses.replace(request(source), source_origin=origin, sha256=sha256)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "origin", "sha256", "rule"),
    [
        ("/srv/img/a.ext4", "host", None, "host-images"),
        ("/srv/img/a.ext4", "container", None, None),  # the container's file at a trusted path
        ("/srv/img/a.ext4", "deleted", None, None),
        ("/home/u/a.ext4", "container", None, "container-images"),
        ("/home/u/a.ext4", "host", None, "container-images"),  # container_sources widens, never narrows
        ("/home/u/a.ext4", "deleted", None, None),  # even container_sources cannot match a deleted file
        ("/srv/img/a.ext4", "container", "ab" * 32, "by-digest"),  # no source glob: origin is no condition
        ("/anywhere", "deleted", "ab" * 32, "by-digest"),
    ],
)
def test_source_globs_match_only_the_hosts_files_unless_the_rule_widens_them(
    tmp_path: Path, source: str, origin: str, sha256: str | None, rule: str | None
) -> None:
    policy = policy_from(tmp_path, ORIGIN_POLICY)
    assert policy.evaluate(_origin(source, origin, sha256)).rule == rule


def test_explain_says_the_source_is_the_containers(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, ORIGIN_POLICY)
    steps = policy.explain(_origin("/srv/img/a.ext4", "container")).steps
    assert steps[0] == Step(
        "host-images",
        False,
        "source /srv/img/a.ext4 is the container's (reached through a mount it made or moved, not the host's "
        "file at that path); add container_sources: true to the match to accept such sources",
    )
    deleted = policy.explain(_origin("/srv/img/a.ext4 (deleted)", "deleted"))
    assert deleted.steps[0].why == (
        "source /srv/img/a.ext4 (deleted) was deleted; a source glob matches only files that still have their name"
    )
    assert deleted.decision.reason == (
        "no rule matched /srv/img/a.ext4 (deleted) on /mnt (ext4, source deleted); add a rule to the policy"
    )
    made = policy.explain(_origin("/srv/img/a.ext4", "container")).decision.reason
    assert (
        made == "no rule matched /srv/img/a.ext4 on /mnt (ext4, source made by the container); add a rule to the policy"
    )


def test_requests_are_the_hosts_unless_told(tmp_path: Path) -> None:
    assert request().source_origin == "host"


@pytest.mark.parametrize(
    ("match", "error"),
    [
        (
            "{container_sources: true}",
            "rules[0].match.container_sources: container_sources only widens a source glob, and this match has "
            "none (it accepts any source already); add a source glob or remove container_sources",
        ),
        (
            "{source: /x, container_sources: yes please}",
            "rules[0].match.container_sources: 'yes please' is not true or false; write true or false",
        ),
    ],
)
def test_container_sources_is_checked(tmp_path: Path, match: str, error: str) -> None:
    path = write(tmp_path, "p.yaml", f"version: 1\nrules:\n  - {{name: a, match: {match}, action: kernel}}\n")
    message = load_error([path])
    assert message.startswith(f"{path}:3:") and message.endswith(error), message


def test_container_sources_false_is_the_default(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path, "version: 1\nrules: [{name: a, match: {source: /x, container_sources: false}, action: kernel}]\n"
    )
    assert policy.rules[0].match is not None and policy.rules[0].match.container_sources is False
    assert policy.evaluate(_origin("/x", "container")).rule is None
