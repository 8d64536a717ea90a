"""Keep freed memory in the process, so that a forward does not page-fault its buffers back.

glibc's malloc serves a large request (over 128 KiB, a threshold it raises as
such blocks are freed) from fresh pages of the system, and gives the top of
its heap back to the system when more than a threshold lies free there. A
forward allocates and frees the same few-MB activations in every block, so
each encode keeps handing pages back and faulting them in again: 1-20
thousand page faults per encode, 3-9 % of its time (``bench/bench_allocator.py``).
Setting the thresholds high stops it: the pages stay mapped and are reused.
In a process that encodes on one thread the peak memory does not grow (the
same blocks are reused, ``bench/bench_allocator.py`` prints it); freed
memory goes back to the system only when more than ``trim_threshold`` lies
free at the top of a heap, and a worker thread's 64 MB heap is not unmapped
when it empties (``top_pad``).

Not in the app by default: there Gradio runs requests on a pool of threads,
each with its own malloc arena, and every arena would keep its own peak; under
sixteen sessions (``bench/load_test.py``) the server's memory grew to 2004 MiB
and was still rising after 60 s, against 1814 MiB levelling off as glibc is,
for no upload or slider time one person alone could measure
(``bench/bench_alone.py --against allocator``). ``TCE_KEEP_FREED=1`` turns it on.

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


def keep_freed_memory(default: bool = True, mmap_threshold: int = MMAP_THRESHOLD,
                      trim_threshold: int = TRIM_THRESHOLD, top_pad: int = TOP_PAD) -> bool:
    """Ask glibc to keep freed memory (see the module text); True when the settings took.

    ``TCE_KEEP_FREED=1`` or ``0`` in the environment turns it on or off whatever the caller's
    ``default`` (on for a process that encodes on one thread, as a sweep actor; off for the
    app). Safe to call more than once; threads started later use the same settings (they are
    process-wide).
    """
    global _applied
    flag = os.environ.get("TCE_KEEP_FREED", "")
    if flag == "0" or (flag != "1" and not default):
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
