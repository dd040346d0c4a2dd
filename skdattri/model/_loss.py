"""The loss vocabulary: everything a method asks of a model's outputs, per loss kind.

One :class:`_Loss` object answers, for a batch of model outputs and targets:

- :meth:`~_Loss.loss`: the per-sample training loss;
- :meth:`~_Loss.margin`: the per-sample margin (log-odds of the correct class, or the
  prediction of a regressor);
- :meth:`~_Loss.predict`: the labels (values) the model predicts;
- :meth:`~_Loss.sample_targets`: labels drawn from the model's predictive distribution
  (the "true" Fisher), or ``None`` where the loss is no negative log-likelihood;
- :meth:`~_Loss.output_hessians`: per-sample Hessians of the loss with respect to the
  outputs, in closed form where there is one;
- :meth:`~_Loss.margin_weights`: ``-d loss / d margin`` (TRAK's ``Q``: ``1 - p`` of the
  correct class, the residual of a regressor);
- :meth:`~_Loss.link` and :meth:`~_Loss.output_weights`: the output non-linearity of the
  pre-activations and which of them a query's label selects (representer points).

Methods never branch on the loss kind themselves: they ask this object.

*Token classifiers.* A classifier whose outputs have shape ``(n, T, vocab)`` (a language
model's next-token logits; ``T`` may be several dimensions) with targets of shape
``(n, T)`` is a classifier of every token: its loss is the per-token cross-entropy
summed over the sequence (positions whose target is ``-100`` are ignored, as
:func:`torch.nn.functional.cross_entropy` does), its margin the summed log-odds
``log p_t - log(1 - p_t)`` of the correct tokens, its predictions the most likely
token at each position. A criterion (``"criterion"`` kind) keeps its own per-sequence
reduction; margins and predictions are the token-wise ones above.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, vmap

__all__ = ["make_loss"]

#: Target value of the positions a token classifier ignores (torch's ``ignore_index``).
IGNORE_INDEX = -100


def _first(outputs):
    """The prediction among a module's outputs: ``.logits`` of a Hugging Face
    ``ModelOutput`` (or of any object or dict with logits), the first entry of another
    dict, the first element of a tuple (skorch's convention), else the outputs."""
    logits = getattr(outputs, "logits", None)
    if logits is not None:
        return logits
    if isinstance(outputs, Mapping):
        if outputs.get("logits") is not None:
            return outputs["logits"]
        return next(v for v in outputs.values() if v is not None)
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs


def _is_sequence(out, y=None):
    """Token-classifier outputs: ``(n, T..., vocab)`` with targets ``(n, T...)``;
    without targets, outputs with more than one position (``(n, 1, k)`` outputs stay
    ordinary class scores when their targets are ``(n,)``)."""
    if out.dim() < 3:
        return False
    if y is not None:
        return y.dim() == out.dim() - 1
    return math.prod(out.shape[1:-1]) > 1


def _token_margins(logits, y):
    """Per-token log-odds ``z_y - logsumexp(z_other)`` ``(n, T)`` and the mask of the
    positions that count (target not ``IGNORE_INDEX``), from ``(n, T..., V)`` logits."""
    n, k = logits.shape[0], logits.shape[-1]
    z = logits.reshape(n, -1, k)
    t = y.reshape(n, -1).long()
    valid = t != IGNORE_INDEX
    idx = torch.where(valid, t, torch.zeros_like(t))[..., None]
    z_y = z.gather(2, idx)[..., 0]
    rest = torch.logsumexp(z.scatter(2, idx, float("-inf")), dim=2)
    return z_y - rest, valid


def _ovr_loss(name, t):
    """scikit-learn SGD margin losses of ``t = y * z`` with ``y`` in {-1, +1}."""
    if name == "log_loss":
        return F.softplus(-t)
    if name == "hinge":
        return torch.relu(1.0 - t)
    if name == "squared_hinge":
        return torch.relu(1.0 - t) ** 2
    if name == "modified_huber":
        return torch.where(t >= -1.0, torch.relu(1.0 - t) ** 2, -4.0 * t)
    if name == "perceptron":
        return torch.relu(-t)
    raise ValueError(f"unsupported SGD loss {name!r}")


def _signs(y, n, k, dtype):
    """``(n, k)`` targets in {-1, +1}: one-vs-rest signs of class indices (or 0/1 labels)."""
    if k == 1:
        return 2.0 * y.reshape(n, 1).to(dtype) - 1.0
    classes = torch.arange(k, device=y.device)
    return 2.0 * (y.reshape(n, 1).long() == classes).to(dtype) - 1.0


class _Loss:
    """A per-sample loss on model outputs, with its margin, predictions and derivatives.

    It is a small picklable object (no closures), so a fitted attributor pickles.

    Parameters
    ----------
    kind : str
        ``"ce"`` (logits, integer labels), ``"nll_proba"`` (probabilities, as skorch's
        default ``NLLLoss`` on a softmax module), ``"bce"`` (one logit, labels in {0, 1}),
        ``"multilabel_bce"`` (one logit per label), ``"squared"`` (regression),
        ``"ovr_<name>"`` (scikit-learn ``SGDClassifier`` one-vs-rest margin losses),
        ``"criterion"`` (a torch loss module made per-sample), ``"callable"``.
    task : {"classification", "binary", "multilabel", "regression"}
    output_kind : {"logits", "proba", "log_proba", "values"}, default="logits"
    criterion : torch loss module, default=None
    func : callable, default=None
        ``func(outputs, y) -> (n,)`` for ``kind="callable"``.
    scale : float, default=1.0
        Factor of the loss (0.5 for scikit-learn's half squared error).
    reduce_outputs : {"sum", "mean"}, default="sum"
        How a squared error is reduced over several outputs.
    """

    def __init__(self, kind, *, task, output_kind="logits", criterion=None, func=None,
                 scale=1.0, reduce_outputs="sum"):
        self.kind = kind
        self.task = task
        self.output_kind = output_kind
        self.criterion = criterion
        self.func = func
        self.scale = scale
        self.reduce_outputs = reduce_outputs
        if criterion is not None:
            self._crit_reduction = getattr(criterion, "reduction", "mean")
            crit = copy.copy(criterion)
            if hasattr(crit, "reduction"):
                crit.reduction = "none"
            self._crit_none = crit

    # ---- values ----------------------------------------------------------------------
    def loss(self, outputs, y):
        """Per-sample loss, shape ``(n,)``."""
        out = _first(outputs)
        n = out.shape[0]
        kind = self.kind
        if kind in ("ce", "nll_proba") and _is_sequence(out, y):
            k = out.shape[-1]
            z = out.reshape(-1, k)
            if kind == "nll_proba":
                z = torch.log(z + torch.finfo(out.dtype).eps)
            tokens = F.cross_entropy(z, y.reshape(-1).long(), ignore_index=IGNORE_INDEX,
                                     reduction="none")
            val = tokens.reshape(n, -1).sum(1)
        elif kind == "ce":
            val = F.cross_entropy(out.reshape(n, -1), y.long(), reduction="none")
        elif kind == "nll_proba":
            eps = torch.finfo(out.dtype).eps
            val = F.nll_loss(torch.log(out + eps), y.long(), reduction="none")
        elif kind == "bce":
            val = F.binary_cross_entropy_with_logits(
                out.reshape(n), y.reshape(n).to(out.dtype), reduction="none")
        elif kind == "multilabel_bce":
            val = F.binary_cross_entropy_with_logits(
                out.reshape(n, -1), y.reshape(n, -1).to(out.dtype), reduction="none").sum(1)
        elif kind == "squared":
            diff = (out.reshape(n, -1) - y.reshape(n, -1).to(out.dtype)) ** 2
            val = diff.sum(1) if self.reduce_outputs == "sum" else diff.mean(1)
        elif kind.startswith("ovr_"):
            z = out.reshape(n, -1)
            val = _ovr_loss(kind[4:], _signs(y, n, z.shape[1], z.dtype) * z).sum(1)
        elif kind == "criterion":
            val = self._crit_none(out, y)
            if val.dim() == 0:
                raise ValueError(
                    "The criterion does not return per-sample values; give it a 'reduction' "
                    "attribute (torch loss modules have one) or pass a callable loss.")
            val = val.reshape(n, -1)
            val = val.mean(1) if self._crit_reduction == "mean" else val.sum(1)
        elif kind == "callable":
            val = self.func(out, y)
            if not isinstance(val, torch.Tensor) or val.dim() != 1 or val.shape[0] != n:
                raise ValueError(
                    "A callable loss must return per-sample losses, shape (n_samples,); "
                    f"got {getattr(val, 'shape', type(val).__name__)}.")
        else:  # pragma: no cover - constructed internally only
            raise ValueError(f"unknown loss kind {kind!r}")
        return val * self.scale if self.scale != 1.0 else val

    def check_targets(self, outputs, y):
        """Raise a ``ValueError`` for labels the outputs cannot score (before any work).

        Classifiers need one class index per sample (not one-hot rows), each below the
        number of outputs; 0/1 labels for one logit.
        """
        if self.task not in ("classification", "binary") or self.kind in ("criterion",
                                                                             "callable"):
            return  # a custom loss defines its own targets
        out = _first(outputs)
        if self.task == "classification" and (_is_sequence(out, y) or _is_sequence(out)):
            return _check_token_targets(out, y)
        k = out.reshape(out.shape[0], -1).shape[1]
        if y.dim() > 1 and y.shape[1] > 1:
            raise ValueError(
                f"y has shape {tuple(y.shape)}: a classifier needs one class index per sample, "
                "shape (n_samples,); for one-hot labels pass y.argmax(axis=1).")
        if y.numel() == 0:
            return
        low, high = int(y.min()), int(y.max())
        n_classes = 2 if k == 1 else k
        if low < 0 or high >= n_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"y contains the class label {bad}, but the model has {k} output(s): its "
                f"classes are 0..{n_classes - 1}. Encode labels as class indices (e.g. "
                "sklearn.preprocessing.LabelEncoder) matching the model's outputs.")

    def logits(self, outputs, *, flatten=True):
        """Logit-equivalent scores ``(n, k)`` (any per-row shift is irrelevant); with
        ``flatten=False`` in the outputs' own shape (token classifiers)."""
        out = _first(outputs)
        out = out.reshape(out.shape[0], -1) if flatten else out
        if self.output_kind == "proba":
            return torch.log(out + torch.finfo(out.dtype).eps)
        return out

    def margin(self, outputs, y):
        """Per-sample margin (higher = more confident in ``y``), shape ``(n,)``.

        Classification: log-odds of the correct class, ``log p_y - log(1 - p_y)``;
        token classifiers: summed over the tokens that count. Multilabel: the sum of
        the signed logits. Regression: the prediction (summed over outputs).
        """
        out = _first(outputs)
        n = out.shape[0]
        if self.task == "classification" and _is_sequence(out, y):
            m, valid = _token_margins(self.logits(out, flatten=False), y)
            return torch.where(valid, m, torch.zeros_like(m)).sum(1)
        if self.task == "regression":
            return out.reshape(n, -1).sum(1)
        if self.task == "multilabel":
            sign = 2.0 * y.reshape(n, -1).to(out.dtype) - 1.0
            return (sign * out.reshape(n, -1)).sum(1)
        if out.reshape(n, -1).shape[1] == 1:
            if self.output_kind == "proba":  # one probability of the positive class
                p = out.reshape(n)
                eps = torch.finfo(out.dtype).eps
                z = torch.log(p + eps) - torch.log1p(-p + eps)
            else:
                z = out.reshape(n)
            return (2.0 * y.reshape(n).to(z.dtype) - 1.0) * z
        logits = self.logits(out)
        idx = y.long()[:, None]
        z_y = logits.gather(1, idx)[:, 0]
        return z_y - torch.logsumexp(logits.scatter(1, idx, float("-inf")), dim=1)

    def predict(self, outputs):
        """Labels (classification) or values (regression) the model predicts."""
        out = _first(outputs)
        n = out.shape[0]
        if self.task == "regression":
            return out
        if self.task == "classification" and _is_sequence(out):
            return out.argmax(-1)
        z = out.reshape(n, -1)
        if self.task == "multilabel":
            return (z > 0).to(torch.int64)
        if z.shape[1] == 1:
            threshold = 0.5 if self.output_kind == "proba" else 0.0
            return (z[:, 0] > threshold).to(torch.int64)
        return z.argmax(1)

    # ---- curvature -------------------------------------------------------------------
    @property
    def has_distribution(self):
        """Whether the loss is the negative log-likelihood of a distribution the model
        defines, so that :meth:`sample_targets` can draw from it."""
        return self.kind in ("ce", "nll_proba", "bce", "multilabel_bce", "squared") or (
            self.kind == "criterion" and self.task in ("classification", "binary"))

    def sample_targets(self, outputs, generator, y=None):
        """Targets drawn from the model's predictive distribution (the true Fisher).

        Softmax / sigmoid classifiers draw labels; a squared error ``c ||f - y||^2``
        draws ``y ~ N(f, I / (2c))``, whose Fisher ``2c I`` is the output Hessian.
        ``None`` where the loss is not the negative log-likelihood of a distribution the
        model defines (hinge losses, custom criteria): callers use the training labels.
        A token classifier draws one token per position; positions where the true
        targets ``y`` (when given) are ``-100`` stay ignored (padding).
        """
        if not self.has_distribution:
            return None
        out = _first(outputs).detach()
        n = out.shape[0]
        if self.task == "classification" and _is_sequence(out):
            z = self.logits(out, flatten=False)
            probs = torch.softmax(z.reshape(-1, z.shape[-1]), dim=1)
            drawn = torch.multinomial(probs, 1, generator=generator)[:, 0].reshape(z.shape[:-1])
            if y is not None and y.shape == drawn.shape:
                drawn = torch.where(y == IGNORE_INDEX, y.to(drawn.dtype), drawn)
            return drawn
        if self.task == "classification":
            probs = torch.softmax(self.logits(out), dim=1)
            return torch.multinomial(probs, 1, generator=generator)[:, 0]
        if self.task == "binary":
            p = out.reshape(n) if self.output_kind == "proba" else torch.sigmoid(out.reshape(n))
            return torch.bernoulli(p, generator=generator).to(torch.int64)
        if self.kind == "squared":
            d = out[0].numel()
            # a squared error c ||f - y||^2 is the negative log-likelihood of N(f, I / 2c)
            c = self.scale / (d if self.reduce_outputs == "mean" else 1.0)
            noise = torch.randn(out.shape, generator=generator, dtype=out.dtype,
                                device=out.device)
            return out + noise * math.sqrt(1.0 / (2.0 * c))
        return torch.bernoulli(torch.sigmoid(out.reshape(n, -1)), generator=generator)

    def output_hessians(self, Z, y):
        """Per-sample Hessians of the loss w.r.t. the outputs ``Z (n, k)``: ``(n, k, k)``."""
        n, k = Z.shape
        eye = torch.eye(k, dtype=Z.dtype, device=Z.device)
        if self.kind == "ce":
            p = torch.softmax(Z, dim=1)
            return (p[:, :, None] * eye - p[:, :, None] * p[:, None, :]) * self.scale
        if self.kind in ("bce", "multilabel_bce"):
            p = torch.sigmoid(Z)
            return (p * (1.0 - p))[:, :, None] * eye * self.scale
        if self.kind == "squared":
            c = 2.0 * self.scale / (k if self.reduce_outputs == "mean" else 1.0)
            return c * eye.expand(n, k, k).clone()

        def one(z, t):
            return self.loss(z[None], t[None])[0]

        return vmap(hessian(one))(Z, y)

    def margin_weights(self, outputs, y):
        """``-d loss / d margin`` per sample: ``1 - p_y`` for classifiers, the residual
        ``-d loss / d f`` for a single-output regressor (TRAK's ``Q``).

        Token classifiers: the mean of ``1 - p_t`` over the tokens that count. The
        gradient of the summed loss is ``-sum_t (1 - p_t) grad m_t``; with one factor
        per sequence in front of the gradient of the summed margin ``sum_t m_t`` the
        mean is the factor that is exact when every token has the same ``p_t``.
        """
        out = _first(outputs)
        n = out.shape[0]
        if self.task == "classification" and _is_sequence(out, y):
            m, valid = _token_margins(self.logits(out, flatten=False), y)
            q = torch.where(valid, torch.sigmoid(-m), torch.zeros_like(m)).sum(1)
            return q / valid.sum(1).clamp_min(1).to(q.dtype)
        if self.task == "multilabel":
            raise ValueError("A multilabel model has no single margin per sample.")
        if self.task == "regression":
            z = out.reshape(n, -1)
            if z.shape[1] != 1:
                raise ValueError(
                    f"Only single-output regressors have one margin per sample; this model "
                    f"has {z.shape[1]} outputs.")
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                (dz,) = torch.autograd.grad(self.loss(z, y).sum(), z)
            return -dz[:, 0]
        # 1 - p = sigmoid(-margin), with margin = log(p / (1 - p)): accurate for p -> 1
        return torch.sigmoid(-self.margin(out, y))

    # ---- pre-activations -------------------------------------------------------------
    def link(self, n_outputs):
        """Output non-linearity of the pre-activations: softmax, sigmoid or identity."""
        if self.task == "regression":
            return "identity"
        if self.task == "classification" and n_outputs > 1:
            return "softmax"
        return "sigmoid"

    def output_weights(self, y, n_outputs):
        """``(n, n_outputs)`` weight of each pre-activation in the score of label ``y``:
        one-hot (softmax), +-1 per logit (sigmoid), ones (identity)."""
        link = self.link(n_outputs)
        n = y.shape[0]
        if link == "identity":
            return torch.ones(n, n_outputs, dtype=torch.float64, device=y.device)
        if link == "softmax":
            return F.one_hot(y.long().reshape(-1), n_outputs).to(torch.float64)
        return 2.0 * y.reshape(n, n_outputs).to(torch.float64) - 1.0


