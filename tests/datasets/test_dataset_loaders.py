import pickle

import numpy as np
import pytest

from skdattri.datasets import _loaders, load_cifar10, load_fashion_mnist, load_mnist
from skdattri.datasets._loaders import _read_idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("kind", ["train", "t10k"])
def test_load_mnist_roundtrip(tmp_path, write_mnist_folder, gz, kind):
    written = write_mnist_folder(tmp_path, n_train=7, n_test=5, rows=4, cols=3, gz=gz)
    images, labels = load_mnist(tmp_path, kind=kind)
    np.testing.assert_array_equal(images, written[kind][0])
    np.testing.assert_array_equal(labels, written[kind][1])
    assert images.dtype == np.uint8 and images.shape[1:] == (4, 3)
    assert labels.dtype == np.int64


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_every_type_code(tmp_path, write_idx, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(np.dtype(dtype).newbyteorder("="))
    if dtype == "u1":
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", array)
    out = _read_idx(tmp_path / "a.idx")
    assert out.shape == (2, 3, 4)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_load_mnist_torchvision_layout_and_dotted_names(tmp_path, write_idx):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28) % 256
    write_idx(raw / "t10k-images.idx3-ubyte", images.astype(np.uint8))
    write_idx(raw / "t10k-labels.idx1-ubyte", np.array([9, 2], np.uint8))
    X, y = load_mnist(tmp_path, kind="t10k")
    assert X.shape == (2, 28, 28)
    assert y.tolist() == [9, 2]


def test_load_mnist_errors(tmp_path, write_idx):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        load_mnist(tmp_path, kind="test")
    # images and labels of different lengths
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="labels"):
        load_mnist(tmp_path)


def test_read_idx_rejects_malformed_files(tmp_path, write_idx):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(ValueError, match="not an IDX file"):
        _read_idx(bad_magic)
    bad_code = tmp_path / "code"
    bad_code.write_bytes(bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(ValueError, match="type code"):
        _read_idx(bad_code)
    write_idx(tmp_path / "ok", np.zeros((4, 2), np.uint8))
    truncated = tmp_path / "truncated"
    truncated.write_bytes((tmp_path / "ok").read_bytes()[:-1])
    with pytest.raises(ValueError, match="data bytes"):
        _read_idx(truncated)


def test_load_fashion_mnist_from_data_home(fake_fashion_home):
    X, y = load_fashion_mnist(fake_fashion_home)
    assert X.shape == (60, 28, 28) and y.shape == (60,)
    X_test, _ = load_fashion_mnist(fake_fashion_home, kind="t10k")
    assert X_test.shape == (20, 28, 28)


def test_load_fashion_mnist_searches_default_paths(monkeypatch, tmp_path, fake_fashion_home):
    monkeypatch.setattr(_loaders, "FASHION_MNIST_PATHS", [tmp_path / "absent", fake_fashion_home])
    X, _ = load_fashion_mnist()
    assert X.shape == (60, 28, 28)


def test_load_fashion_mnist_missing_message(monkeypatch, tmp_path):
    monkeypatch.setattr(_loaders, "FASHION_MNIST_PATHS", [tmp_path / "absent"])
    for kwargs in [{}, {"data_home": tmp_path}]:
        with pytest.raises(FileNotFoundError) as info:
            load_fashion_mnist(**kwargs)
        message = str(info.value)
        assert "apt-get install dataset-fashion-mnist" in message
        assert "data_home=" in message
        assert str(tmp_path) in message


def _write_cifar(folder, *, bytes_keys=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        keys = (b"data", b"labels") if bytes_keys else ("data", "labels")
        with open(folder / name, "wb") as f:
            pickle.dump({keys[0]: data, keys[1]: labels, b"batch_label": b"x"}, f)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_load_cifar10(tmp_path, bytes_keys):
    written = _write_cifar(tmp_path / "cifar-10-batches-py", bytes_keys=bytes_keys)
    X, y = load_cifar10(tmp_path)
    assert X.shape == (15, 3, 32, 32) and X.dtype == np.uint8
    assert y.dtype == np.int64
    expected_y = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert y.tolist() == expected_y
    # rows are stored channel-major: first 1024 bytes red, next green, last blue
    first = written["data_batch_1"][0][0]
    np.testing.assert_array_equal(X[0, 0].ravel(), first[:1024])
    np.testing.assert_array_equal(X[0, 2].ravel(), first[2048:])
    X_test, y_test = load_cifar10(tmp_path / "cifar-10-batches-py", kind="test")
    assert X_test.shape == (3, 3, 32, 32)
    assert y_test.tolist() == written["test_batch"][1]


def test_load_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        load_cifar10(tmp_path, kind="t10k")
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        load_cifar10(tmp_path, kind="test")
