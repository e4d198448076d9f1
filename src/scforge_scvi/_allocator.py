"""Keep freed CPU memory in the process heap, so that large tensors do not page-fault.

glibc's ``malloc`` serves every block above 32 MiB with a fresh ``mmap`` and returns it to the
kernel on ``free``. A training step of a transformer allocates and frees many activations of
that size (a 32 x 1,025 x 1,024 feed-forward activation is 134 MB), so every step faults
in and zeroes gigabytes of new pages (the cost is measured in
``docs/benchmarks_throughput.md``). :func:`tune_cpu_allocator` tells glibc to serve
large blocks from its heap and to keep up to 2 GiB of freed heap memory, so later steps
reuse the same pages. The process keeps its peak memory reserved while it runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_state = {"tuned": False}


def tune_cpu_allocator() -> bool:
    """Make glibc reuse freed memory for large CPU tensors (Linux only, process-wide).

    Called by :meth:`ScForge.train` and by inference on the CPU (so by every ``scforge``
    command); calling it again does nothing. Set the environment variable ``SCFORGE_TUNE_MALLOC=0`` to leave the
    allocator alone.

    Returns
    -------
    Whether the allocator settings are now in place.
    """
    if _state["tuned"]:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("SCFORGE_TUNE_MALLOC") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no such tunables)
    except (OSError, AttributeError):
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _state["tuned"] = ok
    return ok
