"""Influence functions with every inverse-Hessian solver as a parameter."""

from __future__ import annotations

from numbers import Integral, Real

import torch
from sklearn.utils._param_validation import Interval, StrOptions

from ._config import get_config
from ._factor_grads import _FactorGradients
from ._solvers import SOLVERS, _FitContext
from ._utils import _take_rows
from .base import BaseAttributor
from .func.ghost import GhostFeatures, _configured_layout
from .func.kfac import EKFACIHVP
from .func.sketch import DiagonalIHVP

#: Solvers whose curvature reads the training gradients at most once, in blocks of
#: rows: their training side can be kept as layer factors (:mod:`skdattri._factor_grads`).
_FACTOR_SOLVERS = ("ekfac", "kfac", "diagonal")
#: Solvers that read no training gradient unless their curvature is the empirical Fisher
#: (``hessian="fisher"``, products with the gradient rows at every step).
_CURVATURE_SOLVERS = ("explicit", "cg", "lissa", "arnoldi", "nystrom")
#: With ``ghost="auto"``, factors only for a gradient cache above this size (bytes a
#: checkpoint): below it the plain cache is small and its one product per block faster.
_FACTOR_MIN_BYTES = 2**25

__all__ = ["InfluenceFunction"]

# queries (or training rows) whose inverse-HVPs are solved together: one CG / LiSSA run
# serves the whole block, whatever batch_size the gradients are computed with
_SOLVE_BLOCK = 256


