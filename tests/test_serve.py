"""One `mountwarden serve`, started through its command line, serving LXC, runc and crun
containers at the same time (issue 10's "Also" list and the loop's promise).

Every container here is a real runtime's: LXC 5.0.2 over `lxc.seccomp.notify.proxy`, runc
and crun over `listenerPath`, each a busybox root mapped onto 100000:65536 that writes what
it has to say into /out of its root, read by the test on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lxcrt
import oci
import pytest
from conftest import build_image, calls, write_policy
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from supervisor.sources import oci as oci_source

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("lxc-start", "runc", "crun", "squashfuse")),
    reason="needs lxc, runc, crun and squashfuse (contrib/setup.sh installs them)",
)

RUNTIMES = ("lxc", "runc", "crun")
WAIT_FOR_GO = "while [ ! -e /out/go ]; do sleep 0.05; done"


def _policy(tmp_path: Path) -> Path:
    """Images may be mounted on /mnt, whatever their source; every other mount is EPERM."""
    return write_policy(
        tmp_path / "serve.yaml", [{"name": "images-on-mnt", "match": {"target": "/mnt"}, "action": "kernel"}]
    )


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[oci.Serve]:
    with oci.serving(tmp_path, _policy(tmp_path), lxc=True) as serving:
        yield serving


@dataclass
class Box:
    """A running container of any of the three runtimes, as the test sees it."""

    runtime: str
    name: str
    root: Path  # its root on the host: /out is root/out
    proc: subprocess.Popen[bytes]  # lxc-start -F, or runc/crun run in the foreground
    said: Path  # the runtime's output (OCI) or log (LXC)

    @property
    def key(self) -> str:
        return f"lxc:{self.proc.pid}" if self.runtime == "lxc" else f"oci:{self.name}"

    def out(self, name: str) -> Path:
        return self.root / "out" / name

    def go(self) -> None:
        self.out("go").touch()

    def wait_for(self, name: str, timeout: float = 60) -> str:
        """What the container wrote to /out/`name`, once it has written it."""
        deadline = time.monotonic() + timeout
        while not self.out(name).exists():
            assert self.proc.poll() is None, f"{self.name} ended before /out/{name}: {self.diagnosis()}"
            assert time.monotonic() < deadline, f"{self.name} did not get to /out/{name}"
            time.sleep(0.05)
        return self.out(name).read_text()

    def diagnosis(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in (self.out("log"), self.said) if p.exists())


@contextlib.contextmanager
def box(
    runtime: str, serve: oci.Serve, tmp: Path, workdir: Path, name: str, script: str, images: dict[str, Path],
    mountcall: Path,
) -> Iterator[Box]:  # fmt: skip
    """The container `name` of `runtime` running `script` with `images` (name -> host file) in
    /img and the static test tool as /bin/mountcall; gone at the end, however it ended."""
    init = f"{lxcrt.WAIT_FOR_POOL}\n{{\n{script}\n}} >>/out/log 2>&1\n"
    if runtime == "lxc":
        with lxcrt.started(workdir, serve.lxc_socket, name, init, images, (mountcall,)) as container:
            yield Box(runtime, name, container.rootfs, container.monitor, container.lxcpath / f"{name}.log")
        return
    root, imgdir = workdir / f"oci-root-{name}", workdir / f"oci-img-{name}"
    imgdir.mkdir(mode=0o755)
    for image_name, image in images.items():
        shutil.copy(image, imgdir / image_name)
    subprocess.run(["chown", "-R", "100000:100000", str(imgdir)], check=True)
    oci.rootfs(root, mountcall)
    try:
        profile = oci_source.profile(None, str(serve.socket), runtime=runtime)
        cfg = oci.config(root, ["/bin/sh", "-c", init], profile, imgdir, rw_images=True)
        with oci.running(runtime, tmp, name, cfg) as proc:
            yield Box(runtime, name, root, proc, tmp / f"{name}.out")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(imgdir, ignore_errors=True)


def _key_is(key: str) -> Callable[[dict[str, Any]], bool]:
    return lambda record: record.get("key") == key


def _adopted_init(serve: oci.Serve, key: str) -> int:
    found = serve.wait_for_match("container-adopted", _key_is(key))
    return int(found["init_pid"])


def _decisions(serve: oci.Serve, container: str) -> list[dict[str, Any]]:
    return [r for r in serve.records() if r.get("container") == container]


def _host_devices(init_pid: int) -> dict[str, str]:
    """The container's /dev/loopN -> the backing file of the host device behind it.

    The nodes are links into the pool's /dev/.mountwarden, followed here by hand inside the
    container's root (an absolute link would lead into the host's)."""
    root = f"/proc/{init_pid}/root"
    found = {}
    for entry in os.listdir(f"{root}/dev"):
        if not entry.startswith("loop") or entry == "loop-control":
            continue
        target = os.path.join("/dev", os.readlink(f"{root}/dev/{entry}"))
        minor = os.minor(os.stat(f"{root}{target}").st_rdev)
        backing = Path(f"/sys/block/loop{minor}/loop/backing_file")
        found[entry] = f"loop{minor}:" + (backing.read_text().strip() if backing.exists() else "(unbound)")
    return found


# --- 1. three runtimes at once, each on its own pool; SIGKILL mid-mount ---------------------------


def test_lxc_runc_and_crun_at_once_each_see_only_their_pool_and_a_sigkill_mid_mount_leaks_nothing(
    serve: oci.Serve, tmp_path: Path, workdir: Path, images: dict[str, Path], mountcall: Path
) -> None:
    names = {rt: f"mws-{rt}-{os.getpid()}" for rt in RUNTIMES}
    script = """mount -o loop /img/{image} /mnt && touch /out/mounted
{wait}
{{ ls /dev | grep '^loop'; echo --; losetup -a; }} >/out/view
umount /mnt && touch /out/viewed
while :; do mount -o loop /img/{image} /mnt; umount /mnt; echo >>/out/ticks; done >/dev/null 2>&1"""
    with contextlib.ExitStack() as stack:
        boxes = []
        for runtime, name in names.items():
            image = f"{name}.ext4"
            boxes.append(stack.enter_context(box(
                runtime, serve, tmp_path, workdir, name, script.format(image=image, wait=WAIT_FOR_GO),
                {image: images["ext4"]}, mountcall,
            )))  # fmt: skip
        for b in boxes:
            b.wait_for("mounted")
        inits = {b.name: _adopted_init(serve, b.key) for b in boxes}
        # All three hold an image now. On the host: each container's nodes lead only to its own
        # image's device or to its pool's free placeholder, and no host device is in two pools.
        seen: dict[str, str] = {}
        for b in boxes:
            devices = _host_devices(inits[b.name])
            assert any(v.endswith(f"/{b.name}.ext4") for v in devices.values()), (b.name, devices)
            for node, device in devices.items():
                assert device.endswith(f"/{b.name}.ext4") or "memfd:" in device, (b.name, node, device)
                host = device.split(":")[0]
                assert seen.setdefault(host, b.name) == b.name, f"{host} is in the pools of {b.name} and {seen[host]}"
        for b in boxes:
            b.go()
        for b in boxes:
            b.wait_for("viewed")
            nodes, bound = b.out("view").read_text().split("--\n")
            assert "loop-control" in nodes.split() and "loop0" in nodes.split(), nodes
            lines = bound.splitlines()
            assert len(lines) == 1 and f"/img/{b.name}.ext4" in lines[0], (b.name, bound)  # only its own
            assert not any(other in bound for other in names.values() if other != b.name), bound
        # Each container is now mounting and unmounting as fast as it can: SIGKILL its init
        # after a few more rounds, so a request is very likely in flight.
        for b in boxes:
            b.wait_for("ticks")
            rounds = b.out("ticks").stat().st_size
            deadline = time.monotonic() + 30
            while b.out("ticks").stat().st_size < rounds + 3:
                assert time.monotonic() < deadline, f"{b.name} stopped mounting: {b.diagnosis()}"
                time.sleep(0.02)
            os.kill(inits[b.name], signal.SIGKILL)
            b.proc.wait(timeout=60)
        for b in boxes:
            serve.wait_for_match("container-released", _key_is(b.key), timeout=30)
    assert serve.proc.poll() is None, "serve ended with its containers"
    # serve goes on serving: fresh containers mount through new pools
    for runtime in ("runc", "lxc"):
        name = f"mws-fresh-{runtime}-{os.getpid()}"
        fresh = "mount -o loop,ro /img/f.ext4 /mnt && cat /mnt/pub.txt >/out/fresh; umount /mnt; touch /out/done"
        with box(runtime, serve, tmp_path, workdir, name, fresh, {"f.ext4": images["ext4"]}, mountcall) as b:
            b.wait_for("done")
            assert b.out("fresh").read_text() == "public\n", b.diagnosis()
        serve.wait_for_match("container-released", _key_is(b.key), timeout=30)
    refused = [r for r in serve.records("container-not-adopted")]
    assert not refused, refused


# --- 2. the loop's promise: a held request delays only its own container -------------------------


@contextlib.contextmanager
def stoppable_image_mount(workdir: Path, image: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A host squashfuse mount (open to the container's uid) holding `image` as mnt/data.ext4 of
    the directory returned: while its daemon is SIGSTOPped, opening or reading the image blocks
    until SIGCONT, on demand. Lookups and attributes are cached for long, so only the open and
    reads reach the daemon. (The directory, not the FUSE mount, is for binding: a runtime's
    read-only remount of a bind of the mount itself would drop its locked nosuid,nodev.)"""
    base = workdir / f"held-{os.getpid()}"
    (base / "src").mkdir(parents=True)
    shutil.copy(image, base / "src" / "data.ext4")
    subprocess.run(["chown", "-R", "100000:100000", str(base / "src")], check=True)
    build_image("squashfs", base / "src", base / "held.sqfs")
    mnt = base / "mnt"
    mnt.mkdir()
    daemon = subprocess.Popen(
        ["squashfuse", "-f", "-o", "allow_other,entry_timeout=1000,attr_timeout=1000", str(base / "held.sqfs"),
         str(mnt)], stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            assert daemon.poll() is None and time.monotonic() < deadline, "squashfuse did not mount"
            time.sleep(0.02)
        yield base, daemon
    finally:
        daemon.send_signal(signal.SIGCONT)
        subprocess.run(["umount", str(mnt)], capture_output=True)
        daemon.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def _in_mount_syscall(init_pid: int, comm: str) -> bool:
    """Whether a child of the container's init named `comm` is waiting in mount(2)."""
    with open(f"/proc/{init_pid}/task/{init_pid}/children") as f:
        children = f.read().split()
    for child in children:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == comm:
                return Path(f"/proc/{child}/syscall").read_text().split()[0] == "165"
    return False


@pytest.mark.parametrize("other", ["crun", "lxc"])
def test_a_request_held_in_a_slow_path_delays_no_other_containers_answers(
    other: str, serve: oci.Serve, tmp_path: Path, workdir: Path, images: dict[str, Path], mountcall: Path
) -> None:
    """runc container A mounts an image whose bytes stall on demand (a stopped FUSE daemon under
    it): the supervisor's work for A blocks in the open/read for as long as the test wants.
    Meanwhile container B (crun, or LXC through its monitor) makes 50 mount requests: every one
    is answered while A's is still pending, and A's is answered after, once the image flows."""
    slow, fast = f"mws-held-{os.getpid()}", f"mws-{other}-{os.getpid()}"
    answers = 50
    denied = shlex.join(calls(Path("/bin/mountcall"), *["mount /img/data.ext4 /tmp ext4 ro"] * answers))
    with stoppable_image_mount(workdir, images["ext4"]) as (held, daemon), contextlib.ExitStack() as stack:
        b = stack.enter_context(box(
            other, serve, tmp_path, workdir, fast, f"{WAIT_FOR_GO}\n{denied} >/out/answers\ntouch /out/done",
            {"data.ext4": images["ext4"]}, mountcall,
        ))  # fmt: skip
        a_script = f"""ls -l /img/mnt/data.ext4 && touch /out/listed
{WAIT_FOR_GO}
mountcall mount /img/mnt/data.ext4 /mnt ext4 ro >/out/held
umount /mnt; touch /out/done"""
        root = workdir / f"oci-root-{slow}"
        oci.rootfs(root, mountcall)
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        cfg = oci.config(root, ["/bin/sh", "-c", f"{lxcrt.WAIT_FOR_POOL}\n{{\n{a_script}\n}} >>/out/log 2>&1"],
                         oci_source.profile(None, str(serve.socket), runtime="runc"), held)  # fmt: skip
        a = Box(
            "runc", slow, root, stack.enter_context(oci.running("runc", tmp_path, slow, cfg)), tmp_path / f"{slow}.out"
        )
        a.wait_for("listed")
        b_init, a_init = _adopted_init(serve, b.key), _adopted_init(serve, a.key)
        daemon.send_signal(signal.SIGSTOP)
        a.go()
        deadline = time.monotonic() + 30
        while not _in_mount_syscall(a_init, "mountcall"):
            assert time.monotonic() < deadline, f"A's mount never reached the supervisor: {a.diagnosis()}"
            time.sleep(0.05)
        b.go()
        b.wait_for("done")
        # B has all its answers; A's request is still held, unanswered, and has no decision yet
        assert b.out("answers").read_text().split() == ["EPERM"] * answers, b.out("answers").read_text()
        assert _in_mount_syscall(a_init, "mountcall"), "A's mount was answered before the image flowed"
        assert not [r for r in _decisions(serve, slow) if r.get("syscall") == "mount"]
        daemon.send_signal(signal.SIGCONT)
        a.wait_for("done")
        assert a.out("held").read_text() == "OK\n", a.diagnosis()
        log = [r for r in serve.records() if r.get("syscall") == "mount"]
        order = [r["container"] for r in log if r.get("container") in (slow, fast)]
        assert order[-1] == slow and order.count(slow) == 1, order  # A's one decision came after all of B's
        assert b_init != a_init


# --- 3. exec: a new listener for the same container -------------------------------------------------


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_exec_gets_a_new_listener_served_by_the_same_session(
    runtime: str, serve: oci.Serve, tmp_path: Path, workdir: Path, images: dict[str, Path], mountcall: Path
) -> None:
    name = f"mws-exec-{runtime}-{os.getpid()}"
    with box(runtime, serve, tmp_path, workdir, name, "touch /out/ready; exec sleep 1000",
             {"data.ext4": images["ext4"]}, mountcall) as b:  # fmt: skip
        b.wait_for("ready")
        done = oci.exec_in(runtime, tmp_path, name,
                           "mount -o loop,ro /img/data.ext4 /mnt && cat /mnt/pub.txt && losetup -a && umount /mnt "
                           "&& echo done")  # fmt: skip
        assert done.returncode == 0 and done.stdout.split()[0] == "public" and "done" in done.stdout, done
        listeners = serve.records("oci-listener")
        ours = [r for r in listeners if r.get("key") == b.key]
        assert len(ours) == 2 and ours[1]["status"] == "running", listeners
        if runtime == "crun":
            assert ours[1]["pid"] == 0 and ours[1]["init_pid"] == 0  # crun's exec names no pid
        assert len([r for r in serve.records("container-adopted") if r.get("key") == b.key]) == 1
        mounts = [r for r in _decisions(serve, name) if r.get("syscall") == "mount"]
        assert mounts and mounts[-1]["result"] == "OK" and mounts[-1]["rule"] == "images-on-mnt", mounts
    serve.wait_for_match("container-released", _key_is(b.key), timeout=30)


# --- 5. what the OCI socket is sent: fuzzed, and at the socket ------------------------------------


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_STATE = st.fixed_dictionaries(
    {},
    optional={"id": st.text(max_size=30) | _JSON, "pid": st.integers() | _JSON, "status": _JSON, "bundle": _JSON,
              "annotations": st.dictionaries(st.text(max_size=10), st.text(max_size=10)) | _JSON},
)  # fmt: skip
_DOC = st.fixed_dictionaries(
    {},
    optional={"fds": st.lists(st.sampled_from(["seccompFd", "other"]), max_size=3) | _JSON, "state": _STATE | _JSON,
              "pid": st.integers() | _JSON, "metadata": _JSON, "ociVersion": _JSON},
)  # fmt: skip


def _parse_or_refuse(raw: bytes) -> None:
    try:
        state = oci_source.parse_state(raw)
    except oci_source.BadState:
        return
    assert state.container_id and len(state.container_id) <= 1024
    assert 0 <= state.pid < 1 << 22 and 0 <= state.init_pid < 1 << 22
    assert state.fd_index >= 0


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_parse_state_raises_only_badstate_on_arbitrary_bytes(raw: bytes) -> None:
    _parse_or_refuse(raw)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_DOC)
