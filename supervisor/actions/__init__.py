"""The acting layer: what a handler decided, done (kernel mounts through the pool, FUSE handoffs)."""
