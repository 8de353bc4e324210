"""The wheel installs as `mountwarden`, next to supervisord's own `supervisor` package.

`supervisor` is supervisord's import package on PyPI and in Debian (python3-supervisor): a wheel
that installed ours under that name would break that service. This builds the wheel, installs
it into a fresh venv beside supervisord, and runs both.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO


def _run(*argv: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_wheel_installs_as_mountwarden_beside_supervisord(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, REPO)
    _run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels, "supervisor")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    # Our dependencies from the test venv (a path, not a site dir: its editable finder stays out).
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = venv / "bin" / "pip"
    _run(pip, "install", "-q", "--no-deps", "--no-index", *sorted(wheels.glob("*.whl")))
    files = _run(pip, "show", "-f", "mountwarden")
    assert "mountwarden/cli.py" in files and "supervisor/cli.py" not in files, files
    python = venv / "bin" / "python"
    where = _run(
        python, "-c", "import supervisor, mountwarden; print(supervisor.__file__, mountwarden.__file__)", cwd=tmp_path
    )
    theirs, ours = where.split()
    assert str(venv) in theirs and str(venv) in ours and "mountwarden" in ours, where
    assert '"listenerPath"' in _run(venv / "bin" / "mountwarden", "profile", "oci", cwd=tmp_path)
    assert _run(venv / "bin" / "supervisord", "--version", cwd=tmp_path).strip()
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"[supervisord]\nnodaemon=true\nlogfile={tmp_path}/sd.log\npidfile={tmp_path}/sd.pid\n"
                    f"[unix_http_server]\nfile={tmp_path}/sd.sock\n")  # fmt: skip
    realize = f"from supervisor.options import ServerOptions; ServerOptions().realize(['-c', '{conf}'])"
    _run(python, "-c", realize, cwd=tmp_path)  # supervisord reads its configuration with its own package