def test_parse_state_raises_only_badstate_on_documents_of_every_shape(doc: dict[str, Any]) -> None:
    _parse_or_refuse(json.dumps(doc).encode())


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
@example(b"\xff\xfe{}")
def test_complete_gives_a_prefix_or_refuses(raw: bytes) -> None:
    try:
        document = oci_source.complete(raw)
    except oci_source.BadState:
        return
    assert document is None or raw.startswith(document)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_DOC, st.binary(max_size=64), st.booleans())
def test_complete_finds_the_first_document_and_never_a_prefix(doc: dict[str, Any], tail: bytes, pretty: bool) -> None:
    """runc never closes the connection: the document is taken as soon as it is whole, at any split."""
    text = json.dumps(doc, indent=4 if pretty else None).encode()
    assert oci_source.complete(text + tail) == text
    for cut in range(0, len(text), max(1, len(text) // 16)):
        assert oci_source.complete(text[:cut]) is None


@pytest.mark.parametrize("what", ["complete", "parse_state"])
def test_deeply_nested_json_is_refused_not_raised(what: str) -> None:
    """Bug found: deeply nested JSON raised RecursionError out of complete() and parse_state()
    (the json module's recursion limit); now it is a refusal like any bad document."""
    with pytest.raises(oci_source.BadState):
        (oci_source.complete if what == "complete" else oci_source.parse_state)(b"[" * 100_000)


def _send(path: Path, data: bytes, fds: list[int] | None = None, *, close: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
            b"".join(fd.to_bytes(4, "little") for fd in fds))))])  # fmt: skip
    else:
        sock.sendall(data)
    if close:
        sock.close()
    return sock


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _run_loop_mount(serve: oci.Serve, tmp_path: Path, workdir: Path, images: dict[str, Path], mountcall: Path) -> None:
    name = f"mws-after-{os.getpid()}"
    script = "mount -o loop,ro /img/data.ext4 /mnt && cat /mnt/pub.txt >/out/pub; umount /mnt; touch /out/done"
    with box("runc", serve, tmp_path, workdir, name, script, {"data.ext4": images["ext4"]}, mountcall) as b:
        b.wait_for("done")
        assert b.out("pub").read_text() == "public\n", b.diagnosis()


