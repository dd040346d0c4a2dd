"""TrainingRecorder: the right epochs, the right weights and learning rates, refit, plain
loops, pickling, and TracIn on what it recorded."""

import copy
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback, LRScheduler
from torch import nn

from skdattri import TracIn
from skdattri.callbacks import TrainingRecorder
from tests.conftest import MLP

LR = 0.2


class _SaveEvery(Callback):
    """The oracle: a deep copy of the module's weights after every epoch, by hand."""

    def initialize(self):
        self.states_ = []
        return self

    def on_epoch_end(self, net, **kwargs):
        self.states_.append(copy.deepcopy(net.module_.state_dict()))


class _StopAt(Callback):
    """Stops training after ``epoch`` epochs, as skorch's EarlyStopping does."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.epoch:
            raise KeyboardInterrupt


def _net(*callbacks, max_epochs=5):
    """A small float64 skorch MLP on digits; callbacks run in the order given."""
    return NeuralNetClassifier(
        MLP, module__dtype=torch.float64, criterion=nn.CrossEntropyLoss, lr=LR,
        max_epochs=max_epochs, batch_size=50, train_split=None, verbose=0,
        optimizer=torch.optim.SGD,
        callbacks=[(f"cb{i}", cb) for i, cb in enumerate(callbacks)])


def _fit(net, digits):
    X, y, _, _ = digits
    torch.manual_seed(0)
    return net.fit(X, y.astype(np.int64))


def _assert_same_state(a, b):
    """Recorded checkpoints are copies: bit-identical to the weights they copy."""
    assert list(a) == list(b)
    for name in a:
        assert a[name].device.type == "cpu"
        np.testing.assert_array_equal(a[name].numpy(), b[name].detach().cpu().numpy())


@pytest.mark.parametrize("epochs, expected", [
    (None, [1, 2, 3, 4, 5]),
    (2, [2, 4, 5]),           # every 2nd, and the last
    (5, [5]),                 # the last is a multiple: recorded once
    ([1, 3, 9], [1, 3]),      # epoch 9 is never reached
    (np.array([4]), [4]),
])
def test_skorch_checkpoints_are_the_weights_at_the_chosen_epochs(digits, epochs, expected):
    saver, recorder = _SaveEvery(), TrainingRecorder(epochs=epochs)
    net = _fit(_net(saver, recorder), digits)
    assert recorder.epochs_ == expected
    assert len(recorder.checkpoints_) == len(recorder.learning_rates_) == len(expected)
    for epoch, state in zip(recorder.epochs_, recorder.checkpoints_):
        _assert_same_state(state, saver.states_[epoch - 1])
    if expected[-1] == 5:
        _assert_same_state(recorder.checkpoints_[-1], net.module_.state_dict())
    # copies, not views of the live weights
    live = net.module_.state_dict()["out.weight"]
    assert recorder.checkpoints_[-1]["out.weight"].data_ptr() != live.data_ptr()
    assert recorder.learning_rates_ == [LR] * len(expected)


def test_learning_rate_is_the_one_the_epoch_trained_with(digits):
    # StepLR halves the rate at the end of every epoch, before the recorder's hook runs
    sched = LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    recorder = TrainingRecorder(epochs=[1, 2, 4])
    _fit(_net(sched, recorder, max_epochs=4), digits)
    expected = [LR * 0.5 ** (e - 1) for e in (1, 2, 4)]
    atol = 8 * np.finfo(np.float64).eps * LR
    np.testing.assert_allclose(recorder.learning_rates_, expected, rtol=0, atol=atol)


def test_refit_resets_and_partial_fit_appends(digits):
    saver, recorder = _SaveEvery(), TrainingRecorder()
    net = _fit(_net(saver, recorder, max_epochs=3), digits)
    first = recorder.checkpoints_[0]
    _fit(net, digits)  # fit re-initialises the callbacks
    assert recorder.epochs_ == [1, 2, 3] and len(recorder.checkpoints_) == 3
    assert recorder.checkpoints_[0] is not first
    _assert_same_state(recorder.checkpoints_[-1], net.module_.state_dict())
    X, y, _, _ = digits
    net.partial_fit(X, y.astype(np.int64))  # goes on: epochs 4..6
    assert recorder.epochs_ == [1, 2, 3, 4, 5, 6]
    _assert_same_state(recorder.checkpoints_[-1], net.module_.state_dict())


def test_interrupted_training_records_its_last_epoch(digits):
    saver, recorder = _SaveEvery(), TrainingRecorder(epochs=5)
    net = _fit(_net(saver, _StopAt(3), recorder, max_epochs=10), digits)
    assert len(net.history) == 3 and recorder.epochs_ == [3]
    _assert_same_state(recorder.checkpoints_[0], net.module_.state_dict())


@pytest.mark.parametrize("epochs", [0, -2, True, [0, 2], [1.5], [[1, 2]], "every", 2.0])
def test_invalid_epochs_are_refused_at_fit(digits, epochs):
    with pytest.raises(ValueError, match="'epochs' parameter of TrainingRecorder"):
        _fit(_net(TrainingRecorder(epochs=epochs), max_epochs=1), digits)


def test_plain_torch_loop(make_mlp):
    module = make_mlp()
    optimizer = torch.optim.SGD([{"params": module.hidden.parameters(), "lr": 0.1},
                                 {"params": module.out.parameters(), "lr": 0.3}])
    X = torch.linspace(0, 1, 20 * 64, dtype=torch.float64).reshape(20, 64)
    y = torch.arange(20) % 10
    recorder, saved = TrainingRecorder(epochs=7), []  # epochs= is for the skorch hooks
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(X), y).backward()
        optimizer.step()
        recorder.record(module, optimizer=optimizer)
        saved.append(copy.deepcopy(module.state_dict()))
    recorder.record(module, lr=0.05, epoch=10)
    recorder.record(module)
    assert recorder.epochs_ == [1, 2, 3, 10, 11]
    atol = 8 * np.finfo(np.float64).eps * 0.3
    np.testing.assert_allclose(recorder.learning_rates_, [0.2, 0.2, 0.2, 0.05, 1.0],
                               rtol=0, atol=atol)
    for state, oracle in zip(recorder.checkpoints_, saved):
        _assert_same_state(state, oracle)
    assert not torch.equal(recorder.checkpoints_[0]["out.weight"],
                           recorder.checkpoints_[2]["out.weight"])
    with pytest.raises(ValueError, match="not both"):
        recorder.record(module, lr=0.1, optimizer=optimizer)


def test_pickle_and_clone(digits):
    recorder = TrainingRecorder(epochs=[2, 3])
    net = _fit(_net(recorder, max_epochs=3), digits)
    loaded = pickle.loads(pickle.dumps(recorder))
    assert loaded.epochs_ == [2, 3] and loaded.learning_rates_ == recorder.learning_rates_
    for a, b in zip(loaded.checkpoints_, recorder.checkpoints_):
        _assert_same_state(a, b)
    net_again = pickle.loads(pickle.dumps(net))
    _assert_same_state(dict(net_again.callbacks_)["cb0"].checkpoints_[-1],
                       net.module_.state_dict())
    fresh = clone(recorder)
    assert fresh.get_params() == {**TrainingRecorder().get_params(), "epochs": [2, 3]}
    assert not hasattr(fresh, "checkpoints_")


def _assert_same_scores(model, X, y, Xq, yq, recorder, states, **kw):
    """TracIn on the recorder's lists and on hand-saved states give the same scores."""
    recorded = TracIn(model, checkpoints=recorder.checkpoints_,
                      learning_rates=recorder.learning_rates_, **kw)
    by_hand = TracIn(model, checkpoints=states, learning_rates=[LR] * len(states), **kw)
    S = recorded.fit(X, y).transform(Xq, yq)
    S_hand = by_hand.fit(X, y).transform(Xq, yq)
    assert S.shape == (len(yq), len(y)) and np.abs(S_hand).max() > 0
    atol = 64 * np.finfo(S.dtype).eps * np.abs(S_hand).max()
    np.testing.assert_allclose(S, S_hand, rtol=0, atol=atol)
    # the checkpoints matter: Grad-Dot on the final model alone is something else
    S_final = TracIn(model, **kw).fit(X, y).transform(Xq, yq)
    assert np.abs(S_final - S_hand).max() > 1e3 * atol
    # the recorder itself is a checkpoints= value: its checkpoints and learning rates
    direct = TracIn(model, checkpoints=recorder, **kw)
    np.testing.assert_allclose(direct.fit(X, y).transform(Xq, yq), S_hand, rtol=0, atol=atol)
    assert clone(direct).checkpoints is recorder  # clone keeps the recorded run


