"""Argument checks and shared pieces of the inverse-HVP solvers (:mod:`skdattri.func.ihvp`,
:mod:`skdattri.func._cg`, :mod:`skdattri.func.sketch`)."""

from __future__ import annotations

import math
import numbers

import torch
from sklearn.exceptions import NotFittedError

from .hessian import DenseOperator, LinearOperator


def _as_operator(A):
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor) and A.dim() == 2:
        return DenseOperator(A)
    raise TypeError(
        "The curvature must be a skdattri.func.LinearOperator or a dense (p, p) tensor, "
        f"got {type(A).__name__}."
    )


def _check_real(value, name, *, low=None, strict=False):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    if low is not None and (value < low or (strict and value == low)):
        sign = ">" if strict else ">="
        raise ValueError(f"{name} must be {sign} {low}, got {value!r}.")
    return float(value)


def _check_int(value, name, *, low=1):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}.")
    return int(value)


def _check_fitted(solver, attribute):
    if not hasattr(solver, attribute):
        raise NotFittedError(
            f"This {type(solver).__name__} instance is not fitted yet. Call 'fit' with the "
            "curvature operator before 'solve'."
        )


def _not_pd_message(smallest, damping, what):
    return (
        f"{what} + damping * I is not positive definite: its smallest eigenvalue is "
        f"{smallest:.3g} with damping={damping:.3g}. Increase the damping (regularization), "
        "or use the Gauss-Newton curvature (hessian='ggn'), which is positive semi-definite."
    )


def _drop_null_space(eigenvalues, eigenvectors, damping, threshold, what):
    """Keep eigenpairs with ``eigenvalue + damping > threshold``; raise if indefinite.

    Eigenvalues within ``threshold`` of zero (after damping) are the curvature's
    numerical null space -- e.g. the shift invariance of a softmax with unpenalised
    intercepts -- and are dropped, which makes the solve a pseudo-inverse: exact for
    vectors orthogonal to the null space, as every per-sample gradient of such a model
    is. A clearly negative eigenvalue means the curvature is indefinite: ValueError.

    ``eigenvectors`` holds one eigenvector per row.
    """
    shifted = eigenvalues + damping
    smallest = float(eigenvalues.min()) if eigenvalues.numel() else 0.0
    if bool((shifted < -threshold).any()):
        raise ValueError(_not_pd_message(smallest, damping, what))
    keep = shifted > threshold
    if not bool(keep.any()):
        raise ValueError(_not_pd_message(smallest, damping, what))
    return eigenvalues[keep], eigenvectors[keep].contiguous()
