"""Tiny models whose fits are counted, and one of which can stall, for interrupt tests.

The environment (read at fit time, so worker processes see it too) says what to do:

- ``SKDATTRI_TEST_FIT_LOG``: every fit appends its process id to this file;
- ``SKDATTRI_TEST_STALL_AT`` and ``SKDATTRI_TEST_STALL_FILE``: the first fit that makes
  the log at least that long writes its process id to the stall file and then sleeps
  (up to a minute) *inside the training loop* -- where scikit-learn's MLP and skorch
  catch ``KeyboardInterrupt`` -- until a test signals it.
"""

import os
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from skorch import NeuralNetClassifier

N_SUBSETS = 8


def data():
    """``(X_train, y_train, X_test, y_test)``: 40 train and 12 query rows, two classes."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(52, 5)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] + 0.3 * rng.normal(size=52) > 0).astype(np.int64)
    return X[:40], y[:40], X[40:], y[40:]


def _fit_started():
    """Log this fit; whether it is the one that stalls."""
    log = os.environ.get("SKDATTRI_TEST_FIT_LOG")
    if not log:
        return False
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    stall_at, marker = os.environ.get("SKDATTRI_TEST_STALL_AT"), os.environ.get(
        "SKDATTRI_TEST_STALL_FILE")
    if not stall_at or not marker:
        return False
    with open(log) as f:
        if sum(1 for _ in f) < int(stall_at):
            return False
    try:
        os.close(os.open(marker + ".lock", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False  # another fit stalls
    return True


def _stall():
    """Tell the test which process stalls, then wait for its signal."""
    marker = os.environ["SKDATTRI_TEST_STALL_FILE"]
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(marker + ".tmp", marker)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.01)


class CountingLogisticRegression(LogisticRegression):
    def fit(self, X, y, sample_weight=None):
        if _fit_started():
            _stall()
        return super().fit(X, y, sample_weight=sample_weight)


class CountingMLP(MLPClassifier):
    """Stalls after its second epoch, inside the loop that catches KeyboardInterrupt."""

    def fit(self, X, y, **kw):
        self._stalls = _fit_started()
        return super().fit(X, y, **kw)

    def _update_no_improvement_count(self, *args, **kw):
        if getattr(self, "_stalls", False) and self.n_iter_ == 2:
            self._stalls = False
            _stall()
        return super()._update_no_improvement_count(*args, **kw)


class TinyModule(torch.nn.Module):
    """5 -> 8 -> 2, initial weights from torch's global generator (no seed of its own)."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(5, 8)
        self.out = torch.nn.Linear(8, 2)

    def forward(self, X):
        return self.out(torch.tanh(self.hidden(X)))


class CountingNet(NeuralNetClassifier):
    """Stalls at the end of its second epoch, inside skorch's fit loop (which catches
    KeyboardInterrupt)."""

    def fit(self, X, y=None, **fit_params):
        self._stalls = _fit_started()
        return super().fit(X, y, **fit_params)

    def on_epoch_end(self, net, **kwargs):
        super().on_epoch_end(net, **kwargs)
        if getattr(self, "_stalls", False) and len(self.history) == 2:
            self._stalls = False
            _stall()


def make_model(name):
    """One of ``"lr"``, ``"mlp"``, ``"skorch"``: each fit takes a few hundredths of a second."""
    if name == "lr":
        return CountingLogisticRegression(max_iter=200)
    if name == "mlp":
        return CountingMLP(hidden_layer_sizes=(8,), max_iter=30, learning_rate_init=0.01)
    if name == "skorch":
        return CountingNet(TinyModule, criterion=torch.nn.CrossEntropyLoss, max_epochs=6,
                           lr=0.1, batch_size=8, train_split=None, verbose=0,
                           iterator_train__shuffle=True)
    raise ValueError(name)


def run(name, *, n_jobs, memory, **kw):
    """The LDS ground truth of model ``name`` on :func:`data` (``N_SUBSETS`` subsets)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from skdattri.ground_truth import lds_ground_truth

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return lds_ground_truth(make_model(name), *data(), n_subsets=N_SUBSETS,
                                random_state=0, n_jobs=n_jobs, memory=memory, **kw)
