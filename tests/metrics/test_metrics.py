import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.base import BaseEstimator
from sklearn.datasets import load_digits
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from skdattri.estimator_checks import assert_scores_close
from skdattri.ground_truth import LDSGroundTruth, LOOGroundTruth
from skdattri.metrics import brittleness, lds_score, loo_score, mislabel_auc_score
from skdattri.tracin import TracIn


# ---------------------------------------------------------------------------- LDS / LOO
def _naive_lds(masks, values, scores, target):
    sign = -1.0 if target == "loss" else 1.0
    out = []
    for i in range(scores.shape[0]):
        predicted = np.array([scores[i, m].sum() for m in masks])
        out.append(spearmanr(predicted, sign * values[:, i]).statistic)
    return np.array(out)


def _naive_loo(indices, values, scores, target):
    sign = 1.0 if target == "loss" else -1.0
    return np.array(
        [pearsonr(scores[i, indices], sign * values[:, i]).statistic for i in range(len(scores))]
    )


@pytest.mark.parametrize("target", ["loss", "margin"])
@pytest.mark.parametrize("ties", [False, True])
def test_lds_score_matches_per_query_spearman(target, ties):
    rng = np.random.RandomState(0)
    n_subsets, n_train, n_test = 40, 25, 9
    masks = rng.rand(n_subsets, n_train) < 0.5
    values = rng.normal(size=(n_subsets, n_test))
    scores = rng.normal(size=(n_test, n_train))
    if ties:  # integer scores and values give many ties in both rankings
        scores = rng.randint(-2, 3, size=(n_test, n_train)).astype(float)
        values = rng.randint(0, 4, size=(n_subsets, n_test)).astype(float)
    gt = LDSGroundTruth(masks, values, target=target)
    expected = _naive_lds(masks, values, scores, target)
    per_query = lds_score(gt, scores, aggregate=False)
    assert per_query.shape == (n_test,)
    assert_scores_close(per_query, expected, ulps=64)
    # a mean of values up to max |expected|: its rounding error scales with them
    assert_scores_close(lds_score(gt, scores), expected.mean(), ulps=64,
                        scale=np.abs(expected).max())


@pytest.mark.parametrize("target", ["loss", "margin"])
def test_loo_score_matches_per_query_pearson(target):
    rng = np.random.RandomState(1)
    n_train, n_test = 30, 7
    indices = rng.choice(n_train, size=12, replace=False)
    values = rng.normal(size=(12, n_test))
    scores = rng.normal(size=(n_test, n_train)) * 1e3 + 5.0  # scale/offset invariance
    gt = LOOGroundTruth(indices, values, target=target, n_train=n_train)
    expected = _naive_loo(indices, values, scores, target)
    assert_scores_close(loo_score(gt, scores, aggregate=False), expected, ulps=64)
    assert_scores_close(loo_score(gt, scores), expected.mean(), ulps=64,
                        scale=np.abs(expected).max())


@pytest.mark.parametrize("target", ["loss", "margin"])
def test_true_linear_datamodel_scores_one(target):
    # A linear datamodel: the target of query i on subset S is sum_{j in S} W[i, j] for the
    # margin, and minus that (plus a constant) for the loss, as helpful samples lower it.
    rng = np.random.RandomState(2)
    n_subsets, n_train, n_test = 50, 40, 6
    W = rng.normal(size=(n_test, n_train))
    masks = rng.rand(n_subsets, n_train) < 0.5
    benefit = masks.astype(float) @ W.T
    values = benefit if target == "margin" else 3.0 - benefit
    gt = LDSGroundTruth(masks, values, target=target)
    assert_scores_close(lds_score(gt, W, aggregate=False), np.ones(n_test), ulps=64)
    assert_scores_close(lds_score(gt, -W), -1.0, ulps=64)
    assert lds_score(gt, W + 0.5 * rng.normal(size=W.shape)) < 1.0

    # Leave-one-out of the same datamodel: removing j changes the margin by -W[:, j] and
    # the loss by +W[:, j].
    idx = np.arange(n_train)
    loo_values = (-W.T) if target == "margin" else W.T
    loo = LOOGroundTruth(idx, loo_values, target=target, n_train=n_train)
    assert_scores_close(loo_score(loo, W, aggregate=False), np.ones(n_test), ulps=64)
    assert_scores_close(loo_score(loo, -W), -1.0, ulps=64)


