"""Influence functions with every inverse-Hessian solver as a parameter."""

from __future__ import annotations

import copy
from numbers import Integral, Real

import torch
from sklearn.utils._param_validation import Interval, StrOptions

from .base import BaseAttributor
from .func.datainf import datainf_ihvp
from .func.hessian import GGNOperator, HessianOperator, LinearModelOperator
from .func.ihvp import ArnoldiIHVP, ConjugateGradientIHVP, ExplicitIHVP, LissaIHVP
from .func.kfac import ekfac_ihvp, fit_ekfac, layer_grads_from_flat, layer_grads_to_flat
from .model._base import _first, _logits_from, _take, _tree_to

__all__ = ["InfluenceFunction"]

# rows per block of a linear model's Hessian products (memory: rows x outputs x queries)
_LINEAR_BLOCK = 4096
# queries (or training rows) whose inverse-HVPs are solved together: one CG / LiSSA run
# serves the whole block, whatever batch_size the gradients are computed with
_SOLVE_BLOCK = 256


# ----------------------------------------------------------------------------- picklable fns
class _MeanLoss:
    """``loss_fn(params, batch)``: mean training loss of a batch (for Hessian operators).

    Parameters not differentiated (``frozen``) keep the checkpoint's values.
    """

    def __init__(self, model, frozen):
        self.model = model
        self.frozen = frozen

    def __call__(self, params, batch):
        X, y = batch
        out = self.model.forward({**self.frozen, **params}, X)
        return self.model.value(out, y, "loss").mean()


class _Outputs:
    def __init__(self, model, frozen):
        self.model = model
        self.frozen = frozen

    def __call__(self, params, batch):
        return _first(self.model.forward({**self.frozen, **params}, batch[0]))


class _OutputLoss:
    def __init__(self, model):
        self.model = model

    def __call__(self, outputs, batch):
        return self.model.loss_.loss(outputs, batch[1]).mean()


class _OutputLossPerSample:
    def __init__(self, model):
        self.model = model

    def __call__(self, outputs, y):
        return self.model.loss_.loss(outputs, y)


