"""LoGra / FactGraSS / GraSS against hand-written references (float64)."""

import numpy as np
import pytest
import torch
from torch import nn

from skdattri import InfluenceFunction, LoGra, TracIn
from skdattri.estimator_checks import assert_scores_close, check_attributor

DT = torch.float64


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.fc = nn.Linear(3 * 4 * 4, 10)

    def forward(self, x):
        x = x.reshape(x.shape[0], 1, 8, 8)
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).to(DT)


def _conv(seed=0):
    torch.manual_seed(seed)
    return _ConvNet().to(DT)


@pytest.fixture(scope="module")
def data(digits):
    X, y, Xq, yq = digits
    return X[:90], y[:90], Xq[:6], yq[:6]


def _layer_grads(module, X, y):
    """``{layer: (n, d_out, d_in + 1)}``: autograd per-sample gradients, bias last."""
    out = {}
    for i in range(len(y)):
        module.zero_grad()
        loss = nn.functional.cross_entropy(module(torch.as_tensor(X[i:i + 1])),
                                           torch.as_tensor(y[i:i + 1]))
        loss.backward()
        for name, mod in module.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                g = mod.weight.grad.reshape(mod.weight.shape[0], -1)
                g = torch.cat([g, mod.bias.grad[:, None]], dim=1)
                out.setdefault(name, []).append(g.clone())
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("make", [_mlp, _conv])
def test_identity_projections_give_the_gradient_inner_product(data, make):
    X, y, Xq, yq = data
    module = make()
    logra = LoGra(module, proj_dim=None, curvature=None, loss="cross_entropy",
                  batch_size=32).fit(X, y)
    tracin = TracIn(module, loss="cross_entropy", batch_size=32).fit(X, y)
    assert_scores_close(logra.transform(Xq, yq), tracin.transform(Xq, yq))
    assert_scores_close(logra.self_influence(), tracin.self_influence())


@pytest.mark.parametrize("make", [_mlp, _conv])
def test_projected_features_equal_kron_of_the_factor_matrices(data, make):
    X, y, _, _ = data
    module = make()
    attr = LoGra(module, proj_dim=16, loss="cross_entropy", random_state=0).fit(X, y)
    grads = _layer_grads(module, X[:5], y[:5])
    rows = attr.train_features_[0][0:5]
    start = 0
    for name, P in zip(attr.layer_names_, attr.projectors_):
        G = grads[name]
        P_in, P_out = P.in_projector.matrix(), P.out_projector.matrix()  # (d, k)
        expected = (P_out.T @ G @ P_in).reshape(5, -1)
        kron = torch.kron(P_out, P_in)  # row-major vec(G): kron(P_out, P_in)^T vec(G)
        assert_scores_close(expected, G.reshape(5, -1) @ kron)
        width = expected.shape[1]
        assert_scores_close(rows[:, start:start + width], expected)
        start += width
    assert start == rows.shape[1]


@pytest.mark.parametrize("factorized", [False, True])
def test_grass_and_factgrass_equal_their_projectors_on_autograd_gradients(data, factorized):
    X, y, _, _ = data
    module = _mlp()
    attr = LoGra(module, proj_dim=32, proj_type="grass", factorized=factorized,
                 loss="cross_entropy", random_state=0).fit(X, y)
    grads = _layer_grads(module, X[:4], y[:4])
    rows = attr.train_features_[0][0:4]
    start = 0
    for name, P in zip(attr.layer_names_, attr.projectors_):
        G = grads[name].reshape(4, -1)
        expected = G if P is None else P(G)  # both projectors also take the full gradient
        assert_scores_close(rows[:, start:start + expected.shape[1]], expected)
        start += expected.shape[1]
    if not factorized:  # GraSS: a random mask, then a sparse JL, on each layer gradient
        mask, sjlt = attr.projectors_[0].projectors_
        G = grads[attr.layer_names_[0]].reshape(4, -1)
        assert_scores_close(rows[:, :32], sjlt(G[:, mask.index] * mask.scale))


