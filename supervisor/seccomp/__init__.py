"""The seccomp side of mountwarden: the filter the container loads and the listener ABI."""
