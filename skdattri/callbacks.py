"""Recorders of a training run: what attribution methods need from the path to a model.

:class:`TrainingRecorder` keeps checkpoints (state dicts) and learning rates, as a skorch
callback or called from a plain torch training loop; TracIn sums over them.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
from sklearn.utils._param_validation import (
    Interval,
    InvalidParameterError,
    validate_parameter_constraints,
)
from skorch.callbacks import Callback

__all__ = ["TrainingRecorder"]


def _cpu_state(module):
    """A CPU copy of ``module.state_dict()`` that later training cannot change."""
    return {name: value.detach().to("cpu", copy=True)
            for name, value in module.state_dict().items()}


def _mean_lr(optimizer):
    """Learning rate of ``optimizer``, averaged over its parameter groups."""
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


class TrainingRecorder(Callback):
    """Record checkpoints and learning rates along a training run.

    A skorch callback: after each chosen epoch it keeps a CPU copy of the net's
    ``module_.state_dict()`` and the learning rate that epoch was trained with. The same
    object records from a plain torch loop through :meth:`record`. The recorded lists are
    what :class:`~skdattri.TracIn` takes as ``checkpoints`` and ``learning_rates``.

    Parameters
    ----------
    epochs : None, int or array-like of int, default=None
        Epochs (counted from 1, as skorch's ``history`` counts them) after which a
        checkpoint is kept by the callback. ``None``: every epoch. An int ``k``: every
        ``k``-th epoch, and the last epoch of each ``fit`` (also when training stops early).
        An array-like: exactly those epochs (those training reaches). :meth:`record`
        ignores it: a call always records.

    Attributes
    ----------
    checkpoints_ : list of dict
        One state dict per checkpoint, parameter name to a CPU tensor (a copy, not a view
        of the live weights), in training order.
    learning_rates_ : list of float
        Learning rate in effect at each checkpoint: the mean over the optimiser's
        parameter groups at the start of the recorded epoch (skorch), or what was given to
        :meth:`record`.
    epochs_ : list of int
        Epoch of each checkpoint.

    See Also
    --------
    skdattri.TracIn : TracInCP sums gradient similarities over these checkpoints,
        weighted by their learning rates.

    Notes
    -----
    skorch calls :meth:`initialize` at the start of every ``fit`` (not ``partial_fit`` on
    an initialised net), which validates ``epochs`` and empties the recorded lists; a
    ``partial_fit`` goes on appending, with the epochs numbered on from the history.

    The learning rate is read when an epoch begins, so an epoch-wise scheduler stepping
    at the end of that epoch does not leak the next epoch's rate into it. The copies are
    on the CPU whatever the net's device, so GPU memory does not grow with the number of
    checkpoints, and the recorder pickles.

    The names ``on_batch_end`` and ``step`` are reserved for recording per optimisation
    step (the per-sample gradients and step sizes of every update, as data value
    embeddings, DVEmb, need) in a later version: a skorch hook and its plain-loop twin,
    as ``on_epoch_end`` and :meth:`record` are here.

    References
    ----------
    .. [1] G. Pruthi, F. Liu, S. Kale and M. Sundararajan, "Estimating Training Data
       Influence by Tracing Gradient Descent", NeurIPS 2020.

    Examples
    --------
    As a skorch callback, every second epoch and the last:

    >>> import numpy as np
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from skorch import NeuralNetClassifier
    >>> from skdattri import TracIn
    >>> from skdattri.callbacks import TrainingRecorder
    >>> X, y = load_digits(return_X_y=True)
    >>> X = (X / 16).astype(np.float32)
    >>> _ = torch.manual_seed(0)
    >>> recorder = TrainingRecorder(epochs=2)
    >>> net = NeuralNetClassifier(torch.nn.Linear(64, 10), criterion=torch.nn.CrossEntropyLoss,
    ...                           lr=0.1, max_epochs=5, train_split=None, verbose=0,
    ...                           callbacks=[recorder]).fit(X, y)
    >>> recorder.epochs_, recorder.learning_rates_
    ([2, 4, 5], [0.1, 0.1, 0.1])
    >>> sorted(recorder.checkpoints_[-1])
    ['bias', 'weight']
    >>> tracin = TracIn(net, checkpoints=recorder.checkpoints_,
    ...                 learning_rates=recorder.learning_rates_)
    >>> tracin.fit(X[:100], y[:100]).transform(X[100:103], y[100:103]).shape
    (3, 100)

    In a plain torch loop:

    >>> module = torch.nn.Linear(64, 10)
    >>> optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    >>> Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    >>> recorder = TrainingRecorder()
    >>> for epoch in range(3):
    ...     optimizer.zero_grad()
    ...     torch.nn.functional.cross_entropy(module(Xt), yt).backward()
    ...     optimizer.step()
    ...     recorder.record(module, optimizer=optimizer)
    >>> recorder.epochs_, recorder.learning_rates_
    ([1, 2, 3], [0.05, 0.05, 0.05])
    """

    _parameter_constraints: dict = {
        "epochs": [None, Interval(Integral, 1, None, closed="left"), "array-like"],
    }

    def __init__(self, epochs=None):
        self.epochs = epochs

    def initialize(self):
        """Validate ``epochs`` and empty the recorded lists (skorch calls it in ``fit``).

        Returns
        -------
        self : TrainingRecorder
        """
        validate_parameter_constraints(self._parameter_constraints,
                                       {"epochs": self.epochs},
                                       caller_name=type(self).__name__)
        if isinstance(self.epochs, bool | np.bool_):
            bad = True  # an Integral to Python, but not a number of epochs
        elif self.epochs is None or isinstance(self.epochs, Integral):
            bad = False
        else:
            chosen = np.asarray(self.epochs)
            bad = chosen.ndim != 1 or (chosen.size > 0 and (chosen.dtype.kind not in "iu"
                                                            or chosen.min() < 1))
        if bad:
            raise InvalidParameterError(
                f"The 'epochs' parameter of {type(self).__name__} must be None, an int "
                f">= 1 or a 1-d array-like of ints >= 1. Got {self.epochs!r} instead."
            )
        self.checkpoints_ = []
        self.learning_rates_ = []
        self.epochs_ = []
        self._epoch_lr_ = None
        return self

    def record(self, module, *, lr=None, optimizer=None, epoch=None):
        """Append one checkpoint: a CPU copy of ``module.state_dict()`` and a learning rate.

        Parameters
        ----------
        module : torch.nn.Module
            The model being trained (anything with a ``state_dict()`` of tensors).
        lr : float, default=None
            Learning rate in effect. Give ``lr`` or ``optimizer``, not both; with neither,
            1.0 (checkpoints weighted equally).
        optimizer : torch.optim.Optimizer, default=None
            Its learning rate, averaged over its parameter groups, is recorded.
        epoch : int, default=None
            Recorded in ``epochs_``; ``None``: one more than the previous one (1 first).
        """
        if lr is not None and optimizer is not None:
            raise ValueError("Give the learning rate as lr or through optimizer, not both.")
        if not hasattr(self, "checkpoints_"):
            self.initialize()
        if optimizer is not None:
            lr = _mean_lr(optimizer)
        if epoch is None:
            epoch = self.epochs_[-1] + 1 if self.epochs_ else 1
        self.checkpoints_.append(_cpu_state(module))
        self.learning_rates_.append(1.0 if lr is None else float(lr))
        self.epochs_.append(int(epoch))

    def _wants(self, epoch):
        if self.epochs is None:
            return True
        if isinstance(self.epochs, Integral):
            return epoch % int(self.epochs) == 0
        return epoch in {int(e) for e in np.ravel(self.epochs)}

    def on_epoch_begin(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        """Note the learning rate this epoch trains with."""
        self._epoch_lr_ = _mean_lr(net.optimizer_)

    def on_epoch_end(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        """Record the module when the epoch is one of ``epochs``."""
        epoch = len(net.history)
        if self._wants(epoch):
            self.record(net.module_, lr=self._epoch_lr_, epoch=epoch)

    def on_train_end(self, net, X=None, y=None, **kwargs):
        """With an int ``epochs``, record the last epoch if it was not a multiple."""
        epoch = len(net.history)
        done = bool(self.epochs_) and self.epochs_[-1] == epoch
        if isinstance(self.epochs, Integral) and epoch > 0 and not done:
            self.record(net.module_, lr=self._epoch_lr_, epoch=epoch)
