"""Checks every attributor must pass, on top of scikit-learn's estimator checks.

Each check is a function ``check_<name>(name, attributor, data)``: ``name`` is the
attributor's class name (used in messages), ``attributor`` an unfitted attributor (the
checks fit clones of it, never the object itself) and ``data`` a tuple ``(X_train,
y_train, X_query, y_query)`` of small data sets. A check that finds a violation of the
contract raises ``AssertionError`` with a message saying which.

Run them all with :func:`check_attributor`, or as one pytest test per check with
:func:`parametrize_with_attributor_checks`::

    from skdattri.estimator_checks import parametrize_with_attributor_checks

    @parametrize_with_attributor_checks([MyAttributor(model)], data=(X, y, Xq, yq))
    def test_my_attributor(attributor, check):
        check(attributor)

Every numerical comparison goes through :func:`assert_scores_close`, whose tolerance
follows from the floating-point precision of the scores and their magnitude.
"""

from __future__ import annotations

import functools
import io
import pickle
import re
from numbers import Integral

import joblib
import numpy as np
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from ._snapshot import _difference, _snapshot
from ._utils import _as_numpy, _n_rows, _take_rows
from .model import is_fitted

__all__ = [
    "assert_scores_close",
    "check_attributor",
    "check_batch_size_invariance",
    "check_clone_keeps_fitted_model",
    "check_fit_returns_self",
    "check_get_set_params_round_trip",
    "check_not_fitted",
    "check_orientation",
    "check_pickle_round_trip",
    "check_self_influence_is_diagonal",
    "check_shape",
    "check_sign",
    "check_transform_keeps_fitted_state",
    "parametrize_with_attributor_checks",
]

#: Default relative tolerance, in units of the machine epsilon of the compared dtype.
#: Scores are sums of many products; evaluating them in another blocking or order
#: (batch sizes, subsets of queries, BLAS kernels) moves them by a few ulps of the
#: largest score for gradient products, up to ~100 ulps through a damped inverse of
#: condition number ~1e3 (measured over the attributors of tests/test_common.py).
#: Worse-conditioned inverses and iterative solvers need an explicit ``rtol``.
EPS_FACTOR = 512


# ----------------------------------------------------------------------------- tolerances
def _float_dtype(*arrays):
    """The coarsest floating dtype among ``arrays`` (float64 when none is floating)."""
    dtypes = [a.dtype for a in arrays if a.dtype.kind == "f"]
    if not dtypes:
        return np.dtype(np.float64)
    return max(dtypes, key=lambda d: np.finfo(d).eps)


def assert_scores_close(actual, desired, *, dtype=None, rtol=None, ulps=None, scale=None,
                        err_msg=""):
    """Assert that two score arrays agree up to round-off of their precision.

    The tolerance is derived, not guessed: ``rtol = EPS_FACTOR * eps(dtype)``
    (unless given) and ``atol = rtol * max(|desired|)``, so entries near zero are
    compared at the round-off level of the largest score rather than of themselves.

    Parameters
    ----------
    actual, desired : array-like or Tensor
        The arrays to compare (tensors are moved to the CPU).
    dtype : dtype, default=None
        Precision the scores were computed in; default: the coarsest floating dtype
        of ``actual`` and ``desired`` (float64 when neither is floating).
    rtol : float, default=None
        Relative tolerance; give it for approximate computations (an iterative
        solver's ``tol``). The absolute tolerance scales with it.
    ulps : float, default=None
        The relative tolerance in machine epsilons of ``dtype`` (``rtol = ulps * eps``),
        instead of ``rtol``.
    scale : float, default=None
        What the absolute tolerance is relative to (default: ``max(|desired|)``); pass
        the magnitude of the inputs when ``desired`` is a difference or a mean of larger
        numbers.
    err_msg : str, default=""
        Printed on failure, with the tolerances used.

    Raises
    ------
    AssertionError
        If the shapes differ or ``|actual - desired| > atol + rtol * |desired|``
        anywhere.
    """
    actual, desired = _as_numpy(actual), _as_numpy(desired)
    dtype = _float_dtype(actual, desired) if dtype is None else np.dtype(dtype)
    eps = float(np.finfo(dtype).eps)
    if rtol is None:
        rtol = (EPS_FACTOR if ulps is None else float(ulps)) * eps
    if scale is None:
        scale = float(np.abs(desired[np.isfinite(desired)]).max(initial=0.0))
    rtol = float(rtol)
    atol = rtol * float(scale)
    np.testing.assert_allclose(
        actual, desired, rtol=rtol, atol=atol,
        err_msg=f"{err_msg} (rtol={rtol:.2e}, atol={atol:.2e} = rtol x scale, "
                f"{dtype.name})".strip())


