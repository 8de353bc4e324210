"""One module per intercepted system call family; `supervisor.registry` maps calls to them."""
