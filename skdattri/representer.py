"""Representer point selection (Yeh et al., 2018): an L2-regularised linear layer refit."""

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


#: ``regularization="auto"``: this many times the mean non-zero eigenvalue of the
#: features' second-moment matrix ``Phi^T Phi / n`` (measured on digits LR, torch LR and
#: MLP models; see the class Notes).
AUTO_REGULARIZATION = 0.03


def _linear_layer(module, layer):
    """Name of the ``torch.nn.Linear`` whose inputs are the features: ``layer``, or the
    last one in module order (``named_modules``) when ``layer`` is None."""
    names = [name for name, sub in module.named_modules() if isinstance(sub, torch.nn.Linear)]
    if not names:
        raise ValueError(
            "RepresenterPoints needs a model with a torch.nn.Linear layer (its inputs are "
            f"the features); {type(module).__name__} has no nn.Linear."
        )
    if layer is None:
        return names[-1]
    if layer not in names:
        raise ValueError(
            f"layer={layer!r} is not a torch.nn.Linear of {type(module).__name__}; its "
            f"nn.Linear layers are {names}."
        )
    return layer


#: refits with at most this many coefficients use Newton's method (conjugate-gradient
#: steps); larger ones L-BFGS
_NEWTON_SIZE = 2**14


class RepresenterPoints(BaseAttributor):
    """Representer point selection: scores from an L2-regularised refit of a linear layer.

    The features ``phi`` are the inputs of a ``torch.nn.Linear`` of the model (``layer``;
    by default the last one in module order, whose outputs are the pre-activations). A
    linear layer on these features is refit with an L2 penalty (Yeh et al., 2018,
    RPS-L2),

    ``W* = argmin_W (1/n) sum_i L(W phi_i, t_i) + lambda ||W||^2``,

    starting from the layer's own weights. The targets ``t_i`` are the training labels
    (``targets="labels"``) or the model's outputs (``targets="model"``, the paper's
    post-hoc RPS and dattri's): with the cross-entropy (classifiers; one-hot labels or
    ``softmax(z_i)``), the binary cross-entropy (one logit, multilabel; 0/1 labels or
    ``sigmoid(z_i)``) or half the squared error (regressors; ``y_i`` or ``z_i``, in
    closed form). At the optimum the representer theorem writes the refit layer as a
    sum over training samples,

    ``W* phi(x) = sum_j alpha_j (phi_j . phi(x))``,
    ``alpha_j = -(1 / (2 lambda n)) dL(W* phi_j, t_j) / dz``,

    and the score of training sample ``j`` for query ``x`` of class ``c`` is its term
    of the pre-activation of class ``c``: ``S = alpha_{j, c} (phi_j . phi(x))``.
    Positive (excitatory) training samples raise the query's class score.

    Parameters
    ----------
    estimator : object
        The model to explain: a skorch net, a scikit-learn linear model or MLP, a
        ``torch.nn.Module`` (with ``loss``), a ``FrozenEstimator`` or a ``Pipeline``
        ending in one. For a linear model the layer is the model itself, whose
        features are the inputs. Fitted models are used as they are; unfitted ones are
        cloned and trained in ``fit``.
    layer : str, default=None
        Name (as in ``named_modules``) of the ``torch.nn.Linear`` whose inputs are the
        features. ``None``: the last ``nn.Linear`` in module order.
    targets : {"labels", "model"}, default="labels"
        What the refit fits: the training labels, or the model's outputs on the
        training set (which keeps the refit closest to the model, and is the paper's
        recipe for a model not trained with this penalty). See Notes.
    regularization : float or "auto", default="auto"
        ``lambda`` of the L2 refit, ``> 0``. ``"auto"``: 0.03 times the mean
        non-zero eigenvalue of ``Phi^T Phi / n`` (the features' second-moment matrix,
        the scale of the refit's curvature), so that the default does not depend on the
        units of the features. Smaller values keep the refit closer to its targets but make the
        representer values larger and the refit slower.
    max_iter : int, default=500
        Maximum number of iterations of the refit (classifiers): Newton steps when
        the refit has at most 16,384 coefficients, else L-BFGS iterations.
    tol : float, default=1e-10
        The refit stops when the largest absolute entry of the gradient of its
        objective is below ``tol`` (the representer decomposition is exact up to
        ``gradient / (2 lambda)``).
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
        Name of the ``nn.Linear`` whose inputs are the features.
    regularization_ : float
        The ``lambda`` of the refit (the value ``"auto"`` chose).
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
        Newton steps or L-BFGS iterations of the refit (0 for the closed form).
    stationarity_ : float
        Largest absolute entry of the gradient of the refit objective at ``coef_``.

    See Also
    --------
    TRAK : Kernel attribution with the gradients of all parameters.
    TracIn : Gradient similarity.

    Notes
    -----
    *Self-influence* (classifiers) is the score of each training sample for its own
    label, ``alpha_{j, y_j} ||phi_j||^2`` (the diagonal of ``transform(X_train,
    y_train)``). With ``targets="labels"`` it is ``(1 - p*_j) ||phi_j||^2 / (2 lambda
    n)``, ``p*_j`` the refit's probability of the label: never negative, and high for
    samples whose label the features cannot explain, so high self-influence flags
    atypical or mislabelled samples as for every attributor. With ``targets="model"``
    the refit never sees the labels: ``alpha_j`` follows the *model's* predicted class
    (the shrunken refit under-predicts it), so a mislabelled sample has a negative
    self-influence and *low* values are the suspicious ones (rank by
    ``-self_influence()``). For regressors it is the residual of the refit times
    ``||phi_j||^2 / (2 lambda n)`` (summed over outputs), large in absolute value for
    atypical samples.

    *Which targets.* The labels make the refit the L2-regularised classifier on the
    model's features that the representer theorem decomposes exactly (for a
    scikit-learn ``LogisticRegression`` with the matching ``lambda`` it is the model
    itself); the model's outputs keep the refit closest to a model trained without
    the penalty. Measured LDS (50 retrained half subsets, loss of the true label) on
    digits with the default ``lambda``: logistic regression 0.43 (0.42 with the
    model's outputs at their best ``lambda``), a torch logistic regression 0.69
    (0.63), a 64-128-64-10 MLP 0.41 (0.39).

    *Bias.* A bias of the layer is the weight of a constant feature 1: it is refit
    and penalised with the weights, and the decomposition covers it (the kernel is
    ``phi_j . phi(x) + 1``). The paper's layer has no bias.

    *Which score.* Multi-class: ``alpha_{j, c}`` of the query's class ``c`` (its
    label when ``transform`` gets ``y``, as dattri does, else the model's prediction,
    which the paper explains). One logit: the logit's term times ``+1`` for label 1
    and ``-1`` for label 0. Multilabel: the sum of these over labels. Regression: the
    sum over outputs.

    The features are read with a forward hook on the layer, which must be called once
    per forward pass on 2-d input. The refit's outputs are the model's (its last
    layer's when ``layer`` is the last ``nn.Linear``); for an earlier layer the refit
    starts from zero.

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
    >>> bool(attr.self_influence().min() >= 0)  # high = label the features cannot explain
    True
    """

    _parameter_constraints: dict = {
        "estimator": "no_validation",
        "layer": [None, str],
        "targets": [StrOptions({"labels", "model"})],
        "regularization": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "loss": [None, StrOptions({"cross_entropy", "mse"}), callable],
        "random_state": ["random_state"],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "n_jobs": [None, Integral],
        "verbose": ["verbose"],
    }

    def __init__(self, estimator, *, layer=None, targets="labels", regularization="auto",
                 max_iter=500, tol=1e-10, loss=None, random_state=None, batch_size=256,
                 device="auto", n_jobs=None, verbose=0):
        self.estimator = estimator
        self.layer = layer
        self.targets = targets
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
        """``(phi, z)`` of a block: the layer's input (with a constant 1 for a bias) and
        the model's logits, in float64."""
        layer = self.model_.module.get_submodule(self.layer_name_)
        with LayerCapture([(self.layer_name_, layer)]) as capture:
            outputs = self.model_.forward(self._params_, xb)
            calls = capture.calls(self.layer_name_)
            if calls != 1:
                raise ValueError(
                    f"The nn.Linear {self.layer_name_!r} ran {calls} times in one "
                    "forward pass; RepresenterPoints needs it to run once.")
            phi = capture.inputs()[self.layer_name_]
        if phi.shape[1] != 1:
            raise ValueError(
                f"The nn.Linear {self.layer_name_!r} is applied at {phi.shape[1]} "
                "positions per sample; RepresenterPoints needs one feature vector per "
                "sample (2-d input).")
        z = self.model_.loss_.logits(outputs)
        return phi[:, 0].detach().to(torch.float64), z.detach().to(torch.float64)

    def _class_weights(self, y, n_out):
        """``(n, n_out)`` weights of each pre-activation in the score of a query."""
        return self.model_.loss_.output_weights(y, n_out)

    def _targets(self, Z, y):
        """Refit targets ``(n, n_out)``: the labels, or the model's outputs ``Z``."""
        if self.targets == "labels":
            if self._task_ == "softmax":
                return F.one_hot(y.long().reshape(-1), Z.shape[1]).to(torch.float64)
            return y.reshape(Z.shape).to(torch.float64)
        if self._task_ == "softmax":
            return torch.softmax(Z, dim=1)
        return torch.sigmoid(Z) if self._task_ == "sigmoid" else Z

    def _initial_coef(self, layer, Phi, n_out):
        """The layer's weights (and bias) when it produces the outputs, else zeros."""
        if layer.out_features != n_out:
            return torch.zeros((n_out, Phi.shape[1]), dtype=torch.float64, device=Phi.device)
        W0 = layer.weight.detach().to(torch.float64)
        if self._bias_:
            W0 = torch.cat([W0, layer.bias.detach().to(torch.float64)[:, None]], dim=1)
        return W0

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
        lam = self.regularization_
        value = loss + lam * (W * W).sum()
        grad = dz.T @ Phi / n + 2.0 * lam * W
        return value, grad, dz

    def _hvp(self, P, Phi, V):
        """Hessian of the refit objective applied to a direction ``V``, at the point
        whose output probabilities are ``P = link(Phi W^T)``."""
        n = Phi.shape[0]
        U = Phi @ V.T
        if self._task_ == "softmax":
            HU = P * U - P * (P * U).sum(1, keepdim=True)
        else:
            HU = P * (1.0 - P) * U
        return HU.T @ Phi / n + 2.0 * self.regularization_ * V

    def _newton_step(self, W, Phi, grad):
        """Inexact Newton direction: conjugate gradients on ``H d = -grad``."""
        Z = Phi @ W.T
        P = torch.softmax(Z, dim=1) if self._task_ == "softmax" else torch.sigmoid(Z)
        d = torch.zeros_like(W)
        r = -grad
        p = r.clone()
        rr = float((r * r).sum())
        stop = rr * 1e-20
        for _ in range(10 * max(1, min(W.numel(), 100))):
            Hp = self._hvp(P, Phi, p)
            step = rr / float((p * Hp).sum())
            d.add_(p, alpha=step)
            r.sub_(Hp, alpha=step)
            rr_new = float((r * r).sum())
            if rr_new <= stop:
                break
            p.mul_(rr_new / rr).add_(r)
            rr = rr_new
        return d

    def _newton(self, W0, Phi, T):
        """Newton's method (conjugate-gradient steps) with a backtracking line search: the
        refit objective is strongly convex, so it converges in a few steps (quadratically
        near the optimum) where L-BFGS needed hundreds of evaluations of the objective."""
        W = W0.clone()
        value, grad, _ = self._objective(W, Phi, T)
        best, n_iter = float(grad.abs().max()), 0
        while best > self.tol and n_iter < self.max_iter:
            step = self._newton_step(W, Phi, grad)
            slope, t = float((grad * step).sum()), 1.0
            while True:
                cand = W + t * step
                cand_value, cand_grad, _ = self._objective(cand, Phi, T)
                size = float(cand_grad.abs().max())
                # near the optimum the value stalls at its round-off: a full step that
                # shrinks the gradient is taken then
                if (float(cand_value) <= float(value) + 1e-4 * t * slope
                        or (t == 1.0 and size < best) or t < 1e-8):
                    break
                t *= 0.5
            if not (size < best or float(cand_value) < float(value)):
                break
            W, value, grad, best = cand, cand_value, cand_grad, size
            n_iter += 1
        return W, n_iter

    def _refit(self, Phi, T, W0):
        lam, n = self.regularization_, Phi.shape[0]
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
        if W0.numel() <= _NEWTON_SIZE:
            return self._newton(W0, Phi, T)
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
        self.layer_name_ = _linear_layer(model.module, self.layer)
        layer = model.module.get_submodule(self.layer_name_)
        self._bias_ = layer.bias is not None
        self._params_ = model.named_params()

        feats, outs = [], []
        with torch.no_grad():
            for _, xb, _ in self._batches(X, None, desc="train features"):
                phi, z = self._features(xb)
                feats.append(phi)
                outs.append(z)
        Phi, Z0 = torch.cat(feats), torch.cat(outs)
        self._task_ = model.loss_.link(Z0.shape[1])  # softmax, sigmoid or identity
        y = y.to(self.device_)
        T = self._targets(Z0, y)
        if self.regularization == "auto":
            # mean of the (at most min(n, n_phi)) non-zero eigenvalues of Phi^T Phi / n
            n, d = Phi.shape
            scale = float((Phi * Phi).sum()) / (n * min(n, d))
            if not scale > 0:
                raise ValueError(
                    f"The inputs of {self.layer_name_!r} are zero for every training sample; "
                    "regularization='auto' has no scale. Pass a float regularization.")
            self.regularization_ = AUTO_REGULARIZATION * scale
        else:
            self.regularization_ = float(self.regularization)
        W, self.n_iter_ = self._refit(Phi, T, self._initial_coef(layer, Phi, Z0.shape[1]))
        with torch.no_grad():
            _, grad, dz = self._objective(W, Phi, T)
        self.stationarity_ = float(grad.abs().max())
        if self._task_ != "identity" and self.stationarity_ > self.tol:
            warnings.warn(
                f"The L2 refit of the {'last ' if self.layer is None else ''}layer "
                f"{self.layer_name_!r} stopped after "
                f"{self.n_iter_} iterations with max |gradient| = "
                f"{self.stationarity_:.3g} > tol={self.tol:g}; the representer decomposition "
                "is off by up to gradient / (2 regularization). Increase max_iter or "
                "regularization.", ConvergenceWarning, stacklevel=3)
        self.coef_ = W
        self.alpha_ = dz / (-2.0 * self.regularization_ * self.n_train_)
        self.train_features_ = Phi
        weights = self._class_weights(y, Z0.shape[1])
        self._self_influence_ = (weights * self.alpha_).sum(1) * (Phi * Phi).sum(1)

    _device_attributes = ("model_", "train_features_", "coef_", "alpha_", "_params_",
                          "_self_influence_")

    # ------------------------------------------------------------------ scores
    def _query_value(self, y_given):
        return None  # scores come from features, not from gradients of a query value

    def _query_features(self, X, y, what):
        for sl, xb, yb in self._batches(X, y, desc="query features"):
            phi, _ = self._features(xb)
            yield sl, (phi, self._class_weights(yb, self.alpha_.shape[1]))

    def _score(self, features, rows):
        phi, weights = features
        return (phi @ self.train_features_[rows].T) * (weights @ self.alpha_[rows].T)

    def _self_influence(self):
        return self._self_influence_
