"""Images pinned by digest: hashed while copied into a sealed memfd, which is what the kernel mounts.

The sha256 is taken while the image's bytes are copied into a sealed memfd (no writes, no
growing or shrinking), and the kernel mounts that copy, read-only, from a loop device of the
container's pool bound to it. So what the kernel reads is what was hashed, whatever the
container writes to the file (or to the loop device it bound) afterwards. The copy costs
memory up to the image's size, so the digest is taken only when some digest rule could take
the image and it is no larger than the largest `size.max` of those rules; an image above it is
refused as unmatched at once, however long a sparse file claims to be.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from typing import Final

from .call import Call
from .policy import Decision, MountRequest, Policy

_SEALS: Final = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def pinned_copy(call: Call, fd: int, request: MountRequest) -> tuple[int, str] | None:
    """A sealed memfd copy of the image and its sha256, when a digest rule could accept it."""
    policy, size = call.session.policy, request.size or 0
    if not policy.needs_digest:
        return None
    if not policy.digest_could_match(request):
        call.audit["sha256"] = "not computed: no digest rule could match this image whatever its digest"
        return None
    bound = digest_bound(policy)
    if size > bound:
        call.audit["sha256"] = f"not computed: the image is larger than any digest rule allows ({bound} bytes)"
        return None
    return sealed_copy(fd, size)


def digest_bound(policy: Policy) -> int:
    """The largest image some digest rule could match: its size.max, or the policy's digest_max_size."""
    bounds = []
    for rule in policy.rules:
        match = rule.match
        if match is not None and match.sha256 is not None:
            own = match.size.max if match.size is not None else None
            bounds.append(min(own, policy.limits.digest_max_size) if own is not None else policy.limits.digest_max_size)
    return max(bounds, default=0)


def pins_digest(policy: Policy, decision: Decision) -> bool:
    rule = next((r for r in policy.rules if r.name == decision.rule), None)
    return rule is not None and rule.match is not None and rule.match.sha256 is not None


def sealed_copy(fd: int, size: int, chunk: int = 1 << 20) -> tuple[int, str]:
    """Copy the first `size` bytes behind `fd` into a memfd, hashing them; seal it against change."""
    h = hashlib.sha256()
    copy = os.memfd_create("mountwarden-pinned-image", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        offset = 0
        while offset < size and (data := os.pread(fd, min(chunk, size - offset), offset)):
            h.update(data)
            view = memoryview(data)
            while view:
                view = view[os.pwrite(copy, view, offset + len(data) - len(view)) :]
            offset += len(data)
        fcntl.fcntl(copy, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(copy)
        raise
    return copy, h.hexdigest()
