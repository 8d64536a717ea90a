"""What every benchmark shares: the machine header and a median/p90 timer.

Machines of this kind differ (AVX-512 or only AVX2: up to 1.5x on the encoder;
bf16 without native support is ~5x slower), so every table starts with the
CPU's capability, the thread count and the device: compare ratios measured in
one run, not absolute numbers across runs.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(device: torch.device | str = "cpu") -> str:
    """One line: device, torch, threads, CPU model, vector capability, native bf16."""
    from compress import device_label
    from compress.encoder import cpu_bf16_native, cpu_capability

    device = torch.device(device)
    return (f"device: {device_label(device)}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; CPU: {cpu_model()}, capability {cpu_capability()}, "
            f"native bf16 {'yes' if cpu_bf16_native() else 'no'}")


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(fn: Callable[[], object], repeat: int, sync: Callable[[], None] = lambda: None,
          warmup: int = 1, setup: Callable[[], object] | None = None) -> tuple[float, float]:
    """(median ms, p90 ms) of ``repeat`` calls of ``fn`` after ``warmup`` calls; ``setup`` runs
    before each call, untimed (e.g. forget what an encoding kept, to time a first call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]
