"""RepresenterPoints: refit stationarity, representer decomposition, scores, contract."""

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier
from torch import nn

from skdattri.estimator_checks import assert_scores_close, check_attributor
from skdattri.representer import RepresenterPoints


def _softmax(Z):
    e = np.exp(Z - Z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _check_refit(attr, Phi, T, kind, lam):
    """Stationarity of the refit objective (numpy gradient at coef_), the representer
    values, and the decomposition of the refit pre-activations of the training set."""
    n = len(Phi)
    W = attr.coef_.numpy()
    Z = Phi @ W.T
    if kind == "softmax":
        dz = _softmax(Z) - T
    elif kind == "sigmoid":
        dz = 1.0 / (1.0 + np.exp(-Z)) - T
    else:
        dz = Z - T
    grad = dz.T @ Phi / n + 2 * lam * W
    assert np.abs(grad).max() < 1e-10 * max(1.0, np.abs(W).max())
    assert attr.stationarity_ < 1e-10
    alpha = -dz / (2 * lam * n)
    np.testing.assert_allclose(attr.alpha_.numpy(), alpha, rtol=1e-7, atol=1e-9 * abs(alpha).max())
    # representer theorem: W = sum_i alpha_i phi_i, hence z(x_j) = sum_i alpha_i phi_i . phi_j
    np.testing.assert_allclose(alpha.T @ Phi, W, rtol=1e-7, atol=1e-7 * np.abs(W).max())
    decomposed = (Phi @ Phi.T) @ alpha
    np.testing.assert_allclose(decomposed, Z, rtol=1e-7, atol=1e-7 * np.abs(Z).max())
    return Z


def test_decomposition_logistic_regression(digits):
    X, y, Xq, yq = digits
    model = LogisticRegression(max_iter=1000).fit(X, y)
    lam = 1e-3
    attr = RepresenterPoints(model, targets="model", regularization=lam,
                             batch_size=64).fit(X, y)
    Phi = np.c_[X, np.ones(len(X))]  # a linear model's features are its inputs
    np.testing.assert_array_equal(attr.train_features_.numpy(), Phi)
    assert attr.layer_name_ == "linear"
    T = model.predict_proba(X)  # the refit mimics the model's probabilities
    Z = _check_refit(attr, Phi, T, "softmax", lam)
    # the refit stays close to the model: same predictions on nearly all training rows
    assert np.mean(Z.argmax(1) == model.predict(X)) > 0.95
    # scores: S[i, j] = alpha_{j, y_i} phi_j . phi(x_i); rows sum to the query's class
    # pre-activation of the refit layer (the decomposition also holds for queries)
    S = attr.transform(Xq, yq)
    Phi_q = np.c_[Xq, np.ones(len(Xq))]
    alpha = attr.alpha_.numpy()
    expected = (Phi_q @ Phi.T) * alpha[:, yq].T
    assert_scores_close(S, expected)
    Zq = Phi_q @ attr.coef_.numpy().T
    np.testing.assert_allclose(S.sum(1), Zq[np.arange(len(yq)), yq], rtol=1e-7,
                               atol=1e-7 * np.abs(Zq).max())
    # without y: the model's predicted class
    pred = model.predict(Xq)
    assert_scores_close(attr.transform(Xq), (Phi_q @ Phi.T) * alpha[:, pred].T)
    # self-influence: own label, own features
    assert_scores_close(attr.self_influence(), alpha[np.arange(len(y)), y] * (Phi * Phi).sum(1))


def test_decomposition_mlp_features_from_the_penultimate_layer(digits, skorch_net):
    X, y, Xq, yq = digits
    lam = 1e-2
    attr = RepresenterPoints(skorch_net, targets="model", regularization=lam,
                             batch_size=48).fit(X, y)
    mod = skorch_net.module_
    with torch.no_grad():
        hidden = torch.tanh(mod.hidden(torch.as_tensor(X))).numpy()
        logits = mod(torch.as_tensor(X)).numpy()
    assert attr.layer_name_ == "out"
    Phi = np.c_[hidden, np.ones(len(X))]
    assert_scores_close(attr.train_features_.numpy(), Phi)
    _check_refit(attr, Phi, _softmax(logits), "softmax", lam)
    assert attr.n_iter_ > 0


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_decomposition_sklearn_mlp_float32_skorch_binary_and_regression(digits):
    X, y, _, _ = digits
    lam = 1e-3
    # sklearn MLP: the features are the last hidden layer's activations
    mlp = MLPClassifier((12,), max_iter=200, random_state=0).fit(X, y)
    attr = RepresenterPoints(mlp, targets="model", regularization=lam).fit(X, y)
    H = np.maximum(X @ mlp.coefs_[0] + mlp.intercepts_[0], 0.0)
    Phi = np.c_[H, np.ones(len(X))]
    assert_scores_close(attr.train_features_.numpy(), Phi)
    _check_refit(attr, Phi, mlp.predict_proba(X), "softmax", lam)
    # binary logistic regression: one logit, sigmoid targets
    yb = (y >= 5).astype(int)
    lr = LogisticRegression(max_iter=1000).fit(X, yb)
    attr = RepresenterPoints(lr, targets="model", regularization=lam).fit(X, yb)
    Phi = np.c_[X, np.ones(len(X))]
    _check_refit(attr, Phi, lr.predict_proba(X)[:, 1:], "sigmoid", lam)
    # regression: ridge refit in closed form
    yr = y.astype(float)
    ridge = Ridge(alpha=1.0).fit(X, yr)
    attr = RepresenterPoints(ridge, targets="model", regularization=lam).fit(X, yr)
    assert attr.n_iter_ == 0
    _check_refit(attr, Phi, ridge.predict(X)[:, None], "regression", lam)


def test_float32_network_is_refit_in_float64(digits, make_mlp):
    X, y, Xq, yq = digits
    mod = make_mlp(dtype=torch.float64).float()
    attr = RepresenterPoints(mod, loss="cross_entropy").fit(X, y)
    assert attr.train_features_.dtype == torch.float64 and attr.stationarity_ < 1e-10
    S = attr.transform(Xq, yq)
    assert S.dtype == np.float32
    ref = RepresenterPoints(make_mlp(dtype=torch.float64), loss="cross_entropy").fit(X, y)
    np.testing.assert_allclose(S, ref.transform(Xq, yq), rtol=1e-3,
                               atol=1e-4 * np.abs(S).max())


def test_signs_for_one_logit(digits):
    """One logit: the score of a query labelled 0 is minus the logit's term."""
    X, y, Xq, yq = digits
    yb, yqb = (y >= 5).astype(int), (yq >= 5).astype(int)
    attr = RepresenterPoints(LogisticRegression(max_iter=1000).fit(X, yb)).fit(X, yb)
    Phi, Phi_q = np.c_[X, np.ones(len(X))], np.c_[Xq, np.ones(len(Xq))]
    term = (Phi_q @ Phi.T) * attr.alpha_.numpy()[:, 0][None, :]
    assert_scores_close(attr.transform(Xq, yqb), np.where(yqb[:, None] == 1, term, -term))


def test_convergence_warning_and_errors(digits, make_mlp):
    X, y, _, _ = digits
    model = LogisticRegression(max_iter=1000).fit(X, y)
    with pytest.warns(ConvergenceWarning, match="L2 refit of the last layer"):
        RepresenterPoints(model, tol=0.0, max_iter=2).fit(X, y)
    with pytest.raises(ValueError, match="regularization"):
        RepresenterPoints(model, regularization=0.0).fit(X, y)

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(64, 10, dtype=torch.float64))

        def forward(self, X):
            return X @ self.w

    with pytest.raises(ValueError, match="has no nn.Linear"):
        RepresenterPoints(NoLinear(), loss="cross_entropy").fit(X, y)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64, dtype=torch.float64)

        def forward(self, X):
            return self.lin(self.lin(X))[:, :10]

    with pytest.raises(ValueError, match="ran 2 times"):
        RepresenterPoints(Twice(), loss="cross_entropy").fit(X, y)


