"""Turn what is attributed (skorch net, sklearn model, torch module) into a functional model.

This sub-package is the one place where estimators become torch functions; every
attribution method works on the :class:`TorchModel` it returns.
"""

from ._base import TorchModel
from ._dispatch import SUPPORTED, checkpoint_state, fit_or_keep, is_fitted, make_model
from ._dropout import DROPOUT_SEED, dropout_member, dropout_modules
from ._loss import make_loss

__all__ = [
    "DROPOUT_SEED",
    "SUPPORTED",
    "TorchModel",
    "checkpoint_state",
    "dropout_member",
    "dropout_modules",
    "fit_or_keep",
    "is_fitted",
    "make_loss",
    "make_model",
]
