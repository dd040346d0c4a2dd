"""Shared fixtures: small, real data (sklearn digits) and small fitted models."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Two busy cores (pytest -n 2): one torch / BLAS / OpenMP thread per test process.

    Oversubscribed OpenMP threads spin: sklearn's LogisticRegression ran ~30x slower.
    """
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def digits():
    """Digits scaled to [0, 1]: 200 train, 40 query rows (float64)."""
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    return X[:200], y[:200], X[1000:1040], y[1000:1040]


class MLP(nn.Module):
    """A small MLP used across tests (64 -> 16 -> 10)."""

    def __init__(self, n_in=64, n_hidden=16, n_out=10, dtype=torch.float32):
        super().__init__()
        self.hidden = nn.Linear(n_in, n_hidden, dtype=dtype)
        self.out = nn.Linear(n_hidden, n_out, dtype=dtype)

    def forward(self, X):
        return self.out(torch.tanh(self.hidden(X)))


@pytest.fixture
def make_mlp():
    def _make(seed=0, dtype=torch.float64, **kw):
        torch.manual_seed(seed)
        return MLP(dtype=dtype, **kw)

    return _make


@pytest.fixture(scope="session")
def skorch_net(digits):
    """A fitted skorch MLP classifier on digits (float64 module, logits + CE)."""
    from skorch import NeuralNetClassifier

    X, y, _, _ = digits
    torch.manual_seed(0)
    net = NeuralNetClassifier(MLP, criterion=nn.CrossEntropyLoss, max_epochs=15, lr=0.2,
                              batch_size=32, train_split=None, verbose=0,
                              optimizer=torch.optim.SGD, module__dtype=torch.float64)
    net.fit(X, y.astype(np.int64))
    return net
