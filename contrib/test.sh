#!/usr/bin/env bash
# Set up (packages, venv) and run the whole test suite on the real kernel, as root.
# Loop devices, mounts and device cgroups are global to the machine, and every test checks that
# it leaked none of them: one suite at a time, so a second run waits for the first here.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/contrib/setup.sh"
cd "$repo"
exec flock /run/lock/mountwarden-tests.lock "$repo/.venv/bin/python" -m pytest "$@"
