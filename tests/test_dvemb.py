"""DVEmb: the recursion against a hand-written float64 oracle (plain loop and skorch),
projections, batch-size invariance, sign, fitted state, pickling and errors."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback
from torch import nn

from skdattri import DVEmb
from skdattri.callbacks import TrainingRecorder
from skdattri.estimator_checks import (
    assert_scores_close,
    check_orientation,
    check_pickle_round_trip,
    check_self_influence_is_diagonal,
    check_transform_keeps_fitted_state,
)

N_IN, N_OUT, LR, BATCH, EPOCHS = 6, 3, 0.4, 7, 3
P = N_IN * N_OUT + N_OUT  # weight, then bias


def _data(seed=0, n=30, n_query=5):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n + n_query, N_IN))
    y = rng.randint(0, N_OUT, size=n + n_query)
    return X[:n], y[:n], X[n:], y[n:]


class _Linear64(nn.Linear):
    """float64 weights; float32 inputs (skdattri trains an unfitted skorch net on
    float32 X) are cast up."""

    def forward(self, X):
        return super().forward(X.to(torch.float64))


def _module(seed=0):
    torch.manual_seed(seed)
    return _Linear64(N_IN, N_OUT, dtype=torch.float64)


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def _oracle_grads(theta, X, y):
    """Per-sample gradients of the cross-entropy at the flat ``theta``, one by one."""
    out = []
    for x, t in zip(torch.as_tensor(X), torch.as_tensor(y)):
        th = theta.clone().requires_grad_(True)
        W, b = th[:N_IN * N_OUT].reshape(N_OUT, N_IN), th[N_IN * N_OUT:]
        loss = nn.functional.cross_entropy((x @ W.T + b)[None], t[None])
        out.append(torch.autograd.grad(loss, th)[0])
    return torch.stack(out)


def _oracle(trace, theta_T, X, y, Xq, yq, proj=None, weight_decay=0.0):
    """``S = Q E^T`` from the definition: ``e_j = sum_t J_{T-1}..J_{t+1} lr/|B| g_j`` with
    dense Jacobians ``J_k = (1 - lr wd) I - lr/|B_k| sum g g^T``; ``proj``: a (p, k)
    matrix applied to every gradient first."""
    proj = torch.eye(P, dtype=torch.float64) if proj is None else proj
    k = proj.shape[1]
    grads = [_oracle_grads(theta, X[idx], y[idx]) @ proj for theta, idx, _ in trace]
    jac = [(1 - lr * weight_decay) * torch.eye(k, dtype=torch.float64)
           - lr / len(idx) * G.T @ G for G, (_, idx, lr) in zip(grads, trace)]
    E = torch.zeros(len(y), k, dtype=torch.float64)
    for t, (G, (_, idx, lr)) in enumerate(zip(grads, trace)):
        prod = torch.eye(k, dtype=torch.float64)
        for J in jac[t + 1:]:
            prod = J @ prod
        for row, j in enumerate(idx):
            E[j] += lr / len(idx) * prod @ G[row]
    Q = _oracle_grads(theta_T, Xq, yq) @ proj
    return (Q @ E.T).numpy(), E


def _train_loop(X, y, recorder, weight_decay=0.0, seed=0):
    """Plain shuffled SGD with ``recorder.step`` before each step; returns the module
    and the oracle's trace ``(theta_t, indices, lr)``."""
    module = _module(seed)
    opt = torch.optim.SGD(module.parameters(), lr=LR, weight_decay=weight_decay)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    gen = torch.Generator().manual_seed(seed)
    trace = []
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(y), generator=gen).split(BATCH):
            trace.append((_flat(module), idx.numpy(), LR))
            recorder.step(module, Xt[idx], yt[idx], idx, optimizer=opt)
            opt.zero_grad()
            nn.functional.cross_entropy(module(Xt[idx]), yt[idx]).backward()
            opt.step()
    return module, trace


def _tol(S_ref, n_steps):
    # each step's product adds a few ulps relative to the largest term
    return dict(ulps=8 * n_steps, scale=np.abs(S_ref).max())


@pytest.mark.parametrize("batch_size", [1, 4, 256])
def test_plain_loop_equals_the_hand_written_recursion(batch_size):
    X, y, Xq, yq = _data()
    recorder = TrainingRecorder(loss="cross_entropy")
    module, trace = _train_loop(X, y, recorder)
    S_ref, E_ref = _oracle(trace, _flat(module), X, y, Xq, yq)
    attr = DVEmb(module, recorder=recorder, loss="cross_entropy", batch_size=batch_size)
    S = attr.fit(X, y).transform(Xq, yq)
    assert attr.n_steps_ == len(trace) == EPOCHS * 5 and S.shape == (5, 30)
    assert_scores_close(S, S_ref, **_tol(S_ref, len(trace)))
    assert_scores_close(attr.embeddings_[:], E_ref, **_tol(E_ref.numpy(), len(trace)))
    # the propagation matters: the embeddings are not the plain sum of lr/|B| g_j(theta_t)
    flat = sum(np.abs(lr / len(i) * _oracle_grads(th, X[i], y[i]).numpy()).sum()
               for th, i, lr in trace)
    assert np.abs(E_ref.numpy()).sum() < 0.99 * flat


