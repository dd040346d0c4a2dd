import pickle
import random
import sys

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from skorch import NeuralNet

from skdattri.datasets import VOCAB, _loaders, _settings, decode, list_settings, load_setting
from skdattri.estimator_checks import assert_scores_close

CLEAN = [
    "digits-lr",
    "digits-mlp",
    "digits-cnn",
    "mnist1d-mlp",
    "fashion-mnist-lr",
    "fashion-mnist-mlp",
    "text-gpt",
]
CLASSIFICATION = [name for name in CLEAN if name != "text-gpt"]

# name -> (X shape after the sample axis, X dtype)
EXPECTED_X = {
    "digits-lr": ((64,), np.float64),
    "digits-mlp": ((64,), np.float32),
    "digits-cnn": ((1, 8, 8), np.float32),
    "mnist1d-mlp": ((40,), np.float32),
    "fashion-mnist-lr": ((784,), np.float64),
    "fashion-mnist-mlp": ((784,), np.float32),
    "text-gpt": ((32,), np.int64),
}


@pytest.fixture
def load(fake_fashion_home):
    """load_setting at small sizes; fashion-mnist reads the generated IDX files."""

    def _load(name, **kwargs):
        kwargs.setdefault("n_train", 40)
        kwargs.setdefault("n_test", 10)
        if name.startswith("fashion"):
            kwargs.setdefault("data_home", fake_fashion_home)
        return load_setting(name, **kwargs)

    return _load


def _fit_weights(estimator, X, y):
    estimator = clone(estimator)
    if isinstance(estimator, NeuralNet):
        estimator.set_params(max_epochs=1)
        estimator.fit(X, y)
        return {k: v.detach().clone() for k, v in estimator.module_.state_dict().items()}
    estimator.fit(X, y)
    return {
        "coef": torch.as_tensor(estimator.coef_),
        "intercept": torch.as_tensor(estimator.intercept_),
    }


def test_list_settings():
    names = list_settings()
    assert names[0] == "digits-lr"
    for name in CLEAN:
        assert name in names
    for name in CLASSIFICATION:
        assert name + "-noisy" in names
    assert "text-gpt-noisy" not in names


@pytest.mark.parametrize("name", CLEAN)
def test_setting_shapes_dtypes_and_metadata(load, name):
    s = load(name)
    tail, dtype = EXPECTED_X[name]
    assert s.X_train.shape == (40, *tail) and s.X_test.shape == (10, *tail)
    assert s.X_train.dtype == dtype and s.X_test.dtype == dtype
    assert s.y_train.dtype == np.int64 and s.y_test.dtype == np.int64
    assert s.name == name
    assert s.description and "\n" not in s.description
    assert len(s.DESCR) > len(s.description)
    assert "is_noisy" not in s
    if name == "text-gpt":
        assert s.task == "language-modeling"
        assert s.y_train.shape == (40, 32)
        # targets are the inputs shifted by one position
        np.testing.assert_array_equal(s.X_train[:, 1:], s.y_train[:, :-1])
        assert s.X_train.min() >= 0 and s.X_train.max() < len(VOCAB) == 96
        assert decode(s.X_train[0]).isascii()
    else:
        assert s.task == "classification" and s.n_classes == 10
        assert s.y_train.shape == (40,) and set(np.unique(s.y_train)) <= set(range(10))
    # train and test rows are distinct samples
    train_rows = {row.tobytes() for row in s.X_train}
    assert not any(row.tobytes() in train_rows for row in s.X_test)
    est = s.estimator
    if name.endswith("-lr"):
        assert isinstance(est, LogisticRegression)
    else:
        assert isinstance(est, NeuralNet)
        assert est.train_split is None and est.verbose == 0
        assert not hasattr(est, "module_")  # unfitted


@pytest.mark.parametrize("name", CLEAN)
def test_setting_is_deterministic(load, name):
    a, b = load(name, random_state=3), load(name, random_state=3)
    for key in ["X_train", "y_train", "X_test", "y_test"]:
        np.testing.assert_array_equal(a[key], b[key])
    wa = _fit_weights(a.estimator, a.X_train, a.y_train)
    # a pickled estimator (as joblib workers receive it) trains to the same weights
    wb = _fit_weights(pickle.loads(pickle.dumps(b.estimator)), b.X_train, b.y_train)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    c = load(name, random_state=4)
    assert not np.array_equal(a.X_train, c.X_train)


def test_random_state_instance_and_sizes(load):
    s = load("digits-lr", random_state=np.random.RandomState(0))
    np.testing.assert_array_equal(s.X_train, load("digits-lr", random_state=0).X_train)
    default = load_setting("digits-mlp")
    assert default.X_train.shape == (1000, 64) and default.X_test.shape == (200, 64)


