"""One projector from a ``proj_type`` name (the table every factory shares)."""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

from ._base import _check_positive_int
from ._compose import ComposedProjector
from ._dense import DenseProjector
from ._mask import RandomMaskProjector, SelectiveMaskProjector
from ._sparse import SJLTProjector

#: Every projection name, in the order the documentation lists them.
PROJ_TYPES = ("gaussian", "rademacher", "sjlt", "random_mask", "selective_mask", "grass",
              "selective_grass")
#: The names whose projection is a function of the seed alone (no data needed).
DATA_FREE_PROJ_TYPES = ("gaussian", "rademacher", "sjlt", "random_mask", "grass")

_MASKS = {"random_mask": RandomMaskProjector, "selective_mask": SelectiveMaskProjector}
# GraSS variants: which mask goes before the SJLT
_GRASS_MASKS = {"grass": "random_mask", "selective_grass": "selective_mask"}


def _check_proj_type(proj_type):
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}.")


def _default_mask_dim(n_features, proj_dim):
    """GraSS's intermediate dimension when none is given: ``min(p, 4 k)``."""
    return min(n_features, 4 * proj_dim)


def _build_projector(n_features, proj_dim, proj_type, *, n_nonzero, mask_dim, seed, device,
                     dtype, max_dense_bytes):
    """The projector ``proj_type`` names (arguments already resolved: ``seed`` an int)."""
    _check_proj_type(proj_type)
    common = {"random_state": seed, "device": device, "dtype": dtype}
    if proj_type in ("gaussian", "rademacher"):
        return DenseProjector(n_features, proj_dim, proj_type=proj_type,
                              max_dense_bytes=max_dense_bytes, **common)
    if proj_type == "sjlt":
        return SJLTProjector(n_features, proj_dim, n_nonzero=n_nonzero, **common)
    if proj_type in _MASKS:
        return _MASKS[proj_type](n_features, proj_dim, **common)
    n_features = _check_positive_int(n_features, "n_features")
    proj_dim = _check_positive_int(proj_dim, "proj_dim")
    if mask_dim is None:
        mask_dim = _default_mask_dim(n_features, proj_dim)
    mask_dim = _check_positive_int(mask_dim, "mask_dim")
    if mask_dim > n_features:
        raise ValueError(
            f"mask_dim={mask_dim} must not exceed n_features={n_features} (a mask keeps "
            "a subset of the input coordinates)."
        )
    mask = _MASKS[_GRASS_MASKS[proj_type]](n_features, mask_dim, **common)
    return ComposedProjector(mask, SJLTProjector(mask_dim, proj_dim, n_nonzero=n_nonzero,
                                                 **common))

