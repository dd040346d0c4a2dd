"""The two public functions: measure a ground truth by retraining.

Both draw which rows each retrain leaves out and the training seeds
(:mod:`~skdattri.ground_truth._plan`), and hand them to
:func:`~skdattri.ground_truth._retrain.run_retrains`, whose record of how each value
was obtained becomes the ground truth's ``provenance``.
"""

from __future__ import annotations

from numbers import Integral, Real

from sklearn.utils._param_validation import HasMethods, Interval, StrOptions, validate_params

from ._containers import TARGETS
from ._plan import lds_plan, lds_result, loo_plan, loo_result
from ._retrain import RETRAIN_CONSTRAINTS, Measure, check_retrain_data, run_retrains
from ._targets import query_targets

__all__ = ["lds_ground_truth", "loo_ground_truth"]


_COMMON_CONSTRAINTS = {
    "estimator": [HasMethods(["fit"])],
    **RETRAIN_CONSTRAINTS,
    "n_repeats": [Interval(Integral, 1, None, closed="left")],
    "target": [StrOptions(set(TARGETS))],
    "verify": [Interval(Integral, 0, None, closed="left"),
               Interval(Real, 0, 1, closed="right"), None],
}


def _retrain_targets(estimator, data, removed, seeds, target, *, n_jobs, memory, verbose,
                     random_state, verify, desc):
    """Query targets of every retrain, and their provenance (see ``run_retrains``)."""
    if verify and memory is None:
        raise ValueError("verify= refits retrains found in the cache; pass memory= too.")
    X_train, y_train, X_test, y_test = data
    values, provenance = run_retrains(
        estimator, (X_train, y_train), removed, seeds, Measure(query_targets, X_test, y_test,
                                                               target),
        n_jobs=n_jobs, memory=memory, verbose=verbose, random_state=random_state,
        verify=verify, desc=desc)
    return values, {**provenance, "target": target}


