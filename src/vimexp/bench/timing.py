"""The one timing loop of every benchmark, and the GPU spin-up before it.

Protocol: `warmup` untimed calls, then `repeats` timings of `iters` calls each, CUDA events on a GPU (synchronised
before and after) and the wall clock on the CPU; a benchmark reports the median of the repeats.
"""
import statistics
import time

import torch


def spin_up(device: torch.device, seconds: float) -> None:
    """Keep the GPU busy for `seconds` before the first timing. A GPU left idle sits at its lowest clocks: on the
    H200 the configuration timed first in a call came out 11% slower than the same one timed later, and sweeps
    ranked the block timed first near the bottom. (It doesn't cure every slow first run: docs/optimisation.md,
    step 17.)"""
    if device.type != "cuda" or seconds <= 0:
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize(device)


def seconds_per_call(step, device: torch.device, warmup: int, repeats: int, iters: int) -> list[float]:
    """Seconds per call of `step`, one value per repeat (each the mean over `iters` calls)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            times.append((time.perf_counter() - t0) / iters)
    return times


def median_ms(step, device: torch.device, warmup: int, repeats: int, iters: int = 1) -> float:
    """The median over the repeats of seconds_per_call, in milliseconds."""
    return statistics.median(seconds_per_call(step, device, warmup, repeats, iters)) * 1e3