# --------------------------------------------------------------------------------------
# building a loss
# --------------------------------------------------------------------------------------
def _check_token_targets(out, y):
    """Targets of a token classifier: shape ``(n, T...)`` as the outputs ``(n, T..., V)``
    (``n`` may differ: the outputs may be a few rows), token ids in ``0..V-1`` or
    ``IGNORE_INDEX``."""
    k = out.shape[-1]
    if tuple(y.shape[1:]) != tuple(out.shape[1:-1]):
        raise ValueError(
            f"y has shape {tuple(y.shape)}, but the model outputs token logits of shape "
            f"(n_samples, {', '.join(map(str, out.shape[1:]))}): a token classifier needs "
            f"one token id per position, y of shape (n_samples, "
            f"{', '.join(map(str, out.shape[1:-1]))}).")
    valid = y[y != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= k):
        bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
        raise ValueError(
            f"y contains the token id {bad}, but the model has {k} output(s) per position: "
            f"token ids are 0..{k - 1} ({IGNORE_INDEX} marks ignored positions).")


def _task_of_criterion(criterion):
    """The task a criterion trains for. Torch's own losses by type; other criteria by
    name (duck typing): a class name with ``CrossEntropy`` or ``NLL`` (not binary)
    is a classification loss, e.g. a sequence cross-entropy; anything else regression."""
    if isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return "classification"
    if isinstance(criterion, (nn.BCEWithLogitsLoss, nn.BCELoss)):
        return "binary"
    name = type(criterion).__name__.lower()
    if "binary" not in name and ("crossentropy" in name or "nll" in name):
        return "classification"
    return "regression"


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


