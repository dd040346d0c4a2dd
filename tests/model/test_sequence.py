"""Token classifiers: (n, T, vocab) outputs with (n, T) targets, -100 ignored (issue 13)."""

import numpy as np
import pytest
import torch
from skorch import NeuralNet
from torch import nn

from skdattri import TRAK, TracIn
from skdattri.datasets import CharTransformer, SequenceCrossEntropy
from skdattri.estimator_checks import assert_scores_close
from skdattri.model import make_loss, make_model

DT = torch.float64
EPS = np.finfo(np.float64).eps


def _close(actual, ref, k=64):
    ref = np.asarray(ref, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(actual), ref, rtol=0,
                               atol=k * EPS * max(1.0, np.abs(ref).max()))


def _token_data(seed=0, n=6, T=5, V=7):
    rng = np.random.RandomState(seed)
    Z = rng.randn(n, T, V) * 2.0
    y = rng.randint(0, V, size=(n, T))
    y[0, 1] = y[2, 4] = y[3, 0] = -100
    y[5, :] = -100  # a sequence with no token that counts
    return Z, y


def _reference(Z, y):
    """Per-token float64 reference, one token at a time: summed CE, summed log-odds
    log p - log(1 - p), mean (1 - p), argmax predictions."""
    n, T, _ = Z.shape
    loss, margin, q = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        counted = 0
        for t in range(T):
            if y[i, t] == -100:
                continue
            e = np.exp(Z[i, t] - Z[i, t].max())
            p = e[y[i, t]] / e.sum()
            loss[i] -= np.log(p)
            margin[i] += np.log(p) - np.log1p(-p)
            q[i] += 1.0 - p
            counted += 1
        q[i] = q[i] / counted if counted else 0.0
    return loss, margin, q, Z.argmax(-1)


@pytest.mark.parametrize("how", ["string", "criterion"])
def test_token_loss_margin_and_predictions_match_a_per_token_reference(how):
    Z, y = _token_data()
    loss = make_loss("cross_entropy" if how == "string" else nn.CrossEntropyLoss())
    out, t = torch.tensor(Z, dtype=DT), torch.tensor(y)
    ref_loss, ref_margin, ref_q, ref_pred = _reference(Z, y)
    _close(loss.loss(out, t), ref_loss)
    _close(loss.margin(out, t), ref_margin)
    _close(loss.margin_weights(out, t), ref_q)
    np.testing.assert_array_equal(loss.predict(out).numpy(), ref_pred)
    assert float(loss.loss(out, t)[5]) == 0.0 and float(loss.margin(out, t)[5]) == 0.0
    # a torch loss module, summed over tokens: what the vocabulary's loss is
    torch_sum = nn.CrossEntropyLoss(reduction="sum")
    assert float(loss.loss(out, t).sum()) == pytest.approx(
        float(torch_sum(out.reshape(-1, 7), t.reshape(-1))), rel=1e-12)
    # sampled targets: one token per position, in the vocabulary
    sampled = loss.sample_targets(out, torch.Generator().manual_seed(0))
    assert sampled.shape == t.shape and int(sampled.min()) >= 0 and int(sampled.max()) < 7
    kept = loss.sample_targets(out, torch.Generator().manual_seed(0), t)  # padding stays
    np.testing.assert_array_equal(kept.numpy() == -100, y == -100)
    np.testing.assert_array_equal(kept.numpy()[y != -100], sampled.numpy()[y != -100])


def test_check_targets_accepts_token_ids_and_ignored_positions():
    Z, y = _token_data()
    loss, out = make_loss("cross_entropy"), torch.tensor(Z[:2])
    loss.check_targets(out, torch.tensor(y))  # (n, T) with -100: accepted
    with pytest.raises(ValueError, match=r"one token id per position, y of shape"):
        loss.check_targets(out, torch.tensor(y[:, :4]))
    with pytest.raises(ValueError, match=r"one token id per position"):
        loss.check_targets(out, torch.tensor(y[:, 0]))  # one label per sequence
    # (n, 1, k) outputs with (n,) labels stay an ordinary classifier
    single = torch.tensor(Z[:, :1])
    loss.check_targets(single, torch.tensor([0, 1, 2, 3, 4, 5]))
    np.testing.assert_array_equal(loss.predict(single).numpy(), Z[:, 0].argmax(-1))
    bad = y.copy()
    bad[1, 1] = 7
    with pytest.raises(ValueError, match="token id 7, but the model has 7 output"):
        loss.check_targets(out, torch.tensor(bad))
    bad[1, 1] = -3
    with pytest.raises(ValueError, match="token id -3"):
        loss.check_targets(out, torch.tensor(bad))


