"""Dense Gaussian / Rademacher projections, generated once and applied by one matmul."""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

import math

import torch

from ._base import (
    _DEFAULT_MAX_DENSE_BYTES,
    _BaseProjector,
    _compute_dtype,
    _itemsize,
    _work_bytes,
)
from ._random import _CHUNK, _counter_grid, _hash_grid_

_TWO_PI_2M32 = 2.0 * math.pi * 2.0**-32


def _fill_dense_(out, key, proj_type, first_row):
    """Write rows ``first_row, ...`` of the projection matrix into ``out`` (m, k).

    Entry ``(i, j)`` is a function of ``key``, ``i`` and ``j`` only:

    - ``"rademacher"``: the sign bit of ``hash(i * k + j)``, times ``1/sqrt(k)``;
    - ``"gaussian"``: Box-Muller on ``z = hash(i * ceil(k/2) + j // 2)``, with
      ``u1 = (z >>> 32 + 1) 2**-32`` (in ``(0, 1]``) and ``theta = 2 pi (z & (2**32 -
      1)) 2**-32``; even columns get ``sqrt(-2 log u1) cos(theta) / sqrt(k)``, odd
      columns the matching ``sin``.

    The work goes in chunks of about ``_CHUNK`` hashes through a few reused
    buffers (no temporary per operation), so generation runs at memory speed and
    the matrix is the same whatever ``out``'s size and the chunking.
    """
    m, k = out.shape
    dev, cdtype = out.device, _compute_dtype(out.dtype)
    scale = 1.0 / math.sqrt(k)
    gaussian = proj_type == "gaussian"
    width = (k + 1) // 2 if gaussian else k
    step = max(1, _CHUNK // width)
    grid = _counter_grid(min(step, m), width, dev)
    z = torch.empty_like(grid)
    t = torch.empty_like(z)
    if gaussian:
        radius = torch.empty(z.shape, dtype=cdtype, device=dev)
        theta, wave = torch.empty_like(radius), torch.empty_like(radius)
    for r0 in range(0, m, step):
        h = min(step, m - r0)
        zc, tc, dst = z[:h], t[:h], out[r0 : r0 + h]
        _hash_grid_(zc, tc, grid[:h], (first_row + r0) * width, key)
        if not gaussian:
            # top bit -> sign: (z >> 63) is -1 or 0; | 1 gives -1 or +1
            torch.bitwise_right_shift(zc, 63, out=tc).bitwise_or_(1)
            dst.copy_(tc).mul_(scale)
            continue
        rc, th, wv = radius[:h], theta[:h], wave[:h]
        torch.bitwise_right_shift(zc, 32, out=tc).bitwise_and_(0xFFFFFFFF)
        rc.copy_(tc).add_(1.0).mul_(2.0**-32)  # u1 in (0, 1]
        rc.log_().mul_(-2.0).sqrt_().mul_(scale)
        torch.bitwise_and(zc, 0xFFFFFFFF, out=tc)
        th.copy_(tc).mul_(_TWO_PI_2M32)
        dst[:, 0::2].copy_(torch.cos(th, out=wv).mul_(rc))
        dst[:, 1::2].copy_(torch.sin(th, out=wv).mul_(rc)[:, : k // 2])
    return out


class DenseProjector(_BaseProjector):
    """Dense Gaussian or Rademacher projection ``G @ R`` with ``R`` of shape (p, k).

    Entries of ``R`` are N(0, 1/k) (``"gaussian"``) or +-1/sqrt(k) with equal
    probability (``"rademacher"``), so ``E[R @ R.T] = I`` and inner products are
    preserved in expectation. When ``p * k * itemsize <= max_dense_bytes``, ``R``
    is generated once (on the first call, in one vectorised pass) and kept on
    the device; every call is then one matrix product ``G @ R``, at the speed of
    the BLAS. Above the budget, ``R`` is never held whole: each call regenerates
    it block by block of input coordinates (each block in one vectorised pass)
    and accumulates ``G[:, block] @ R[block]``. Both modes use the same matrix,
    bitwise. Use :func:`make_projector`.

    Parameters
    ----------
    n_features : int
        Input dimension ``p``.
    proj_dim : int
        Output dimension ``k``.
    proj_type : {"gaussian", "rademacher"}, default="gaussian"
    random_state : int, RandomState instance, Generator or None, default=None
    device : str or torch.device, default="cpu"
    dtype : torch.dtype, default=torch.float32
    max_dense_bytes : int, default=2**32
        Largest matrix (bytes) that is cached.

    Attributes
    ----------
    seed_ : int
        The seed the matrix is a function of.
    cached : bool
        Whether the whole matrix is (or will be) held on the device.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.projection import DenseProjector
    >>> P = DenseProjector(500, 16, random_state=0, dtype=torch.float64)
    >>> G = torch.randn(4, 500, dtype=torch.float64)
    >>> P(G).shape
    torch.Size([4, 16])
    >>> bool(torch.allclose(P(G), G @ P.matrix()))
    True
    """

    _cache_attrs = ("_matrix",)

    def __init__(
        self,
        n_features,
        proj_dim,
        *,
        proj_type="gaussian",
        random_state=None,
        device="cpu",
        dtype=torch.float32,
        max_dense_bytes=_DEFAULT_MAX_DENSE_BYTES,
    ):
        if proj_type not in ("gaussian", "rademacher"):
            raise ValueError(
                f"DenseProjector proj_type must be 'gaussian' or 'rademacher', got {proj_type!r}."
            )
        super().__init__(n_features, proj_dim, proj_type, random_state, device, dtype)
        self.max_dense_bytes = max_dense_bytes

    @property
    def cached(self):
        """Whether the whole matrix is (or will be) held on the device."""
        return self.n_features * self.proj_dim * _itemsize(self.dtype) <= self.max_dense_bytes

    def _block_rows(self):
        """Rows of ``R`` generated at once on the uncached path (working-memory budget)."""
        rows = _work_bytes() // (_itemsize(self.dtype) * self.proj_dim)
        return int(max(1, min(rows, self.n_features)))

    def _rows(self, start, stop):
        """Rows ``start:stop`` of ``R``, shape (stop - start, proj_dim)."""
        out = torch.empty(stop - start, self.proj_dim, dtype=self.dtype, device=self.device)
        return _fill_dense_(out, self._key, self.proj_type, start)

    def _build_matrix(self):
        return self._rows(0, self.n_features)

    def matrix(self):
        """The projection matrix ``R``, shape (n_features, proj_dim).

        The cached one when the projector caches, else a freshly generated copy.
        """
        if not self.cached:
            return self._build_matrix()
        if self._matrix is None:
            self._matrix = self._build_matrix()
        return self._matrix

    def __call__(self, G):
        """Project the rows of ``G``: (n, n_features) -> (n, out_dim)."""
        G = self._check_input(G)
        if self.cached:
            return G @ self.matrix()
        out = torch.zeros(G.shape[0], self.proj_dim, dtype=self.dtype, device=self.device)
        step = self._block_rows()
        block = torch.empty(step, self.proj_dim, dtype=self.dtype, device=self.device)
        for start in range(0, self.n_features, step):
            stop = min(start + step, self.n_features)
            rows = _fill_dense_(block[: stop - start], self._key, self.proj_type, start)
            out.addmm_(G[:, start:stop], rows)
        return out