def test_contract_checks(digits, skorch_net, make_mlp):
    """RepresenterPoints(LogisticRegression) goes through the checks in test_common.py."""
    X, y, Xq, yq = digits
    # the L-BFGS refit stops at max |gradient| < tol = 1e-10, which fixes W* (and the
    # scores) only to ~tol / (2 regularization) = 5e-8
    kw = dict(rtol=1e-6)
    check_attributor(RepresenterPoints(skorch_net), X[:40], y[:40], Xq[:9], yq[:9], **kw)
    check_attributor(RepresenterPoints(make_mlp(), loss="cross_entropy", regularization=1e-2),
                     X[:30], y[:30], Xq[:9], yq[:9], **kw)
    ridge = Ridge().fit(X, y.astype(float))
    # a regressor's representer score is the sample's share of the query's prediction
    # (alpha_j is its residual), not of its loss: a training copy of a query may lower it
    regression_sign = ("for a regressor the score is a share of the prediction, signed by "
                       "the training sample's residual, not a change of the query's loss")
    check_attributor(RepresenterPoints(ridge), X[:30], y[:30].astype(float), Xq[:9],
                     yq[:9].astype(float), expected_failed_checks={"check_sign": regression_sign},
                     **kw)



def test_label_targets_and_auto_regularization(digits):
    """Default refit: the training labels, lambda = 0.03 x the mean non-zero eigenvalue of
    Phi^T Phi / n; the self-influence is (1 - p*_y) ||phi||^2 / (2 lambda n) >= 0."""
    X, y, Xq, yq = digits
    model = LogisticRegression(max_iter=1000).fit(X, y)
    attr = RepresenterPoints(model, batch_size=64).fit(X, y)
    Phi = np.c_[X, np.ones(len(X))]
    n, d = Phi.shape
    lam = 0.03 * (Phi * Phi).sum() / (n * min(n, d))
    assert_scores_close(attr.regularization_, lam, ulps=64)
    Z = _check_refit(attr, Phi, np.eye(10)[y], "softmax", lam)
    p_label = _softmax(Z)[np.arange(n), y]
    expected = (1.0 - p_label) * (Phi * Phi).sum(1) / (2 * lam * n)
    # p* from a 1e-10-stationary refit
    assert_scores_close(attr.self_influence(), expected, ulps=1e6)
    assert attr.self_influence().min() >= 0
    # "auto" is the explicit lambda it reports
    S = attr.transform(Xq, yq)
    scaled = RepresenterPoints(model, regularization=lam).fit(X, y).transform(Xq, yq)
    assert_scores_close(S, scaled, ulps=1e6)


