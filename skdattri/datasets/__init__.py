"""Benchmark settings built on data installed locally, and readers for local dataset files.

Nothing in this package downloads data.  :func:`load_setting` returns train/test arrays
together with an unfitted, seeded model and its training recipe; :func:`list_settings`
names the settings.  :func:`load_mnist`, :func:`load_fashion_mnist` and
:func:`load_cifar10` read the standard file formats from a folder the user provides.
"""

from ._loaders import FASHION_MNIST_PATHS, load_cifar10, load_fashion_mnist, load_mnist
from ._modules import MLP, CharTransformer, SequenceCrossEntropy, SmallConvNet
from ._settings import NOISE_RATE, list_settings, load_setting
from ._text import VOCAB, decode

__all__ = [
    "list_settings",
    "load_setting",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "FASHION_MNIST_PATHS",
    "NOISE_RATE",
    "MLP",
    "SmallConvNet",
    "CharTransformer",
    "SequenceCrossEntropy",
    "VOCAB",
    "decode",
]
