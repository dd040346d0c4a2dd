"""Per-sample gradients against a plain autograd loop (float64, tight tolerance)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from skdattri import TracIn, config_context
from skdattri.estimator_checks import assert_scores_close
from skdattri.func import flatten_tree, linear_per_sample_grad, per_sample_grad
from skdattri.model import make_model


def _loop_grads(module_params, loss_of_sample, n):
    """Reference: one backward pass per sample."""
    rows = []
    for i in range(n):
        for p in module_params:
            p.grad = None
        loss_of_sample(i).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in module_params]))
    return torch.stack(rows)


def _train_grads(estimator, X, y, batch_size, **kw):
    with config_context(ghost=False):  # cache the gradients themselves, not factors
        attr = TracIn(estimator, batch_size=batch_size, device="cpu", **kw).fit(X, y)
    return attr.train_grads_[0][:].numpy()


@pytest.mark.parametrize("batch_size", [1, 7, 10_000])
def test_logistic_multinomial_matches_autograd_loop(digits, batch_size):
    X, y, _, _ = digits
    X, y = X[:60], y[:60]
    lr = LogisticRegression(max_iter=300).fit(X, y)
    W = torch.tensor(lr.coef_, requires_grad=True)
    b = torch.tensor(lr.intercept_, requires_grad=True)
    Xt = torch.tensor(X)
    yt = torch.tensor(np.searchsorted(lr.classes_, y))

    def loss(i):
        return F.cross_entropy((Xt[i] @ W.T + b)[None], yt[i:i + 1])

    ref = _loop_grads([W, b], loss, len(X)).numpy()
    got = _train_grads(lr, X, y, batch_size)
    assert_scores_close(got, ref)


def test_logistic_binary_matches_autograd_loop(digits):
    X, y, _, _ = digits
    mask = y < 2
    X, y = X[mask][:50], np.where(y[mask] == 1, "one", "zero")[:50]
    lr = LogisticRegression(max_iter=300).fit(X, y)
    w = torch.tensor(lr.coef_[0], requires_grad=True)
    b = torch.tensor(lr.intercept_, requires_grad=True)
    Xt = torch.tensor(X)
    yt = torch.tensor((y == lr.classes_[1]).astype(np.float64))

    def loss(i):
        z = Xt[i] @ w + b
        return F.binary_cross_entropy_with_logits(z, yt[i:i + 1])

    ref = _loop_grads([w, b], loss, len(X)).numpy()
    for bs in (1, 7, 50):
        assert_scores_close(_train_grads(lr, X, y, bs), ref)


@pytest.mark.parametrize("batch_size", [1, 7, 10_000])
def test_skorch_mlp_matches_autograd_loop(digits, skorch_net, batch_size):
    X, y, _, _ = digits
    X, y = X[:40], y[:40]
    module = skorch_net.module_
    params = [p for p in module.parameters()]
    Xt, yt = torch.tensor(X), torch.tensor(y)

    def loss(i):
        return skorch_net.criterion_(module(Xt[i:i + 1]), yt[i:i + 1])

    ref = _loop_grads(params, loss, len(X)).numpy()
    got = _train_grads(skorch_net, X, y, batch_size)
    assert_scores_close(got, ref)


@pytest.mark.parametrize("batch_size", [1, 7, 10_000])
def test_nn_module_matches_autograd_loop_with_layers(digits, make_mlp, batch_size):
    X, y, _, _ = digits
    X, y = X[:30], y[:30]
    module = make_mlp()
    Xt, yt = torch.tensor(X), torch.tensor(y)

    def loss(i):
        return F.cross_entropy(module(Xt[i:i + 1]), yt[i:i + 1])

    ref = _loop_grads(list(module.parameters()), loss, len(X)).numpy()
    got = _train_grads(module, X, y, batch_size, loss="cross_entropy")
    assert_scores_close(got, ref)
    # layers= keeps only the matching parameters (out.weight, out.bias are last)
    n_out = module.out.weight.numel() + module.out.bias.numel()
    got_out = _train_grads(module, X, y, batch_size, loss="cross_entropy", layers="out")
    assert_scores_close(got_out, ref[:, -n_out:])


def test_sklearn_mlp_matches_autograd_loop(digits):
    X, y, _, _ = digits
    X, y = X[:40], y[:40]
    mlp = MLPClassifier(hidden_layer_sizes=(12,), max_iter=50, random_state=0).fit(X, y)
    Ws = [torch.tensor(W.T, requires_grad=True) for W in mlp.coefs_]
    bs = [torch.tensor(b, requires_grad=True) for b in mlp.intercepts_]
    Xt = torch.tensor(X)
    yt = torch.tensor(np.searchsorted(mlp.classes_, y))

    def loss(i):
        h = torch.relu(Xt[i] @ Ws[0].T + bs[0])
        return F.cross_entropy((h @ Ws[1].T + bs[1])[None], yt[i:i + 1])

    ref = _loop_grads([Ws[0], bs[0], Ws[1], bs[1]], loss, len(X)).numpy()
    assert_scores_close(_train_grads(mlp, X, y, 7), ref)


def test_float32_model_gives_float32_gradients(digits, make_mlp):
    X, y, _, _ = digits
    module = make_mlp(dtype=torch.float32)
    G = _train_grads(module, X[:20], y[:20], 8, loss="cross_entropy")
    assert G.dtype == np.float32


def test_per_sample_grad_kernel_and_linear_closed_form_agree():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    params = {"weight": torch.randn(3, 4, generator=g, dtype=torch.float64),
              "bias": torch.randn(3, generator=g, dtype=torch.float64)}

    def f(p, Xb, yb):
        return F.cross_entropy(Xb @ p["weight"].T + p["bias"], yb, reduction="none")

    vm = flatten_tree(per_sample_grad(f, params, X, y), n=9)
    z = (X @ params["weight"].T + params["bias"]).requires_grad_(True)
    (dz,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)
    assert_scores_close(linear_per_sample_grad(X, dz), vm)


def test_margin_gradient_matches_definition(digits):
    X, y, _, _ = digits
    lr = LogisticRegression(max_iter=300).fit(X[:80], y[:80])
    model = make_model(lr, n_train=80)
    params = model.named_params()
    Xt, yt = torch.tensor(X[:5]), torch.tensor(y[:5])
    out = model.forward(params, Xt)
    p = torch.softmax(out, 1).gather(1, yt[:, None])[:, 0]
    assert_scores_close(model.value(out, yt, "margin").numpy(), torch.log(p / (1 - p)).numpy(),
                        rtol=1e-10)
