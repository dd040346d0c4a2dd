"""Masks: projections that keep a subset of the input coordinates (GraSS's sparsifiers).

A mask of ``proj_dim`` coordinates is an index tensor, never a matrix: applying
it gathers ``G[:, index]`` (and scales it), at a cost of ``O(n * proj_dim)``
whatever ``n_features``. The kept coordinates come out in increasing order.
"""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

import math

import torch
from sklearn.exceptions import NotFittedError

from ._base import _BaseProjector
from ._random import _smallest_hashes


class _MaskProjector(_BaseProjector):
    """``G[:, index] * scale`` for an ascending index tensor of ``proj_dim`` coordinates."""

    scale = 1.0

    def __init__(self, n_features, proj_dim, proj_type, random_state, device, dtype):
        super().__init__(n_features, proj_dim, proj_type, random_state, device, dtype)
        if self.proj_dim > self.n_features:
            raise ValueError(
                f"A mask keeps proj_dim={self.proj_dim} of the n_features={self.n_features} "
                "input coordinates: proj_dim must not exceed n_features."
            )

    def __call__(self, G):
        """Project the rows of ``G``: (n, n_features) -> (n, out_dim)."""
        G = self._check_input(G)
        out = G.index_select(1, self.index)
        return out.mul_(self.scale) if self.scale != 1.0 else out


class RandomMaskProjector(_MaskProjector):
    """Keep ``proj_dim`` coordinates drawn uniformly at random, without replacement.

    The "random mask" sparsifier of GraSS [1]_. The kept coordinates are scaled
    by ``sqrt(n_features / proj_dim)``: each coordinate is kept with probability
    ``proj_dim / n_features``, so ``E[<Px, Py>] = <x, y>`` over the draw of the
    mask. The subset is the ``proj_dim`` coordinates of smallest counter-based
    hash under the seed, a pure function of ``(seed, n_features, proj_dim)``:
    the same on every device, regenerated (not pickled) after loading. Use
    :func:`make_projector` with ``proj_type="random_mask"``.

    Parameters
    ----------
    n_features : int
    proj_dim : int
        Number of kept coordinates, ``<= n_features``.
    random_state : int, RandomState instance, Generator or None, default=None
    device : str or torch.device, default="cpu"
    dtype : torch.dtype, default=torch.float32

    Attributes
    ----------
    index : LongTensor of shape (proj_dim,)
        The kept coordinates, in increasing order.
    scale : float
        ``sqrt(n_features / proj_dim)``.

    References
    ----------
    .. [1] Hu, P. et al. "GraSS: Scalable Influence Function with Sparse
       Gradient Compression", 2025.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.projection import RandomMaskProjector
    >>> P = RandomMaskProjector(100, 4, random_state=0, dtype=torch.float64)
    >>> G = torch.randn(3, 100, dtype=torch.float64)
    >>> torch.equal(P(G), G[:, P.index] * 5.0)
    True
    """

    _cache_attrs = ("_index",)

    def __init__(self, n_features, proj_dim, *, random_state=None, device="cpu",
                 dtype=torch.float32):
        super().__init__(n_features, proj_dim, "random_mask", random_state, device, dtype)
        self.scale = math.sqrt(self.n_features / self.proj_dim)

    @property
    def index(self):
        if self._index is None:
            self._index = _smallest_hashes(self._key, self.n_features, self.proj_dim,
                                           self.device)
        return self._index


class SelectiveMaskProjector(_MaskProjector):
    """Keep the ``proj_dim`` coordinates of largest mean square over training rows.

    A data-dependent mask: feed training rows (per-sample gradients) block by
    block with :meth:`partial_fit`, then :meth:`finalize` keeps the coordinates
    with the largest mean of ``G[:, j] ** 2`` (ties to the lower index), unscaled.
    Projecting before :meth:`finalize` raises :class:`~sklearn.exceptions.NotFittedError`.

    This is a simplification of the selective mask of GraSS [1]_, which *learns*
    a mask by maximising the correlation between masked and full gradient-dot
    attribution scores under an L1 penalty, then keeps its top coordinates.
    Here the score of a coordinate is only its second moment over the data the
    projector saw; no optimisation is done. The selection depends on the data,
    so the unbiasedness of the random projections does not apply.

    Parameters
    ----------
    n_features : int
    proj_dim : int
        Number of kept coordinates, ``<= n_features``.
    random_state : ignored
        Kept for a uniform signature (recorded as ``seed_``).
    device : str or torch.device, default="cpu"
    dtype : torch.dtype, default=torch.float32

    Attributes
    ----------
    index_ : LongTensor of shape (proj_dim,)
        The kept coordinates, in increasing order (after :meth:`finalize`).
    scores_ : Tensor of shape (n_features,), float64
        Mean square of every coordinate over the rows seen (after :meth:`finalize`).
    n_samples_seen_ : int
        Rows seen by :meth:`partial_fit` since the last :meth:`finalize`.

    References
    ----------
    .. [1] Hu, P. et al. "GraSS: Scalable Influence Function with Sparse
       Gradient Compression", 2025.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.projection import SelectiveMaskProjector
    >>> G = torch.zeros(5, 6, dtype=torch.float64)
    >>> G[:, 4], G[:, 1] = 3.0, -2.0
    >>> P = SelectiveMaskProjector(6, 2, dtype=torch.float64)
    >>> P.partial_fit(G[:2]).partial_fit(G[2:]).finalize().index_.tolist()
    [1, 4]
    >>> torch.equal(P(G), G[:, [1, 4]])
    True
    """

    _state_attrs = ("index_", "scores_", "_sum_sq")
    requires_fit = True

    def __init__(self, n_features, proj_dim, *, random_state=0, device="cpu",
                 dtype=torch.float32):
        super().__init__(n_features, proj_dim, "selective_mask", random_state, device, dtype)
        self.index_ = self.scores_ = None
        self._discard_stats()

    def _discard_stats(self):
        self._sum_sq, self.n_samples_seen_ = None, 0

    def partial_fit(self, G):
        """Accumulate the squares of training rows ``G`` (n, n_features). Returns self."""
        G = self._check_input(G)
        sq = G.to(torch.float64).square().sum(0)
        self._sum_sq = sq if self._sum_sq is None else self._sum_sq.add_(sq)
        self.n_samples_seen_ += G.shape[0]
        return self

    def finalize(self):
        """Select the coordinates from the rows seen so far. Returns self."""
        if self.n_samples_seen_ == 0:
            if self.index_ is not None:
                return self  # already final: nothing new was fed
            raise ValueError("SelectiveMaskProjector.finalize needs rows: call partial_fit first.")
        self.scores_ = self._sum_sq / self.n_samples_seen_
        order = torch.argsort(self.scores_, descending=True, stable=True)
        self.index_ = torch.sort(order[: self.proj_dim]).values
        self._discard_stats()
        return self

    @property
    def index(self):
        if self.index_ is None:
            raise NotFittedError(
                "This SelectiveMaskProjector has not selected its coordinates yet: call "
                "partial_fit on training rows (e.g. gradient blocks), then finalize()."
            )
        return self.index_