def _state(fds: list[str]) -> bytes:
    state = {"id": "mws-bogus", "pid": 1, "status": "creating", "bundle": "/x"}
    return json.dumps({"ociVersion": "1.0.2", "fds": fds, "pid": 1, "state": state}).encode()


def test_garbage_oversize_and_wrong_fds_on_the_oci_socket_are_refused_and_logged(
    serve: oci.Serve, tmp_path: Path, workdir: Path, images: dict[str, Path], mountcall: Path
) -> None:
    pid = serve.proc.pid
    time.sleep(0.2)
    before = _fd_count(pid)
    null = os.open("/dev/null", os.O_RDONLY)
    r, w = os.pipe()
    try:
        _send(serve.socket, b"\x00\xffnot json at all{{{")  # then EOF
        _send(serve.socket, b'{"state": "\xff\xfe"}')  # whole, but not UTF-8
        _send(serve.socket, b"[1, 2]")  # whole, but no state
        _send(serve.socket, b'{"fds": ["seccompFd"], "state": {"id": "' + b"a" * (200 * 1024))  # over 64 KiB
        _send(serve.socket, _state(["other"]), [r])  # no seccompFd named
        _send(serve.socket, _state(["seccompFd"]), [null])  # named, but not a listener
        _send(serve.socket, _state(["seccompFd"]))  # named, but no fd sent
        _send(serve.socket, _state(["seccompFd"]), [null] * 250)  # one message, far more fds than wanted
    finally:
        for fd in (null, r, w):
            os.close(fd)
    deadline = time.monotonic() + 10
    reasons = {r.get("error") for r in serve.records("oci-state-refused")}
    want = ("ended before a complete document", "not a JSON document", "no 'state' object", "too large",
            "does not name seccompFd", "is not a seccomp listener", "was named but not sent", "fds on one")  # fmt: skip
    while not all(any(w in (x or "") for x in reasons) for w in want):
        assert time.monotonic() < deadline, reasons
        time.sleep(0.05)
        reasons = {r.get("error") for r in serve.records("oci-state-refused")}
    for _ in range(3 * oci_source.MAX_PENDING):  # connections that never finish their document
        _send(serve.socket, b"{", close=False).close()
    while not serve.records("oci-connection-dropped"):  # the connections beyond MAX_PENDING
        assert time.monotonic() < deadline + 10
        time.sleep(0.05)
    assert serve.proc.poll() is None
    _run_loop_mount(serve, tmp_path, workdir, images, mountcall)  # a real container is still served
    deadline = time.monotonic() + 10
    while _fd_count(pid) > before:  # every fd a peer sent is closed
        assert time.monotonic() < deadline, (before, sorted(os.listdir(f"/proc/{pid}/fd")))
        time.sleep(0.05)


