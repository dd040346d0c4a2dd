"""skorch nets and plain torch modules as functional models."""

from __future__ import annotations

import copy

from torch import nn

from ._base import TorchModel
from ._loss import _Loss, _loss_from_criterion, _task_of_criterion, make_loss


def _skorch_model(net, device):
    from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor

    criterion = net.criterion_
    if isinstance(net, NeuralNetBinaryClassifier):
        task = "binary"
    elif isinstance(net, NeuralNetClassifier):
        task = "classification"
    elif isinstance(net, NeuralNetRegressor):
        task = "regression"
    else:
        task = _task_of_criterion(criterion)
    if isinstance(net, NeuralNetClassifier) and isinstance(criterion, nn.NLLLoss) \
            and criterion.weight is None:
        # skorch applies log(p + eps) to the module's probabilities before NLLLoss
        loss = _Loss("nll_proba", task=task, output_kind="proba")
    else:
        loss = _loss_from_criterion(criterion, task)
    module = copy.deepcopy(net.module_).to(device)
    return TorchModel(module, loss)


def _module_model(module, loss, device):
    if loss is None:
        raise ValueError(
            "A plain torch.nn.Module needs the loss= parameter: 'cross_entropy', 'mse', a "
            "torch loss module or a callable (outputs, y) -> per-sample losses."
        )
    module = copy.deepcopy(module).to(device)
    return TorchModel(module, make_loss(loss))


def _is_skorch(est):
    try:
        from skorch import NeuralNet
    except ImportError:  # pragma: no cover - skorch is a dependency
        return False
    return isinstance(est, NeuralNet)
