"""Every method with its defaults, and errors a user can act on (issue 10)."""

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neural_network import MLPClassifier

from skdattri import InfluenceFunction, TracIn, config_context
from skdattri._solvers import SOLVERS
from skdattri.func.hessian import hessian
from skdattri.model import make_model

SOLVER_NAMES = sorted(SOLVERS)


def _close(actual, desired, ulps=1e4):
    """Scores agree up to ``ulps`` float64 round-offs of the largest score."""
    atol = ulps * np.finfo(np.float64).eps * np.abs(desired).max()
    np.testing.assert_allclose(actual, desired, rtol=0, atol=atol)


def _quiet(attr, X, y, Xq, yq):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return attr.fit(X, y).transform(Xq, yq)


@pytest.fixture(scope="module")
def sk_mlp(digits):
    X, y, _, _ = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MLPClassifier(hidden_layer_sizes=(12,), max_iter=200, random_state=0).fit(X, y)


def _cached_grads(tracin, X, y):
    """Per-sample gradients as TracIn caches them (ghost products off: gradient rows)."""
    with config_context(ghost=False):
        return tracin.fit(X, y).train_grads_[0][:]


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("kind", ["skorch", "sklearn-mlp", "module"])
def test_every_solver_runs_with_its_defaults_on_networks(digits, skorch_net, sk_mlp,
                                                         make_mlp, kind, solver):
    X, y, Xq, yq = digits
    model, extra = {"skorch": (skorch_net, {}), "sklearn-mlp": (sk_mlp, {}),
                    "module": (make_mlp(seed=1), {"loss": "cross_entropy"})}[kind]
    attr = InfluenceFunction(model, solver=solver, regularization=1e-2, **extra)
    S = _quiet(attr, X[:80], y[:80], Xq[:4], yq[:4])
    assert S.shape == (4, 80) and np.all(np.isfinite(S)) and np.abs(S).max() > 0
    if solver in ("explicit", "cg", "lissa", "arnoldi"):
        assert attr.hessian_ == "ggn"


def test_auto_hessian_is_exact_on_convex_models_and_ggn_on_networks(digits, make_mlp):
    X, y, Xq, yq = digits
    lr = LogisticRegression(max_iter=500).fit(X, y)
    auto = InfluenceFunction(lr, solver="explicit", regularization=1e-3).fit(X, y)
    exact = InfluenceFunction(lr, solver="explicit", hessian="exact",
                              regularization=1e-3).fit(X, y)
    assert auto.hessian_ == "exact"
    _close(auto.transform(Xq, yq), exact.transform(Xq, yq), ulps=0)
    net = make_mlp(seed=2)
    kw = dict(solver="explicit", regularization=1e-2, loss="cross_entropy")
    auto = InfluenceFunction(net, **kw).fit(X[:60], y[:60])
    ggn = InfluenceFunction(net, hessian="ggn", **kw).fit(X[:60], y[:60])
    exact = InfluenceFunction(net, hessian="exact", regularization=10.0,
                              **{k: v for k, v in kw.items() if k != "regularization"})
    assert auto.hessian_ == "ggn"
    _close(auto.transform(Xq, yq), ggn.transform(Xq, yq), ulps=0)
    # the network's exact Hessian is another matrix (the default is not "exact")
    S_exact = exact.fit(X[:60], y[:60]).transform(Xq, yq)
    assert not np.allclose(S_exact, ggn.transform(Xq, yq))


@pytest.mark.parametrize("solver", ["explicit", "cg"])
def test_fisher_curvature_equals_the_dense_empirical_fisher(digits, make_mlp, solver):
    X, y, Xq, yq = digits
    X, y = X[:70], y[:70]
    net, damping = make_mlp(seed=3), 1e-2
    attr = InfluenceFunction(net, solver=solver, hessian="fisher", regularization=damping,
                             loss="cross_entropy", tol=1e-12, max_iter=2000, batch_size=16)
    S = attr.fit(X, y).transform(Xq, yq)
    G = _cached_grads(TracIn(net, loss="cross_entropy"), X, y)
    Q = _cached_grads(TracIn(net, loss="cross_entropy"), Xq, yq)
    F = G.T @ G / G.shape[0] + damping * torch.eye(G.shape[1], dtype=G.dtype)
    expected = (torch.linalg.solve(F, Q.T).T @ G.T).numpy()
    assert attr.hessian_ == "fisher"
    _close(S, expected, ulps=1e6 if solver == "cg" else 1e4)


def test_lissa_defaults_agree_with_explicit_on_digits_logistic_regression():
    """Spearman >= 0.95 against the explicit inverse at damping 1e-3 (measured 0.98)."""
    from skdattri.datasets import load_setting

    s = load_setting("digits-lr")
    X, y, Xq, yq = s.X_train, s.y_train, s.X_test[:20], s.y_test[:20]
    model = s.estimator.fit(X, y)
    exact = InfluenceFunction(model, solver="explicit", regularization=1e-3).fit(X, y)
    lissa = InfluenceFunction(model, solver="lissa", regularization=1e-3, random_state=0)
    S = _quiet(lissa, X, y, Xq, yq)
    rho = np.mean([spearmanr(a, b)[0] for a, b in zip(S, exact.transform(Xq, yq))])
    assert rho >= 0.95


def _dense_hessian(model, X, y):
    tm = make_model(model, n_train=len(X))
    params = tm.named_params()
    Xt, yt = tm.to_tensor_X(X), tm.to_tensor_y(y)
    loss_fn, _, _ = tm.curvature_functions({})
    l2 = {k: v for k, v in tm.l2.items() if k in params}
    return hessian(loss_fn, params, [(Xt, yt)], l2=l2)