# ----------------------------------------------------------------------------- data helpers
def _rows(X, idx):
    return _take_rows(X, np.asarray(idx))


def _append(X, extra):
    """``X`` followed by the rows of ``extra``: arrays, tensors or dicts of them."""
    if isinstance(X, dict):
        return {k: _append(v, extra[k]) for k, v in X.items()}
    if isinstance(X, torch.Tensor):
        return torch.cat([X, extra.to(X.device)])
    return np.concatenate([np.asarray(X), np.asarray(extra)])


def _fitted(attributor, X, y):
    return clone(attributor).fit(X, y)


# ----------------------------------------------------------------------------- checks
def check_not_fitted(name, attributor, data):
    """``transform`` and ``self_influence`` before ``fit`` raise ``NotFittedError``."""
    _, _, Xq, yq = data
    for what, call in (("transform", lambda a: a.transform(Xq, yq)),
                       ("self_influence", lambda a: a.self_influence())):
        try:
            call(clone(attributor))
        except NotFittedError:
            continue
        raise AssertionError(f"{name}.{what} before fit must raise NotFittedError.")


def check_fit_returns_self(name, attributor, data):
    """``fit`` returns the attributor itself."""
    X, y, _, _ = data
    attr = clone(attributor)
    assert attr.fit(X, y) is attr, f"{name}.fit must return self."


def check_shape(name, attributor, data):
    """Scores are a finite float ndarray ``(n_query, n_train)``; ``n_train_`` is set."""
    X, y, Xq, yq = data
    attr = _fitted(attributor, X, y)
    n_train, n_query = _n_rows(X), _n_rows(Xq)
    assert getattr(attr, "n_train_", None) == n_train, (
        f"{name}.n_train_ must be {n_train}, got {getattr(attr, 'n_train_', None)!r}.")
    for what, out, shape in (("transform(X, y)", attr.transform(Xq, yq), (n_query, n_train)),
                             ("transform(X)", attr.transform(Xq), (n_query, n_train)),
                             ("self_influence()", attr.self_influence(), (n_train,))):
        assert isinstance(out, np.ndarray), f"{name}.{what} must be an ndarray, got {type(out)}."
        assert out.dtype.kind == "f", f"{name}.{what} must be floating, got {out.dtype}."
        assert out.shape == shape, f"{name}.{what} has shape {out.shape}, expected {shape}."
        assert np.all(np.isfinite(out)), f"{name}.{what} has non-finite values."


