"""Dense Gaussian / Rademacher projections, generated once and applied at BLAS speed.

A Gaussian matrix is held as it is (``p x k`` floats) and applied by one matmul. A
Rademacher matrix is held packed, one bit per entry (``p x k / 8`` bytes: 1.1 MB
instead of 35 MB for 17,226 x 512 float32), and applied chunk by chunk of rows: each
chunk is expanded into a small reused float buffer (a table look-up per byte) and
multiplied, ``out += G[:, a:b] @ R[a:b]``.
"""

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
from ._random import _CHUNK, _counter_grid, _hash_grid_, _split_bytes_

_TWO_PI_2M32 = 2.0 * math.pi * 2.0**-32

#: Size (bytes) of the float buffer into which packed Rademacher rows are expanded
#: before each matrix product: a few MB keep the product at BLAS speed on a CPU; a GPU
#: gets larger chunks (fewer kernel launches).
_EXPAND_BYTES = {"cpu": 2**20}
_EXPAND_BYTES_OTHER = 2**26


def _sign_words(k):
    """Number of 64-bit hashes per row of a Rademacher matrix with ``k`` columns."""
    return -(-k // 64)


def _sign_table(k, dtype, device):
    """The (256, 8) look-up table of byte ``v``: ``(1 - 2 * ((v >> t) & 1)) / sqrt(k)``."""
    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    return bits.to(_compute_dtype(dtype)).mul_(-2.0).add_(1.0).mul_(1.0 / math.sqrt(k)).to(dtype)


def _pack_rademacher_(out, key, first_row):
    """The packed sign bits of rows ``first_row, ...`` of a Rademacher matrix.

    ``out`` is uint8 of shape ``(m, 8 w)`` with ``w = ceil(k / 64)``: row ``i`` holds
    the bytes (least significant first) of ``hash(i * w + c)`` for ``c < w``, so
    entry ``(i, j)`` is bit ``j % 64`` of ``hash(i * w + j // 64)`` -- one hash per
    64 entries, a pure function of ``(key, i, j)``.
    """
    m, w = out.shape[0], out.shape[1] // 8
    step = max(1, _CHUNK // w)
    grid = _counter_grid(min(step, m), w, out.device)
    z, t = torch.empty_like(grid), torch.empty_like(grid)
    for r0 in range(0, m, step):
        h = min(step, m - r0)
        _hash_grid_(z[:h], t[:h], grid[:h], (first_row + r0) * w, key)
        _split_bytes_(out[r0 : r0 + h], z[:h], t[:h])
    return out


def _expand_signs_(out, packed, table, index):
    """Float entries of packed rows: ``out`` (r, 8 * packed.shape[1]), contiguous;
    ``index`` an int64 work buffer of ``packed``'s shape. Column ``j`` of ``out`` is
    ``table[byte j // 8, bit j % 8]``."""
    index.copy_(packed)
    torch.index_select(table, 0, index.view(-1), out=out.view(-1, 8))
    return out


def _fill_dense_(out, key, proj_type, first_row):
    """Write rows ``first_row, ...`` of the projection matrix into ``out`` (m, k).

    Entry ``(i, j)`` is a function of ``key``, ``i`` and ``j`` only:

    - ``"rademacher"``: ``(1 - 2 b) / sqrt(k)`` with ``b`` bit ``j % 64`` of
      ``hash(i * ceil(k/64) + j // 64)`` (:func:`_pack_rademacher_`);
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
    if proj_type == "rademacher":
        w = _sign_words(k)
        step = max(1, _CHUNK // w)
        packed = torch.empty(min(step, m), 8 * w, dtype=torch.uint8, device=dev)
        buf = torch.empty(packed.shape[0], 64 * w, dtype=out.dtype, device=dev)
        index = torch.empty(packed.shape, dtype=torch.int64, device=dev)
        table = _sign_table(k, out.dtype, dev)
        for r0 in range(0, m, step):
            h = min(step, m - r0)
            _pack_rademacher_(packed[:h], key, first_row + r0)
            _expand_signs_(buf[:h], packed[:h], table, index[:h])
            out[r0 : r0 + h].copy_(buf[:h, :k])
        return out
    scale = 1.0 / math.sqrt(k)
    width = (k + 1) // 2
    step = max(1, _CHUNK // width)
    grid = _counter_grid(min(step, m), width, dev)
    z = torch.empty_like(grid)
    t = torch.empty_like(z)
    radius = torch.empty(z.shape, dtype=cdtype, device=dev)
    theta, wave = torch.empty_like(radius), torch.empty_like(radius)
    for r0 in range(0, m, step):
        h = min(step, m - r0)
        zc, tc, dst = z[:h], t[:h], out[r0 : r0 + h]
        _hash_grid_(zc, tc, grid[:h], (first_row + r0) * width, key)
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
    preserved in expectation. When the stored form of ``R`` fits in
    ``max_dense_bytes`` -- ``p * k * itemsize`` bytes for Gaussian entries, ``p *
    ceil(k / 64) * 8`` (one bit per entry) for Rademacher ones -- it is generated
    once (on the first call, in one vectorised pass) and kept on the device. A
    Gaussian call is then one matrix product ``G @ R``; a Rademacher call expands
    the packed bits chunk by chunk of rows into a small reused float buffer and
    accumulates ``G[:, chunk] @ R[chunk]``, at the speed of the BLAS in a 32nd of
    the memory (float32). Above the budget, ``R`` is never held whole: each call
    regenerates it block by block of input coordinates (each block in one
    vectorised pass) and accumulates the same products. Both modes use the same
    matrix, bitwise. Use :func:`make_projector`.

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
        Largest stored matrix (bytes) that is cached.

    Attributes
    ----------
    seed_ : int
        The seed the matrix is a function of.
    cached : bool
        Whether the whole matrix (packed, for Rademacher) is (or will be) held on the
        device.

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
        return self._stored_bytes() <= self.max_dense_bytes

    def _stored_bytes(self):
        """Bytes of the cached form of ``R``: packed bits (Rademacher) or floats."""
        if self.proj_type == "rademacher":
            return self.n_features * 8 * _sign_words(self.proj_dim)
        return self.n_features * self.proj_dim * _itemsize(self.dtype)

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

    def _packed(self):
        """The packed sign bits of the whole Rademacher matrix, uint8 (p, 8 ceil(k/64))."""
        out = torch.empty(self.n_features, 8 * _sign_words(self.proj_dim), dtype=torch.uint8,
                          device=self.device)
        return _pack_rademacher_(out, self._key, 0)

    def matrix(self):
        """The projection matrix ``R``, shape (n_features, proj_dim).

        The cached one when the projector caches Gaussian entries, else a freshly
        generated copy (a Rademacher matrix is cached packed, see the class notes).
        """
        if not self.cached or self.proj_type == "rademacher":
            return self._build_matrix()
        if self._matrix is None:
            self._matrix = self._build_matrix()
        return self._matrix

    def __call__(self, G):
        """Project the rows of ``G``: (n, n_features) -> (n, out_dim)."""
        G = self._check_input(G)
        if self.proj_type == "rademacher":
            return self._project_signs(G)
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

    def _project_signs(self, G):
        """``G @ R`` for a Rademacher ``R``: packed rows (cached, or generated per chunk)
        expanded chunk by chunk into one reused float buffer, one ``addmm`` each."""
        p, k, w = self.n_features, self.proj_dim, _sign_words(self.proj_dim)
        budget = _EXPAND_BYTES.get(self.device.type, _EXPAND_BYTES_OTHER)
        step = max(1, min(p, self._block_rows(), budget // (_itemsize(self.dtype) * 64 * w)))
        if self.cached:
            if self._matrix is None:
                self._matrix = self._packed()
            packed = self._matrix
        else:
            packed = torch.empty(step, 8 * w, dtype=torch.uint8, device=self.device)
        buf = torch.empty(step, 64 * w, dtype=self.dtype, device=self.device)
        index = torch.empty(step, 8 * w, dtype=torch.int64, device=self.device)
        table = _sign_table(k, self.dtype, self.device)
        out = torch.empty(G.shape[0], k, dtype=self.dtype, device=self.device)
        for start in range(0, p, step):
            h = min(step, p - start)
            rows = (packed[start : start + h] if self.cached
                    else _pack_rademacher_(packed[:h], self._key, start))
            R = _expand_signs_(buf[:h], rows, table, index[:h])[:, :k]
            if start == 0:
                torch.mm(G[:, :h], R, out=out)
            else:
                out.addmm_(G[:, start : start + h], R)
        return out
