"""The functional view of a model that every attribution method works with."""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from ._dropout import DROPOUT_SEED, _fixed_dropout
from ._loss import _first


class TorchModel:
    """A model seen as a function of its parameters.

    This is what every attribution method consumes: a torch module evaluated with
    :func:`torch.func.functional_call`, its loss vocabulary (``loss_``: per-sample
    loss, margin, predictions, sampled labels, output Hessians), the L2 penalty its
    estimator minimises, and the input conversion that turns user data into tensors.
    It is built by :func:`skdattri.model.make_model`.

    Parameters
    ----------
    module : torch.nn.Module
        The network, in eval mode, on ``device``.
    loss : _Loss
        The loss vocabulary (see :mod:`skdattri.model._loss`).
    l2 : dict of str to float or Tensor, default=None
        L2 penalty of the training objective written as
        ``mean_i loss_i + 0.5 * sum_name l2[name] * ||theta_name||^2``.
    preprocess : callable, default=None
        Applied to ``X`` before it becomes a tensor (earlier steps of a Pipeline).
    input_dtype : torch.dtype, default=None
        dtype floating inputs are cast to (the parameters' dtype when ``None``);
        integer inputs (token ids) are kept as they are unless ``cast_int_inputs``.
    cast_int_inputs : bool, default=False
        Cast integer inputs to ``input_dtype`` too (scikit-learn models).
    classes : ndarray, default=None
        Class labels of a scikit-learn classifier; ``y`` is mapped to their indices.
    affine : str, default=None
        Name of the ``nn.Linear`` module when the whole model is that one layer on
        flattened inputs (scikit-learn linear models): gradients and curvature then
        have closed forms.
    """

    def __init__(self, module, loss, *, l2=None, preprocess=None, input_dtype=None,
                 cast_int_inputs=False, classes=None, affine=None):
        self.module = module.eval()
        self.loss_ = loss
        self.l2 = dict(l2 or {})
        self.preprocess = preprocess
        params = list(module.parameters())
        self.dtype = params[0].dtype if params else torch.get_default_dtype()
        self.device = params[0].device if params else torch.device("cpu")
        self.input_dtype = input_dtype or self.dtype
        self.cast_int_inputs = cast_int_inputs
        self.classes = classes
        self.affine = affine

    # ---- parameters ------------------------------------------------------------------
    @property
    def task(self):
        """``"classification"``, ``"binary"``, ``"multilabel"`` or ``"regression"``."""
        return self.loss_.task

    def named_params(self):
        """All trainable parameters, ``{name: detached tensor}``, in module order."""
        return {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}

    def select(self, layers=None):
        """Names of the trainable parameters whose name starts with one of ``layers``."""
        names = list(self.named_params())
        if layers is None:
            return names
        prefixes = [layers] if isinstance(layers, str) else list(layers)
        chosen = [n for n in names if any(n == p or n.startswith(p + ".") or
                                          (p.endswith(".") and n.startswith(p))
                                          for p in prefixes)]
        if not chosen:
            raise ValueError(
                f"layers={layers!r} matches no parameter of the model. "
                f"Parameter names are: {names}.")
        return chosen

    def params_from(self, state, names):
        """Parameters ``{name: tensor}`` (restricted to ``names``) of a state dict.

        ``state`` is a ``{name: tensor}`` dict of the model's architecture (see
        :func:`skdattri.model.checkpoint_state`, which turns modules and fitted
        estimators into one) or ``None`` for the model itself.
        """
        full = self.named_params() if state is None else state
        ref = dict(self.module.named_parameters())
        out = {}
        for n in names:
            if n not in full:
                raise ValueError(
                    f"Checkpoint has no parameter {n!r}; checkpoints must have the same "
                    f"architecture as the attributed model (it has {list(full)[:10]}...).")
            t = torch.as_tensor(full[n])
            if t.shape != ref[n].shape:
                raise ValueError(
                    f"Checkpoint parameter {n!r} has shape {tuple(t.shape)}, "
                    f"the model's has {tuple(ref[n].shape)}.")
            out[n] = t.detach().to(device=self.device, dtype=ref[n].dtype)
        return out

    def l2_vector(self, names):
        """The L2 coefficients as one flat vector over ``names`` (zeros where none)."""
        ref = dict(self.module.named_parameters())
        parts = [torch.broadcast_to(torch.as_tensor(self.l2.get(n, 0.0), dtype=self.dtype,
                                                    device=self.device),
                                    ref[n].shape).reshape(-1) for n in names]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype)

    # ---- evaluation ------------------------------------------------------------------
    def forward(self, params, X):
        """Outputs of the module at ``params`` (other parameters as they are).

        The one place where the module runs: a dict ``X`` is passed as keyword
        arguments (``input_ids``, ``attention_mask`` of a Hugging Face model), and the
        prediction is taken out of structured outputs -- the ``.logits`` of a
        ``ModelOutput`` (or of a dict), the first entry of a tuple or another dict. With
        a ``DROPOUT_SEED`` entry in ``params`` the module's ``nn.Dropout`` layers apply
        that ensemble member's fixed masks (see :func:`skdattri.model.dropout_member`).
        """
        seed = params.get(DROPOUT_SEED) if isinstance(params, dict) else None
        if seed is not None:
            params = {k: v for k, v in params.items() if k != DROPOUT_SEED}
        with _fixed_dropout(self.module, seed):
            if isinstance(X, dict):
                raw = functional_call(self.module, params, args=(), kwargs=X, strict=False)
            else:
                raw = functional_call(self.module, params, (X,), strict=False)
        return _first(raw)

    def value(self, outputs, y, what):
        """Per-sample ``"loss"``, ``"margin"``, ``"neg_margin"``, ``"neg_output"`` values,
        or those of a callable ``(outputs, y) -> (n,)``."""
        if what == "loss":
            return self.loss_.loss(outputs, y)
        if what == "margin":
            return self.loss_.margin(outputs, y)
        if what == "neg_margin":
            return -self.loss_.margin(outputs, y)
        if what == "neg_output":
            out = _first(outputs)
            return -out.reshape(out.shape[0], -1).sum(1)
        if callable(what):
            val = what(_first(outputs), y)
            if not isinstance(val, torch.Tensor) or val.dim() != 1:
                raise ValueError(
                    "A callable target must return a 1-d tensor of per-sample values, got "
                    f"{type(val).__name__} {getattr(val, 'shape', '')}.")
            return val
        raise ValueError(f"unknown value {what!r}")

    def query_value(self, target, y_given):
        """Which per-sample value the query side differentiates (the sign convention).

        Scores are ``grad(query value) . K . grad(train loss)`` with the query value
        chosen so that a positive score means "helps": the loss itself, the negated
        margin, or -- for a regressor queried without y, whose loss at its own
        prediction is flat -- the negated prediction.
        """
        if callable(target):
            return target
        if target == "margin":
            return "neg_margin"
        if not y_given and self.task == "regression":
            return "neg_output"
        return "loss"

    def predict(self, params, X):
        """Predicted labels (values) at ``params``."""
        with torch.no_grad():
            return self.loss_.predict(self.forward(params, X))

    # ---- data conversion -------------------------------------------------------------
    def to_tensor_X(self, X):
        """Model inputs as a tensor (or dict of tensors) on the CPU, preprocessed."""
        if self.preprocess is not None:
            X = self.preprocess(X)
        return _as_tensor_tree(X, self.input_dtype, self.cast_int_inputs)

    def to_tensor_y(self, y):
        """Targets as a tensor on the CPU: class indices for classifiers."""
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        y = np.asarray(y)
        if self.classes is not None and y.ndim > 1 and y.shape[1] > 1:
            raise ValueError(
                f"y has shape {y.shape}: a classifier needs one label per sample, shape "
                "(n_samples,); for one-hot labels pass y.argmax(axis=1).")
        if self.classes is not None:
            y = y.reshape(-1) if y.ndim > 1 else y
            idx = np.clip(np.searchsorted(self.classes, y), 0, len(self.classes) - 1)
            bad = self.classes[idx] != y
            if np.any(bad):
                raise ValueError(
                    "y contains labels the model was not trained on: "
                    f"{np.unique(y[bad])[:10].tolist()}; known classes are "
                    f"{self.classes.tolist()}.")
            return torch.as_tensor(idx, dtype=torch.int64)
        if self.task in ("regression", "multilabel"):
            return torch.as_tensor(np.asarray(y, dtype=np.float64)).to(self.dtype)
        if y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
            return torch.as_tensor(y.astype(np.int64))
        raise ValueError(
            f"Could not turn y of dtype {y.dtype} into class indices for this model; "
            "pass integer class labels.")

    # ---- functions of (params, batch) for curvature operators -------------------------
    def curvature_functions(self, frozen):
        """``(mean_loss, outputs, output_mean_loss)`` for the operators of
        :mod:`skdattri.func.hessian`, with the parameters ``frozen`` kept fixed."""
        return _BatchLoss(self, frozen), _BatchOutputs(self, frozen), _OutputsLoss(self)


