"""Ghost inner products equal explicit gradient inner products (float64), and TracIn
gives the same scores with ghost products on or off."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import skdattri.func.ghost as ghost_module
from skdattri import TracIn, config_context, get_config, set_config
from skdattri.datasets import CharTransformer
from skdattri.estimator_checks import assert_scores_close
from skdattri.func._grad import model_per_sample_grads
from skdattri.func.ghost import (
    GhostFeatures,
    ghost_gram,
    ghost_layout,
    ghost_row_dot,
    ghost_scale,
    ghost_sq_norms,
)
from skdattri.model import make_model
from skdattri.store import BaseStore

DT = torch.float64


def _close(actual, desired):
    atol = 512 * torch.finfo(DT).eps * float(desired.abs().max())
    torch.testing.assert_close(actual, desired, rtol=0, atol=atol)


class _ConvNet(nn.Module):
    """Conv2d (16 positions), bias-free Conv1d (14 positions), LayerNorm, Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.conv1d = nn.Conv1d(3, 2, 2, dilation=2, bias=False)
        self.norm = nn.LayerNorm(2 * 14)
        self.fc = nn.Linear(28, 4)

    def forward(self, x):
        z = torch.tanh(self.conv(x))
        z = torch.tanh(self.conv1d(z.flatten(2)))
        return self.fc(self.norm(z.flatten(1)))


