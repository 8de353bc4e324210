"""mountwarden: a seccomp user-notification supervisor that mounts disk images for unprivileged containers."""

__version__ = "0.1.0"
