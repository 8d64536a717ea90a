"""Keep freed memory in the process, so that a forward does not page-fault its buffers back.

glibc's malloc serves a large request (over 128 KiB, a threshold it raises as
such blocks are freed) from fresh pages of the system, and gives the top of
its heap back to the system when more than a threshold lies free there. A
forward allocates and frees the same few-MB activations in every block, so
each encode keeps handing pages back and faulting them in again: 1-20
thousand page faults per encode, 3-9 % of its time (``bench/bench_allocator.py``).
Setting the thresholds high stops it: the pages stay mapped and are reused.
The process's peak memory does not grow (the same blocks are reused); freed
memory goes back to the system only when more than ``trim_threshold`` lies
free at the top of a heap, and a worker thread's 64 MB heap is not unmapped
when it empties (``top_pad``).

glibc only: elsewhere (musl, macOS, Windows) nothing is changed. Setting
either threshold by hand turns glibc's own adjustment off, so both are set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit: larger blocks are mapped apart
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20  # a worker thread's arena (heaps of 64 MB) then never unmaps a whole free heap

_applied: bool | None = None


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD,
                      top_pad: int = TOP_PAD) -> bool:
    """Ask glibc to keep freed memory (see the module text); True when both settings took.

    Off when the environment says ``TCE_KEEP_FREED=0`` (to measure the difference). Safe to call
    more than once; threads started later use the same settings (they are process-wide).
    """
    global _applied
    if os.environ.get("TCE_KEEP_FREED", "1") == "0":
        return False
    if _applied is not None:
        return _applied
    _applied = False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
                    and mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1
                    and mallopt(M_TOP_PAD, int(top_pad)) == 1)
    return _applied