def test_constant_rows_are_nan_and_left_out_of_the_mean():
    rng = np.random.RandomState(3)
    masks = rng.rand(20, 10) < 0.5
    values = rng.normal(size=(20, 3))
    values[:, 1] = 0.7  # ground truth constant for query 1
    scores = rng.normal(size=(3, 10))
    gt = LDSGroundTruth(masks, values, target="margin")
    with pytest.warns(UndefinedMetricWarning, match="1 of 3 queries"):
        per_query = lds_score(gt, scores, aggregate=False)
    assert np.isnan(per_query[1]) and np.all(np.isfinite(per_query[[0, 2]]))
    kept = per_query[[0, 2]]
    with pytest.warns(UndefinedMetricWarning):
        assert_scores_close(lds_score(gt, scores), kept.mean(), ulps=64, scale=np.abs(kept).max())
    with warnings.catch_warnings():  # scipy agrees that the correlation is undefined
        warnings.simplefilter("ignore")
        assert np.isnan(spearmanr(masks @ scores[1], values[:, 1]).statistic)

    loo = LOOGroundTruth(np.arange(10), rng.normal(size=(10, 3)), n_train=10)
    const_scores = np.ones((3, 10))
    with pytest.warns(UndefinedMetricWarning, match="3 of 3 queries"):
        assert np.isnan(loo_score(loo, const_scores))


def test_metric_input_validation():
    rng = np.random.RandomState(4)
    gt = LDSGroundTruth(rng.rand(5, 8) < 0.5, rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match="n_test=3"):
        lds_score(gt, np.zeros((4, 8)))
    with pytest.raises(ValueError, match="n_train=8"):
        lds_score(gt, np.zeros((3, 7)))
    with pytest.raises(ValueError, match="NaN"):
        lds_score(gt, np.full((3, 8), np.nan))
    with pytest.raises(TypeError, match="LDSGroundTruth"):
        lds_score(LOOGroundTruth([0, 1], np.zeros((2, 3))), np.zeros((3, 8)))
    loo = LOOGroundTruth([0, 6], rng.normal(size=(2, 3)))  # n_train unknown
    with pytest.raises(ValueError, match="index 6"):
        loo_score(loo, np.zeros((3, 5)))
    with pytest.raises(TypeError, match="LOOGroundTruth"):
        loo_score(gt, np.zeros((3, 8)))


# ---------------------------------------------------------------------------- mislabel
def test_mislabel_auc_equals_roc_auc():
    rng = np.random.RandomState(5)
    is_noisy = rng.rand(200) < 0.1
    scores = rng.randint(0, 20, size=200).astype(float) + 3 * is_noisy  # with ties
    assert_scores_close(mislabel_auc_score(is_noisy, scores),
                        roc_auc_score(is_noisy, scores), ulps=4)
    assert mislabel_auc_score(is_noisy.astype(int), scores) > 0.5
    with pytest.raises(ValueError, match="some but not all"):
        mislabel_auc_score(np.zeros(4), np.arange(4.0))
    with pytest.raises(ValueError, match="one entry per training sample"):
        mislabel_auc_score([0, 1, 0], np.arange(4.0))
    with pytest.raises(ValueError, match="only 0 and 1"):
        mislabel_auc_score([0, 2, 0], np.arange(3.0))