def check_orientation(name, attributor, data, *, rtol=None):
    """Rows are queries: scoring a permuted subset of queries gives the same rows."""
    X, y, Xq, yq = data
    attr = _fitted(attributor, X, y)
    S = attr.transform(Xq, yq)
    assert not np.all(S == S[:1]), f"{name}: every query got the same scores."
    n_query = _n_rows(Xq)
    idx = np.random.RandomState(0).permutation(n_query)[:max(2, n_query // 2)]
    assert_scores_close(attr.transform(_rows(Xq, idx), _rows(yq, idx)), S[idx], rtol=rtol,
                        err_msg=f"{name}: a permuted subset of queries {idx.tolist()} does "
                                "not give the same rows")


def check_sign(name, attributor, data, *, strict_rank=False, top_fraction=0.1):
    """A training copy of query 0 (with its label) helps it, and among the most.

    The copy's score for query 0 must be positive and rank in the top
    ``top_fraction`` of that row (tied scores share their mean rank, so a constant row
    fails); with ``strict_rank`` it must be the largest score of the row, as for
    cosine-normalised scores (Grad-Cos, RelatIF), where Cauchy-Schwarz makes a
    query's own direction the best one.
    """
    X, y, Xq, yq = data
    Xa, ya = _append(X, _rows(Xq, [0])), _append(y, _rows(yq, [0]))
    row = _fitted(attributor, Xa, ya).transform(_rows(Xq, [0]), _rows(yq, [0]))[0]
    own, others = row[-1], row[:-1]
    assert own > 0, (f"{name}: a training copy of query 0 must help it (positive score), "
                     f"got {own!r}.")
    above, tied = int(np.sum(others > own)), int(np.sum(others == own))
    if strict_rank:
        assert above + tied == 0, (
            f"{name}: a training copy of query 0 must have the largest score of the row; "
            f"{above} scores are larger and {tied} equal (copy {own!r}, max "
            f"{others.max()!r}).")
        return
    k = max(1, int(top_fraction * len(row)))
    assert above + tied / 2 < k, (
        f"{name}: a training copy of query 0 must rank in the top {k} of {len(row)} "
        f"scores; {above} are larger and {tied} equal (copy {own!r}, max {others.max()!r}).")


def check_self_influence_is_diagonal(name, attributor, data, *, rtol=None):
    """``self_influence()`` equals the diagonal of ``transform(X_train, y_train)``."""
    X, y, _, _ = data
    attr = _fitted(attributor, X, y)
    assert_scores_close(attr.self_influence(), np.diag(attr.transform(X, y)), rtol=rtol,
                        err_msg=f"{name}.self_influence() is not the diagonal of "
                                "transform(X_train, y_train)")


def check_batch_size_invariance(name, attributor, data, *, batch_sizes=(1, 7, None),
                                rtol=None):
    """Scores and self-influence do not depend on ``batch_size``.

    ``None`` in ``batch_sizes`` stands for one batch holding every row.
    """
    X, y, Xq, yq = data
    ref = _fitted(attributor, X, y)
    S, s = ref.transform(Xq, yq), ref.self_influence()
    for bs in batch_sizes:
        bs = max(_n_rows(X), _n_rows(Xq)) if bs is None else bs
        other = clone(attributor).set_params(batch_size=bs).fit(X, y)
        assert_scores_close(other.transform(Xq, yq), S, rtol=rtol,
                            err_msg=f"{name}: scores depend on batch_size={bs}")
        assert_scores_close(other.self_influence(), s, rtol=rtol,
                            err_msg=f"{name}: self_influence depends on batch_size={bs}")


def check_clone_keeps_fitted_model(name, attributor, data, *, rtol=None):
    """``clone`` keeps a fitted ``estimator`` (the model being explained) and an
    unfitted one is cloned, never fitted in place; a refitted clone scores the same
    when the model is fitted or seeded."""
    X, y, Xq, yq = data
    params = attributor.get_params(deep=False)
    model = params.get("estimator")
    attr = _fitted(attributor, X, y)
    again = clone(attr)
    fitted = model is not None and is_fitted(model)
    if fitted:
        assert again.estimator is model, (
            f"clone({name}) must keep the fitted estimator (the model being explained), "
            "not an unfitted copy.")
    elif model is not None:
        assert again.estimator is not model, f"clone({name}) must clone an unfitted estimator."
        assert not is_fitted(model), (
            f"{name}.fit must train a clone of an unfitted estimator, not the estimator itself.")
    if fitted or model is None or isinstance(params.get("random_state"), Integral):
        assert_scores_close(again.fit(X, y).transform(Xq, yq), attr.transform(Xq, yq),
                            rtol=rtol, err_msg=f"a refitted clone of {name} scores differently")


def check_get_set_params_round_trip(name, attributor, data):
    """``get_params`` / ``set_params`` / the constructor round-trip, and ``fit``
    leaves the parameters as they were."""
    X, y, _, _ = data
    params = attributor.get_params(deep=False)

    def same(other, what):
        got = other.get_params(deep=False)
        assert got.keys() == params.keys(), f"{name}: {what} changes the parameter names."
        changed = [k for k, v in params.items() if got[k] is not v]
        assert not changed, f"{name}: {what} does not keep the parameters {changed} as given."

    same(type(attributor)(**params), "the constructor")
    target = clone(attributor)
    assert target.set_params(**params) is target, f"{name}.set_params must return self."
    same(target, "set_params")
    assert params.keys() <= attributor.get_params(deep=True).keys(), (
        f"{name}.get_params(deep=True) must include every shallow parameter.")
    target.fit(X, y)
    same(target, "fit")


def _round_trips(attr):
    yield "pickle", pickle.loads(pickle.dumps(attr))
    buf = io.BytesIO()
    joblib.dump(attr, buf)
    buf.seek(0)
    yield "joblib", joblib.load(buf)


def check_pickle_round_trip(name, attributor, data):
    """A pickled or ``joblib.dump``-ed fitted attributor gives identical scores."""
    X, y, Xq, yq = data
    attr = _fitted(attributor, X, y)
    S, s = attr.transform(Xq, yq), attr.self_influence()
    for how, loaded in _round_trips(attr):
        assert type(loaded) is type(attr), f"{name}: {how} round trip changed the type."
        np.testing.assert_array_equal(loaded.transform(Xq, yq), S,
                                      err_msg=f"{name}: scores change in a {how} round trip")
        np.testing.assert_array_equal(loaded.self_influence(), s,
                                      err_msg=f"{name}: self_influence changes in a {how} "
                                              "round trip")


def check_transform_keeps_fitted_state(name, attributor, data):
    """``transform`` and ``self_influence`` leave every attribute as ``fit`` left it.

    Compares a deep snapshot of ``vars(attr)`` taken after ``fit`` with the state after
    ``transform(X, y)``, ``transform(X)`` and ``self_influence()``: no attribute
    added, removed or changed (tensors by ``torch.equal`` with the same dtype and
    device, arrays by ``np.array_equal``, containers and objects recursively, torch
    modules and skorch nets by their parameters, buffers, modes and hooks).
    """
    X, y, Xq, yq = data
    attr = _fitted(attributor, X, y)
    before = _snapshot(attr, {})
    attr.transform(Xq, yq)
    attr.transform(Xq)
    attr.self_influence()
    diff = _difference(before, _snapshot(attr, {}), "")
    assert diff is None, f"{name}: transform / self_influence changed the fitted state: {diff}."


# ----------------------------------------------------------------------------- runners
def _ranks_copy_first(attributor):
    """Cosine-normalised loss scores (``normalize=True``, ``target="loss"``) put a
    query's training copy first, by Cauchy-Schwarz."""
    params = attributor.get_params(deep=False)
    return params.get("normalize") is True and params.get("target", "loss") == "loss"


def _yield_attributor_checks(attributor, *, rtol=None, strict_rank=None,
                             batch_sizes=(1, 7, None)):
    """The attributor checks that apply to ``attributor``, bound to its options.

    Parameters
    ----------
    attributor : estimator
        An unfitted attributor.
    rtol : float, default=None
        Relative tolerance of the numerical checks (default: from the dtype, see
        :func:`assert_scores_close`); give it for iterative solvers.
    strict_rank : bool, default=None
        Whether a query's training copy must score highest (default: for
        ``normalize=True`` with ``target="loss"``).
    batch_sizes : tuple of int or None
        Batch sizes that must give the same scores (only when the attributor has a
        ``batch_size`` parameter).
    """
    if strict_rank is None:
        strict_rank = _ranks_copy_first(attributor)
    yield check_not_fitted
    yield check_fit_returns_self
    yield check_shape
    yield functools.partial(check_orientation, rtol=rtol)
    yield functools.partial(check_sign, strict_rank=strict_rank)
    yield functools.partial(check_self_influence_is_diagonal, rtol=rtol)
    if "batch_size" in attributor.get_params(deep=False):
        yield functools.partial(check_batch_size_invariance, batch_sizes=batch_sizes,
                                rtol=rtol)
    yield functools.partial(check_clone_keeps_fitted_model, rtol=rtol)
    yield check_get_set_params_round_trip
    yield check_pickle_round_trip
    yield check_transform_keeps_fitted_state


def _check_name(check):
    return check.func.__name__ if isinstance(check, functools.partial) else check.__name__


def _known(failed, names):
    unknown = sorted(set(failed) - set(names))
    if unknown:
        raise ValueError(f"expected_failed_checks names unknown checks {unknown}; "
                         f"the checks are {sorted(names)}.")


def check_attributor(attributor, X_train, y_train, X_query, y_query, *, rtol=None,
                     batch_sizes=(1, 7, None), strict_rank=None,
                     expected_failed_checks=None):
    """Run every attributor check on an (unfitted) attributor.

    The checks (see the ``check_*`` functions of this module): ``transform`` and
    ``self_influence`` before ``fit`` raise ``NotFittedError``; ``fit`` returns
    ``self``; scores are a finite float ndarray ``(n_query, n_train)``; rows are
    queries; a training copy of a query helps it most; ``self_influence()`` is the
    diagonal of ``transform(X_train, y_train)``; results do not depend on
    ``batch_size``; ``clone`` keeps a fitted model; parameters round-trip; pickle
    and ``joblib`` round trips give identical scores; ``transform`` leaves the
    fitted state unchanged.

    Parameters
    ----------
    attributor : estimator
        An unfitted attributor.
    X_train, y_train, X_query, y_query : array-like
        Small data sets (a few dozen rows keep this fast).
    rtol : float, default=None
        Relative tolerance of the numerical comparisons; default: derived from the
        scores' dtype (:func:`assert_scores_close`).
    batch_sizes : tuple of int or None
        Batch sizes that must give the same scores (``None`` = all rows at once).
    strict_rank : bool, default=None
        Whether a query's training copy must score highest (default: for
        ``normalize=True`` with ``target="loss"``).
    expected_failed_checks : dict, default=None
        ``{check name: reason}`` of checks known to fail; each must fail (an
        ``AssertionError``), and one that passes is reported so it can be removed.

    Returns
    -------
    scores : ndarray of shape (n_query, n_train)
        Scores of the fitted attributor (for further checks by the caller).
    """
    data = (X_train, y_train, X_query, y_query)
    name = type(attributor).__name__
    failed = dict(expected_failed_checks or {})
    checks = list(_yield_attributor_checks(attributor, rtol=rtol, strict_rank=strict_rank,
                                           batch_sizes=batch_sizes))
    _known(failed, [_check_name(c) for c in checks])
    for check in checks:
        if _check_name(check) not in failed:
            check(name, attributor, data)
            continue
        try:
            check(name, attributor, data)
        except AssertionError:
            continue
        raise AssertionError(f"{name}: {_check_name(check)} passes but is listed as an "
                             f"expected failure ({failed[_check_name(check)]}).")
    return clone(attributor).fit(X_train, y_train).transform(X_query, y_query)


def _compact_repr(attributor):
    return re.sub(r"\s+", "", repr(attributor))


def parametrize_with_attributor_checks(attributors, *, data, expected_failed_checks=None,
                                       check_options=None):
    """A ``pytest.mark.parametrize`` over every attributor check of every attributor.

    Like :func:`sklearn.utils.estimator_checks.parametrize_with_checks`: the test
    receives ``attributor`` and ``check`` and calls ``check(attributor)``; test ids
    are ``"<compact repr>-<check name>"``.

    Parameters
    ----------
    attributors : list of estimators
        Unfitted attributors.
    data : tuple or callable
        ``(X_train, y_train, X_query, y_query)``, or a callable ``attributor ->
        tuple`` (called when the check runs).
    expected_failed_checks : callable, default=None
        ``attributor -> {check name: reason}``; those checks are strict
        ``xfail``\\ s with the reason (a fixed check fails the suite until it is
        removed from the list).
    check_options : callable, default=None
        ``attributor -> dict`` of keyword options of the checks (``rtol``,
        ``strict_rank``, ``batch_sizes``).

    Returns
    -------
    decorator : pytest.mark.parametrize
    """
    import pytest

    def bind(check, name):
        def run(attributor):
            args = data(attributor) if callable(data) else data
            return check(name, attributor, args)

        run.__name__ = _check_name(check)
        return run

    params = []
    for attributor in attributors:
        failed = expected_failed_checks(attributor) if expected_failed_checks else {}
        options = check_options(attributor) if check_options else {}
        checks = list(_yield_attributor_checks(attributor, **options))
        names = [_check_name(c) for c in checks]
        _known(failed, names)
        for check, check_name in zip(checks, names):
            marks = ([pytest.mark.xfail(strict=True, reason=failed[check_name])]
                     if check_name in failed else [])
            params.append(pytest.param(attributor, bind(check, type(attributor).__name__),
                                       marks=marks,
                                       id=f"{_compact_repr(attributor)}-{check_name}"))
    return pytest.mark.parametrize("attributor, check", params)
