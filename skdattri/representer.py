"""Representer point selection (Yeh et al., 2018) with an L2-regularised last layer."""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions

from .base import BaseAttributor
from .func.hooks import LayerCapture

__all__ = ["RepresenterPoints"]


def _last_linear(module):
    """Name of the last ``torch.nn.Linear`` in module order (``named_modules``)."""
    names = [name for name, sub in module.named_modules() if isinstance(sub, torch.nn.Linear)]
    if not names:
        raise ValueError(
            "RepresenterPoints needs a model whose last layer is a torch.nn.Linear (its "
            f"input are the features, its output the pre-activations); {type(module).__name__} "
            "has no nn.Linear."
        )
    return names[-1]


class RepresenterPoints(BaseAttributor):
    """Representer point selection: scores from an L2-regularised refit of the last layer.

    The features ``phi`` are the input of the model's last ``torch.nn.Linear`` (in
    module order). The layer is refit on them with an L2 penalty (Yeh et al., 2018,
    RPS-L2),

    ``W* = argmin_W (1/n) sum_i L(W phi_i, t_i) + regularization * ||W||^2``,

    from the model's own weights, to mimic the model's pre-activations ``z_i``:
    ``t_i = softmax(z_i)`` with the cross-entropy (classifiers), ``sigmoid(z_i)``
    with the binary cross-entropy (one logit, multilabel) or ``z_i`` with half the
    squared error (regressors; in closed form). At the optimum the representer
    theorem writes the refit layer as a sum over training samples,

    ``W* phi(x) = sum_j alpha_j (phi_j . phi(x))``,
    ``alpha_j = -(1 / (2 regularization n)) dL(W* phi_j, t_j) / dz``,

    and the score of training sample ``j`` for query ``x`` of class ``c`` is its term
    of the pre-activation of class ``c``: ``S = alpha_{j, c} (phi_j . phi(x))``.
    Positive (excitatory) training samples raise the query's class score.

    Parameters
    ----------
    estimator : object
        The model to explain: a skorch net, a scikit-learn linear model or MLP, a
        ``torch.nn.Module`` (with ``loss``), a ``FrozenEstimator`` or a ``Pipeline``
        ending in one. Its last ``nn.Linear`` (for a linear model: the model itself,
        whose features are the inputs) is refit. Fitted models are used as they are;
        unfitted ones are cloned and trained in ``fit``.
    regularization : float, default=1e-3
        ``lambda`` of the L2 refit, ``> 0``. Smaller values keep the refit closer to
        the model but make the representer values larger and the refit slower.
    max_iter : int, default=500
        Maximum number of L-BFGS iterations of the refit (classifiers).
    tol : float, default=1e-10
        The refit stops when the largest absolute entry of the gradient of its
        objective is below ``tol`` (the representer decomposition is exact up to
        ``gradient / (2 regularization)``).
    loss : {"cross_entropy", "mse"}, torch loss module or callable, default=None
        Per-sample loss of a plain ``nn.Module``; it tells a classifier from a
        regressor (the refit uses the losses above whatever the training loss).
    random_state : int, RandomState instance or None, default=None
        Seeds the training of an unfitted torch model.
    batch_size : int, default=256
        Samples per block of feature extraction and scoring.
    device : str or torch.device, default="auto"
        Where the caches live and the work runs; "auto" = CUDA when available.
    n_jobs : int, default=None
        Number of torch threads during fit/transform (``None``: torch's default).
    verbose : int, default=0
        Show progress bars.

    Attributes
    ----------
    estimator_ : object
        The fitted model that is explained.
    model_ : skdattri.model.TorchModel
        Functional view of the model.
    layer_name_ : str
        Name of the refit ``nn.Linear`` module.
    n_train_ : int
        Number of training samples.
    n_features_in_ : int
        Number of features of tabular training input.
    device_ : torch.device
        Device of the caches.
    train_features_ : Tensor of shape (n_train, n_phi)
        Features of the training samples (float64), with a trailing constant 1 when
        the layer has a bias.
    coef_ : Tensor of shape (n_outputs, n_phi)
        The refit layer (weight, bias as the last column when there is one).
    alpha_ : Tensor of shape (n_train, n_outputs)
        The representer values: ``coef_ = alpha_.T @ train_features_`` at a
        stationary point.
    n_iter_ : int
        L-BFGS iterations of the refit (0 for the closed form).
    stationarity_ : float
        Largest absolute entry of the gradient of the refit objective at ``coef_``.

    See Also
    --------
    TRAK : Kernel attribution with the gradients of all parameters.
    TracIn : Gradient similarity.

    Notes
    -----
    *Bias.* A bias of the layer is the weight of a constant feature 1: it is refit
    and penalised with the weights, and the decomposition covers it (the kernel is
    ``phi_j . phi(x) + 1``). The paper's layer has no bias.

    *Targets.* As in the paper (and dattri), the refit mimics the model's outputs,
    not the labels, so it explains the model; ``y`` of ``fit`` is used to train an
    unfitted model and for the self-influence, which scores each training sample
    for its own label. Without ``y`` in ``transform``, the query's class is the
    model's prediction.

    *Which score.* Multi-class: ``alpha_{j, c}`` of the query's class ``c``. One
    logit: the logit's term times ``+1`` for label 1 and ``-1`` for label 0.
    Multilabel: the sum of these over labels. Regression: the sum over outputs.

    The features are read with a forward hook on the last ``nn.Linear`` in
    registration order (``named_modules``), which must be the layer that produces
    the model's pre-activations and be called once per forward pass on 2-d input.

    References
    ----------
    .. [1] Yeh, Kim, Yen, Ravikumar. "Representer Point Selection for Explaining Deep
       Neural Networks". NeurIPS 2018.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skdattri.representer import RepresenterPoints
    >>> X, y = load_digits(return_X_y=True)
    >>> X = X / 16.0
    >>> model = LogisticRegression(max_iter=300).fit(X[:300], y[:300])
    >>> attr = RepresenterPoints(model).fit(X[:300], y[:300])
    >>> attr.transform(X[300:305], y[300:305]).shape
    (5, 300)
    >>> bool(attr.stationarity_ < 1e-8)
    True
    """

    _parameter_constraints: dict = {
        "estimator": "no_validation",
        "regularization": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "loss": [None, StrOptions({"cross_entropy", "mse"}), callable],
        "random_state": ["random_state"],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "n_jobs": [None, Integral],
        "verbose": ["verbose"],
    }

    def __init__(self, estimator, *, regularization=1e-3, max_iter=500, tol=1e-10, loss=None,
                 random_state=None, batch_size=256, device="auto", n_jobs=None, verbose=0):
        self.estimator = estimator
        self.regularization = regularization
        self.max_iter = max_iter
        self.tol = tol
        self.loss = loss
        self.random_state = random_state
        self.batch_size = batch_size
        self.device = device
        self.n_jobs = n_jobs
        self.verbose = verbose

    # ------------------------------------------------------------------ features
    def _features(self, xb):
        """``(phi, z)`` of a block: input (with a constant 1 for a bias) and output of
        the refit layer, in float64."""
        layer = self.model_.module.get_submodule(self.layer_name_)
        with LayerCapture([(self.layer_name_, layer)]) as capture:
            self.model_.forward(self._params_, xb)
            calls = capture.calls(self.layer_name_)
            if calls != 1:
                raise ValueError(
                    f"The last nn.Linear {self.layer_name_!r} ran {calls} times in one "
                    "forward pass; RepresenterPoints needs it to run once.")
            phi = capture.inputs()[self.layer_name_]
            z = capture.outputs()[self.layer_name_]
        if phi.shape[1] != 1:
            raise ValueError(
                f"The last nn.Linear {self.layer_name_!r} is applied at {phi.shape[1]} "
                "positions per sample; RepresenterPoints needs one feature vector per "
                "sample (2-d input).")
        return phi[:, 0].detach().to(torch.float64), z[:, 0].detach().to(torch.float64)

    def _class_weights(self, y, n_out):
        """``(n, n_out)`` weights of each pre-activation in the score of a query."""
        return self.model_.loss_.output_weights(y, n_out)

    # ------------------------------------------------------------------ refit
    def _objective(self, W, Phi, T):
        """Refit objective and its per-sample derivative ``dL/dz`` (n, n_out)."""
        n = Phi.shape[0]
        Z = Phi @ W.T
        if self._task_ == "softmax":
            logp = torch.log_softmax(Z, dim=1)
            loss = -(T * logp).sum() / n
            dz = logp.exp() - T
        elif self._task_ == "sigmoid":
            loss = F.binary_cross_entropy_with_logits(Z, T, reduction="sum") / n
            dz = torch.sigmoid(Z) - T
        else:
            loss = 0.5 * ((Z - T) ** 2).sum() / n
            dz = Z - T
        lam = float(self.regularization)
        value = loss + lam * (W * W).sum()
        grad = dz.T @ Phi / n + 2.0 * lam * W
        return value, grad, dz

    def _hvp(self, W, Phi, V):
        """Hessian of the refit objective at ``W`` applied to a direction ``V``."""
        n = Phi.shape[0]
        Z, U = Phi @ W.T, Phi @ V.T
        if self._task_ == "softmax":
            P = torch.softmax(Z, dim=1)
            HU = P * U - P * (P * U).sum(1, keepdim=True)
        else:
            s = torch.sigmoid(Z)
            HU = s * (1.0 - s) * U
        return HU.T @ Phi / n + 2.0 * float(self.regularization) * V

    def _newton_step(self, W, Phi, grad):
        """Inexact Newton direction: conjugate gradients on ``H d = -grad``."""
        d = torch.zeros_like(W)
        r = -grad
        p = r.clone()
        rr = float((r * r).sum())
        stop = rr * 1e-20
        for _ in range(10 * max(1, min(W.numel(), 100))):
            Hp = self._hvp(W, Phi, p)
            step = rr / float((p * Hp).sum())
            d.add_(p, alpha=step)
            r.sub_(Hp, alpha=step)
            rr_new = float((r * r).sum())
            if rr_new <= stop:
                break
            p.mul_(rr_new / rr).add_(r)
            rr = rr_new
        return d

    def _refit(self, Phi, T, W0):
        lam, n = float(self.regularization), Phi.shape[0]
        if self._task_ == "identity":
            # ridge in closed form: (Phi^T Phi + 2 lam n I) W^T = Phi^T T (or the dual)
            if Phi.shape[1] <= n:
                A = Phi.T @ Phi
                A.diagonal().add_(2.0 * lam * n)
                W = torch.cholesky_solve(Phi.T @ T, torch.linalg.cholesky(A)).T
            else:
                A = Phi @ Phi.T
                A.diagonal().add_(2.0 * lam * n)
                W = (Phi.T @ torch.cholesky_solve(T, torch.linalg.cholesky(A))).T
            return W.contiguous(), 0
        W = W0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([W], lr=1.0, max_iter=self.max_iter,
                                tolerance_grad=self.tol, tolerance_change=0.0,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            with torch.no_grad():
                value, grad, _ = self._objective(W, Phi, T)
            W.grad = grad
            return value

        with torch.enable_grad():
            opt.step(closure)
        n_iter = int(opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0))
        W = W.detach()
        # Near the optimum a line search on the objective stalls at its round-off
        # (|change| < eps * value); Newton steps use gradients only and converge
        # quadratically, down to the round-off of the gradient.
        grad = self._objective(W, Phi, T)[1]
        best = float(grad.abs().max())
        for _ in range(8):
            if best <= self.tol:
                break
            candidate = W + self._newton_step(W, Phi, grad)
            cand_grad = self._objective(candidate, Phi, T)[1]
            size = float(cand_grad.abs().max())
            if not size < best:
                break
            W, grad, best = candidate, cand_grad, size
            n_iter += 1
        return W, n_iter

    def _fit(self, X, y):
        model = self.model_
        self.layer_name_ = _last_linear(model.module)
        layer = model.module.get_submodule(self.layer_name_)
        self._bias_ = layer.bias is not None
        self._params_ = model.named_params()
        self._task_ = model.loss_.link(layer.out_features)  # softmax, sigmoid or identity

        feats, outs = [], []
        with torch.no_grad():
            for _, xb, _ in self._batches(X, None, desc="train features"):
                phi, z = self._features(xb)
                feats.append(phi)
                outs.append(z)
        Phi, Z0 = torch.cat(feats), torch.cat(outs)
        if self._task_ == "softmax":
            T = torch.softmax(Z0, dim=1)
        elif self._task_ == "sigmoid":
            T = torch.sigmoid(Z0)
        else:
            T = Z0
        W0 = layer.weight.detach().to(torch.float64)
        if self._bias_:
            W0 = torch.cat([W0, layer.bias.detach().to(torch.float64)[:, None]], dim=1)
        W, self.n_iter_ = self._refit(Phi, T, W0)
        with torch.no_grad():
            _, grad, dz = self._objective(W, Phi, T)
        self.stationarity_ = float(grad.abs().max())
        if self._task_ != "identity" and self.stationarity_ > self.tol:
            warnings.warn(
                f"The L2 refit of the last layer stopped after {self.n_iter_} L-BFGS "
                f"iterations with max |gradient| = {self.stationarity_:.3g} > tol={self.tol:g}; "
                "the representer decomposition is off by up to gradient / (2 regularization). "
                "Increase max_iter or regularization.", ConvergenceWarning, stacklevel=3)
        self.coef_ = W
        self.alpha_ = dz / (-2.0 * float(self.regularization) * self.n_train_)
        self.train_features_ = Phi
        weights = self._class_weights(y.to(self.device_), Z0.shape[1])
        self._self_influence_ = (weights * self.alpha_).sum(1) * (Phi * Phi).sum(1)

    _device_attributes = ("model_", "train_features_", "coef_", "alpha_", "_params_",
                          "_self_influence_")

    # ------------------------------------------------------------------ scores
    def _query_value(self, y_given):
        return None  # scores come from features, not from gradients of a query value

    def _transform_blocks(self, X, y, what):
        for sl, xb, yb in self._batches(X, y, desc="query features"):
            phi, _ = self._features(xb)
            coef = self._class_weights(yb, self.alpha_.shape[1]) @ self.alpha_.T
            yield sl, (phi @ self.train_features_.T) * coef

    def _self_influence(self):
        return self._self_influence_