def test_weight_decay_is_recorded_and_can_be_overridden():
    X, y, Xq, yq = _data(1)
    recorder = TrainingRecorder(loss="cross_entropy")
    module, trace = _train_loop(X, y, recorder, weight_decay=0.3)
    assert recorder.step_weight_decays_ == [0.3] * len(trace)
    S_ref, _ = _oracle(trace, _flat(module), X, y, Xq, yq, weight_decay=0.3)
    S = DVEmb(module, recorder=recorder, loss="cross_entropy").fit(X, y).transform(Xq, yq)
    assert_scores_close(S, S_ref, **_tol(S_ref, len(trace)))
    S0_ref, _ = _oracle(trace, _flat(module), X, y, Xq, yq, weight_decay=0.0)
    S0 = DVEmb(module, recorder=recorder, loss="cross_entropy", weight_decay=0.0)
    assert_scores_close(S0.fit(X, y).transform(Xq, yq), S0_ref, **_tol(S0_ref, len(trace)))
    assert np.abs(S0_ref - S_ref).max() > 1e-3 * np.abs(S_ref).max()


class _Trace(Callback):
    """The oracle of a skorch run: the weights and the batch at each training step."""

    def initialize(self):
        self.steps_ = []
        return self

    def on_batch_begin(self, net, batch=None, training=False, **kwargs):
        if training:
            self.steps_.append((_flat(net.module_), batch[0].clone(), batch[1].clone()))


def _skorch(*callbacks, **kwargs):
    return NeuralNetClassifier(
        _module(0), criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=LR,
        batch_size=BATCH, max_epochs=EPOCHS, train_split=None, verbose=0,
        iterator_train__shuffle=True, callbacks=list(callbacks), **kwargs)


def test_skorch_callback_equals_the_recursion_of_its_own_run():
    X, y, Xq, yq = _data(2)
    tracer, recorder = _Trace(), TrainingRecorder(keep="gradients")
    net = _skorch(tracer, recorder)
    torch.manual_seed(3)
    net.fit(X, y)
    trace = []
    for (theta, xb, yb), idx in zip(tracer.steps_, recorder.step_indices_, strict=True):
        # the recorder's indices are the rows of the batch (the rows are distinct)
        np.testing.assert_array_equal(X[idx.numpy()], xb.numpy())
        np.testing.assert_array_equal(y[idx.numpy()], yb.numpy())
        trace.append((theta, idx.numpy(), LR))
    assert not all(np.array_equal(t[1], np.arange(len(t[1])) + i * BATCH)
                   for i, t in enumerate(trace[:5]))  # shuffled
    S_ref, _ = _oracle(trace, _flat(net.module_), X, y, Xq, yq)
    S = DVEmb(net, recorder=recorder).fit(X, y).transform(Xq, yq)
    assert_scores_close(S, S_ref, **_tol(S_ref, len(trace)))


def test_dvemb_trains_an_unfitted_net_with_a_recorder_attached():
    X, y, Xq, yq = _data(2)
    attr = DVEmb(_skorch(), random_state=3).fit(X, y)
    recorder = attr.recorder_
    assert recorder.n_steps_ == EPOCHS * 5 and recorder.n_rows_ == 30
    # the same training run by hand (the same seed) gives the same scores
    tracer, rec = _Trace(), TrainingRecorder(keep="gradients")
    net = _skorch(tracer, rec)
    torch.manual_seed(3)
    net.fit(X.astype(np.float32), y)
    S_hand = DVEmb(net, recorder=rec).fit(X, y).transform(Xq, yq)
    assert_scores_close(attr.transform(Xq, yq), S_hand)
    assert clone(attr).fit(X, y).recorder_ is not recorder


def _projection_matrix(projector):
    return projector(torch.eye(P, dtype=torch.float64))


def test_projections_equal_the_recursion_in_the_projected_space():
    X, y, Xq, yq = _data(4)
    recorder = TrainingRecorder(loss="cross_entropy", proj_dim=8, proj_type="rademacher",
                                random_state=0)
    module, trace = _train_loop(X, y, recorder)
    assert recorder.step_gradients(0).shape == (BATCH, 8)
    S_ref, _ = _oracle(trace, _flat(module), X, y, Xq, yq,
                       proj=_projection_matrix(recorder.projector_))
    S = DVEmb(module, recorder=recorder, loss="cross_entropy").fit(X, y).transform(Xq, yq)
    assert_scores_close(S, S_ref, **_tol(S_ref, len(trace)))
    # DVEmb's own projection on top of full recorded gradients
    full = TrainingRecorder(loss="cross_entropy")
    module, trace = _train_loop(X, y, full)
    attr = DVEmb(module, recorder=full, loss="cross_entropy", proj_dim=8, random_state=1)
    S = attr.fit(X, y).transform(Xq, yq)
    S_ref, _ = _oracle(trace, _flat(module), X, y, Xq, yq,
                       proj=_projection_matrix(attr.projector_))
    assert_scores_close(S, S_ref, **_tol(S_ref, len(trace)))
    # a projection as wide as the gradients is no projection: the exact recursion
    S_full, _ = _oracle(trace, _flat(module), X, y, Xq, yq)
    with pytest.warns(UserWarning, match="unprojected"):
        wide = DVEmb(module, recorder=full, loss="cross_entropy", proj_dim=P).fit(X, y)
    assert wide.projector_ is None
    assert_scores_close(wide.transform(Xq, yq), S_full, **_tol(S_full, len(trace)))
    assert np.abs(S - S_full).max() > 1e-3 * np.abs(S_full).max()


