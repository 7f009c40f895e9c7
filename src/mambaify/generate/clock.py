"""Time between marks on the device's timeline, for the benchmarks and the speculative engine's
round timings."""

from __future__ import annotations

import time

import torch


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU (no host sync inside a timed region),
    time.perf_counter on the CPU (eager CPU calls are synchronous). ``seconds`` waits for the end
    mark, so call it after the region; on marks already passed it returns at once."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3