def test_full_curvature_without_projection_is_the_empirical_fisher_influence(data):
    X, y, Xq, yq = data
    module, lam = _mlp(), 1e-2
    logra = LoGra(module, proj_dim=None, curvature="full", regularization=lam,
                  loss="cross_entropy").fit(X, y)
    fisher = InfluenceFunction(module, solver="explicit", hessian="fisher", regularization=lam,
                               loss="cross_entropy").fit(X, y)
    assert_scores_close(logra.transform(Xq, yq), fisher.transform(Xq, yq), ulps=1e4)
    assert_scores_close(logra.self_influence(), fisher.self_influence(), ulps=1e4)


def test_layer_curvature_is_block_diagonal(data):
    X, y, Xq, yq = data
    module, lam = _mlp(), 1e-2
    attr = LoGra(module, proj_dim=None, curvature="layer", regularization=lam,
                 loss="cross_entropy").fit(X, y)
    Phi = attr.train_features_[0][:]
    Q = attr._feature_map()(attr._params_[0], torch.as_tensor(Xq), torch.as_tensor(yq), "loss")
    expected = torch.zeros(len(yq), len(y), dtype=DT)
    for b in attr.blocks_:
        F = Phi[:, b].T @ Phi[:, b] / len(y) + lam * torch.eye(b.stop - b.start, dtype=DT)
        expected += Q[:, b] @ torch.linalg.solve(F, Phi[:, b].T)
    assert len(attr.blocks_) == 2
    assert_scores_close(attr.transform(Xq, yq), expected.numpy(), ulps=1e4)


def test_auto_regularization_is_scale_invariant_and_the_contract_holds(data):
    X, y, Xq, yq = data
    module = _mlp()
    attr = LoGra(module, proj_dim=64, loss="cross_entropy", random_state=0)
    S = attr.fit(X, y).transform(Xq, yq)
    loss = nn.CrossEntropyLoss()

    def scaled_loss(out, t):  # every gradient x 10: auto damping follows, scores x 1
        return 10.0 * nn.functional.cross_entropy(out, t, reduction="none")

    scaled = LoGra(module, proj_dim=64, loss=scaled_loss, random_state=0).fit(X, y)
    assert_scores_close(scaled.transform(Xq, yq), S, ulps=1e5)
    assert_scores_close(scaled.regularization_, attr.regularization_ * 100, ulps=1e4)
    assert loss is not None
    check_attributor(LoGra(module, proj_dim=64, loss="cross_entropy", random_state=0),
                     X[:40], y[:40], Xq, yq, rtol=1e-9)


def test_checkpoints_are_averaged_and_disk_store_sharded_fit_match(data, tmp_path):
    X, y, Xq, yq = data
    a, b = _mlp(0), _mlp(1)
    states = [dict(a.named_parameters()), dict(b.named_parameters())]
    both = LoGra(a, proj_dim=64, checkpoints=states, loss="cross_entropy", random_state=0)
    S = both.fit(X, y).transform(Xq, yq)
    parts = [LoGra(a, proj_dim=64, checkpoints=[s], loss="cross_entropy",
                   random_state=0).fit(X, y).transform(Xq, yq) for s in states]
    assert_scores_close(S, (parts[0] + parts[1]) / 2)
    disk = LoGra(a, proj_dim=64, loss="cross_entropy", random_state=0, store=tmp_path,
                 batch_size=30)
    memory = LoGra(a, proj_dim=64, loss="cross_entropy", random_state=0, batch_size=30)
    np.testing.assert_array_equal(disk.fit(X, y).transform(Xq, yq),
                                  memory.fit(X, y).transform(Xq, yq))
    sharded = LoGra(a, proj_dim=64, loss="cross_entropy", random_state=0, batch_size=30,
                    n_jobs=2).fit(X, y)
    # the workers compute exactly the serial features; the parent's products then run
    # on n_jobs=2 torch threads, whose BLAS blocking rounds differently
    assert torch.equal(sharded.train_features_[0][:], memory.train_features_[0][:])
    assert_scores_close(sharded.transform(Xq, yq), memory.transform(Xq, yq))


