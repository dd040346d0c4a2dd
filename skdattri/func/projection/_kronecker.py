"""Kronecker-factored projection of layer gradients (LoGra, FactGraSS).

For a layer with inputs ``a`` of shape ``(n, T, d_in)`` and output gradients ``g``
of shape ``(n, T, d_out)`` (the capture layout of :mod:`skdattri.func.hooks`, the
bias as a trailing input column of ones), the per-sample gradient is ``G_i =
sum_t g_it a_it^T`` of shape ``(d_out, d_in)``, flattened row-major (as torch
flattens ``weight``: coordinate ``o * d_in + i``). With factor projections
``P_in`` (``d_in x k_in``) and ``P_out`` (``d_out x k_out``), the projected
gradient is

    vec(P_out^T G_i P_in) = kron(P_out, P_in)^T vec(G_i)          (row-major vec)
                          = sum_t (P_out^T g_it) kron (P_in^T a_it),

equivalently ``kron(P_in, P_out)^T vecc(G_i)`` with the column-major ``vecc`` used
in the LoGra paper. The factor form never builds ``G_i``: it projects ``a`` and
``g`` (cost ``O(n T (d_in k_in + d_out k_out))``) and takes their outer product (for
``T > 1``, ``einsum('nto,nti->noi')``).
"""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

import math
from collections.abc import Mapping

import torch

from ..._utils import _seed_from
from ..hooks import weight_layout
from ._base import _DEFAULT_MAX_DENSE_BYTES, _as_tensor, _check_positive_int, _ProjectorGroup
from ._layerwise import _layer_seeds, _offsets
from ._random import _TAGS, _sub_seed
from ._single import (
    _GRASS_MASKS,
    _MASKS,
    _build_projector,
    _check_proj_type,
    _default_mask_dim,
)
from ._sparse import SJLTProjector


def _balanced_dims(target):
    """``(k_out, k_in)`` with ``k_out * k_in == target``, ``k_out`` the largest divisor <= sqrt."""
    k_out = next(d for d in range(math.isqrt(target), 0, -1) if target % d == 0)
    return k_out, target // k_out