@validate_params(
    {
        **_COMMON_CONSTRAINTS,
        "n_subsets": [Interval(Integral, 2, None, closed="left")],
        "subset_fraction": [Interval(Real, 0, 1, closed="neither")],
    },
    prefer_skip_nested_validation=True,
)
def lds_ground_truth(
    estimator,
    X_train,
    y_train,
    X_test,
    y_test,
    *,
    n_subsets=100,
    subset_fraction=0.5,
    n_repeats=1,
    target="loss",
    n_jobs=None,
    random_state=None,
    memory=None,
    verify=None,
    verbose=0,
):
    """Retrain on random training subsets and record every query's target.

    For each of ``n_subsets`` random subsets of ``round(subset_fraction *
    n_train)`` training samples, ``sklearn.clone(estimator)`` is fitted on the
    subset (``n_repeats`` times with different seeds, averaged) and the target of
    every query sample is recorded. This is the ground truth of the linear
    datamodeling score (:func:`skdattri.metrics.lds_score`).

    Parameters
    ----------
    estimator : estimator object
        Model to retrain: a scikit-learn estimator (also a ``Pipeline``) or a
        skorch ``NeuralNetClassifier`` / ``NeuralNetRegressor``. It is cloned for
        every fit and never modified (a fitted one only provides its
        parameters; a ``FrozenEstimator`` is unwrapped).

    X_train : array-like, torch tensor or dict of arrays, n_train rows
        Training inputs.

    y_train : array-like of shape (n_train,)
        Training targets.

    X_test : array-like, torch tensor or dict of arrays, n_test rows
        Query inputs.

    y_test : array-like of shape (n_test,)
        Query labels (classifier) or targets (regressor).

    n_subsets : int, default=100
        Number of random subsets (retrained models).

    subset_fraction : float in (0, 1), default=0.5
        Fraction of the training set in each subset.

    n_repeats : int, default=1
        Fits per subset; their targets are averaged.

    target : {"loss", "margin"}, default="loss"
        The recorded query value. Classifiers: ``"loss"`` is ``-log p_y`` and
        ``"margin"`` is ``log p_y - log(1 - p_y)``, with ``p_y`` the predicted
        probability of the query's label (``predict_proba`` column found through
        ``classes_``). Regressors: ``"loss"`` is the squared error and
        ``"margin"`` the prediction.

    n_jobs : int, default=None
        Parallel fits through :class:`joblib.Parallel` (``-1`` = all cores).
        Any joblib backend works, e.g. inside
        ``joblib.parallel_config(backend="dask")``.

    random_state : int, RandomState instance or None, default=None
        Draws the subsets and the training seeds. Pass an int for reproducible
        results and for ``memory=`` to resume.

    memory : str, path-like or joblib.Memory, default=None
        Folder caching every finished fit (one ``.npz`` per retrain under
        ``skdattri-retrains/``). An interrupted run, restarted with the same
        arguments and an integer ``random_state``, reuses the finished fits; see
        Notes.

    verify : int, float or None, default=None
        With ``memory=``: refit this many (int) or this fraction (float in (0, 1])
        of the retrains found in the cache and raise a ``ValueError`` when one
        differs from its cached targets by more than
        ``1e-4 * max(1, max |cached targets|)`` (those entries are removed from the
        cache first). ``None`` or 0: no check.

    verbose : int, default=0
        Show a progress bar of the retrains that run (on standard error).

    Returns
    -------
    ground_truth : LDSGroundTruth
        ``masks`` of shape (n_subsets, n_train) and ``values`` of shape
        (n_subsets, n_test); its ``provenance`` records how each value was
        obtained (estimator, data fingerprint, seeds, removed rows, cache keys).

    Notes
    -----
    Seeds: repeat ``r`` of every subset uses the same seed ``seed_r`` (common
    random numbers across subsets, which lowers the noise in the comparison
    between subsets). ``seed_r`` sets every ``random_state`` parameter of the
    cloned estimator (nested ones included, e.g. in a ``Pipeline``), overriding
    the value it was given; a skorch net is seeded with ``torch.manual_seed``
    (and numpy's global seed) inside the fit, and the global RNG states are
    restored afterwards. The net's other settings (``train_split``,
    callbacks, ...) are used as configured. Subsets and seeds drawn from an
    integer ``random_state`` do not depend on ``n_jobs`` or the backend, the
    subsets do not depend on ``n_repeats``, and the first ``m`` subsets are the
    same for every ``n_subsets >= m``.

    When torch is involved and the fits run in parallel, each fit uses one
    torch thread.

    Caching: the key of a retrain is computed in the calling process from the
    estimator's parameters (classes and functions by name and code, so a module
    class defined in a script's ``__main__`` needs no pickling), a fingerprint of
    the data, the removed rows, the seed and the target. Only finished fits are
    stored, by the calling process, each as soon as it arrives: a fit interrupted
    by Ctrl-C -- also when the estimator swallows the ``KeyboardInterrupt``, as
    scikit-learn's MLPs and skorch nets do -- raises ``KeyboardInterrupt`` and
    stores nothing, and so does a worker that dies. Files are written atomically;
    a damaged entry is reported in one warning line and recomputed.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skdattri.ground_truth import lds_ground_truth
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(30, 2)); y = (X[:, 0] > 0).astype(int)
    >>> gt = lds_ground_truth(LogisticRegression(), X[:20], y[:20], X[20:], y[20:],
    ...                       n_subsets=4, random_state=0)
    >>> gt
    LDSGroundTruth(n_subsets=4, n_train=20, n_test=10, target='loss')
    >>> gt.masks.sum(axis=1)
    array([10, 10, 10, 10])
    """
    n_train, _ = check_retrain_data(X_train, y_train, X_test, y_test)
    masks, removed, seeds = lds_plan(n_train, n_subsets, subset_fraction, n_repeats,
                                     random_state)
    values, provenance = _retrain_targets(
        estimator, (X_train, y_train, X_test, y_test), removed, seeds, target, n_jobs=n_jobs,
        memory=memory, verbose=verbose, random_state=random_state, verify=verify,
        desc=f"LDS ground truth ({n_subsets} subsets)")
    return lds_result(masks, values, target, provenance)


