"""TracIn (TracInCP), Grad-Dot and Grad-Cos."""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval

from ._utils import _take_rows, _tree_to
from .base import BaseAttributor
from .callbacks import TrainingRecorder
from .func._grad import _hook_layers
from .func.ghost import (
    GhostFeatures,
    _configured_layout,
    ghost_gram,
    ghost_row_dot,
    ghost_scale,
    ghost_sq_norms,
)

__all__ = ["TracIn"]


class TracIn(BaseAttributor):
    """TracIn: gradient similarity summed over training checkpoints.

    ``S[i, j] = sum_c lr_c * grad_c(query_i) . grad_c(loss of train_j)`` (Pruthi et al.,
    2020, TracInCP). With no ``checkpoints`` it is Grad-Dot on the fitted model, and
    ``normalize=True`` gives Grad-Cos (cosine of the two gradients). Training-side
    gradients are computed once in ``fit`` and cached on ``device``; ``transform``
    computes each query gradient once and does one matrix product per block.

    Parameters
    ----------
    estimator : object
        The model to explain: a skorch net, a scikit-learn linear model or MLP, a
        ``torch.nn.Module`` (with ``loss``), a ``FrozenEstimator`` or a ``Pipeline``
        ending in one. Fitted models are used as they are; unfitted ones are cloned
        and trained in ``fit``.
    checkpoints : list of dict, torch.nn.Module or fitted estimators, or \
TrainingRecorder, default=None
        Training checkpoints (state dicts or fitted models of the same architecture),
        or a :class:`~skdattri.callbacks.TrainingRecorder` that recorded the training
        run (its checkpoints and learning rates). ``None`` uses the fitted model alone
        (Grad-Dot).
    learning_rates : float or array-like of shape (n_checkpoints,), default=None
        Weight of each checkpoint (its learning rate in TracInCP); ``None`` means 1, or
        the recorded learning rates when ``checkpoints`` is a recorder.
    normalize : bool, default=False
        Divide each gradient by its norm (Grad-Cos).
    target : {"loss", "margin"} or callable, default="loss"
        What is explained for the queries: their loss, their margin (log-odds of the
        correct class), or a callable ``(outputs, y) -> (n,)`` per-sample values
        treated like a loss (lower is better).
    loss : {"cross_entropy", "mse"}, torch loss module or callable, default=None
        Per-sample training loss; required for a plain ``nn.Module``.
    layers : str or list of str, default=None
        Restrict gradients to parameters whose names start with these prefixes;
        ``"last"``: the parameters of the last ``nn.Linear`` / ``nn.Conv1d`` /
        ``nn.Conv2d`` layer in module order (Captum's TracInCPFast: last-layer TracIn,
        scored by ghost products ``(a_i . a_j)(g_i . g_j)``). A module named
        ``"last"`` takes precedence.
    proj_dim : int, default=None
        Randomly project gradients to this dimension (``None``: no projection).
    proj_type : {"gaussian", "rademacher", "sjlt", "random_mask", "selective_mask", \
"grass", "selective_grass"}, default="gaussian"
        Kind of random projection (see :func:`skdattri.func.projection.make_projector`):
        dense Gaussian or Rademacher, sparse JL, a random or selective coordinate mask,
        or GraSS (a mask followed by sparse JL; Hu et al., 2025). The selective ones
        pick their coordinates from the training gradients (one more pass in ``fit``).
    random_state : int, RandomState instance or None, default=None
        Seeds the projection and, for an unfitted torch model, its training.
    store : None, "memory", str or path-like, default=None
        Where the training-side cache lives: in memory (``None``, ``"memory"``) or in a
        file under this directory, written block by block in ``fit`` and read block by
        block in ``transform`` (see :mod:`skdattri.store`): memory stays bounded by a
        block of rows, not by ``n_train``. A fitted attributor pickles with the file's
        path; the file must stay where it is.
    store_dtype : {None, "float16", "bfloat16", "float32", "float64"}, default=None
        Precision of the stored rows (``None``: the model's dtype); half precision
        halves the cache, and scores are computed in the model's dtype.
    batch_size : int, default=256
        Samples per block of per-sample gradients; results do not depend on it.
    device : str or torch.device, default="auto"
        Where the caches live and the work runs; "auto" = CUDA when available.
    n_jobs : int, default=None
        Number of torch threads during fit/transform (``None``: torch's default); above
        1, the training gradients of ``fit`` are computed in shards by that many joblib
        workers with one torch thread each (any joblib backend, e.g. Dask through
        ``joblib.parallel_config(backend="dask")``; same results as a serial fit).
    verbose : int, default=0
        Show progress bars.

    Attributes
    ----------
    estimator_ : object
        The fitted model that is explained.
    model_ : skdattri.model.TorchModel
        Functional view of the model.
    param_names_ : list of str
        Names of the parameters the gradients cover.
    n_train_ : int
        Number of training samples.
    n_features_in_ : int
        Number of features of tabular training input.
    device_ : torch.device
        Device of the caches.
    learning_rates_ : ndarray of shape (n_checkpoints,)
        Weight of each checkpoint.
    train_grads_ : list of skdattri.store.BaseStore of shape (n_train, n_grad)
        Cached training gradients per checkpoint (projected / normalised when asked),
        in memory or on disk (``store``); ``train_grads_[c][a:b]`` reads rows. With
        ghost products they are stored as factor rows of ``ghost_layout_.width``
        columns (layer inputs and output gradients, explicit gradients of the other
        parameters) instead of ``n_grad``.
    ghost_layout_ : skdattri.func.ghost.GhostLayout or None
        Which layers are scored by ghost inner products, and the columns of the
        factor rows; ``None`` when the gradients are materialised.
    projector_ : object or None
        The random projection shared by train and query gradients.

    See Also
    --------
    InfluenceFunction : Gradients weighted by the inverse Hessian.
    TRAK : Projected after-kernel with an ensemble of models.

    Notes
    -----
    Without projection, gradients of ``nn.Linear`` / convolution layers need not be
    formed: the per-sample gradient of such a layer is ``sum_t g_t a_t^T`` (layer
    inputs and output gradients), so inner products are ``sum_{s,t} (a_is . a_jt)
    (g_is . g_jt)`` (ghost inner products, :mod:`skdattri.func.ghost`). ``fit`` then
    stores the factors -- ``T (d_in + d_out)`` numbers per layer and sample instead of
    ``d_in * d_out`` -- for the layers where that is cheaper, explicit gradients for
    the rest, and scores are the same within float tolerance. The choice is
    :func:`skdattri.set_config` / :func:`skdattri.config_context` (``ghost=``).

    The sign convention of skdattri: ``S[i, j] > 0`` means that a gradient step on
    training sample ``j`` lowers the loss of query ``i`` (or raises its margin).

    References
    ----------
    .. [1] Pruthi, Liu, Kale, Sundararajan. "Estimating Training Data Influence by
       Tracing Gradient Descent". NeurIPS 2020.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skdattri import TracIn
    >>> X, y = load_digits(return_X_y=True)
    >>> X = X / 16.0
    >>> model = LogisticRegression(max_iter=200).fit(X[:300], y[:300])
    >>> attr = TracIn(model).fit(X[:300], y[:300])
    >>> scores = attr.transform(X[300:305], y[300:305])
    >>> scores.shape
    (5, 300)
    >>> bool(attr.self_influence().min() >= 0)
    True
    """

    _parameter_constraints: dict = {
        **BaseAttributor._parameter_constraints,
        "learning_rates": [None, Interval(Real, 0, None, closed="neither"), "array-like"],
        "normalize": ["boolean"],
    }

    def __init__(self, estimator, *, checkpoints=None, learning_rates=None, normalize=False,
                 target="loss", loss=None, layers=None, proj_dim=None, proj_type="gaussian",
                 random_state=None, store=None, store_dtype=None, batch_size=256, device="auto",
                 n_jobs=None, verbose=0):
        self.estimator = estimator
        self.checkpoints = checkpoints
        self.learning_rates = learning_rates
        self.normalize = normalize
        self.target = target
        self.loss = loss
        self.layers = layers
        self.proj_dim = proj_dim
        self.proj_type = proj_type
        self.random_state = random_state
        self.store = store
        self.store_dtype = store_dtype
        self.batch_size = batch_size
        self.device = device
        self.n_jobs = n_jobs
        self.verbose = verbose

    _device_attributes = ("model_", "train_grads_", "projector_", "_params_", "_train_data_")

    def _select_params(self):
        if self.layers != "last" or "last" in dict(self.model_.module.named_modules()):
            return super()._select_params()
        layers = _hook_layers(self.model_, list(self.model_.named_params()))
        if not layers:
            raise ValueError(
                "layers='last' needs an nn.Linear, nn.Conv1d or nn.Conv2d layer with "
                "trainable parameters; the model has none.")
        _, weight, bias = layers[list(layers)[-1]]
        return [n for n in (weight, bias) if n]

    @property
    def _ghost(self):
        return getattr(self, "ghost_layout_", None)

    def _feature_map(self, projector):
        if self._ghost is not None:
            return GhostFeatures(self.model_, self._ghost)
        return super()._feature_map(projector)

    def _choose_ghost(self, params, X):
        """The factor layout when ghost products apply (no projection, and -- for
        ``ghost="auto"`` -- hooks allowed and factor rows narrower than gradients)."""
        if self.projector_ is not None:
            return None
        return _configured_layout(self.model_, params, self.param_names_, X)

    def _norms(self, g):
        if self._ghost is not None:
            return ghost_sq_norms(g, self._ghost).clamp_min(0).sqrt_()[:, None]
        return torch.linalg.vector_norm(g, dim=1, keepdim=True)

    def _scaled(self, g, scale, inplace=False):
        """The features of ``scale * gradient`` (factor rows scale their ``g`` part)."""
        if self._ghost is not None:
            return ghost_scale(g, scale, self._ghost, inplace=inplace)
        return g.mul_(scale) if inplace else g * scale

    def _prepare(self, g, inplace=False):
        if self.normalize:
            norms = self._norms(g).clamp_min(torch.finfo(g.dtype).tiny)
            g = self._scaled(g, 1.0 / norms, inplace=inplace)
        return g

    def _dot(self, Q, G):
        if self._ghost is not None:
            return ghost_gram(Q, G, self._ghost)
        return Q @ G.T

    def _row_dot(self, P, Q):
        if self._ghost is not None:
            return ghost_row_dot(P, Q, self._ghost)
        return (P * Q).sum(1)

    def _fit(self, X, y):
        params = self._checkpoint_params()
        lrs = self.learning_rates
        if lrs is None and isinstance(self.checkpoints, TrainingRecorder):
            lrs = self.checkpoints.learning_rates_
        lrs = np.atleast_1d(np.asarray(1.0 if lrs is None else lrs, dtype=np.float64))
        if lrs.size == 1:
            lrs = np.full(len(params), lrs[0])
        elif lrs.size != len(params):
            raise ValueError(
                f"learning_rates has {lrs.size} values for {len(params)} checkpoints."
            )
        self.learning_rates_ = lrs
        n_grad = sum(params[0][n].numel() for n in self.param_names_)
        self.projector_ = self._make_projector(n_grad)
        self.ghost_layout_ = self._choose_ghost(
            params[0], _tree_to(_take_rows(X, slice(0, 2)), self.device_))
        self._params_ = params
        self.train_grads_ = []
        with torch.no_grad():
            for c, p in enumerate(params):
                self.train_grads_.append(self._train_matrix(
                    p, X, y, "loss", desc=f"train gradients [{c}]", projector=self.projector_,
                    postprocess=lambda g: self._prepare(g, inplace=True)))
        if self.target != "loss":
            # self-influence needs query-side gradients of the training rows
            self._train_data_ = (X, y)
        else:
            self._train_data_ = None

    def _query_grads(self, c, xb, yb, what):
        return self._prepare(self._block_grads(self._params_[c], xb, yb, what,
                                               self.projector_))

    def _query_features(self, X, y, what):
        for sl, xb, yb in self._batches(X, y, desc="query gradients"):
            yield sl, [self._scaled(self._query_grads(c, xb, yb, what), float(lr), True)
                       for c, lr in enumerate(self.learning_rates_)]

    def _score(self, features, rows):
        return sum(self._dot(q, G[rows]) for q, G in zip(features, self.train_grads_))

    def _self_influence(self):
        out = torch.zeros(self.n_train_, dtype=self.model_.dtype, device=self.device_)
        if self._train_data_ is None:
            for c, G in enumerate(self.train_grads_):
                for rows, block in G.blocks():
                    out[rows] += float(self.learning_rates_[c]) * self._row_dot(block, block)
            return out
        X, y = self._train_data_
        for sl, xb, yb in self._batches(X, y, desc="self-influence"):
            for c, G in enumerate(self.train_grads_):
                q = self._query_grads(c, xb, yb, self._query_value(True))
                out[sl] += float(self.learning_rates_[c]) * self._row_dot(q, G[sl])
        return out
