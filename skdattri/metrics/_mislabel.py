"""Mislabel detection by self-influence."""

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.utils import column_or_1d

from .._utils import _as_numpy

__all__ = ["mislabel_auc_score"]


def _check_is_noisy(is_noisy):
    is_noisy = column_or_1d(_as_numpy(is_noisy))
    if is_noisy.dtype != bool:
        if not np.all((is_noisy == 0) | (is_noisy == 1)):
            raise ValueError("is_noisy must be boolean (or contain only 0 and 1).")
        is_noisy = is_noisy.astype(bool)
    if is_noisy.all() or not is_noisy.any():
        raise ValueError(
            "is_noisy must mark some but not all samples as noisy; the AUC is undefined "
            "with a single class."
        )
    return is_noisy


def mislabel_auc_score(is_noisy, self_scores):
    """ROC AUC of finding mislabelled training samples by their self-influence.

    Samples are ranked by decreasing self-influence (a sample that strongly
    helps its own, wrong, label is suspicious); the AUC is the probability that a
    random noisy sample ranks above a random clean one, ties counting 1/2.

    Parameters
    ----------
    is_noisy : array-like of shape (n_train,)
        True (or 1) for the training samples whose label was corrupted.

    self_scores : array-like of shape (n_train,)
        Self-influence of every training sample, e.g.
        ``attributor.self_influence()``.

    Returns
    -------
    auc : float
        In [0, 1]; 0.5 is random ranking, higher is better.

    Notes
    -----
    This is :func:`sklearn.metrics.roc_auc_score` (O(n log n), ties handled).

    Examples
    --------
    >>> from skdattri.metrics import mislabel_auc_score
    >>> mislabel_auc_score([0, 1, 0, 1], [0.1, 0.9, 0.3, 0.2])
    0.75
    """
    is_noisy = _check_is_noisy(is_noisy)
    self_scores = column_or_1d(_as_numpy(self_scores)).astype(np.float64)
    if self_scores.shape[0] != is_noisy.shape[0]:
        raise ValueError(
            f"self_scores has {self_scores.shape[0]} entries but is_noisy has "
            f"{is_noisy.shape[0]}; both must have one entry per training sample."
        )
    if not np.all(np.isfinite(self_scores)):
        raise ValueError("self_scores contains NaN or infinity.")
    return float(roc_auc_score(is_noisy, self_scores))
