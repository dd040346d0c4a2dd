"""Brittleness: how many top helpful training samples must go to flip a prediction."""

import numpy as np
from sklearn.base import clone, is_regressor
from sklearn.exceptions import NotFittedError
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, validate_params
from sklearn.utils.validation import check_is_fitted

from .._utils import _as_numpy
from ..ground_truth._retrain import (
    RETRAIN_CONSTRAINTS,
    Measure,
    check_retrain_data,
    model_to_retrain,
    run_retrains,
)

__all__ = ["brittleness"]


def _predictions(model, X):
    """The labels ``model`` predicts for ``X``, as a flat array."""
    return _as_numpy(model.predict(X)).ravel()


def _model_to_retrain(attributor):
    estimator = getattr(attributor, "estimator", None)
    if estimator is None or not hasattr(estimator, "fit"):
        raise TypeError(
            "brittleness needs an attributor with an `estimator` parameter holding the "
            f"model to retrain; got {type(attributor).__name__}."
        )
    estimator = model_to_retrain(estimator)  # a FrozenEstimator would not retrain
    if is_regressor(estimator):
        raise ValueError("brittleness needs a classifier: a regressor's prediction cannot flip.")
    return estimator


def _check_k_grid(k_grid, n_train):
    k_grid = np.asarray(k_grid)
    if k_grid.ndim != 1 or k_grid.size == 0 or not np.issubdtype(k_grid.dtype, np.integer):
        raise ValueError("k_grid must be a non-empty 1-d sequence of integers.")
    if np.any(np.diff(k_grid) <= 0):
        raise ValueError("k_grid must be strictly increasing.")
    if k_grid[0] < 1 or k_grid[-1] > n_train - 1:
        raise ValueError(
            f"k_grid values must lie in [1, n_train - 1] = [1, {n_train - 1}], got "
            f"{k_grid[0]}..{k_grid[-1]}."
        )
    return k_grid.astype(np.int64)


