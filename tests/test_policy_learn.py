"""Learning a policy from observed mount requests: the text loads and allows exactly what it saw."""

from __future__ import annotations

import errno
import random
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.policy import MountRequest, Policy, learn, load_policy
from supervisor.policy.learn import source_pattern, suggest


def req(
    source: str,
    target: str = "/mnt",
    fstype: str = "ext4",
    *,
    read_only: bool = True,
    options: tuple[str, ...] = (),
) -> MountRequest:
    return MountRequest(source, target, fstype, read_only, options)


def load_text(directory: Path, text: str) -> Policy:
    path = directory / "learned.yaml"
    path.write_text(text, encoding="utf-8")
    return load_policy([path])


def learned(directory: Path, requests: list[MountRequest]) -> Policy:
    return load_text(directory, suggest(requests))


# --- hand-written cases --------------------------------------------------------------------


def test_the_exact_text(tmp_path: Path) -> None:
    text = suggest(
        [
            req("/srv/img/b.ext4", "/mnt/data", options=("noload",)),
            req("/srv/img/a.ext4", "/mnt/data", "ext2"),
            req("/srv/img/tools", "/opt/tools", "squashfs", read_only=False),
        ]
    )
    assert text == textwrap.dedent(
        """\
        # Learned by mountwarden from 3 mount request(s). REVIEW BEFORE USE: every rule
        # allows what the container was seen to do, widened to sibling images with the same
        # extension ("*.ext4") in the same directory; filesystem options are limited to those
        # seen. Anything else is denied by the last rule.
        version: 1
        rules:
          # 2 request(s), all read-only, so ro is forced.
          - name: learned-1
            match:
              source: "/srv/img/*.ext4"
              target: "/mnt/data"
              fstype: [ext2, ext4]
              options_allowed: [noload]
            action: kernel
            options: [ro]

          # 1 request(s), read-write.
          - name: learned-2
            match:
              source: "/srv/img/tools"
              target: "/opt/tools"
              fstype: [squashfs]
              options_allowed: []
            action: kernel

          # Everything not learned above.
          - name: learned-deny-all
            action: deny
            errno: EPERM
        """
    )
    policy = load_text(tmp_path, text)
    assert [rule.name for rule in policy.rules] == ["learned-1", "learned-2", "learned-deny-all"]


def test_nothing_learned_denies_everything(tmp_path: Path) -> None:
    text = suggest([])
    assert text.startswith("# Learned by mountwarden from 0 mount request(s). REVIEW BEFORE USE")
    policy = load_text(tmp_path, text)
    assert [rule.name for rule in policy.rules] == ["learned-deny-all"]
    decision = policy.evaluate(req("/srv/img/a.ext4"))
    assert (decision.rule, decision.action, decision.errno) == ("learned-deny-all", "deny", errno.EPERM)


def test_siblings_with_the_same_extension_are_allowed(tmp_path: Path) -> None:
    policy = learned(tmp_path, [req("/srv/img/a.ext4")])
    assert policy.evaluate(req("/srv/img/other.ext4")).rule == "learned-1"
    for other in (
        req("/srv/img/a.img"),  # another extension
        req("/srv/img/sub/a.ext4"),  # a subdirectory
        req("/srv/a.ext4"),  # the parent
        req("/srv/img/a.ext4", "/mnt/x"),  # another target
        req("/srv/img/a.ext4", fstype="squashfs"),  # another probed type
    ):
        assert policy.evaluate(other).rule == "learned-deny-all", other


