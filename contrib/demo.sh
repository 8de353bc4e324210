#!/usr/bin/env bash
# Set up, build small ext4/squashfs/erofs images, and have an unprivileged container mount and
# read each through the supervisor. The audit lines show every decision.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/contrib/setup.sh"

demo=$(mktemp -d /tmp/mountwarden-demo.XXXXXX)
trap 'rm -rf "$demo"' EXIT
chmod 755 "$demo"
mkdir -p "$demo/content" /srv/img /mnt
echo "hello from inside a disk image" > "$demo/content/hello.txt"
mkfs.ext4 -q -F -d "$demo/content" /srv/img/data.ext4 4M
mksquashfs "$demo/content" /srv/img/data.squashfs -quiet -noappend >/dev/null
mkfs.erofs --quiet /srv/img/data.erofs "$demo/content"
chmod 644 /srv/img/data.*
install -m 644 "$repo/contrib/examples/mount_image.py" "$demo/mount_image.py"

for image in /srv/img/data.ext4 /srv/img/data.squashfs /srv/img/data.erofs; do
  echo
  echo "== mountwarden run -- mount_image.py $image /mnt   (container root is host uid $(awk -F: '$1=="mountwarden"{print $2}' /etc/subuid 2>/dev/null || echo 100000))"
  "$repo/.venv/bin/mountwarden" run --name demo --policy "$repo/policies/examples/images.yaml" \
    --audit-log "$demo/audit.log" -- /usr/bin/python3 "$demo/mount_image.py" "$image" /mnt
done
echo
echo "== a mount the policy does not allow (the target /tmp is outside /mnt/**):"
"$repo/.venv/bin/mountwarden" run --name demo --policy "$repo/policies/examples/images.yaml" \
  --audit-log "$demo/audit.log" -- /usr/bin/python3 "$demo/mount_image.py" /srv/img/data.ext4 /tmp || true
echo
echo "== audit records (one JSON line per decision):"
cat "$demo/audit.log"
echo
echo "== host loop devices left behind (expect none):"
losetup -a
