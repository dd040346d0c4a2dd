"""Recorders of a training run: what attribution methods need from the path to a model.

:class:`TrainingRecorder` keeps checkpoints (state dicts) and learning rates, and per
optimisation step the (projected) per-sample gradients of the batch with its training
row indices and learning rate; as a skorch callback or called from a plain torch
training loop. TracIn sums over the checkpoints; DVEmb replays the steps backwards.
"""

from __future__ import annotations

import os
from numbers import Integral

import numpy as np
import torch
from sklearn.utils._param_validation import (
    Interval,
    InvalidParameterError,
    StrOptions,
    validate_parameter_constraints,
)
from skorch.callbacks import Callback

from ._rowmatch import RowMatcher, row_keys
from ._utils import _rows_per_block, _seed_from, _tree_to
from .func._grad import model_per_sample_grads
from .func.projection import DATA_FREE_PROJ_TYPES

__all__ = ["TrainingRecorder"]


def _cpu_state(module):
    """A CPU copy of ``module.state_dict()`` that later training cannot change."""
    return {name: value.detach().to("cpu", copy=True)
            for name, value in module.state_dict().items()}


def _mean_lr(optimizer):
    """Learning rate of ``optimizer``, averaged over its parameter groups."""
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def _mean_weight_decay(optimizer):
    """``weight_decay`` of ``optimizer`` (0 when it has none), averaged over its groups."""
    values = [float(group.get("weight_decay", 0.0) or 0.0) for group in optimizer.param_groups]
    return sum(values) / len(values)


