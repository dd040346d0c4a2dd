"""Tests of the TorchRandomProjection transformer."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import DataDimensionalityWarning, NotFittedError
from sklearn.metrics import euclidean_distances
from sklearn.random_projection import johnson_lindenstrauss_min_dim
from sklearn.utils.estimator_checks import parametrize_with_checks

from skdattri.estimator_checks import assert_scores_close
from skdattri.random_projection import TorchRandomProjection


@parametrize_with_checks(
    [
        TorchRandomProjection(n_components=2, random_state=0, device="cpu"),
        TorchRandomProjection(n_components=2, proj_type="rademacher", random_state=0),
        TorchRandomProjection(n_components=2, proj_type="sjlt", random_state=0),
        TorchRandomProjection(n_components=2, proj_type="random_mask", random_state=0),
        TorchRandomProjection(n_components=2, proj_type="selective_mask"),
        TorchRandomProjection(n_components=2, proj_type="grass", random_state=0),
    ]
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture
def X():
    return np.random.RandomState(0).randn(30, 500)


@pytest.mark.parametrize("proj_type", ["gaussian", "rademacher", "sjlt"])
def test_distances_preserved_with_auto_components(X, proj_type):
    eps = 0.5
    rp = TorchRandomProjection(eps=eps, proj_type=proj_type, random_state=0, device="cpu")
    Y = rp.fit_transform(X)
    assert rp.n_components_ == johnson_lindenstrauss_min_dim(len(X), eps=eps) == Y.shape[1]
    iu = np.triu_indices(len(X), 1)
    ratio = euclidean_distances(Y, squared=True)[iu] / euclidean_distances(X, squared=True)[iu]
    assert np.all((1 - eps < ratio) & (ratio < 1 + eps))
    with pytest.raises(ValueError, match="larger than the original space"):
        TorchRandomProjection(eps=0.1).fit(X)


def test_numpy_in_numpy_out_and_dtypes(X):
    rp = TorchRandomProjection(8, random_state=0, device="cpu").fit(X)
    Y = rp.transform(X)
    assert isinstance(Y, np.ndarray) and Y.dtype == np.float64 and Y.shape == (30, 8)
    assert rp.dtype_ == torch.float64 and rp.device_ == torch.device("cpu")
    np.testing.assert_array_equal(Y, rp.projector_(torch.from_numpy(X)).numpy())
    # float32 is preserved, ints become float64, dtype= forces the precision
    X32 = X.astype(np.float32)
    assert TorchRandomProjection(8, random_state=0).fit_transform(X32).dtype == np.float32
    Xi = (X * 10).astype(np.int64)
    assert TorchRandomProjection(8, random_state=0).fit_transform(Xi).dtype == np.float64
    Y32 = TorchRandomProjection(8, random_state=0, dtype="float32").fit_transform(X)
    assert Y32.dtype == np.float32
    assert_scores_close(Y32, Y)


def test_tensor_in_tensor_out(X):
    T = torch.from_numpy(X)
    rp = TorchRandomProjection(8, proj_type="sjlt", n_nonzero=2, random_state=0).fit(T)
    assert rp.n_features_in_ == 500
    Y = rp.transform(T)
    assert isinstance(Y, torch.Tensor) and Y.device == T.device and Y.dtype == torch.float64
    np.testing.assert_array_equal(Y.numpy(), rp.transform(X))
    assert rp.transform(T.float()).dtype == torch.float64  # cast to dtype_
    with pytest.raises(ValueError, match="X has 499 features"):
        rp.transform(T[:, :499])
    with pytest.raises(ValueError, match="NaN or infinity"):
        rp.transform(torch.full((2, 500), float("nan")))
    with pytest.raises(ValueError, match="2D"):
        rp.transform(T[0])


def test_batches_and_refits_give_the_same_projection(X):
    rp = TorchRandomProjection(16, random_state=3).fit(X)
    Y = rp.transform(X)
    parts = np.concatenate([rp.transform(X[i : i + 7]) for i in range(0, 30, 7)])
    assert_scores_close(parts, Y)
    np.testing.assert_array_equal(TorchRandomProjection(16, random_state=3).fit_transform(X), Y)
    other = TorchRandomProjection(16, random_state=4).fit_transform(X)
    assert np.abs(other - Y).max() > 0.1 * np.abs(Y).max()


def test_pickle_clone_and_feature_names(X):
    rp = TorchRandomProjection(4, proj_type="rademacher", random_state=0)
    with pytest.raises(NotFittedError):
        rp.transform(X)
    rp.fit(X)
    Y = rp.transform(X)
    loaded = pickle.loads(pickle.dumps(rp))
    np.testing.assert_array_equal(loaded.transform(X), Y)
    cloned = clone(rp)
    assert cloned.get_params() == rp.get_params() and not hasattr(cloned, "projector_")
    np.testing.assert_array_equal(cloned.fit_transform(X), Y)
    assert list(rp.get_feature_names_out()) == [f"torchrandomprojection{i}" for i in range(4)]


def test_parameter_errors(X):
    with pytest.warns(DataDimensionalityWarning):
        TorchRandomProjection(600, random_state=0).fit(X)
    with pytest.raises(ValueError, match="n_nonzero=5 must not exceed"):
        TorchRandomProjection(4, proj_type="sjlt", n_nonzero=5).fit(X)
    with pytest.raises(ValueError):
        TorchRandomProjection(4, proj_type="fjlt").fit(X)
    with pytest.raises(ValueError):
        TorchRandomProjection(4, dtype="float16").fit(X)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            TorchRandomProjection(4, device="cuda").fit(X)
        rp = TorchRandomProjection(4, device="auto").fit(X)
        assert rp.device_ == torch.device("cpu")


@pytest.mark.gpu
def test_gpu_fit_cpu_transform(X):
    rp = TorchRandomProjection(16, random_state=0, device="cuda").fit(X)
    Y = rp.transform(X)
    T = rp.transform(torch.from_numpy(X).cuda())
    assert T.device.type == "cuda"
    assert_scores_close(T.cpu().numpy(), Y, rtol=1e-10)
    cpu = TorchRandomProjection(16, random_state=0, device="cpu").fit(X)
    assert_scores_close(cpu.transform(X), Y, rtol=1e-10)


def test_masks_keep_features(X):
    rp = TorchRandomProjection(5, proj_type="random_mask", random_state=0).fit(X)
    idx = rp.projector_.index.numpy()
    assert len(set(idx)) == 5
    np.testing.assert_array_equal(rp.transform(X), X[:, idx] * np.sqrt(500 / 5))
    # the selective mask selects from the values seen in fit: the loudest features
    Z = X.copy()
    loud = [3, 70, 499]
    Z[:, loud] *= 10.0
    sel = TorchRandomProjection(3, proj_type="selective_mask").fit(Z)
    assert sel.projector_.index_.tolist() == loud
    np.testing.assert_array_equal(sel.transform(X), X[:, loud])
    loaded = pickle.loads(pickle.dumps(sel))
    np.testing.assert_array_equal(loaded.transform(X), X[:, loud])
    with pytest.raises(ValueError, match="n_components <= n_features"):
        TorchRandomProjection(501, proj_type="random_mask").fit(X)
    with pytest.raises(ValueError, match="mask_dim=600 must not exceed"):
        TorchRandomProjection(4, proj_type="grass", mask_dim=600).fit(X)


def test_grass_is_mask_then_sjlt(X):
    rp = TorchRandomProjection(16, proj_type="grass", mask_dim=64, n_nonzero=2,
                               random_state=0).fit(X)
    mask, sjlt = rp.projector_.projectors_
    assert (mask.out_dim, sjlt.n_features, sjlt.out_dim, sjlt.n_nonzero) == (64, 64, 16, 2)
    np.testing.assert_array_equal(
        rp.transform(X), sjlt(mask(torch.from_numpy(X))).numpy())
    other = TorchRandomProjection(16, proj_type="grass", random_state=1).fit_transform(X)
    assert other.shape == (30, 16) and np.abs(other - rp.transform(X)).max() > 0
