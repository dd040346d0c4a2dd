"""Random projection transformer on torch (CPU or CUDA).

:class:`TorchRandomProjection` is the scikit-learn face of the projection kit
of :mod:`skdattri.func.projection`: the same Gaussian, Rademacher, sparse
Johnson-Lindenstrauss, mask and GraSS projections that gradient attribution
methods use to compress per-sample gradients, as a transformer that mirrors
:mod:`sklearn.random_projection`.
"""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import DataDimensionalityWarning
from sklearn.random_projection import johnson_lindenstrauss_min_dim
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._utils import _resolve_device
from .func.projection import PROJ_TYPES, make_projector

__all__ = ["TorchRandomProjection"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    np.float32: torch.float32,
    np.float64: torch.float64,
}


def _from_numpy(X):
    """A tensor view of a validated array (read-only inputs, e.g. memmaps, are only read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(X)


class TorchRandomProjection(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Reduce dimensionality with a random projection computed in torch.

    The projection matrix is a pure function of ``random_state`` (see
    :func:`skdattri.func.projection.make_projector`): it is generated on the
    device, never transferred, and gives the same result on CPU and GPU and
    for any batch of rows. ``"sjlt"``, the masks and GraSS never form a dense
    matrix, so inputs with millions of features can be projected.

    Parameters
    ----------
    n_components : int or "auto", default="auto"
        Dimension of the projected space. ``"auto"`` uses
        :func:`sklearn.random_projection.johnson_lindenstrauss_min_dim` with
        ``eps`` and the number of samples seen in ``fit``.
    proj_type : {"gaussian", "rademacher", "sjlt", "random_mask", \
"selective_mask", "grass", "selective_grass"}, default="gaussian"
        ``"gaussian"``: entries N(0, 1/n_components); ``"rademacher"``: entries
        +-1/sqrt(n_components); ``"sjlt"``: sparse Johnson-Lindenstrauss
        (CountSketch when ``n_nonzero=1``); ``"random_mask"``: ``n_components``
        features drawn at random, scaled by sqrt(n_features / n_components);
        ``"selective_mask"``: the ``n_components`` features of largest mean
        square in the data seen by ``fit`` (data-dependent: a feature selection,
        not a random projection); ``"grass"`` / ``"selective_grass"``: a random
        / selective mask to ``mask_dim`` features, then an SJLT.
    n_nonzero : int, default=1
        Number of non-zeros per input feature of the SJLT (``"sjlt"`` and the
        GraSS types); must not exceed the number of components. Ignored for the
        other types.
    mask_dim : int, default=None
        Intermediate dimension of the GraSS types (at most ``n_features``);
        ``min(n_features, 4 * n_components)`` when None. Ignored otherwise.
    eps : float, default=0.1
        Distortion bound used when ``n_components="auto"``.
    random_state : int, RandomState instance or None, default=None
        Controls the projection matrix drawn at fit time. Pass an int for
        reproducible output across calls.
    device : str or torch.device, default="auto"
        Where the projection is computed; ``"auto"`` means CUDA when available,
        else the CPU.
    dtype : {"float32", "float64"}, torch dtype or None, default=None
        Precision of the projection and of the output. None keeps the dtype of
        the data seen in ``fit`` (float32 stays float32, anything else becomes
        float64).

    Attributes
    ----------
    n_components_ : int
        Number of components actually used.
    projector_ : projector
        The fitted projector (:func:`~skdattri.func.projection.make_projector`),
        callable on tensors of shape (n, n_features_in_).
    device_ : torch.device
        Device the projection runs on.
    dtype_ : torch.dtype
        Precision of the projection and of the output.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during fit, when ``X`` has string column names.

    See Also
    --------
    sklearn.random_projection.GaussianRandomProjection : NumPy Gaussian projection.
    sklearn.random_projection.SparseRandomProjection : NumPy sparse projection.
    skdattri.func.projection.make_projector : The underlying torch projector.

    Notes
    -----
    ``transform`` returns the same kind of object it receives: a numpy array
    for array-likes, a tensor (on the input's device) for tensors. Inputs are
    cast to ``dtype_``. A mask keeps a subset of the features, so it needs
    ``n_components <= n_features``; ``fit`` of the selective types reads the
    values of ``X`` (the other types only its shape).

    References
    ----------
    .. [1] Achlioptas, D. "Database-friendly random projections:
       Johnson-Lindenstrauss with binary coins", JCSS 2003.
    .. [2] Kane, D. and Nelson, J. "Sparser Johnson-Lindenstrauss Transforms",
       JACM 2014.

    Examples
    --------
    >>> import numpy as np
    >>> from skdattri.random_projection import TorchRandomProjection
    >>> X = np.random.RandomState(42).rand(25, 3000)
    >>> transformer = TorchRandomProjection(100, proj_type="sjlt", random_state=0, device="cpu")
    >>> X_new = transformer.fit_transform(X)
    >>> X_new.shape, X_new.dtype
    ((25, 100), dtype('float64'))
    >>> bool(np.allclose(transformer.transform(X[:5]), X_new[:5]))
    True
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "proj_type": [StrOptions(set(PROJ_TYPES))],
        "n_nonzero": [Interval(Integral, 1, None, closed="left")],
        "mask_dim": [None, Interval(Integral, 1, None, closed="left")],
        "eps": [Interval(Real, 0, None, closed="neither")],
        "random_state": ["random_state"],
        "device": [str, torch.device],
        "dtype": [None, StrOptions({"float32", "float64"}), torch.dtype, type],
    }

    def __init__(
        self,
        n_components="auto",
        *,
        proj_type="gaussian",
        n_nonzero=1,
        mask_dim=None,
        eps=0.1,
        random_state=None,
        device="auto",
        dtype=None,
    ):
        self.n_components = n_components
        self.proj_type = proj_type
        self.n_nonzero = n_nonzero
        self.mask_dim = mask_dim
        self.eps = eps
        self.random_state = random_state
        self.device = device
        self.dtype = dtype

    def _validate_tensor(self, X, *, reset):
        """validate_data's checks for a torch tensor (kept on its device)."""
        if X.ndim != 2:
            raise ValueError(
                f"Expected a 2D tensor, got a {X.ndim}D tensor of shape {tuple(X.shape)}."
            )
        if X.shape[0] < 1:
            raise ValueError(
                f"Found array with 0 sample(s) (shape={tuple(X.shape)}) while a minimum "
                "of 1 is required."
            )
        if X.is_complex():
            raise ValueError("Complex data not supported.")
        if not X.is_floating_point():
            X = X.to(torch.float64)
        if not bool(torch.isfinite(X).all()):
            raise ValueError("Input X contains NaN or infinity.")
        if reset:
            self.n_features_in_ = X.shape[1]
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        return X

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Draw the projection for data of the shape of ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Training data; only its shape and dtype are used, except by the
            selective types, which select features from its values.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : TorchRandomProjection
            The fitted transformer.
        """
        if isinstance(X, torch.Tensor):
            X = self._validate_tensor(X, reset=True)
            in_dtype = X.dtype
        else:
            X = validate_data(self, X, dtype=[np.float64, np.float32])
            in_dtype = torch.float32 if X.dtype == np.float32 else torch.float64
        n_samples, n_features = X.shape

        if self.n_components == "auto":
            n_components = int(johnson_lindenstrauss_min_dim(n_samples=n_samples, eps=self.eps))
            if n_components > n_features:
                raise ValueError(
                    f"eps={self.eps} and n_samples={n_samples} lead to a target dimension "
                    f"of {n_components} which is larger than the original space with "
                    f"n_features={n_features}; set n_components or a larger eps."
                )
            self._check_sizes(n_features, n_components)
        else:
            n_components = self.n_components
            self._check_sizes(n_features, n_components)
            if n_components > n_features:
                warnings.warn(
                    "The number of components is higher than the number of features: "
                    f"n_features < n_components ({n_features} < {n_components}). "
                    "The dimensionality of the problem will not be reduced.",
                    DataDimensionalityWarning,
                )

        if self.dtype is None:
            dtype = torch.float32 if in_dtype == torch.float32 else torch.float64
        elif self.dtype in _DTYPES:
            dtype = _DTYPES[self.dtype]
        else:
            raise ValueError(
                f"dtype must be 'float32', 'float64' or None, got {self.dtype!r}."
            )

        self.n_components_ = n_components
        self.device_ = _resolve_device(self.device)
        self.dtype_ = dtype
        self.projector_ = make_projector(
            n_features,
            n_components,
            proj_type=self.proj_type,
            n_nonzero=self.n_nonzero,
            mask_dim=self.mask_dim,
            random_state=self.random_state,
            device=self.device_,
            dtype=dtype,
        )
        if self.projector_.requires_fit:
            self._fit_projector(X)
        # Required by ClassNamePrefixFeaturesOutMixin.get_feature_names_out.
        self._n_features_out = n_components
        return self

    def _check_sizes(self, n_features, n_components):
        """sklearn-style errors for sizes the chosen projection cannot take."""
        if self.proj_type in ("sjlt", "grass", "selective_grass") and \
                self.n_nonzero > n_components:
            raise ValueError(
                f"n_nonzero={self.n_nonzero} must not exceed the number of components "
                f"({n_components})."
            )
        if self.proj_type in ("random_mask", "selective_mask") and n_components > n_features:
            raise ValueError(
                f"proj_type={self.proj_type!r} keeps n_components={n_components} of the "
                f"n_features={n_features} features: set n_components <= n_features."
            )
        if self.proj_type in ("grass", "selective_grass") and self.mask_dim is not None \
                and self.mask_dim > n_features:
            raise ValueError(
                f"mask_dim={self.mask_dim} must not exceed n_features={n_features}."
            )

    def _fit_projector(self, X):
        """Feed ``X`` to a data-dependent projector, in blocks of rows."""
        X = X if isinstance(X, torch.Tensor) else _from_numpy(X)
        step = max(1, 2**24 // X.shape[1])
        for start in range(0, X.shape[0], step):
            self.projector_.partial_fit(X[start : start + step])
        self.projector_.finalize()

    def transform(self, X):
        """Project ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Data to project.

        Returns
        -------
        X_new : ndarray or torch.Tensor of shape (n_samples, n_components_)
            Projected data, of dtype ``dtype_``; a tensor on ``X``'s device
            when ``X`` is a tensor, else a numpy array.
        """
        check_is_fitted(self)
        if isinstance(X, torch.Tensor):
            X = self._validate_tensor(X, reset=False)
            return self.projector_(X).to(X.device)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self.projector_(_from_numpy(X)).cpu().numpy()

    def __setstate__(self, state):
        super().__setstate__(state)
        # a projector saved on a GPU falls back to the CPU when CUDA is missing
        if hasattr(self, "projector_"):
            self.device_ = self.projector_.device

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.sparse = False
        return tags
