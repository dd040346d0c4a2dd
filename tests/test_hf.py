"""A tiny Hugging Face GPT-2 (random init, a few training steps, nothing downloaded):
ModelOutput unwrapping, Conv1D layer hooks, and TracIn / TRAK / EK-FAC / LoGra on it."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from skdattri import TRAK, InfluenceFunction, LoGra, TracIn  # noqa: E402
from skdattri.datasets import VOCAB  # noqa: E402
from skdattri.datasets._text import _text_windows  # noqa: E402
from skdattri.func._grad import _hook_layers, model_per_sample_grads  # noqa: E402
from skdattri.func.hooks import LayerCapture, find_layers, per_sample_layer_grads  # noqa: E402
from skdattri.func.kfac import fit_ekfac, layer_grads_from_flat  # noqa: E402
from skdattri.model import make_model  # noqa: E402

N_TRAIN, BLOCK = 200, 16
QUERIES = [3, 50, 120, 201, 202]  # three training copies, two held-out windows


def _gpt2(seed=0):
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=len(VOCAB), n_positions=BLOCK,
        use_cache=False, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def trained():
    """The tiny GPT-2 after 30 Adam steps on the package's embedded character corpus."""
    windows, _ = _text_windows(BLOCK)
    X, y = windows[:N_TRAIN + 3, :-1].copy(), windows[:N_TRAIN + 3, 1:].copy()
    model = _gpt2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for _ in range(30):
        idx = torch.randint(0, N_TRAIN, (32,), generator=gen)
        logits = model(input_ids=Xt[idx]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(VOCAB)),
                                                 yt[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), X, y


def test_model_output_is_unwrapped(trained):
    module, X, _ = trained
    model = make_model(module, loss="cross_entropy")
    out = model.forward(model.named_params(), torch.as_tensor(X[:3]))
    assert isinstance(out, torch.Tensor) and out.shape == (3, BLOCK, len(VOCAB))
    pred = model.predict(model.named_params(), torch.as_tensor(X[:3]))
    assert pred.shape == (3, BLOCK)


def test_conv1d_hooks_equal_vmap_and_the_kfac_layout(trained):
    """GPT-2's Conv1D (weight stored (in, out)) is hooked: per-sample gradients equal
    vmap(grad) in float64, and K-FAC's per-layer blocks are the captured (out, in)
    gradients."""
    module = trained[0]
    module64 = _gpt2().double().eval()
    module64.load_state_dict(module.state_dict())
    X, y = torch.as_tensor(trained[1][:5]), torch.as_tensor(trained[2][:5])
    y[0, :4] = -100
    model = make_model(module64, loss="cross_entropy")
    params = model.named_params()
    names = list(params)
    hooked = _hook_layers(model, names)
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"} <= set(hooked)
    for what in ("loss", "neg_margin"):
        hooks = model_per_sample_grads(model, params, X, y, what, engine="hooks")
        vmap = model_per_sample_grads(model, params, X, y, what, engine="vmap")
        atol = 256 * torch.finfo(torch.float64).eps * float(vmap.abs().max())
        torch.testing.assert_close(hooks, vmap, rtol=0, atol=atol)
    layers = [(n, m) for n, m in find_layers(model.module) if n.startswith("transformer")]
    live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    factors = fit_ekfac(model.module, [(X, y)], layers=[n for n, _ in layers], random_state=0,
                        forward=lambda mod, x: model.forward(live, x))
    assert factors.weight_shapes["transformer.h.0.attn.c_attn"] == (48, 16)
    blocks = layer_grads_from_flat(factors, vmap, params)
    with torch.enable_grad(), LayerCapture(layers) as capture:
        losses = model.value(model.forward(live, X), y, "neg_margin")
        stats = capture.collect(losses.sum())
    for name, (a, g) in stats.items():
        torch.testing.assert_close(blocks[name], per_sample_layer_grads(a, g), rtol=0,
                                   atol=atol)