def test_sequence_model_and_layer_selection(digits):
    from skdattri.datasets import CharTransformer

    gpt = CharTransformer(vocab_size=11, block_size=6, d_model=8, n_heads=2, n_layers=1,
                          d_ff=16, random_state=0)
    X = torch.randint(0, 11, (20, 6))
    y = torch.randint(0, 11, (20, 6))

    def seq_loss(out, t):
        return nn.functional.cross_entropy(out.transpose(1, 2), t, reduction="none").sum(1)

    attr = LoGra(gpt, proj_dim=16, loss=seq_loss, layers="head", random_state=0).fit(X, y)
    assert attr.layer_names_ == ["head"]
    S = attr.transform(X[:3], y[:3])
    assert S.shape == (3, 20) and np.all(np.isfinite(S))
    assert np.argmax(S[0]) == 0  # a training copy of a query is its most helpful sample
    with pytest.raises(ValueError, match="matches no parameter"):
        LoGra(gpt, loss=seq_loss, layers="nope").fit(X, y)
    with pytest.raises(ValueError, match="no nn.Linear, nn.Conv1d or nn.Conv2d"):
        LoGra(gpt, loss=seq_loss, layers="ln_f").fit(X, y)  # a parameter, not a layer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_accumulator_sums_row_blocks_over_tiles_and_flushes(monkeypatch, dtype):
    from skdattri import _utils
    from skdattri import logra as logra_module

    # tiles of 4 columns over blocks of 10 and 3 columns; a flush every 8 rows
    monkeypatch.setattr(_utils, "_GRAM_TILE", 4)
    monkeypatch.setattr(logra_module, "_GRAM_FLUSH_ROWS", 8)
    gen = torch.Generator().manual_seed(0)
    Phi = torch.randn(37, 13, generator=gen, dtype=torch.float64)
    blocks = [slice(0, 10), slice(10, 13)]
    acc = logra_module._GramAccumulator(blocks, active=True)
    for start in range(0, 37, 5):  # batches of 5 rows: flushes inside and at the end
        block = Phi[start:start + 5].to(dtype)
        assert acc.add(block) is block
    grams = acc.result()
    for b, gram in zip(blocks, grams):
        ref = Phi[:, b].T.to(dtype).double() @ Phi[:, b].to(dtype).double()
        assert gram.dtype == torch.float64
        assert torch.equal(gram, gram.T)  # mirrored from the upper tiles: exactly symmetric
        # float32 products of at most 8 rows, summed in float64
        assert_scores_close(gram, ref, dtype=str(dtype).split(".")[1], ulps=50,
                            scale=float(ref.abs().max()))
    assert logra_module._GramAccumulator(blocks, active=False).result() == [0.0, 0.0]


@pytest.mark.parametrize("curvature", ["layer", "full"])
def test_blocks_wider_than_the_training_set_use_woodbury(data, tmp_path, monkeypatch,
                                                         curvature):
    """A block of more columns than training rows is inverted through the rows' Gram:
    the same scores, self-influence and damping as the primal factor, on two
    checkpoints, from a disk store, with a fixed and the automatic damping."""
    import skdattri.logra as logra_module

    X, y, Xq, yq = data
    a, b = _mlp(0), _mlp(1)
    states = [dict(a.named_parameters()), dict(b.named_parameters())]
    for lam in ("auto", 1e-3):
        kw = dict(proj_dim=None, curvature=curvature, regularization=lam, checkpoints=states,
                  loss="cross_entropy", batch_size=40)
        dual = LoGra(a, store=tmp_path, **kw).fit(X, y)
        widths = [s.stop - s.start for s in dual.blocks_]
        kept = [f.shape[0] for f in dual.cholesky_factors_[0]]
        # 780 / 130 columns (layer) or 910 (full) for 90 rows: the wide blocks are dual
        assert kept == [len(y) if w > len(y) else w for w in widths]
        assert any(w > len(y) for w in widths)
        with monkeypatch.context() as m:
            m.setattr(logra_module, "_dual", lambda size, n: False)
            primal = LoGra(a, **kw).fit(X, y)
        assert [f.shape[0] for f in primal.cholesky_factors_[0]] == widths
        S = primal.transform(Xq, yq)
        assert_scores_close(dual.transform(Xq, yq), S, ulps=1e6)
        assert_scores_close(dual.self_influence(), primal.self_influence(), ulps=1e6)
        assert_scores_close(dual.regularization_, primal.regularization_, ulps=1e3)
        assert float(np.abs(S).max()) > 0