def _capped_dims(target, n_outputs, n_inputs):
    """``(k_out, k_in)`` near-balanced with product at most ``target``, within the factors."""
    k_out = min(n_outputs, max(1, math.isqrt(target)))
    k_in = min(n_inputs, max(1, target // k_out))
    return min(n_outputs, max(k_out, target // k_in)), k_in


def _factor(x, dim, name):
    """A capture factor as ``(n, T, dim)``."""
    x = _as_tensor(x)
    x = x[:, None, :] if x.ndim == 2 else x
    if x.ndim != 3 or x.shape[2] != dim:
        raise ValueError(
            f"{name} must have shape (n, T, {dim}) or (n, {dim}), got {tuple(x.shape)}.")
    return x


class KroneckerProjector(_ProjectorGroup):
    """Project one layer's gradient as ``vec(P_out^T G P_in)``, optionally then ``post``.

    See the module notes for the identity. :meth:`project_factors` takes the
    capture factors ``(a, g)``; calling the projector on flattened per-sample
    gradients ``G`` of shape ``(n, d_out * d_in)`` (row-major, bias last column)
    or ``(n, d_out, d_in)`` gives the same coordinates, so the train side can be
    projected from factors and the query side from full gradients, or the
    reverse. ``post`` (FactGraSS's SJLT) acts on the ``k_out * k_in`` coordinates.

    Parameters
    ----------
    in_projector : projector
        ``P_in``, with ``n_features = d_in``.
    out_projector : projector
        ``P_out``, with ``n_features = d_out``.
    post_projector : projector, default=None
        Applied to the ``k_out * k_in`` Kronecker coordinates (must not depend on data).

    Attributes
    ----------
    n_inputs, n_outputs : int
        ``d_in`` and ``d_out``; ``n_features = d_out * d_in``.
    projectors_ : list of projectors
        ``[in, out]`` or ``[in, out, post]``.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.projection import DenseProjector, KroneckerProjector
    >>> P_in = DenseProjector(5, 2, random_state=0, dtype=torch.float64)
    >>> P_out = DenseProjector(3, 2, random_state=1, dtype=torch.float64)
    >>> P = KroneckerProjector(P_in, P_out)
    >>> a = torch.randn(4, 1, 5, dtype=torch.float64)    # (n, T, d_in)
    >>> g = torch.randn(4, 1, 3, dtype=torch.float64)    # (n, T, d_out)
    >>> G = torch.einsum("nto,nti->noi", g, a)           # per-sample (d_out, d_in)
    >>> K = torch.kron(P_out.matrix(), P_in.matrix())    # row-major vec
    >>> bool(torch.allclose(P.project_factors(a, g), G.reshape(4, -1) @ K))
    True
    >>> bool(torch.allclose(P(G.reshape(4, -1)), G.reshape(4, -1) @ K))
    True
    """

    def __init__(self, in_projector, out_projector, post_projector=None):
        inner = in_projector.out_dim * out_projector.out_dim
        if post_projector is not None:
            if post_projector.n_features != inner:
                raise ValueError(
                    f"post_projector has n_features={post_projector.n_features}; the "
                    f"Kronecker product has {inner} = k_out * k_in coordinates.")
            if post_projector.requires_fit:
                raise ValueError("post_projector must not depend on data.")
        stages = [in_projector, out_projector]
        self._adopt(stages + ([] if post_projector is None else [post_projector]))
        self.n_inputs, self.n_outputs = in_projector.n_features, out_projector.n_features
        self.n_features = self.n_outputs * self.n_inputs
        self.proj_dim = inner if post_projector is None else post_projector.out_dim
        self.proj_type = "kron"
        self.seed_ = in_projector.seed_

    @property
    def in_projector(self):
        return self.projectors_[0]

    @property
    def out_projector(self):
        return self.projectors_[1]

    @property
    def post_projector(self):
        return self.projectors_[2] if len(self.projectors_) > 2 else None

    def _post(self, Y):
        Y = Y.reshape(Y.shape[0], -1)
        return Y if self.post_projector is None else self.post_projector(Y)

    def _factors(self, a, g):
        a, g = _factor(a, self.n_inputs, "a"), _factor(g, self.n_outputs, "g")
        if a.shape[:2] != g.shape[:2]:
            raise ValueError(
                f"a and g must agree in (n, T), got {tuple(a.shape[:2])} and "
                f"{tuple(g.shape[:2])}.")
        return a, g

    def partial_fit(self, a, g):
        """Feed capture factors of training rows to data-dependent factor projectors."""
        a, g = self._factors(a, g)
        self.in_projector.partial_fit(a.reshape(-1, self.n_inputs))
        self.out_projector.partial_fit(g.reshape(-1, self.n_outputs))
        return self

    def project_factors(self, a, g):
        """Projected gradients from the capture factors, without forming ``G``.

        Parameters
        ----------
        a : Tensor of shape (n, T, d_in) or (n, d_in)
        g : Tensor of shape (n, T, d_out) or (n, d_out)

        Returns
        -------
        Y : Tensor of shape (n, out_dim)
        """
        a, g = self._factors(a, g)
        n, T = a.shape[:2]
        aP = self.in_projector(a.reshape(n * T, -1)).reshape(n, T, -1)
        gP = self.out_projector(g.reshape(n * T, -1)).reshape(n, T, -1)
        if T == 1:
            return self._post(gP[:, 0, :, None] * aP[:, 0, None, :])
        return self._post(torch.einsum("nto,nti->noi", gP, aP))

    def __call__(self, G):
        """Project flattened gradients ``(n, d_out * d_in)`` (or ``(n, d_out, d_in)``)."""
        G = _as_tensor(G)
        if G.ndim == 3 and tuple(G.shape[1:]) == (self.n_outputs, self.n_inputs):
            G = G.reshape(G.shape[0], -1)
        n, d_out, d_in = G.shape[0], self.n_outputs, self.n_inputs
        G = self._check_input(G)
        Y = self.in_projector(G.reshape(n * d_out, d_in)).reshape(n, d_out, -1)
        k_in = Y.shape[2]
        Y = self.out_projector(Y.transpose(1, 2).reshape(n * k_in, d_out))
        return self._post(Y.reshape(n, k_in, -1).transpose(1, 2))


def make_kronecker_projector(
    n_outputs,
    n_inputs,
    proj_dim,
    *,
    proj_type="gaussian",
    factor_dims=None,
    mask_dim=None,
    n_nonzero=1,
    random_state=None,
    device="cpu",
    dtype=torch.float32,
    max_dense_bytes=_DEFAULT_MAX_DENSE_BYTES,
):
    """Build the Kronecker-factored projector of one ``(d_out, d_in)`` layer gradient.

    Parameters
    ----------
    n_outputs, n_inputs : int
        ``d_out`` and ``d_in`` (with the bias column when the layer has a bias).
    proj_dim : int
        Output dimension of the layer. For the factor types it is ``k_out *
        k_in`` (when ``factor_dims`` is None: the most balanced divisor pair of
        ``proj_dim``; masks are capped at the factor sizes, so ``out_dim`` can be
        smaller). For ``"grass"`` / ``"selective_grass"`` (FactGraSS) it is the
        dimension of the final SJLT.
    proj_type : str, default="gaussian"
        ``"gaussian"`` / ``"rademacher"`` (LoGra), ``"sjlt"``, ``"random_mask"``,
        ``"selective_mask"``: both factors are projected with this type.
        ``"grass"`` / ``"selective_grass"``: FactGraSS [2]_, both factors masked
        (random / selective) to ``factor_dims``, their outer product, then an SJLT
        with ``n_nonzero`` non-zeros to ``proj_dim``.
    factor_dims : (int, int), default=None
        ``(k_out, k_in)``. For FactGraSS, None chooses factor masks whose product
        is at most ``mask_dim``.
    mask_dim : int, default=None
        FactGraSS's intermediate dimension, ``min(d_out * d_in, 4 * proj_dim)``
        when None. Ignored otherwise.
    n_nonzero, random_state, device, dtype, max_dense_bytes
        As in :func:`make_projector`; the factor and SJLT seeds are derived from
        the one seed.

    Returns
    -------
    projector : KroneckerProjector

    References
    ----------
    .. [1] Choe, S. K. et al. "What is Your Data Worth to GPT? LLM-Scale Data
       Valuation with Influence Functions", 2024 (LoGra).
    .. [2] Hu, P. et al. "GraSS: Scalable Influence Function with Sparse
       Gradient Compression", 2025 (FactGraSS).

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.projection import make_kronecker_projector
    >>> P = make_kronecker_projector(10, 65, 64, random_state=0)
    >>> P.out_dim, (P.out_projector.out_dim, P.in_projector.out_dim)
    (64, (8, 8))
    >>> F = make_kronecker_projector(10, 65, 64, proj_type="grass", random_state=0)
    >>> F.out_dim, F.post_projector.n_features
    (64, 250)
    """
    _check_proj_type(proj_type)
    n_outputs = _check_positive_int(n_outputs, "n_outputs")
    n_inputs = _check_positive_int(n_inputs, "n_inputs")
    proj_dim = _check_positive_int(proj_dim, "proj_dim")
    seed = _seed_from(random_state)
    grass = proj_type in _GRASS_MASKS
    kind = _GRASS_MASKS.get(proj_type, proj_type)
    if factor_dims is None:
        target = proj_dim
        if grass:
            target = _check_positive_int(
                _default_mask_dim(n_outputs * n_inputs, proj_dim) if mask_dim is None
                else mask_dim, "mask_dim")
        factor_dims = (_capped_dims(target, n_outputs, n_inputs) if kind in _MASKS
                       else _balanced_dims(target))
    k_out, k_in = (_check_positive_int(k, "each entry of factor_dims") for k in factor_dims)
    common = {"n_nonzero": n_nonzero, "mask_dim": None, "device": device, "dtype": dtype,
              "max_dense_bytes": max_dense_bytes}
    P_in = _build_projector(n_inputs, k_in, kind, seed=_sub_seed(seed, _TAGS["kron_in"]),
                            **common)
    P_out = _build_projector(n_outputs, k_out, kind, seed=_sub_seed(seed, _TAGS["kron_out"]),
                             **common)
    post = None
    if grass:
        post = SJLTProjector(k_out * k_in, proj_dim, n_nonzero=n_nonzero, device=device,
                             dtype=dtype, random_state=_sub_seed(seed, _TAGS["kron_post"]))
    P = KroneckerProjector(P_in, P_out, post)
    P.seed_, P.proj_type = seed, proj_type
    return P


def layer_shapes(layers, *, bias_column=True):
    """``[(d_out, d_in), ...]`` of layers in the capture layout, for the Kronecker projectors.

    Parameters
    ----------
    layers : list of (str, torch.nn.Module) or of torch.nn.Module
        E.g. :func:`skdattri.func.hooks.find_layers`'s result: modules with a
        ``weight`` of shape ``(d_out, ...)`` (``nn.Linear``, ``nn.Conv1d/2d``).
    bias_column : bool, default=True
        Count the bias as a trailing input column (as :class:`LayerCapture` does).

    Returns
    -------
    shapes : list of (int, int)

    Examples
    --------
    >>> from torch import nn
    >>> from skdattri.func.projection import layer_shapes
    >>> layer_shapes([nn.Linear(784, 128), nn.Conv2d(3, 8, 5, bias=False)])
    [(128, 785), (8, 75)]
    """
    shapes = []
    for layer in layers:
        mod = layer[1] if isinstance(layer, tuple) else layer
        shape, _ = weight_layout(mod)  # (d_out, ...), also for a transposed Conv1D
        extra = int(bias_column and getattr(mod, "bias", None) is not None)
        shapes.append((int(shape[0]), math.prod(shape[1:]) + extra))
    return shapes


class LayerwiseKroneckerProjector(_ProjectorGroup):
    """One :class:`KroneckerProjector` per layer, outputs concatenated (LoGra, FactGraSS).

    Parameters
    ----------
    layer_shapes : list of (int, int)
        ``(d_out, d_in)`` of every layer, in order (see :func:`layer_shapes`).
    proj_dim : int
        Per-layer output dimension (see :func:`make_kronecker_projector`).
    proj_type, factor_dims, mask_dim, n_nonzero, random_state, device, dtype, max_dense_bytes
        As in :func:`make_kronecker_projector`; layer ``l`` gets a seed derived
        from ``random_state`` and ``l``.

    Attributes
    ----------
    projectors_ : list of KroneckerProjector
    offsets_ : list of int
        Offsets of the layers in a flat gradient (blocks of ``d_out * d_in``).

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.projection import LayerwiseKroneckerProjector
    >>> P = LayerwiseKroneckerProjector([(4, 3), (2, 5)], 4, random_state=0)
    >>> a1, g1 = torch.randn(6, 3), torch.randn(6, 4)
    >>> a2, g2 = torch.randn(6, 5), torch.randn(6, 2)
    >>> P.project_factors([(a1, g1), (a2, g2)]).shape
    torch.Size([6, 8])
    """

    def __init__(self, layer_shapes, proj_dim, *, proj_type="gaussian", factor_dims=None,
                 mask_dim=None, n_nonzero=1, random_state=None, device="cpu",
                 dtype=torch.float32, max_dense_bytes=_DEFAULT_MAX_DENSE_BYTES):
        shapes = [(int(o), int(i)) for o, i in layer_shapes]
        if not shapes:
            raise ValueError("layer_shapes must contain at least one layer.")
        self.layer_shapes = shapes
        self.proj_dim = _check_positive_int(proj_dim, "proj_dim")
        self.proj_type = proj_type
        self.seed_ = _seed_from(random_state)
        self._adopt(
            make_kronecker_projector(
                o, i, proj_dim, proj_type=proj_type, factor_dims=factor_dims,
                mask_dim=mask_dim, n_nonzero=n_nonzero, random_state=seed, device=device,
                dtype=dtype, max_dense_bytes=max_dense_bytes)
            for (o, i), seed in zip(shapes, _layer_seeds(self.seed_, len(shapes))))
        self.offsets_ = _offsets([o * i for o, i in shapes])
        self.n_features = self.offsets_[-1]

    @property
    def out_dim(self):
        return sum(p.out_dim for p in self.projectors_)

    def _pairs(self, factors):
        pairs = list(factors.values() if isinstance(factors, Mapping) else factors)
        if len(pairs) != len(self.projectors_):
            raise ValueError(
                f"Expected factors (a, g) for {len(self.projectors_)} layers, got {len(pairs)}.")
        return pairs

    def partial_fit(self, factors):
        """Feed every layer's ``(a, g)`` (a sequence, or a dict in layer order)."""
        for p, (a, g) in zip(self.projectors_, self._pairs(factors)):
            p.partial_fit(a, g)
        return self

    def project_factors(self, factors):
        """Projected gradients ``(n, out_dim)`` from every layer's capture factors.

        Parameters
        ----------
        factors : sequence of (a, g), or dict of name to (a, g), in layer order
            As :meth:`skdattri.func.hooks.LayerCapture.collect` returns them.
        """
        return torch.cat([p.project_factors(a, g)
                          for p, (a, g) in zip(self.projectors_, self._pairs(factors))], dim=1)

    def __call__(self, G):
        """Project flat gradients: concatenated row-major ``(d_out, d_in)`` blocks per layer."""
        G = self._check_input(G)
        off = self.offsets_
        return torch.cat([p(G[:, off[i] : off[i + 1]]) for i, p in enumerate(self.projectors_)],
                         dim=1)
