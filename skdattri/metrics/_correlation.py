"""Correlation metrics against retrained ground truth: LDS and LOO."""

import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.utils import check_array

from .._utils import _as_numpy
from ..ground_truth import LDSGroundTruth, LOOGroundTruth

__all__ = ["lds_score", "loo_score"]


def _check_ground_truth(ground_truth, cls):
    if not isinstance(ground_truth, cls):
        raise TypeError(
            f"ground_truth must be an {cls.__name__}, got {type(ground_truth).__name__}."
        )


def _check_scores(scores, ground_truth):
    """``scores`` as a float64 (n_test, n_train) array matching ``ground_truth``."""
    scores = check_array(
        _as_numpy(scores), dtype=np.float64, ensure_all_finite=True, input_name="scores"
    )
    if scores.shape[0] != ground_truth.n_test:
        raise ValueError(
            f"scores has {scores.shape[0]} query rows but the ground truth has "
            f"n_test={ground_truth.n_test} queries; scores must have shape (n_test, n_train) "
            "with the queries in the order the ground truth was measured."
        )
    if ground_truth.n_train is not None and scores.shape[1] != ground_truth.n_train:
        raise ValueError(
            f"scores has {scores.shape[1]} training columns but the ground truth has "
            f"n_train={ground_truth.n_train}; the attributor must be fitted on the same "
            "training set."
        )
    return scores