class _BatchLoss:
    """``loss_fn(params, (X, y))``: mean training loss of a batch."""

    def __init__(self, model, frozen):
        self.model = model
        self.frozen = frozen

    def __call__(self, params, batch):
        X, y = batch
        return self.model.loss_.loss(self.model.forward({**self.frozen, **params}, X), y).mean()


class _BatchOutputs(_BatchLoss):
    """``output_fn(params, (X, y))``: the outputs of a batch."""

    def __call__(self, params, batch):
        return _first(self.model.forward({**self.frozen, **params}, batch[0]))


class _OutputsLoss:
    """``output_loss_fn(outputs, (X, y))``: mean loss of a batch given its outputs."""

    def __init__(self, model):
        self.model = model

    def __call__(self, outputs, batch):
        return self.model.loss_.loss(outputs, batch[1]).mean()


def _as_tensor_tree(X, dtype, cast_int):
    """numpy / torch / dict of arrays -> tensor tree on the CPU."""
    if isinstance(X, dict):
        return {k: _as_tensor_tree(v, dtype, cast_int) for k, v in X.items()}
    if isinstance(X, torch.Tensor):
        t = X.detach().cpu()
    else:
        arr = np.asarray(X)
        if arr.dtype == object:
            arr = arr.astype(np.float64)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, copy=True, order="C")
        t = torch.from_numpy(arr)
    if t.is_floating_point() or cast_int or t.dtype == torch.bool:
        t = t.to(dtype)
    return t