def _device_of(module):
    """Device of a module's first parameter (the CPU when it has none)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _live_params(module):
    """Detached parameters and buffers of the module being trained (no copy)."""
    state = {n: b.detach() for n, b in module.named_buffers()}
    state.update({n: p.detach() for n, p in module.named_parameters()})
    return state


class TrainingRecorder(Callback):
    """Record checkpoints, learning rates and per-step gradients along a training run.

    A skorch callback: after each chosen epoch it keeps a CPU copy of the net's
    ``module_.state_dict()`` and the learning rate that epoch was trained with, and
    (``keep="gradients"`` or ``"both"``) before every optimisation step the per-sample
    gradients of the step's batch at the parameters the step starts from, projected
    when ``proj_dim`` is set, with the batch's training-row indices, its learning rate
    and weight decay. The same object records from a plain torch loop through
    :meth:`record` (a checkpoint) and :meth:`step` (an optimisation step). The
    checkpoints are what :class:`~skdattri.TracIn` takes; the steps are what
    :class:`~skdattri.DVEmb` replays.

    Parameters
    ----------
    epochs : None, int or array-like of int, default=None
        Epochs (counted from 1, as skorch's ``history`` counts them) after which a
        checkpoint is kept by the callback. ``None``: every epoch. An int ``k``: every
        ``k``-th epoch, and the last epoch of each ``fit`` (also when training stops early).
        An array-like: exactly those epochs (those training reaches). :meth:`record`
        ignores it: a call always records.
    keep : {"checkpoints", "gradients", "both"}, default="checkpoints"
        What the skorch hooks record: checkpoints at the chosen ``epochs``, the
        gradients of every training batch, or both. :meth:`record` and :meth:`step`
        record whatever they are called for.
    proj_dim : int, default=None
        Project the per-sample gradients to this many coordinates before they are
        kept (``None``: full gradients). One projection for the whole run.
    proj_type : {"gaussian", "rademacher", "sjlt", "random_mask", "grass"}, \
default="gaussian"
        Kind of random projection (:func:`skdattri.func.projection.make_projector`;
        the data-free kinds only, since gradients arrive one step at a time).
    random_state : int, RandomState instance or None, default=None
        Seed of the projection (drawn once per ``fit`` of the net).
    layers : str or list of str, default=None
        Restrict the gradients to parameters whose names start with these prefixes.
    loss : {"cross_entropy", "mse"}, torch loss module or callable, default=None
        Per-sample loss of a plain ``nn.Module`` in :meth:`step`; a skorch net's own
        criterion is used when ``None``. The training loss is the batch mean of it.
    store : None, "memory", str or path-like, default=None
        Where the recorded gradients are kept: in memory, or in files under this
        directory (:func:`skdattri.store.make_store`), in chunks of consecutive steps.

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
    step_indices_ : list of Tensor of shape (batch,)
        Training-row indices (int64) of each recorded optimisation step's batch: rows
        of the ``X`` the net was fitted on, or the ``indices`` given to :meth:`step`.
    step_learning_rates_ : list of float
        Learning rate of each recorded step (mean over the parameter groups).
    step_weight_decays_ : list of float
        Weight decay of the optimiser at each step (0 without an optimiser).
    param_names_ : list of str
        Parameters the recorded gradients cover, in column order.
    projector_ : object or None
        The projection applied to every recorded gradient (``None``: full gradients).
    n_rows_ : int or None
        Number of rows of the ``X`` the skorch net was fitted on (``None`` from
        :meth:`step`).

    See Also
    --------
    skdattri.TracIn : TracInCP sums gradient similarities over these checkpoints,
        weighted by their learning rates.
    skdattri.DVEmb : Data value embeddings from the recorded steps.

    Notes
    -----
    skorch calls :meth:`initialize` at the start of every ``fit`` (not ``partial_fit`` on
    an initialised net), which validates the parameters and empties the recorded lists; a
    ``partial_fit`` goes on appending, with the epochs numbered on from the history.

    The learning rate is read when an epoch (a batch) begins, so a scheduler stepping
    at its end does not leak the next rate into it. Checkpoints and gradients are kept
    on the CPU (or on disk) whatever the net's device, and the recorder pickles.

    **Which rows a skorch batch holds.** skorch gives callbacks the batch, not the
    positions of its rows in ``X``, and a shuffled ``DataLoader`` draws them in an
    order the callback cannot see. The recorder therefore matches rows by content: at
    the start of training it iterates the training dataset once in order and keys
    every row ``(X_i, y_i)`` by a 64-bit hash of its exact bytes; each training batch's
    rows are then looked up in that table (vectorised). This works for any sampler,
    shuffling, ``drop_last`` and validation split (the indices are rows of the ``X``
    given to ``fit``), but needs the batches to hold the rows themselves: a dataset
    with random augmentation raises ``ValueError`` at the first batch (record from a
    torch loop with :meth:`step` then). Identical rows share a key and their draws
    go to the copies in turn; the run is the same whichever copy is drawn.

    Gradients are per-sample gradients of the loss (the module in eval mode, as every
    attributor evaluates it) at the weights before the optimiser step, taken by
    :func:`skdattri.func._grad.model_per_sample_grads`; the batch's update is
    ``-lr * mean_i g_i`` for plain SGD. Momentum or adaptive optimisers are recorded
    as they are, but :class:`~skdattri.DVEmb` models plain SGD steps.

    References
    ----------
    .. [1] G. Pruthi, F. Liu, S. Kale and M. Sundararajan, "Estimating Training Data
       Influence by Tracing Gradient Descent", NeurIPS 2020.
    .. [2] J. T. Wang, D. Song, J. Zou, P. Mittal and R. Jia, "Capturing the Temporal
       Dependence of Training Data Influence", 2024.

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

    In a plain torch loop, checkpoints after every epoch and the gradients of every step:

    >>> module = torch.nn.Linear(64, 10)
    >>> optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    >>> Xt, yt = torch.from_numpy(X[:200]), torch.from_numpy(y[:200])
    >>> recorder = TrainingRecorder(proj_dim=32, loss="cross_entropy", random_state=0)
    >>> for epoch in range(3):
    ...     for idx in torch.randperm(200).split(50):
    ...         recorder.step(module, Xt[idx], yt[idx], idx, optimizer=optimizer)
    ...         optimizer.zero_grad()
    ...         torch.nn.functional.cross_entropy(module(Xt[idx]), yt[idx]).backward()
    ...         optimizer.step()
    ...     recorder.record(module, optimizer=optimizer)
    >>> recorder.epochs_, len(recorder.step_indices_), recorder.step_gradients(0).shape
    ([1, 2, 3], 12, torch.Size([50, 32]))
    """

    _parameter_constraints: dict = {
        "epochs": [None, Interval(Integral, 1, None, closed="left"), "array-like"],
        "keep": [StrOptions({"checkpoints", "gradients", "both"})],
        "proj_dim": [None, Interval(Integral, 1, None, closed="left")],
        "proj_type": [StrOptions(set(DATA_FREE_PROJ_TYPES))],
        "random_state": ["random_state"],
        "layers": [None, str, list, tuple],
        "loss": [None, StrOptions({"cross_entropy", "mse"}), callable],
        "store": [None, str, os.PathLike],
    }

    def __init__(self, epochs=None, *, keep="checkpoints", proj_dim=None,
                 proj_type="gaussian", random_state=None, layers=None, loss=None,
                 store=None):
        self.epochs = epochs
        self.keep = keep
        self.proj_dim = proj_dim
        self.proj_type = proj_type
        self.random_state = random_state
        self.layers = layers
        self.loss = loss
        self.store = store

    def initialize(self):
        """Validate the parameters and empty the recorded lists (skorch calls it in ``fit``).

        Returns
        -------
        self : TrainingRecorder
        """
        validate_parameter_constraints(self._parameter_constraints, self.get_params(),
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
        self.step_indices_ = []
        self.step_learning_rates_ = []
        self.step_weight_decays_ = []
        self.param_names_ = None
        self.projector_ = None
        self.n_rows_ = None
        self._seed_ = _seed_from(self.random_state)
        self._model_ = self._source_ = self._matcher_ = None
        self._stores_, self._where_, self._pending_ = [], [], []
        return self

    def _started(self):
        if not hasattr(self, "checkpoints_"):
            self.initialize()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_model_"] = state["_source_"] = None  # rebuilt from the module when needed
        return state

    # ------------------------------------------------------------------ checkpoints
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
        self._started()
        if optimizer is not None:
            lr = _mean_lr(optimizer)
        if epoch is None:
            epoch = self.epochs_[-1] + 1 if self.epochs_ else 1
        self.checkpoints_.append(_cpu_state(module))
        self.learning_rates_.append(1.0 if lr is None else float(lr))
        self.epochs_.append(int(epoch))

    # ------------------------------------------------------------------ steps
    def step(self, module, X, y, indices, *, lr=None, optimizer=None, weight_decay=None):
        """Record one optimisation step: call it before ``optimizer.step()``.

        Computes the per-sample gradients of the batch at the module's current weights
        (those the step starts from), projects them when ``proj_dim`` is set and keeps
        them with the batch's training-row ``indices`` and the step's learning rate.

        Parameters
        ----------
        module : torch.nn.Module
            The model being trained (its live weights are read, not copied).
        X : Tensor or dict of Tensor
            The batch's inputs, as the module takes them.
        y : Tensor or array-like
            The batch's targets.
        indices : array-like of int of shape (batch,)
            Positions of the batch's rows in the training set.
        lr : float, default=None
            The step's learning rate; give ``lr`` or ``optimizer``.
        optimizer : torch.optim.Optimizer, default=None
            Its learning rate and weight decay (means over the parameter groups).
        weight_decay : float, default=None
            The step's L2 weight decay (default: the optimiser's, else 0).
        """
        if (lr is None) == (optimizer is None):
            raise ValueError("Give the step's learning rate as lr or through optimizer "
                             "(exactly one of them).")
        self._started()
        if optimizer is not None:
            lr = _mean_lr(optimizer)
            if weight_decay is None:
                weight_decay = _mean_weight_decay(optimizer)
        self._ensure_model(module, module, X)
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
        self._record_step(module, X, y, indices, float(lr), float(weight_decay or 0.0))

    def _ensure_model(self, estimator, module, X):
        """The functional copy of ``module`` (``estimator``: it or its skorch net), built
        at its first step (lazy modules are materialised by an eval-mode forward pass)."""
        if self._source_ is module:
            return
        from torch.nn.parameter import is_lazy

        from .model import make_model

        if any(is_lazy(p) for p in module.parameters()):
            was_training = module.training
            device = next(module.parameters()).device
            Xd = ({k: torch.as_tensor(v).to(device) for k, v in X.items()}
                  if isinstance(X, dict) else torch.as_tensor(X).to(device))
            try:
                module.eval()
                with torch.no_grad():
                    module(**Xd) if isinstance(Xd, dict) else module(Xd)
            finally:
                module.train(was_training)
        model = make_model(estimator, loss=self.loss, device=_device_of(module))
        names = model.select(self.layers)
        if self.param_names_ is not None and names != self.param_names_:
            raise ValueError("The recorder's steps come from models with different "
                             f"parameters: {self.param_names_} and {names}.")
        self._model_, self._source_, self.param_names_ = model, module, names

    def _record_step(self, module, X, y, indices, lr, weight_decay):
        model = self._model_
        device = next(iter(model.named_params().values())).device
        Xb = _tree_to(model.to_tensor_X(X), device)
        yb = model.to_tensor_y(y).to(device)
        if yb.shape[0] != indices.shape[0]:
            raise ValueError(f"The batch has {yb.shape[0]} rows but {indices.shape[0]} "
                             "indices.")
        with torch.no_grad():
            G = model_per_sample_grads(model, _live_params(module), Xb, yb, "loss",
                                       names=self.param_names_)
            if self.proj_dim is not None and self.projector_ is None \
                    and self.proj_dim < G.shape[1]:
                from .func.projection import make_projector

                self.projector_ = make_projector(
                    G.shape[1], self.proj_dim, proj_type=self.proj_type,
                    random_state=self._seed_, device=device, dtype=model.dtype)
            if self.projector_ is not None:
                G = self.projector_(G)
        self._pending_.append(G.detach().to("cpu", copy=True))
        self.step_indices_.append(indices.clone())
        self.step_learning_rates_.append(lr)
        self.step_weight_decays_.append(weight_decay)
        if sum(g.shape[0] for g in self._pending_) >= _rows_per_block(G.shape[1]):
            self._flush()

    def _flush(self):
        """Move the pending steps' gradients into one store (memory or disk)."""
        if not self._pending_:
            return
        from .store import make_store

        G = torch.cat(self._pending_)
        store = make_store(G.shape[0], G.shape[1], dtype=G.dtype, store=self.store,
                           name="recorded_steps")
        store.write(slice(0, G.shape[0]), G)
        self._stores_.append(store.finalize())
        start = 0
        for g in self._pending_:
            self._where_.append((len(self._stores_) - 1, start, start + g.shape[0]))
            start += g.shape[0]
        self._pending_ = []

    @property
    def n_steps_(self):
        """Number of recorded optimisation steps."""
        return len(getattr(self, "step_indices_", []))

    def step_gradients(self, t):
        """Per-sample gradients ``(batch, width)`` recorded at step ``t`` (CPU tensor)."""
        self._flush()
        store, start, stop = self._where_[t]
        return self._stores_[store][start:stop]

    # ------------------------------------------------------------------ skorch hooks
    def _wants(self, epoch):
        if self.epochs is None:
            return True
        if isinstance(self.epochs, Integral):
            return epoch % int(self.epochs) == 0
        return epoch in {int(e) for e in np.ravel(self.epochs)}

    def _checkpoints_kept(self):
        return self.keep in ("checkpoints", "both")

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        """With ``keep`` recording gradients: key the training rows (see Notes)."""
        if self.keep == "checkpoints":
            return
        from skorch.dataset import unpack_data

        self._started()
        dataset = net.get_dataset(X, y)
        collate = net.get_params_for("iterator_train").get("collate_fn")
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=1024, shuffle=False,
            **({} if collate is None else {"collate_fn": collate}))
        keys = torch.cat([row_keys(unpack_data(batch)) for batch in loader])
        matcher = RowMatcher(keys)
        if self.n_steps_ and self._matcher_ is not None \
                and not self._matcher_.same_rows(matcher):
            raise ValueError("partial_fit on other rows than the recorded steps' X: their "
                             "training indices would not refer to one training set.")
        if self._matcher_ is None or not self._matcher_.same_rows(matcher):
            self._matcher_ = matcher
        self.n_rows_ = matcher.n_rows
        self._model_ = self._source_ = None  # built at the first batch

    def on_batch_begin(self, net, batch=None, training=False, **kwargs):
        """Record a training batch's gradients before the optimiser steps on it."""
        if not training or self.keep == "checkpoints":
            return
        from skorch.dataset import unpack_data

        Xi, yi = unpack_data(batch)
        indices = self._matcher_((Xi, yi))
        self._ensure_model(net, net.module_, Xi)
        optimizer = net.optimizer_
        self._record_step(net.module_, Xi, yi, indices, _mean_lr(optimizer),
                          _mean_weight_decay(optimizer))

    def on_epoch_begin(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        """Note the learning rate this epoch trains with."""
        self._epoch_lr_ = _mean_lr(net.optimizer_)

    def on_epoch_end(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        """Record the module when the epoch is one of ``epochs``."""
        epoch = len(net.history)
        if self._checkpoints_kept() and self._wants(epoch):
            self.record(net.module_, lr=self._epoch_lr_, epoch=epoch)

    def on_train_end(self, net, X=None, y=None, **kwargs):
        """With an int ``epochs``, record the last epoch if it was not a multiple; close
        the last chunk of recorded gradients."""
        self._flush()
        epoch = len(net.history)
        done = bool(self.epochs_) and self.epochs_[-1] == epoch
        if self._checkpoints_kept() and isinstance(self.epochs, Integral) and epoch > 0 \
                and not done:
            self.record(net.module_, lr=self._epoch_lr_, epoch=epoch)