def test_tracin_on_a_skorch_recording_equals_hand_saved_states(digits):
    X, y, Xq, yq = digits
    saver, recorder = _SaveEvery(), TrainingRecorder(epochs=2)
    net = _fit(_net(saver, recorder), digits)
    states = [saver.states_[e - 1] for e in (2, 4, 5)]
    _assert_same_scores(net, X, y.astype(np.int64), Xq, yq.astype(np.int64), recorder,
                        states)


def test_tracin_on_a_plain_loop_recording_equals_hand_saved_states(digits):
    X, y, Xq, yq = digits
    torch.manual_seed(0)
    module = MLP(dtype=torch.float64)
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    recorder, states = TrainingRecorder(), []
    for epoch in range(1, 7):
        for batch in torch.arange(len(X)).split(50):
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(Xt[batch]), yt[batch]).backward()
            optimizer.step()
        if epoch % 2 == 0:
            recorder.record(module, optimizer=optimizer, epoch=epoch)
            states.append({k: v.detach().clone() for k, v in module.state_dict().items()})
    assert recorder.epochs_ == [2, 4, 6]
    _assert_same_scores(module, X, y, Xq, yq, recorder, states, loss="cross_entropy")


def test_an_empty_recorder_is_refused(digits):
    X, y, _, _ = digits
    model = LogisticRegression(max_iter=200).fit(X, y)
    with pytest.raises(ValueError, match="recorded nothing"):
        TracIn(model, checkpoints=TrainingRecorder()).fit(X, y)


