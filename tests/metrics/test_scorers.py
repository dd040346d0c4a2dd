import pickle

import numpy as np
import pytest
from sklearn import config_context
from sklearn.base import BaseEstimator, clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, KFold, ParameterGrid, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from skdattri.estimator_checks import assert_scores_close
from skdattri.ground_truth import LDSGroundTruth, lds_ground_truth, loo_ground_truth
from skdattri.metrics import (
    lds_score,
    loo_score,
    make_lds_scorer,
    make_loo_scorer,
    make_mislabel_scorer,
    mislabel_auc_score,
)
from skdattri.model_selection import SelfInfluenceSplit, TrainQuerySplit
from skdattri.tracin import TracIn


class LRInfluence(BaseEstimator):
    """Test-only attributor: closed-form influence function of a binary logistic regression.

    ``damping`` is added to the Hessian, so a grid over it changes the scores.
    """

    def __init__(self, estimator, *, damping=0.0, target="loss"):
        self.estimator = estimator
        self.damping = damping
        self.target = target

    def fit(self, X, y):
        X, y = np.asarray(X, dtype=float), np.asarray(y)
        self.estimator_ = clone(self.estimator).fit(X, y)
        Xt = np.c_[X, np.ones(len(X))]
        p = self.estimator_.predict_proba(X)[:, 1]
        reg = np.r_[np.ones(X.shape[1]), 0.0] + self.damping
        H = self.estimator_.C * (Xt * (p * (1 - p))[:, None]).T @ Xt + np.diag(reg)
        self.train_grads_ = (p - y)[:, None] * Xt
        self.steps_ = self.estimator_.C * np.linalg.solve(H, self.train_grads_.T)
        self.n_train_ = len(X)
        return self

    def _query_grads(self, X, y):
        X = np.asarray(X, dtype=float)
        Xt = np.c_[X, np.ones(len(X))]
        if self.target == "loss":
            return (self.estimator_.predict_proba(X)[:, 1] - y)[:, None] * Xt
        return -(2 * np.asarray(y) - 1)[:, None] * Xt

    def transform(self, X, y):
        return self._query_grads(X, y) @ self.steps_

    def self_influence(self):
        return np.einsum("ij,ji->i", self.train_grads_, self.steps_)


@pytest.fixture(scope="module")
def binary_problem():
    X, y = load_digits(return_X_y=True)
    keep = np.isin(y, [3, 8])
    X, y = X[keep][:110] / 16.0, (y[keep][:110] == 8).astype(int)
    X_train, y_train, X_test, y_test = X[:90], y[:90], X[90:], y[90:]
    lr = LogisticRegression(solver="newton-cholesky", tol=1e-12)
    lds = lds_ground_truth(lr, X_train, y_train, X_test, y_test, n_subsets=20, random_state=0)
    loo = loo_ground_truth(lr, X_train, y_train, X_test, y_test, indices=np.arange(0, 90, 3))
    return X_train, y_train, X_test, y_test, lr, lds, loo


def test_grid_search_matches_hand_written_loop(binary_problem):
    X_train, y_train, X_test, y_test, lr, lds, loo = binary_problem
    grid = {"damping": [0.0, 1.0, 100.0], "target": ["loss", "margin"]}
    search = GridSearchCV(
        LRInfluence(lr),
        grid,
        scoring={"lds": make_lds_scorer(lds), "loo": make_loo_scorer(loo)},
        cv=TrainQuerySplit(n_train=len(X_train)),
        refit=False,
        error_score="raise",
    ).fit(np.r_[X_train, X_test], np.r_[y_train, y_test])

    expected_lds, expected_loo = [], []
    for params in ParameterGrid(grid):
        scores = LRInfluence(lr, **params).fit(X_train, y_train).transform(X_test, y_test)
        expected_lds.append(lds_score(lds, scores))
        expected_loo.append(loo_score(loo, scores))
    assert [p for p in search.cv_results_["params"]] == list(ParameterGrid(grid))
    assert_scores_close(search.cv_results_["mean_test_lds"], expected_lds, ulps=16)
    assert_scores_close(search.cv_results_["mean_test_loo"], expected_loo, ulps=16)
    # the ground truth target is the loss: the exact influence for the loss is best on LOO
    assert np.argmax(search.cv_results_["mean_test_loo"]) == 0
    assert search.cv_results_["mean_test_loo"][0] > 0.95


def test_scorer_with_attributor_in_a_pipeline(binary_problem):
    X_train, y_train, X_test, y_test, lr, lds, _ = binary_problem
    pipe = make_pipeline(FunctionTransformer(), LRInfluence(lr)).fit(X_train, y_train)
    plain = LRInfluence(lr).fit(X_train, y_train)
    scorer = make_lds_scorer(lds)
    assert scorer(pipe, X_test, y_test) == scorer(plain, X_test, y_test)
    assert scorer(plain, X_test, y_test) == lds_score(lds, plain.transform(X_test, y_test))


class CountingInfluence(LRInfluence):
    """LRInfluence that counts its ``transform`` calls (in this process)."""

    calls = 0

    def transform(self, X, y):
        type(self).calls += 1
        return super().transform(X, y)


