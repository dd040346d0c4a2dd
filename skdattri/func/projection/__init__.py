"""Random projections in plain torch: dense, sparse JL, masks, compositions, Kronecker.

A projector maps row vectors of length ``n_features`` (per-sample gradients, in
the gradient methods) to ``out_dim`` coordinates so that inner products are
preserved in expectation (Johnson-Lindenstrauss). A projector is built once,
from an integer seed, and then applied to any number of batches: train
gradients in ``fit`` and query gradients in ``transform`` go through the same
projection whatever their batch sizes or order.

Every random number is a pure function of ``(seed, position)``: entry
``(i, j)`` of a projection matrix, the hashed bucket and sign of an SJLT input
coordinate, the coordinates a random mask keeps, are computed from a
counter-based hash (SplitMix64) of the seed and of the position, with integer
arithmetic that is identical on every torch device. Hence

* a matrix does not depend on how it is generated (all at once, or block by
  block when it would not fit in memory),
* it is the same on CPU and CUDA (bitwise for ``"rademacher"``, ``"sjlt"`` and
  the random mask; to a few units in the last place for ``"gaussian"``, whose
  Box-Muller transform uses the device's ``log``/``cos``), so a cache fitted on a
  GPU can be moved to a CPU (``to``) or pickled and reloaded there,
* every output row depends only on the matching input row.

The pieces, one module each:

- ``_random``: SplitMix64 on int64 tensors, keys, sub-seeds, random subsets;
- ``_base``: argument checks, devices, pickling, the ``partial_fit`` /
  ``finalize`` protocol of data-dependent projectors;
- ``_dense``: :class:`DenseProjector` (Gaussian / Rademacher; generated once,
  applied as one matrix product);
- ``_sparse``: :class:`SJLTProjector` (sparse JL / CountSketch, for very large inputs);
- ``_mask``: :class:`RandomMaskProjector`, :class:`SelectiveMaskProjector`;
- ``_compose``: :class:`ComposedProjector` (GraSS = mask then SJLT);
- ``_layerwise``: :class:`LayerwiseProjector`;
- ``_kronecker``: :class:`KroneckerProjector`, :class:`LayerwiseKroneckerProjector`,
  :func:`make_kronecker_projector`, :func:`layer_shapes` (LoGra, FactGraSS);
- ``_single`` / ``_make``: the ``proj_type`` names and :func:`make_projector`.
"""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

from ._compose import ComposedProjector
from ._dense import DenseProjector
from ._kronecker import (
    KroneckerProjector,
    LayerwiseKroneckerProjector,
    layer_shapes,
    make_kronecker_projector,
)
from ._layerwise import LayerwiseProjector
from ._make import make_projector
from ._mask import RandomMaskProjector, SelectiveMaskProjector
from ._random import _derive_key, _hash_, _splitmix64_py  # noqa: F401  (tests, tools)
from ._single import DATA_FREE_PROJ_TYPES, PROJ_TYPES
from ._sparse import SJLTProjector

__all__ = [
    "DATA_FREE_PROJ_TYPES",
    "PROJ_TYPES",
    "ComposedProjector",
    "DenseProjector",
    "KroneckerProjector",
    "LayerwiseKroneckerProjector",
    "LayerwiseProjector",
    "RandomMaskProjector",
    "SJLTProjector",
    "SelectiveMaskProjector",
    "layer_shapes",
    "make_kronecker_projector",
    "make_projector",
]