def test_requests_merge_per_source_pattern_and_target(tmp_path: Path) -> None:
    requests = [
        req("/srv/img/a.ext4", "/mnt/a"),
        req("/srv/img/b.ext4", "/mnt/a", "ext2"),
        req("/srv/img/c.ext4", "/mnt/b"),
        req("/srv/img/d.sqfs", "/mnt/a", "squashfs"),
    ]
    policy = learned(tmp_path, requests)
    rules = {rule.name: rule for rule in policy.rules}
    assert len(rules) == 4
    sources = [(rule.match.source, rule.match.target) for rule in policy.rules if rule.match is not None]
    assert [(s[0].pattern, t[0].pattern) for s, t in sources if s and t] == [
        ("/srv/img/*.ext4", "/mnt/a"),
        ("/srv/img/*.ext4", "/mnt/b"),
        ("/srv/img/*.sqfs", "/mnt/a"),
    ]
    # The types seen for a source pattern are allowed for each of its targets.
    assert rules["learned-2"].match is not None
    assert rules["learned-2"].match.fstype == ("ext2", "ext4")
    assert policy.evaluate(req("/srv/img/z.ext4", "/mnt/b", "ext2")).rule == "learned-2"


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ("/srv/img/a.ext4", "/srv/img/*.ext4"),
        ("/a.ext4", "/*.ext4"),
        ("/srv/img/a.tar.gz", "/srv/img/*.gz"),
        ("/srv/img/noext", "/srv/img/noext"),
        ("/srv/img/.hidden", "/srv/img/.hidden"),  # a dot file has no extension
        ("/srv/img/trailing.", "/srv/img/trailing."),
        ("/srv/v1.2/img", "/srv/v1.2/img"),  # a dot in the directory is not an extension
        ("/srv/i*g/a.ext4", "/srv/i[*]g/*.ext4"),
        ("/srv/img/a.e?t[4", "/srv/img/*.e[?]t[[]4"),
        ("/srv/img/x[1]", "/srv/img/x[[]1]"),
        ("/", "/"),
    ],
)
def test_source_pattern(source: str, pattern: str) -> None:
    assert source_pattern(source) == pattern


def test_glob_characters_in_paths_are_literal(tmp_path: Path) -> None:
    policy = learned(tmp_path, [req("/srv/i*g/x?", "/mnt/[a]")])
    assert policy.evaluate(req("/srv/i*g/x?", "/mnt/[a]")).rule == "learned-1"
    assert policy.evaluate(req("/srv/img/x?", "/mnt/[a]")).rule == "learned-deny-all"
    assert policy.evaluate(req("/srv/i*g/xy", "/mnt/[a]")).rule == "learned-deny-all"
    assert policy.evaluate(req("/srv/i*g/x?", "/mnt/a")).rule == "learned-deny-all"


def test_ro_is_forced_only_when_every_request_was_read_only(tmp_path: Path) -> None:
    policy = learned(
        tmp_path,
        [
            req("/img/a.ext4", "/ro"),
            req("/img/b.ext4", "/ro"),
            req("/img/a.ext4", "/mixed"),
            req("/img/b.ext4", "/mixed", read_only=False),
        ],
    )
    assert policy.evaluate(req("/img/a.ext4", "/ro", read_only=False)).options == ("ro",)
    assert policy.evaluate(req("/img/a.ext4", "/mixed", read_only=False)).options == ()


def test_options_are_limited_to_those_seen(tmp_path: Path) -> None:
    policy = learned(
        tmp_path,
        [req("/img/a.ext4", options=("noload",)), req("/img/b.ext4", options=("errors=remount-ro", "noload"))],
    )
    assert policy.evaluate(req("/img/c.ext4", options=("errors=remount-ro",))).action == "kernel"
    assert policy.evaluate(req("/img/c.ext4", options=("errors=continue",))).action == "deny"
    assert policy.evaluate(req("/img/c.ext4", options=("noload", "data=journal"))).action == "deny"


def test_options_with_glob_characters_are_literal(tmp_path: Path) -> None:
    policy = learned(tmp_path, [req("/img/a.ext4", options=("x*",))])
    assert policy.evaluate(req("/img/a.ext4", options=("x*",))).action == "kernel"
    assert policy.evaluate(req("/img/a.ext4", options=("xy",))).action == "deny"


def test_yaml_lookalikes_are_quoted(tmp_path: Path) -> None:
    requests = [req("/img/yes", fstype="1"), req("/img/on.ext4", fstype="null", options=("true", "no", "0x10"))]
    policy = learned(tmp_path, requests)
    assert all(policy.evaluate(r).action == "kernel" for r in requests)