@validate_params(
    {**_COMMON_CONSTRAINTS, "indices": ["array-like", None]},
    prefer_skip_nested_validation=True,
)
def loo_ground_truth(
    estimator,
    X_train,
    y_train,
    X_test,
    y_test,
    *,
    indices=None,
    n_repeats=1,
    target="loss",
    n_jobs=None,
    random_state=None,
    memory=None,
    verify=None,
    verbose=0,
):
    """Retrain without one training sample at a time; record the change of each query.

    Fits ``sklearn.clone(estimator)`` on the full training set and once without
    each training index in ``indices``; the result holds, for every removed
    index and query, ``target(model without the index) - target(full model)``.
    This is the ground truth of :func:`skdattri.metrics.loo_score`.

    Parameters
    ----------
    estimator : estimator object
        Model to retrain (scikit-learn estimator, ``Pipeline`` or skorch net).
        It is cloned for every fit and never modified.

    X_train : array-like, torch tensor or dict of arrays, n_train rows
        Training inputs.

    y_train : array-like of shape (n_train,)
        Training targets.

    X_test : array-like, torch tensor or dict of arrays, n_test rows
        Query inputs.

    y_test : array-like of shape (n_test,)
        Query labels or targets.

    indices : array-like of int, default=None
        Training indices to leave out, one model each. ``None`` = all of them.

    n_repeats : int, default=1
        Fits per removed index (and of the full model), with seeds
        ``seed_1..seed_{n_repeats}``; the changes are averaged.

    target : {"loss", "margin"}, default="loss"
        The query value whose change is recorded; see :func:`lds_ground_truth`.

    n_jobs : int, default=None
        Parallel fits through :class:`joblib.Parallel`.

    random_state : int, RandomState instance or None, default=None
        Draws the training seeds.

    memory : str, path-like or joblib.Memory, default=None
        Cache every finished fit on disk so an interrupted run resumes; see
        :func:`lds_ground_truth`.

    verify : int, float or None, default=None
        Refit cached retrains and compare; see :func:`lds_ground_truth`.

    verbose : int, default=0
        Show a progress bar of the retrains that run.

    Returns
    -------
    ground_truth : LOOGroundTruth
        ``values`` of shape (n_removed, n_test) and the ``provenance`` of the
        retrains (the full model first, then one per removed index).

    Notes
    -----
    Sign: with ``target="loss"`` a helpful training sample has a positive value
    (the query's loss rises without it); with ``target="margin"`` a negative
    one. Repeat ``r`` of the full model and of every leave-one-out model share the
    seed ``seed_r``, so for a deterministic training procedure removing nothing
    changes nothing and every value is exactly the effect of the removal.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skdattri.ground_truth import loo_ground_truth
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(30, 2)); y = (X[:, 0] > 0).astype(int)
    >>> gt = loo_ground_truth(LogisticRegression(), X[:20], y[:20], X[20:], y[20:],
    ...                       indices=[0, 1, 2], random_state=0)
    >>> gt
    LOOGroundTruth(n_removed=3, n_train=20, n_test=10, target='loss')
    >>> gt.values.shape
    (3, 10)
    """
    n_train, _ = check_retrain_data(X_train, y_train, X_test, y_test)
    indices, removed, seeds = loo_plan(n_train, indices, n_repeats, random_state)
    values, provenance = _retrain_targets(
        estimator, (X_train, y_train, X_test, y_test), removed, seeds, target, n_jobs=n_jobs,
        memory=memory, verbose=verbose, random_state=random_state, verify=verify,
        desc=f"LOO ground truth ({len(indices)} removals)")
    return loo_result(indices, values, target, n_train, provenance)
