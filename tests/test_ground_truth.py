import numpy as np
import pytest
import skorch
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LinearRegression, LogisticRegression, SGDClassifier
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skdattri.estimator_checks import assert_scores_close
from skdattri.ground_truth import (
    LDSGroundTruth,
    LOOGroundTruth,
    lds_ground_truth,
    load_ground_truth,
    loo_ground_truth,
)
from skdattri.ground_truth._containers import _GroundTruth
from skdattri.ground_truth._retrain import Measure, fit_clone_and_apply
from skdattri.ground_truth._targets import query_targets
from skdattri.metrics import lds_score, loo_score


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


@pytest.fixture(scope="module")
def binary_digits(digits):
    X, y = digits
    keep = np.isin(y, [3, 8])
    X, y = X[keep][:140], (y[keep][:140] == 8).astype(int)
    return X[:120], y[:120], X[120:], y[120:]


def _tight_lr(**kw):
    return LogisticRegression(C=1.0, solver="newton-cholesky", tol=1e-12, max_iter=100, **kw)


# ---------------------------------------------------------------------------- containers
def test_containers_validate_and_round_trip(tmp_path):
    rng = np.random.RandomState(0)
    masks = rng.rand(4, 6) < 0.5
    lds = LDSGroundTruth(masks.astype(int), rng.normal(size=(4, 3)), target="margin")
    assert lds.masks.dtype == bool
    assert (lds.n_subsets, lds.n_train, lds.n_test) == (4, 6, 3)
    assert repr(lds) == "LDSGroundTruth(n_subsets=4, n_train=6, n_test=3, target='margin')"
    lds.save(tmp_path / "lds.npz")
    back = LDSGroundTruth.load(tmp_path / "lds.npz")
    np.testing.assert_array_equal(back.masks, lds.masks)
    np.testing.assert_array_equal(back.values, lds.values)
    assert back.target == "margin"

    loo = LOOGroundTruth([5, 1], rng.normal(size=(2, 3)), target="loss", n_train=6)
    loo.save(tmp_path / "loo")
    back = load_ground_truth(tmp_path / "loo.npz")
    assert isinstance(back, LOOGroundTruth) and back.n_train == 6
    np.testing.assert_array_equal(back.indices, [5, 1])
    np.testing.assert_array_equal(back.values, loo.values)
    LOOGroundTruth([0, 1], np.zeros((2, 1))).save(tmp_path / "loo2.npz")
    assert LOOGroundTruth.load(tmp_path / "loo2.npz").n_train is None
    with pytest.raises(ValueError, match="not an LDSGroundTruth"):
        LDSGroundTruth.load(tmp_path / "loo.npz")


@pytest.mark.parametrize("kind", ["lds", "loo"])
def test_shared_base_saves_every_declared_field(tmp_path, kind):
    rng = np.random.RandomState(1)
    if kind == "lds":
        gt = LDSGroundTruth(rng.rand(5, 7) < 0.5, rng.normal(size=(5, 2)), target="margin")
    else:
        gt = LOOGroundTruth([6, 0, 3], rng.normal(size=(3, 2)), target="margin", n_train=7)
    assert isinstance(gt, _GroundTruth)
    gt.save(tmp_path / "gt.npz")
    with np.load(tmp_path / "gt.npz") as data:
        assert sorted(data.files) == sorted(["kind", "format_version", *gt._fields])
        assert str(data["kind"]) == kind and int(data["format_version"]) == 2
    for back in (load_ground_truth(tmp_path / "gt.npz"), type(gt).load(tmp_path / "gt.npz")):
        assert type(back) is type(gt) and repr(back) == repr(gt)
        for name in gt._fields:
            np.testing.assert_array_equal(getattr(back, name), getattr(gt, name))
    other = LOOGroundTruth if kind == "lds" else LDSGroundTruth
    with pytest.raises(ValueError, match=f"not an {other.__name__}"):
        other.load(tmp_path / "gt.npz")


