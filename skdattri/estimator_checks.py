"""Checks every attributor must pass, on top of scikit-learn's estimator checks.

Use :func:`check_attributor` in the tests of a new attribution method::

    from skdattri.estimator_checks import check_attributor
    check_attributor(MyAttributor(model), X_train, y_train, X_query, y_query)
"""

from __future__ import annotations

import io
import pickle

import joblib
import numpy as np
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from .model import is_fitted

__all__ = ["check_attributor"]


def check_attributor(attributor, X_train, y_train, X_query, y_query, *, rtol=1e-6,
                     atol=1e-8, batch_sizes=(1, 7, None)):
    """Run skdattri's own contract checks on an (unfitted) attributor.

    The checks: ``transform`` before ``fit`` raises ``NotFittedError``; ``fit``
    returns ``self``; scores are a finite ndarray of shape ``(n_query, n_train)`` with
    one row per query (orientation: scoring queries one at a time gives the same
    rows); ``self_influence()`` equals the diagonal of ``transform(X_train,
    y_train)``; results do not depend on ``batch_size``; ``get_params`` /
    ``set_params`` round-trip; ``clone`` keeps a fitted model; pickle and
    ``joblib.dump`` round-trips give identical scores.

    Parameters
    ----------
    attributor : BaseAttributor
        An unfitted attributor.
    X_train, y_train, X_query, y_query : array-like
        Small data sets (a few dozen rows keep this fast).
    rtol, atol : float
        Tolerances of the numerical comparisons.
    batch_sizes : tuple of int or None
        Batch sizes that must give the same scores (``None`` = all rows at once).

    Returns
    -------
    scores : ndarray of shape (n_query, n_train)
        The scores of the fitted attributor (for further checks by the caller).
    """
    n_train, n_query = len(X_train), len(X_query)
    try:
        clone(attributor).transform(X_query, y_query)
    except NotFittedError:
        pass
    else:
        raise AssertionError("transform before fit must raise NotFittedError")

    attr = clone(attributor)
    assert attr.fit(X_train, y_train) is attr, "fit must return self"
    S = attr.transform(X_query, y_query)
    assert isinstance(S, np.ndarray), type(S)
    assert S.shape == (n_query, n_train), S.shape
    assert np.all(np.isfinite(S))
    assert attr.n_train_ == n_train

    # orientation: one row per query
    idx = [n_query - 1, 0]
    S_sub = attr.transform(X_query[idx], y_query[idx])
    np.testing.assert_allclose(S_sub, S[idx], rtol=rtol, atol=atol)

    # self-influence is the diagonal of train x train
    S_tt = attr.transform(X_train, y_train)
    np.testing.assert_allclose(attr.self_influence(), np.diag(S_tt), rtol=rtol, atol=atol)
    assert attr.self_influence().shape == (n_train,)

    # batch-size invariance (several batches, one row per batch, one batch)
    for bs in batch_sizes:
        other = clone(attributor).set_params(batch_size=bs or max(n_train, n_query))
        other.fit(X_train, y_train)
        np.testing.assert_allclose(other.transform(X_query, y_query), S, rtol=rtol, atol=atol,
                                   err_msg=f"scores depend on batch_size={bs}")
        np.testing.assert_allclose(other.self_influence(), attr.self_influence(), rtol=rtol,
                                   atol=atol, err_msg=f"self_influence depends on batch_size={bs}")

    # parameters round-trip
    params = attr.get_params(deep=False)
    again = clone(attributor).set_params(**params)
    assert again.get_params(deep=False).keys() == params.keys()

    # clone keeps a fitted model (the thing being explained)
    model = getattr(attributor, "estimator", None)  # model-free attributors have none
    if model is not None and is_fitted(model):
        assert clone(attr).estimator is attributor.estimator
        refit = clone(attr).fit(X_train, y_train)
        np.testing.assert_allclose(refit.transform(X_query, y_query), S, rtol=rtol, atol=atol)

    # pickle / joblib round trips
    loaded = pickle.loads(pickle.dumps(attr))
    np.testing.assert_array_equal(loaded.transform(X_query, y_query), S)
    buf = io.BytesIO()
    joblib.dump(attr, buf)
    buf.seek(0)
    np.testing.assert_array_equal(joblib.load(buf).transform(X_query, y_query), S)
    return S