def test_grad_dot_self_influence_finds_flipped_digits():
    X, y = load_digits(return_X_y=True)
    X, y = X[:600] / 16.0, y[:600]
    rng = np.random.RandomState(0)
    is_noisy = np.zeros(len(y), dtype=bool)
    is_noisy[rng.choice(len(y), size=len(y) // 10, replace=False)] = True
    y_noisy = y.copy()
    y_noisy[is_noisy] = (y[is_noisy] + rng.randint(1, 10, size=is_noisy.sum())) % 10
    assert np.all(y_noisy[is_noisy] != y[is_noisy])

    model = LogisticRegression(max_iter=2000).fit(X, y_noisy)
    grad_dot = TracIn(model).fit(X, y_noisy)  # no checkpoints: Grad-Dot
    self_scores = grad_dot.self_influence()
    auc = mislabel_auc_score(is_noisy, self_scores)
    assert_scores_close(auc, roc_auc_score(is_noisy, self_scores), ulps=4)
    assert auc >= 0.9


# ---------------------------------------------------------------------------- brittleness
_FITS = {"n": 0}


class CountingLogisticRegression(LogisticRegression):
    def fit(self, X, y, sample_weight=None):
        _FITS["n"] += 1
        return super().fit(X, y, sample_weight=sample_weight)


class NearestSameLabel(BaseEstimator):
    """Toy attributor: training samples of the query's label help, nearer ones more."""

    def __init__(self, estimator):
        self.estimator = estimator

    def fit(self, X, y):
        self.X_, self.y_ = np.asarray(X), np.asarray(y)
        self.n_train_ = len(self.X_)
        return self

    def transform(self, X, y):
        dist = np.linalg.norm(np.asarray(X)[:, None] - self.X_[None], axis=2)
        return (np.asarray(y)[:, None] == self.y_) / (1.0 + dist)


def _flips(X, y, x_query, y_query, order, k):
    keep = np.setdiff1d(np.arange(len(y)), order[:k])
    return LogisticRegression().fit(X[keep], y[keep]).predict(x_query[None])[0] != y_query


def test_brittleness_bisection_matches_linear_scan_with_fewer_fits():
    rng = np.random.RandomState(6)
    X = np.r_[rng.normal(-1.0, 1.0, size=(40, 2)), rng.normal(1.0, 1.0, size=(40, 2))]
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    X_test = np.array([[0.2, 0.1], [0.5, 0.6], [1.2, 1.0], [2.0, 2.0], [-0.2, -0.3], [1, 1]])
    y_test = LogisticRegression().fit(X, y).predict(X_test)
    y_test[-1] = 1 - y_test[-1]  # a query the full model already gets "wrong"
    k_grid = [1, 2, 3, 5, 8, 12, 18, 26]

    attr = NearestSameLabel(CountingLogisticRegression()).fit(X, y)
    _FITS["n"] = 0
    k_min = brittleness(attr, X, y, X_test, y_test, k_grid=k_grid, random_state=0)
    n_fits = _FITS["n"]
    assert k_min.shape == (len(X_test),)
    assert np.isnan(k_min[-1])

    order = np.argsort(-attr.transform(X_test, y_test), axis=1, kind="stable")
    n_monotone = 0
    for i in range(len(X_test) - 1):
        flips = np.array([_flips(X, y, X_test[i], y_test[i], order[i], k) for k in k_grid])
        expected = k_grid[np.argmax(flips)] if flips.any() else np.inf
        if np.all(np.diff(flips.astype(int)) >= 0):  # bisection is exact when monotone
            n_monotone += 1
            assert k_min[i] == expected
        else:
            assert np.isinf(k_min[i]) or flips[k_grid.index(int(k_min[i]))]
    assert n_monotone >= 4
    assert np.isfinite(k_min[:-1]).sum() >= 2 and np.isinf(k_min[:-1]).sum() >= 1
    # 1 baseline fit + ceil(log2(len(k_grid) + 1)) = 4 fits per query, not 8
    assert n_fits <= 1 + 4 * (len(X_test) - 1) < len(k_grid) * (len(X_test) - 1)


def test_brittleness_validation():
    X = np.linspace(-2, 2, 20)[:, None]
    y = (X[:, 0] > 0).astype(int)
    attr = NearestSameLabel(LogisticRegression()).fit(X, y)
    with pytest.raises(ValueError, match="strictly increasing"):
        brittleness(attr, X, y, X[:2], y[:2], k_grid=[3, 2])
    with pytest.raises(ValueError, match="n_train - 1"):
        brittleness(attr, X, y, X[:2], y[:2], k_grid=[1, 20])
    with pytest.raises(TypeError, match="estimator"):
        brittleness(NearestSameLabel(None).fit(X, y), X, y, X[:2], y[:2], k_grid=[1])