# ----------------------------------------------------------------------------- per-step gradients
class _Batches(Callback):
    """The oracle: the weights before each training step and the batch it steps on."""

    def initialize(self):
        self.steps_ = []
        return self

    def on_batch_begin(self, net, batch=None, training=False, **kwargs):
        if training:
            state = {k: v.detach().clone() for k, v in net.module_.named_parameters()}
            self.steps_.append((state, batch[0].clone(), batch[1].clone()))


def _oracle_grads(module, state, X, y):
    """Per-sample gradients by autograd, one sample at a time, at the weights ``state``."""
    out = []
    for x, t in zip(X, y):
        params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
        loss = nn.functional.cross_entropy(
            torch.func.functional_call(module, params, (x[None],)), t[None])
        grads = torch.autograd.grad(loss, list(params.values()))
        out.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(out)


def _assert_grads_close(G, ref):
    atol = 64 * np.finfo(np.float64).eps * float(ref.abs().max())
    np.testing.assert_allclose(G.numpy(), ref.numpy(), rtol=0, atol=atol)


@pytest.mark.parametrize("proj_dim", [None, 12])
def test_skorch_records_per_sample_gradients_at_the_pre_step_weights(digits, proj_dim):
    X, y, _, _ = digits
    X, y = X[:90], y[:90].astype(np.int64)
    oracle = _Batches()
    recorder = TrainingRecorder(keep="gradients", proj_dim=proj_dim, random_state=0)
    net = _net(oracle, recorder, max_epochs=2).set_params(batch_size=32,
                                                          iterator_train__shuffle=True)
    torch.manual_seed(0)
    net.fit(X, y)
    assert recorder.n_steps_ == len(oracle.steps_) == 6  # 32 + 32 + 26 rows per epoch
    assert recorder.checkpoints_ == [] and recorder.n_rows_ == 90
    assert recorder.param_names_ == [n for n, _ in net.module_.named_parameters()]
    assert recorder.step_learning_rates_ == [LR] * 6
    assert recorder.step_weight_decays_ == [0.0] * 6
    module = copy.deepcopy(net.module_)
    for t, (state, xb, yb) in enumerate(oracle.steps_):
        idx = recorder.step_indices_[t].numpy()
        np.testing.assert_array_equal(X[idx], xb.numpy())  # the batch's own rows
        np.testing.assert_array_equal(y[idx], yb.numpy())
        ref = _oracle_grads(module, state, xb, yb)
        if proj_dim is not None:
            ref = recorder.projector_(ref)
        assert recorder.step_gradients(t).shape == (len(idx), proj_dim or ref.shape[1])
        _assert_grads_close(recorder.step_gradients(t), ref)
    epoch = np.sort(np.concatenate([i.numpy() for i in recorder.step_indices_[:3]]))
    np.testing.assert_array_equal(epoch, np.arange(90))  # every row once per epoch
    assert not np.array_equal(recorder.step_indices_[0].numpy(), np.arange(32))  # shuffled