class _Structured(nn.Module):
    """A token model whose outputs are wrapped: a dict, a tuple or an object with .logits."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.emb = nn.Embedding(9, 6)
        self.head = nn.Linear(6, 9)

    def forward(self, input_ids, attention_mask=None):
        logits = self.head(torch.tanh(self.emb(input_ids)))
        if attention_mask is not None:
            logits = logits * attention_mask[..., None]
        if self.kind == "dict":
            return {"loss": None, "logits": logits, "hidden": logits.detach()}
        if self.kind == "tuple":
            return logits, logits.detach()
        if self.kind == "object":
            return type("Output", (), {"logits": logits})()
        return logits


def test_structured_outputs_are_unwrapped_and_dict_inputs_batch():
    rng = np.random.RandomState(0)
    X = rng.randint(0, 9, size=(30, 4))
    y = rng.randint(0, 9, size=(30, 4))
    y[::3, 0] = -100
    ref = TracIn(_Structured("plain").double(), loss="cross_entropy").fit(X[:20], y[:20])
    S = ref.transform(X[20:], y[20:])
    for kind in ("dict", "tuple", "object"):
        attr = TracIn(_Structured(kind).double(), loss="cross_entropy", batch_size=7)
        assert_scores_close(attr.fit(X[:20], y[:20]).transform(X[20:], y[20:]), S)
    mask = np.ones_like(X)
    attr = TracIn(_Structured("dict").double(), loss="cross_entropy", batch_size=7)
    attr.fit({"input_ids": X[:20], "attention_mask": mask[:20]}, y[:20])
    assert_scores_close(attr.transform({"input_ids": X[20:], "attention_mask": mask[20:]},
                                       y[20:]), S)
    # without y the predicted tokens are the targets
    pred = attr.model_.predict(attr.model_.named_params(),
                               {"input_ids": torch.tensor(X[20:]),
                                "attention_mask": torch.tensor(mask[20:])})
    assert pred.shape == (10, 4)
    assert_scores_close(attr.transform({"input_ids": X[20:], "attention_mask": mask[20:]}),
                        attr.transform({"input_ids": X[20:], "attention_mask": mask[20:]},
                                       pred.numpy()))


def _char_net(criterion, **kw):
    return NeuralNet(CharTransformer, module__vocab_size=11, module__block_size=6,
                     module__d_model=8, module__n_heads=2, module__n_layers=1, module__d_ff=16,
                     criterion=criterion, verbose=0, **kw).initialize()


@pytest.mark.parametrize("criterion, kind", [(nn.CrossEntropyLoss, "ce"),
                                             (SequenceCrossEntropy, "criterion")])
def test_skorch_net_with_a_sequence_criterion_is_a_token_classifier(criterion, kind):
    """The text-gpt setting's estimator (a NeuralNet with SequenceCrossEntropy) and a
    NeuralNet with CrossEntropyLoss: token classifiers, int64 targets with -100 kept."""
    net = _char_net(criterion)
    model = make_model(net)
    assert model.task == "classification" and model.loss_.kind == kind
    Z, y = _token_data(T=6, V=11)
    yt = model.to_tensor_y(y)
    assert yt.dtype == torch.int64 and int(yt.min()) == -100
    out = torch.tensor(Z, dtype=torch.float32)
    ref_loss, ref_margin, _, _ = _reference(Z, y)
    if kind == "ce":  # per-token CE summed over the sequence
        _close(model.loss_.loss(out, yt), ref_loss, k=256 * np.finfo(np.float32).eps / EPS)
    else:  # the criterion's own per-sequence mean (over all T positions)
        _close(model.loss_.loss(out, yt), ref_loss / 6, k=256 * np.finfo(np.float32).eps / EPS)
    _close(model.loss_.margin(out, yt), ref_margin, k=256 * np.finfo(np.float32).eps / EPS)
    rng = np.random.RandomState(0)
    X = rng.randint(0, 11, size=(25, 6))
    S = TRAK(net, proj_dim=16, random_state=0).fit(X[:20], X[:20]).transform(X[20:], X[20:])
    assert S.shape == (5, 20) and np.all(np.isfinite(S))


def _grads(model, X, y, value):
    """Per-sample gradients one sample at a time with autograd (no vmap, no hooks)."""
    rows = []
    params = dict(model.module.named_parameters())
    for x, t in zip(X, y):
        out = model.module(x[None])
        z = torch.log_softmax(out[0], -1)
        keep = t != -100
        logp = z[torch.arange(len(t))[keep], t[keep]]
        if value == "margin":
            val = (logp - torch.log1p(-torch.exp(logp))).sum()
        else:
            val = logp.sum()  # minus the loss
        g = torch.autograd.grad(val, list(params.values()))
        rows.append(torch.cat([v.reshape(-1) for v in g]))
    return torch.stack(rows)


def test_trak_on_a_char_transformer_matches_a_float64_reference():
    """TRAK on sequences (margin = summed token log-odds, Q = mean 1 - p), unprojected,
    against the TRAK formula from per-sample autograd gradients; batch_size-free."""
    module = CharTransformer(vocab_size=11, block_size=6, d_model=8, n_heads=2, n_layers=1,
                             d_ff=16, random_state=0).double()
    rng = np.random.RandomState(1)
    X, Xq = rng.randint(0, 11, size=(30, 6)), rng.randint(0, 11, size=(4, 6))
    y, yq = np.roll(X, -1, 1), np.roll(Xq, -1, 1)
    y[::4, :2] = -100
    lam = 0.5
    kw = dict(loss="cross_entropy", proj_dim=None, regularization=lam)
    for target, value in (("margin", "margin"), ("loss", "neg_loss")):
        S = TRAK(module, target=target, batch_size=7, **kw).fit(X, y).transform(Xq, yq)
        model = make_model(module, loss="cross_entropy")
        Phi = _grads(model, torch.tensor(X), torch.tensor(y), "margin").numpy()
        phi = _grads(model, torch.tensor(Xq), torch.tensor(yq), value).numpy()
        with torch.no_grad():
            out = module(torch.tensor(X)).numpy()
        _, _, q, _ = _reference(out, y)
        K = Phi.T @ Phi + lam * np.eye(Phi.shape[1])
        expected = phi @ np.linalg.solve(K, Phi.T) * q[None, :]
        assert_scores_close(S, expected, rtol=1e-8)
    S64 = TRAK(module, batch_size=64, **kw).fit(X, y).transform(Xq, yq)
    assert_scores_close(TRAK(module, batch_size=7, **kw).fit(X, y).transform(Xq, yq), S64)
    # a callable target keeps working: minus the summed log-probabilities = the loss
    def nll(out, t):
        return torch.nn.functional.cross_entropy(out.transpose(1, 2), t,
                                                 reduction="none").sum(1)

    # ... and, as dattri's task function, it is what the training side differentiates too
    # (minus it: the log-likelihood), with the same Q
    S_call = TRAK(module, target=nll, batch_size=7, **kw).fit(X, y).transform(Xq, yq)
    Phi = _grads(model, torch.tensor(X), torch.tensor(y), "neg_loss").numpy()
    phi = _grads(model, torch.tensor(Xq), torch.tensor(yq), "neg_loss").numpy()
    K = Phi.T @ Phi + lam * np.eye(Phi.shape[1])
    assert_scores_close(S_call, phi @ np.linalg.solve(K, Phi.T) * q[None, :], rtol=1e-8)
    S_loss = TRAK(module, target="loss", **kw).fit(X, y).transform(Xq, yq)
    assert np.abs(S_call - S_loss).max() > 1e-3 * np.abs(S_loss).max()  # not the margin
