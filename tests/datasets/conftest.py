"""Fixtures writing small files in the formats the dataset loaders read."""

import gzip

import numpy as np
import pytest

_CODES = {
    np.dtype("u1"): 0x08,
    np.dtype("i1"): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def _write_idx(path, array, *, gz=False):
    """Write ``array`` as an IDX file (big-endian data, header: 0, 0, type code, ndim, dims)."""
    array = np.asarray(array)
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, _CODES[big], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.astype(big).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)


def _write_mnist_folder(folder, *, n_train, n_test, rows=28, cols=28, gz=True, seed=0):
    """Write the four MNIST-format files of a small random dataset; return its arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    suffix = ".gz" if gz else ""
    for kind, n in [("train", n_train), ("t10k", n_test)]:
        images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(folder / f"{kind}-images-idx3-ubyte{suffix}", images, gz=gz)
        _write_idx(folder / f"{kind}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        out[kind] = (images, labels)
    return out


@pytest.fixture
def write_idx():
    """The IDX writer, as a fixture so test modules need not import this conftest."""
    return _write_idx


@pytest.fixture
def write_mnist_folder():
    return _write_mnist_folder


@pytest.fixture
def fake_fashion_home(tmp_path):
    folder = tmp_path / "fashion"
    folder.mkdir()
    _write_mnist_folder(folder, n_train=60, n_test=20)
    return folder