def test_keep_both_and_a_validation_split(digits):
    from skorch.dataset import ValidSplit

    X, y, _, _ = digits
    X, y = X[:100], y[:100].astype(np.int64)
    recorder = TrainingRecorder(epochs=2, keep="both")
    net = _net(recorder, max_epochs=2).set_params(train_split=ValidSplit(4))
    _fit(net, (X, y, None, None))
    assert recorder.epochs_ == [2] and recorder.n_rows_ == 100
    used = np.concatenate([i.numpy() for i in recorder.step_indices_])
    assert len(used) == 2 * 75 and len(np.unique(used)) == 75  # the training rows only
    assert recorder.step_gradients(0).shape[0] == 50


def test_identical_rows_are_drawn_in_turn():
    X = np.repeat(np.eye(4, 64), [3, 1, 1, 1], axis=0)  # row 0 three times
    y = np.array([1, 1, 1, 2, 3, 4])
    recorder = TrainingRecorder(keep="gradients")
    net = _net(recorder, max_epochs=3).set_params(batch_size=4, iterator_train__shuffle=True)
    _fit(net, (X, y, None, None))
    for epoch in range(3):
        used = np.concatenate([i.numpy() for i in recorder.step_indices_[2 * epoch:
                                                                          2 * epoch + 2]])
        np.testing.assert_array_equal(np.sort(used), np.arange(6))


def test_augmented_batches_are_refused(digits):
    X, y, _, _ = digits

    class _Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 60

        def __getitem__(self, i):
            return torch.as_tensor(X[i]) + 0.01 * torch.randn(64, dtype=torch.float64), y[i]

    net = _net(TrainingRecorder(keep="gradients"), max_epochs=1)
    with pytest.raises(ValueError, match="not rows of the X"):
        net.fit(_Noisy(), None)


def test_plain_loop_step_records_pre_step_gradients(make_mlp):
    module = make_mlp()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, weight_decay=0.01)
    X = torch.linspace(-1, 1, 24 * 64, dtype=torch.float64).reshape(24, 64).sin()
    y = torch.arange(24) % 10
    recorder = TrainingRecorder(loss="cross_entropy", layers=["out"])
    states = []
    for idx in (torch.arange(0, 10), torch.arange(10, 24), torch.arange(5, 12)):
        states.append({k: v.detach().clone() for k, v in module.named_parameters()})
        recorder.step(module, X[idx], y[idx], idx.numpy(), optimizer=optimizer)
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(X[idx]), y[idx]).backward()
        optimizer.step()
    recorder.step(module, X[:3], y[:3], [0, 1, 2], lr=0.05)
    assert recorder.param_names_ == ["out.weight", "out.bias"]
    assert recorder.step_learning_rates_ == [0.1, 0.1, 0.1, 0.05]
    assert recorder.step_weight_decays_ == [0.01, 0.01, 0.01, 0.0]
    np.testing.assert_array_equal(recorder.step_indices_[1].numpy(), np.arange(10, 24))
    n_out = module.out.weight.numel() + module.out.bias.numel()
    for t, idx in enumerate((torch.arange(0, 10), torch.arange(10, 24), torch.arange(5, 12))):
        ref = _oracle_grads(module, states[t], X[idx], y[idx])[:, -n_out:]  # out.* last
        _assert_grads_close(recorder.step_gradients(t), ref)
    with pytest.raises(ValueError, match="exactly one"):
        recorder.step(module, X[:3], y[:3], [0, 1, 2])
    with pytest.raises(ValueError, match="3 indices"):
        recorder.step(module, X[:4], y[:4], [0, 1, 2], lr=0.1)
    loaded = pickle.loads(pickle.dumps(recorder))
    torch.testing.assert_close(loaded.step_gradients(2), recorder.step_gradients(2),
                               rtol=0, atol=0)


@pytest.mark.parametrize("params, match", [
    ({"keep": "all"}, "'keep' parameter"),
    ({"proj_type": "selective_mask", "keep": "gradients"}, "'proj_type' parameter"),
    ({"proj_dim": 0}, "'proj_dim' parameter"),
])
def test_invalid_recording_parameters_are_refused_at_fit(digits, params, match):
    with pytest.raises(ValueError, match=match):
        _fit(_net(TrainingRecorder(**params), max_epochs=1), digits)