def test_invalid_arguments(load):
    with pytest.raises(ValueError, match="Unknown setting 'nope'.*digits-lr"):
        load_setting("nope")
    with pytest.raises(ValueError, match="n_train=1797 exceeds"):
        load_setting("digits-lr", n_train=1797)
    with pytest.raises(ValueError, match="n_test=1000 exceeds"):
        load_setting("digits-lr", n_test=1000)
    with pytest.raises(ValueError, match="positive integer"):
        load_setting("digits-lr", n_train=0)
    with pytest.raises(ValueError, match="not a classification"):
        load_setting("text-gpt", noisy=True)


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_noisy_variant(load, name):
    clean = load(name, n_train=50)
    for noisy in [load(name + "-noisy", n_train=50), load(name, n_train=50, noisy=True)]:
        assert noisy.name == name + "-noisy"
        assert noisy.is_noisy.dtype == bool and noisy.is_noisy.shape == (50,)
        assert noisy.is_noisy.sum() == 5  # exactly 10%
        np.testing.assert_array_equal(noisy.X_train, clean.X_train)
        np.testing.assert_array_equal(noisy.y_train_clean, clean.y_train)
        flipped = noisy.y_train != noisy.y_train_clean
        np.testing.assert_array_equal(flipped, noisy.is_noisy)
        assert noisy.y_train.min() >= 0 and noisy.y_train.max() < 10
        np.testing.assert_array_equal(noisy.y_test, clean.y_test)
        assert noisy.estimator.get_params().keys() == clean.estimator.get_params().keys()
    again = load(name + "-noisy", n_train=50)
    np.testing.assert_array_equal(again.y_train, noisy.y_train)
    other = load(name + "-noisy", n_train=50, random_state=1)
    assert not np.array_equal(other.is_noisy, noisy.is_noisy)


def test_noisy_rate_rounds():
    s = load_setting("digits-lr-noisy", n_train=1000, n_test=10)
    assert s.is_noisy.sum() == 100
    assert load_setting("digits-lr-noisy", n_train=34, n_test=10).is_noisy.sum() == 3


@pytest.mark.parametrize(
    "name, n_train, min_accuracy",
    [
        ("digits-lr", 300, 0.85),
        ("digits-mlp", 300, 0.7),
        ("digits-cnn", 300, 0.7),
        ("mnist1d-mlp", 600, 0.25),
    ],
)
def test_models_train_above_chance(name, n_train, min_accuracy):
    s = load_setting(name, n_train=n_train, n_test=150)
    est = clone(s.estimator)  # the full recipe: a few hundred steps at this size
    accuracy = est.fit(s.X_train, s.y_train).score(s.X_test, s.y_test)
    assert accuracy > min_accuracy  # chance is 0.1


def test_text_gpt_trains_and_criterion_is_per_sample():
    s = load_setting("text-gpt", n_train=128, n_test=16)
    net = clone(s.estimator).set_params(max_epochs=3).fit(s.X_train, s.y_train)
    losses = net.history[:, "train_loss"]
    assert losses[-1] < losses[0] < np.log(len(VOCAB)) + 0.5
    out = net.forward(s.X_test)
    assert out.shape == (16, 32, 96)
    net.criterion_.reduction = "none"
    per_sample = net.criterion_(out, torch.as_tensor(s.y_test))
    assert per_sample.shape == (16,)
    net.criterion_.reduction = "mean"
    mean = net.criterion_(out, torch.as_tensor(s.y_test))
    assert_scores_close(per_sample.mean(), mean)
    assert mean.item() < np.log(len(VOCAB))  # better than uniform guessing


def test_mnist1d_restores_global_rng(monkeypatch):
    monkeypatch.setattr(_settings, "_MNIST1D_CACHE", None)
    random.seed(123)
    np.random.seed(123)
    py_state, np_state = random.getstate(), np.random.get_state()
    s = load_setting("mnist1d-mlp", n_train=20, n_test=5)
    assert s.X_train.shape == (20, 40)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]


def test_mnist1d_missing_package(monkeypatch):
    monkeypatch.setattr(_settings, "_MNIST1D_CACHE", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match="pip install mnist1d requests"):
        load_setting("mnist1d-mlp")


def test_fashion_mnist_missing_files(monkeypatch, tmp_path):
    monkeypatch.setattr(_loaders, "FASHION_MNIST_PATHS", [tmp_path / "absent"])
    for kwargs in [{}, {"data_home": tmp_path}]:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            load_setting("fashion-mnist-lr", **kwargs)


def test_fashion_mnist_uses_generated_files(load, fake_fashion_home):
    s = load("fashion-mnist-mlp", n_train=60, n_test=20)
    assert s.image_shape == (28, 28)
    assert 0.0 <= s.X_train.min() and s.X_train.max() <= 1.0
    with pytest.raises(ValueError, match="n_train=61 exceeds the 60"):
        load("fashion-mnist-lr", n_train=61)


@pytest.mark.skipif(
    not any(_loaders._find_idx(p, "train-images-idx3-ubyte") for p in _loaders.FASHION_MNIST_PATHS),
    reason="dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_installed_package():
    s = load_setting("fashion-mnist-lr", n_train=200, n_test=50)
    assert s.X_train.shape == (200, 784)
    assert set(np.unique(s.y_train)) == set(range(10))