def test_files_of_the_first_format_still_load(tmp_path):
    # written entry by entry as skdattri 0.1.0.dev0 (one ground_truth.py module) wrote them
    masks = np.array([[True, False, True], [False, True, True]])
    values = np.array([[0.5, -1.0], [0.25, 2.0]])
    np.savez(tmp_path / "lds.npz", kind=np.array("lds"), format_version=np.array(1),
             masks=masks, values=values, target=np.array("margin"))
    lds = load_ground_truth(tmp_path / "lds.npz")
    assert repr(lds) == "LDSGroundTruth(n_subsets=2, n_train=3, n_test=2, target='margin')"
    np.testing.assert_array_equal(lds.masks, masks)
    np.testing.assert_array_equal(lds.values, values)
    for n_train, expected in ((-1, None), (9, 9)):  # -1 stood for an unknown n_train
        np.savez(tmp_path / "loo.npz", kind=np.array("loo"), format_version=np.array(1),
                 indices=np.array([4, 1]), values=values, target=np.array("loss"),
                 n_train=np.array(n_train))
        loo = LOOGroundTruth.load(tmp_path / "loo.npz")
        assert loo.n_train == expected and loo.target == "loss"
        np.testing.assert_array_equal(loo.indices, [4, 1])
        assert loo.provenance is None  # version 1 had no provenance
    assert lds.provenance is None
    np.savez(tmp_path / "new.npz", kind=np.array("lds"), format_version=np.array(3),
             masks=masks, values=values, target=np.array("loss"))
    with pytest.raises(ValueError, match="format version 3"):
        load_ground_truth(tmp_path / "new.npz")
    np.savez(tmp_path / "odd.npz", kind=np.array("shapley"), values=values)
    with pytest.raises(ValueError, match="unknown ground-truth kind 'shapley'"):
        load_ground_truth(tmp_path / "odd.npz")
    np.savez(tmp_path / "plain.npz", values=values)
    with pytest.raises(ValueError, match="not a skdattri ground-truth file"):
        load_ground_truth(tmp_path / "plain.npz")