@validate_params(
    {
        "attributor": [HasMethods(["transform"])],
        **RETRAIN_CONSTRAINTS,
        "k_grid": ["array-like"],
    },
    prefer_skip_nested_validation=True,
)
def brittleness(
    attributor,
    X_train,
    y_train,
    X_test,
    y_test,
    *,
    k_grid,
    n_jobs=None,
    random_state=None,
    memory=None,
    verbose=0,
):
    """Smallest number of top helpful training samples whose removal flips a prediction.

    For every query ``i`` the training samples are sorted by decreasing score
    ``attributor.transform(X_test, y_test)[i]``. For ``k`` in ``k_grid`` the model
    ``clone(attributor.estimator)`` is retrained without the first ``k`` of them;
    the query *flips* when the retrained model no longer predicts ``y_test[i]``.
    The result is the smallest such ``k``: a better attributor finds smaller
    sets. The search over ``k_grid`` is a bisection (about
    ``log2(len(k_grid)) + 1`` retrains per query, not ``len(k_grid)``), run for
    all queries in parallel rounds.

    Parameters
    ----------
    attributor : attributor object
        A skdattri attributor whose ``estimator`` is the classifier to retrain.
        Used as it is when fitted (it must have been fitted on ``X_train``);
        otherwise a clone is fitted on ``(X_train, y_train)``.

    X_train : array-like, torch tensor or dict of arrays, n_train rows
        Training inputs.

    y_train : array-like of shape (n_train,)
        Training labels.

    X_test : array-like, torch tensor or dict of arrays, n_test rows
        Query inputs.

    y_test : array-like of shape (n_test,)
        The labels whose support is removed, usually the model's own
        predictions ``estimator.predict(X_test)`` ("why did it predict this?").

    k_grid : array-like of int
        Strictly increasing candidate numbers of removed samples, in
        ``[1, n_train - 1]``.

    n_jobs : int, default=None
        Parallel retrains through :class:`joblib.Parallel` (any joblib backend).

    random_state : int, RandomState instance or None, default=None
        Draws the one training seed used by every retrain (see Notes).

    memory : str, path-like or joblib.Memory, default=None
        Cache the retrains on disk (as :func:`skdattri.ground_truth.lds_ground_truth`
        does: only finished, uninterrupted fits are stored).

    verbose : int, default=0
        Show a progress bar of the retrains of each bisection round.

    Returns
    -------
    k_min : ndarray of shape (n_test,), dtype=float64
        The smallest ``k`` in ``k_grid`` that flips query ``i``; ``np.inf`` when
        even ``k_grid[-1]`` does not flip it; ``np.nan`` when the model retrained on
        all training data already does not predict ``y_test[i]`` (nothing to flip).

    Notes
    -----
    Bisection assumes that removing more top samples never undoes a flip; when
    that does not hold the returned ``k`` flips the query but may not be the
    smallest flipping value in ``k_grid``. All retrains, and the full-data model
    that decides which queries can flip, use the same seed (every
    ``random_state`` of the estimator is set from it, and torch is seeded for a
    skorch net), so a flip is due to the removal and not to training noise.

    References
    ----------
    .. [1] Ilyas, Park, Engstrom, Leclerc and Madry, "Datamodels: Predicting
       Predictions from Training Data", ICML 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.base import BaseEstimator
    >>> from skdattri.metrics import brittleness
    >>> class SameLabelNearest(BaseEstimator):   # toy attributor: near, same label helps
    ...     def __init__(self, estimator): self.estimator = estimator
    ...     def fit(self, X, y): self.X_, self.y_ = np.asarray(X), np.asarray(y); return self
    ...     def transform(self, X, y):
    ...         same = np.asarray(y)[:, None] == self.y_
    ...         return same / (1 + np.abs(np.asarray(X) - self.X_.T))
    >>> X = np.linspace(-2, 2, 20)[:, None]
    >>> y = (X[:, 0] > 0).astype(int)
    >>> attr = SameLabelNearest(LogisticRegression()).fit(X, y)
    >>> brittleness(attr, X, y, [[0.3], [1.5], [-1.0]], [1, 1, 1],
    ...             k_grid=[1, 2, 3, 4, 6, 8], random_state=0)
    array([ 3., inf, nan])
    """
    n_train, n_test = check_retrain_data(X_train, y_train, X_test, y_test)
    k_grid = _check_k_grid(k_grid, n_train)
    y_train = _as_numpy(y_train)
    y_test = _as_numpy(y_test).ravel()
    try:
        check_is_fitted(attributor)
    except NotFittedError:
        attributor = clone(attributor).fit(X_train, y_train)
    estimator = _model_to_retrain(attributor)

    scores = np.asarray(_as_numpy(attributor.transform(X_test, y_test)), dtype=np.float64)
    if scores.shape != (n_test, n_train):
        raise ValueError(
            f"attributor.transform returned shape {scores.shape}, expected "
            f"(n_test, n_train) = ({n_test}, {n_train}); was it fitted on X_train?"
        )
    # Most helpful first; a stable sort keeps ties in training order.
    order = np.argsort(-scores, axis=1, kind="stable")

    seed = check_random_state(random_state).randint(np.iinfo(np.int32).max)
    measure = Measure(_predictions, X_test)

    def predictions(removed, desc):
        """Predictions of ``X_test`` by a retrain without each entry of ``removed``."""
        values, _ = run_retrains(estimator, (X_train, y_train), removed, [seed], measure,
                                 n_jobs=n_jobs, memory=memory, verbose=verbose,
                                 random_state=random_state, desc=desc)
        return values[:, 0]

    baseline = predictions([np.zeros(0, dtype=np.int64)], "brittleness (full model)")[0]
    k_min = np.full(n_test, np.inf)
    k_min[baseline != y_test] = np.nan

    # Bisection on grid positions: flips(lo) is False (k = 0), flips(hi) assumed True.
    active = np.flatnonzero(baseline == y_test)
    lo = np.full(n_test, -1)
    hi = np.full(n_test, k_grid.size)  # k_grid.size stands for "none flips"
    n_round = 0
    while active.size:
        n_round += 1
        mid = (lo[active] + hi[active]) // 2
        removed = [np.sort(order[i, : k_grid[m]]) for i, m in zip(active, mid, strict=True)]
        preds = predictions(removed, f"brittleness (round {n_round})")
        # every retrain predicts all queries; query active[j] reads its own column
        flipped = preds[np.arange(active.size), active] != y_test[active]
        hi[active[flipped]] = mid[flipped]
        lo[active[~flipped]] = mid[~flipped]
        active = active[hi[active] - lo[active] > 1]

    found = ~np.isnan(k_min) & (hi < k_grid.size)
    k_min[found] = k_grid[hi[found]]
    return k_min