def _train_query(binary_problem):
    X_train, y_train, X_test, y_test, lr, lds, loo = binary_problem
    return np.r_[X_train, X_test], np.r_[y_train, y_test], TrainQuerySplit(n_train=len(X_train))


@pytest.mark.parametrize("in_pipeline", [False, True])
@pytest.mark.parametrize("routing", [False, True])
def test_a_dict_of_lds_and_loo_scorers_transforms_once_per_split(
    binary_problem, in_pipeline, routing
):
    X_train, y_train, X_test, y_test, lr, lds, loo = binary_problem
    X, y, cv = _train_query(binary_problem)
    estimator = CountingInfluence(lr)
    grid = {"damping": [0.0, 1.0, 100.0]}
    if in_pipeline:
        estimator = make_pipeline(FunctionTransformer(), estimator)
        grid = {"countinginfluence__damping": grid["damping"]}
    scoring = {"lds": make_lds_scorer(lds), "loo": make_loo_scorer(loo)}
    CountingInfluence.calls = 0
    with config_context(enable_metadata_routing=routing):
        search = GridSearchCV(estimator, grid, scoring=scoring, cv=cv, refit=False,
                              error_score="raise").fit(X, y)
    assert CountingInfluence.calls == 3  # one split per candidate, one transform each

    expected = {"lds": [], "loo": []}
    for damping in grid[next(iter(grid))]:
        scores = LRInfluence(lr, damping=damping).fit(X_train, y_train).transform(X_test, y_test)
        expected["lds"].append(lds_score(lds, scores))
        expected["loo"].append(loo_score(loo, scores))
    for name in expected:
        assert_scores_close(search.cv_results_[f"mean_test_{name}"], expected[name], ulps=16)


def test_single_scorers_inside_sklearn_and_called_directly(binary_problem):
    X_train, y_train, X_test, y_test, lr, lds, loo = binary_problem
    X, y, cv = _train_query(binary_problem)
    attr = CountingInfluence(lr).fit(X_train, y_train)
    direct = {"lds": lds_score(lds, attr.transform(X_test, y_test)),
              "loo": loo_score(loo, attr.transform(X_test, y_test))}
    for name, scorer in (("lds", make_lds_scorer(lds)), ("loo", make_loo_scorer(loo))):
        CountingInfluence.calls = 0
        assert_scores_close(scorer(attr, X_test, y_test), direct[name], ulps=16)
        assert_scores_close(scorer(attr, X_test, y_test), direct[name], ulps=16)
        assert CountingInfluence.calls == 2  # nothing is cached from one call to the next
        res = cross_validate(CountingInfluence(lr), X, y, scoring=scorer, cv=cv,
                             error_score="raise")
        assert_scores_close(res["test_score"], [direct[name]], ulps=16)
        search = GridSearchCV(CountingInfluence(lr), {"damping": [0.0]}, scoring=scorer, cv=cv,
                              refit=False, error_score="raise").fit(X, y)
        assert_scores_close(search.cv_results_["mean_test_score"], [direct[name]], ulps=16)
        assert CountingInfluence.calls == 4
    # a dict in cross_validate shares the transform too
    CountingInfluence.calls = 0
    res = cross_validate(CountingInfluence(lr), X, y, cv=cv, error_score="raise",
                         scoring={"lds": make_lds_scorer(lds), "loo": make_loo_scorer(loo)})
    assert CountingInfluence.calls == 1
    assert_scores_close(res["test_lds"], [direct["lds"]], ulps=16)
    assert_scores_close(res["test_loo"], [direct["loo"]], ulps=16)


def test_scorer_errors_name_the_mismatch(binary_problem):
    X_train, y_train, X_test, y_test, lr, lds, loo = binary_problem
    attr = LRInfluence(lr).fit(X_train, y_train)
    with pytest.raises(ValueError, match=r"X has 19 rows.*n_test=20.*TrainQuerySplit"):
        make_lds_scorer(lds)(attr, X_test[:19], y_test[:19])
    with pytest.raises(ValueError, match=r"fitted on 80 training rows.*n_train=90"):
        make_loo_scorer(loo)(LRInfluence(lr).fit(X_train[:80], y_train[:80]), X_test, y_test)
    # the usual mistake: k-fold CV instead of the train/query split
    search = GridSearchCV(LRInfluence(lr), {"damping": [0.0]}, scoring=make_lds_scorer(lds),
                          cv=KFold(2), refit=False, error_score="raise")
    with pytest.raises(ValueError, match="do not match the ground truth"):
        search.fit(np.r_[X_train, X_test], np.r_[y_train, y_test])
    with pytest.raises(TypeError, match="LDSGroundTruth"):
        make_lds_scorer(loo)
    with pytest.raises(TypeError, match="LOOGroundTruth"):
        make_loo_scorer(lds)


