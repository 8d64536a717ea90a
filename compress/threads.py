"""The calling thread's torch thread count, set for a block and put back after it.

Torch keeps the count per thread (OpenMP and MKL read the calling thread's
setting), so one request, sweep or measurement can use more or fewer threads
than the others running beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None = None) -> Iterator[None]:
    """Within the block the calling thread runs torch on ``n`` threads (None: as it is, and the
    block may change it); after the block, on the count it had before."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
