"""Scorers (``scorer(estimator, X, y) -> float``) for model selection over attributors.

One class, :class:`_AttributionScorer`, serves every metric: a :class:`_Metric`
says which function scores, what it needs from the attributor (the score
matrix of ``transform`` or ``self_influence()``), which rows the scored ``X``
must have and how the scorer prints. The ``make_*`` functions pair a metric
with its reference (a ground truth or the noisy-label mask).

The scorer is a scikit-learn ``_BaseScorer``, so that a dict of scorers in
``GridSearchCV`` / ``cross_validate`` (a ``_MultimetricScorer``) shares one
per-call cache among them: LDS and LOO scorers of the same split then compute
``transform`` once, not once each.
"""

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from sklearn.metrics._scorer import _BaseScorer, _cached_call
from sklearn.pipeline import Pipeline
from sklearn.utils.metadata_routing import MetadataRequest

from .._utils import _n_rows
from ..ground_truth import LDSGroundTruth, LOOGroundTruth
from ._correlation import _check_ground_truth, lds_score, loo_score
from ._mislabel import _check_is_noisy, mislabel_auc_score

__all__ = ["make_lds_scorer", "make_loo_scorer", "make_mislabel_scorer"]


class _Metric(NamedTuple):
    """What an :class:`_AttributionScorer` computes; ``reference`` is its ground truth."""

    factory: str  # the make_* function: named in errors and in the repr
    score_func: Callable  # score_func(reference, response) -> float
    response: str  # "transform" (score matrix of the query rows) or "self_influence"
    rows: Callable  # reference -> (number of rows X must have, what they are called)
    n_train: Callable  # reference -> training rows of the attributor (None: unknown)
    describe: Callable  # reference -> its text inside the repr
    hint: str  # how to set the search up, appended to the errors


def _query_rows(ground_truth):
    return ground_truth.n_test, "n_test"


def _n_train(ground_truth):
    return ground_truth.n_train


def _noisy_rows(is_noisy):
    return is_noisy.shape[0], "n_train"


def _n_noisy_rows(is_noisy):
    return is_noisy.shape[0]


def _describe_noisy(is_noisy):
    return f"<{int(is_noisy.sum())} of {is_noisy.shape[0]} samples noisy>"


_SPLIT_HINT = (
    "Fit the search on np.concatenate([X_train, X_test]) (rows in the order the "
    "ground truth was measured) with cv=TrainQuerySplit(n_train=len(X_train))."
)
_LDS = _Metric("make_lds_scorer", lds_score, "transform", _query_rows, _n_train, repr,
               _SPLIT_HINT)
_LOO = _Metric("make_loo_scorer", loo_score, "transform", _query_rows, _n_train, repr,
               _SPLIT_HINT)
_MISLABEL = _Metric(
    "make_mislabel_scorer", mislabel_auc_score, "self_influence", _noisy_rows, _n_noisy_rows,
    _describe_noisy, "Fit the search on the (noisy) training set with cv=SelfInfluenceSplit().",
)


def _final_step(estimator):
    return estimator[-1] if isinstance(estimator, Pipeline) else estimator


def _attribution_scores(estimator, X, y):
    """``transform(X, y)`` of an attributor, also at the end of a fitted Pipeline."""
    if isinstance(estimator, Pipeline):
        Xt = estimator[:-1].transform(X) if len(estimator) > 1 else X
        return estimator[-1].transform(Xt, y)
    return estimator.transform(X, y)


def _call_cache(method_caller):
    """The dict a ``_MultimetricScorer`` shares among its scorers for one call, or None.

    scikit-learn hands every ``_BaseScorer`` ``partial(_cached_call, cache)``, with
    ``cache=None`` when nothing is shared. Anything else means no cache (slower at
    worst, never wrong).
    """
    if isinstance(method_caller, partial) and method_caller.func is _cached_call:
        cache = method_caller.args[0] if method_caller.args else None
        return cache if isinstance(cache, dict) else None
    return None


def _cached_attribution_scores(method_caller, estimator, X, y):
    """:func:`_attribution_scores`, computed once per call of a dict of scorers."""
    cache = _call_cache(method_caller)
    # The objects stay alive for the whole call, so their ids do not repeat in it.
    key = ("skdattri.transform", id(estimator), id(X), id(y))
    if cache is not None and key in cache:
        return cache[key]
    scores = _attribution_scores(estimator, X, y)
    if cache is not None:
        cache[key] = scores
    return scores


class _AttributionScorer(_BaseScorer):
    """``scorer(estimator, X, y) -> float`` for one attribution metric.

    Parameters
    ----------
    metric : _Metric
        The metric (``_LDS``, ``_LOO`` or ``_MISLABEL``).

    reference : object
        What the metric compares against: the ground truth, or the noisy mask.
    """

    def __init__(self, metric, reference):
        # ``_response_method`` only tells a _MultimetricScorer whether sharing a cache
        # pays off: every attributor, and a Pipeline ending in one, has ``transform``.
        super().__init__(
            score_func=metric.score_func, sign=1, kwargs={}, response_method="transform"
        )
        self._metric = metric
        self._reference = reference

    def __call__(self, estimator, X, y_true=None, **kwargs):
        """Score ``estimator`` on the rows ``X`` (with labels ``y_true``)."""
        return self._score(partial(_cached_call, None), estimator, X, y_true, **kwargs)

    def _score(self, method_caller, estimator, X, y_true, **kwargs):
        metric, reference = self._metric, self._reference
        if kwargs:
            raise TypeError(f"{metric.factory} scorers take no metadata, got {sorted(kwargs)}.")
        self._check_rows(X, *metric.rows(reference))
        self._check_n_train(estimator, metric.n_train(reference))
        if metric.response == "self_influence":
            response = self._self_influence(estimator)
        else:
            response = _cached_attribution_scores(method_caller, estimator, X, y_true)
        return metric.score_func(reference, response)

    def _self_influence(self, estimator):
        attributor = _final_step(estimator)
        if not hasattr(attributor, "self_influence"):
            raise TypeError(
                f"{self._metric.factory} needs an attributor with a self_influence() method; "
                f"got {type(attributor).__name__}."
            )
        return attributor.self_influence()

    def _check_rows(self, X, expected, what):
        n_rows = _n_rows(X)
        if n_rows != expected:
            raise ValueError(
                f"{self._metric.factory}: the scored rows (X has {n_rows} rows) do not match "
                f"the ground truth ({what}={expected}). {self._metric.hint}"
            )

    def _check_n_train(self, estimator, expected):
        n_train = getattr(_final_step(estimator), "n_train_", None)
        if expected is not None and n_train is not None and n_train != expected:
            raise ValueError(
                f"{self._metric.factory}: the attributor was fitted on {n_train} training "
                f"rows but the ground truth has n_train={expected}. {self._metric.hint}"
            )

    def _accept_sample_weight(self):
        # Queried by scikit-learn's search estimators when fit gets sample_weight.
        return False

    def _get_metadata_request(self):
        # No metadata is requested (the metric's own arguments are not metadata).
        return MetadataRequest(owner=self)

    def __repr__(self):
        return f"{self._metric.factory}({self._metric.describe(self._reference)})"


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
    _check_ground_truth(ground_truth, LDSGroundTruth)
    return _AttributionScorer(_LDS, ground_truth)


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
    _check_ground_truth(ground_truth, LOOGroundTruth)
    return _AttributionScorer(_LOO, ground_truth)


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
    return _AttributionScorer(_MISLABEL, _check_is_noisy(is_noisy))
