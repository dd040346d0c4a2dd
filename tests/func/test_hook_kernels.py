"""The hook engine's per-layer kernels (float64): every supported layer configuration
gives the per-sample gradients of ``vmap(grad)``, for several batch sizes, written
into the rows it is given."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import skdattri.func._grad as grad_module
from skdattri.func._grad import _hook_plan, model_per_sample_grads
from skdattri.model import make_model

DT = torch.float64


def _assert_same(a, b):
    atol = 256 * torch.finfo(DT).eps * float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


class _Conv(nn.Module):
    """One convolution, then a fixed nonlinear readout (the gradient depends on the
    sample's input and on its output gradient at every position)."""

    def __init__(self, conv, n_out):
        super().__init__()
        self.conv, self.fc = conv, nn.Linear(n_out, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


CONV2D = {
    "stride-pad": dict(kernel_size=3, stride=2, padding=1),
    "dilation-nobias": dict(kernel_size=(2, 3), dilation=(2, 1), padding=(1, 0), bias=False),
    "groups": dict(kernel_size=3, groups=2, padding=1),
    "depthwise": dict(kernel_size=3, groups=4, padding=1, bias=False, out_channels=8),
    "same-odd": dict(kernel_size=4, padding="same"),  # asymmetric zero padding
    "valid": dict(kernel_size=3, padding="valid", stride=(1, 2)),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(kernel_size=3, padding=2, padding_mode="circular", dilation=2),
    "replicate": dict(kernel_size=3, padding=1, padding_mode="replicate", stride=2),
}


def _conv_model(kind, spec, seed=0):
    torch.manual_seed(seed)
    spec = {"out_channels": 6, **spec}
    if kind == "2d":
        conv = nn.Conv2d(4, **spec)
        n_out = conv(torch.zeros(1, 4, 7, 6)).numel()
    else:
        conv = nn.Conv1d(4, **spec)
        n_out = conv(torch.zeros(1, 4, 9)).numel()
    return make_model(_Conv(conv, n_out).to(DT), loss="cross_entropy")


def _check(model, X, y, names=None, monkeypatch=None):
    """Hooks equal vmap(grad), written into the columns of ``rows`` only; with
    ``monkeypatch``, the hook engine must not call vmap(grad) at all."""
    params = model.named_params()
    plan = _hook_plan(model, list(params) if names is None else names)
    assert plan[0], "the layer under test must be hooked"
    vmap = model_per_sample_grads(model, params, X, y, names=names, engine="vmap")
    if monkeypatch is not None:
        monkeypatch.setattr(grad_module, "_vmap_grads", None)
    p = vmap.shape[1]
    out = torch.full((len(y), p + 3), float("nan"), dtype=DT)
    rows = out[:, 1:1 + p]  # rows of a wider block: the kernels write only their columns
    got = model_per_sample_grads(model, params, X, y, names=names, engine="hooks", out=rows)
    assert got is rows
    _assert_same(rows, vmap)
    assert float(vmap.abs().max()) > 0
    assert torch.isnan(out[:, 0]).all() and torch.isnan(out[:, -2:]).all()


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("spec", sorted(CONV2D))
def test_conv2d_configurations_equal_vmap(monkeypatch, spec, n):
    model = _conv_model("2d", CONV2D[spec])
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 4, 7, 6, dtype=DT, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    # the convolution is hooked: vmap(grad) runs for nothing (the Linear is hooked too)
    _check(model, X, y, monkeypatch=monkeypatch)


CONV1D = {
    "stride-dilation": dict(kernel_size=3, stride=2, dilation=2, padding=2),
    "groups-nobias": dict(kernel_size=2, groups=2, bias=False),
    "same-even": dict(kernel_size=4, padding="same"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
}


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("spec", sorted(CONV1D))
def test_conv1d_configurations_equal_vmap(spec, n):
    model = _conv_model("1d", CONV1D[spec])
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 4, 9, dtype=DT, generator=g)
    _check(model, X, torch.randint(0, 3, (n,), generator=g))


def test_conv_weight_only_and_bias_only():
    model = _conv_model("2d", CONV2D["groups"])
    X = torch.randn(5, 4, 7, 6, dtype=DT)
    y = torch.randint(0, 3, (5,))
    _check(model, X, y, names=["conv.bias", "fc.weight"])
    _check(model, X, y, names=["fc.bias", "conv.weight"])


class _Conv1D(nn.Module):
    """A duck-typed Hugging Face ``Conv1D``: ``y = x @ W + b``, ``W`` of shape
    ``(d_in, d_out)``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], self.nf)


_Conv1D.__name__ = "Conv1D"


class _Shared(nn.Module):
    """Layers called twice (weight sharing), on vectors and on sequences, a transposed
    ``Conv1D``, a convolution applied twice, and a layer the forward pass never calls."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.seq = nn.Linear(5, 4, bias=False)
        self.hf = _Conv1D(3, 4)
        self.conv = nn.Conv1d(3, 3, 2, padding=1)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):                       # x: (n, 6, 5)
        v = torch.tanh(self.lin(torch.tanh(self.lin(x[:, 0]))))  # (n, 5), twice
        s = torch.tanh(self.seq(x) + self.seq(v)[:, None])       # (n, 6, 4): T=6 and T=1
        h = torch.tanh(self.hf(s))                               # (n, 6, 3)
        z = self.conv(torch.tanh(self.conv(h.transpose(1, 2))))  # (n, 3, 8)
        return z.mean(2) + self.hf(s[:, 0])                      # (n, 3)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_shared_layers_sequences_and_transposed_weights_equal_vmap(monkeypatch, n):
    torch.manual_seed(1)
    model = make_model(_Shared().to(DT), loss="cross_entropy")
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 6, 5, dtype=DT, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    layers, _ = _hook_plan(model, list(model.named_params()))
    assert {"lin", "seq", "hf", "conv", "unused"} <= set(layers)
    _check(model, X, y, monkeypatch=monkeypatch)  # every layer is hooked
    # the layer that never ran gets zero gradients
    params = model.named_params()
    G = model_per_sample_grads(model, params, X, y, engine="hooks")
    assert float(G[:, -6:].abs().max()) == 0


class _Unbatched(nn.Module):
    """A linear layer applied to a tensor without the batch dimension (a learned
    position table), which the hooks cannot split per sample."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(6, 3))
        self.proj = nn.Linear(3, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):                        # x: (n, 6, 4)
        return self.fc(torch.tanh(x + self.proj(self.pos)).mean(1))


def test_layer_called_without_the_batch_falls_back_to_vmap():
    torch.manual_seed(2)
    model = make_model(_Unbatched().to(DT), loss="cross_entropy")
    X, y = torch.randn(5, 6, 4, dtype=DT), torch.randint(0, 2, (5,))
    _check(model, X, y)


def test_batch_size_does_not_change_the_gradients():
    model = _conv_model("2d", CONV2D["stride-pad"], seed=3)
    X = torch.randn(11, 4, 7, 6, dtype=DT)
    y = torch.randint(0, 3, (11,))
    params = model.named_params()
    full = model_per_sample_grads(model, params, X, y, engine="hooks")
    for size in (1, 4, 5):
        parts = torch.cat([model_per_sample_grads(model, params, X[s:s + size],
                                                  y[s:s + size], engine="hooks")
                           for s in range(0, 11, size)])
        _assert_same(parts, full)


def test_float32_matches_float64():
    model = _conv_model("2d", CONV2D["groups"], seed=4)
    X = torch.randn(6, 4, 7, 6, dtype=DT)
    y = torch.randint(0, 3, (6,))
    params = model.named_params()
    ref = model_per_sample_grads(model, params, X, y, engine="hooks")
    model.module.float()
    p32 = model.named_params()
    got = model_per_sample_grads(model, p32, X.float(), y, engine="hooks")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0,
                               atol=1e3 * torch.finfo(torch.float32).eps * float(ref.abs().max()))


def test_functional_reference_for_one_grouped_convolution():
    """Closed form for one sample: the weight gradient of ``sum(conv(x) * c)`` is the
    correlation of ``x`` with ``c``, group by group."""
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, groups=2, stride=2, padding=1).to(DT)
    x = torch.randn(3, 4, 7, 6, dtype=DT)
    c = torch.randn(3, 6, 4, 3, dtype=DT)

    class _Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return x

    model = make_model(_Lin(), loss="mse")
    model.module.conv = conv
    # explicit per-sample loop (the oracle): autograd on one sample at a time
    expected = []
    for i in range(3):
        w = conv.weight.detach().clone().requires_grad_(True)
        out = F.conv2d(x[i:i + 1], w, None, stride=2, padding=1, groups=2)
        expected.append(torch.autograd.grad((out * c[i:i + 1]).sum(), w)[0].reshape(-1))
    expected = torch.stack(expected)
    from skdattri.func._hook_kernels import per_sample_call

    rows = torch.empty(3, conv.weight.numel(), dtype=DT)
    per_sample_call(3, conv, x, c, rows.view(3, *conv.weight.shape), None, False, first=True)
    _assert_same(rows, expected)
    per_sample_call(3, conv, x, c, rows.view(3, *conv.weight.shape), None, False, first=False)
    _assert_same(rows, 2 * expected)


def test_vmap_engine_writes_into_the_given_rows():
    """``engine="vmap"`` with ``out`` copies each parameter's gradients into its columns
    (no concatenated copy first) and leaves the rest of the block alone."""
    torch.manual_seed(6)
    model = make_model(_Unbatched().to(DT), loss="cross_entropy")
    params = model.named_params()
    X, y = torch.randn(4, 6, 4, dtype=DT), torch.randint(0, 2, (4,))
    names = ["fc.weight", "pos", "proj.bias"]  # any order
    ref = model_per_sample_grads(model, params, X, y, names=names, engine="vmap")
    out = torch.full((4, ref.shape[1] + 2), float("nan"), dtype=DT)
    got = model_per_sample_grads(model, params, X, y, names=names, engine="vmap",
                                 out=out[:, 1:-1])
    assert got.data_ptr() == out[:, 1:-1].data_ptr()
    _assert_same(out[:, 1:-1], ref)
    assert torch.isnan(out[:, 0]).all() and torch.isnan(out[:, -1]).all()
    # the same columns as the per-parameter gradients of an explicit per-sample loop
    live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    for i in range(4):
        loss = F.cross_entropy(torch.func.functional_call(model.module, live, (X[i:i + 1],)),
                               y[i:i + 1])
        row = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            loss, [live[k] for k in names])])
        _assert_same(ref[i], row)
