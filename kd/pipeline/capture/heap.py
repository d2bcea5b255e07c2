"""A fixed mmap threshold for glibc's malloc, so long stage-one runs do not creep up in memory.

glibc serves allocations below its mmap threshold from a heap, and the threshold is dynamic: each
time a large mmapped block is freed it rises to that block's size (up to 32 MiB). Stage one then
allocates and frees blocks of ever-changing sizes (each batch's activations and logits chunk, each
window's teacher results) from a heap that fragments, and resident memory grows with the length of
the run, not with anything it holds: peak RSS 876 MB over 1/16 of GSM8K train but 1,167 MB over all
of it with a tiny teacher (MALLOC_ARENA_MAX=2: 1,130 MB, so not per-thread arenas). A fixed 1 MiB
threshold (what MALLOC_MMAP_THRESHOLD_ sets; fixing it also turns the adjustment off) hands every
large block back to the kernel when it is freed: 861 MB over all of it.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number (malloc.h)."""


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at `nbytes` for this process; False where it does not apply.

    A threshold the user set with MALLOC_MMAP_THRESHOLD_ is left alone; other C libraries (musl,
    macOS) have no such knob and are left alone too.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, nbytes) == 1