def test_container_errors():
    with pytest.raises(ValueError, match="'loss' or 'margin'"):
        LDSGroundTruth(np.ones((2, 3), bool), np.zeros((2, 1)), target="acc")
    with pytest.raises(ValueError, match="2 rows but there are 3 n_subsets"):
        LDSGroundTruth(np.ones((3, 3), bool), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        LDSGroundTruth(np.full((2, 3), 2), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="NaN"):
        LOOGroundTruth([0], [[np.nan]])
    with pytest.raises(ValueError, match="duplicates"):
        LOOGroundTruth([1, 1], np.zeros((2, 1)))
    with pytest.raises(ValueError, match="smaller than n_train=2"):
        LOOGroundTruth([0, 2], np.zeros((2, 1)), n_train=2)


# ---------------------------------------------------------------------------- targets
def test_classifier_targets_match_closed_forms(digits, binary_digits):
    X, y, Xq, yq = binary_digits
    model = _tight_lr().fit(X, y)
    decision = model.decision_function(Xq)
    signed = np.where(yq == 1, decision, -decision)  # log-odds of the query's label
    assert_scores_close(query_targets(model, Xq, yq, "margin"), signed, ulps=64)
    per_sample = [log_loss([t], model.predict_proba(x[None]), labels=[0, 1]) for x, t in zip(
        Xq, yq, strict=True)]
    assert_scores_close(query_targets(model, Xq, yq, "loss"), per_sample, ulps=16)
    assert_scores_close(query_targets(model, Xq, yq, "loss"), np.logaddexp(0, -signed), ulps=16)

    # multiclass with string labels, inside a pipeline
    Xd, yd = digits
    names = np.array(list("abcdefghij"))
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    pipe.fit(Xd[:300], names[yd[:300]])
    proba = pipe.predict_proba(Xd[300:320])
    col = yd[300:320]  # classes_ are sorted "a".."j", so the column is the digit
    p_y = proba[np.arange(20), col]
    assert_scores_close(query_targets(pipe, Xd[300:320], names[col], "loss"), -np.log(p_y),
                 ulps=16)
    # the reference is the less precise side: log1p(-p_y) loses digits as p_y -> 1
    assert_scores_close(query_targets(pipe, Xd[300:320], names[col], "margin"),
                 np.log(p_y) - np.log1p(-p_y), ulps=1024)


def test_targets_for_unseen_label_and_regressor():
    X = np.array([[0.0], [1.0], [2.0], [3.0]])
    model = LogisticRegression().fit(X, [0, 0, 1, 1])
    with pytest.warns(UserWarning, match="not seen"):
        loss = query_targets(model, X[:2], np.array([2, 0]), "loss")
    assert np.all(np.isfinite(loss)) and loss[0] > 100 > loss[1]

    reg = LinearRegression().fit(X, [1.0, 3.0, 5.0, 7.5])
    pred = reg.predict(X)
    y = np.array([0.0, 1.0, 2.0, 3.0])
    assert_scores_close(query_targets(reg, X, y, "margin"), pred, ulps=4)
    assert_scores_close(query_targets(reg, X, y, "loss"), (pred - y) ** 2, ulps=4)


# ---------------------------------------------------------------------------- exact LOO
def _influence_scores(model, X, y, Xq, yq, target):
    """First-order (influence-function) prediction of the LOO benefit, binary LR.

    sklearn minimises 0.5 |w|^2 + C sum_i loss_i (intercept not penalised), so removing
    sample j moves the optimum by about C H^{-1} g_j.
    """
    Xt, Xqt = np.c_[X, np.ones(len(X))], np.c_[Xq, np.ones(len(Xq))]
    p = model.predict_proba(X)[:, 1]
    H = model.C * (Xt * (p * (1 - p))[:, None]).T @ Xt + np.diag(np.r_[np.ones(X.shape[1]), 0])
    step = model.C * np.linalg.solve(H, ((p - y)[:, None] * Xt).T)  # (d+1, n_train)
    if target == "loss":  # benefit = rise of the query loss without j
        pq = model.predict_proba(Xq)[:, 1]
        return ((pq - yq)[:, None] * Xqt) @ step
    return -((2 * yq - 1)[:, None] * Xqt) @ step  # benefit = drop of the margin without j


@pytest.mark.parametrize("target", ["loss", "margin"])
def test_exact_loo_on_digits_agrees_with_closed_forms(binary_digits, target):
    X, y, Xq, yq = binary_digits
    gt = loo_ground_truth(_tight_lr(), X, y, Xq, yq, target=target, random_state=0)
    assert gt.values.shape == (len(X), len(Xq)) and gt.n_train == len(X)
    assert gt.target == target
    full = query_targets(_tight_lr().fit(X, y), Xq, yq, target)
    # removing any sample changes the model, hence every query's target, far above
    # the rounding error of the targets
    assert np.all(np.abs(gt.values).max(axis=1) > 1e-6 * np.abs(full).max())
    # each value is the difference of two independent fits
    for j in (0, 17, 99):
        keep = np.delete(np.arange(len(X)), j)
        without = query_targets(_tight_lr().fit(X[keep], y[keep]), Xq, yq, target)
        # a difference of two targets: rounding scales with the targets, not with it
        assert_scores_close(gt.values[j], without - full, ulps=64, scale=np.abs(full).max())
    # the sign convention: the closed-form influence (helpful > 0) correlates at ~1
    scores = _influence_scores(_tight_lr().fit(X, y), X, y, Xq, yq, target)
    assert loo_score(gt, scores) > 0.95
    assert loo_score(gt, -scores) < -0.95


def test_removing_nothing_changes_nothing_and_retraining_is_deterministic(digits):
    X, y = digits
    X, y, Xq, yq = X[:150], y[:150], X[150:170], y[150:170]
    est = LogisticRegression(max_iter=300)
    empty = np.zeros(0, dtype=np.int64)
    measure = Measure(query_targets, Xq, yq, "loss")
    t1 = fit_clone_and_apply(est, X, y, empty, 7, measure)
    t2 = fit_clone_and_apply(est, X, y, empty, 8, measure)
    direct = query_targets(LogisticRegression(max_iter=300).fit(X, y), Xq, yq, "loss")
    np.testing.assert_array_equal(t1, t2)
    assert_scores_close(t1, direct, ulps=64)

    idx = [0, 3, 40, 149]
    gt1 = loo_ground_truth(est, X, y, Xq, yq, indices=idx, random_state=0)
    gt2 = loo_ground_truth(est, X, y, Xq, yq, indices=idx, random_state=0, n_jobs=2)
    np.testing.assert_array_equal(gt1.values, gt2.values)
    np.testing.assert_array_equal(gt1.indices, idx)
    assert np.all(np.abs(gt1.values).max(axis=1) > 0)


def test_random_state_seeds_every_retrain():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(60, 3))
    y = (X[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(int)
    sgd = make_pipeline(StandardScaler(), SGDClassifier(loss="log_loss", max_iter=5, tol=None))
    kw = dict(n_subsets=4, random_state=3)
    with _no_warning():
        a = lds_ground_truth(sgd, X[:50], y[:50], X[50:], y[50:], **kw)
    b = lds_ground_truth(sgd, X[:50], y[:50], X[50:], y[50:], **kw)
    c = lds_ground_truth(sgd, X[:50], y[:50], X[50:], y[50:], n_subsets=4, random_state=4)
    r2 = lds_ground_truth(sgd, X[:50], y[:50], X[50:], y[50:], n_repeats=2, **kw)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.masks, r2.masks)  # subsets do not depend on n_repeats
    assert not np.array_equal(a.masks, c.masks)
    # the second seed trains differently
    assert np.abs(a.values - r2.values).max() > 1e-3 * np.abs(a.values).max()
    # the first subsets do not depend on n_subsets
    d = lds_ground_truth(sgd, X[:50], y[:50], X[50:], y[50:], n_subsets=2, random_state=3)
    np.testing.assert_array_equal(d.values, a.values[:2])
    assert np.all(a.masks.sum(axis=1) == 25)


def test_fitted_and_frozen_models_are_retrained(binary_digits):
    from sklearn.frozen import FrozenEstimator

    X, y, Xq, yq = binary_digits
    kw = dict(n_subsets=3, random_state=0)
    plain = lds_ground_truth(_tight_lr(), X, y, Xq, yq, **kw)
    fitted = _tight_lr().fit(X[:10], y[:10])
    frozen = lds_ground_truth(FrozenEstimator(fitted), X, y, Xq, yq, **kw)
    assert_scores_close(frozen.values, plain.values, ulps=64)
    assert fitted.coef_.shape == (1, X.shape[1])  # the given model is left alone
    # subsets do differ
    assert np.abs(plain.values[0] - plain.values[1]).max() > 1e-3 * np.abs(plain.values).max()


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_lds_ground_truth_with_influence_scores(binary_digits):
    X, y, Xq, yq = binary_digits
    gt = lds_ground_truth(_tight_lr(), X, y, Xq, yq, n_subsets=30, target="margin",
                          random_state=0, n_jobs=2)
    scores = _influence_scores(_tight_lr().fit(X, y), X, y, Xq, yq, "margin")
    assert lds_score(gt, scores) > 0.5
    assert lds_score(gt, -scores) < -0.5


# ---------------------------------------------------------------------------- memory
_STATE = {"fits": 0, "fail_at": None}


class CountingLogisticRegression(LogisticRegression):
    """Counts fits in this process; fails on fit number ``_STATE['fail_at']``."""

    def fit(self, X, y, sample_weight=None):
        _STATE["fits"] += 1
        if _STATE["fail_at"] is not None and _STATE["fits"] >= _STATE["fail_at"]:
            raise RuntimeError("simulated interruption")
        return super().fit(X, y, sample_weight=sample_weight)


def test_memory_resumes_without_refitting(tmp_path, digits):
    X, y = digits
    X, y, Xq, yq = X[:80], y[:80], X[80:90], y[80:90]
    est = CountingLogisticRegression(max_iter=200)
    kw = dict(n_subsets=5, n_repeats=2, random_state=0, memory=str(tmp_path), n_jobs=1)

    _STATE.update(fits=0, fail_at=7)  # interrupted during the 7th of 10 fits
    with pytest.raises(RuntimeError, match="simulated interruption"):
        lds_ground_truth(est, X, y, Xq, yq, **kw)
    _STATE.update(fits=0, fail_at=None)
    resumed = lds_ground_truth(est, X, y, Xq, yq, **kw)
    assert _STATE["fits"] == 10 - 6  # only the unfinished fits ran

    _STATE.update(fits=0)
    again = lds_ground_truth(est, X, y, Xq, yq, **kw)
    assert _STATE["fits"] == 0
    np.testing.assert_array_equal(again.values, resumed.values)

    _STATE.update(fits=0)
    fresh = lds_ground_truth(est, X, y, Xq, yq, **{**kw, "memory": None})
    assert _STATE["fits"] == 10
    np.testing.assert_array_equal(fresh.values, resumed.values)

    with pytest.warns(UserWarning, match="random_state=None"):
        lds_ground_truth(est, X, y, Xq, yq, n_subsets=2, memory=str(tmp_path / "x"))


def test_input_validation(digits):
    X, y = digits
    est = LogisticRegression()
    with pytest.raises(ValueError, match="subset_fraction"):
        lds_ground_truth(est, X[:5], y[:5], X[5:7], y[5:7], subset_fraction=0.05)
    with pytest.raises(ValueError, match="y_train has 4"):
        lds_ground_truth(est, X[:5], y[:4], X[5:7], y[5:7])
    with pytest.raises(ValueError, match="n_subsets"):
        lds_ground_truth(est, X[:5], y[:5], X[5:7], y[5:7], n_subsets=1)
    with pytest.raises(ValueError, match="target"):
        loo_ground_truth(est, X[:5], y[:5], X[5:7], y[5:7], target="accuracy")
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        loo_ground_truth(est, X[:5], y[:5], X[5:7], y[5:7], indices=[7])


# ---------------------------------------------------------------------------- backends
@pytest.mark.filterwarnings("ignore:.*not seen by a retrained model:UserWarning")
def test_dask_backend_matches_default(digits):
    pytest.importorskip("distributed")
    import joblib
    from distributed import Client, LocalCluster

    X, y = digits
    X, y, Xq, yq = X[:60], y[:60], X[60:70], y[60:70]
    est = LogisticRegression(max_iter=200)
    kw = dict(n_subsets=4, random_state=0)
    expected = lds_ground_truth(est, X, y, Xq, yq, **kw)
    with LocalCluster(
        n_workers=2, processes=False, threads_per_worker=1, dashboard_address=None
    ) as cluster, Client(cluster):
        with joblib.parallel_config(backend="dask"):
            got = lds_ground_truth(est, X, y, Xq, yq, **kw)
    np.testing.assert_array_equal(got.masks, expected.masks)
    assert_scores_close(got.values, expected.values, ulps=64)


def test_skorch_nets_are_seeded_and_leave_global_rng_alone():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(50, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    yr = X[:, :1] * 2.0

    def net(cls, **kw):
        module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                     torch.nn.Linear(8, kw.pop("out")))
        return cls(module, max_epochs=3, lr=0.1, batch_size=8, train_split=None,
                   verbose=0, **kw)

    clf = net(skorch.NeuralNetClassifier, out=2, criterion=torch.nn.CrossEntropyLoss)
    state = torch.random.get_rng_state()
    a = lds_ground_truth(clf, X[:40], y[:40], X[40:], y[40:], n_subsets=3, random_state=0)
    assert torch.equal(state, torch.random.get_rng_state())
    b = lds_ground_truth(clf, X[:40], y[:40], X[40:], y[40:], n_subsets=3, random_state=0)
    c = lds_ground_truth(clf, X[:40], y[:40], X[40:], y[40:], n_subsets=3, random_state=1)
    np.testing.assert_array_equal(a.values, b.values)
    assert np.abs(a.values - c.values).max() > 1e-3 * np.abs(a.values).max()
    assert not hasattr(clf, "module_")  # the given net is never fitted

    reg = net(skorch.NeuralNetRegressor, out=1)
    gt = loo_ground_truth(reg, X[:40], yr[:40], X[40:], yr[40:], indices=[0, 1],
                          target="margin", random_state=0, n_repeats=2)
    assert gt.values.shape == (2, 10) and np.all(np.isfinite(gt.values))
    assert np.abs(gt.values).max() > 0