class _NormMLP(nn.Module):
    """Linear -> LayerNorm (vmap fallback) -> Linear."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _seq_loss(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)


def _cases():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 3)).to(DT)
    gpt = CharTransformer(vocab_size=11, block_size=6, d_model=8, n_heads=2, n_layers=1,
                          d_ff=16, random_state=0).to(DT)
    return {
        "mlp": (mlp, "cross_entropy", torch.randn(11, 6, dtype=DT), torch.randint(0, 3, (11,))),
        "conv": (_ConvNet().to(DT), "cross_entropy", torch.randn(9, 1, 8, 8, dtype=DT),
                 torch.randint(0, 4, (9,))),
        "transformer": (gpt, _seq_loss, torch.randint(0, 11, (7, 6)),
                        torch.randint(0, 11, (7, 6))),
        "layernorm": (_NormMLP().to(DT), "cross_entropy", torch.randn(10, 6, dtype=DT),
                      torch.randint(0, 3, (10,))),
    }


CASES = _cases()
LAYERS = {"mlp": ["2"], "conv": ["conv.weight", "fc.bias", "norm"],
          "transformer": ["blocks", "head.weight"], "layernorm": ["fc1", "norm.bias"]}


def _rows(model, params, names, X, y, layout, batch_size):
    feats = GhostFeatures(model, layout)
    return torch.cat([feats(params, X[s:s + batch_size], y[s:s + batch_size], "loss")
                      for s in range(0, y.shape[0], batch_size)])


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("restrict", [False, True])
@pytest.mark.parametrize("ghost", ["auto", True])
def test_ghost_gram_equals_explicit_gram(case, restrict, ghost):
    module, loss, X, y = CASES[case]
    model = make_model(module, loss=loss)
    params = model.named_params()
    names = model.select(LAYERS[case]) if restrict else list(params)
    G = model_per_sample_grads(model, params, X, y, names=names, engine="vmap")
    layout = ghost_layout(model, params, names, X, ghost=ghost)
    assert layout.n_grad == G.shape[1]
    if ghost is True or case in ("mlp", "layernorm"):
        assert layout.ghost  # some layer really is scored from its factors
    ref = G @ G.T
    for batch_size in (2, 4, len(y)):
        R = _rows(model, params, names, X, y, layout, batch_size)
        assert R.shape == (len(y), layout.width)
        n_q = 3
        _close(ghost_gram(R[:n_q], R, layout), ref[:n_q])
        _close(ghost_gram(R, R, layout), ref)
        _close(ghost_sq_norms(R, layout), ref.diagonal())
        _close(ghost_row_dot(R, R.flip(0), layout), (G * G.flip(0)).sum(1))
        # a row scaled by s stands for s times the gradient
        s = torch.linspace(0.5, 2.0, len(y), dtype=DT)[:, None]
        _close(ghost_gram(ghost_scale(R, s, layout), R, layout), s * ref)
    assert float(ref.abs().max()) > 0


def test_layout_rule_materialises_convolutions_with_many_positions():
    module, loss, X, y = CASES["conv"]
    model = make_model(module, loss=loss)
    params = model.named_params()
    layout = ghost_layout(model, params, list(params), X)
    # conv: T=16, d_in=9, d_out=3: 16^2 * 12 >= 27 -> materialised; fc: 1 * 32 < 112 -> ghost
    assert [g[0] for g in layout.ghost] == ["fc"]
    assert sorted(d[0] for d in layout.dense) == ["conv", "conv1d"]
    assert layout.rest == ["norm.weight", "norm.bias"]
    forced = ghost_layout(model, params, list(params), X, ghost=True)
    assert sorted(g[0] for g in forced.ghost) == ["conv", "conv1d", "fc"]
    module, loss, X, y = CASES["mlp"]
    model = make_model(module, loss=loss)
    layout = ghost_layout(model, model.named_params(), list(model.named_params()), X)
    assert layout.width == (6 + 20) + (20 + 3) < layout.n_grad


def test_sequence_gram_in_blocks_of_train_rows(monkeypatch):
    module, loss, X, y = CASES["transformer"]
    model = make_model(module, loss=loss)
    params = model.named_params()
    G = model_per_sample_grads(model, params, X, y, engine="vmap")
    layout = ghost_layout(model, params, list(params), X, ghost=True)
    R = _rows(model, params, list(params), X, y, layout, 3)
    monkeypatch.setattr(ghost_module, "BLOCK_ELEMENTS", 40)  # 1 train row per block
    _close(ghost_gram(R, R, layout), G @ G.T)


# ----------------------------------------------------------------------------- TracIn
def _tracin_pair(net, X, y, Xq, yq, **kw):
    """(scores, self-influence, fitted) with ghost products forced on and off."""
    out = []
    for ghost in (True, False):
        with config_context(ghost=ghost):
            attr = TracIn(net, loss="cross_entropy", **kw).fit(X, y)
            assert (attr.ghost_layout_ is not None) is ghost
            out.append((attr.transform(Xq, yq), attr.self_influence(), attr))
    return out


@pytest.mark.parametrize("variant", ["grad_dot", "grad_cos", "tracincp", "margin"])
def test_tracin_same_scores_with_ghost_on_and_off(digits, make_mlp, variant):
    X, y, Xq, yq = digits
    net = make_mlp(seed=0)
    kw = {"grad_dot": {}, "grad_cos": {"normalize": True}, "margin": {"target": "margin"},
          "tracincp": {"checkpoints": [make_mlp(seed=1).state_dict(),
                                       make_mlp(seed=2).state_dict()],
                       "learning_rates": [0.3, 0.05]}}[variant]
    (S1, s1, a1), (S0, s0, _) = _tracin_pair(net, X, y, Xq, yq, batch_size=37, **kw)
    assert_scores_close(S1, S0)
    assert_scores_close(s1, s0)
    if variant != "margin":
        assert_scores_close(s1, np.diag(a1.transform(X, y)))
    if variant == "grad_cos":
        np.testing.assert_allclose(s1, 1.0, rtol=0, atol=1e-12)
    # batch_size does not change the ghost scores
    with config_context(ghost=True):
        S2 = TracIn(net, loss="cross_entropy", batch_size=200, **kw).fit(X, y).transform(Xq, yq)
    assert_scores_close(S2, S1)


def test_tracin_ghost_auto_is_the_default_for_an_mlp_and_off_with_projection(digits, make_mlp):
    X, y, Xq, yq = digits
    net = make_mlp()
    assert get_config()["ghost"] == "auto"
    attr = TracIn(net, loss="cross_entropy").fit(X[:40], y[:40])
    assert attr.ghost_layout_ is not None
    proj = TracIn(net, loss="cross_entropy", proj_dim=32, random_state=0).fit(X[:40], y[:40])
    assert proj.ghost_layout_ is None
    with config_context(grad_engine="vmap"):  # auto ghost needs the hook engine
        assert TracIn(net, loss="cross_entropy").fit(X[:40], y[:40]).ghost_layout_ is None


def test_tracin_ghost_on_a_disk_store_and_a_layer_norm_model(tmp_path):
    module, loss, X, y = CASES["layernorm"]
    Xq, yq = X[:4] + 0.1, y[:4]
    S0 = TracIn(module, loss=loss, batch_size=3).fit(X, y)
    with config_context(ghost=False):
        ref = TracIn(module, loss=loss, batch_size=3).fit(X, y)
    disk = TracIn(module, loss=loss, batch_size=3, store=str(tmp_path)).fit(X, y)
    assert S0.ghost_layout_.rest == ["norm.weight", "norm.bias"]
    for attr in (S0, disk):
        assert_scores_close(attr.transform(Xq, yq), ref.transform(Xq, yq))
        assert_scores_close(attr.self_influence(), ref.self_influence())


def _tensor_shapes(obj, seen=None):
    """Shapes of every tensor and store reachable from ``obj`` (fitted state)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [tuple(obj.shape)]
    if isinstance(obj, BaseStore):
        return [tuple(obj.shape)]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _tensor_shapes(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _tensor_shapes(v, seen)]
    if isinstance(obj, nn.Module):
        return [tuple(t.shape) for t in obj.state_dict().values()]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _tensor_shapes(vars(obj), seen)
    return []


def test_ghost_fit_holds_no_train_gradient_matrix(digits, make_mlp):
    X, y, _, _ = digits
    net = make_mlp()
    attr = TracIn(net, loss="cross_entropy", checkpoints=[net.state_dict()] * 2).fit(X, y)
    p = sum(t.numel() for t in net.parameters())
    shapes = _tensor_shapes({k: v for k, v in vars(attr).items() if k.endswith("_")})
    assert (len(y), attr.ghost_layout_.width) in shapes
    assert attr.ghost_layout_.width == (64 + 16) + (16 + 10) < p
    assert all(len(y) * p > int(np.prod(s)) for s in shapes)
    with config_context(ghost=False):  # the walk does see a materialised cache
        dense = TracIn(net, loss="cross_entropy").fit(X, y)
    assert (len(y), p) in _tensor_shapes(vars(dense))