def make_loss(loss, task=None):
    """Build the per-sample loss for the ``loss=`` parameter of the attributors.

    Parameters
    ----------
    loss : {"cross_entropy", "binary_cross_entropy", "mse"}, torch loss module or callable
        ``"cross_entropy"``: class logits and integer labels, or token logits ``(n, T,
        vocab)`` and token ids ``(n, T)`` (``-100`` ignored; the per-token losses are
        summed over the sequence); ``"binary_cross_entropy"``:
        one logit and 0/1 labels; ``"mse"``: squared error averaged over outputs (as
        :class:`torch.nn.MSELoss`); a torch loss module is made per-sample through its
        ``reduction`` attribute; a callable ``(outputs, y) -> Tensor of shape
        (n_samples,)`` is used as it is.
    task : str, default=None
        Overrides the task inferred from ``loss``.

    Returns
    -------
    loss : _Loss

    Examples
    --------
    >>> import torch
    >>> from skdattri.model import make_loss
    >>> ce = make_loss("cross_entropy")
    >>> logits, y = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
    >>> ce.loss(logits, y)
    tensor([0.1269, 0.6931])
    >>> ce.margin(logits, y)
    tensor([2., 0.])
    """
    if isinstance(loss, _Loss):
        return loss
    if isinstance(loss, str):
        if loss == "cross_entropy":
            return _Loss("ce", task=task or "classification")
        if loss == "binary_cross_entropy":
            return _Loss("bce", task=task or "binary")
        if loss == "mse":
            return _Loss("squared", task=task or "regression", reduce_outputs="mean")
        raise ValueError(
            f"loss={loss!r} is not understood; use 'cross_entropy', 'binary_cross_entropy', "
            "'mse', a torch loss module or a callable (outputs, y) -> per-sample losses.")
    if isinstance(loss, nn.Module):
        return _loss_from_criterion(loss, task or _task_of_criterion(loss))
    if callable(loss):
        return _Loss("callable", task=task or "classification", func=loss)
    raise TypeError(f"loss must be a string, a torch loss module or a callable, got {loss!r}.")
