#!/usr/bin/env bash
# Installs what mountwarden's demo and tests need on Debian 12, as root: Debian packages and a
# venv in .venv. Idempotent and quiet when everything is already there. Sourced by demo.sh/test.sh.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

packages=(
  python3 python3-venv libseccomp2 util-linux e2fsprogs squashfs-tools erofs-utils busybox-static
  gcc gcc-multilib libc6-dev libcap-dev dosfstools xfsprogs btrfs-progs genisoimage f2fs-tools fuse2fs squashfuse fuse3 procps
  fusefat fuseiso udftools mtools
  runc crun lxc podman uidmap
)
if [ "$(id -u)" -ne 0 ]; then
  echo "mountwarden set-up must run as root (the supervisor mounts for containers)" >&2
  exit 1
fi
# With uidmap installed (rootless podman's newuidmap), LXC maps ids with newuidmap even for root,
# which then needs the range of the tests' LXC containers in /etc/subuid and /etc/subgid.
for table in /etc/subuid /etc/subgid; do
  grep -qx 'root:100000:65536' "$table" 2>/dev/null || echo 'root:100000:65536' >>"$table"
done
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
modprobe loop 2>/dev/null || true

venv="$repo/.venv"
stamp="$venv/.installed-$(sha256sum "$repo/pyproject.toml" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  echo "creating $venv" >&2
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q -e "$repo[test]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
