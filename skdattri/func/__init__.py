"""Pure torch kernels for attribution methods (no estimator state).

Per-sample gradients, and (as they land) Hessian-vector products, inverse-HVP
solvers, K-FAC/EK-FAC factors and random projections.
"""

from ._grad import (
    flatten_tree,
    linear_per_sample_grad,
    model_per_sample_grads,
    per_sample_grad,
    unflatten_like,
)
from .projection import DenseProjector, LayerwiseProjector, SJLTProjector, make_projector

__all__ = [
    "DenseProjector",
    "LayerwiseProjector",
    "SJLTProjector",
    "make_projector",
    "flatten_tree",
    "linear_per_sample_grad",
    "model_per_sample_grads",
    "per_sample_grad",
    "unflatten_like",
]
