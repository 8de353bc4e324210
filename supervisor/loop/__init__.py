"""Host loop devices, attached carefully and always with autoclear."""

from .device import LoopDevice, attach, wait_detached

__all__ = ["LoopDevice", "attach", "wait_detached"]
