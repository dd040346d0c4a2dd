"""The one dispatch point from "what is attributed" to a :class:`TorchModel`."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted

from .._utils import _seed_from
from ._base import TorchModel
from ._loss import make_loss
from ._sklearn import _sklearn_model
from ._torch import _is_skorch, _module_model, _skorch_model

SUPPORTED = (
    "a fitted or unfitted skorch NeuralNet (NeuralNetClassifier, NeuralNetBinaryClassifier, "
    "NeuralNetRegressor); scikit-learn LogisticRegression, LinearRegression, Ridge, "
    "SGDClassifier, SGDRegressor, MLPClassifier, MLPRegressor; a torch.nn.Module (also a "
    "Hugging Face model, whose ModelOutput's logits are used) together with loss=; any of "
    "these wrapped in sklearn.frozen.FrozenEstimator or as the last step of a Pipeline"
)


def _unfreeze(est):
    """The estimator inside a ``FrozenEstimator`` (it is fitted by definition)."""
    try:
        from sklearn.frozen import FrozenEstimator
    except ImportError:  # pragma: no cover - sklearn < 1.6
        return est, False
    if isinstance(est, FrozenEstimator):
        return est.estimator, True
    return est, False


def is_fitted(est) -> bool:
    """Whether ``est`` is used as it is (fitted) or must be trained first."""
    est, frozen = _unfreeze(est)
    if frozen or isinstance(est, torch.nn.Module):
        return True
    if _is_skorch(est):
        return bool(getattr(est, "initialized_", False))
    try:
        check_is_fitted(est)
    except NotFittedError:
        return False
    except TypeError:
        return False
    return True


def fit_or_keep(estimator, X, y, *, random_state=None):
    """Return ``estimator`` when fitted; otherwise a fitted clone of it.

    Torch-based estimators are trained under a torch seed drawn from
    ``random_state`` (without touching the global RNG state), so two ``fit`` calls
    with the same ``random_state`` give the same model.
    """
    if is_fitted(estimator):
        return estimator
    if not hasattr(estimator, "fit"):
        raise TypeError(f"Cannot attribute {estimator!r}. Supported: {SUPPORTED}.")
    est = clone(estimator)
    last = est[-1] if isinstance(est, Pipeline) else est
    if _is_skorch(last):
        X, y = _skorch_inputs(last, X, y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_from(random_state))
            est.fit(X, y)
    else:
        est.fit(X, y)
    return est


def _skorch_inputs(net, X, y):
    """float32 features and int64 (classifier) / float32 (regressor) targets for skorch."""
    from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor

    if isinstance(X, np.ndarray) and X.dtype.kind == "f":
        X = X.astype(np.float32)
    if y is not None and not isinstance(y, torch.Tensor):
        y = np.asarray(y)
        if isinstance(net, NeuralNetClassifier) and not isinstance(net,
                                                                   NeuralNetBinaryClassifier):
            kind = type_of_target(y, input_name="y", raise_unknown=True)
            integral = y.dtype.kind in "iub" or (
                y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0))
            if kind not in ("binary", "multiclass") or not integral:
                raise ValueError(
                    f"Unknown label type {kind!r} (dtype {y.dtype}) for a skorch classifier: "
                    "it trains on integer class indices 0..n_classes-1; encode labels with "
                    "sklearn.preprocessing.LabelEncoder first."
                )
            y = y.astype(np.int64)
        elif isinstance(net, (NeuralNetRegressor, NeuralNetBinaryClassifier)):
            y = y.astype(np.float32)
    return X, y


def make_model(estimator, *, loss=None, n_train=None, device=None) -> TorchModel:
    """Turn a fitted estimator into a :class:`~skdattri.model.TorchModel`.

    Parameters
    ----------
    estimator : object
        A fitted skorch net, scikit-learn linear model or MLP, a ``torch.nn.Module``
        (with ``loss``), a ``FrozenEstimator`` around one of these or a fitted
        ``Pipeline`` ending in one (earlier steps transform ``X`` first).
    loss : str, torch loss module or callable, default=None
        Per-sample loss; required for a plain ``nn.Module``, overrides the
        estimator's own loss otherwise.
    n_train : int, default=None
        Number of training samples, used to express an sklearn estimator's L2
        penalty per sample (its objective is divided by ``n_train``).
    device : torch.device, default=None
        Where the module lives (CPU when ``None``).

    Returns
    -------
    model : TorchModel

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skdattri.model import make_model
    >>> X, y = load_iris(return_X_y=True)
    >>> model = make_model(LogisticRegression(max_iter=500).fit(X, y), n_train=len(X))
    >>> list(model.named_params())
    ['linear.weight', 'linear.bias']
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    est, _ = _unfreeze(estimator)
    preprocess = None
    if isinstance(est, Pipeline):
        if len(est.steps) > 1:
            preprocess = est[:-1].transform
        est, _ = _unfreeze(est[-1])
    if not is_fitted(est):
        raise NotFittedError(
            f"This {type(est).__name__} instance is not fitted yet; fit it first or let the "
            "attributor fit it (pass the unfitted estimator to the attributor)."
        )
    if isinstance(est, torch.nn.Module):
        model = _module_model(est, loss, device)
        loss = None
    elif _is_skorch(est):
        model = _skorch_model(est, device)
    else:
        n = n_train if n_train is not None else 1
        model = _sklearn_model(est, n, device)
        if model is None:
            raise TypeError(
                f"Cannot attribute {type(est).__name__}. Supported estimators: {SUPPORTED}."
            )
    if loss is not None:
        model.loss_ = make_loss(loss, task=model.task)
    model.preprocess = preprocess
    return model


def checkpoint_state(checkpoint, *, device=None):
    """A checkpoint as a ``{parameter name: tensor}`` dict.

    Parameters
    ----------
    checkpoint : dict, torch.nn.Module, fitted estimator or None
        A state dict (returned as it is), a module of the attributed architecture, or a
        fitted estimator of the same kind (converted with the same adapter as the
        attributed model); ``None`` stays ``None`` (the attributed model itself).
    device : torch.device, default=None
        Where an estimator's converted module is built.

    Returns
    -------
    state : dict of str to Tensor or None
    """
    if checkpoint is None or isinstance(checkpoint, dict):
        return checkpoint
    if isinstance(checkpoint, torch.nn.Module):
        return {n: p.detach() for n, p in checkpoint.named_parameters()}
    return make_model(checkpoint, device=device).named_params()
