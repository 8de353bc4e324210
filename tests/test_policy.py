"""Policy loading, error positions and rule evaluation, including glob properties."""

from __future__ import annotations

import errno
import string
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.policy import (
    Decision,
    MountRequest,
    Policy,
    PolicyError,
    load_policy,
)
from supervisor.policy.matcher import Glob, GlobSyntaxError

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return str(path)


def policy_from(tmp_path: Path, text: str) -> Policy:
    return load_policy([write(tmp_path, "policy.yaml", text)])


def request(source: str = "/srv/img/data.ext4", target: str = "/mnt", fstype: str = "ext4") -> MountRequest:
    return MountRequest(source=source, target=target, fstype=fstype, read_only=False)


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
    assert "name, match, action, options, errno" in first
    assert second == (f"{path}:7:25: rules[1].match.fs: unknown key 'fs'; use one of: source, target, fstype")


def test_bad_action(tmp_path: Path) -> None:
    path, message = bad(tmp_path, "version: 1\nrules:\n  - name: a\n    action: mount\n")
    assert message == (f"{path}:4:13: rules[0].action: 'mount' is not allowed; use one of: kernel, deny")


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
