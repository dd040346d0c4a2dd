"""skorch nets and plain torch modules as functional models."""

from __future__ import annotations

import copy

from torch import nn

from ._base import TorchModel, _Loss


def _loss_from_criterion(criterion, task):
    """A per-sample ``_Loss`` for a torch loss module."""
    if isinstance(criterion, nn.CrossEntropyLoss) and criterion.weight is None:
        return _Loss("ce", task=task, output_kind="logits")
    if isinstance(criterion, nn.BCEWithLogitsLoss) and criterion.weight is None \
            and criterion.pos_weight is None:
        return _Loss("bce" if task == "binary" else "multilabel_bce", task=task)
    output_kind = "log_proba" if isinstance(criterion, nn.NLLLoss) else "logits"
    if task == "regression":
        output_kind = "values"
    return _Loss("criterion", task=task, criterion=criterion, output_kind=output_kind)


def _task_of_criterion(criterion):
    if isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return "classification"
    if isinstance(criterion, (nn.BCEWithLogitsLoss, nn.BCELoss)):
        return "binary"
    return "regression"


def make_loss(loss, task=None):
    """Build the per-sample loss for the ``loss=`` parameter of the attributors.

    Parameters
    ----------
    loss : {"cross_entropy", "mse"}, torch loss module or callable
        ``"cross_entropy"``: class logits and integer labels; ``"mse"``: squared error
        averaged over outputs (as :class:`torch.nn.MSELoss`); a torch loss module is
        made per-sample through its ``reduction`` attribute; a callable
        ``(outputs, y) -> Tensor of shape (n_samples,)`` is used as it is.
    task : str, default=None
        Overrides the task inferred from ``loss``.
    """
    if isinstance(loss, str):
        if loss == "cross_entropy":
            return _Loss("ce", task=task or "classification")
        if loss == "mse":
            return _Loss("squared", task=task or "regression", reduce_outputs="mean")
        raise ValueError(
            f"loss={loss!r} is not understood; use 'cross_entropy', 'mse', a torch loss "
            "module or a callable (outputs, y) -> per-sample losses."
        )
    if isinstance(loss, nn.Module):
        return _loss_from_criterion(loss, task or _task_of_criterion(loss))
    if callable(loss):
        return _Loss("callable", task=task or "classification", func=loss)
    raise TypeError(f"loss must be a string, a torch loss module or a callable, got {loss!r}.")


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
    return TorchModel(module, loss, kind="skorch")


def _module_model(module, loss, device):
    if loss is None:
        raise ValueError(
            "A plain torch.nn.Module needs the loss= parameter: 'cross_entropy', 'mse', a "
            "torch loss module or a callable (outputs, y) -> per-sample losses."
        )
    module = copy.deepcopy(module).to(device)
    return TorchModel(module, make_loss(loss), kind="torch")


def _is_skorch(est):
    try:
        from skorch import NeuralNet
    except ImportError:  # pragma: no cover - skorch is a dependency
        return False
    return isinstance(est, NeuralNet)
