"""contrib/k8s/: the manifests against the Kubernetes schemas, the fields that make them work, the
shipped seccomp profile against the generator, the fleet policy, and the DaemonSet's SIGHUP wrapper.

No cluster runs here. The schemas are those kubernetes-validate ships (offline); without it the
schema test skips and the field checks still run.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, mountwarden, read_audit

K8S = REPO / "contrib" / "k8s"
SCHEMA_VERSION = "1.33.0"  # hostUsers (user namespaces) is on by default from 1.33
SECCOMP_ROOT = "/var/lib/kubelet/seccomp"


def manifests() -> dict[str, dict[str, Any]]:
    """Every document in contrib/k8s/*.yaml, by kind."""
    docs = [d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), kinds
    return {d["kind"]: d for d in docs}


def test_the_manifests_validate_against_the_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for doc in manifests().values():
        kv.validate(doc, SCHEMA_VERSION, strict=True)  # raises on any error, unknown fields included
    broken = copy.deepcopy(manifests()["DaemonSet"])
    broken["spec"]["template"]["spec"]["hostPID"] = "yes"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, SCHEMA_VERSION, strict=True)


def test_the_daemonset_runs_serve_privileged_in_the_hosts_pid_namespace_on_the_node_socket() -> None:
    docs = manifests()
    ds = docs["DaemonSet"]
    assert (ds["apiVersion"], docs["Namespace"]["metadata"]["name"]) == ("apps/v1", ds["metadata"]["namespace"])
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    [serve] = pod["containers"]
    assert serve["securityContext"]["privileged"] is True
    assert "mountwarden serve --policy /etc/mountwarden/ --oci-socket /run/mountwarden/oci.sock" in serve["command"][2]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in serve["volumeMounts"]}
    assert set(mounts.values()) == set(volumes), "every volume mounted, every mount a volume"
    for path in ("/run/mountwarden", "/sys/fs/cgroup", "/dev"):
        assert volumes[mounts[path]]["hostPath"]["path"] == path
    assert volumes[mounts["/etc/mountwarden"]]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert docs["ConfigMap"]["metadata"]["namespace"] == ds["metadata"]["namespace"]


def test_the_example_pod_uses_the_localhost_profile_whose_listener_is_the_node_socket() -> None:
    pod = manifests()["Pod"]
    [container] = pod["spec"]["containers"]
    profile = container["securityContext"]["seccompProfile"]
    assert profile["type"] == "Localhost"
    assert profile["localhostProfile"] == "mountwarden/runc.json"  # installed as SECCOMP_ROOT/mountwarden/runc.json
    assert "SYS_ADMIN" in container["securityContext"]["capabilities"]["add"]
    assert pod["spec"]["hostUsers"] is False
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} == volumes
    shipped = json.loads((K8S / "mountwarden-runc.json").read_text())
    assert shipped["listenerPath"] == "/run/mountwarden/oci.sock"
    generated = subprocess.run(
        mountwarden("profile", "oci", "--runtime", "runc", "--listener-path", "/run/mountwarden/oci.sock"),
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert shipped == json.loads(generated), "regenerate contrib/k8s/mountwarden-runc.json (docs/kubernetes.md)"


def test_the_fleet_policy_in_the_configmap_is_valid(tmp_path: Path) -> None:
    for name, text in manifests()["ConfigMap"]["data"].items():
        (tmp_path / name).write_text(text)
    done = subprocess.run(mountwarden("policy", "check", str(tmp_path)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _configmap_volume(directory: Path, generation: str, policy: str) -> None:
    """Lay out `directory` as the kubelet does a ConfigMap volume: files are links through ..data,
    which is swapped atomically to a new timestamped directory on every update."""
    data = directory / f"..{generation}"
    data.mkdir()
    (data / "policy.yaml").write_text(policy)
    link = directory / "..data_tmp"
    link.symlink_to(data.name)
    link.rename(directory / "..data")
    if not (directory / "policy.yaml").is_symlink():
        (directory / "policy.yaml").symlink_to("..data/policy.yaml")


def test_the_daemonsets_wrapper_sends_sighup_when_the_configmap_changes_and_passes_sigterm_on(tmp_path: Path) -> None:
    """The DaemonSet's shell wrapper, run here with the node's paths moved into tmp_path."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the wrapper starts serve, which runs as root")
    etc, run = tmp_path / "etc", tmp_path / "run"
    etc.mkdir()
    policy = manifests()["ConfigMap"]["data"]["policy.yaml"]
    _configmap_volume(etc, "2026_01_01", policy)
    [serve] = manifests()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    script = serve["command"][2].replace("/etc/mountwarden", str(etc)).replace("/run/mountwarden", str(run))
    script = script.replace("sleep 10", "sleep 0.2")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mountwarden").write_text(f'#!/bin/sh\nexec {" ".join(mountwarden())} "$@"\n')
    (bindir / "mountwarden").chmod(0o755)
    log = tmp_path / "serve.log"
    env = {"PATH": f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        wrapper = subprocess.Popen(["/bin/sh", "-c", script], env=env, stdout=out, stderr=out, start_new_session=True)
    try:
        _wait(log, "serve-ready")
        assert not _events(log, "policy-reloaded")
        _configmap_volume(etc, "2026_01_02", policy.replace("name: no-other-mounts", "name: nothing-else"))
        _wait(log, "policy-reloaded")
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=30) == 0, log.read_text()
        assert _events(log, "serve-stopping")
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)  # the wrapper and its serve
            wrapper.wait()


def _events(log: Path, event: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(log) if r.get("event") == event]


def _wait(log: Path, event: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not _events(log, event):
        assert time.monotonic() < deadline, f"no {event}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