def test_a_disk_store_gives_the_same_scores(tmp_path):
    X, y, Xq, yq = _data(5)
    scores = []
    for store in (None, tmp_path):
        recorder = TrainingRecorder(loss="cross_entropy", store=store)
        module, _ = _train_loop(X, y, recorder)
        attr = DVEmb(module, recorder=recorder, loss="cross_entropy", store=store)
        scores.append(attr.fit(X, y).transform(Xq, yq))
    assert type(recorder._stores_[0]).__name__ == "DiskStore"
    np.testing.assert_array_equal(scores[0], scores[1])


def _digits_run():
    """Digits 0-4, with a training copy of query 0 as the last row; SGD on a linear model."""
    Xd, yd = load_digits(return_X_y=True)
    keep = yd < 5
    Xd, yd = Xd[keep] / 16.0, yd[keep]
    X, y, Xq, yq = Xd[:120], yd[:120], Xd[500:506], yd[500:506]
    X, y = np.vstack([X, Xq[:1]]), np.append(y, yq[0])
    torch.manual_seed(0)
    module = nn.Linear(64, 5, dtype=torch.float64)
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    recorder = TrainingRecorder(loss="cross_entropy")
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for _ in range(4):
        for idx in torch.randperm(len(y)).split(16):
            recorder.step(module, Xt[idx], yt[idx], idx, lr=0.5)
            opt.zero_grad()
            nn.functional.cross_entropy(module(Xt[idx]), yt[idx]).backward()
            opt.step()
    return DVEmb(module, recorder=recorder, loss="cross_entropy"), (X, y, Xq, yq)


def test_sign_a_training_copy_of_a_query_helps_it_most():
    attr, (X, y, Xq, yq) = _digits_run()
    row = attr.fit(X, y).transform(Xq[:1], yq[:1])[0]
    assert row[-1] > 0
    assert np.sum(row > row[-1]) < 0.05 * len(row)


def test_attributor_contract_on_a_recorded_run():
    attr, data = _digits_run()
    name = "DVEmb"
    check_orientation(name, attr, data)
    check_self_influence_is_diagonal(name, attr, data)
    check_transform_keeps_fitted_state(name, attr, data)
    check_pickle_round_trip(name, attr, data)
    fitted = clone(attr).fit(data[0], data[1])
    assert clone(fitted).recorder is attr.recorder  # clone keeps the recorded run
    assert np.all(np.isfinite(fitted.self_influence()))


def test_errors():
    X, y, _, _ = _data()
    module = _module()
    with pytest.raises(ValueError, match="recorded no optimisation steps"):
        DVEmb(module, recorder=TrainingRecorder(), loss="cross_entropy").fit(X, y)
    checkpoints_only = TrainingRecorder(loss="cross_entropy")
    checkpoints_only.record(module)
    with pytest.raises(ValueError, match="recorded no optimisation steps"):
        DVEmb(module, recorder=checkpoints_only, loss="cross_entropy").fit(X, y)
    with pytest.raises(ValueError, match="pass the TrainingRecorder"):
        DVEmb(module, loss="cross_entropy").fit(X, y)
    with pytest.raises(TypeError, match="unfitted LogisticRegression"):
        DVEmb(LogisticRegression()).fit(X, y)
    recorder = TrainingRecorder(loss="cross_entropy")
    module, _ = _train_loop(X, y, recorder)
    with pytest.raises(ValueError, match="training rows up to 29"):
        DVEmb(module, recorder=recorder, loss="cross_entropy").fit(X[:20], y[:20])
    net = _skorch(rec := TrainingRecorder(keep="gradients")).fit(X, y)
    assert rec.n_steps_
    with pytest.raises(ValueError, match="training set of 30 rows"):
        DVEmb(net, recorder=rec).fit(X[:29], y[:29])
    with pytest.raises(ValueError, match="'proj_type' parameter"):
        DVEmb(module, recorder=recorder, proj_type="selective_mask").fit(X, y)
    with pytest.raises(ValueError, match="diverge"):
        bad = TrainingRecorder(loss="cross_entropy")
        Xt, yt = torch.as_tensor(X) * 1e3, torch.as_tensor(y)
        for _ in range(60):
            bad.step(module, Xt[:10], yt[:10], np.arange(10), lr=1e3)
        DVEmb(module, recorder=bad, loss="cross_entropy").fit(X, y)
