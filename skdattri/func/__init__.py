"""Pure torch kernels for attribution methods (no estimator state).

For people developing new methods: per-sample gradients, Hessian and Gauss-Newton
vector products (:mod:`skdattri.func.hessian`), inverse-HVP solvers
(:mod:`skdattri.func.ihvp`; the Nystrom sketch and the diagonal in
:mod:`skdattri.func.sketch`), K-FAC / EK-FAC factors (:mod:`skdattri.func.kfac`),
DataInf (:mod:`skdattri.func.datainf`) and random projections
(:mod:`skdattri.func.projection`). The dense Hessian is
:func:`skdattri.func.hessian.hessian` (not re-exported here, to keep the module name).
"""

from ._grad import (
    flatten_tree,
    linear_per_sample_grad,
    model_per_sample_grads,
    per_sample_grad,
    unflatten_like,
)
from .datainf import datainf_damping, datainf_ihvp
from .hessian import (
    DenseOperator,
    GGNOperator,
    HessianOperator,
    LinearModelOperator,
    LinearOperator,
    ggn,
    ggn_vp,
    hvp,
)
from .ihvp import (
    ArnoldiIHVP,
    ConjugateGradientIHVP,
    ExplicitIHVP,
    LissaIHVP,
    arnoldi,
    eigen_ihvp,
)
from .kfac import (
    KFACFactors,
    ekfac_ihvp,
    fit_ekfac,
    layer_grads_from_flat,
    layer_grads_to_flat,
)
from .projection import (
    ComposedProjector,
    DenseProjector,
    KroneckerProjector,
    LayerwiseKroneckerProjector,
    LayerwiseProjector,
    RandomMaskProjector,
    SelectiveMaskProjector,
    SJLTProjector,
    make_kronecker_projector,
    make_projector,
)
from .sketch import DiagonalIHVP, NystromIHVP, gradient_square_mean, nystrom

__all__ = [
    "ArnoldiIHVP",
    "ConjugateGradientIHVP",
    "DenseOperator",
    "DiagonalIHVP",
    "ExplicitIHVP",
    "GGNOperator",
    "HessianOperator",
    "KFACFactors",
    "LinearModelOperator",
    "LinearOperator",
    "LissaIHVP",
    "NystromIHVP",
    "arnoldi",
    "datainf_damping",
    "datainf_ihvp",
    "eigen_ihvp",
    "ekfac_ihvp",
    "fit_ekfac",
    "ggn",
    "gradient_square_mean",
    "ggn_vp",
    "hvp",
    "layer_grads_from_flat",
    "layer_grads_to_flat",
    "nystrom",
    "ComposedProjector",
    "DenseProjector",
    "KroneckerProjector",
    "LayerwiseKroneckerProjector",
    "LayerwiseProjector",
    "RandomMaskProjector",
    "SJLTProjector",
    "SelectiveMaskProjector",
    "make_kronecker_projector",
    "make_projector",
    "flatten_tree",
    "linear_per_sample_grad",
    "model_per_sample_grads",
    "per_sample_grad",
    "unflatten_like",
]
