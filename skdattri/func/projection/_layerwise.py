"""Layer-wise projection: consecutive slices of the input projected separately."""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

import numpy as np
import torch

from ..._utils import _seed_from
from ._base import (
    _DEFAULT_MAX_DENSE_BYTES,
    _check_dtype,
    _check_positive_int,
    _itemsize,
    _ProjectorGroup,
)
from ._random import _TAGS, _sub_seed
from ._single import _MASKS, _build_projector, _check_proj_type


def _layer_seeds(seed, n_layers):
    """The sub-seed of every layer, derived from ``seed`` (shared by the layer-wise kinds)."""
    return [_sub_seed(seed, _TAGS["layer"], layer) for layer in range(n_layers)]


def _offsets(sizes):
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()


class LayerwiseProjector(_ProjectorGroup):
    """Project consecutive slices (layers) of the input separately and concatenate.

    Input coordinates ``[o_l, o_l + layer_sizes[l])`` are projected by their own
    sub-projector (its seed derived from the projector's seed and ``l``) to
    ``proj_dim`` coordinates, so ``out_dim = len(layer_sizes) * proj_dim`` (a
    mask keeps ``min(proj_dim, layer_sizes[l])`` coordinates of layer ``l``).
    Every sub-matrix has the scaling of a flat projection to ``proj_dim``, hence
    ``<P(g), P(h)> = sum_l <P_l(g_l), P_l(h_l)>`` is an unbiased estimate of
    ``<g, h>``, with error the sum of the per-layer errors. Layers smaller than
    ``proj_dim`` are still projected (their error is that of a projection to
    ``proj_dim``). Dense sub-matrices are cached in layer order while their
    total stays within ``max_dense_bytes``; the others are generated block-wise.
    A data-dependent type fits every layer on its own slice. Use
    :func:`make_projector`.

    Parameters
    ----------
    layer_sizes : list of int
        Sizes of the consecutive input slices.
    proj_dim : int
        Output dimension of every layer.
    proj_type, n_nonzero, mask_dim, random_state, device, dtype, max_dense_bytes
        As in :func:`make_projector` (``mask_dim`` is capped at each layer's size).

    Attributes
    ----------
    projectors_ : list of projectors
        One per layer.
    offsets_ : list of int
        Input offsets of the layers, ``len(layer_sizes) + 1`` entries.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.projection import make_projector
    >>> P = make_projector(30, 4, layer_sizes=[10, 20], random_state=0)
    >>> G = torch.randn(2, 30)
    >>> torch.equal(P(G)[:, 4:], P.projectors_[1](G[:, 10:]))
    True
    """

    def __init__(
        self,
        layer_sizes,
        proj_dim,
        *,
        proj_type="gaussian",
        n_nonzero=1,
        mask_dim=None,
        random_state=None,
        device="cpu",
        dtype=torch.float32,
        max_dense_bytes=_DEFAULT_MAX_DENSE_BYTES,
    ):
        _check_proj_type(proj_type)
        sizes = [_check_positive_int(s, "each entry of layer_sizes") for s in layer_sizes]
        if not sizes:
            raise ValueError("layer_sizes must contain at least one layer.")
        self.layer_sizes = sizes
        self.n_features = sum(sizes)
        self.proj_dim = _check_positive_int(proj_dim, "proj_dim")
        self.proj_type = proj_type
        self.seed_ = _seed_from(random_state)
        self.max_dense_bytes = max_dense_bytes
        itemsize = _itemsize(_check_dtype(dtype))
        budget, subs = max_dense_bytes, []
        for size, seed in zip(sizes, _layer_seeds(self.seed_, len(sizes))):
            need = size * self.proj_dim * itemsize
            k = min(self.proj_dim, size) if proj_type in _MASKS else self.proj_dim
            subs.append(_build_projector(
                size, k, proj_type, n_nonzero=n_nonzero,
                mask_dim=None if mask_dim is None else min(mask_dim, size), seed=seed,
                device=device, dtype=dtype, max_dense_bytes=need if need <= budget else 0))
            if proj_type in ("gaussian", "rademacher") and need <= budget:
                budget -= need
        self._adopt(subs)
        self.offsets_ = _offsets(sizes)

    @property
    def out_dim(self):
        return sum(sub.out_dim for sub in self.projectors_)

    def _slices(self, G):
        off = self.offsets_
        return [G[:, off[i] : off[i + 1]] for i in range(len(self.projectors_))]

    def partial_fit(self, G):
        """Feed every layer's slice of training rows ``G`` to its projector. Returns self."""
        for sub, part in zip(self.projectors_, self._slices(self._check_input(G))):
            sub.partial_fit(part)
        return self

    def __call__(self, G):
        """Project the rows of ``G``: (n, n_features) -> (n, out_dim)."""
        parts = self._slices(self._check_input(G))
        return torch.cat([sub(part) for sub, part in zip(self.projectors_, parts)], dim=1)