def test_an_fd_flood_on_one_connection_is_refused_before_it_fills_the_fd_table(
    serve: oci.Serve, tmp_path: Path, workdir: Path, images: dict[str, Path], mountcall: Path
) -> None:
    """Bug found: serve kept every fd a connection sent until its document was complete (only
    each recvmsg was bounded), so one peer filled serve's fd table."""
    pid = serve.proc.pid
    time.sleep(0.2)
    before = _fd_count(pid)
    null = os.open("/dev/null", os.O_RDONLY)
    sock = _send(serve.socket, b"{", close=False)
    try:
        sock.settimeout(5)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused: serve hung up
            for _ in range(400):  # one byte and 8 fds per message: a document that never completes
                sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       b"".join(null.to_bytes(4, "little") for _ in range(8)))])  # fmt: skip
        time.sleep(1)
        held = _fd_count(pid) - before
    finally:
        sock.close()
        os.close(null)
    assert held <= 64, f"serve holds {held} fds of one peer"
    assert serve.records("oci-state-refused")
    _run_loop_mount(serve, tmp_path, workdir, images, mountcall)


def test_deeply_nested_json_on_the_oci_socket_does_not_end_serve(
    serve: oci.Serve, tmp_path: Path, workdir: Path, images: dict[str, Path], mountcall: Path
) -> None:
    """Bug found: the RecursionError left the event loop and serve exited, releasing every container."""
    _send(serve.socket, b"[" * 60_000)
    time.sleep(1)
    assert serve.proc.poll() is None, "serve ended"
    _run_loop_mount(serve, tmp_path, workdir, images, mountcall)


