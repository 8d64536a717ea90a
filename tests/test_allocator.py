"""Keeping freed memory (compress/allocator.py): an encode stops page-faulting its buffers back.

Each case runs in a fresh Python (glibc's settings are process-wide and cannot be put back),
with the real bundled encoder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import json, resource, torch
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
from compress.allocator import keep_freed_memory
applied = keep_freed_memory()
again = keep_freed_memory()
from compress import Encoder
torch.set_num_threads(1)
enc = Encoder(device="cpu")
image = Image.open("assets/coffee.jpg").convert("RGB")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def encode(size):
    before = faults()
    enc.encode(image, size)
    return faults() - before
seen = [encode(size) for size in (336, 224, 448, 336, 224, 448, 336, 448)]
with ThreadPoolExecutor(1) as worker:  # the app encodes on worker threads
    seen += [worker.submit(encode, size).result() for size in (336, 448, 336, 448, 336, 448)]
print(json.dumps({"applied": applied, "again": again, "faults": seen}))
"""


def run(keep: bool) -> dict:
    env = dict(os.environ, TCE_KEEP_FREED="1" if keep else "0", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def after_warm_up(faults: list[int]) -> int:
    """Faults taken once every size has run: main-thread encodes 4-8, worker encodes 3-6."""
    return sum(faults[3:8]) + sum(faults[10:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_kept_memory_stops_the_encodes_faulting_pages_back_in():
    kept, plain = run(keep=True), run(keep=False)
    assert kept["applied"] and kept["again"]  # idempotent: the second call reports the same
    assert not plain["applied"] and not plain["again"]  # TCE_KEEP_FREED=0 leaves glibc as it is
    # glibc as it is hands the activations back and faults them in again on every encode (tens of
    # thousands of pages on this machine); kept, nearly all of them are reused
    assert after_warm_up(plain["faults"]) > 10_000, plain["faults"]
    assert after_warm_up(kept["faults"]) * 10 < after_warm_up(plain["faults"]), (kept, plain)


@pytest.mark.parametrize(("flag", "default", "expected"), [
    ("", False, False),  # the app as shipped: glibc as it is (its threads' arenas would each keep a peak)
    ("1", False, True),  # the app with TCE_KEEP_FREED=1
    ("", True, True),  # a sweep actor, the benchmarks
    ("0", True, False),  # ... with TCE_KEEP_FREED=0
])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_the_environment_decides_over_the_callers_default(flag, default, expected):
    env = dict(os.environ, TCE_KEEP_FREED=flag, PYTHONPATH=str(ROOT))
    code = f"from compress.allocator import keep_freed_memory; print(keep_freed_memory(default={default}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(expected)
