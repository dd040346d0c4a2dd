"""Scorers (``scorer(estimator, X, y) -> float``) for model selection over attributors."""

from sklearn.pipeline import Pipeline

from .._utils import _n_rows
from ..ground_truth import LDSGroundTruth, LOOGroundTruth
from ._correlation import lds_score, loo_score
from ._mislabel import _check_is_noisy, mislabel_auc_score

__all__ = ["make_lds_scorer", "make_loo_scorer", "make_mislabel_scorer"]


def _final_step(estimator):
    return estimator[-1] if isinstance(estimator, Pipeline) else estimator


def _attribution_scores(estimator, X, y):
    """``transform(X, y)`` of an attributor, also at the end of a fitted Pipeline."""
    if isinstance(estimator, Pipeline):
        Xt = estimator[:-1].transform(X) if len(estimator) > 1 else X
        return estimator[-1].transform(Xt, y)
    return estimator.transform(X, y)


class _AttributionScorer:
    """Base of the attribution scorers: ``scorer(estimator, X, y) -> float``."""

    _factory = ""

    def _accept_sample_weight(self):
        # Queried by scikit-learn's search estimators when fit gets sample_weight.
        return False

    def _check_rows(self, X, expected, what):
        n_rows = _n_rows(X)
        if n_rows != expected:
            raise ValueError(
                f"{self._factory}: the scored rows (X has {n_rows} rows) do not match the "
                f"ground truth ({what}={expected}). {self._hint}"
            )

    def _check_n_train(self, estimator, expected):
        n_train = getattr(_final_step(estimator), "n_train_", None)
        if expected is not None and n_train is not None and n_train != expected:
            raise ValueError(
                f"{self._factory}: the attributor was fitted on {n_train} training rows "
                f"but the ground truth has n_train={expected}. {self._hint}"
            )


class _LDSScorer(_AttributionScorer):
    _factory = "make_lds_scorer"
    _hint = (
        "Fit the search on np.concatenate([X_train, X_test]) (rows in the order the "
        "ground truth was measured) with cv=TrainQuerySplit(n_train=len(X_train))."
    )

    def __init__(self, ground_truth):
        self._ground_truth = ground_truth

    def __call__(self, estimator, X, y=None):
        gt = self._ground_truth
        self._check_rows(X, gt.n_test, "n_test")
        self._check_n_train(estimator, gt.n_train)
        return lds_score(gt, _attribution_scores(estimator, X, y))

    def __repr__(self):
        return f"make_lds_scorer({self._ground_truth!r})"


class _LOOScorer(_LDSScorer):
    _factory = "make_loo_scorer"

    def __call__(self, estimator, X, y=None):
        gt = self._ground_truth
        self._check_rows(X, gt.n_test, "n_test")
        self._check_n_train(estimator, gt.n_train)
        return loo_score(gt, _attribution_scores(estimator, X, y))

    def __repr__(self):
        return f"make_loo_scorer({self._ground_truth!r})"


class _MislabelScorer(_AttributionScorer):
    _factory = "make_mislabel_scorer"
    _hint = "Fit the search on the (noisy) training set with cv=SelfInfluenceSplit()."

    def __init__(self, is_noisy):
        self._is_noisy = is_noisy

    def __call__(self, estimator, X, y=None):
        n = self._is_noisy.shape[0]
        self._check_rows(X, n, "n_train")
        self._check_n_train(estimator, n)
        attributor = _final_step(estimator)
        if not hasattr(attributor, "self_influence"):
            raise TypeError(
                f"{self._factory} needs an attributor with a self_influence() method; "
                f"got {type(attributor).__name__}."
            )
        return mislabel_auc_score(self._is_noisy, attributor.self_influence())

    def __repr__(self):
        n = self._is_noisy.shape[0]
        return f"make_mislabel_scorer(<{int(self._is_noisy.sum())} of {n} samples noisy>)"


def make_lds_scorer(ground_truth):
    """Make a scorer of the linear datamodeling score for model selection.

    Parameters
    ----------
    ground_truth : LDSGroundTruth
        Retrained targets of the query rows, from
        :func:`skdattri.ground_truth.lds_ground_truth`.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``: the :func:`~skdattri.metrics.lds_score`
        of ``estimator.transform(X, y)`` (the last step's, after the preceding
        transformers, for a ``Pipeline``), where ``X`` are the query rows of the
        ground truth in its order. Usable as ``scoring=`` of ``GridSearchCV``, alone
        or in a dict with other scorers, together with
        :class:`~skdattri.model_selection.TrainQuerySplit`. It raises ``ValueError``
        when ``X`` has a different number of rows than the ground truth's queries
        or the attributor was fitted on a different number of training rows.

    See Also
    --------
    make_loo_scorer, make_mislabel_scorer
    skdattri.model_selection.TrainQuerySplit

    Examples
    --------
    >>> import numpy as np
    >>> from skdattri.ground_truth import LDSGroundTruth
    >>> from skdattri.metrics import make_lds_scorer
    >>> gt = LDSGroundTruth(np.eye(3, dtype=bool), np.zeros((3, 2)) + [[0], [1], [2]])
    >>> make_lds_scorer(gt)
    make_lds_scorer(LDSGroundTruth(n_subsets=3, n_train=3, n_test=2, target='loss'))
    """
    if not isinstance(ground_truth, LDSGroundTruth):
        raise TypeError(
            f"ground_truth must be an LDSGroundTruth, got {type(ground_truth).__name__}."
        )
    return _LDSScorer(ground_truth)


def make_loo_scorer(ground_truth):
    """Make a scorer of the leave-one-out correlation for model selection.

    Parameters
    ----------
    ground_truth : LOOGroundTruth
        Leave-one-out changes of the query rows, from
        :func:`skdattri.ground_truth.loo_ground_truth`.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``: the :func:`~skdattri.metrics.loo_score`
        of ``estimator.transform(X, y)``; see :func:`make_lds_scorer` for its use
        with ``GridSearchCV`` and its errors.

    Examples
    --------
    >>> from skdattri.ground_truth import LOOGroundTruth
    >>> from skdattri.metrics import make_loo_scorer
    >>> make_loo_scorer(LOOGroundTruth([0, 1], [[0.1], [0.2]], n_train=4))
    make_loo_scorer(LOOGroundTruth(n_removed=2, n_train=4, n_test=1, target='loss'))
    """
    if not isinstance(ground_truth, LOOGroundTruth):
        raise TypeError(
            f"ground_truth must be an LOOGroundTruth, got {type(ground_truth).__name__}."
        )
    return _LOOScorer(ground_truth)


def make_mislabel_scorer(is_noisy):
    """Make a scorer of mislabel detection by self-influence for model selection.

    Parameters
    ----------
    is_noisy : array-like of shape (n_train,)
        True (or 1) for the training samples whose label is corrupted.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``: the
        :func:`~skdattri.metrics.mislabel_auc_score` of
        ``estimator.self_influence()``. Use it with
        :class:`~skdattri.model_selection.SelfInfluenceSplit`, which fits and scores
        on the same (noisy) training rows; ``X`` must have ``n_train`` rows.

    Examples
    --------
    >>> from skdattri.metrics import make_mislabel_scorer
    >>> make_mislabel_scorer([0, 1, 0, 0])
    make_mislabel_scorer(<1 of 4 samples noisy>)
    """
    return _MislabelScorer(_check_is_noisy(is_noisy))
