"""Peak memory of a stretch of work, for benchmarks: CUDA allocator stats, or the process RSS sampled every 2 ms."""

from __future__ import annotations

import threading
import time

import torch


class PeakMemory:
    """Peak memory above the level at ``start()``.

    On CPU, RSS is sampled only while active: from ``start()`` (unless ``sampling=False``) and between
    ``resume()`` and ``pause()``, so a worker that waits for others (peer_alignprop.py) counts its own steps only.
    """

    def __init__(self, device: str) -> None:
        self.device, self.peak, self.base = device, 0, 0
        self._active = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def start(self, sampling: bool = True) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        self.base = self.peak = self._rss()

        def poll() -> None:
            while self._active.wait():
                self.peak = max(self.peak, self._rss())
                time.sleep(0.002)

        threading.Thread(target=poll, daemon=True).start()
        if sampling:
            self.resume()

    def resume(self) -> None:
        self._active.set()

    def pause(self) -> None:
        if self.device != "cuda":
            self.peak = max(self.peak, self._rss())
        self._active.clear()

    def growth(self) -> int:
        """Bytes above the start level at the peak so far."""
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return self.peak - self.base

    def stop(self) -> int:
        self.pause()
        return self.growth()
