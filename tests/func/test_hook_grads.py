"""Hook-based per-sample gradients equal vmap(grad) (float64), on every supported layer."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skdattri import InfluenceFunction, TracIn
from skdattri.datasets import CharTransformer
from skdattri.func._grad import _hook_layers, model_per_sample_grads
from skdattri.model import make_model

DT = torch.float64


def _assert_same(a, b):
    atol = 256 * torch.finfo(DT).eps * float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.conv1d = nn.Conv1d(3, 2, 2, dilation=2, bias=False)
        self.norm = nn.LayerNorm(2 * 14)  # not hooked: vmap fallback
        self.fc = nn.Linear(28, 4)

    def forward(self, x):
        z = torch.tanh(self.conv(x))              # (n, 3, 4, 4)
        z = torch.tanh(self.conv1d(z.flatten(2)))  # (n, 2, 14)
        return self.fc(self.norm(z.flatten(1)))


def _seq_loss(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)


def _cases():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X = torch.randn(9, 6, dtype=DT)
    y = torch.randint(0, 3, (9,))
    conv = _ConvNet().to(DT)
    Xc = torch.randn(7, 1, 8, 8, dtype=DT)
    yc = torch.randint(0, 4, (7,))
    gpt = CharTransformer(vocab_size=11, block_size=6, d_model=8, n_heads=2, n_layers=1,
                          d_ff=16, random_state=0).to(DT)
    Xs = torch.randint(0, 11, (5, 6))
    ys = torch.randint(0, 11, (5, 6))
    return {"mlp": (mlp, "cross_entropy", X, y), "conv": (conv, "cross_entropy", Xc, yc),
            "transformer": (gpt, _seq_loss, Xs, ys)}


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("what", ["loss", "neg_margin"])
def test_hooks_equal_vmap(case, what):
    module, loss, X, y = CASES[case]
    model = make_model(module, loss=loss)
    params = model.named_params()
    names = list(params)
    hooks = model_per_sample_grads(model, params, X, y, what, names=names, engine="hooks")
    vmap = model_per_sample_grads(model, params, X, y, what, names=names, engine="vmap")
    assert hooks.shape == (len(y), sum(p.numel() for p in params.values()))
    _assert_same(hooks, vmap)
    assert float(vmap.abs().max()) > 0
    # the engine really took the hook path for the supported layers
    assert _hook_layers(model, names)


def test_hooks_with_a_subset_of_parameters_and_any_order():
    module, loss, X, y = CASES["conv"]
    model = make_model(module, loss=loss)
    params = model.named_params()
    names = ["fc.bias", "norm.weight", "conv.weight"]  # bias without its weight, fallback
    hooks = model_per_sample_grads(model, params, X, y, names=names, engine="hooks")
    vmap = model_per_sample_grads(model, params, X, y, names=names, engine="vmap")
    _assert_same(hooks, vmap)


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
def test_attributor_scores_do_not_depend_on_the_engine(digits, make_mlp, engine):
    X, y, Xq, yq = digits
    net = make_mlp(seed=0)
    kw = dict(loss="cross_entropy", batch_size=37)
    ref = TracIn(net, **kw).fit(X, y).transform(Xq, yq)  # auto: hooks for an MLP
    model = make_model(net, loss="cross_entropy")
    params = model.named_params()
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    G = model_per_sample_grads(model, params, Xt, yt, engine=engine)
    Q = model_per_sample_grads(model, params, torch.as_tensor(Xq), torch.as_tensor(yq),
                               engine=engine)
    expected = (Q @ G.T).numpy()
    np.testing.assert_allclose(ref, expected, rtol=0,
                               atol=256 * np.finfo(float).eps * np.abs(expected).max())
    S = InfluenceFunction(net, solver="cg", regularization=1e-2, **kw).fit(X, y)
    assert np.all(np.isfinite(S.transform(Xq, yq)))


class _EmbeddingNet(nn.Module):
    """Embedding -> tanh -> mean over positions -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(x)).mean(1))


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("names", [None, ["emb.weight"]])
def test_embedding_grads_from_hooks_equal_vmap(monkeypatch, padding_idx, names):
    import skdattri.func._grad as grad_module

    torch.manual_seed(0)
    module = _EmbeddingNet().to(DT)
    module.emb.padding_idx = padding_idx
    model = make_model(module, loss="cross_entropy")
    params = model.named_params()
    X, y = torch.randint(0, 7, (8, 5)), torch.randint(0, 3, (8,))
    vmap = model_per_sample_grads(model, params, X, y, names=names, engine="vmap")
    # the hook engine differentiates nothing by vmap here: every parameter is hooked
    monkeypatch.setattr(grad_module, "_vmap_grads", None)
    hooks = model_per_sample_grads(model, params, X, y, names=names)
    _assert_same(hooks, vmap)
    # rows of tokens a sample does not use (and the padding row) get no gradient
    emb = hooks[:, :28].reshape(8, 7, 4)
    unused = torch.ones(8, 7, dtype=torch.bool)
    unused[torch.arange(8)[:, None], X] = False
    if padding_idx is not None:
        unused[:, padding_idx] = True
    assert bool((emb[unused] == 0).all()) and float(emb.abs().max()) > 0


class _TiedNet(nn.Module):
    """Embedding whose weight is also the output layer's (weight tying, as GPT-2)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(1))


def test_tied_weights_are_not_taken_from_one_layer():
    torch.manual_seed(0)
    model = make_model(_TiedNet().to(DT), loss="cross_entropy")
    params = model.named_params()
    assert list(params) == ["emb.weight"]
    X, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 7, (6,))
    hooks = model_per_sample_grads(model, params, X, y, engine="hooks")
    vmap = model_per_sample_grads(model, params, X, y, engine="vmap")
    _assert_same(hooks, vmap)
