"""Adapters: the torch model reproduces the estimator, and its loss + L2 penalty is the
objective the estimator minimised (its gradient vanishes at the estimator's optimum)."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import (
    LinearRegression,
    LogisticRegression,
    Ridge,
    SGDClassifier,
    SGDRegressor,
)
from sklearn.metrics import log_loss
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from skdattri import TracIn
from skdattri.estimator_checks import assert_scores_close
from skdattri.model import make_model


def _objective_grad(model, X, y):
    """Gradient of mean_i loss_i + 0.5 * sum l2 ||theta||^2 at the model's parameters."""
    params = {k: v.clone().requires_grad_(True) for k, v in model.named_params().items()}
    Xt, yt = model.to_tensor_X(X), model.to_tensor_y(y)
    obj = model.value(model.forward(params, Xt), yt, "loss").mean()
    for name, p in params.items():
        obj = obj + 0.5 * (torch.as_tensor(model.l2.get(name, 0.0)) * p ** 2).sum()
    grads = torch.autograd.grad(obj, list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("C", [0.1, 10.0])
def test_logistic_multinomial_objective_and_outputs(digits, C):
    X, y, Xq, _ = digits
    lr = LogisticRegression(C=C, tol=1e-12, max_iter=5000).fit(X, y)
    model = make_model(lr, n_train=len(X))
    out = model.forward(model.named_params(), model.to_tensor_X(Xq)).numpy()
    assert_scores_close(out, lr.decision_function(Xq))
    per_sample = model.value(torch.tensor(lr.decision_function(X)), model.to_tensor_y(y), "loss")
    np.testing.assert_allclose(per_sample.mean().item(), log_loss(y, lr.predict_proba(X)),
                               rtol=1e-9)
    assert _objective_grad(model, X, y).abs().max() < 1e-6
    # a wrong penalty would leave a large gradient: check the test can fail
    model.l2["linear.weight"] *= 2
    assert _objective_grad(model, X, y).abs().max() > 1e-4


def test_logistic_binary_string_labels(digits):
    X, y, _, _ = digits
    m = y < 2
    Xb, yb = X[m], np.where(y[m] == 1, "b", "a")
    lr = LogisticRegression(C=0.5, tol=1e-12, max_iter=5000).fit(Xb, yb)
    model = make_model(lr, n_train=len(Xb))
    assert _objective_grad(model, Xb, yb).abs().max() < 1e-6
    with pytest.raises(ValueError, match="labels the model was not trained on"):
        model.to_tensor_y(np.array(["a", "zzz"]))


def test_ridge_and_linear_regression_objective():
    X, y = load_diabetes(return_X_y=True)
    for est in (Ridge(alpha=3.0), LinearRegression()):
        est.fit(X, y)
        model = make_model(est, n_train=len(X))
        out = model.forward(model.named_params(), model.to_tensor_X(X))
        assert_scores_close(out[:, 0].numpy(), est.predict(X))
        assert _objective_grad(model, X, y).abs().max() < 1e-6 * np.abs(y).max() ** 2


def test_sgd_models_reproduce_decision_function(digits):
    X, y, Xq, _ = digits
    for loss in ("log_loss", "hinge", "modified_huber"):
        sgd = SGDClassifier(loss=loss, random_state=0, max_iter=20, tol=None).fit(X, y)
        model = make_model(sgd, n_train=len(X))
        out = model.forward(model.named_params(), model.to_tensor_X(Xq)).numpy()
        assert_scores_close(out, sgd.decision_function(Xq))
    Xd, yd = load_diabetes(return_X_y=True)
    reg = SGDRegressor(random_state=0, max_iter=50).fit(Xd, yd)
    model = make_model(reg, n_train=len(Xd))
    out = model.forward(model.named_params(), model.to_tensor_X(Xd))[:, 0].numpy()
    assert_scores_close(out, reg.predict(Xd))


def test_mlp_classifier_objective_at_lbfgs_optimum(digits):
    X, y, Xq, _ = digits
    mlp = MLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", alpha=10.0, tol=1e-14,
                        max_iter=4000, max_fun=100_000, random_state=0).fit(X[:100], y[:100])
    model = make_model(mlp, n_train=100)
    out = model.forward(model.named_params(), model.to_tensor_X(Xq))
    assert_scores_close(torch.softmax(out, 1).numpy(), mlp.predict_proba(Xq))
    assert _objective_grad(model, X[:100], y[:100]).abs().max() < 2e-4
    model.l2 = {k: 2 * v for k, v in model.l2.items()}  # the check can fail
    assert _objective_grad(model, X[:100], y[:100]).abs().max() > 1e-2