def test_layer_chooses_the_features(digits, make_mlp):
    """layer= names the nn.Linear whose inputs are the features; an earlier layer's
    refit starts from zero and mimics the model's outputs through a new linear map."""
    X, y, Xq, yq = digits
    mod = make_mlp()
    with torch.no_grad():
        hidden = torch.tanh(mod.hidden(torch.as_tensor(X))).numpy()
        logits = mod(torch.as_tensor(X)).numpy()
    last = RepresenterPoints(mod, loss="cross_entropy").fit(X, y)
    assert last.layer_name_ == "out"
    assert_scores_close(last.train_features_.numpy(), np.c_[hidden, np.ones(len(X))], ulps=16)
    first = RepresenterPoints(mod, loss="cross_entropy", layer="hidden", targets="model",
                              regularization=1e-2).fit(X, y)
    assert first.layer_name_ == "hidden"
    Phi = np.c_[X, np.ones(len(X))]
    np.testing.assert_array_equal(first.train_features_.numpy(), Phi)
    assert first.coef_.shape == (10, 65)
    _check_refit(first, Phi, _softmax(logits), "softmax", 1e-2)
    S = first.transform(Xq, yq)
    alpha = first.alpha_.numpy()
    assert_scores_close(S, (np.c_[Xq, np.ones(len(Xq))] @ Phi.T) * alpha[:, yq].T, ulps=64)
    with pytest.raises(ValueError, match=r"layer='fc1' is not a torch.nn.Linear of MLP; its "
                                         r"nn.Linear layers are \['hidden', 'out'\]"):
        RepresenterPoints(mod, loss="cross_entropy", layer="fc1").fit(X, y)


def test_self_influence_flags_mislabelled_samples():
    """High self-influence = mislabelled (digits-lr-noisy), and it is the diagonal of
    transform(X_train, y_train). Measured AUC (400 samples, 40 flipped): 0.97 with the
    default label targets; with the model's outputs as targets the order reverses (0.05),
    as documented."""
    from skdattri.datasets import load_setting
    from skdattri.metrics import mislabel_auc_score

    s = load_setting("digits-lr-noisy", n_train=400, n_test=10)
    model = s.estimator.fit(s.X_train, s.y_train)
    attr = RepresenterPoints(model).fit(s.X_train, s.y_train)
    self_inf = attr.self_influence()
    assert mislabel_auc_score(s.is_noisy, self_inf) > 0.9
    diag = np.diag(attr.transform(s.X_train, s.y_train))
    assert_scores_close(self_inf, diag, ulps=64)
    reverse = RepresenterPoints(model, targets="model").fit(s.X_train, s.y_train)
    assert mislabel_auc_score(s.is_noisy, reverse.self_influence()) < 0.1


def test_newton_and_lbfgs_refits_reach_the_same_optimum(digits, monkeypatch):
    import skdattri.representer as rep

    X, y, _, _ = digits
    model = LogisticRegression(max_iter=1000).fit(X, y)
    lam = 1e-3
    newton = RepresenterPoints(model, targets="model", regularization=lam).fit(X, y)
    assert newton.n_iter_ <= 20 and newton.stationarity_ < newton.tol
    monkeypatch.setattr(rep, "_NEWTON_SIZE", 0)                 # L-BFGS, then polished
    lbfgs = RepresenterPoints(model, targets="model", regularization=lam).fit(X, y)
    assert lbfgs.stationarity_ < lbfgs.tol
    # both stationary to tol on a 2 lam-strongly convex objective:
    # |W1 - W2| <= |g1 - g2| / (2 lam) <= sqrt(q) 2 tol / (2 lam)
    bound = np.sqrt(newton.coef_.numel()) * 2 * newton.tol / (2 * lam)
    np.testing.assert_allclose(newton.coef_.numpy(), lbfgs.coef_.numpy(), rtol=0, atol=bound)
