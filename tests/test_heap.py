"""kd.pipeline.capture.heap: stage one fixes glibc's mmap threshold unless the user already chose one."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from kd.pipeline.capture.heap import fix_mmap_threshold


def glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not glibc(), reason="glibc only")
def test_large_blocks_go_back_to_the_kernel_once_fixed():
    """With the dynamic threshold, freeing a 16 MiB mmapped block raises the threshold to 16 MiB and a later
    8 MiB block comes from the heap; with the threshold fixed at 1 MiB it is mmapped, so `mallinfo2`
    reports it as mmapped memory (hblkhd) rather than heap arena."""
    script = """
import ctypes, sys
from kd.pipeline.capture.heap import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc.mallinfo2.restype = Info
libc.free(libc.malloc(16 << 20))
block = libc.malloc(8 << 20)
print(libc.mallinfo2().hblkhd >= 8 << 20)
"""
    outputs = {}
    for mode in ("dynamic", "fixed"):
        proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        outputs[mode] = proc.stdout.strip()
    assert outputs == {"dynamic": "False", "fixed": "True"}


def test_a_threshold_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False
