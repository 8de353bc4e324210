#!/usr/bin/env bash
# Set up (packages, venv) and run the whole test suite on the real kernel, as root.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/contrib/setup.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest "$@"
