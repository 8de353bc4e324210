"""The notification structs match what this kernel reports."""

from supervisor.seccomp import notify


def test_struct_sizes_match_kernel() -> None:
    assert (notify.NOTIF.size, notify.RESP.size, notify.ADDFD.size) == (80, 24, 24)
    notify.check_sizes()


def test_response_constructors_pack_kernel_layout() -> None:
    assert notify.RESP.unpack(notify.Response.errno(7, 1).pack()) == (7, 0, -1, 0)
    assert notify.RESP.unpack(notify.Response.continue_(7).pack()) == (7, 0, 0, 1)
    assert notify.RESP.unpack(notify.Response.success(7, 3).pack()) == (7, 3, 0, 0)
