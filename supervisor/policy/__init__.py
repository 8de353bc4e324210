"""Which mounts a container may have: policy files, loaded once and evaluated per request.

Only these names are public; the dispatcher needs nothing else, which keeps the schema and
the glob translation free to change.
"""

from __future__ import annotations

from .loader import PolicyError, load_policy
from .matcher import Decision, MountRequest, Policy
from .schema import Rule

__all__ = ["Decision", "MountRequest", "Policy", "PolicyError", "Rule", "load_policy"]
