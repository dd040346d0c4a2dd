"""Training a benchmark setting's model once, with the checkpoints TracIn sums over."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from skorch import NeuralNet
from skorch.callbacks import Callback

from .._utils import _progress, _seed_from
from ..callbacks import TrainingRecorder
from ._report import _say

__all__ = ["Checkpoints", "train_with_checkpoints"]


@dataclass(frozen=True)
class Checkpoints:
    """Training checkpoints of the attributed model.

    Attributes
    ----------
    states : list
        State dicts (skorch nets) or fitted estimators (scikit-learn models) along the
        training run, the last one being the final model.
    learning_rates : list of float
        Learning rate in effect at each checkpoint (1.0 where the optimiser has none).
    recorder : TrainingRecorder or None
        The recorder of a skorch net's run, with the per-step projected gradients of
        every batch when they were asked for (``record_steps=True``, for DVEmb).
    """

    states: list
    learning_rates: list
    recorder: object = None


def _checkpoint_steps(total, n_checkpoints):
    """``n_checkpoints`` evenly spaced steps in ``1..total`` ending at ``total``."""
    steps = np.unique(np.round(np.linspace(total / n_checkpoints, total, n_checkpoints)))
    return [int(s) for s in steps if s >= 1]


class _EpochProgress(Callback):
    """A progress bar with one tick per epoch of a skorch net (on standard error)."""

    def __init__(self, desc):
        self.desc = desc

    def on_train_begin(self, net, **kwargs):
        self.bar_ = _progress(None, verbose=True, desc=self.desc, total=net.max_epochs)

    def on_epoch_end(self, net, **kwargs):
        self.bar_.update(1)

    def on_train_end(self, net, **kwargs):
        self.bar_.close()
        del self.bar_  # the fitted net stays picklable


#: projection of the per-step gradients recorded for DVEmb (dattri's benchmark uses 512)
STEP_PROJ_DIM = 512


def train_with_checkpoints(setting, *, n_checkpoints=5, random_state=0, record_steps=False,
                           verbose=0):
    """Fit a setting's model once, keeping checkpoints along the way (for TracIn).

    Parameters
    ----------
    setting : Bunch
        From :func:`skdattri.datasets.load_setting`.
    n_checkpoints : int, default=5
        Number of checkpoints, evenly spaced over training, the last being the final
        model. skorch nets: state dicts (on the CPU) kept by a
        :class:`~skdattri.callbacks.TrainingRecorder` at the end of the chosen epochs,
        with the learning rate each of those epochs trained with. Estimators
        with ``max_iter`` (e.g. ``LogisticRegression``): clones refit with increasing
        ``max_iter`` (the iterates of the solver), learning rate 1. Others: the final
        model only.
    random_state : int, RandomState instance or None, default=0
        Torch seed of the training of a skorch net (its initial weights are seeded by
        the setting itself).
    record_steps : bool, default=False
        skorch nets: also record every optimisation step's per-sample gradients of its
        batch (projected to :data:`STEP_PROJ_DIM` coordinates), its rows and learning
        rate, which :class:`~skdattri.DVEmb` replays. Ignored for scikit-learn models.
    verbose : int, default=0
        Show a progress bar of the training (epochs of a skorch net, checkpoint refits
        of a scikit-learn model) on standard error.

    Returns
    -------
    model : estimator
        The fitted clone of ``setting.estimator``.
    checkpoints : Checkpoints
        ``states`` and ``learning_rates``.
    """
    est = clone(setting.estimator)
    desc = f"training {setting.name}"
    if isinstance(est, NeuralNet):
        epochs = _checkpoint_steps(int(est.max_epochs), n_checkpoints)
        recorder = (TrainingRecorder(epochs=epochs, keep="both", proj_dim=STEP_PROJ_DIM,
                                     random_state=0)
                    if record_steps else TrainingRecorder(epochs=epochs))
        extra = [("skdattri_recorder", recorder)]
        if verbose:
            extra.append(("skdattri_progress", _EpochProgress(desc)))
        est.set_params(callbacks=[*(est.callbacks or []), *extra])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_from(random_state))
            est.fit(setting.X_train, setting.y_train)
        recorder = dict(est.callbacks_)["skdattri_recorder"]
        return est, Checkpoints(list(recorder.checkpoints_), list(recorder.learning_rates_),
                                recorder if record_steps else None)

    _say(verbose, f"{desc} ({type(est).__name__}) ...")
    est.fit(setting.X_train, setting.y_train)
    n_iter = int(np.max(getattr(est, "n_iter_", 0)))
    if "max_iter" not in est.get_params() or n_iter < 2:
        return est, Checkpoints([est], [1.0])
    states = []
    steps_list = _checkpoint_steps(n_iter, n_checkpoints)[:-1]
    for steps in _progress(steps_list, verbose=verbose, desc=f"{desc}: checkpoints"):
        partial = clone(est).set_params(max_iter=steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            partial.fit(setting.X_train, setting.y_train)
        states.append(partial)
    states.append(est)
    return est, Checkpoints(states, [1.0] * len(states))

