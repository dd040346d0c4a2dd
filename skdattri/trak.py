"""TRAK: projected after-kernel attribution with an ensemble of models."""

from __future__ import annotations

import contextlib
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.base import clone
from sklearn.utils._param_validation import Interval, StrOptions

from ._utils import PROJECTION_BYTES, _child_seed, _seed_from, _thread_limit
from .base import BaseAttributor
from .func.projection import make_projector
from .model import checkpoint_state, dropout_member, dropout_modules, fit_or_keep, is_fitted

__all__ = ["TRAK"]

#: query rows whose features an ensemble computes model by model (one projection
#: matrix generated per model and chunk)
_QUERY_CHUNK = 4096

#: ``proj_dim="auto"``: project to this many coordinates; fewer gradient coordinates are
#: kept as they are.
AUTO_PROJ_DIM = 512
#: ``regularization="auto"``: this many times the mean non-zero eigenvalue
#: ``trace / min(n_train, k)`` of each model's kernel ``Phi^T Phi`` (chosen on the digits
#: settings, see the class Notes).
AUTO_REGULARIZATION = 1.0


def _reseed(estimator, seed):
    """Set every ``random_state`` parameter (nested ones too, e.g. ``module__random_state``)."""
    keys = [k for k in estimator.get_params(deep=True)
            if k == "random_state" or k.endswith("__random_state")]
    if keys:
        estimator.set_params(**dict.fromkeys(keys, int(seed)))
    return estimator


def _fit_member(estimator, X, y, seed, reseed, one_thread):
    """Train one ensemble member (a joblib task): a clone of ``estimator`` under ``seed``."""
    if reseed:
        estimator = _reseed(clone(estimator), seed)
    context = _thread_limit(1) if one_thread else contextlib.nullcontext()
    with context:
        return fit_or_keep(estimator, X, y, random_state=seed)