# ------------------------------------------------------------------- TracInCPFast
def test_last_layer_tracin_is_captum_tracincp_fast(digits, make_mlp):
    X, y, Xq, yq = digits
    nets = [make_mlp(seed=s) for s in (0, 1)]
    lrs = [0.2, 0.7]
    kw = dict(loss="cross_entropy", checkpoints=[m.state_dict() for m in nets],
              learning_rates=lrs, batch_size=64)
    fast = TracIn(nets[0], layers="last", **kw).fit(X, y)
    assert fast.param_names_ == ["out.weight", "out.bias"]
    assert fast.ghost_layout_ is not None
    by_hand = TracIn(nets[0], layers=["out.weight", "out.bias"], **kw).fit(X, y)
    with config_context(ghost=False):
        dense = TracIn(nets[0], layers="out", **kw).fit(X, y)
    S = fast.transform(Xq, yq)
    assert_scores_close(S, by_hand.transform(Xq, yq))
    assert_scores_close(S, dense.transform(Xq, yq))

    def factors(m, X, y):  # Captum's: last-layer input and d loss / d logits
        X, y = torch.as_tensor(X), torch.as_tensor(y)
        with torch.no_grad():
            a = torch.tanh(m.hidden(X))
            g = torch.softmax(m.out(a), 1) - F.one_hot(y, 10).to(DT)
        return a, g

    captum = np.zeros_like(S)
    captum_weight_only = np.zeros_like(S)
    for lr, m in zip(lrs, nets):
        (aq, gq), (at, gt) = factors(m, Xq, yq), factors(m, X, y)
        A, Gd = (aq @ at.T).numpy(), (gq @ gt.T).numpy()
        captum += lr * (A + 1) * Gd
        captum_weight_only += lr * A * Gd
    assert_scores_close(S, captum)
    weight = TracIn(nets[0], layers="out.weight", **kw).fit(X, y)
    assert_scores_close(weight.transform(Xq, yq), captum_weight_only)
    assert_scores_close(fast.self_influence(), np.diag(fast.transform(X, y)))


def test_last_layer_needs_a_hookable_layer():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, x):
            return x * self.w

    X, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="layers='last' needs an nn.Linear"):
        TracIn(Scale(), loss="cross_entropy", layers="last").fit(X, y)


# ------------------------------------------------------------------------- config
def test_config_validation_and_context():
    with pytest.raises(ValueError, match="grad_engine must be one of"):
        set_config(grad_engine="fast")
    with pytest.raises(ValueError, match="ghost must be one of"):
        with config_context(ghost="yes"):
            pass
    with pytest.raises(TypeError, match="Unknown skdattri config"):
        with config_context(engine="vmap"):
            pass
    with config_context(grad_engine="vmap", ghost=False):
        assert get_config() == {"grad_engine": "vmap", "ghost": False}
        with config_context(ghost=True):
            assert get_config() == {"grad_engine": "vmap", "ghost": True}
    assert get_config() == {"grad_engine": "auto", "ghost": "auto"}
    set_config(ghost=False)
    try:
        assert get_config()["ghost"] is False
    finally:
        set_config(ghost="auto")


def test_grad_engine_config_is_read_by_auto(monkeypatch):
    import skdattri.func._grad as grad_module

    module, loss, X, y = CASES["mlp"]
    model = make_model(module, loss=loss)
    params = model.named_params()
    ref = model_per_sample_grads(model, params, X, y, engine="vmap")

    def refuse(*args, **kwargs):
        raise AssertionError("hook engine used")

    monkeypatch.setattr(grad_module, "hook_grads", refuse)
    with config_context(grad_engine="vmap"):
        _close(model_per_sample_grads(model, params, X, y), ref)
    with pytest.raises(AssertionError, match="hook engine used"):
        model_per_sample_grads(model, params, X, y)


class _EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.fc = nn.Linear(4 * 3, 5)

    def forward(self, x):
        return self.fc(self.emb(x).reshape(x.shape[0], -1))


def test_embedding_columns_come_from_the_same_pass_as_the_layer_factors():
    torch.manual_seed(0)
    model = make_model(_EmbeddingNet().to(DT), loss="cross_entropy")
    params = model.named_params()
    X, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 5, (6,))
    layout = ghost_layout(model, params, list(params), X, ghost=True)
    assert [g[0] for g in layout.ghost] == ["fc"] and layout.rest == ["emb.weight"]
    passes = []
    handle = model.module.register_forward_hook(lambda *args: passes.append(1))
    try:
        rows = GhostFeatures(model, layout)(params, X, y, "loss")
    finally:
        handle.remove()
    assert len(passes) == 1  # one forward (and backward) per batch, embeddings included
    G = model_per_sample_grads(model, params, X, y, engine="vmap")
    _close(rows[:, layout.rest_offset:], G[:, :params["emb.weight"].numel()])
