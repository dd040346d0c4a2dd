"""Random projections in plain torch: dense Gaussian / Rademacher and sparse JL.

A projector maps row vectors of length ``n_features`` (per-sample gradients, in
the gradient methods) to ``out_dim`` coordinates so that inner products are
preserved in expectation (Johnson-Lindenstrauss). A projector is built once,
from an integer seed, and then applied to any number of batches: train
gradients in ``fit`` and query gradients in ``transform`` go through the same
matrix whatever their batch sizes or order.

Every random number is a pure function of ``(seed, position)``: entry
``(i, j)`` of the projection matrix is computed from a counter-based hash
(SplitMix64) of the seed and of ``i`` and ``j``, with integer arithmetic that
is identical on every torch device. Hence

* the matrix does not depend on how it is generated (all at once, or block by
  block when it would not fit in memory),
* it is the same on CPU and CUDA (bitwise for ``"rademacher"`` and ``"sjlt"``;
  to a few units in the last place for ``"gaussian"``, whose Box-Muller
  transform uses the device's ``log``/``cos``), so a cache fitted on a GPU can be
  moved to a CPU (``to``) or pickled and reloaded there,
* every output row depends only on the matching input row.
"""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

import math
import warnings
from numbers import Integral

import numpy as np
import torch

from ..._utils import _seed_from

__all__ = [
    "DenseProjector",
    "LayerwiseProjector",
    "SJLTProjector",
    "make_projector",
]

_PROJ_TYPES = ("gaussian", "rademacher", "sjlt")

# Default budget for a cached dense matrix (bytes).
_DEFAULT_MAX_DENSE_BYTES = 2**30
# Budget for the temporaries of one generation or application step (bytes).
_WORK_BYTES = 2**27

# ---------------------------------------------------------------------------
# Counter-based random numbers (SplitMix64) on int64 tensors.
# ---------------------------------------------------------------------------
_U64 = (1 << 64) - 1


def _signed64(u):
    """Reinterpret the low 64 bits of a Python int as a signed int64."""
    u &= _U64
    return u - (1 << 64) if u >= (1 << 63) else u


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)

# Domain tags so that the different kinds of matrices drawn from one seed are
# unrelated.
_TAGS = {"gaussian": 1, "rademacher": 2, "sjlt": 3, "layer": 4}


def _splitmix64_py(counter, key):
    """Reference SplitMix64 on Python ints (returns a signed int64)."""
    z = (counter * 0x9E3779B97F4A7C15 + key) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return _signed64(z ^ (z >> 31))


def _derive_key(seed, *salt):
    """Mix an integer seed and salt integers into one signed 64-bit key."""
    key = _splitmix64_py(int(seed) & _U64, 0x5DEECE66D)
    for s in salt:
        key = _splitmix64_py(int(s) & _U64, key & _U64)
    return key


