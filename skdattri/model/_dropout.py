"""Dropout ensembles: every ensemble member is the network with its own fixed masks.

A member is marked by a :data:`DROPOUT_SEED` entry in its parameter dict (see
:func:`dropout_member`); :meth:`skdattri.model.TorchModel.forward` then runs the module
(in eval mode) with a forward hook on each ``nn.Dropout`` that multiplies the layer's
input by a mask drawn once from ``(seed, index of the dropout layer, sample shape)``
and rescaled by ``1 / (1 - p)``, as training-mode dropout does.

The mask depends neither on the sample nor on the batch: one member is one fixed
sub-network, so a training sample and a query are scored by the same function, and
results do not depend on ``batch_size`` or on whether the per-sample gradients come
from layer hooks (a batch of ``n``) or from ``torch.func.vmap`` (one sample at a time).
The masks are drawn with numpy from the seed, not with torch's random generators, so
they are reproducible, identical on CPU and CUDA, and no random operation runs inside
``vmap``. Only ``nn.Dropout`` modules that are called are masked (dropout applied with
``torch.nn.functional.dropout`` inside another module is not).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

__all__ = ["DROPOUT_SEED", "dropout_member", "dropout_modules"]

#: Key of a member's parameter dict holding its dropout seed (no module name has ``<``).
DROPOUT_SEED = "<dropout seed>"


def dropout_modules(module):
    """The ``nn.Dropout`` modules of ``module``, ``[(name, layer), ...]`` in module order."""
    return [(name, mod) for name, mod in module.named_modules() if isinstance(mod, nn.Dropout)]


def dropout_member(params, seed):
    """``params`` as the parameters of the dropout-ensemble member ``seed``.

    Parameters
    ----------
    params : dict of str to Tensor
    seed : int
        Non-negative seed of the member's masks.

    Returns
    -------
    member : dict of str to Tensor
        ``params`` with a :data:`DROPOUT_SEED` entry.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skdattri.model import dropout_member, make_model
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    >>> model = make_model(net, loss="cross_entropy")
    >>> X = torch.randn(3, 4)
    >>> a = model.forward(dropout_member(model.named_params(), 1), X)
    >>> b = model.forward(dropout_member(model.named_params(), 1), X)
    >>> c = model.forward(dropout_member(model.named_params(), 2), X)
    >>> bool(torch.equal(a, b)), bool(torch.equal(a, c))
    (True, False)
    """
    return {**params, DROPOUT_SEED: torch.tensor(int(seed), dtype=torch.int64)}


class _MaskHook:
    """Forward hook of one dropout layer: the input times the member's fixed mask."""

    def __init__(self, seed, index):
        self.seed, self.index = seed, index

    def __call__(self, mod, args, output):
        x, p = args[0], float(mod.p)
        if p == 0.0:
            return x
        if p >= 1.0:
            return x * 0.0
        shape = tuple(x.shape[1:])  # one sample's shape: broadcast over the batch
        keep = np.random.default_rng([self.seed, self.index]).random(shape) >= p
        mask = torch.from_numpy(keep).to(device=x.device, dtype=x.dtype)
        return x * (mask / (1.0 - p))


@contextlib.contextmanager
def _fixed_dropout(module, seed):
    """Inside: the dropout layers of ``module`` apply member ``seed``'s masks."""
    if seed is None:
        yield
        return
    seed = int(seed)
    handles = [mod.register_forward_hook(_MaskHook(seed, k))
               for k, (_, mod) in enumerate(dropout_modules(module))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