@pytest.mark.parametrize("method", ["grad-cos", "trak", "ekfac", "logra"])
def test_attributors_on_a_tiny_gpt2(trained, method):
    module, X, y = trained
    kw = dict(loss="cross_entropy", batch_size=64)
    attr = {
        "grad-cos": TracIn(module, normalize=True, **kw),
        "trak": TRAK(module, proj_dim=128, random_state=0, **kw),
        "ekfac": InfluenceFunction(module, solver="ekfac", regularization=1e-3,
                                   random_state=0, **kw),
        "logra": LoGra(module, proj_dim=64, random_state=0, **kw),
    }[method]
    attr.fit(X[:N_TRAIN], y[:N_TRAIN])
    S = attr.transform(X[QUERIES], y[QUERIES])
    assert S.shape == (len(QUERIES), N_TRAIN) and np.all(np.isfinite(S))
    # sign test: a training copy of a query is among its most helpful samples
    top = 0.01 if method == "grad-cos" else 0.05
    for row, j in enumerate(QUERIES[:3]):
        rank = int((S[row] > S[row, j]).sum())
        assert S[row, j] > 0 and rank < top * N_TRAIN, (method, j, rank)


def test_dict_inputs_with_an_attention_mask(trained):
    module, X, y = trained
    attr = TracIn(module, loss="cross_entropy", normalize=True, batch_size=64)
    S = attr.fit(X[:N_TRAIN], y[:N_TRAIN]).transform(X[QUERIES], y[QUERIES])
    ones = np.ones_like(X)
    attr_dict = TracIn(module, loss="cross_entropy", normalize=True, batch_size=64)
    attr_dict.fit({"input_ids": X[:N_TRAIN], "attention_mask": ones[:N_TRAIN]}, y[:N_TRAIN])
    S_dict = attr_dict.transform({"input_ids": X[QUERIES], "attention_mask": ones[QUERIES]},
                                 y[QUERIES])
    np.testing.assert_allclose(S_dict, S, rtol=0,
                               atol=1e3 * np.finfo(np.float32).eps * np.abs(S).max())


class _Mixer(torch.nn.Module):
    """Two layers applied to sequences: Hugging Face Conv1D, or nn.Linear when
    ``linear`` (weights transposed), so the two compute the same function."""

    def __init__(self, linear=False):
        super().__init__()
        torch.manual_seed(0)
        c1, c2 = transformers.pytorch_utils.Conv1D(8, 5), transformers.pytorch_utils.Conv1D(7, 8)
        torch.nn.init.normal_(c1.weight)
        torch.nn.init.normal_(c2.bias)
        if linear:
            l1, l2 = torch.nn.Linear(5, 8), torch.nn.Linear(8, 7)
            with torch.no_grad():
                for lin, conv in ((l1, c1), (l2, c2)):
                    lin.weight.copy_(conv.weight.T)
                    lin.bias.copy_(conv.bias)
            c1, c2 = l1, l2
        self.c1, self.c2 = c1, c2

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


@pytest.mark.parametrize("method", ["tracin", "ekfac", "logra"])
def test_conv1d_scores_equal_those_of_the_transposed_linear(method):
    """The transposed weight layout is handled everywhere: a Conv1D network scores as
    the same network written with nn.Linear (float64)."""
    rng = np.random.RandomState(0)
    X = rng.randn(40, 3, 5)
    y = rng.randint(0, 7, size=(40, 3))
    y[::5, 0] = -100
    scores = []
    for linear in (False, True):
        module = _Mixer(linear).double()
        kw = dict(loss="cross_entropy", batch_size=16)
        attr = {"tracin": TracIn(module, **kw),
                "ekfac": InfluenceFunction(module, solver="ekfac", random_state=0, **kw),
                "logra": LoGra(module, proj_dim=16, random_state=0, **kw)}[method]
        scores.append(attr.fit(X[:30], y[:30]).transform(X[30:], y[30:]))
    np.testing.assert_allclose(scores[0], scores[1], rtol=0,
                               atol=1e3 * np.finfo(np.float64).eps * np.abs(scores[1]).max())
    assert np.abs(scores[1]).max() > 0