@pytest.mark.parametrize("kind", ["--oci-socket", "--lxc-socket", "--control-socket"])
def test_a_socket_in_a_directory_others_may_write_is_refused(tmp_path: Path, kind: str) -> None:
    """Someone who may write the socket's directory could swap the socket file for one of
    their own: serve refuses to listen there, with a sentence, and starts nothing."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    policy = write_policy(tmp_path / "p.yaml", [])
    argv = [*oci.mountwarden_argv(), "serve", "--policy", str(policy), "--oci-socket", str(tmp_path / "oci.sock"),
            kind, str(shared / "s.sock")]  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run
    assert "must be root's and writable by root alone" in run.stderr, run.stderr
    assert not (shared / "s.sock").exists() and not (tmp_path / "oci.sock").exists()


def test_a_second_serve_on_a_live_socket_is_refused_and_a_stale_one_replaced(tmp_path: Path) -> None:
    """Two daemons on one socket would each serve some runtimes: the second is refused while
    the first listens; once it is killed, its socket file is stale and the next one takes it."""
    policy = write_policy(tmp_path / "p.yaml", [])
    with oci.serving(tmp_path, policy, control=tmp_path / "control.sock") as first:
        argv = [*oci.mountwarden_argv(), "serve", "--policy", str(policy), "--oci-socket", str(tmp_path / "b.sock"),
                "--control-socket", str(tmp_path / "control.sock")]  # fmt: skip
        second = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "another mountwarden serve listens" in second.stderr, second
        first.proc.kill()
        first.proc.wait()
    assert (tmp_path / "control.sock").exists()  # left by the killed daemon
    (tmp_path / "again").mkdir()
    with oci.serving(tmp_path / "again", policy, control=tmp_path / "control.sock"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            probe.connect(str(tmp_path / "control.sock"))
