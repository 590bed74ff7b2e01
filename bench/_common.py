"""What every benchmark here shares: timing with a warm-up, and peak resident memory of a process.

Imported by the scripts of this folder as ``from _common import ...`` (each script runs as
``python bench/<name>.py``, so this folder is on ``sys.path``, also in spawned children).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def timed(fn: Callable[[], object], reps: int, device: str) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after one warm-up call (CUDA synchronised)."""

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def run_in_child(target: Callable[..., None], *args: object) -> Any:
    """``target(*args, queue)`` in a fresh spawned process; returns what it put on the queue.

    Each measurement gets its own process, so its resident memory is its own.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def resident_mib() -> float:
    """Resident memory of this process now, MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def anonymous_mib() -> float:
    """Resident anonymous memory (``RssAnon``: heap and tensors, not file pages mapped from
    safetensors, which the kernel can drop), MiB; 0 where ``/proc/self/status`` lacks it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakSampler:
    """Samples this process's resident memory every 2 ms in a thread; ``extra`` = peak − start.

    (``ru_maxrss`` cannot be used: a spawned child inherits its parent's high-water mark.)
    """

    def __init__(self) -> None:
        self.start = resident_mib()
        self.peak = self.start
        self.anon_start = anonymous_mib()
        self.anon_peak = self.anon_start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_mib())
            self.anon_peak = max(self.anon_peak, anonymous_mib())
            time.sleep(0.002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_mib())

    @property
    def extra(self) -> float:
        return self.peak - self.start

    @property
    def anon_extra(self) -> float:
        """Peak − start of the anonymous part alone."""
        return self.anon_peak - self.anon_start