def _lsr(z, shift):
    """Logical right shift of an int64 tensor (torch's ``>>`` is arithmetic)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _hash_(counter, key):
    """SplitMix64 of ``counter`` (int64 tensor, modified in place) under ``key``.

    int64 multiplication wraps modulo 2**64 on every torch backend, so the
    result is the same bit pattern on CPU and CUDA.
    """
    z = counter.mul_(_GOLDEN).add_(key)
    z.bitwise_xor_(_lsr(z, 30)).mul_(_MIX1)
    z.bitwise_xor_(_lsr(z, 27)).mul_(_MIX2)
    z.bitwise_xor_(_lsr(z, 31))
    return z


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _check_positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


def _check_dtype(dtype):
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}.")
    return dtype


def _compute_dtype(dtype):
    """Precision in which random numbers are generated for ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _BaseProjector:
    """Common input checks, device handling and pickling."""

    # attributes that are regenerated from the seed, never pickled
    _cache_attrs = ()

    def __init__(self, n_features, proj_dim, proj_type, random_state, device, dtype):
        self.n_features = _check_positive_int(n_features, "n_features")
        self.proj_dim = _check_positive_int(proj_dim, "proj_dim")
        self.proj_type = proj_type
        self.seed_ = _seed_from(random_state)
        self.device = torch.device(device)
        self.dtype = _check_dtype(dtype)
        self._key = _derive_key(self.seed_, _TAGS[proj_type], self.n_features, self.proj_dim)
        self._clear_cache()

    def _check_input(self, G):
        if not isinstance(G, torch.Tensor):
            G = torch.as_tensor(np.asarray(G))
        if G.ndim != 2:
            raise ValueError(
                f"Expected a 2-D tensor of shape (n_samples, {self.n_features}), "
                f"got shape {tuple(G.shape)}."
            )
        if G.shape[1] != self.n_features:
            raise ValueError(
                f"Expected {self.n_features} features, got {G.shape[1]}: the projector "
                "was built for another input dimension."
            )
        return G.to(device=self.device, dtype=self.dtype)

    @property
    def n_nonzero(self):
        return None

    def to(self, device=None, dtype=None):
        """Move the projector (and any cached tensor) to ``device`` / ``dtype``.

        The projection itself does not change: cached tensors are moved, or
        regenerated from the seed when the dtype changes. Returns ``self``
        (modified in place, like :meth:`torch.nn.Module.to`).
        """
        if dtype is not None:
            dtype = _check_dtype(dtype)
            if dtype != self.dtype:
                self.dtype = dtype
                self._clear_cache()
        if device is not None:
            self.device = torch.device(device)
            for name in self._cache_attrs:
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value.to(self.device))
        return self

    def _clear_cache(self):
        for name in self._cache_attrs:
            setattr(self, name, None)

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._cache_attrs:
            state[name] = None  # regenerated from the seed after loading
        state["device"] = str(self.device)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        device = torch.device(state["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            warnings.warn(
                f"{type(self).__name__} was saved on {device} but CUDA is not available; "
                "loading it on the CPU (the projection is unchanged).",
                UserWarning,
            )
            device = torch.device("cpu")
        self.device = device

    def __repr__(self):
        extra = f", n_nonzero={self.n_nonzero}" if self.n_nonzero is not None else ""
        return (
            f"{type(self).__name__}(n_features={self.n_features}, out_dim={self.out_dim}, "
            f"proj_type={self.proj_type!r}{extra}, seed={self.seed_}, "
            f"device={str(self.device)!r}, dtype={self.dtype})"
        )


class DenseProjector(_BaseProjector):
    """Dense Gaussian or Rademacher projection ``G @ R`` with ``R`` of shape (p, k).

    Entries of ``R`` are N(0, 1/k) (``"gaussian"``) or +-1/sqrt(k) with equal
    probability (``"rademacher"``), so ``E[R @ R.T] = I`` and inner products are
    preserved in expectation. ``R`` is cached on the device (built on the first
    call) when ``p * k * itemsize <= max_dense_bytes``; otherwise it is
    regenerated block by block of input coordinates on every call and never
    held whole. Both modes use the same matrix. Use :func:`make_projector`.
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
    def out_dim(self):
        return self.proj_dim

    @property
    def cached(self):
        """Whether the whole matrix is (or will be) held on the device."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.n_features * self.proj_dim * itemsize <= self.max_dense_bytes

    def _block_rows(self):
        """Rows of ``R`` generated at once, bounded by the working-memory budget."""
        # int64 counters + float temporaries: about 48 bytes per entry
        rows = _WORK_BYTES // (48 * self.proj_dim)
        return int(max(1, min(rows, self.n_features)))

    def _rows(self, start, stop):
        """Rows ``start:stop`` of ``R``, shape (stop - start, proj_dim)."""
        k, dev = self.proj_dim, self.device
        rows = torch.arange(start, stop, dtype=torch.int64, device=dev)
        cdtype = _compute_dtype(self.dtype)
        scale = 1.0 / math.sqrt(k)
        if self.proj_type == "rademacher":
            cols = torch.arange(k, dtype=torch.int64, device=dev)
            z = _hash_(rows[:, None] * k + cols, self._key)
            # top bit -> sign: (z >> 63) is -1 or 0; | 1 gives -1 or +1
            return ((z >> 63) | 1).to(self.dtype).mul_(scale)
        # gaussian: one 64-bit hash -> two uniforms -> two normals (Box-Muller)
        half = (k + 1) // 2
        cols = torch.arange(half, dtype=torch.int64, device=dev)
        z = _hash_(rows[:, None] * half + cols, self._key)
        u1 = _lsr(z, 32).to(cdtype).add_(1.0).mul_(2.0**-32)  # in (0, 1]
        theta = (z & 0xFFFFFFFF).to(cdtype).mul_(2.0 * math.pi * 2.0**-32)
        del z
        radius = u1.log_().mul_(-2.0).sqrt_().mul_(scale)
        out = torch.empty(stop - start, k, dtype=cdtype, device=dev)
        out[:, 0::2] = radius * torch.cos(theta)
        out[:, 1::2] = (radius * torch.sin(theta))[:, : k // 2]
        return out.to(self.dtype)

    def _build_matrix(self):
        matrix = torch.empty(self.n_features, self.proj_dim, dtype=self.dtype, device=self.device)
        step = self._block_rows()
        for start in range(0, self.n_features, step):
            stop = min(start + step, self.n_features)
            matrix[start:stop] = self._rows(start, stop)
        return matrix

    def __call__(self, G):
        """Project the rows of ``G``: (n, n_features) -> (n, out_dim)."""
        G = self._check_input(G)
        if self.cached:
            if self._matrix is None:
                self._matrix = self._build_matrix()
            return G @ self._matrix
        out = torch.zeros(G.shape[0], self.proj_dim, dtype=self.dtype, device=self.device)
        step = self._block_rows()
        for start in range(0, self.n_features, step):
            stop = min(start + step, self.n_features)
            out.addmm_(G[:, start:stop], self._rows(start, stop))
        return out


class SJLTProjector(_BaseProjector):
    """Sparse Johnson-Lindenstrauss projection (CountSketch for ``n_nonzero=1``).

    The ``k`` output coordinates are split into ``s = n_nonzero`` contiguous
    blocks of (almost) equal size; every input coordinate ``i`` is hashed to one
    output coordinate in each block with an independent random sign, scaled by
    ``1/sqrt(s)``. The projector holds only an index tensor and a sign tensor of
    shape (p, s) and applies them with :meth:`torch.Tensor.index_add_`; no dense
    (p, k) matrix is ever formed. Use :func:`make_projector`.
    """

    _cache_attrs = ("_index", "_sign")

    def __init__(
        self,
        n_features,
        proj_dim,
        *,
        n_nonzero=1,
        random_state=None,
        device="cpu",
        dtype=torch.float32,
    ):
        super().__init__(n_features, proj_dim, "sjlt", random_state, device, dtype)
        n_nonzero = _check_positive_int(n_nonzero, "n_nonzero")
        if n_nonzero > self.proj_dim:
            raise ValueError(
                f"n_nonzero={n_nonzero} must not exceed proj_dim={self.proj_dim}."
            )
        self._n_nonzero = n_nonzero

    @property
    def n_nonzero(self):
        return self._n_nonzero

    @property
    def out_dim(self):
        return self.proj_dim

    def _build(self):
        p, k, s, dev = self.n_features, self.proj_dim, self._n_nonzero, self.device
        r = torch.arange(s, dtype=torch.int64, device=dev)
        starts = (r * k) // s
        sizes = ((r + 1) * k) // s - starts
        index = torch.empty(p, s, dtype=torch.int32, device=dev)
        sign = torch.empty(p, s, dtype=self.dtype, device=dev)
        step = max(1, _WORK_BYTES // (32 * s))
        for start in range(0, p, step):
            stop = min(start + step, p)
            rows = torch.arange(start, stop, dtype=torch.int64, device=dev)
            z = _hash_(rows[:, None] * s + r, self._key)
            index[start:stop] = _lsr(z, 32) % sizes + starts
            sign[start:stop] = ((z & 1) * 2 - 1).to(self.dtype)
        self._index = index
        self._sign = sign.mul_(1.0 / math.sqrt(s))

    def __call__(self, G):
        """Project the rows of ``G``: (n, n_features) -> (n, out_dim)."""
        G = self._check_input(G)
        if self._index is None:
            self._build()
        n = G.shape[0]
        out = torch.zeros(n, self.proj_dim, dtype=self.dtype, device=self.device)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        step = max(1, _WORK_BYTES // max(1, n * itemsize))
        # Order of accumulation into each output entry: by (r, input index),
        # whatever the chunking -> results independent of the batch size on CPU.
        for j in range(self._n_nonzero):
            for start in range(0, self.n_features, step):
                stop = min(start + step, self.n_features)
                out.index_add_(
                    1, self._index[start:stop, j], G[:, start:stop] * self._sign[start:stop, j]
                )
        return out


class LayerwiseProjector(_BaseProjector):
    """Project consecutive slices (layers) of the input separately and concatenate.

    Input coordinates ``[o_l, o_l + layer_sizes[l])`` are projected by their own
    sub-projector (its seed derived from the projector's seed and ``l``) to
    ``proj_dim`` coordinates, so ``out_dim = len(layer_sizes) * proj_dim``.
    Every sub-matrix has the scaling of a flat projection to ``proj_dim``, hence
    ``<P(g), P(h)> = sum_l <P_l(g_l), P_l(h_l)>`` is an unbiased estimate of
    ``<g, h>``, with error the sum of the per-layer errors. Layers smaller than
    ``proj_dim`` are still projected (their error is that of a projection to
    ``proj_dim``). Dense sub-matrices are cached in layer order while their
    total stays within ``max_dense_bytes``; the others are generated block-wise.
    Use :func:`make_projector`.
    """

    def __init__(
        self,
        layer_sizes,
        proj_dim,
        *,
        proj_type="gaussian",
        n_nonzero=1,
        random_state=None,
        device="cpu",
        dtype=torch.float32,
        max_dense_bytes=_DEFAULT_MAX_DENSE_BYTES,
    ):
        sizes = [_check_positive_int(s, "each entry of layer_sizes") for s in layer_sizes]
        if not sizes:
            raise ValueError("layer_sizes must contain at least one layer.")
        self.layer_sizes = sizes
        self.n_features = sum(sizes)
        self.proj_dim = _check_positive_int(proj_dim, "proj_dim")
        self.proj_type = proj_type
        self.seed_ = _seed_from(random_state)
        self.device = torch.device(device)
        self.dtype = _check_dtype(dtype)
        self.max_dense_bytes = max_dense_bytes
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        budget = max_dense_bytes
        self.projectors_ = []
        for layer, size in enumerate(sizes):
            sub_seed = _derive_key(self.seed_, _TAGS["layer"], layer) & (_U64 >> 1)
            if proj_type == "sjlt":
                sub = SJLTProjector(
                    size, proj_dim, n_nonzero=n_nonzero, random_state=sub_seed,
                    device=device, dtype=self.dtype,
                )
            else:
                need = size * self.proj_dim * itemsize
                sub = DenseProjector(
                    size, proj_dim, proj_type=proj_type, random_state=sub_seed,
                    device=device, dtype=self.dtype,
                    max_dense_bytes=need if need <= budget else 0,
                )
                if need <= budget:
                    budget -= need
            self.projectors_.append(sub)
        self.offsets_ = np.concatenate([[0], np.cumsum(sizes)]).tolist()

    @property
    def n_nonzero(self):
        return self.projectors_[0].n_nonzero

    @property
    def out_dim(self):
        return self.proj_dim * len(self.layer_sizes)

    def to(self, device=None, dtype=None):
        for sub in self.projectors_:
            sub.to(device=device, dtype=dtype)
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = _check_dtype(dtype)
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        for sub in self.projectors_:
            sub.device = self.device

    def __call__(self, G):
        """Project the rows of ``G``: (n, n_features) -> (n, out_dim)."""
        G = self._check_input(G)
        off = self.offsets_
        return torch.cat(
            [sub(G[:, off[i] : off[i + 1]]) for i, sub in enumerate(self.projectors_)], dim=1
        )


def make_projector(
    n_features,
    proj_dim,
    *,
    proj_type="gaussian",
    n_nonzero=1,
    random_state=None,
    device="cpu",
    dtype=torch.float32,
    layer_sizes=None,
    max_dense_bytes=_DEFAULT_MAX_DENSE_BYTES,
):
    """Build a random projection from ``n_features`` to ``proj_dim`` coordinates.

    The returned object is callable, ``P(G)`` mapping a tensor of shape
    (n, n_features) to (n, P.out_dim). It is built once and reused: every
    output row depends only on the matching input row, so projecting data in
    any batches gives the same rows (bitwise for the random matrix; the matrix
    product itself may round differently for different batch sizes). It
    pickles (caches are dropped and regenerated from the seed) and moves
    between devices with ``P.to(device)``.

    Parameters
    ----------
    n_features : int
        Input dimension ``p``.
    proj_dim : int
        Output dimension ``k`` (per layer when ``layer_sizes`` is given).
    proj_type : {"gaussian", "rademacher", "sjlt"}, default="gaussian"
        ``"gaussian"``: dense N(0, 1/k) entries; ``"rademacher"``: dense
        +-1/sqrt(k) entries; ``"sjlt"``: sparse JL / CountSketch, each input
        coordinate hashed to ``n_nonzero`` output coordinates with random signs
        and scaled by 1/sqrt(n_nonzero).
    n_nonzero : int, default=1
        Non-zeros per input coordinate for ``"sjlt"`` (``1 <= n_nonzero <=
        proj_dim``); ignored otherwise.
    random_state : int, RandomState instance, Generator or None, default=None
        Seed of the projection. An int gives a fixed projection; None draws one
        seed from numpy's global RandomState at construction, a RandomState or
        Generator draws one seed from it. The seed is stored as ``seed_``.
    device : str or torch.device, default="cpu"
        Where the projection runs; inputs are moved there.
    dtype : torch.dtype, default=torch.float32
        Precision of the projection; inputs are cast to it.
    layer_sizes : list of int, default=None
        Sizes of consecutive input slices (summing to ``n_features``) that are
        projected separately, each to ``proj_dim`` coordinates with its own
        sub-seed; the results are concatenated, ``out_dim = len(layer_sizes) *
        proj_dim``. See :class:`LayerwiseProjector`.
    max_dense_bytes : int, default=2**30
        Largest dense matrix (bytes) that is built once and cached. Larger ones
        are regenerated block-wise from the seed on each call (same values,
        slower, never held whole). Unused for ``"sjlt"``.

    Returns
    -------
    projector : DenseProjector, SJLTProjector or LayerwiseProjector
        Callable with attributes ``n_features``, ``out_dim``, ``seed_``,
        ``device``, ``dtype`` and method ``to(device=None, dtype=None)``.

    Notes
    -----
    For a Gaussian or Rademacher matrix and any fixed ``x, y``,
    ``E[<Px, Py>] = <x, y>`` and ``Var[<Px, Py>] <= 2 ||x||^2 ||y||^2 / k``
    (equality in the Gaussian case when ``x = y``); the SJLT has the same
    expectation and no larger variance. By the Johnson-Lindenstrauss lemma,
    ``k = O(log(n) / eps^2)`` keeps all pairwise inner products of ``n`` points
    within ``eps ||x|| ||y||`` with high probability.

    Random numbers come from a counter-based hash (SplitMix64) of the seed and
    the entry's position, so the matrix is the same on every device and for
    every block size.

    A dense matrix above ``max_dense_bytes`` is regenerated on every call,
    which costs about as much as a matrix product per entry on a GPU but is
    slow on a CPU: project large batches at once, or use ``"sjlt"``, whose cost
    is ``O(n * n_features * n_nonzero)`` and whose state is ``O(n_features *
    n_nonzero)``.

    References
    ----------
    .. [1] Johnson, W. and Lindenstrauss, J. "Extensions of Lipschitz mappings
       into a Hilbert space", 1984.
    .. [2] Kane, D. and Nelson, J. "Sparser Johnson-Lindenstrauss Transforms",
       JACM 2014.
    .. [3] Park, S. et al. "TRAK: Attributing Model Behavior at Scale", ICML 2023.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.projection import make_projector
    >>> P = make_projector(1000, 64, proj_type="sjlt", random_state=0)
    >>> G = torch.randn(10, 1000)
    >>> P(G).shape
    torch.Size([10, 64])
    >>> torch.equal(P(G)[:3], P(G[:3]))
    True
    """
    if proj_type not in _PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {_PROJ_TYPES}, got {proj_type!r}.")
    n_features = _check_positive_int(n_features, "n_features")
    if isinstance(max_dense_bytes, bool) or not isinstance(max_dense_bytes, (Integral, float)):
        raise TypeError(f"max_dense_bytes must be a number, got {max_dense_bytes!r}.")
    if max_dense_bytes < 0:
        raise ValueError(f"max_dense_bytes must be >= 0, got {max_dense_bytes}.")
    if layer_sizes is not None:
        if sum(int(s) for s in layer_sizes) != n_features:
            raise ValueError(
                f"layer_sizes sum to {sum(int(s) for s in layer_sizes)}, "
                f"expected n_features={n_features}."
            )
        return LayerwiseProjector(
            layer_sizes, proj_dim, proj_type=proj_type, n_nonzero=n_nonzero,
            random_state=random_state, device=device, dtype=dtype,
            max_dense_bytes=max_dense_bytes,
        )
    if proj_type == "sjlt":
        return SJLTProjector(
            n_features, proj_dim, n_nonzero=n_nonzero, random_state=random_state,
            device=device, dtype=dtype,
        )
    return DenseProjector(
        n_features, proj_dim, proj_type=proj_type, random_state=random_state,
        device=device, dtype=dtype, max_dense_bytes=max_dense_bytes,
    )
