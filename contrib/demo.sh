#!/usr/bin/env bash
# Set up, build small ext4/squashfs/erofs images, and have an unprivileged container mount each
# with a plain `mount -o loop` through the supervisor and its private loop devices. The audit
# lines show every decision.
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
  echo "== mountwarden run -- sh -c 'mount -o loop,ro $image /mnt; ...'   (container root = an unprivileged host uid)"
  "$repo/.venv/bin/mountwarden" run --name demo --policy "$repo/policies/examples/images.yaml" \
    --audit-log "$demo/audit.log" -- /bin/sh -c "
      id -u; ls -l /dev/loop-control /dev/loop0
      mount -o loop,ro $image /mnt && cat /mnt/hello.txt
      losetup -a
      grep ' /mnt ' /proc/self/mountinfo
      umount /mnt && echo unmounted; losetup -a | wc -l"
done
echo
echo "== the same image through mount(2) directly (no loop set-up by the program):"
"$repo/.venv/bin/mountwarden" run --name demo --policy "$repo/policies/examples/images.yaml" \
  --audit-log "$demo/audit.log" -- /usr/bin/python3 "$demo/mount_image.py" /srv/img/data.ext4 /mnt
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