def test_order_and_repetition_of_requests_do_not_matter() -> None:
    requests = [
        req(f"/img/{d}/f{i}.{ext}", f"/mnt/{i % 3}") for i in range(12) for d, ext in (("a", "ext4"), ("b", "sqfs"))
    ]
    text = suggest(requests)
    shuffled = requests[:]
    random.Random(7).shuffle(shuffled)
    assert suggest(shuffled) == text
    # Repeating requests changes only the counts in the comments.
    assert without_comments(suggest(requests + shuffled)) == without_comments(text)


def without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


@pytest.mark.parametrize(
    ("bad", "complaint"),
    [
        (req("img/a.ext4"), "source 'img/a.ext4'"),
        (req("/img/../a.ext4"), "source '/img/../a.ext4'"),
        (req("/img//a.ext4"), "source '/img//a.ext4'"),
        (req("/img/a.ext4", "/mnt/"), "target '/mnt/'"),
        (req("/img/a.ext4", ""), "target ''"),
        (req("/img/a.ext4", fstype="ext4, erofs"), "fstype 'ext4, erofs'"),
        (req("/img/a.ext4", options=("a,b",)), "option 'a,b'"),
        (req("/img/a.ext4", options=("",)), "option ''"),
    ],
)
def test_requests_no_policy_could_allow_are_refused(bad: MountRequest, complaint: str) -> None:
    with pytest.raises(ValueError, match=f"cannot learn from {complaint.replace('.', '[.]')}"):
        suggest([req("/img/ok.ext4"), bad])


def test_learn_is_reachable_from_the_package() -> None:
    assert learn.suggest is suggest


# --- properties ----------------------------------------------------------------------------

# Any character but '/' and NUL (which no path holds), and \x01, kept out to build an
# unseen path; lone surrogates stand for undecodable bytes (os.fsdecode's surrogateescape).
NAME_CHARS = st.characters(exclude_characters="/\x00\x01", exclude_categories=["Cs"]) | st.sampled_from(
    "\udc80\udcff*?[]!.#: '\"-"
)
COMPONENTS = st.text(NAME_CHARS, min_size=1, max_size=6).filter(lambda part: part not in (".", ".."))
EXTENSIONS = st.sampled_from(["", ".ext4", ".sqfs", ".img", ".e*", ".[x]"])
PATH_HEADS = st.lists(st.one_of(st.sampled_from(["srv", "img", "mnt"]), COMPONENTS), max_size=3)
SOURCES = st.builds(lambda head, name, ext: "/" + "/".join([*head, name + ext]), PATH_HEADS, COMPONENTS, EXTENSIONS)
TARGETS = st.builds(lambda parts: "/" + "/".join(parts), PATH_HEADS)
FSTYPES = st.sampled_from(["ext2", "ext3", "ext4", "squashfs", "erofs", "fuse.sshfs", "9p", "1", "null"])
OPTIONS = st.text(st.characters(exclude_characters=",\x00", exclude_categories=["Cs"]), min_size=1, max_size=8)
REQUESTS = st.builds(
    MountRequest,
    source=SOURCES,
    target=TARGETS,
    fstype=FSTYPES,
    read_only=st.booleans(),
    options=st.lists(OPTIONS, max_size=3).map(tuple),
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.lists(REQUESTS, max_size=12))
def test_suggested_policy_loads_and_allows_every_request(tmp_path: Path, requests: list[MountRequest]) -> None:
    text = suggest(requests)
    policy = load_text(tmp_path, text)
    for request in requests:
        decision = policy.evaluate(request)
        assert decision.action == "kernel", (request, decision, text)
        assert decision.rule is not None and decision.rule.startswith("learned-")
        if all(r.read_only for r in requests):
            assert decision.options == ("ro",)
    names = [rule.name for rule in policy.rules]
    assert names == [*(f"learned-{i}" for i in range(1, len(names))), "learned-deny-all"]
    keys = {(source_pattern(r.source), r.target) for r in requests}
    assert len(names) == len(keys) + 1
    unseen = MountRequest("/\x01unseen/a.ext4", "/mnt", "ext4", True)
    assert policy.evaluate(unseen).rule == "learned-deny-all"
    assert suggest(list(reversed(requests))) == text