def test_scorer_reprs(binary_problem):
    X_train, y_train, X_test, y_test, lr, lds, loo = binary_problem
    assert repr(make_lds_scorer(lds)) == (
        "make_lds_scorer(LDSGroundTruth(n_subsets=20, n_train=90, n_test=20, target='loss'))"
    )
    assert repr(make_loo_scorer(loo)) == (
        "make_loo_scorer(LOOGroundTruth(n_removed=30, n_train=90, n_test=20, target='loss'))"
    )
    assert repr(make_mislabel_scorer([1, 0, 0, 1, 0])) == (
        "make_mislabel_scorer(<2 of 5 samples noisy>)"
    )
    # scorers travel to parallel workers
    back = pickle.loads(pickle.dumps(make_lds_scorer(lds)))
    assert repr(back) == repr(make_lds_scorer(lds))
    attr = LRInfluence(lr).fit(X_train, y_train)
    assert back(attr, X_test, y_test) == make_lds_scorer(lds)(attr, X_test, y_test)


def _noisy_binary():
    X, y = load_digits(return_X_y=True)
    keep = np.isin(y, [3, 8])
    X, y = X[keep][:200] / 16.0, (y[keep][:200] == 8).astype(int)
    rng = np.random.RandomState(0)
    is_noisy = np.zeros(len(y), dtype=bool)
    is_noisy[rng.choice(len(y), size=20, replace=False)] = True
    return X, np.where(is_noisy, 1 - y, y), is_noisy


def test_mislabel_scorer_with_self_influence_split():
    X, y_noisy, is_noisy = _noisy_binary()
    lr = LogisticRegression(solver="newton-cholesky")
    grid = {"damping": [0.0, 10.0]}
    search = GridSearchCV(LRInfluence(lr), grid, scoring=make_mislabel_scorer(is_noisy),
                          cv=SelfInfluenceSplit(), refit=False, error_score="raise")
    search.fit(X, y_noisy)
    expected = [
        mislabel_auc_score(is_noisy, LRInfluence(lr, **p).fit(X, y_noisy).self_influence())
        for p in ParameterGrid(grid)
    ]
    assert_scores_close(search.cv_results_["mean_test_score"], expected, ulps=16)
    assert min(expected) > 0.9
    with pytest.raises(ValueError, match="SelfInfluenceSplit"):
        make_mislabel_scorer(is_noisy)(LRInfluence(lr).fit(X, y_noisy), X[:50], y_noisy[:50])


# ---------------------------------------------------------------------------- TracIn
@pytest.fixture(scope="module")
def digits_problem():
    X, y = load_digits(return_X_y=True)
    X, y = X[:260] / 16.0, y[:260]
    X_train, y_train, X_test, y_test = X[:200], y[:200], X[200:], y[200:]
    lr = LogisticRegression(max_iter=1000)
    gt = lds_ground_truth(lr, X_train, y_train, X_test, y_test, n_subsets=16, random_state=0)
    return X_train, y_train, X_test, y_test, lr.fit(X_train, y_train), gt


def test_grid_search_over_tracin_matches_loop(digits_problem):
    X_train, y_train, X_test, y_test, lr, gt = digits_problem
    grid = {"normalize": [False, True], "target": ["loss", "margin"]}
    search = GridSearchCV(
        TracIn(lr),
        grid,
        scoring=make_lds_scorer(gt),
        cv=TrainQuerySplit(n_train=len(X_train)),
        refit=False,
        error_score="raise",
    ).fit(np.r_[X_train, X_test], np.r_[y_train, y_test])
    expected = [
        lds_score(gt, clone(TracIn(lr)).set_params(**p).fit(X_train, y_train)
                  .transform(X_test, y_test))
        for p in ParameterGrid(grid)
    ]
    assert_scores_close(search.cv_results_["mean_test_score"], expected, ulps=64)
    assert np.all(np.isfinite(expected)) and len(set(np.round(expected, 12))) > 1
    assert max(expected) > 0.1  # Grad-Dot / Grad-Cos carry signal on LDS


def test_mislabel_scorer_with_tracin():
    X, y_noisy, is_noisy = _noisy_binary()
    lr = LogisticRegression(max_iter=1000).fit(X, y_noisy)
    search = GridSearchCV(TracIn(lr), {"normalize": [False]},
                          scoring={"auc": make_mislabel_scorer(is_noisy)},
                          cv=SelfInfluenceSplit(), refit=False, error_score="raise")
    search.fit(X, y_noisy)
    expected = mislabel_auc_score(is_noisy, TracIn(lr).fit(X, y_noisy).self_influence())
    assert_scores_close(search.cv_results_["mean_test_auc"][0], expected, ulps=16)
    assert expected > 0.9


def test_custom_ground_truth_works_as_scorer():
    # a user-built ground truth (e.g. published arrays) plugs into the same scorer
    rng = np.random.RandomState(0)
    W = rng.normal(size=(4, 12))
    masks = rng.rand(15, 12) < 0.5
    gt = LDSGroundTruth(masks, masks @ W.T, target="margin")

    class Fixed(BaseEstimator):
        def fit(self, X, y=None):
            self.n_train_ = len(X)
            return self

        def transform(self, X, y=None):
            return W

    est = Fixed().fit(np.zeros((12, 1)))
    assert_scores_close(make_lds_scorer(gt)(est, np.zeros((4, 1)), None), 1.0, ulps=64)