class TRAK(BaseAttributor):
    """TRAK: attribution through the projected after-kernel of an ensemble of models.

    For each model ``m`` of the ensemble, the gradients of the margin ``f(z) = log(p /
    (1 - p))`` of every training sample (``p`` the probability of its label) are
    randomly projected to ``proj_dim`` coordinates, giving ``Phi_m`` of shape
    ``(n_train, proj_dim)``. With ``phi_m(x)`` the projected gradient of a query and
    ``Q_m = diag(1 - p_j)`` the probability the model leaves to the other classes,

    ``S[i, :] = (1/M sum_m phi_m(x_i) (Phi_m^T Phi_m + regularization I)^{-1} Phi_m^T)
    diag(1/M sum_m Q_m)``

    (Park et al., 2023, Algorithm 1, without the final soft-thresholding). The kernel
    is inverted once per model in ``fit`` and folded into cached train features, so
    ``transform`` is one projected gradient and one matrix product per block of
    queries and model.

    Parameters
    ----------
    estimator : object
        The model to explain: a skorch net, a scikit-learn linear model or MLP, a
        ``torch.nn.Module`` (with ``loss``), a ``FrozenEstimator`` or a ``Pipeline``
        ending in one. A fitted model is used as it is; an unfitted one is cloned and
        ``n_models`` independently seeded copies are trained in ``fit``.
    n_models : int, default=1
        Size of the ensemble trained in ``fit`` (TRAK-1, TRAK-10, ...); only with an
        unfitted ``estimator`` and no ``checkpoints`` -- or, with ``dropout=True``, the
        number of dropout members of a fitted ``estimator``.
    dropout : bool, default=False
        Dropout ensemble (dattri's ``activate_dropout``): every member keeps its
        ``nn.Dropout`` layers active with its own fixed masks, drawn from a seed derived
        from ``random_state`` (see the Notes). With a fitted ``estimator`` the
        ``n_models`` members are the same network under ``n_models`` masks; trained
        members and ``checkpoints`` each get their own masks.
    checkpoints : list of dict, torch.nn.Module or fitted estimators, default=None
        The ensemble members, of the architecture of ``estimator`` (state dicts with
        every trainable parameter, or fitted models). ``None``: the ensemble is the
        fitted ``estimator`` itself, or the ``n_models`` models trained in ``fit``.
    proj_dim : int, "auto" or None, default="auto"
        Dimension of the random projection of the gradients; ``None`` keeps the full
        gradients (the kernel is then ``n_params x n_params``). ``"auto"``: 512, or the
        full gradients when they have at most 512 coordinates. A ``proj_dim`` above the
        number of gradient coordinates cannot add information: it warns and the full
        gradients are used.
    proj_type : {"rademacher", "gaussian", "sjlt"}, default="rademacher"
        Kind of random projection (see :func:`skdattri.func.make_projector`).
        Rademacher is the default of the reference TRAK implementation: the same
        Johnson-Lindenstrauss guarantee as Gaussian entries, cheaper to generate, and
        bitwise identical on CPU and CUDA.
    regularization : float or "auto", default="auto"
        ``lambda`` added to the diagonal of ``Phi^T Phi`` (a sum over the training
        samples, in the units of squared projected gradients). ``"auto"``: the mean
        non-zero eigenvalue ``trace(Phi_m^T Phi_m) / min(n_train, proj_dim)`` of each
        model's kernel, so scores do not change when the gradients are rescaled. With
        ``0`` (the paper's choice) the kernel must be invertible, which needs
        ``proj_dim`` at most the number of training samples and of gradient
        coordinates.
    target : {"margin", "loss"} or callable, default="margin"
        What is explained for the queries: their margin, their loss (a positive
        score lowers it), or a callable ``(outputs, y) -> (n,)`` per-sample values
        treated like a loss (lower is better). The training side uses the margin
        for ``"margin"`` and ``"loss"`` (as in TRAK) and minus the callable for a
        callable (as dattri's task function, which both sides differentiate); ``Q``
        stays the model's ``1 - p``.
    loss : {"cross_entropy", "mse"}, torch loss module or callable, default=None
        Per-sample loss; required for a plain ``nn.Module``.
    layers : str or list of str, default=None
        Restrict gradients to parameters whose names start with these prefixes.
    random_state : int, RandomState instance or None, default=None
        Seeds the projections (one independent projection per model) and the
        training of the ensemble. Pass an int for reproducible scores.
    store, store_dtype : default=None
        Where the projected gradients and train features live (memory or a directory)
        and in what precision, as in :class:`~skdattri.TracIn`: with a disk store,
        ``fit`` and ``transform`` hold one block of rows at a time.
    batch_size : int, default=256
        Samples per block of per-sample gradients; results do not depend on it.
    device : str or torch.device, default="auto"
        Where the caches live and the work runs; "auto" = CUDA when available.
    n_jobs : int, default=None
        Number of ensemble members trained in parallel (joblib processes, each with
        one torch thread) and number of torch threads of the gradient work
        (``None``: one process, torch's default threads).
    verbose : int, default=0
        Show progress bars.

    Attributes
    ----------
    estimator_ : object
        The fitted model that is explained (the first ensemble member when the
        ensemble is trained in ``fit``).
    estimators_ : list of estimators or None
        The fitted ensemble members when they are estimators (trained in ``fit``, or
        the fitted ``estimator`` alone); ``None`` when they are ``checkpoints``.
    n_models_ : int
        Number of ensemble members.
    model_ : skdattri.model.TorchModel
        Functional view of ``estimator_``.
    param_names_ : list of str
        Names of the parameters the gradients cover.
    n_train_ : int
        Number of training samples.
    n_features_in_ : int
        Number of features of tabular training input.
    device_ : torch.device
        Device of the caches.
    proj_dim_ : int or None
        The projection dimension used (``None``: full gradients).
    regularization_ : ndarray of shape (n_models_,)
        The ``lambda`` of each model's kernel (the values ``"auto"`` chose).
    projectors_ : list of projectors or None, one per model
        The random projection of each model (``None`` entries without projection).
    train_features_ : list of skdattri.store.BaseStore of shape (n_train, proj_dim), one \
per model
        The projected training gradients ``Phi_m``, in memory or on disk (``store``):
        scores are ``-sum_m phi_m(x) @ kernel_inverses_[m] @ train_features_[m][:].T
        * train_scale_``.
    kernel_inverses_ : list of Tensor of shape (proj_dim, proj_dim), one per model
        ``(Phi_m^T Phi_m + lambda I)^{-1}``, computed in float64, kept in the model's
        dtype.
    train_scale_ : Tensor of shape (n_train,)
        ``Q / M``: the averaged reweighting over the number of models.
    train_weights_ : Tensor of shape (n_train,)
        The averaged reweighting ``Q``: ``1 - p_j`` for classifiers, ``-dloss/df``
        (the residual) for single-output regressors.

    See Also
    --------
    TracIn : Gradient similarity without the kernel inverse.
    InfluenceFunction : Gradients weighted by the inverse Hessian.

    Notes
    -----
    *Ensemble.* As in TRAK's Algorithm 1 (and dattri's ``TRAKAttributor``) the
    per-model score matrices ``phi_m(x) (Phi_m^T Phi_m + lambda I)^{-1} Phi_m^T``
    are averaged, and the average is multiplied column-wise by the average of the
    models' ``Q``. Every model gets its own projection. The members trained in
    ``fit``: the first one exactly as every skdattri attributor trains an unfitted
    estimator (seeded by ``random_state``), so TRAK-1 and TRAK-M share their first
    model; each further member is a clone whose ``random_state`` parameters (nested
    ones too, e.g. a skorch net's ``module__random_state``) and torch seed are set to
    a seed derived from ``random_state``. The members of a ``Pipeline`` are whole
    pipelines, and the inputs go through the preprocessing of the first member
    (identical for deterministic preprocessing such as scaling). Buffers (batch norm
    statistics) are those of ``estimator_``.

    *Dropout ensembles.* With ``dropout=True`` member ``m`` is the network with one
    fixed mask per ``nn.Dropout`` layer (a mask of one sample's activation shape,
    broadcast over the batch, rescaled by ``1 / (1 - p)``): one sub-network,
    evaluated identically for every training sample and every query, on the train
    side (gradients and ``Q``) and the query side. A mask drawn afresh for each
    sample or batch (dropout in training mode) would make a training copy of a query
    a different function of the parameters than the query itself, and the scores
    would depend on ``batch_size``. Masks come from the member's seed (numpy), so the
    ensemble is reproducible under ``random_state``, identical on CPU and CUDA, and
    per-sample gradients stay vectorised (hooks or ``vmap`` without random
    operations). Other modules stay in eval mode; with ``p = 0`` the members equal
    the network itself.

    *Signs.* TRAK estimates how much including training sample ``j`` raises the
    query value. The query gradient is that of the margin (``target="margin"``), of
    minus the loss (``target="loss"``) or of minus the callable, so ``S[i, j] > 0``
    means ``j`` helps query ``i``; a training copy of a query scores
    ``(1 - p) phi K^{-1} phi^T (1 - p) > 0`` on it.

    *Regularization.* Without it TRAK ranks poorly whenever the kernel is
    ill-conditioned, and it cannot be used at all when ``proj_dim`` exceeds the number
    of training samples or of gradient coordinates. The default ``lambda`` = mean
    non-zero eigenvalue of the kernel was chosen on a grid of its multiples (``1e-3 ...
    1e3``), where it was the best: LDS (50 retrained half subsets, 1000 training
    samples) 0.76 on a digits logistic regression (512 projections; 0.83 with
    ``proj_dim=None``; 0.37 without regularization and 500 projections) and 0.49 on a
    digits 64-128-64-10 MLP (512 projections; 0.18 without regularization).

    *Memory.* Per-sample gradients are projected in row blocks of about 8 MB (at
    least 128 rows), whatever ``batch_size``; a Rademacher projection is kept packed,
    one bit per entry, and expanded a chunk of rows at a time for the matrix product;
    one model's projection is held at a time. Beyond these, ``fit`` keeps the
    ``(n_train, proj_dim)`` features of each model (on disk with ``store=``) and its
    ``(proj_dim, proj_dim)`` kernel inverse.

    *Numerics.* The kernel is accumulated and inverted (symmetric eigendecomposition)
    in float64 whatever the model's precision; a kernel whose smallest eigenvalue is
    at the round-off level of the gradients raises a ``ValueError``.

    For regressors ``Q`` is ``-dloss_j/df_j`` (the residual ``y_j - f_j`` for a
    squared loss up to the loss's scale), the same Newton-step derivation that gives
    ``1 - p_j`` for the logistic loss.

    References
    ----------
    .. [1] Park, Georgiev, Ilyas, Leclerc, Madry. "TRAK: Attributing Model Behavior
       at Scale". ICML 2023.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skdattri.trak import TRAK
    >>> X, y = load_digits(return_X_y=True)
    >>> X = X / 16.0
    >>> model = LogisticRegression(max_iter=300).fit(X[:300], y[:300])
    >>> attr = TRAK(model, random_state=0).fit(X[:300], y[:300])
    >>> scores = attr.transform(X[300:305], y[300:305])
    >>> scores.shape
    (5, 300)
    >>> attr.proj_dim_  # 650 gradient coordinates: projected to 512
    512
    >>> bool(attr.self_influence().min() > 0)
    True
    """

    _parameter_constraints: dict = {
        **BaseAttributor._parameter_constraints,
        "n_models": [Interval(Integral, 1, None, closed="left")],
        "proj_dim": [None, Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "regularization": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "proj_type": [StrOptions({"gaussian", "rademacher", "sjlt"})],
        "dropout": ["boolean"],
    }

    def __init__(self, estimator, *, n_models=1, dropout=False, checkpoints=None,
                 proj_dim="auto", proj_type="rademacher", regularization="auto",
                 target="margin", loss=None, layers=None, random_state=None, store=None,
                 store_dtype=None, batch_size=256, device="auto", n_jobs=None, verbose=0):
        self.estimator = estimator
        self.n_models = n_models
        self.dropout = dropout
        self.checkpoints = checkpoints
        self.proj_dim = proj_dim
        self.proj_type = proj_type
        self.regularization = regularization
        self.target = target
        self.loss = loss
        self.layers = layers
        self.random_state = random_state
        self.store = store
        self.store_dtype = store_dtype
        self.batch_size = batch_size
        self.device = device
        self.n_jobs = n_jobs
        self.verbose = verbose

    # ------------------------------------------------------------------ fit
    def _fit_estimator(self, X, y):
        """Take the fitted model / checkpoints, or train the ``n_models`` ensemble."""
        root = (int(self.random_state) if isinstance(self.random_state, Integral)
                else _seed_from(self.random_state))
        self._root_ = root
        has_checkpoints = bool(self._checkpoint_list())
        masked = self.dropout and not has_checkpoints  # n_models masks of one fitted model
        if self.n_models > 1 and (has_checkpoints or is_fitted(self.estimator)) \
                and not (masked and is_fitted(self.estimator)):
            raise ValueError(
                f"n_models={self.n_models} trains an ensemble in fit, which needs an unfitted "
                "estimator and no checkpoints; "
                + ("the ensemble is given by checkpoints=, so leave n_models=1."
                   if has_checkpoints else
                   "the estimator is already fitted. Pass an unfitted estimator, the "
                   "fitted ensemble members as checkpoints=, or dropout=True for a "
                   "dropout ensemble of the fitted model.")
            )
        if has_checkpoints or is_fitted(self.estimator):
            members = None
            estimator = fit_or_keep(self.estimator, X, y, random_state=root)
        else:
            members = self._train_members(X, y, root)
            estimator = members[0]
        self.estimators_ = None if has_checkpoints else (members or [estimator])
        return estimator

    def _train_members(self, X, y, root):
        seeds = [root] + [_child_seed(root, 0, m) for m in range(1, self.n_models)]
        if self.n_models == 1 or effective_n_jobs(self.n_jobs) == 1:
            with _thread_limit(self.n_jobs):
                return [_fit_member(self.estimator, X, y, seed, m > 0, False)
                        for m, seed in enumerate(seeds)]
        # Processes, one torch thread each: skorch draws initial weights and batch orders
        # from torch's global generator, which threads would share (the members would
        # then depend on scheduling).
        jobs = (delayed(_fit_member)(self.estimator, X, y, seed, m > 0, True)
                for m, seed in enumerate(seeds))
        return Parallel(n_jobs=self.n_jobs, prefer="processes", verbose=self.verbose)(jobs)

    def _fit(self, X, y):
        root = self._root_
        model = self.model_
        names = list(model.named_params())
        if self._checkpoint_list():
            sources = self._checkpoint_list()
        else:
            sources = self.estimators_
        if self.dropout and len(sources) == 1:  # a fitted model: n_models masks of it
            sources = sources * self.n_models
        self._members_ = [model.named_params() if src is self.estimator_ else
                          model.params_from(checkpoint_state(src, device=self.device_), names)
                          for src in sources]
        if self.dropout:
            if not dropout_modules(model.module):
                raise ValueError(
                    "dropout=True needs nn.Dropout layers, and the model has none: its "
                    "ensemble members would all be the same network. Use dropout=False.")
            self._members_ = [dropout_member(p, _child_seed(root, 3, m))
                              for m, p in enumerate(self._members_)]
        self.n_models_ = len(self._members_)
        sizes = {n: p.numel() for n, p in self._members_[0].items()}
        n_grad = sum(sizes[n] for n in self.param_names_)
        self.proj_dim_ = self._resolve_proj_dim(n_grad)
        self.projectors_ = [self._projector(n_grad, _child_seed(root, 1, m))
                            for m in range(self.n_models_)]

        n = self.n_train_
        q_sum = torch.zeros(n, dtype=torch.float64, device=self.device_)
        features, inverses, lambdas = [], [], []
        with torch.no_grad():
            for m in range(self.n_models_):
                Phi = self._train_matrix(self._members_[m], X, y, self._train_value(),
                                         desc=f"train gradients [{m}]",
                                         projector=self.projectors_[m])
                for sl, xb, yb in self._batches(X, y, desc=f"train weights [{m}]"):
                    q_sum[sl] += self._reweighting(m, xb, yb).to(torch.float64)
                inverse, lam = self._kernel_inverse(Phi)
                lambdas.append(lam)
                # kept apart: the queries are multiplied by the inverse (n_query k^2
                # flops per transform) instead of the training rows (2 n k^2 in fit);
                # computed in float64, applied in the model's dtype
                inverses.append(inverse.to(model.dtype))
                features.append(Phi)
                self._release_projection(m)
        q_mean = q_sum / self.n_models_
        self.train_features_ = features
        self.kernel_inverses_ = inverses
        self.regularization_ = np.array(lambdas)
        self.train_weights_ = q_mean.to(model.dtype)
        self.train_scale_ = (q_mean / self.n_models_).to(model.dtype)
        # other targets: self-influence needs query-side gradients of the training rows
        self._train_data_ = None if self.target == "margin" else (X, y)

    _device_attributes = ("model_", "_members_", "projectors_", "train_features_",
                          "kernel_inverses_", "train_weights_", "train_scale_",
                          "_train_data_")

    def _resolve_proj_dim(self, n_grad):
        """``proj_dim`` for ``n_grad`` gradient coordinates (``None``: no projection)."""
        if self.proj_dim == "auto":
            return AUTO_PROJ_DIM if n_grad > AUTO_PROJ_DIM else None
        if self.proj_dim is not None and self.proj_dim > n_grad:
            warnings.warn(
                f"proj_dim={self.proj_dim} exceeds the number of gradient coordinates "
                f"({n_grad}); a projection to more coordinates than the gradients have "
                "adds no information, so the full gradients are used (proj_dim=None).",
                UserWarning, stacklevel=5)
            return None
        return self.proj_dim

    def _projector(self, n_grad, seed):
        if self.proj_dim_ is None:
            return None
        return make_projector(
            n_grad, self.proj_dim_, proj_type=self.proj_type, random_state=seed,
            device=self.device_, dtype=self.model_.dtype,
            # one matrix is held at a time (see _release_projection): the whole budget
            max_dense_bytes=PROJECTION_BYTES,
        )

    def _kernel_inverse(self, Phi):
        """``((Phi^T Phi + lambda I)^{-1}, lambda)`` in float64, or a ValueError when the
        kernel is singular."""
        k = Phi.shape[1]
        K = Phi.gram(dtype=torch.float64)
        # the mean of the at most min(n_train, k) non-zero eigenvalues
        auto = AUTO_REGULARIZATION * float(K.diagonal().sum()) / max(min(Phi.shape[0], k), 1)
        lam = auto if self.regularization == "auto" else float(self.regularization)
        K.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(K)
        if int(info) == 0:  # positive definite: a third of an eigendecomposition's work
            rcond = float(factor.diagonal().min() / factor.diagonal().max()) ** 2
            if rcond > max(k * torch.finfo(torch.float64).eps,
                           (k * torch.finfo(Phi.dtype).eps) ** 2):
                del K  # k x k float64 matrices are released as soon as they are used
                return torch.cholesky_inverse(factor), lam
        del factor
        w, V = torch.linalg.eigh(K)
        del K
        # eigenvalues at the round-off level of the gradients (rank deficiency)
        eps = torch.finfo(Phi.dtype).eps
        rel = max(k * torch.finfo(torch.float64).eps, (k * eps) ** 2)
        top = float(w.max()) if k else 0.0
        if not top > 0:
            raise ValueError(
                "The training gradients are all zero: the TRAK kernel Phi^T Phi is zero and "
                "no training sample has an influence to attribute.")
        if float(w.min()) <= rel * top:
            rank = int((w > rel * top).sum())
            what = "proj_dim" if self.proj_dim_ is not None else "the number of parameters"
            if lam == 0:
                raise ValueError(
                    f"The TRAK kernel Phi^T Phi ({k} x {k}) is singular (numerical rank "
                    f"{rank}): its rank is at most min(n_train={Phi.shape[0]}, number of "
                    f"gradient coordinates), and {what} is {k}. Set regularization > 0: "
                    f"regularization='auto' (the default) adds its mean non-zero eigenvalue, "
                    f"here "
                    f"regularization={auto:.6g}; or use a smaller proj_dim."
                )
            raise ValueError(
                f"The TRAK kernel Phi^T Phi + {lam:g} I is numerically singular "
                f"(smallest eigenvalue {float(w.min()):.3g}, largest {top:.3g}); increase "
                f"regularization (regularization='auto' adds {auto:.6g})."
            )
        return (V / w) @ V.T, lam

    # ------------------------------------------------------------------ per-model work
    def _query_grads(self, m, xb, yb, what):
        """Projected per-sample gradients of ``what`` for model ``m`` (selected params;
        the member's other parameters stay in the forward pass), times the member's
        kernel inverse."""
        g = self._block_grads(self._members_[m], xb, yb, what, self.projectors_[m])
        return g @ self.kernel_inverses_[m]

    def _reweighting(self, m, xb, yb):
        """``Q`` of TRAK: ``1 - p`` of the label (classifiers), ``-dloss/df`` (regressors)."""
        return self.model_.loss_.margin_weights(self.model_.forward(self._members_[m], xb), yb)

    # ``what`` is the value whose gradient lowers as the query is helped (the base
    # convention); TRAK scores the change of the query value, hence the minus signs.
    def _train_value(self):
        """What the training features differentiate: the margin, or minus a callable
        ``target`` (dattri's task function, used on both sides; higher = better)."""
        return _Negated(self.target) if callable(self.target) else "margin"

    def _release_projection(self, m):
        """Drop model ``m``'s projection matrix (regenerated from its seed when next
        needed) when the ensemble has several: one matrix in memory at a time."""
        if self.n_models_ > 1 and self.projectors_[m] is not None:
            self.projectors_[m]._clear_cache()

    def _query_features(self, X, y, what):
        batches = self._batches(X, y, desc="query gradients")
        if self.n_models_ == 1:
            for sl, xb, yb in batches:
                yield sl, [self._query_grads(0, xb, yb, what)]
            return
        # an ensemble: model by model over chunks of queries, so that one projection
        # matrix is in memory at a time and each is generated once per chunk
        chunk, rows = [], 0
        for item in batches:
            chunk.append(item)
            rows += item[0].stop - item[0].start
            if rows >= _QUERY_CHUNK:
                yield from self._chunk_features(chunk, what)
                chunk, rows = [], 0
        if chunk:
            yield from self._chunk_features(chunk, what)

    def _chunk_features(self, chunk, what):
        features = [[] for _ in chunk]
        for m in range(self.n_models_):
            for i, (_, xb, yb) in enumerate(chunk):
                features[i].append(self._query_grads(m, xb, yb, what))
            self._release_projection(m)
        for (sl, _, _), feats in zip(chunk, features):
            yield sl, feats

    def _score(self, features, rows):
        block = sum(q @ Phi[rows].T for q, Phi in zip(features, self.train_features_))
        return -block * self.train_scale_[rows]

    def _self_influence(self):
        if self._train_data_ is None:
            # margin on both sides: phi_j K^{-1} phi_j of the stored rows, block by block
            # (in float64: a sum over models of quadratic forms)
            diag = torch.zeros(self.n_train_, dtype=torch.float64, device=self.device_)
            for Phi, inverse in zip(self.train_features_, self.kernel_inverses_):
                for sl, block in Phi.blocks(self.batch_size):
                    block = block.to(inverse.dtype)
                    diag[sl] += ((block @ inverse) * block).sum(1, dtype=torch.float64)
            return (diag * self.train_scale_.to(torch.float64)).to(self.model_.dtype)
        X, y = self._train_data_
        out = torch.zeros(self.n_train_, dtype=self.model_.dtype, device=self.device_)
        what = self._query_value(True)
        for m, Phi in enumerate(self.train_features_):  # models outer: one matrix at a time
            for sl, xb, yb in self._batches(X, y, desc=f"self-influence [{m}]"):
                out[sl] -= (self._query_grads(m, xb, yb, what) * Phi[sl]).sum(1)
            self._release_projection(m)
        return out * self.train_scale_


class _Negated:
    """``-f(outputs, y)``: a loss-like callable target as a higher-is-better value
    (picklable, for the sharded fit)."""

    def __init__(self, func):
        self.func = func

    def __call__(self, outputs, y):
        return -self.func(outputs, y)
