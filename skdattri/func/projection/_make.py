"""``make_projector``: the one entry point attributors and the transformer use."""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

from numbers import Integral

import torch

from ..._utils import _seed_from
from ._base import _DEFAULT_MAX_DENSE_BYTES, _check_positive_int
from ._layerwise import LayerwiseProjector
from ._single import _build_projector, _check_proj_type


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
    mask_dim=None,
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
    proj_type : {"gaussian", "rademacher", "sjlt", "random_mask", \
"selective_mask", "grass", "selective_grass"}, default="gaussian"
        ``"gaussian"``: dense N(0, 1/k) entries; ``"rademacher"``: dense
        +-1/sqrt(k) entries; ``"sjlt"``: sparse JL / CountSketch, each input
        coordinate hashed to ``n_nonzero`` output coordinates with random signs
        and scaled by 1/sqrt(n_nonzero); ``"random_mask"``: ``k`` coordinates
        drawn uniformly without replacement, scaled by sqrt(p / k)
        (:class:`RandomMaskProjector`); ``"selective_mask"``: the ``k``
        coordinates of largest mean square over training rows, a data-dependent
        mask that must be fitted (:class:`SelectiveMaskProjector`);
        ``"grass"`` / ``"selective_grass"``: GraSS, a random / selective mask to
        ``mask_dim`` coordinates followed by an SJLT to ``k``
        (:class:`ComposedProjector`).
    n_nonzero : int, default=1
        Non-zeros per input coordinate of the SJLT (``"sjlt"`` and the GraSS
        types; ``1 <= n_nonzero <= proj_dim``); ignored otherwise.
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
    max_dense_bytes : int, default=2**32
        Largest dense matrix (bytes) that is generated once and cached; every
        call is then one matrix product. Larger ones are regenerated block-wise
        from the seed on each call (same values, a generation per call, never
        held whole). Unused by the other types.
    mask_dim : int, default=None
        GraSS's intermediate dimension (``1 <= mask_dim <= n_features``, usually
        a few times ``proj_dim``); ``min(n_features, 4 * proj_dim)`` when None.
        Ignored by the other types.

    Returns
    -------
    projector : DenseProjector, SJLTProjector, RandomMaskProjector, \
SelectiveMaskProjector, ComposedProjector or LayerwiseProjector
        Callable with attributes ``n_features``, ``out_dim``, ``seed_``,
        ``device``, ``dtype``, ``requires_fit`` and methods ``to(device=None,
        dtype=None)``, ``partial_fit(G)``, ``finalize()``, ``fit(G)`` (no-ops
        unless ``requires_fit``).

    See Also
    --------
    make_kronecker_projector : Kronecker-factored projection of a layer
        gradient (LoGra, FactGraSS).

    Notes
    -----
    For a Gaussian or Rademacher matrix and any fixed ``x, y``,
    ``E[<Px, Py>] = <x, y>`` and ``Var[<Px, Py>] <= 2 ||x||^2 ||y||^2 / k``
    (equality in the Gaussian case when ``x = y``); the SJLT has the same
    expectation and no larger variance. By the Johnson-Lindenstrauss lemma,
    ``k = O(log(n) / eps^2)`` keeps all pairwise inner products of ``n`` points
    within ``eps ||x|| ||y||`` with high probability. A random mask is
    unbiased too, but its variance depends on how spread ``x * y`` is over the
    coordinates (GraSS relies on per-sample gradients being sparse).

    Random numbers come from a counter-based hash (SplitMix64) of the seed and
    the entry's position, so the matrix is the same on every device and for
    every block size.

    Cost per call for ``n`` rows: dense ``O(n p k)`` (a BLAS matrix product once
    the matrix is cached; generating it costs about one hash per entry, once);
    SJLT ``O(n p n_nonzero)`` with state ``O(p n_nonzero)`` -- the choice for very
    large ``p``; masks ``O(n k)``; GraSS ``O(n mask_dim n_nonzero)``.

    References
    ----------
    .. [1] Johnson, W. and Lindenstrauss, J. "Extensions of Lipschitz mappings
       into a Hilbert space", 1984.
    .. [2] Kane, D. and Nelson, J. "Sparser Johnson-Lindenstrauss Transforms",
       JACM 2014.
    .. [3] Park, S. et al. "TRAK: Attributing Model Behavior at Scale", ICML 2023.
    .. [4] Hu, P. et al. "GraSS: Scalable Influence Function with Sparse
       Gradient Compression", 2025.

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
    >>> Q = make_projector(1000, 64, proj_type="grass", random_state=0)
    >>> Q.projectors_[0].out_dim, Q(G).shape
    (256, torch.Size([10, 64]))
    """
    _check_proj_type(proj_type)
    n_features = _check_positive_int(n_features, "n_features")
    if isinstance(max_dense_bytes, bool) or not isinstance(max_dense_bytes, (Integral, float)):
        raise TypeError(f"max_dense_bytes must be a number, got {max_dense_bytes!r}.")
    if max_dense_bytes < 0:
        raise ValueError(f"max_dense_bytes must be >= 0, got {max_dense_bytes}.")
    kwargs = {"proj_type": proj_type, "n_nonzero": n_nonzero, "mask_dim": mask_dim,
              "device": device, "dtype": dtype, "max_dense_bytes": max_dense_bytes}
    if layer_sizes is not None:
        if sum(int(s) for s in layer_sizes) != n_features:
            raise ValueError(
                f"layer_sizes sum to {sum(int(s) for s in layer_sizes)}, "
                f"expected n_features={n_features}."
            )
        return LayerwiseProjector(layer_sizes, proj_dim, random_state=random_state, **kwargs)
    return _build_projector(n_features, proj_dim, seed=_seed_from(random_state), **kwargs)
