"""Fitted scikit-learn linear models and MLPs as torch modules with their own loss."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from ._base import TorchModel
from ._loss import _Loss


def _linear_module(coef, intercept, device):
    """``nn.Sequential(linear=Linear)`` in float64 holding ``coef`` (k, d) and ``intercept``."""
    coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    k, d = coef.shape
    has_bias = intercept is not None
    lin = nn.Linear(d, k, bias=bool(has_bias), dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(coef))
        if has_bias:
            b = np.broadcast_to(np.asarray(intercept, dtype=np.float64), (k,))
            lin.bias.copy_(torch.from_numpy(np.array(b)))
    return nn.Sequential(OrderedDict(linear=lin)).to(device)


def _logistic_l2(est, n_train):
    """L2 coefficient (mean-loss form) of a fitted LogisticRegression."""
    C = float(est.C)
    if not np.isfinite(C):
        return 0.0
    penalty = getattr(est, "penalty", "l2")
    l1_ratio = getattr(est, "l1_ratio", None)
    l1_ratio = 0.0 if l1_ratio is None else float(l1_ratio)
    if penalty is None or penalty == "none":
        return 0.0
    if penalty == "l1":
        share = 0.0
    elif penalty == "l2":
        share = 1.0
    else:  # "elasticnet" or the new default that reads l1_ratio
        share = 1.0 - l1_ratio
    return share / (C * n_train)


def _from_logistic(est, n_train, device):
    classes = np.asarray(est.classes_)
    module = _linear_module(est.coef_, est.intercept_ if est.fit_intercept else None, device)
    if est.coef_.shape[0] == 1:
        loss = _Loss("bce", task="binary")
    else:
        loss = _Loss("ce", task="classification")
    l2 = {"linear.weight": _logistic_l2(est, n_train)}
    return TorchModel(module, loss, l2=l2, classes=classes, cast_int_inputs=True,
                      affine="linear")


def _from_linear_regression(est, n_train, device, alpha=0.0):
    coef = np.asarray(est.coef_, dtype=np.float64)
    single = coef.ndim == 1
    module = _linear_module(coef, est.intercept_ if est.fit_intercept else None, device)
    # sklearn: ||y - Xw||^2 + alpha ||w||^2  ->  mean_i (y_i - f_i)^2 + (alpha / n) ||w||^2
    alpha = np.asarray(alpha, dtype=np.float64)
    coef_l2 = 2.0 * alpha / n_train
    if coef_l2.ndim == 1 and not single:
        coef_l2 = torch.as_tensor(coef_l2[:, None])
    else:
        coef_l2 = float(coef_l2)
    loss = _Loss("squared", task="regression", reduce_outputs="sum")
    return TorchModel(module, loss, l2={"linear.weight": coef_l2}, cast_int_inputs=True,
                      affine="linear")


def _from_sgd_classifier(est, n_train, device):
    name = est.loss
    if name not in ("log_loss", "hinge", "squared_hinge", "modified_huber", "perceptron"):
        raise TypeError(
            f"SGDClassifier(loss={name!r}) is not supported; use one of 'log_loss', "
            "'hinge', 'squared_hinge', 'modified_huber', 'perceptron'."
        )
    module = _linear_module(est.coef_, est.intercept_ if est.fit_intercept else None, device)
    penalty = est.penalty
    if penalty == "l2":
        l2 = float(est.alpha)
    elif penalty == "elasticnet":
        l2 = float(est.alpha) * (1.0 - float(est.l1_ratio))
    else:
        l2 = 0.0
    task = "binary" if est.coef_.shape[0] == 1 else "classification"
    loss = _Loss("ovr_" + name, task=task)
    return TorchModel(module, loss, l2={"linear.weight": l2}, classes=np.asarray(est.classes_),
                      cast_int_inputs=True, affine="linear")


def _from_sgd_regressor(est, n_train, device):
    if est.loss != "squared_error":
        raise TypeError(
            f"SGDRegressor(loss={est.loss!r}) is not supported; use loss='squared_error'."
        )
    module = _linear_module(est.coef_, est.intercept_ if est.fit_intercept else None, device)
    l2 = float(est.alpha) if est.penalty == "l2" else (
        float(est.alpha) * (1.0 - float(est.l1_ratio)) if est.penalty == "elasticnet" else 0.0
    )
    loss = _Loss("squared", task="regression", scale=0.5)
    return TorchModel(module, loss, l2={"linear.weight": l2}, cast_int_inputs=True,
                      affine="linear")


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "logistic": nn.Sigmoid, "identity": nn.Identity}


def _from_mlp(est, n_train, device, classifier):
    if not classifier and getattr(est, "loss", "squared_error") != "squared_error":
        raise TypeError(
            f"MLPRegressor(loss={est.loss!r}) is not supported; use loss='squared_error'."
        )
    layers = OrderedDict()
    n_layers = len(est.coefs_)
    l2 = {}
    for i, (W, b) in enumerate(zip(est.coefs_, est.intercepts_)):
        name = "output" if i == n_layers - 1 else f"hidden{i}"
        lin = nn.Linear(W.shape[0], W.shape[1], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T, dtype=np.float64)))
            lin.bias.copy_(torch.from_numpy(np.asarray(b, dtype=np.float64)))
        layers[name] = lin
        # sklearn: loss + 0.5 * alpha * sum ||W||^2 / n_samples
        l2[f"{name}.weight"] = float(est.alpha) / n_train
        if i < n_layers - 1:
            layers[f"act{i}"] = _ACTIVATIONS[est.activation]()
    module = nn.Sequential(layers).to(device)
    if classifier:
        classes = np.asarray(est.classes_)
        if est.out_activation_ == "softmax":
            loss = _Loss("ce", task="classification")
        elif est.n_outputs_ == 1:
            loss = _Loss("bce", task="binary")
        else:
            loss = _Loss("multilabel_bce", task="multilabel")
            classes = None
    else:
        classes = None
        loss = _Loss("squared", task="regression", scale=0.5, reduce_outputs="mean")
    return TorchModel(module, loss, l2=l2, classes=classes, cast_int_inputs=True)


def _sklearn_model(est, n_train, device):
    """Dispatch over the supported sklearn estimators; ``None`` when not supported."""
    from sklearn.linear_model import (
        LinearRegression,
        LogisticRegression,
        Ridge,
        SGDClassifier,
        SGDRegressor,
    )
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    if isinstance(est, LogisticRegression):
        return _from_logistic(est, n_train, device)
    if isinstance(est, Ridge):
        return _from_linear_regression(est, n_train, device, alpha=est.alpha)
    if isinstance(est, LinearRegression):
        return _from_linear_regression(est, n_train, device)
    if isinstance(est, SGDClassifier):
        return _from_sgd_classifier(est, n_train, device)
    if isinstance(est, SGDRegressor):
        return _from_sgd_regressor(est, n_train, device)
    if isinstance(est, MLPClassifier):
        return _from_mlp(est, n_train, device, classifier=True)
    if isinstance(est, MLPRegressor):
        return _from_mlp(est, n_train, device, classifier=False)
    return None
