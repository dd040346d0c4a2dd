"""Turn what is attributed (skorch net, sklearn model, torch module) into a functional model.

This sub-package is the one place where estimators become torch functions; every
attribution method works on the :class:`TorchModel` it returns.
"""

from ._base import TorchModel
from ._dispatch import SUPPORTED, checkpoint_state, fit_or_keep, is_fitted, make_model
from ._loss import make_loss

__all__ = [
    "SUPPORTED",
    "TorchModel",
    "checkpoint_state",
    "fit_or_keep",
    "is_fitted",
    "make_loss",
    "make_model",
]