def _rowwise_pearson(a, b):
    """Pearson correlation of each row of ``a`` with the same row of ``b``.

    ``a`` and ``b`` have shape (n_rows, n). Returns shape (n_rows,), with NaN
    where a row of ``a`` or of ``b`` is constant (the correlation is undefined).
    """
    constant = np.all(a == a[:, :1], axis=1) | np.all(b == b[:, :1], axis=1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        # scale by the largest magnitude first so the norm cannot overflow
        a /= np.abs(a).max(axis=1, keepdims=True)
        b /= np.abs(b).max(axis=1, keepdims=True)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        r = np.einsum("ij,ij->i", a, b)
    r = np.clip(r, -1.0, 1.0)
    r[constant] = np.nan
    return r


def _finish(per_query, aggregate, what):
    undefined = np.isnan(per_query)
    if undefined.any():
        warnings.warn(
            f"{int(undefined.sum())} of {per_query.size} queries have constant {what}; "
            "their correlation is undefined and set to NaN"
            + (" and left out of the mean." if aggregate else "."),
            UndefinedMetricWarning,
        )
    if not aggregate:
        return per_query
    if undefined.all():
        return float("nan")
    return float(per_query[~undefined].mean())


def lds_score(ground_truth, scores, *, aggregate=True):
    """Linear datamodeling score (LDS): rank correlation with retrained models.

    For every query ``i`` and retrained subset ``s`` the attribution predicts the
    subset's effect as the sum of the scores of its members,
    ``g[s, i] = sum_j masks[s, j] * scores[i, j]``. The LDS of query ``i`` is
    the Spearman rank correlation over subsets between ``g[:, i]`` and the
    retrained models' measured benefit: ``values[:, i]`` for target
    ``"margin"`` and ``-values[:, i]`` for target ``"loss"`` (a helpful subset
    lowers the loss). A perfect linear attribution scores 1.

    Parameters
    ----------
    ground_truth : LDSGroundTruth
        Retrained targets, from :func:`skdattri.ground_truth.lds_ground_truth`.

    scores : array-like of shape (n_test, n_train)
        Attribution scores, ``scores[i, j] > 0`` when training sample ``j``
        helps query ``i`` (the skdattri convention).

    aggregate : bool, default=True
        Return the mean over queries (True) or one value per query (False).

    Returns
    -------
    score : float or ndarray of shape (n_test,)
        Higher is better, in [-1, 1].

    Notes
    -----
    Ties are ranked by their average rank, as in :func:`scipy.stats.spearmanr`.
    The computation is vectorised over queries: both sides are rank-transformed
    along the subsets and correlated row-wise. A query whose summed scores or
    ground-truth values are constant over the subsets has no defined
    correlation: it gets NaN (with an
    :class:`~sklearn.exceptions.UndefinedMetricWarning`), and the aggregate is
    the mean over the remaining queries (NaN when none remains).

    References
    ----------
    .. [1] Park, Georgiev, Ilyas, Leclerc and Madry, "TRAK: Attributing Model
       Behavior at Scale", ICML 2023.

    Examples
    --------
    >>> import numpy as np
    >>> from skdattri.ground_truth import LDSGroundTruth
    >>> from skdattri.metrics import lds_score
    >>> masks = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    >>> w = np.array([[1.0, 2.0, 4.0]])              # a linear datamodel, one query
    >>> gt = LDSGroundTruth(masks, masks @ w.T, target="margin")
    >>> print(f"{lds_score(gt, w):.3f}")
    1.000
    """
    _check_ground_truth(ground_truth, LDSGroundTruth)
    if ground_truth.n_subsets < 2:
        raise ValueError("LDS needs a ground truth with at least 2 subsets.")
    scores = _check_scores(scores, ground_truth)
    predicted = scores @ ground_truth.masks.T.astype(np.float64)  # (n_test, n_subsets)
    sign = -1.0 if ground_truth.target == "loss" else 1.0
    measured = sign * ground_truth.values.T  # (n_test, n_subsets)
    rho = _rowwise_pearson(rankdata(predicted, axis=1), rankdata(measured, axis=1))
    return _finish(rho, aggregate, "summed scores or ground-truth values")


def loo_score(ground_truth, scores, *, aggregate=True):
    """Leave-one-out correlation: Pearson correlation with exact LOO changes.

    For every query ``i`` this is the Pearson correlation, over the removed
    training indices ``j``, between ``scores[i, j]`` and the measured benefit
    of ``j`` to ``i``: ``values[r, i] = target_i(without j) - target_i(full)``
    for target ``"loss"`` (positive when ``j`` helps), and ``-values[r, i]``
    for target ``"margin"``. A perfect attributor scores 1.

    Parameters
    ----------
    ground_truth : LOOGroundTruth
        Leave-one-out changes, from :func:`skdattri.ground_truth.loo_ground_truth`.

    scores : array-like of shape (n_test, n_train)
        Attribution scores for all training samples; the columns
        ``ground_truth.indices`` are used.

    aggregate : bool, default=True
        Return the mean over queries (True) or one value per query (False).

    Returns
    -------
    score : float or ndarray of shape (n_test,)
        Higher is better, in [-1, 1].

    Notes
    -----
    Vectorised over queries. A query whose scores or LOO changes are constant
    over the removed indices gets NaN (with an
    :class:`~sklearn.exceptions.UndefinedMetricWarning`) and is left out of the
    aggregate mean (NaN when no query remains).

    Examples
    --------
    >>> import numpy as np
    >>> from skdattri.ground_truth import LOOGroundTruth
    >>> from skdattri.metrics import loo_score
    >>> # removing sample j raises the query's loss by 0.1 * (j + 1)
    >>> gt = LOOGroundTruth([0, 1, 2], [[0.1], [0.2], [0.3]], target="loss", n_train=3)
    >>> print(f"{loo_score(gt, [[1.0, 2.0, 3.0]]):.3f}")
    1.000
    """
    _check_ground_truth(ground_truth, LOOGroundTruth)
    if ground_truth.n_removed < 2:
        raise ValueError("LOO correlation needs a ground truth with at least 2 removed indices.")
    scores = _check_scores(scores, ground_truth)
    n_train = scores.shape[1]
    if ground_truth.indices.max() >= n_train:
        raise ValueError(
            f"The ground truth removes training index {ground_truth.indices.max()} but "
            f"scores has only {n_train} training columns."
        )
    sign = 1.0 if ground_truth.target == "loss" else -1.0
    measured = sign * ground_truth.values.T  # (n_test, n_removed)
    r = _rowwise_pearson(scores[:, ground_truth.indices], measured)
    return _finish(r, aggregate, "scores or LOO changes")
