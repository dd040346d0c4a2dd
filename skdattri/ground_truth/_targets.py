"""Per-query targets of a fitted model: the values a ground truth records.

:func:`query_targets` turns a retrained model into one float per query sample,
the loss or the margin of the query's label, with the same definitions for
every kind of model (classifier through ``predict_proba``, regressor through
``predict``).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import is_classifier, is_regressor

from .._utils import _as_numpy

__all__ = ["query_targets"]


def _label_columns(model, y, n_columns):
    """Column of ``predict_proba`` for every label in ``y`` (-1 when unseen)."""
    y = _as_numpy(y).ravel()
    classes = getattr(model, "classes_", None)
    if classes is not None:
        classes = _as_numpy(classes).ravel()
    if classes is not None and classes.shape[0] == n_columns:
        order = np.argsort(classes, kind="stable")
        sorted_classes = classes[order]
        pos = np.clip(np.searchsorted(sorted_classes, y), 0, n_columns - 1)
        found = sorted_classes[pos] == y
        return np.where(found, order[pos], -1)
    # Without matching classes_ (e.g. a skorch net whose module has more outputs than
    # the labels seen in its training subset), integer labels are the column indices.
    if np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)
    ):
        cols = y.astype(np.int64)
        if np.all((cols >= 0) & (cols < n_columns)):
            return cols
    raise ValueError(
        "Cannot map the labels y to the columns of predict_proba: the model has no "
        f"classes_ matching its {n_columns} probability columns and y is not made of "
        f"integer column indices in [0, {n_columns})."
    )


def _class_log_odds(proba, cols):
    """Return ``(log p_y, log(1 - p_y))`` per row, the latter as a sum over other classes.

    Probabilities are floored at the smallest normal number of their dtype before
    the logarithm, so a class predicted with probability 0 gives a large finite
    value rather than ``-inf``. ``1 - p_y`` is computed as the sum of the other
    probabilities, which keeps its precision when ``p_y`` is close to 1.
    """
    proba = _as_numpy(proba)
    tiny = np.finfo(proba.dtype if np.issubdtype(proba.dtype, np.floating) else float).tiny
    proba = np.asarray(proba, dtype=np.float64)
    rows = np.arange(proba.shape[0])
    seen = cols >= 0
    p_y = np.zeros(proba.shape[0])
    p_y[seen] = proba[rows[seen], cols[seen]]
    others = proba.copy()
    others[rows[seen], cols[seen]] = 0.0
    rest = others.sum(axis=1)
    log_py = np.log(np.maximum(p_y, tiny))
    log_rest = np.log(np.maximum(rest, tiny))
    return log_py, log_rest


def query_targets(model, X_test, y_test, target):
    """Per-query target values of a fitted model.

    Parameters
    ----------
    model : fitted estimator
        A classifier (anything with ``predict_proba`` that is not a regressor)
        or a regressor.

    X_test : array-like, torch tensor, dict of arrays or Dataset, n_test rows
        Query inputs.

    y_test : array-like of shape (n_test,) or (n_test, n_outputs)
        Query labels (classifier) or targets (regressor).

    target : {"loss", "margin"}
        Which value to return.

    Returns
    -------
    values : ndarray of shape (n_test,), dtype=float64
        Token classifiers (a skorch net with ``y_test`` of token ids, shape
        ``(n_test, T)``, ``-100`` ignored): the model's own per-sequence loss and the
        summed log-odds of the correct tokens, exactly the values the attributors
        differentiate (:meth:`skdattri.model.TorchModel.value`).
        Classifiers: ``margin = log p_y - log(sum_{k != y} p_k)`` and
        ``loss = log(1 + exp(-margin))``, which equals ``-log p_y`` for
        normalised probabilities; a label the model has not seen has
        probability 0 (with a ``UserWarning``). Regressors: ``margin`` is the
        prediction (single output only) and ``loss`` the squared error, summed
        over outputs.
    """
    if _is_token_model(model, y_test):
        return _token_targets(model, X_test, y_test, target)
    classifier = is_classifier(model) or (
        not is_regressor(model) and hasattr(model, "predict_proba")
    )
    if classifier:
        proba = _as_numpy(model.predict_proba(X_test))
        if proba.ndim == 1:  # a single positive-class column
            proba = np.column_stack([1.0 - proba, proba])
        cols = _label_columns(model, y_test, proba.shape[1])
        if np.any(cols < 0):
            warnings.warn(
                f"{int(np.sum(cols < 0))} query label(s) were not seen by a retrained "
                "model (its training subset lacks that class); their probability is "
                "taken as 0.",
                UserWarning,
            )
        log_py, log_rest = _class_log_odds(proba, cols)
        margin = log_py - log_rest
        if target == "margin":
            return margin
        return np.logaddexp(0.0, -margin)

    pred = np.asarray(_as_numpy(model.predict(X_test)), dtype=np.float64)
    if pred.ndim == 2 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if target == "margin":
        if pred.ndim != 1:
            raise ValueError(
                "target='margin' needs a single-output regressor, got predictions of "
                f"shape {pred.shape}; use target='loss'."
            )
        return pred
    y = np.asarray(_as_numpy(y_test), dtype=np.float64).reshape(pred.shape)
    err = (pred - y) ** 2
    return err if err.ndim == 1 else err.sum(axis=1)


def _is_token_model(model, y_test):
    """A skorch net whose targets are sequences of token ids."""
    from skorch import NeuralNet

    if not isinstance(model, NeuralNet) or isinstance(y_test, dict):
        return False
    y = np.asarray(_as_numpy(y_test))
    return y.ndim == 2 and y.dtype.kind in "iu"


def _token_targets(model, X_test, y_test, target, batch_size=256):
    """Per-sequence loss / margin of a token classifier, through the loss vocabulary."""
    import torch

    from ..model import make_model

    tm = make_model(model)
    params = tm.named_params()
    device = next(iter(params.values())).device
    X = torch.as_tensor(np.asarray(_as_numpy(X_test)), device=device)
    y = torch.as_tensor(np.asarray(_as_numpy(y_test)), device=device)
    out = []
    with torch.no_grad():
        for s in range(0, len(y), batch_size):
            values = tm.value(tm.forward(params, X[s:s + batch_size]), y[s:s + batch_size],
                              target)
            out.append(values.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
