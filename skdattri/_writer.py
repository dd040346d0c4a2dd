"""Row blocks written to a file on a background thread (the disk store's writer)."""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

from concurrent.futures import ThreadPoolExecutor

import torch


def _bytes(tensor):
    """A flat byte view of a contiguous CPU tensor (any dtype, bfloat16 included)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class _BackgroundWriter:
    """Writes a file's row blocks on one background thread, one block at a time.

    :meth:`put` copies the block into a staging buffer (so the caller may reuse its
    tensor at once), waits until the previous block is written and returns while this
    one is: the next block is computed while the kernel copies this one into the page
    cache. Memory is two blocks. An error of a write is raised by the next
    :meth:`put` or by :meth:`close`.
    """

    def __init__(self, path):
        self._path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skdattri-store")
        self._future = None
        self._busy = self._spare = None  # flat staging buffers

    def put(self, offset, block):
        n = block.numel()
        spare = self._spare
        if spare is None or spare.dtype != block.dtype or spare.numel() < n:
            spare = torch.empty(n, dtype=block.dtype)
        staged = spare[:n].view(block.shape).copy_(block)
        self._wait()
        self._busy, self._spare = spare, self._busy
        self._future = self._pool.submit(self._write, offset, staged)

    def _write(self, offset, staged):
        view = _bytes(staged)
        with open(self._path, "r+b", buffering=0) as f:
            f.seek(offset)
            done = 0
            while done < len(view):
                done += f.write(view[done:])

    def _wait(self):
        future, self._future = self._future, None
        if future is not None:
            future.result()

    def close(self):
        """Wait for the last write (raising its error) and end the thread."""
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
            self._busy = self._spare = None
