"""Peak memory of a step of the benchmark (CUDA allocator statistics, or the process's
resident memory sampled by a thread), and the synchronisation that makes timings honest."""

from __future__ import annotations

import os
import sys
import threading
import tracemalloc

import torch


def _release_free_memory():
    """Give memory that is free inside the process back to the OS before a measurement.

    glibc keeps freed blocks for reuse, so a step could run in memory freed by an earlier
    one without the resident set size growing. ``gc.collect()`` followed by
    ``malloc_trim(0)`` returns those free pages (the allocator's behaviour during the
    step is unchanged). Does nothing where glibc is not the allocator.
    """
    import gc

    gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _rss_bytes():
    """Anonymous resident memory of this process from /proc (Linux), or None.

    ``resident - shared`` of ``/proc/self/statm``: pages of data the process wrote,
    without the file-backed pages of libraries that a first call maps in.
    """
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _PeakMemory:
    """Peak memory used by a block, in bytes, above what was in use when it started.

    - CUDA (``device`` on a GPU): ``torch.cuda.max_memory_allocated`` after a reset of the
      peak statistics, minus the memory allocated at the start.
    - CPU on Linux: the process's anonymous resident memory (``resident - shared`` of
      ``/proc/self/statm``), read by a background thread every millisecond and once more
      at the end, minus its value at the start. This counts everything the step writes
      (torch tensors, NumPy arrays, Python objects), not library code it maps in;
      allocations living less than a millisecond can be missed. Free memory the process still
      holds from earlier steps is first returned to the OS (:func:`_release_free_memory`),
      so that reusing it inside the block shows up in the RSS.
    - CPU elsewhere: ``tracemalloc``'s peak (Python and NumPy allocations only; torch
      tensors are not seen).
    """

    def __init__(self, device=None):  # a torch.device or None (CPU)
        self.device = device
        self.peak = 0

    def __enter__(self):
        self._cuda = self.device is not None and self.device.type == "cuda"
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_memory()
        self._start = _rss_bytes()
        if self._start is None:
            tracemalloc.start()
            return self
        self._sampled = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            rss = _rss_bytes()
            if rss is not None and rss > self._sampled:
                self._sampled = rss

    def __exit__(self, *exc):
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return False
        if self._start is None:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            self.peak = peak
            return False
        self._stop.set()
        self._thread.join()
        peak = max(self._sampled, _rss_bytes() or 0)
        self.peak = max(0, peak - self._start)
        return False



def _sync(device):
    """Wait for the kernels queued on ``device`` (CUDA) before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