class _SampleTargets:
    """Labels drawn from the model's predictive distribution (true Fisher for EK-FAC)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, outputs, generator):
        out = _first(outputs)
        n = out.shape[0]
        logits = _logits_from(out, self.model.loss_.output_kind).reshape(n, -1).detach()
        if logits.shape[1] == 1:
            p = torch.sigmoid(logits[:, 0]) if self.model.loss_.output_kind != "proba" \
                else out.reshape(n).detach()
            return torch.bernoulli(p, generator=generator).to(torch.int64)
        probs = torch.softmax(logits, dim=1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]


class _EKFACForward:
    def __init__(self, model):
        self.model = model

    def __call__(self, module, X):
        return _first(module(**X) if isinstance(X, dict) else module(X))


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
    solver : {"explicit", "cg", "lissa", "arnoldi", "datainf", "ekfac"}, default="cg"
        - ``"explicit"``: dense Hessian, eigendecomposed once (small models only).
        - ``"cg"``: block conjugate gradient, all queries of a block at once, with
          Hessian-vector products over the whole training set.
        - ``"lissa"``: stochastic LiSSA recursion (``depth``, ``scale``, ``n_samples``).
        - ``"arnoldi"``: top ``n_components`` eigenpairs from ``max_iter`` Arnoldi steps.
        - ``"datainf"``: layer-wise closed form of DataInf (Kwon et al., 2024).
        - ``"ekfac"``: EK-FAC factors of the ``nn.Linear`` / ``nn.Conv2d`` layers
          (George et al., 2018; Grosse et al., 2023); other layers are left out.
    regularization : float, default=None
        Damping ``lambda`` added to the curvature. ``None``: no damping for the
        exact solvers (the estimator's own L2 penalty still counts), and the
        papers' heuristics for ``"datainf"`` (0.1 x mean squared gradient per layer)
        and ``"ekfac"`` (0.1 x mean eigenvalue per layer).
    hessian : {"exact", "ggn"}, default="exact"
        Curvature for the explicit, cg, lissa and arnoldi solvers: the exact
        Hessian, or the Gauss-Newton / Fisher matrix (positive semi-definite, for
        non-convex models whose Hessian is indefinite).
    normalize : bool, default=False
        RelatIF (Barshan et al., 2020): divide each score by the square root of
        the training sample's self-influence.
    max_iter : int, default=100
        Conjugate-gradient iterations (``"cg"``) or Arnoldi steps (``"arnoldi"``).
    tol : float, default=1e-6
        Relative residual at which conjugate gradient stops.
    n_components : int, default=50
        Eigenpairs kept by ``"arnoldi"``.
    depth : int, default=1000
        LiSSA recursion depth.
    scale : float, default=10.0
        LiSSA scale; must exceed the largest eigenvalue of the mini-batch curvature.
    n_samples : int, default=1
        LiSSA repetitions averaged.
    fisher : {"true", "empirical"}, default="true"
        EK-FAC: labels sampled from the model (true Fisher) or the training labels.
    target, loss, layers, checkpoints, random_state, batch_size, device, n_jobs, verbose
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
    train_grads_ : list of Tensor of shape (n_train, n_params)
        Training loss gradients per checkpoint.
    solvers_ : list
        Fitted inverse-HVP solver per checkpoint (``skdattri.func.ihvp`` objects,
        :class:`~skdattri.func.kfac.KFACFactors`, or the DataInf damping).
    train_self_influence_ : Tensor of shape (n_train,) or None
        ``g_j^T (H + lambda I)^{-1} g_j`` (only with ``normalize=True``).

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
        "solver": [StrOptions({"explicit", "cg", "lissa", "arnoldi", "datainf", "ekfac"})],
        "regularization": [None, Interval(Real, 0, None, closed="left")],
        "hessian": [StrOptions({"exact", "ggn"})],
        "normalize": ["boolean"],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "depth": [Interval(Integral, 1, None, closed="left")],
        "scale": [Interval(Real, 0, None, closed="neither")],
        "n_samples": [Interval(Integral, 1, None, closed="left")],
        "fisher": [StrOptions({"true", "empirical"})],
    }

    def __init__(self, estimator, *, solver="cg", regularization=None, hessian="exact",
                 normalize=False, max_iter=100, tol=1e-6, n_components=50, depth=1000,
                 scale=10.0, n_samples=1, fisher="true", target="loss", loss=None,
                 layers=None, checkpoints=None, random_state=None, batch_size=256,
                 device="auto", n_jobs=None, verbose=0):
        self.estimator = estimator
        self.solver = solver
        self.regularization = regularization
        self.hessian = hessian
        self.normalize = normalize
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
        self.batch_size = batch_size
        self.device = device
        self.n_jobs = n_jobs
        self.verbose = verbose

    # ------------------------------------------------------------------ curvature
    def _damping(self):
        return 0.0 if self.regularization is None else float(self.regularization)

    def _is_linear(self, X):
        return self.model_.kind == "linear" and not isinstance(X, dict)

    def _device_batches(self, X, y):
        """The training set as a list of ``(X, y)`` blocks on ``device_``.

        A linear model's curvature costs O(rows x outputs), so its blocks are larger
        (same result) -- except for LiSSA, whose steps sample ``batch_size`` rows by
        design.
        """
        big = self._is_linear(X) and self.solver != "lissa"
        step = max(self.batch_size, _LINEAR_BLOCK) if big else self.batch_size
        n = y.shape[0]
        return [(_tree_to(_take(X, slice(s, min(s + step, n))), self.device_),
                 y[s:s + step].to(self.device_)) for s in range(0, n, step)]

    def _operator(self, params, X, y):
        """Curvature of the full training objective at ``params`` as an operator.

        ``params`` holds every trainable parameter of one checkpoint; the curvature
        covers ``param_names_``. Linear models (the sklearn adapters) get the
        closed-form :class:`~skdattri.func.hessian.LinearModelOperator`, exact for both
        ``hessian`` settings.
        """
        linear = self._is_linear(X)
        batches = self._device_batches(X, y)
        l2 = self.model_.l2_vector(self.param_names_)
        l2 = l2 if bool((l2 != 0).any()) else 0.0
        chosen = {k: params[k] for k in self.param_names_}
        frozen = {k: v for k, v in params.items() if k not in chosen}
        if linear:
            return LinearModelOperator(_OutputLossPerSample(self.model_), chosen, batches,
                                       weight=params["linear.weight"],
                                       bias=params.get("linear.bias"),
                                       weight_name="linear.weight", bias_name="linear.bias",
                                       l2=l2)
        if self.hessian == "ggn":
            return GGNOperator(_Outputs(self.model_, frozen), _OutputLoss(self.model_), chosen,
                               batches, l2=l2)
        return HessianOperator(_MeanLoss(self.model_, frozen), chosen, batches, l2=l2)

    def _fit_solver(self, params, X, y, G):
        solver = self.solver
        if solver == "explicit":
            return ExplicitIHVP(damping=self._damping()).fit(self._operator(params, X, y))
        if solver == "cg":
            return ConjugateGradientIHVP(damping=self._damping(), tol=self.tol,
                                         max_iter=self.max_iter)
        if solver == "lissa":
            return LissaIHVP(damping=self._damping(), scale=self.scale, depth=self.depth,
                             n_samples=self.n_samples, random_state=self.random_state)
        if solver == "arnoldi":
            return ArnoldiIHVP(damping=self._damping(), n_components=self.n_components,
                               max_iter=max(self.max_iter, self.n_components),
                               random_state=self.random_state).fit(
                self._operator(params, X, y))
        if solver == "datainf":
            return {"damping": self.regularization, "layer_sizes": self._layer_sizes()}
        return self._fit_ekfac(params, X, y)

    def _layer_sizes(self):
        """Sizes of the layer blocks (parameters grouped by their module) for DataInf."""
        named = dict(self.model_.module.named_parameters())
        sizes, last = [], None
        for name in self.param_names_:
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if owner == last:
                sizes[-1] += named[name].numel()
            else:
                sizes.append(named[name].numel())
                last = owner
        return sizes

    def _fit_ekfac(self, params, X, y):
        module = copy.deepcopy(self.model_.module)
        with torch.no_grad():
            own = dict(module.named_parameters())
            for name, value in params.items():
                own[name].copy_(value)
        kind = self.model_.loss_.kind
        classif = self.model_.task in ("classification", "binary")
        fisher = self.fisher if classif else "empirical"
        if kind == "ce":
            loss, sample = "cross_entropy", None
        else:
            loss = _OutputLossPerSample(self.model_)
            sample = _SampleTargets(self.model_) if fisher == "true" else None
        batches = self._device_batches(X, y)
        return fit_ekfac(module, batches, loss=loss, fisher=fisher, layers=self.param_names_,
                         forward=_EKFACForward(self.model_), sample_targets=sample,
                         random_state=self.random_state)

    def _solve(self, c, Q):
        """``(H_c + lambda I)^{-1} q`` for each row of ``Q`` (flat, shape (m, p))."""
        solver = self.solvers_[c]
        if self.solver in ("explicit", "arnoldi"):
            return solver.solve(Q)
        if self.solver in ("cg", "lissa"):
            X, y = self._train_data_
            return solver.fit(self._operator(self._params_[c], X, y)).solve(Q)
        if self.solver == "datainf":
            return datainf_ihvp(self.train_grads_[c], Q, solver["layer_sizes"],
                                damping=solver["damping"])
        layout = {k: self._params_[c][k] for k in self.param_names_}
        blocks = layer_grads_from_flat(solver, Q, layout)
        out = ekfac_ihvp(solver, blocks, damping=self.regularization)
        return layer_grads_to_flat(solver, out, layout).to(Q.dtype)

    # ------------------------------------------------------------------ fit / transform
    def _fit(self, X, y):
        params = self._checkpoint_params()
        solvers = []
        if self.solver == "ekfac":
            first = self._fit_ekfac(params[0], X, y)
            covered = []
            for layer in first.layers:
                covered.append(first.weight_names[layer])
                if first.bias_names[layer] is not None:
                    covered.append(first.bias_names[layer])
            self.param_names_ = [n for n in self.param_names_ if n in covered]
            solvers.append(first)
        self._params_ = params
        self.train_grads_ = []
        for c, p in enumerate(params):
            G = torch.empty((self.n_train_, sum(p[k].numel() for k in self.param_names_)),
                            dtype=self.model_.dtype, device=self.device_)
            for sl, g in self._grads(p, X, y, "loss", desc=f"train gradients [{c}]"):
                G[sl] = g
            self.train_grads_.append(G)
            if len(solvers) <= c:
                solvers.append(self._fit_solver(p, X, y, G))
        self.solvers_ = solvers
        keep = self.solver in ("cg", "lissa") or self.target != "loss"
        self._train_data_ = (X, y) if keep else None
        self.train_self_influence_ = self._diag("loss") if self.normalize else None

    def _diag(self, what):
        """``q_j^T H^{-1} g_j`` over the training rows, averaged over checkpoints.

        For the loss target ``q_j = g_j`` comes from the cache; otherwise the query-side
        gradients of the training rows are computed. Inverse-HVPs are solved for
        blocks of rows at once.
        """
        out = torch.zeros(self.n_train_, dtype=self.model_.dtype, device=self.device_)
        for c, G in enumerate(self.train_grads_):
            if what == "loss":
                blocks = self._row_blocks(self.n_train_, G.__getitem__)
            else:
                blocks = self._query_blocks(c, *self._train_data_, what, desc="self-influence")
            for sl, Q in blocks:
                out[sl] += (self._solve(c, Q) * G[sl]).sum(1)
        return out / len(self.train_grads_)

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
                yield slice(first, sl.stop), torch.cat(pending)
                pending, first = [], None
        if pending:
            yield slice(first, first + sum(len(p) for p in pending)), torch.cat(pending)

    def _normalizer(self):
        s = self.train_self_influence_.clamp_min(torch.finfo(self.model_.dtype).tiny)
        return torch.sqrt(s)

    def _transform_blocks(self, X, y, what):
        n_ckpt = len(self.train_grads_)
        if n_ckpt == 1:
            for sl, Q in self._query_blocks(0, X, y, what, desc="query inverse-HVPs"):
                block = self._solve(0, Q) @ self.train_grads_[0].T
                yield sl, (block / self._normalizer() if self.normalize else block)
            return
        step = self._solve_block()
        n = y.shape[0]
        for start in range(0, n, step):
            sl = slice(start, min(start + step, n))
            Xs, ys = _take(X, sl), y[sl]
            block = None
            for c, G in enumerate(self.train_grads_):
                Q = torch.cat([g for _, g in self._grads(self._params_[c], Xs, ys, what,
                                                         desc=f"query gradients [{c}]")])
                term = self._solve(c, Q) @ G.T
                block = term if block is None else block + term
            block = block / n_ckpt
            yield sl, (block / self._normalizer() if self.normalize else block)

    def _self_influence(self):
        what = self._query_value(True)
        if what == "loss" and self.train_self_influence_ is not None:
            s = self.train_self_influence_
        else:
            s = self._diag(what)
        if self.normalize:
            s = s / self._normalizer()
        return s
