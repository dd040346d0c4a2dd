"""CUDA: the same scores as on the CPU, caches on the GPU, pickles that load anywhere.

Skipped without CUDA (see conftest.py); run on a GPU machine with ``pytest -m gpu``.
"""

import pickle

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from skdattri import TRAK, InfluenceFunction, TracIn
from skdattri.estimator_checks import assert_scores_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("make", [
    lambda m: TracIn(m, proj_dim=64, random_state=0),
    lambda m: InfluenceFunction(m, solver="cg", tol=1e-10),
    lambda m: InfluenceFunction(m, solver="ekfac", random_state=0, fisher="empirical"),
    lambda m: TRAK(m, proj_dim=64, regularization=1e-3, random_state=0),
])
def test_cuda_matches_cpu_and_pickles(digits, make):
    X, y, Xq, yq = digits
    model = LogisticRegression(max_iter=1000).fit(X, y)
    cpu = make(model).set_params(device="cpu").fit(X, y)
    gpu = make(model).set_params(device="cuda").fit(X, y)
    assert gpu.device_.type == "cuda"
    S_cpu, S_gpu = cpu.transform(Xq, yq), gpu.transform(Xq, yq)
    np.testing.assert_allclose(S_gpu, S_cpu, rtol=1e-6, atol=1e-9 * np.abs(S_cpu).max())
    assert_scores_close(gpu.self_influence(), cpu.self_influence(), rtol=1e-6)
    loaded = pickle.loads(pickle.dumps(gpu))
    assert loaded.device_.type == "cuda"
    assert_scores_close(loaded.transform(Xq, yq), S_gpu, rtol=1e-10)


def test_auto_device_is_cuda(digits):
    X, y, _, _ = digits
    model = LogisticRegression(max_iter=500).fit(X, y)
    attr = TracIn(model).fit(X, y)
    assert attr.device_ == torch.device("cuda", 0) or attr.device_.type == "cuda"
    assert attr.train_grads_[0][:].is_cuda