def test_mlp_regressor_objective_at_lbfgs_optimum():
    X, y = load_diabetes(return_X_y=True)
    y = (y - y.mean()) / y.std()
    mlp = MLPRegressor(hidden_layer_sizes=(6,), solver="lbfgs", alpha=0.1, tol=1e-14, max_iter=5000,
                       max_fun=100_000, random_state=0).fit(X[:150], y[:150])
    model = make_model(mlp, n_train=150)
    out = model.forward(model.named_params(), model.to_tensor_X(X))[:, 0].numpy()
    assert_scores_close(out, mlp.predict(X))
    assert _objective_grad(model, X[:150], y[:150]).abs().max() < 1e-5


def test_pipeline_and_frozen_estimator(digits):
    X, y, Xq, _ = digits
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
    model = make_model(pipe, n_train=len(X))
    out = model.forward(model.named_params(), model.to_tensor_X(Xq)).numpy()
    assert_scores_close(out, pipe.decision_function(Xq))
    frozen = make_model(FrozenEstimator(pipe), n_train=len(X))
    torch.testing.assert_close(frozen.named_params(), model.named_params())


def test_skorch_default_nllloss_on_probabilities(digits):
    from skorch import NeuralNetClassifier

    X, y, Xq, yq = digits

    class Soft(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def forward(self, X):
            return torch.softmax(self.lin(X), dim=-1)

    torch.manual_seed(0)
    net = NeuralNetClassifier(Soft, max_epochs=3, train_split=None, verbose=0)
    net.fit(X.astype(np.float32), y)
    model = make_model(net)
    Xt, yt = model.to_tensor_X(Xq), model.to_tensor_y(yq)
    assert Xt.dtype == torch.float32
    out = model.forward(model.named_params(), Xt)
    assert_scores_close(out.detach().numpy(), net.predict_proba(Xq.astype(np.float32)))
    skorch_loss = net.get_loss(out, yt, training=False).item()
    assert_scores_close(model.value(out, yt, "loss").mean().item(), skorch_loss,
                        dtype=np.float32)
    np.testing.assert_array_equal(model.predict(model.named_params(), Xt).numpy(),
                                  net.predict(Xq.astype(np.float32)))


def test_skorch_regressor(digits):
    from skorch import NeuralNetRegressor

    X, _, _, _ = digits
    target = X[:, :2].sum(1, keepdims=True).astype(np.float32)
    torch.manual_seed(0)
    net = NeuralNetRegressor(nn.Linear, module__in_features=64, module__out_features=1,
                             max_epochs=3, train_split=None, verbose=0)
    net.fit(X.astype(np.float32), target)
    model = make_model(net)
    out = model.forward(model.named_params(), model.to_tensor_X(X))
    yt = model.to_tensor_y(target)
    assert_scores_close(model.value(out, yt, "loss").mean().item(), net.get_loss(out, yt).item(),
                        dtype=np.float32)
    assert model.task == "regression"


def test_errors(digits, make_mlp):
    X, y, _, _ = digits
    with pytest.raises(TypeError, match="Supported estimators"):
        make_model(KNeighborsClassifier().fit(X, y))
    with pytest.raises(ValueError, match="needs the loss= parameter"):
        make_model(make_mlp())
    with pytest.raises(NotFittedError):
        make_model(LogisticRegression())
    with pytest.raises(TypeError, match="Cannot attribute|Supported"):
        TracIn(KNeighborsClassifier()).fit(X, y)
    with pytest.raises(ValueError, match="matches no parameter"):
        TracIn(make_mlp(), loss="cross_entropy", layers="nope").fit(X, y)
    with pytest.raises(ValueError, match="'loss' parameter of TracIn"):
        TracIn(make_mlp(), loss="hinge_x").fit(X, y)