@pytest.mark.parametrize("normalize", ["theta", "self", True])
def test_relatif_equals_its_closed_form_on_a_linear_model(digits, normalize):
    X, y, Xq, yq = digits
    X, y = X[:120], y[:120]
    model = LogisticRegression(max_iter=1000).fit(X, y)
    damping = 1e-2
    H = _dense_hessian(model, X, y) + damping * torch.eye(650, dtype=torch.float64)
    G = _cached_grads(TracIn(model), X, y)
    Q = _cached_grads(TracIn(model), Xq, yq)
    solved = torch.linalg.solve(H, G.T).T  # (n, p): H^-1 g_j
    plain = (torch.linalg.solve(H, Q.T).T @ G.T).numpy()
    if normalize == "theta":
        norms = torch.linalg.vector_norm(solved, dim=1).numpy()
    else:
        norms = torch.sqrt((solved * G).sum(1)).numpy()
    attr = InfluenceFunction(model, solver="explicit", regularization=damping,
                             normalize=normalize).fit(X, y)
    _close(attr.transform(Xq, yq), plain / norms[None, :])
    _close(attr.self_influence(), ((solved * G).sum(1)).numpy() / norms)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_multiclass_sgd_classifier_works_with_every_solver(digits, solver):
    X, y, Xq, yq = digits
    sgd = SGDClassifier(loss="log_loss", max_iter=50, tol=None, random_state=0).fit(X, y)
    attr = InfluenceFunction(sgd, solver=solver, regularization=1e-2)
    S = _quiet(attr, X[:60], y[:60], Xq[:3], yq[:3])
    assert S.shape == (3, 60) and np.all(np.isfinite(S))


# ----------------------------------------------------------------------------- errors


def test_wrong_number_of_features_for_a_torch_model(digits, make_mlp):
    X, y, Xq, yq = digits
    net = make_mlp(seed=0)
    with pytest.raises(ValueError, match="cannot be evaluated on X.*shape \\(50,\\)"):
        TracIn(net, loss="cross_entropy").fit(X[:, :50], y)
    with pytest.raises(ValueError, match="cannot be evaluated on X"):
        TracIn(net, loss="cross_entropy").fit(torch.as_tensor(X[:, :50]), y)
    attr = TracIn(net, loss="cross_entropy").fit(torch.as_tensor(X), y)
    with pytest.raises(ValueError, match="samples of shape \\(50,\\).*fitted on samples of "
                                         "shape \\(64,\\)"):
        attr.transform(torch.as_tensor(Xq[:, :50]), yq)
    numpy_fitted = TracIn(net, loss="cross_entropy").fit(X, y)
    with pytest.raises(ValueError, match="features"):
        numpy_fitted.transform(Xq[:, :50], yq)


def test_unseen_class_label_and_one_hot_labels(digits, make_mlp):
    X, y, Xq, yq = digits
    net = make_mlp(seed=0, n_out=10)
    bad = y.copy()
    bad[3] = 10
    with pytest.raises(ValueError, match="class label 10, but the model has 10 output"):
        TracIn(net, loss="cross_entropy").fit(X, bad)
    attr = TracIn(net, loss="cross_entropy").fit(X, y)
    with pytest.raises(ValueError, match="class label -1"):
        attr.transform(Xq, np.full(len(Xq), -1))
    one_hot = np.eye(10)[y]
    with pytest.raises(ValueError, match="one-hot labels pass y.argmax"):
        TracIn(net, loss="cross_entropy").fit(X, one_hot)
    lr = LogisticRegression(max_iter=200).fit(X, y)
    with pytest.raises(ValueError, match="one-hot labels pass y.argmax"):
        TracIn(lr).fit(X, one_hot)


@pytest.mark.parametrize("device, phrase", [("tpu", "not a device torch knows|not supported"),
                                            ("mps", "no MPS support|not available")])
def test_unavailable_devices(digits, device, phrase):
    X, y, _, _ = digits
    if device == "mps" and torch.backends.mps.is_available():  # pragma: no cover
        pytest.skip("this machine has MPS")
    lr = LogisticRegression(max_iter=200).fit(X, y)
    with pytest.raises(ValueError, match=phrase):
        TracIn(lr, device=device).fit(X, y)


def test_high_self_influence_flags_mislabelled_samples_for_every_attributor():
    """One convention: mislabel-detection AUC of self_influence() > 0.5 on digits-lr-noisy.

    Grad-Cos is left out: the cosine of a gradient with itself is 1 for every sample.
    """
    from skdattri import TRAK, KNNShapley, RepresenterPoints
    from skdattri.datasets import load_setting
    from skdattri.metrics import mislabel_auc_score

    s = load_setting("digits-lr-noisy", n_train=400)
    model = s.estimator.fit(s.X_train, s.y_train)
    attributors = [TracIn(model), TracIn(model, target="margin"), TRAK(model, random_state=0),
                   RepresenterPoints(model), KNNShapley(n_neighbors=5)]
    attributors += [InfluenceFunction(model, solver=solver, regularization=1e-3,
                                      random_state=0) for solver in SOLVER_NAMES]
    attributors.append(InfluenceFunction(model, solver="cg", regularization=1e-3,
                                         normalize="theta"))
    for attr in attributors:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            auc = mislabel_auc_score(s.is_noisy, attr.fit(s.X_train, s.y_train).self_influence())
        assert auc > 0.5, f"{attr!r}: AUC {auc:.3f}"