class InfluenceFunction(BaseAttributor):
    """Influence functions: gradients weighted by the inverse training Hessian.

    ``S[i, j] = grad(query_i)^T (H + lambda I)^{-1} grad(loss of train_j)`` where ``H``
    is the Hessian of the *full* training objective: the mean loss over all training
    samples plus the estimator's own L2 penalty (``C`` of ``LogisticRegression``,
    ``alpha`` of ``Ridge`` / ``MLPClassifier`` / ``SGDClassifier``). ``S[i, j] / n``
    is the first-order prediction of how much query ``i``'s loss rises when training
    sample ``j`` is left out (Koh and Liang, 2017): positive means ``j`` helps.

    The solver is a parameter, so ``GridSearchCV`` can search it together with the
    damping. The curvature work is done once in ``fit`` (a factorisation, the top
    eigenpairs, the K-FAC factors, the cached training gradients); each query's
    inverse-HVP is computed once in ``transform``, for a block of queries at a time,
    followed by one matrix product with the cached training gradients.

    Parameters
    ----------
    estimator : object
        The model to explain (skorch net, sklearn linear model or MLP,
        ``torch.nn.Module`` with ``loss``, ``FrozenEstimator``, fitted ``Pipeline``).
    solver : {"explicit", "cg", "lissa", "arnoldi", "nystrom", "datainf", "diagonal", \
"kfac", "ekfac"}, default="cg"
        - ``"explicit"``: dense Hessian, eigendecomposed once (small models only).
        - ``"cg"``: block conjugate gradient, all queries of a block at once, with
          Hessian-vector products over the whole training set. A linear model's
          curvature of at most 32 MiB is formed once instead, and its Cholesky factor
          preconditions the recursion (the solution in a step or two).
        - ``"lissa"``: stochastic LiSSA recursion (``depth``, ``scale``, ``n_samples``).
        - ``"arnoldi"``: top ``n_components`` eigenpairs from ``max_iter`` Arnoldi steps.
        - ``"nystrom"``: rank-``n_components`` Nystrom sketch of the curvature from as
          many random test vectors (one block of Hessian-vector products in ``fit``),
          inverted in closed form with the damping on the rest of the space (Woodbury;
          pyDVL's ``NystroemSketchInfluence``, Hataya and Yamada, 2023). The model's
          own L2 term is kept exact (only the data term is sketched), so directions
          outside the sketch are scaled by ``1 / (l2 + regularization)``; with neither
          they are dropped.
        - ``"datainf"``: layer-wise closed form of DataInf (Kwon et al., 2024).
        - ``"diagonal"``: the diagonal of the Fisher, per parameter (kronfluence's
          ``"diagonal"`` strategy): the mean squared training gradient with
          ``fisher="empirical"``, the mean squared gradient at targets drawn from the
          model with ``fisher="true"`` (an estimate of the Gauss-Newton diagonal);
          plus the estimator's L2 penalty.
        - ``"kfac"``: K-FAC, the Kronecker product of the layer-input and
          output-gradient second moments of the ``nn.Linear`` / ``nn.Conv2d`` layers
          (Martens and Grosse, 2015; kronfluence's ``"kfac"``); other layers are left
          out.
        - ``"ekfac"``: EK-FAC, K-FAC's eigenbasis with eigenvalues refitted to the
          per-sample gradients (George et al., 2018; Grosse et al., 2023).

        kronfluence's ``"identity"`` strategy (no curvature) is Grad-Dot:
        :class:`~skdattri.TracIn` on one checkpoint.
    regularization : float, default=None
        Damping ``lambda`` added to the curvature. ``None``: no damping for the
        exact solvers (the estimator's own L2 penalty still counts), and the
        papers' heuristics for ``"datainf"`` (0.1 x mean squared gradient per layer)
        and ``"kfac"`` / ``"ekfac"`` (0.1 x mean eigenvalue per layer).
    hessian : {"auto", "exact", "ggn", "fisher"}, default="auto"
        Curvature for the explicit, cg, lissa, arnoldi and nystrom solvers:

        - ``"auto"``: the exact Hessian where the training objective is convex (the
          scikit-learn linear models, whose Hessian is also their Gauss-Newton
          matrix), the Gauss-Newton matrix for neural networks (whose Hessian is
          indefinite away from a minimum); ``hessian_`` tells which was used;
        - ``"exact"``: the Hessian of the objective (an indefinite one gives a clear
          error: increase ``regularization`` or use ``"ggn"``);
        - ``"ggn"``: the generalised Gauss-Newton matrix ``J^T H_out J`` (positive
          semi-definite; the true Fisher for the canonical losses). When every
          attributed parameter is in an ``nn.Linear`` / ``nn.Conv1d/2d`` layer and the
          model has at most 64 outputs, its products come from the layers' inputs and
          output gradients (one backward pass per output, kept for later products)
          instead of a ``jvp`` and ``vjp`` through the network per vector;
        - ``"fisher"``: the empirical Fisher ``(1/n) sum_j g_j g_j^T`` of the cached
          training gradients (as dattri's ``ifvp`` functions offer).

        The estimator's L2 penalty is added to each. DataInf, the diagonal, K-FAC and
        EK-FAC have their own curvature and ignore it.
    normalize : bool or {"self", "theta"}, default=False
        RelatIF (Barshan et al., 2020): divide each training sample's scores by
        ``sqrt(g_j^T (H + lambda I)^{-1} g_j)`` (``True`` or ``"self"``, the square root
        of its self-influence) or by ``||(H + lambda I)^{-1} g_j||`` (``"theta"``, the
        norm of its parameter change, as dattri's ``"theta"`` RelatIF).
    max_memory : int, default=2**31
        Largest size in bytes of the dense curvature matrix of ``solver="explicit"``
        (2 GiB: a 23,170-parameter float32 model, 16,384 in float64).
    max_iter : int, default=100
        Conjugate-gradient iterations (``"cg"``) or Arnoldi steps (``"arnoldi"``).
    tol : float, default=1e-6
        Relative residual at which conjugate gradient stops; for LiSSA, the relative
        change of a step (or the truncation bound of a stochastic recursion) at which
        it stops.
    n_components : int, default=50
        Eigenpairs kept by ``"arnoldi"`` (a ``ConvergenceWarning`` when they hold less
        than half of the curvature's trace); sketch size (rank) of ``"nystrom"``.
    depth : int, default=1000
        LiSSA recursion depth at most (a ``ConvergenceWarning`` when it runs out).
    scale : float or "auto", default="auto"
        LiSSA scale; must exceed the largest eigenvalue of the mini-batch curvature.
        ``"auto"``: 1.5 times the top eigenvalue found by power iteration in ``fit``.
    n_samples : int, default=1
        LiSSA repetitions averaged.
    fisher : {"true", "empirical"}, default="true"
        K-FAC, EK-FAC and the diagonal: targets sampled from the model (true Fisher)
        or the training labels (empirical Fisher).
    target, loss, layers, checkpoints, random_state, store, store_dtype, batch_size, \
device, n_jobs, verbose
        As in :class:`~skdattri.TracIn`. With ``checkpoints``, scores are averaged
        over the checkpoints (or an ensemble), each with its own curvature.

    Attributes
    ----------
    estimator_ : object
        The fitted model that is explained.
    model_ : skdattri.model.TorchModel
        Functional view of the model.
    param_names_ : list of str
        Parameters the gradients and the curvature cover.
    n_train_ : int
        Number of training samples.
    n_features_in_ : int
        Number of features of tabular training input.
    device_ : torch.device
        Device of the caches.
    train_grads_ : list of skdattri.store.BaseStore of shape (n_train, n_params)
        Training loss gradients per checkpoint (in memory or on disk, ``store``);
        ``train_grads_[c][a:b]`` reads rows. Except for DataInf and the empirical
        Fisher (``hessian="fisher"``), whose products read the rows at every step, the
        layers where it takes less room are kept as their inputs and output gradients
        (``factor_layout_``; a 17,226-parameter MLP: 458 numbers a sample instead of
        17,226), the rows formed when read and the scores computed from the factors --
        for a cache of more than 32 MiB (or with ``ghost=True``).
    factor_layout_ : skdattri.func.ghost.GhostLayout or None
        The layers kept as factors (``None``: the gradients themselves). Chosen as
        ``TracIn``'s ghost layout, and switched off the same way
        (:func:`skdattri.set_config` ``ghost=False``).
    solvers_ : list
        Fitted inverse-HVP solver per checkpoint, each answering ``solve(Q)`` (the
        objects of :mod:`skdattri.func.ihvp` and :mod:`skdattri.func.sketch`,
        :class:`~skdattri.func.datainf.DataInfIHVP`,
        :class:`~skdattri.func.kfac.EKFACIHVP`; see ``skdattri._solvers.SOLVERS``).
    hessian_ : str
        The curvature used: ``"exact"``, ``"ggn"`` or ``"fisher"`` (``hessian="auto"``
        resolved).
    train_self_influence_ : Tensor of shape (n_train,) or None
        ``g_j^T (H + lambda I)^{-1} g_j`` (only with ``normalize``).
    train_norms_ : Tensor of shape (n_train,) or None
        What each training sample's scores are divided by (only with ``normalize``).

    See Also
    --------
    TracIn : Gradient similarity without curvature.
    skdattri.func.ihvp : The solvers, usable on their own.

    References
    ----------
    .. [1] Koh and Liang. "Understanding Black-box Predictions via Influence
       Functions". ICML 2017.
    .. [2] Schioppa et al. "Scaling Up Influence Functions". AAAI 2022 (Arnoldi).
    .. [3] Kwon et al. "DataInf". ICLR 2024.
    .. [4] Grosse et al. "Studying Large Language Model Generalization with
       Influence Functions". 2023 (EK-FAC).
    .. [5] Barshan et al. "RelatIF". AISTATS 2020.
    .. [6] Hataya and Yamada. "Nystrom Method for Accurate and Scalable Implicit
       Differentiation". AISTATS 2023 (Nystrom; pyDVL's ``NystroemSketchInfluence``).
    .. [7] Martens and Grosse. "Optimizing Neural Networks with Kronecker-factored
       Approximate Curvature". ICML 2015 (K-FAC).
    .. [8] kronfluence (Grosse et al., 2023), its ``"diagonal"`` and ``"kfac"``
       strategies: https://github.com/pomonam/kronfluence.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skdattri import InfluenceFunction
    >>> X, y = load_digits(return_X_y=True)
    >>> X = X / 16.0
    >>> model = LogisticRegression(max_iter=500).fit(X[:300], y[:300])
    >>> attr = InfluenceFunction(model, solver="explicit").fit(X[:300], y[:300])
    >>> attr.transform(X[300:303], y[300:303]).shape
    (3, 300)
    >>> cg = InfluenceFunction(model, solver="cg", tol=1e-10).fit(X[:300], y[:300])
    >>> import numpy as np
    >>> bool(np.allclose(cg.transform(X[300:303], y[300:303]),
    ...                  attr.transform(X[300:303], y[300:303]), rtol=1e-5))
    True
    """

    _parameter_constraints: dict = {
        **BaseAttributor._parameter_constraints,
        "solver": [StrOptions(set(SOLVERS))],
        "regularization": [None, Interval(Real, 0, None, closed="left")],
        "hessian": [StrOptions({"auto", "exact", "ggn", "fisher"})],
        "normalize": ["boolean", StrOptions({"self", "theta"})],
        "max_memory": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "depth": [Interval(Integral, 1, None, closed="left")],
        "scale": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "n_samples": [Interval(Integral, 1, None, closed="left")],
        "fisher": [StrOptions({"true", "empirical"})],
    }

    def __init__(self, estimator, *, solver="cg", regularization=None, hessian="auto",
                 normalize=False, max_memory=2**31, max_iter=100, tol=1e-6, n_components=50,
                 depth=1000, scale="auto", n_samples=1, fisher="true", target="loss", loss=None,
                 layers=None, checkpoints=None, random_state=None, store=None,
                 store_dtype=None, batch_size=256,
                 device="auto", n_jobs=None, verbose=0):
        self.estimator = estimator
        self.solver = solver
        self.regularization = regularization
        self.hessian = hessian
        self.normalize = normalize
        self.max_memory = max_memory
        self.max_iter = max_iter
        self.tol = tol
        self.n_components = n_components
        self.depth = depth
        self.scale = scale
        self.n_samples = n_samples
        self.fisher = fisher
        self.target = target
        self.loss = loss
        self.layers = layers
        self.checkpoints = checkpoints
        self.random_state = random_state
        self.store = store
        self.store_dtype = store_dtype
        self.batch_size = batch_size
        self.device = device
        self.n_jobs = n_jobs
        self.verbose = verbose

    # ------------------------------------------------------------------ fit / transform
    _device_attributes = ("model_", "train_grads_", "solvers_", "train_self_influence_",
                          "train_norms_", "_params_", "_train_data_")

    def _fit(self, X, y):
        entry = SOLVERS[self.solver]
        auto = "exact" if self.model_.affine is not None else "ggn"
        self.hessian_ = auto if self.hessian == "auto" else self.hessian
        self.param_names_ = entry.names(self.model_, self.param_names_)
        params = self._checkpoint_params()
        context = _FitContext(self, X, y)
        self._params_ = params
        self.train_grads_, self.solvers_ = [], []
        self.factor_layout_ = layout = self._factor_layout(params[0], X)
        for c, p in enumerate(params):
            if layout is None:
                G = self._train_matrix(p, X, y, "loss", desc=f"train gradients [{c}]")
            else:
                F = self._train_matrix(p, X, y, "loss", desc=f"train factors [{c}]",
                                       features=GhostFeatures(self.model_, layout))
                G = _FactorGradients(F, layout, {k: p[k].numel() for k in self.param_names_})
            self.train_grads_.append(G)
            self.solvers_.append(entry.fit(context, p, G))
        # self-influence for other targets needs query-side gradients of the training rows
        self._train_data_ = None if self.target == "loss" else (X, y)
        self.train_self_influence_ = self.train_norms_ = None
        if self.normalize:
            self.train_self_influence_, theta = self._diag("loss", theta=True)
            self.train_norms_ = (theta if self.normalize == "theta" else
                                 torch.sqrt(self.train_self_influence_.clamp_min(0.0)))
            self.train_norms_ = self.train_norms_.clamp_min(torch.finfo(self.model_.dtype).tiny)

    def _factor_layout(self, params, X):
        """Factor rows for the training side where the solver allows it and they are
        narrower than the gradients (and ghost layouts are not switched off); with
        ``ghost="auto"`` only for a gradient cache above :data:`_FACTOR_MIN_BYTES`."""
        factors = self.solver in _FACTOR_SOLVERS or (
            self.solver in _CURVATURE_SOLVERS and self.hessian_ != "fisher")
        layout = (_configured_layout(self.model_, params, self.param_names_, X)
                  if factors else None)
        if layout is None or not layout.ghost:
            return None
        dense_bytes = self.n_train_ * layout.n_grad * self.model_.dtype.itemsize
        if get_config()["ghost"] == "auto" and dense_bytes <= _FACTOR_MIN_BYTES:
            return None
        return layout

    def _solve(self, c, Q, *, overwrite=False):
        """``(H_c + lambda I)^{-1} q`` for each row of ``Q`` (flat, shape (m, p)); with
        ``overwrite`` (``Q`` is a temporary) the solvers that can write into ``Q``."""
        solver = self.solvers_[c]
        if overwrite and isinstance(solver, (EKFACIHVP, DiagonalIHVP)):
            return solver.solve(Q, out=Q)
        return solver.solve(Q)

    def _diag(self, what, *, theta=False):
        """``q_j^T H^{-1} g_j`` over the training rows, averaged over checkpoints (and,
        with ``theta``, the mean norm of ``H^{-1} q_j`` too, from the same solves).

        For the loss target ``q_j = g_j`` comes from the cache; otherwise the query-side
        gradients of the training rows are computed. Inverse-HVPs are solved for
        blocks of rows at once.
        """
        out = torch.zeros(self.n_train_, dtype=self.model_.dtype, device=self.device_)
        norms = torch.zeros_like(out)
        for c, G in enumerate(self.train_grads_):
            if what == "loss":
                blocks = self._row_blocks(self.n_train_, G.__getitem__)
            else:
                blocks = self._query_blocks(c, *self._train_data_, what, desc="self-influence")
            for sl, Q in blocks:
                solved = self._solve(c, Q)
                out[sl] += (solved * G[sl]).sum(1)
                if theta:
                    norms[sl] += torch.linalg.vector_norm(solved, dim=1)
        n_ckpt = len(self.train_grads_)
        return (out / n_ckpt, norms / n_ckpt) if theta else out / n_ckpt

    def _solve_block(self):
        return max(self.batch_size, _SOLVE_BLOCK)

    def _row_blocks(self, n, rows):
        step = self._solve_block()
        for start in range(0, n, step):
            sl = slice(start, min(start + step, n))
            yield sl, rows(sl)

    def _query_blocks(self, c, X, y, what, *, desc):
        """Query gradients of checkpoint ``c``, grouped into solve blocks.

        Gradients are computed ``batch_size`` rows at a time and gathered into blocks
        of ``max(batch_size, 256)`` rows, so one CG / LiSSA run serves many queries.
        """
        step = self._solve_block()
        pending, first = [], None
        for sl, g in self._grads(self._params_[c], X, y, what, desc=desc):
            first = sl.start if first is None else first
            pending.append(g)
            if sl.stop - first >= step:
                yield slice(first, sl.stop), _joined(pending)
                pending, first = [], None
        if pending:
            yield slice(first, first + sum(len(p) for p in pending)), _joined(pending)

    def _query_features(self, X, y, what):
        """Inverse-HVPs of each block of queries, one per checkpoint (averaged)."""
        n_ckpt = len(self.train_grads_)
        if n_ckpt == 1:
            for sl, Q in self._query_blocks(0, X, y, what, desc="query inverse-HVPs"):
                yield sl, [self._solve(0, Q, overwrite=True)]
            return
        step = self._solve_block()
        n = y.shape[0]
        for start in range(0, n, step):
            sl = slice(start, min(start + step, n))
            Xs, ys = _take_rows(X, sl), y[sl]
            solved = []
            for c in range(n_ckpt):
                Q = torch.cat([g for _, g in self._grads(self._params_[c], Xs, ys, what,
                                                         desc=f"query gradients [{c}]")])
                solved.append(self._solve(c, Q, overwrite=True) / n_ckpt)
            yield sl, solved

    def _score(self, features, rows):
        block = sum(G.inner(x, rows) if isinstance(G, _FactorGradients) else x @ G[rows].T
                    for x, G in zip(features, self.train_grads_))
        return block / self.train_norms_[rows] if self.normalize else block

    def _self_influence(self):
        what = self._query_value(True)
        if what == "loss" and self.train_self_influence_ is not None:
            s = self.train_self_influence_
        else:
            s = self._diag(what)
        if self.normalize:
            s = s / self.train_norms_
        return s


def _joined(blocks):
    """The rows of ``blocks`` as one tensor (no copy of a single block)."""
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)
