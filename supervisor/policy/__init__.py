"""Which mounts a container may have: policy files, loaded once and evaluated per request.

Only these names are public; the dispatcher needs nothing else, which keeps the schema and
the glob translation free to change. `learn.suggest` writes a policy from observed requests.
"""

from __future__ import annotations

from . import learn
from .loader import PolicyError, load_policy, reload_policy
from .matcher import ContainerInfo, Decision, Explanation, MountRequest, Policy, SourceOrigin, Step
from .schema import Rule

__all__ = [
    "ContainerInfo",
    "Decision",
    "Explanation",
    "MountRequest",
    "Policy",
    "PolicyError",
    "Rule",
    "SourceOrigin",
    "Step",
    "learn",
    "load_policy",
    "reload_policy",
]
